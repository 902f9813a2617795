"""encfs.daemon.spawn: a daemon's failure before it is ready reaches the parent as the same
one-line error with the same exit code (errors.EXIT_CODES), whichever process found it."""

from __future__ import annotations

from pathlib import Path

import pytest

from encfs.daemon import Readiness, spawn
from encfs.errors import EncfsError, KeyStateError, MountError


def _fails_with(error: Exception):  # type: ignore[no-untyped-def]
    def run(ready: Readiness) -> None:
        raise error
    return run


def test_a_daemon_failure_keeps_its_message_and_exit_code(tmp_path: Path) -> None:
    with pytest.raises(MountError) as e:
        spawn(_fails_with(KeyStateError("key alias/app is Disabled")), name="t", log_file=str(tmp_path / "log"),
              error=MountError, state_dir=tmp_path, log_id="t", timeout=30)
    assert e.value.message == "key alias/app is Disabled" and e.value.exit_code == 78


def test_other_failures_keep_the_callers_code(tmp_path: Path) -> None:
    with pytest.raises(MountError) as e:
        spawn(_fails_with(ValueError("E7 boom")), name="t", log_file=str(tmp_path / "log"), error=MountError,
              state_dir=tmp_path, log_id="t", timeout=30)
    assert e.value.message == "internal error: ValueError: E7 boom" and e.value.exit_code == EncfsError.exit_code
