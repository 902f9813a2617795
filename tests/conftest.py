"""Shared fixtures: a real SoftHSM2 token in a temporary directory (no PKCS#11 mocks).

SoftHSM2 reads SOFTHSM2_CONF once per process, so in-process tests share one
session-wide token; each test gets its own metadata home (its own keys,
aliases and audit log) and a controllable clock. CLI tests run ``encfs`` in
subprocesses, each with its own embedded token.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from encfs.keys.service import KeyService
from encfs.keys.softhsm import EmbeddedSoftHSM
from encfs.keys.token import Token


class FakeClock:
    """A wall clock that tests move forward explicitly."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float = 0.0, *, days: float = 0.0) -> None:
        self.now += seconds + days * 86400


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> EmbeddedSoftHSM:
    """A provisioned SoftHSM2 token, active for this process."""
    emb = EmbeddedSoftHSM(tmp_path_factory.mktemp("hsm"))
    emb.provision()
    emb.activate()
    return emb


@pytest.fixture(scope="session")
def token(softhsm: EmbeddedSoftHSM) -> Iterator[Token]:
    tok = Token(softhsm.spec())
    yield tok
    tok.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def service(tmp_path: Path, token: Token, clock: FakeClock) -> Iterator[KeyService]:
    ks = KeyService(tmp_path / "home", token, clock=clock)
    yield ks
    ks.audit.close()


def run_encfs(*args: str, home: Path, input: bytes = b"", env: dict[str, str] | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    """Run the real ``encfs`` CLI in a subprocess with ENCFS_HOME=home."""
    full_env = dict(os.environ, ENCFS_HOME=str(home))
    full_env.pop("SOFTHSM2_CONF", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "encfs", *args], input=input, capture_output=True,
                          env=full_env, timeout=timeout)


def init_home(home: Path, env: dict[str, str] | None = None) -> Path:
    """`encfs hsm init` in ``home``: the only command that creates a key store (issue #23)."""
    proc = run_encfs("hsm", "init", home=home, env=env)
    assert proc.returncode == 0, proc.stderr
    return home


@pytest.fixture
def cli_home(tmp_path: Path) -> Path:
    return tmp_path / "cli-home"


@pytest.fixture(scope="session")
def fs_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ENCFS_HOME with a provisioned embedded token and a CMK aliased 'fs'."""
    home = init_home(tmp_path_factory.mktemp("fs-home"))
    proc = run_encfs("key", "create", "--alias", "fs", home=home)
    assert proc.returncode == 0, proc.stderr
    return home


@pytest.fixture
def fs(tmp_path: Path, fs_home: Path) -> tuple[Path, Path]:
    """A freshly initialised CIPHERDIR (not mounted) and an empty mountpoint for it."""
    cipher, plain = tmp_path / "cipher", tmp_path / "plain"
    plain.mkdir()
    assert run_encfs("init", str(cipher), "--key", "fs", home=fs_home).returncode == 0
    return cipher, plain


@pytest.fixture
def encfs_mount(tmp_path: Path, fs_home: Path) -> Iterator[Any]:
    """A freshly initialised CIPHERDIR mounted at a fresh mountpoint (unmounted afterwards)."""
    from fuse_helpers import Mount

    cipherdir, mountpoint = tmp_path / "cipher", tmp_path / "plain"
    mountpoint.mkdir()
    proc = run_encfs("init", str(cipherdir), "--key", "fs", home=fs_home)
    assert proc.returncode == 0, proc.stderr
    m = Mount(cipherdir, mountpoint, fs_home)
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture
def uring_enabled() -> None:
    """The fuse module's enable_uring on, so that `encfs mount --io-uring` serves over io_uring
    (root only). It stays on: two xdist workers would race to put the old value back while the
    other mounts, and on it only lets a server that asks for io_uring use it (docs/dev/testing.md)."""
    from encfs.fuseproto import uring

    from encfs.fuseproto.ioring import supported_machine

    param = Path(uring.ENABLE_PARAMETER)
    if not supported_machine():
        pytest.skip("FUSE over io_uring is served on x86-64 only (encfs/fuseproto/ioring.py)")
    if not param.exists():
        pytest.skip("this kernel's fuse module has no io_uring (CONFIG_FUSE_IO_URING)")
    if os.geteuid() != 0:
        pytest.skip("turning on enable_uring needs root")
    if param.read_text().strip() != "Y":
        param.write_text("Y")
