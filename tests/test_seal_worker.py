"""The sealing worker (encfs.sealworker) behind a SectorStore, on a plain image file.

A real helper process: what it seals opens in process, a dead worker loses no write,
and it ends with its owner, also when the owner is killed."""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from encfs.block.layout import SECTOR_SIZE, image_size
from encfs.block.sectors import SectorStore
from encfs.sealworker import WORKER_MIN_BYTES

KEY = bytes(range(32))
VID = bytes(range(16))
PREFIX = bytes.fromhex("9f3c01d7")
SECTORS = 4096  # 16 MiB


def _gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def image(tmp_path: Path) -> Iterator[int]:
    fd = os.open(tmp_path / "vol.img", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, image_size(SECTORS))
    SectorStore(fd, KEY, VID, SECTORS).format_maps()
    yield fd
    os.close(fd)


@pytest.fixture
def worker_store(image: int) -> Iterator[SectorStore]:
    store = SectorStore(image, KEY, VID, SECTORS)
    store.start_seal_worker(KEY)
    store.read(0, 1)  # loads the first extent's map: seal_ahead() needs it
    yield store
    assert store.seal_worker is not None
    store.seal_worker.close()


def test_what_the_worker_seals_opens_in_process(image: int, worker_store: SectorStore) -> None:
    big = os.urandom(256 * SECTOR_SIZE)
    sealed = worker_store.seal_ahead(SECTOR_SIZE, big)
    assert sealed is not None and all(isinstance(blob, memoryview) for _o, _r, blob in sealed.runs)  # the worker's
    assert worker_store.write_sealed(sealed)
    small = os.urandom(((WORKER_MIN_BYTES // SECTOR_SIZE) - 1) * SECTOR_SIZE)
    small_sealed = worker_store.seal_ahead(300 * SECTOR_SIZE, small)
    assert small_sealed is not None and all(isinstance(b, bytearray) for _o, _r, b in small_sealed.runs)
    assert worker_store.write_sealed(small_sealed)
    worker_store.write(600 * SECTOR_SIZE + 7, big[:100_000])  # unaligned: read, merge, seal
    worker_store.flush()
    fresh = SectorStore(image, KEY, VID, SECTORS)  # no worker: opens in this process
    assert fresh.read(SECTOR_SIZE, len(big)) == big
    assert fresh.read(300 * SECTOR_SIZE, len(small)) == small
    assert fresh.read(600 * SECTOR_SIZE + 7, 100_000) == big[:100_000]


def test_a_write_in_the_request_buffer_is_sealed_where_it_lies(image: int, worker_store: SectorStore) -> None:
    """A WRITE body read into the thread's request buffer (in the arena) reaches the worker
    uncopied: the slot's copy-in area stays untouched, and what is sealed opens to the body."""
    from encfs.sealworker import MAX_PLAIN, REQUEST_BYTES, SLOT_BYTES
    worker = worker_store.seal_worker
    assert worker is not None
    buf = worker.request_buffer()
    assert buf is not None and len(buf) == REQUEST_BYTES
    copy_in_at = worker._arena_offset(buf) + REQUEST_BYTES  # this slot's plaintext copy-in area
    assert copy_in_at % SLOT_BYTES == REQUEST_BYTES
    copy_in = worker._arena[copy_in_at:copy_in_at + MAX_PLAIN]
    copy_in[:] = bytes(MAX_PLAIN)
    body = os.urandom(256 * SECTOR_SIZE)
    buf[80:80 + len(body)] = body  # where a WRITE's data follows its two headers
    sealed = worker_store.seal_ahead(8 * SECTOR_SIZE, buf[80:80 + len(body)])
    assert sealed is not None and worker_store.write_sealed(sealed)
    assert copy_in == bytes(MAX_PLAIN)
    elsewhere = os.urandom(256 * SECTOR_SIZE)  # plaintext outside the arena is copied in
    sealed = worker_store.seal_ahead(600 * SECTOR_SIZE, elsewhere)
    assert sealed is not None and worker_store.write_sealed(sealed)
    assert copy_in[:len(elsewhere)] == elsewhere
    worker_store.flush()
    fresh = SectorStore(image, KEY, VID, SECTORS)
    assert fresh.read(8 * SECTOR_SIZE, len(body)) == body
    assert fresh.read(600 * SECTOR_SIZE, len(elsewhere)) == elsewhere


def test_the_key_is_not_on_the_worker_command_line(worker_store: SectorStore) -> None:
    assert worker_store.seal_worker is not None
    cmdline, deadline = b"", time.monotonic() + 5
    while not cmdline and time.monotonic() < deadline:  # empty while the worker is still in execve
        cmdline = Path(f"/proc/{worker_store.seal_worker.pid}/cmdline").read_bytes()
    assert b"encfs.sealworker" in cmdline
    assert KEY not in cmdline and KEY.hex().encode() not in cmdline


def test_a_dead_worker_loses_no_write(image: int, worker_store: SectorStore) -> None:
    assert worker_store.seal_worker is not None
    os.kill(worker_store.seal_worker.pid, signal.SIGKILL)
    assert _gone(worker_store.seal_worker.pid)
    data = os.urandom(64 * SECTOR_SIZE)
    sealed = worker_store.seal_ahead(0, data)
    assert sealed is not None and worker_store.write_sealed(sealed)  # sealed in process instead
    worker_store.write(64 * SECTOR_SIZE, data)
    worker_store.flush()
    assert SectorStore(image, KEY, VID, SECTORS).read(0, 2 * len(data)) == data + data


def test_a_worker_that_stops_answering_is_killed_and_loses_no_write(
        image: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hung worker (here: stopped) is given up after REPLY_TIMEOUT and killed, so that it does not
    linger holding the key; the write it was given is sealed in process."""
    from encfs import sealworker
    monkeypatch.setattr(sealworker, "REPLY_TIMEOUT", 0.5)
    store = SectorStore(image, KEY, VID, SECTORS)
    store.start_seal_worker(KEY)
    assert store.seal_worker is not None
    pid = store.seal_worker.pid
    try:
        store.read(0, 1)
        os.kill(pid, signal.SIGSTOP)
        data = os.urandom((WORKER_MIN_BYTES // SECTOR_SIZE) * SECTOR_SIZE)
        store.write(0, data)
        store.flush()
        assert not store.seal_worker.alive
        assert _gone(pid, timeout=2)
        assert SectorStore(image, KEY, VID, SECTORS).read(0, len(data)) == data
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        store.seal_worker.close()


def test_close_ends_the_worker(image: int) -> None:
    store = SectorStore(image, KEY, VID, SECTORS)
    store.start_seal_worker(KEY)
    assert store.seal_worker is not None
    pid = store.seal_worker.pid
    store.seal_worker.close()
    assert _gone(pid, timeout=0.1)


def test_the_worker_dies_with_a_killed_owner(tmp_path: Path, image: int) -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", "import os, sys, time\n"
         "from encfs.block.sectors import SectorStore\n"
         f"s = SectorStore(os.open({str(tmp_path / 'vol.img')!r}, os.O_RDWR), {KEY!r}, {VID!r}, {SECTORS})\n"
         f"s.start_seal_worker({KEY!r})\n"
         "print(s.seal_worker.pid, flush=True)\n"
         "time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        worker_pid = int(owner.stdout.readline())
        assert not _gone(worker_pid, timeout=0.2)
        owner.kill()
        owner.wait(timeout=10)
        assert _gone(worker_pid)
    finally:
        owner.kill()
        owner.wait()


def test_each_key_seals_under_its_own_key_and_a_dropped_key_seals_nothing() -> None:
    """One worker serves many files: a job is sealed under the key its id names, and a job
    under a dropped id fails (the caller then seals in process) rather than use another key."""
    from encfs.blocks import BlockAuthError, BlockCipher
    from encfs.sealworker import SealWorker
    block = 32768
    keys = [(os.urandom(32), os.urandom(16)) for _ in range(2)]
    worker = SealWorker(block)
    try:
        ids = [worker.add_key(*k) for k in keys]
        assert None not in ids and ids[0] != ids[1]
        plain = os.urandom(8 * block)
        numbers = range(4, 12)
        for key_id, (key, scope), other in zip(ids, keys, reversed(keys)):
            sealed = worker.seal(key_id, [(numbers, memoryview(plain))])
            assert sealed is not None
            assert BlockCipher(key, scope, block).open_run(4, sealed[0]) == plain
            with pytest.raises(BlockAuthError):
                BlockCipher(*other, block).open_run(4, sealed[0])
        worker.drop_key(ids[0])
        assert ids[0] not in worker._prefixed  # a long-lived server's closed files leave nothing behind
        assert worker.seal(ids[0], [(numbers, memoryview(plain))]) is None
        assert not worker.alive  # a failed job takes the worker out of use: writes are sealed in process
    finally:
        worker.close()


NULL_MOUNT = Path(__file__).resolve().parent.parent / "benchmarks" / "null_mount.py"


@contextlib.contextmanager
def null_cipher_class() -> Iterator[type]:
    """The benchmark's NullBlockCipher, loaded from its script as the worker loads it."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("null_mount_for_test", NULL_MOUNT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module.NullBlockCipher
    finally:
        del sys.modules[spec.name]


def test_the_worker_runs_its_servers_cipher_class() -> None:
    """The benchmark's null-cipher daemons take the worker path too, with the null cipher in the
    worker: a class from a script is found by its file, one of encfs by its module."""
    from encfs.blocks import NONCE_LEN, OVERHEAD, BlockCipher
    from encfs.sealworker import SealWorker, class_spec, load_class
    assert class_spec(BlockCipher) == "encfs.blocks:BlockCipher"
    assert load_class(class_spec(BlockCipher)) is BlockCipher
    with pytest.raises(TypeError):
        load_class("encfs.blocks:BlockAuthError")
    with null_cipher_class() as null_cipher:
        assert class_spec(null_cipher) == f"{NULL_MOUNT}:NullBlockCipher"
        block = 32768
        worker = SealWorker(block, null_cipher)
        try:
            key_id = worker.add_key(KEY, VID)
            assert key_id is not None
            plain = os.urandom(8 * block)
            sealed = worker.seal(key_id, [(range(8), memoryview(plain))])
            assert sealed is not None and worker.alive
            assert bytes(sealed[0]) == bytes(null_cipher(KEY, VID, block).seal_range(range(8), plain))
            assert bytes(sealed[0][NONCE_LEN:NONCE_LEN + block]) == plain[:block]  # not encrypted
            counted_id = worker.add_key(KEY, VID, PREFIX)  # counter nonces pass through the null cipher too
            assert counted_id is not None
            counted = worker.seal(counted_id, [(range(8), memoryview(plain))], [3])
            assert counted is not None and worker.alive
            assert bytes(counted[0]) == bytes(null_cipher(KEY, VID, block, PREFIX).seal_range(range(8), plain, 3))
            assert bytes(counted[0][block + OVERHEAD:block + OVERHEAD + NONCE_LEN]) == PREFIX + struct.pack(">Q", 4)
            areas = worker.areas()
            assert areas is not None
            plain_area, sealed_area = areas
            sealed_area[:len(sealed[0])] = BlockCipher(KEY, VID, block).seal_run(0, plain)  # real ciphertext
            out = plain_area[:len(plain)]
            assert worker.open(key_id, [(range(8), sealed_area[:len(sealed[0])], out)])
            assert bytes(out) != plain  # the null cipher does not decrypt: it is not AES-GCM in the worker
        finally:
            worker.close()


@pytest.mark.parametrize("null", [False, True], ids=["aes-gcm", "null-cipher"])
def test_runs_at_kept_places_seal_and_open_as_in_process(null: bool) -> None:
    """The worker keeps per-block views (RunViews) of the places of its arena that long runs
    use: runs sealed and opened at a place again, at new places, after it forgot them all
    (more than VIEWS_KEPT places) and shorter than VIEWS_MIN_BLOCKS give in-process results,
    and a tampered block of a run opened there is an error naming it."""
    from encfs.blocks import OVERHEAD, BlockAuthError, BlockCipher
    from encfs.sealworker import VIEWS_KEPT, VIEWS_MIN_BLOCKS, SealWorker
    block, count = 4096, 2 * VIEWS_MIN_BLOCKS
    step = block + OVERHEAD
    with contextlib.ExitStack() as stack:
        cls: type[BlockCipher] = stack.enter_context(null_cipher_class()) if null else BlockCipher
        worker = SealWorker(block, cls)
        stack.callback(worker.close)
        key_id = worker.add_key(KEY, VID, PREFIX)
        areas = worker.areas()
        assert key_id is not None and areas is not None
        plain_area, sealed_area = areas
        cipher = cls(KEY, VID, block, PREFIX)

        def round_trip(i: int, length: int, n: int) -> tuple[range, memoryview, memoryview]:
            """A run of ``length`` blocks sealed and opened at place ``i`` of the arena."""
            numbers = range(100 * i, 100 * i + length)
            data = os.urandom(length * block)
            plain = plain_area[i * block:(i + length) * block]
            plain[:] = data
            sealed = worker.seal(key_id, [(numbers, plain)], [1000 * n])
            assert sealed is not None
            assert bytes(sealed[0]) == bytes(cipher.seal_range(numbers, data, 1000 * n))
            at = sealed_area[i * step:(i + length) * step]
            at[:] = cipher.seal_range(numbers, data)
            out = plain_area[(i + 1) * block:(i + 1 + length) * block]
            assert worker.open(key_id, [(numbers, at, out)])
            assert bytes(out) == data
            assert worker.alive  # done in the worker, not refused and redone in process
            return numbers, at, out

        for n, i in enumerate([*range(VIEWS_KEPT + 2), 0, 1]):
            round_trip(i, count if n % 3 else VIEWS_MIN_BLOCKS - 1, n)
        fresh = VIEWS_KEPT + 5
        round_trip(fresh, VIEWS_MIN_BLOCKS, 100)  # views of that many blocks are kept there
        numbers, at, out = round_trip(fresh, count, 101)  # a longer run there makes longer ones
        if not null:
            at[step + 7] ^= 1
            with pytest.raises(BlockAuthError) as info:
                worker.open(key_id, [(numbers, at, out)])
            assert info.value.block_no == numbers[1]
            assert bytes(out[block:2 * block]) == bytes(block)
            assert worker.alive


def test_a_large_read_is_opened_by_the_worker_in_its_arena(image: int, worker_store: SectorStore) -> None:
    """read_view() of 256 KiB or more comes back as a view of the thread's arena slot, opened
    there by the worker: written sectors as written, unwritten ones as zeros (whatever the
    slot held before); smaller reads are opened in process."""
    worker = worker_store.seal_worker
    assert worker is not None
    writer = SectorStore(image, KEY, VID, SECTORS)  # in process, no worker
    data = os.urandom(240 * SECTOR_SIZE)
    writer.write_sectors(10, data[:100 * SECTOR_SIZE])
    writer.write_sectors(160, data[150 * SECTOR_SIZE:])  # sectors 110-159 stay unwritten
    writer.flush()
    expected = data[:100 * SECTOR_SIZE] + bytes(50 * SECTOR_SIZE) + data[150 * SECTOR_SIZE:]
    fresh = SectorStore(image, KEY, VID, SECTORS)
    fresh.start_seal_worker(KEY)
    assert fresh.seal_worker is not None
    try:
        areas = fresh.seal_worker.areas()
        assert areas is not None
        areas[0][:] = b"\xee" * len(areas[0])  # what an earlier request left in the slot
        got = fresh.read_view(10 * SECTOR_SIZE + 5, 240 * SECTOR_SIZE - 5)  # 240 sectors: within 1 MiB
        assert isinstance(got, memoryview) and got.obj is areas[0].obj  # the worker's arena
        assert bytes(got) == expected[5:]
        small = fresh.read_view(12 * SECTOR_SIZE, 8 * SECTOR_SIZE)
        assert isinstance(small, bytearray) and small == data[2 * SECTOR_SIZE:10 * SECTOR_SIZE]
    finally:
        fresh.seal_worker.close()


def test_a_tampered_sector_in_a_large_read_is_an_error(image: int, worker_store: SectorStore) -> None:
    from encfs.block.layout import SLOT_A, sector_offset
    from encfs.blocks import SEALED_BLOCK, BlockAuthError
    writer = SectorStore(image, KEY, VID, SECTORS)
    writer.write_sectors(0, os.urandom(128 * SECTOR_SIZE))  # a fresh image's first write goes to slot A
    writer.flush()
    at = sector_offset(77, SLOT_A) + SEALED_BLOCK // 2
    os.pwrite(image, bytes(b ^ 1 for b in os.pread(image, 1, at)), at)
    reported: list[int] = []
    reader = SectorStore(image, KEY, VID, SECTORS, on_auth_error=reported.append)
    reader.start_seal_worker(KEY)
    assert reader.seal_worker is not None
    try:
        with pytest.raises(BlockAuthError):
            reader.read_view(0, 128 * SECTOR_SIZE)
        assert reported == [77]
        assert reader.seal_worker.alive  # a bad block is the data's fault, not the worker's
        os.kill(reader.seal_worker.pid, signal.SIGKILL)
        assert _gone(reader.seal_worker.pid)
        with pytest.raises(BlockAuthError):  # opened in process once the worker is gone
            reader.read_view(0, 128 * SECTOR_SIZE)
        assert reported == [77, 77]
        assert bytes(reader.read_view(0, 77 * SECTOR_SIZE)) == bytes(writer.read(0, 77 * SECTOR_SIZE))
    finally:
        reader.seal_worker.close()


@pytest.mark.parametrize("block", [4096, 32768])
def test_counter_nonces_in_the_worker_are_those_of_in_process_sealing(block: int) -> None:
    """Counter mode is deterministic: what the worker seals under a prefixed key with counters is
    byte for byte what BlockCipher.seal_range seals in process, job k's blocks taking counters
    from counters[k] on; without counters the same key draws random nonces."""
    from encfs.blocks import NONCE_LEN, OVERHEAD, BlockCipher
    from encfs.sealworker import SealWorker
    worker = SealWorker(block)
    try:
        key_id = worker.add_key(KEY, VID, PREFIX)
        assert key_id is not None
        plain = os.urandom(24 * block)
        jobs = [(range(4, 12), memoryview(plain)[:8 * block]),  # 8 full blocks
                (range(101, 117, 2), memoryview(plain)[8 * block:16 * block - 100]),  # a short last block
                (range(0, 3), memoryview(plain)[16 * block:19 * block])]
        counters = [5, 2**40 + 3, 2**64 - 3]  # the last job ends at the last counter value
        sealed = worker.seal(key_id, jobs, counters)
        assert sealed is not None and worker.alive
        cipher = BlockCipher(KEY, VID, block, nonce_prefix=PREFIX)
        for (numbers, part), counter, blob in zip(jobs, counters, sealed):
            assert bytes(blob) == bytes(cipher.seal_range(numbers, part, counter=counter))
            step = block + OVERHEAD
            assert [bytes(blob[i * step:i * step + NONCE_LEN]) for i in range(len(numbers))] \
                == [PREFIX + struct.pack(">Q", counter + i) for i in range(len(numbers))]
            opened = bytearray(len(part))
            BlockCipher(KEY, VID, block).open_into(numbers, blob, opened)
            assert opened == part
        again = worker.seal(key_id, jobs, counters)  # the same counters again: the same bytes
        assert again is not None and [bytes(b) for b in again] == [bytes(cipher.seal_range(n, p, counter=c))
                                                                   for (n, p), c in zip(jobs, counters)]
        randomly = worker.seal(key_id, jobs[:1])  # no counters: random nonces, as before
        assert randomly is not None
        first_nonce = bytes(randomly[0][:NONCE_LEN])
        assert first_nonce != PREFIX + struct.pack(">Q", 5)
        assert BlockCipher(KEY, VID, block).open_run(4, randomly[0]) == plain[:8 * block]
        again = worker.seal(key_id, jobs[:1])
        assert again is not None and bytes(again[0][:NONCE_LEN]) != first_nonce
    finally:
        worker.close()


def test_the_worker_refuses_counters_it_could_not_use() -> None:
    """Counters for a key without a prefix, out of range, or not one per job are refused with
    ValueError in the caller (as BlockCipher would), and the worker stays in use."""
    from encfs.sealworker import SealWorker
    block = 4096
    worker = SealWorker(block)
    try:
        for bad in (b"", bytes(3), bytes(5)):
            with pytest.raises(ValueError):
                worker.add_key(KEY, VID, bad)
        plain_id, counted_id = worker.add_key(KEY, VID), worker.add_key(KEY, VID, PREFIX)
        assert plain_id is not None and counted_id is not None
        jobs = [(range(0, 4), memoryview(os.urandom(4 * block)))]
        with pytest.raises(ValueError):
            worker.seal(plain_id, jobs, [0])
        for counters in ([-1], [2**64 - 3], [2**64], [0, 4], []):
            with pytest.raises(ValueError):
                worker.seal(counted_id, jobs, counters)
        assert worker.alive
        sealed = worker.seal(counted_id, jobs, [2**64 - 4])
        assert sealed is not None and worker.alive
        assert worker.seal(plain_id, jobs) is not None
    finally:
        worker.close()


def test_a_write_over_alternating_slots_is_sealed_by_the_worker(image: int, worker_store: SectorStore) -> None:
    """Sectors whose current slots alternate make a 1 MiB write 256 runs, one job each: the worker
    takes them all in one request (it used to read 85 at most, fail, and go out of use)."""
    for s in range(0, 256, 2):
        worker_store.write_sectors(s, os.urandom(SECTOR_SIZE))
    worker_store.flush()
    data = os.urandom(256 * SECTOR_SIZE)
    sealed = worker_store.seal_ahead(0, data)
    assert sealed is not None and len(sealed.runs) == 256
    assert all(isinstance(blob, memoryview) for _o, _r, blob in sealed.runs)  # the worker's
    assert worker_store.seal_worker is not None and worker_store.seal_worker.alive
    assert worker_store.write_sealed(sealed)
    worker_store.flush()
    assert SectorStore(image, KEY, VID, SECTORS).read(0, len(data)) == data


def test_a_request_of_many_jobs_is_sealed_and_one_of_too_many_is_refused() -> None:
    """A write can be many runs (one per block at worst): up to MAX_JOBS jobs go to the worker
    in one request; more are refused (sealed in process) without taking the worker out of use."""
    from encfs.blocks import OVERHEAD, BlockCipher
    from encfs.sealworker import MAX_JOBS, SealWorker
    block = 4096
    worker = SealWorker(block)
    try:
        key_id = worker.add_key(KEY, VID)
        assert key_id is not None
        plain = os.urandom(MAX_JOBS * block)
        jobs = [(range(2 * i, 2 * i + 1), memoryview(plain)[i * block:(i + 1) * block]) for i in range(MAX_JOBS)]
        sealed = worker.seal(key_id, jobs)
        assert sealed is not None and len(sealed) == MAX_JOBS
        cipher = BlockCipher(KEY, VID, block)
        assert all(cipher.open(2 * i, blob) == plain[i * block:(i + 1) * block] for i, blob in enumerate(sealed))
        areas = worker.areas()
        assert areas is not None
        plain_area, sealed_area = areas
        for i, blob in enumerate(sealed):  # open them back in the worker, as many jobs
            sealed_area[i * len(blob):(i + 1) * len(blob)] = blob
        step = block + OVERHEAD
        opened = [(range(2 * i, 2 * i + 1), sealed_area[i * step:(i + 1) * step],
                   plain_area[i * block:(i + 1) * block]) for i in range(MAX_JOBS)]
        assert worker.open(key_id, opened) and bytes(plain_area[:len(plain)]) == plain
        too_many = [(range(i, i + 1), memoryview(plain)[i * 16:(i + 1) * 16]) for i in range(MAX_JOBS + 1)]
        assert worker.seal(key_id, too_many) is None
        assert not worker.open(key_id, opened + opened[:1])
        assert worker.alive  # refused up front, not failed in the worker
    finally:
        worker.close()
