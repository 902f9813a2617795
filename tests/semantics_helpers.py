"""Fixtures and helpers of the semantics suite (tests/test_fuse_semantics_*.py): real encfs mounts.

A test module imports the fixtures it asks for (``from semantics_helpers import d_fixture  # noqa: F401``,
then asks for ``d``); they are not in conftest.py, where they would reach every test module. Every
module of the suite imports ``server_fixture``: the autouse, module-scoped ``server`` runs the module once
per FUSE server (``encfs mount --server``): our own protocol server, the default, and pyfuse3, and every
mount that ``new_mount`` or ``serve`` makes meanwhile uses it. ``mnt`` is one module-wide mount, ``d`` a
fresh directory on it for each test, and ``block_mnt`` and ``bd`` the same on a filesystem of each
content block size.
"""

from __future__ import annotations

import ctypes
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_encfs
from fuse_helpers import Mount

BLOCK_SIZES = (4096, 32768)  # every content block size a filesystem can have (FORMAT.md 6.4)
RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4

_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old: Path, new: Path, flags: int) -> None:
    if _libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), ctypes.c_uint(flags)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(old))


SERVERS = ("encfs", "pyfuse3")
_server = SERVERS[0]  # the server every mount of the tests now running uses (the ``server`` fixture)


def bind_unix_socket(s: socket.socket, directory: Path, name: str) -> None:
    """Bind ``s`` to ``directory``/``name`` by a relative name: a test's path is longer than
    sun_path allows."""
    old = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.chdir(directory)
        s.bind(name)
    finally:
        os.fchdir(old)
        os.close(old)


@pytest.fixture(scope="module", params=SERVERS, autouse=True, name="server")
def server_fixture(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs the module once per server: module-scoped, so the tests are grouped by it."""
    global _server
    _server = request.param
    try:
        yield request.param
    finally:
        _server = SERVERS[0]


def serve(cipher: Path, plain: Path, home: Path, *extra: str) -> Mount:
    """``encfs mount --foreground`` with the server under test (only pyfuse3 loads libfuse)."""
    m = Mount(cipher, plain, home, "--server", _server, *extra)
    with open(f"/proc/{m.pid}/maps") as f:
        if ("libfuse3.so" in f.read()) != (_server == "pyfuse3"):
            m.stop()
            raise AssertionError(f"the daemon does not serve with {_server}")
    return m


def new_mount(base: Path, home: Path, *extra: str, block: int | None = None) -> Mount:
    cipher, plain = base / "cipher", base / "plain"
    plain.mkdir(parents=True, exist_ok=True)
    if not cipher.exists():
        size = ["--block-size", str(block)] if block else []
        proc = run_encfs("init", str(cipher), "--key", "fs", *size, home=home)
        assert proc.returncode == 0, proc.stderr
    return serve(cipher, plain, home, *extra)


@pytest.fixture(scope="module", name="mnt")
def mnt_fixture(server: str, tmp_path_factory: pytest.TempPathFactory, fs_home: Path) -> Iterator[Mount]:
    m = new_mount(tmp_path_factory.mktemp("sem"), fs_home)
    try:
        yield m
    finally:
        m.stop()


def _fresh_dir(m: Mount, request: pytest.FixtureRequest) -> Path:
    p = m.mountpoint / request.node.name.replace("[", "-").replace("]", "")
    p.mkdir()
    return p


@pytest.fixture(name="d")
def d_fixture(mnt: Mount, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh directory on the shared mount; the daemon must survive every test."""
    yield _fresh_dir(mnt, request)
    assert mnt.proc.poll() is None, "the encfs daemon died"


@pytest.fixture(scope="module", params=BLOCK_SIZES, ids=lambda b: f"{b // 1024}k", name="block_mnt")
def block_mnt_fixture(server: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                      fs_home: Path) -> Iterator[tuple[Mount, int]]:
    m = new_mount(tmp_path_factory.mktemp(f"sem{request.param}"), fs_home, block=request.param)
    try:
        yield m, request.param
    finally:
        m.stop()


@pytest.fixture(name="bd")
def bd_fixture(block_mnt: tuple[Mount, int], request: pytest.FixtureRequest) -> Iterator[tuple[Path, int]]:
    """``d`` on a filesystem of each content block size: (directory, block size)."""
    m, block = block_mnt
    yield _fresh_dir(m, request), block
    assert m.proc.poll() is None, "the encfs daemon died"
