"""One writer of tests/test_fuse_concurrency.py: creates, writes, truncates, renames and unlinks
files of its own in two shared directories of a mount until a deadline, keeping a model of
every file, then saves the model (one file per surviving file, same name) for the test to
compare byte for byte.

Usage: python churn_tool.py WORKER SEED SECONDS DIR_A DIR_B MODEL_DIR

Its files are named w<WORKER>-<n>, so writers never touch each other's files, but every
rename, create and unlink changes a directory all of them use. It checks what it reads back
as it goes and exits 1, naming the file, at the first difference.
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

BLOCK = 32768
MAX_SIZE = 3 << 20


def main() -> int:
    worker, seed, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    dirs = [Path(sys.argv[4]), Path(sys.argv[5])]
    model_dir = Path(sys.argv[6])
    rng = random.Random(seed * 1000 + worker)
    files: dict[Path, bytearray] = {}  # where each file of ours is now -> its contents
    serial = 0
    ops = 0
    deadline = time.monotonic() + seconds

    def new_name() -> Path:
        nonlocal serial
        serial += 1
        return rng.choice(dirs) / f"w{worker}-{serial}"

    def check(path: Path, off: int, length: int) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            if rng.random() < 0.5:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the daemon serves it
            got = os.pread(fd, length, off)
        finally:
            os.close(fd)
        want = bytes(files[path][off:off + length])
        if got != want:
            first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            print(f"worker {worker}: {path.name}: {len(got)} bytes read at {off}, {len(want)} expected; "
                  f"first difference at {off + first} (after {ops} operations)", flush=True)
            raise SystemExit(1)

    while time.monotonic() < deadline:
        ops += 1
        r = rng.random()
        if not files or (r < 0.15 and len(files) < 6):  # create, and write at once
            path = new_name()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            files[path] = bytearray()
            os.close(fd)
            r = 0.2
        else:
            path = rng.choice(list(files))
        data = files[path]
        if r < 0.55:  # write: small and unaligned, or large and of whole blocks (sealed ahead)
            fd = os.open(path, os.O_WRONLY)
            try:
                for _ in range(rng.randint(1, 4)):
                    if rng.random() < 0.5:
                        length = rng.randint(1, 70_000)
                        off = rng.randint(0, MAX_SIZE - length)
                    else:
                        length = rng.choice((8, 16, 32)) * BLOCK
                        off = rng.randint(0, (MAX_SIZE - length) // BLOCK) * BLOCK
                    buf = rng.randbytes(length)
                    assert os.pwrite(fd, buf, off) == length
                    if off > len(data):
                        data.extend(bytes(off - len(data)))
                    data[off:off + length] = buf
                if rng.random() < 0.3:
                    os.fsync(fd)
            finally:
                os.close(fd)
        elif r < 0.62:  # truncate, down or up
            size = rng.randint(0, MAX_SIZE)
            os.truncate(path, size)
            del data[size:]
            data.extend(bytes(size - len(data)))
        elif r < 0.80:  # rename, to a new name or over another file of ours
            others = [p for p in files if p != path]
            dest = rng.choice(others) if others and rng.random() < 0.3 else new_name()
            os.rename(path, dest)
            files[dest] = files.pop(path)
        elif r < 0.88:  # unlink
            os.unlink(path)
            del files[path]
        else:  # read back a part, or all of it
            if rng.random() < 0.3 or not data:
                check(path, 0, len(data) + 1)
            else:
                off = rng.randrange(len(data))
                check(path, off, rng.randint(1, 1 << 20))
    for path, data in files.items():
        check(path, 0, len(data) + 1)
    model_dir.mkdir(parents=True, exist_ok=True)
    for path, data in files.items():
        (model_dir / f"{path.parent.name}--{path.name}").write_bytes(data)
    print(f"worker {worker}: {ops} operations, {len(files)} files left", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
