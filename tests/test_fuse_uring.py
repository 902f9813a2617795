"""FUSE over io_uring (encfs/fuseproto/uring.py): the ring entries' framing without a kernel,
one real io_uring, and real mounts served over the kernel's FUSE queues (`encfs mount --io-uring`).

The mounts need the fuse module's enable_uring parameter on: the fixture uring_enabled (conftest.py)."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuse_helpers import Mount
from test_fuse_server import test_direct_reads_never_see_a_torn_block_while_writes_go_on as torn_block_race

from encfs.fuse.mount import is_mounted
from encfs.fuseproto import ioring, server, uring
from encfs.fuseproto.wire import IN_HEADER, LOOKUP, OUT_HEADER, WRITE, WRITE_IN

ENT_IN_OUT = struct.Struct("<QQII8x")


def _entry(payload_size: int = 1 << 20) -> uring.RingEntry:
    return uring.RingEntry(memoryview(bytearray(uring.OP_IN_SIZE + payload_size)))


def _deliver(entry: uring.RingEntry, opcode: int, unique: int, op_header: bytes, payload: bytes,
             length: int | None = None) -> None:
    """Fill the entry as the kernel does (fuse_uring_args_to_ring): fuse_in_header in in_out, the
    first argument in op_in, the rest in the payload buffer, its size and the commit id after."""
    h = entry.header
    total = IN_HEADER.size + len(op_header) + len(payload) if length is None else length
    IN_HEADER.pack_into(h, 0, total, opcode, unique, 7, 1000, 1001, 4242, 0, 0)
    h[uring.IN_OUT_SIZE:uring.IN_OUT_SIZE + len(op_header)] = op_header
    ENT_IN_OUT.pack_into(h, uring.IN_OUT_SIZE + uring.OP_IN_SIZE, 0, unique, len(payload), 0)
    entry.payload[:len(payload)] = payload


def test_a_request_reads_as_dev_fuse_would_deliver_it() -> None:
    entry = _entry()
    data = os.urandom(70_000)
    write_in = WRITE_IN.pack(3, 8192, len(data), 0, 0, 0, 0)
    _deliver(entry, WRITE, 99, write_in, data)
    req = entry.request()
    assert (req.opcode, req.unique, req.node, req.uid, req.gid, req.pid) == (WRITE, 99, 7, 1000, 1001, 4242)
    assert bytes(req.body) == write_in + data  # one view: the op header sits just before the payload
    assert req.length == IN_HEADER.size + len(write_in) + len(data)
    assert entry.unique == 99 and entry.commit_id == 99


def test_a_request_without_an_op_header_is_its_payload() -> None:
    entry = _entry()
    _deliver(entry, LOOKUP, 5, b"", b"name\0")  # the kernel sends LOOKUP with an empty first argument
    assert bytes(entry.request().body) == b"name\0"


def test_an_inconsistent_length_gives_an_empty_body() -> None:
    entry = _entry()
    _deliver(entry, WRITE, 5, b"x" * 40, b"y" * 10, length=IN_HEADER.size + 500)  # op header of 490 bytes?
    assert bytes(entry.request().body) == b""  # the opcode's size check then answers EINVAL


def test_a_reply_goes_into_the_buffers() -> None:
    entry = _entry()
    _deliver(entry, LOOKUP, 77, b"", b"a\0")
    entry.request()
    small, large = b"abc", bytearray(os.urandom(200_000))  # the large part is copied without the GIL
    entry.answer(0, [small, memoryview(large), b"tail"])
    length, error, unique = OUT_HEADER.unpack_from(entry.header)
    _, commit_id, payload_size, _ = ENT_IN_OUT.unpack_from(entry.header, uring.IN_OUT_SIZE + uring.OP_IN_SIZE)
    n = 3 + len(large) + 4
    assert (length, error, unique, commit_id, payload_size) == (OUT_HEADER.size + n, 0, 77, 77, n)
    assert bytes(entry.payload[:n]) == small + large + b"tail"
    assert entry.unique == 0  # answered: finish() leaves it alone
    entry.finish()
    assert OUT_HEADER.unpack_from(entry.header)[1] == 0


def test_an_unanswered_request_is_answered_eio_as_a_last_resort() -> None:
    entry = _entry()
    _deliver(entry, LOOKUP, 12, b"", b"a\0")
    entry.request()
    entry.finish()
    assert OUT_HEADER.unpack_from(entry.header) == (OUT_HEADER.size, -errno.EIO, 12)


class _Server:
    """What UringQueues asks of a server, recording the errors it answers."""

    fd = -1

    def __init__(self, queues: list[uring.UringQueues]) -> None:
        self.queues, self.errors = queues, []

    def reply_error(self, unique: int, error: int) -> None:
        self.errors.append((unique, error))
        entry = self.queues[0].current()
        assert entry is not None and entry.unique == unique
        entry.answer(-error, ())


def test_an_unanswered_request_is_answered_through_the_servers_reply_error() -> None:
    """So that it counts as the server counts errors (io_errors, the trace), as over /dev/fuse."""
    holder: list[uring.UringQueues] = []
    server = _Server(holder)
    queues = uring.UringQueues(server, 1)  # type: ignore[arg-type]
    holder.append(queues)
    entry = _entry()
    _deliver(entry, LOOKUP, 31, b"", b"a\0")
    entry.request()
    queues._current.entry = entry
    queues._answer_unanswered(entry)
    assert server.errors == [(31, errno.EIO)]
    assert OUT_HEADER.unpack_from(entry.header) == (OUT_HEADER.size, -errno.EIO, 31)


def test_a_reply_larger_than_the_payload_buffer_is_refused() -> None:
    entry = _entry(payload_size=4096)
    _deliver(entry, LOOKUP, 3, b"", b"a\0")
    entry.request()
    with pytest.raises(ValueError):
        entry.answer(0, [bytes(5000)])
    assert entry.unique == 3  # still to be answered (the server then answers EIO)


@pytest.mark.parametrize("text, cpus", [("0-1\n", [0, 1]), ("0", [0]), ("0-2,4,6-7", [0, 1, 2, 4, 6, 7])])
def test_cpu_lists(text: str, cpus: list[int]) -> None:
    assert uring.parse_cpu_list(text) == cpus


def test_a_ring_reads_an_eventfd() -> None:
    """The mechanics shared with the FUSE commands: an SQE filled, submitted and completed."""
    try:
        ring = ioring.Ring(4)
    except OSError as e:
        pytest.skip(f"no io_uring here: {e}")
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        buf = memoryview(bytearray(8))
        for value in (5, 9):
            os.eventfd_write(efd, value)
            ring.prepare_read(efd, 1234, ioring.address(buf), 8)
            ring.enter(1)
            assert ring.completions() == [(1234, 8)]
            assert struct.unpack("<Q", buf)[0] == value
    finally:
        os.close(efd)
        ring.close()


# -- real mounts ------------------------------------------------------------------------------

@pytest.fixture
def uring_mount(uring_enabled: None, fs: tuple[Path, Path], fs_home: Path) -> Iterator[Mount]:
    cipher, plain = fs
    log = plain.parent / "uring.log"
    with Mount(cipher, plain, fs_home, "--io-uring", "--debug", "--log-file", str(log), log=plain.parent / "out.log") as m:
        m.trace = log  # type: ignore[attr-defined]
        yield m


def _queues_traced(log: Path) -> set[str]:
    return set(re.findall(r" queue=(\d+)", log.read_text()))


def test_requests_travel_over_the_rings(uring_mount: Mount) -> None:
    """Every kind of request a workload makes is answered over the queues, byte for byte."""
    root = uring_mount.mountpoint
    (root / "d").mkdir()
    blob = os.urandom(5 * 1024 * 1024 + 123)  # large writes and reads go to the queue's workers
    (root / "d" / "big").write_bytes(blob)
    with open(root / "d" / "big", "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(blob).digest()
    for i in range(50):
        (root / "d" / f"s{i}").write_text(f"small {i}")
    assert sorted(os.listdir(root / "d")) == sorted(["big", *(f"s{i}" for i in range(50))])
    os.rename(root / "d" / "s0", root / "d" / "renamed")
    os.symlink("renamed", root / "d" / "link")
    assert os.readlink(root / "d" / "link") == "renamed"
    os.setxattr(root / "d" / "renamed", "user.k", b"v")
    assert os.getxattr(root / "d" / "renamed", "user.k") == b"v"
    fd = os.open(root / "d" / "renamed", os.O_RDWR)
    try:
        os.pwrite(fd, b"Z", 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert (root / "d" / "renamed").read_text() == "Zmall 0"
    with pytest.raises(FileNotFoundError):
        os.stat(root / "d" / "absent")
    os.unlink(root / "d" / "s1")
    # From each CPU: the kernel sends a request to the queue of the CPU its caller runs on.
    for cpu in sorted(os.sched_getaffinity(0)):
        subprocess.run(["taskset", "-c", str(cpu), sys.executable, "-c",
                        f"import os; os.stat({str(root / 'd' / 's2')!r}); open({str(root / 'd' / f'c{cpu}')!r}, 'w').close()"],
                       check=True)
    queues = _queues_traced(uring_mount.trace)  # type: ignore[attr-defined]
    assert queues == {str(c) for c in sorted(os.sched_getaffinity(0))}, queues


def test_direct_io_races_over_the_rings(uring_mount: Mount) -> None:
    """The server's torn-block race (test_fuse_server), with its requests on the queues."""
    torn_block_race(uring_mount)
    assert _queues_traced(uring_mount.trace)  # type: ignore[attr-defined]


def test_fsynced_data_survives_kill_9_over_the_rings(uring_mount: Mount, fs_home: Path) -> None:
    root = uring_mount.mountpoint
    synced = os.urandom(300_000)
    fd = os.open(root / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, synced)
    os.fsync(fd)
    assert _queues_traced(uring_mount.trace)  # type: ignore[attr-defined]
    os.write(fd, os.urandom(100_000))  # not synced: may or may not survive
    uring_mount.proc.kill()
    uring_mount.proc.wait(timeout=30)
    try:
        os.close(fd)
    except OSError:
        pass  # the connection is gone
    uring_mount.kill9()  # removes the dead mount
    with Mount(uring_mount.cipherdir, uring_mount.mountpoint, fs_home) as again:
        assert (again.mountpoint / "f").read_bytes()[:len(synced)] == synced


def test_sigterm_ends_the_daemon_and_keeps_what_was_synced(uring_mount: Mount, fs_home: Path) -> None:
    """SIGTERM: serve() returns, the queues stop taking requests, the daemon unmounts itself."""
    data = os.urandom(200_000)
    with open(uring_mount.mountpoint / "f", "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    uring_mount.proc.send_signal(signal.SIGTERM)
    assert uring_mount.proc.wait(timeout=60) == 0
    assert not is_mounted(uring_mount.mountpoint)
    with Mount(uring_mount.cipherdir, uring_mount.mountpoint, fs_home) as again:
        assert (again.mountpoint / "f").read_bytes() == data


def test_sigterm_under_a_stream_of_requests_ends_without_a_hang(uring_mount: Mount) -> None:
    """SIGTERM while a process keeps the queues busy: the daemon stops taking requests, exits
    cleanly and unmounts; the process's next request fails (the mount is gone) instead of hanging."""
    root = uring_mount.mountpoint
    (root / "f").write_text("x")
    script = (f"import os, time\nend = time.monotonic() + 60\nwhile time.monotonic() < end:\n"
              f" try:\n  os.close(os.open({str(root / 'f')!r}, os.O_RDONLY))\n except OSError as e:\n"
              f"  print(e.errno)\n  break")  # each open is a request
    caller = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        assert caller.poll() is None
        uring_mount.proc.send_signal(signal.SIGTERM)
        assert uring_mount.proc.wait(timeout=60) == 0
        out, _ = caller.communicate(timeout=30)
        # ENOENT: after the unmount; ECANCELED: a request still in a queue when its ring closed
        ended = (errno.ENOENT, errno.ENOTCONN, errno.ECONNABORTED, errno.ECANCELED)
        assert out.strip() in {str(e) for e in ended}, out
    finally:
        if caller.poll() is None:
            caller.kill()


def test_forgets_are_read_in_batches_over_the_rings(uring_mount: Mount) -> None:
    """Each unlink makes the kernel queue a FORGET for /dev/fuse, the rings carrying the rest:
    serve()'s thread reads that device at most once per FORGET_BATCH_SECONDS, taking what
    was queued meanwhile as one BATCH_FORGET, rather than once per unlink."""
    root = uring_mount.mountpoint / "f"
    root.mkdir()
    count = 300
    for i in range(count):
        (root / f"x{i}").write_bytes(b"")
    trace = uring_mount.trace  # type: ignore[attr-defined]
    forget_reads = re.compile(r"\b(BATCH_)?FORGET unique=\d+ .*len=\d+$", re.M)
    before = len(forget_reads.findall(trace.read_text()))
    started = time.monotonic()
    for i in range(count):
        os.unlink(root / f"x{i}")
    loop = time.monotonic() - started
    time.sleep(0.2)  # the last batch
    reads = len(forget_reads.findall(trace.read_text())) - before
    # One read per 2 ms at most, however fast or slow the unlinks came (one more for the batch
    # queued while the loop ended); where they came faster than 1 per ms, that is under half.
    assert 1 <= reads <= loop / server.FORGET_BATCH_SECONDS + 2, (reads, loop)
    if loop / count < 1e-3:
        assert reads < count / 2, (reads, loop)


def test_the_daemon_ends_when_unmounted(uring_mount: Mount) -> None:
    (uring_mount.mountpoint / "x").write_text("x")
    subprocess.run(["fusermount3", "-u", str(uring_mount.mountpoint)], check=True)
    deadline = time.monotonic() + 30
    while uring_mount.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert uring_mount.proc.returncode == 0


def test_io_uring_with_the_pyfuse3_server_is_refused(fs: tuple[Path, Path], fs_home: Path) -> None:
    from conftest import run_encfs

    cipher, plain = fs
    proc = run_encfs("mount", str(cipher), str(plain), "--io-uring", "--server", "pyfuse3", home=fs_home)
    assert proc.returncode != 0
    err = proc.stderr.decode()
    assert err.strip().count("\n") == 0 and "--io-uring needs the encfs server" in err, err


def test_kill_9_with_a_request_in_flight_ends_the_callers(uring_mount: Mount) -> None:
    """The rings' pending commands hold the /dev/fuse file; a killed daemon's rings are torn down
    with it, so the connection ends and a caller waiting on a request gets an error, not D state."""
    root = uring_mount.mountpoint
    (root / "f").write_text("x")
    assert _queues_traced(uring_mount.trace)  # type: ignore[attr-defined]
    os.kill(uring_mount.pid, signal.SIGSTOP)
    script = f"import os\ntry:\n os.stat({str(root / 'absent')!r})\nexcept OSError as e:\n print(e.errno)"
    caller = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)  # the LOOKUP is now waiting in a queue or in the stopped daemon
        assert caller.poll() is None
        uring_mount.proc.kill()
        uring_mount.proc.wait(timeout=30)
        out, _ = caller.communicate(timeout=30)
        # ECANCELED: the kernel ends a request whose queue's task died that way (dev_uring.c)
        assert out.strip() in (str(errno.ENOTCONN), str(errno.ECONNABORTED), str(errno.ECANCELED)), out
    finally:
        if caller.poll() is None:
            caller.kill()
        uring_mount.kill9()


def test_fstab_io_uring_option_is_encfs_own(fs: tuple[Path, Path], fs_home: Path) -> None:
    """`-o io_uring` (fstab, as libfuse spells it) is --io-uring, not a kernel mount option: with
    the pyfuse3 server it is refused as --io-uring is; with --fake the encfs server accepts it."""
    from conftest import run_encfs

    cipher, plain = fs
    refused = run_encfs("mount", str(cipher), str(plain), "-o", "io_uring,server=pyfuse3", "--fake", home=fs_home)
    assert refused.returncode != 0 and b"--io-uring needs the encfs server" in refused.stderr, refused.stderr
    accepted = run_encfs("mount", str(cipher), str(plain), "-o", "io_uring", "--fake", home=fs_home)
    assert accepted.returncode == 0, accepted.stderr
