"""contrib/systemd's units pass `systemd-analyze verify` (syntax, known directives, the command
exists), with the command pointed at this checkout's encfs. This machine's PID 1 is not systemd,
so the units are not run here: what they run (`encfs mount --foreground`, `encfs umount`, `encfs
volume attach-all`) is tested through the CLI elsewhere."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).parent.parent / "contrib" / "systemd"
ENCFS = Path(sys.executable).parent / "encfs"  # the console script pip installed beside this Python


@pytest.mark.parametrize("unit", ["encfs-mount@.service", "encfs-volumes.service"])
def test_unit_verifies_cleanly(unit: str, tmp_path: Path) -> None:
    assert ENCFS.is_file() and shutil.which("systemd-analyze"), "quickstart.sh installs both"
    text = (UNITS / unit).read_text()
    assert "/usr/local/bin/encfs " in text  # where `pip install` puts the command system-wide
    name = unit.replace("@.", "@cipher.")  # a template is verified as one of its instances
    (tmp_path / name).write_text(text.replace("/usr/local/bin/encfs ", f"{ENCFS} "))
    p = subprocess.run(["systemd-analyze", "verify", str(tmp_path / name)], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0 and p.stdout + p.stderr == "", p.stdout + p.stderr
