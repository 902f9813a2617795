"""Changes made to the CIPHERDIR behind encfs's back: a cut backing file, a header copied from
another file (header poisoning, as in the 2017 gocryptfs audit). The reader gets EIO or the
shorter file, never invented zeros; nothing is ever sealed under another file's key."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from fuse_helpers import Mount, cold_read

HEADER = 128
BLOCK = 32768


def backing_file(cipher: Path) -> Path:
    """The one user file of a CIPHERDIR (its own bookkeeping names hold a '.')."""
    (entry,) = [p for p in cipher.iterdir() if "." not in p.name]
    return entry


def read_or_eio(path: Path) -> bytes | None:
    try:
        return cold_read(path)
    except OSError as e:
        assert e.errno == errno.EIO, e
        return None


@pytest.mark.parametrize("how", ["fsynced", "closed", "open"])
def test_a_backing_file_cut_while_mounted_never_reads_as_zeros(fs: tuple[Path, Path], fs_home: Path, how: str) -> None:
    cipher, plain = fs
    data = os.urandom(200_000)
    with Mount(cipher, plain, fs_home):
        with open(plain / "f", "wb") as f:
            f.write(data)
            if how == "fsynced":
                os.fsync(f.fileno())
        keep = open(plain / "f", "rb") if how == "open" else None
        try:
            assert os.stat(plain / "f").st_size == len(data)  # the kernel caches this size
            os.truncate(backing_file(cipher), HEADER + 2 * (BLOCK + 28))  # two whole blocks stay
            got = read_or_eio(plain / "f")
            if got is not None:
                assert data.startswith(got), "the cut file reads as something it never held"
                assert len(got) <= 2 * BLOCK, "bytes past the cut were invented"
        finally:
            if keep is not None:
                keep.close()


def test_a_header_copied_onto_an_empty_file_is_not_used(fs: tuple[Path, Path], fs_home: Path) -> None:
    cipher, plain = fs
    a_data = os.urandom(2 * BLOCK)
    with Mount(cipher, plain, fs_home):
        (plain / "a").write_bytes(a_data)
    (a_backing,) = [p for p in cipher.iterdir() if "." not in p.name]
    with Mount(cipher, plain, fs_home):
        (plain / "b").touch()
    (b_backing,) = [p for p in cipher.iterdir() if "." not in p.name and p != a_backing]
    assert b_backing.stat().st_size in (0, HEADER)
    b_backing.write_bytes(a_backing.read_bytes()[:HEADER])  # the attacker's copy of a's header
    secret = os.urandom(BLOCK)
    with Mount(cipher, plain, fs_home):
        (plain / "b").write_bytes(secret)
        assert cold_read(plain / "b") == secret
    assert b_backing.read_bytes()[6:22] != a_backing.read_bytes()[6:22], "b kept a's file id"
    # Splicing b's first block into a must not make a read b's bytes.
    a_raw = bytearray(a_backing.read_bytes())
    a_raw[HEADER:HEADER + BLOCK + 28] = b_backing.read_bytes()[HEADER:HEADER + BLOCK + 28]
    a_backing.write_bytes(a_raw)
    with Mount(cipher, plain, fs_home):
        with pytest.raises(OSError) as info:
            cold_read(plain / "a")
        assert info.value.errno == errno.EIO


def test_a_header_copied_onto_a_written_file_refuses_writes(fs: tuple[Path, Path], fs_home: Path) -> None:
    cipher, plain = fs
    with Mount(cipher, plain, fs_home):
        (plain / "a").write_bytes(os.urandom(2 * BLOCK))
    (a_backing,) = [p for p in cipher.iterdir() if "." not in p.name]
    with Mount(cipher, plain, fs_home):
        (plain / "b").write_bytes(os.urandom(3 * BLOCK))
    (b_backing,) = [p for p in cipher.iterdir() if "." not in p.name and p != a_backing]
    b_raw = bytearray(b_backing.read_bytes())
    b_raw[:HEADER] = a_backing.read_bytes()[:HEADER]
    b_backing.write_bytes(b_raw)
    with Mount(cipher, plain, fs_home):
        with pytest.raises(OSError) as info:
            with open(plain / "b", "r+b") as f:
                f.write(os.urandom(BLOCK))  # a whole block: nothing of b needs reading first
                f.flush()
                os.fsync(f.fileno())
        assert info.value.errno == errno.EIO
    assert b_backing.read_bytes() == bytes(b_raw), "a block was sealed under another file's key"


def test_a_file_emptied_and_rewritten_starts_a_fresh_state(fs: tuple[Path, Path], fs_home: Path, tmp_path: Path) -> None:
    """`>` (O_TRUNC) drops the header and its state: the next load must not meet a state sealed
    under the old key (it would be logged as damage, and the synced size lost)."""
    cipher, plain = fs
    log = tmp_path / "daemon.log"
    with Mount(cipher, plain, fs_home, log=log):
        with open(plain / "f", "wb") as f:
            f.write(os.urandom(50_000))
            os.fsync(f.fileno())
        with open(plain / "f", "wb") as f:  # O_TRUNC
            f.write(b"again")
            os.fsync(f.fileno())
    with Mount(cipher, plain, fs_home, log=log):
        assert cold_read(plain / "f") == b"again"
    assert "fails authentication" not in log.read_text()
