"""Model-based test: one random operation sequence, applied to an encfs mount and to a plain directory.

A hypothesis RuleBasedStateMachine drives both trees with the same operations
(write at an offset, append, truncate, create, read-compare, rename, unlink,
mkdir, rmdir, link, symlink) and requires the same outcome from both: the same
result or the same errno. After every step the whole trees must agree (names,
types, modes, link counts, sizes, contents, symlink targets). One mount serves
the whole run; every example works in a fresh subdirectory. At the end the
filesystem is remounted and every example's tree is compared again, so what
was written must also have reached the backing store correctly.
"""

from __future__ import annotations

import errno
import itertools
import os
import random
import stat
from pathlib import Path
from typing import Any, Callable

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from fuse_helpers import cold_read
from semantics_helpers import new_mount

BLOCK = 32768  # the default content block size; 4 KiB boundaries (pages, old filesystems) are drawn too
PAGE = 4096

DIRS = ["d0", "d1", "d0/d2"]
FILES = ["f0", "f1", "f2", "d0/f0", "d0/f1", "d1/f0", "d0/d2/f0", "d0/d2/" + "L" * 255]
paths = st.sampled_from(FILES + DIRS)
files = st.sampled_from(FILES)
dirs = st.sampled_from(DIRS)
offsets = st.one_of(st.sampled_from([0, 1, PAGE - 1, PAGE, PAGE + 1, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK,
                                     3 * BLOCK - 7]),
                    st.integers(0, 3 * BLOCK + 50))
lengths = st.one_of(st.sampled_from([1, PAGE - 1, PAGE, PAGE + 1, BLOCK - 1, BLOCK, BLOCK + 1]),
                    st.integers(1, 2 * BLOCK + 5))
seeds = st.integers(0, 2**16)

# Bounded for CI (~15 s); ENCFS_STRESS=1 runs a long version.
STRESS = os.environ.get("ENCFS_STRESS") == "1"
EXAMPLES, STEPS = (600, 100) if STRESS else (50, 50)

Outcome = tuple[str, Any]


def _outcome(fn: Callable[[Path], Any], root: Path) -> Outcome:
    try:
        return ("ok", fn(root))
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno or 0, e.errno))


def snapshot(root: Path) -> dict[str, tuple]:
    """Everything a user can observe about a tree (but not times or inode numbers)."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st_ = os.lstat(p)
            if stat.S_ISLNK(st_.st_mode):
                out[rel] = ("link", os.readlink(p), st_.st_size)
            elif stat.S_ISDIR(st_.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st_.st_mode), st_.st_nlink)
            else:
                out[rel] = ("file", stat.S_IMODE(st_.st_mode), st_.st_nlink, st_.st_size, cold_read(p))
    return out


class FsModel(RuleBasedStateMachine):
    mount_root: Path
    ref_root: Path
    _counter = itertools.count()

    def __init__(self) -> None:
        super().__init__()
        n = next(self._counter)
        self.roots = (self.mount_root / f"ex{n}", self.ref_root / f"ex{n}")
        for r in self.roots:
            r.mkdir()
        # start from a populated tree so that most operations have something to act on
        for d in DIRS:
            self.both(lambda root: os.mkdir(root / d, 0o755))
        for f, size in (("f0", 5000), ("d0/f1", 100), ("d0/d2/f0", 3 * BLOCK)):
            data = random.Random(size).randbytes(size)
            self.both(lambda root: (root / f).write_bytes(data))

    def both(self, fn: Callable[[Path], Any]) -> Any:
        enc, ref = (_outcome(fn, r) for r in self.roots)
        assert enc == ref, f"encfs gave {enc!r}, a local filesystem {ref!r}"
        return enc

    # -- data ---------------------------------------------------------------------------------

    @rule(path=files, offset=offsets, length=lengths, seed=seeds)
    def write(self, path: str, offset: int, length: int, seed: int) -> None:
        data = random.Random(seed).randbytes(length)

        def op(root: Path) -> int:
            fd = os.open(root / path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                return os.pwrite(fd, data, offset)
            finally:
                os.close(fd)
        self.both(op)

    @rule(path=files, length=lengths, seed=seeds)
    def append(self, path: str, length: int, seed: int) -> None:
        data = random.Random(seed).randbytes(length)

        def op(root: Path) -> int:
            fd = os.open(root / path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                return os.write(fd, data)
            finally:
                os.close(fd)
        self.both(op)

    @rule(path=files, size=st.one_of(st.sampled_from([0, 1, BLOCK, BLOCK + 1]), st.integers(0, 4 * BLOCK)))
    def truncate(self, path: str, size: int) -> None:
        self.both(lambda root: os.truncate(root / path, size))

    @rule(path=files, exclusive=st.booleans(), trunc=st.booleans(), mode=st.sampled_from([0o600, 0o644, 0o666, 0o777]))
    def create(self, path: str, exclusive: bool, trunc: bool, mode: int) -> None:
        flags = os.O_CREAT | os.O_WRONLY | (os.O_EXCL if exclusive else 0) | (os.O_TRUNC if trunc else 0)
        self.both(lambda root: os.close(os.open(root / path, flags, mode)))

    @rule(path=files, offset=offsets, length=lengths)
    def read_compare(self, path: str, offset: int, length: int) -> None:
        def op(root: Path) -> bytes:
            fd = os.open(root / path, os.O_RDONLY)
            try:
                return os.pread(fd, length, offset)
            finally:
                os.close(fd)
        self.both(op)

    # -- names --------------------------------------------------------------------------------

    @rule(src=paths, dst=paths)
    def rename(self, src: str, dst: str) -> None:
        self.both(lambda root: os.rename(root / src, root / dst))

    @rule(path=paths)
    def unlink(self, path: str) -> None:
        self.both(lambda root: os.unlink(root / path))

    @rule(path=dirs)
    def mkdir(self, path: str) -> None:
        self.both(lambda root: os.mkdir(root / path, 0o755))

    @rule(path=dirs)
    def rmdir(self, path: str) -> None:
        self.both(lambda root: os.rmdir(root / path))

    @rule(src=paths, dst=files)
    def link(self, src: str, dst: str) -> None:
        self.both(lambda root: os.link(root / src, root / dst, follow_symlinks=False))

    @rule(link_to=st.sampled_from(["f0", "../f1", "d2/f0", "missing", "x" * 3500]), path=files)
    def symlink(self, link_to: str, path: str) -> None:
        self.both(lambda root: os.symlink(link_to, root / path))

    @invariant()
    def trees_agree(self) -> None:
        enc, ref = (snapshot(r) for r in self.roots)
        assert enc == ref


def test_mount_behaves_like_a_local_filesystem(tmp_path: Path, fs_home: Path) -> None:
    ref = tmp_path / "ref"
    ref.mkdir()
    FsModel.ref_root = ref
    old_umask = os.umask(0)  # modes reach both filesystems unmasked
    try:
        with new_mount(tmp_path / "enc", fs_home) as m:
            FsModel.mount_root = m.mountpoint
            run_state_machine_as_test(FsModel, settings=settings(
                max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
            assert m.proc.poll() is None
    finally:
        os.umask(old_umask)
    # what every example left behind reads back the same after a remount
    with new_mount(tmp_path / "enc", fs_home) as m:
        assert sorted(os.listdir(m.mountpoint)) == sorted(os.listdir(ref))
        assert snapshot(m.mountpoint) == snapshot(ref)
