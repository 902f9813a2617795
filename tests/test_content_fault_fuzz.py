"""A differential fuzzer of FileContent's write path under injected faults, without a mount.

Random writes, truncates, fallocates (sparse.py), fsyncs, checkpoints, clean close/reopen and
kill -9 (release_fds, then a load after a crash: the page cache keeps what was written) run
against a bytearray model, while an OSError (ENOSPC, EIO, EDQUOT; a short write; a fault that
stays) is injected at the Nth call of os.pwrite, pwritev, ftruncate, fdatasync, fsync, setxattr,
unlink, pread or sparse.fallocate. Checked after every step:

- a successful operation leaves exactly the model's bytes, and so does a clean close and reopen;
- a failed one leaves the old bytes or the new ones, block by block, and a size that reads back;
- after a crash every block is one of its versions since the last fsync (the fsync'd bytes
  exactly when nothing followed), and recovery and the reads after it raise nothing;
- a file that a failed sync left refusing changes (EIO: "cannot be made durable", or from an
  fsync the journal's "an earlier sync ... failed") takes none until the next mount (b4bb5df),
  so the fuzzer reloads it as after a crash.

Any other exception fails. The limits are shrunk (HOLE_MIN, HOLES_MAX, JOURNAL_MAX) so that
small files reach holes, extent merging and journal checkpoints. CI runs CI_CASES seeds; the
stress run (marked slow, ENCFS_STRESS=1) runs STRESS_CASES. A failure names its seed and the
last steps, and the same seed replays it.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from content_files import BackingFile

from encfs import diskio
from encfs.fuse import contentwrite, journal, sparse
from encfs.fuse.content import FileContent

B = 4096
STEPS = 60
MAX_SIZE = 40 * B  # a larger model is truncated back
CI_CASES, STRESS_CASES = 50, 3000
CASES = pytest.mark.parametrize("cases", [
    pytest.param(CI_CASES, id="ci"),
    pytest.param(STRESS_CASES, id="stress", marks=[pytest.mark.slow, pytest.mark.skipif(
        os.environ.get("ENCFS_STRESS") != "1", reason="long fuzz run; set ENCFS_STRESS=1 to run it")])])
FAULTY = ["pwrite", "pwritev", "ftruncate", "fdatasync", "fsync", "setxattr", "unlink", "pread"]
ERRORS = [errno.ENOSPC, errno.EIO, errno.EDQUOT]


class Injected(OSError):
    """The fault the fuzzer raised (a subclass, so that one the code wraps is still told apart)."""


class Faults:
    """Wrappers around the os calls and sparse.fallocate that fail the Nth call of chosen kinds."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.countdown: int | None = None  # calls of the chosen kinds left before the fault
        self.kinds: set[str] = set()
        self.err, self.short, self.sticky = errno.ENOSPC, False, False
        self.fired: str | None = None
        for name in FAULTY:
            monkeypatch.setattr(os, name, self._wrap(name, getattr(os, name)))
        monkeypatch.setattr(sparse, "fallocate", self._wrap("fallocate", diskio.fallocate))  # as sparse.py imports it

    def arm(self, n: int, kinds: set[str], err: int, short: bool, sticky: bool) -> None:
        """Fail call ``n`` (from 0) of ``kinds``, and with ``sticky`` every one after it too."""
        self.countdown, self.kinds, self.err, self.short, self.sticky = n, kinds, err, short, sticky
        self.fired = None

    def disarm(self) -> None:
        self.countdown, self.fired = None, None

    def _wrap(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if self.countdown is None or name not in self.kinds:
                return real(*args, **kwargs)
            if self.countdown > 0:
                self.countdown -= 1
                return real(*args, **kwargs)
            if not self.sticky:
                self.countdown = None
            self.fired = name
            if self.short and name in ("pwrite", "pwritev"):  # write half of the (first) buffer
                data = memoryview(args[1] if name == "pwrite" else args[1][0]).cast("B")
                if len(data) > 1:
                    half = data[:len(data) // 2]
                    return real(args[0], half if name == "pwrite" else [half], args[2])
            raise Injected(self.err, os.strerror(self.err))
        return call


def blocks_from(got: bytes, versions: list[bytes], any_size: bool = False) -> str | None:
    """Why ``got`` is not, block by block, one of ``versions`` (None when it is). Its size must be
    one of theirs, or with ``any_size`` (a crash: the size and the blocks are synced apart)
    between the smallest and the largest; a block past a version's end is zeros in it."""
    sizes = sorted({len(v) for v in versions})
    if len(got) not in sizes and not (any_size and sizes[0] <= len(got) <= sizes[-1]):
        return f"size {len(got)} is none of {sizes}"
    for lo in range(0, len(got), B):
        block = got[lo:lo + B]
        if not any(v[lo:lo + len(block)].ljust(len(block), b"\0") == block for v in versions):
            return f"block {lo // B} ({len(block)} bytes) is none of its {len(versions)} versions"
    return None


def refuses_changes(c: FileContent) -> bool:
    """A failed sync stopped the file's changes until it is loaded again (getattr: the code before
    b4bb5df has no such state, and this test must fail there on its own checks)."""
    return bool(getattr(c, "sync_failed", None) or getattr(c.journal, "failed", None))


class Case:
    """One seed's run: ``STEPS`` random steps on one file, checked against the model ``cur``."""

    def __init__(self, seed: int, tmp: Path, faults: Faults) -> None:
        self.seed, self.rng, self.faults = seed, random.Random(seed), faults
        tmp.mkdir()
        self.files = BackingFile(tmp, B, sparse=seed % 2 == 0)
        self.log: list[str] = []
        self.c = self.files.create()
        self.cur = b""
        self.since_fsync = [b""]  # the states since the last fsync, the fsync'd one first

    def read_all(self) -> bytes:
        return bytes(self.c.read(0, self.c.size + 10))

    def data(self, n: int) -> bytes:
        return bytes(n) if self.rng.random() < 0.15 else self.rng.randbytes(n)

    def op(self) -> tuple[str, Callable[[], object], bytes]:
        """A random operation: its description, the call, and the contents it should leave."""
        rng, c, cur, size = self.rng, self.c, self.cur, len(self.cur)
        r = rng.random()
        if size > MAX_SIZE:
            n = rng.randrange(0, size)
            return f"c.truncate({n})", lambda: c.truncate(n), cur[:n]
        if r < 0.55:
            if rng.random() < 0.3:
                off = rng.randrange(0, size + 1)
            else:
                off = rng.randrange(0, size + (3 * B if rng.random() < 0.8 else 12 * B))
            if rng.random() < 0.3:
                off -= off % B
            data = self.data(rng.choice([1, 17, B - 1, B, B + 1, 2 * B, 3 * B + 5, rng.randrange(1, 4 * B)]))
            new = cur.ljust(off, b"\0")[:off] + data + cur[off + len(data):]
            return f"c.write({off}, <{len(data)} bytes crc {zlib.crc32(data):08x}>)", lambda: c.write(off, data), new
        if r < 0.67:
            n = rng.choice([0, rng.randrange(1, size + 2), rng.randrange(1, size + 4 * B), max(1, size - 1),
                            size // B * B, size + 1, rng.randrange(1, size + 20 * B)])
            return f"c.truncate({n})", lambda: c.truncate(n), cur[:n].ljust(n, b"\0")
        if r < 0.73 and size > 0:
            off = rng.randrange(0, size)
            length = rng.randrange(1, size - off + 2 * B)
            mode = rng.choice([sparse.FALLOC_FL_PUNCH_HOLE | sparse.FALLOC_FL_KEEP_SIZE,
                               sparse.FALLOC_FL_ZERO_RANGE, 0, sparse.FALLOC_FL_KEEP_SIZE])
            new = cur
            if mode & (sparse.FALLOC_FL_PUNCH_HOLE | sparse.FALLOC_FL_ZERO_RANGE):
                end = min(off + length, size)
                new = new[:off] + bytes(end - off) + new[end:]
            if not mode & sparse.FALLOC_FL_KEEP_SIZE:
                new = new.ljust(off + length, b"\0")
            return (f"fallocate_content(c, {mode:#x}, {off}, {length})",
                    lambda: sparse.fallocate_content(c, mode, off, length), new)
        if r < 0.88:
            datasync = rng.random() < 0.5
            return f"c.fsync({datasync})", lambda: c.fsync(datasync), cur
        return "c.checkpoint()", c.checkpoint, cur

    def crash(self) -> None:
        """kill -9 and a new daemon's load: each block is one of its states since the last fsync."""
        self.log.append(f"# crash: size {self.c.size}, journal {self.c.journal.length} bytes")
        self.c.release_fds()
        self.files.journals.clear()  # the new daemon lists the journal directory
        self.files.journals.update(journal.file_ids(self.files.root))
        self.c, notes = self.files.open(after_crash=True)
        self.log.append(f"files.open(after_crash=True)  # {notes}")
        self.c.check_key()  # as writable_content does before a write
        got = self.read_all()
        why = blocks_from(got, self.since_fsync, any_size=True)
        assert why is None, f"after a crash: {why} (fsync'd and nothing since: {len(self.since_fsync) == 1})"
        self.cur, self.since_fsync = got, [got]

    def reopen(self) -> None:
        """A clean close and load: exactly the model's bytes."""
        self.log.append("c.close(); files.open(after_crash=False)")
        self.c.close()
        self.c, _ = self.files.open(after_crash=False)
        self.c.check_key()
        assert self.read_all() == self.cur, "after a clean close and reopen: the contents differ"
        self.since_fsync = [self.cur]

    def step(self) -> bool:
        """One operation, maybe under a fault; True when the file refused it after a failed sync."""
        rng = self.rng
        desc, call, new = self.op()
        if rng.random() < 0.3:
            kinds = set(rng.sample([*FAULTY, "fallocate"], rng.randrange(1, 4)))
            n, err, short, sticky = rng.randrange(0, 6), rng.choice(ERRORS), rng.random() < 0.3, rng.random() < 0.2
            self.faults.arm(n, kinds, err, short, sticky)
            self.log.append(f"# fault: {sorted(kinds)} at call {n}, {errno.errorcode[err]}, short {short}, "
                            f"sticky {sticky}")
        self.log.append(desc)  # before the call: a failure that raises names it
        failed: OSError | None = None
        refusing, refused = refuses_changes(self.c), False
        try:
            call()
        except OSError as e:
            refused = refusing and not self.faults.fired and e.errno == errno.EIO
            if isinstance(e, FileExistsError) or not (self.faults.fired or refused):
                raise  # EEXIST is no injected fault: a journal that a failed creation left behind
            failed = e
        finally:
            fired = self.faults.fired
            self.faults.disarm()
        self.log[-1] += f"  # failed: {failed!r}" if failed else f"  # {fired} failed, ok" if fired else ""
        got = self.read_all()
        if failed is None:
            assert got == new, f"after {desc}: the contents differ ({len(got)} bytes, {len(new)} expected)"
            self.since_fsync = [got] if desc.startswith("c.fsync") else [*self.since_fsync, got]
        elif refused:
            assert got == self.cur, f"{desc} was refused but changed the contents"
        else:
            assert len(got) == self.c.size, f"after a failed {desc}: size {self.c.size} but {len(got)} bytes read"
            versions = [self.cur, new]
            if min(len(self.cur), len(new)) < len(got) < max(len(self.cur), len(new)):  # a cut partly made
                versions.append((new if len(new) > len(self.cur) else self.cur)[:len(got)])
            why = blocks_from(got, versions)
            assert why is None, f"after a failed {desc}: {why}"
            self.since_fsync += [*versions, got]
        self.cur = got
        return refused

    def run(self) -> None:
        reload = False
        for _ in range(STEPS):
            r = self.rng.random()
            if reload or r < 0.08:
                self.crash()
                reload = False
            elif r < 0.11:
                if refuses_changes(self.c):
                    self.crash()  # it cannot be closed cleanly: the next mount loads it as after a crash
                else:
                    self.reopen()
            else:
                reload = self.step()
        if refuses_changes(self.c):
            self.crash()
        self.reopen()
        self.c.release_fds()

    def report(self, error: BaseException) -> str:
        steps = "\n".join("    " + s for s in self.log[-25:])
        return f"seed {self.seed} (sparse {self.files.sparse}): {error}\n  last steps:\n{steps}"


@CASES
def test_faults_leave_old_or_new_bytes_and_fsynced_ones_survive_a_crash(
        cases: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(contentwrite, "HOLE_MIN", 2 * B)
    monkeypatch.setattr(contentwrite, "HOLES_MAX", 3)
    monkeypatch.setattr(contentwrite, "JOURNAL_MAX", 8 * (B + 28))
    faults = Faults(monkeypatch)
    for seed in range(cases):
        case = Case(seed, tmp_path / str(seed), faults)
        try:
            case.run()
        except Exception as e:
            faults.disarm()
            raise AssertionError(case.report(e)) from e
        shutil.rmtree(tmp_path / str(seed))
