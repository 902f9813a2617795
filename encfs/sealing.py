"""Sealing and opening runs of blocks, in this process or in the sealing worker, behind one
interface: the filesystem's FileContent and the volumes' stores (sectors.py, cow.py) call a
Sealer and never ask which of the two does the work.

A daemon owns one Sealers: in process until start() starts the worker (encfs.sealworker), which
then serves every key the daemon hands out with sealer(); stop() ends it.

Invariants:
- A run goes to the worker only if it is worth the round trip (worth_the_worker, or
  WORKER_MIN_BYTES for seals) and the worker holds the key; otherwise, and whenever the
  worker is gone or fails a job, the run is sealed or opened here with the same cipher: the
  same framing, and with counters the same counter values (sealworker.py's invariants), so
  the result never depends on who did it.
- A key reaches the worker at most once, at its first run worth sending (a file read in small
  pieces never sends its key), and close() drops it there. A sealer made while no worker
  runs stays in process for good.
- Arena views (arena(), seal_jobs() results from the worker) stay valid until the calling
  thread's next job for the worker, as SealWorker's do.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from encfs.blocks import BlockCipher
from encfs.sealworker import WORKER_MIN_BYTES, SealWorker, worth_the_worker

Bytes = bytes | bytearray | memoryview
OpenJob = tuple[range, Bytes, memoryview]  # block numbers, sealed bytes, where the plaintext goes


class Sealer:
    """One key's sealing: ``cipher`` in this process, and the worker for runs worth it."""

    def __init__(self, cipher: BlockCipher, worker: SealWorker | None = None, key: bytes | None = None,
                 scope: bytes = b"", nonce_prefix: bytes | None = None) -> None:
        self.cipher = cipher
        self.worker = worker if key is not None else None
        self._key: tuple[bytes, bytes, bytes | None] | None = None if self.worker is None else \
            (bytes(key or b""), scope, nonce_prefix)
        self._key_id: int | None = None
        self._lock = threading.Lock()  # readers under a server's shared lock may send the key together

    @property
    def in_worker(self) -> bool:
        """Whether the worker holds this key already (nothing is sent to find out)."""
        return self._key_id is not None

    def send_key(self) -> int | None:
        """The key's id in the worker, sent there now if it is not yet; None without a worker
        (one that is gone stays gone: the key is offered once)."""
        if self._key_id is None and self._key is not None:
            with self._lock:
                if self._key is not None and self.worker is not None:  # not sent meanwhile
                    self._key_id = self.worker.add_key(*self._key)
                    self._key = None
        return self._key_id

    def arena(self, plain_len: int, sealed_len: int) -> tuple[memoryview, memoryview] | None:
        """This thread's plaintext and sealed areas in the worker's arena, for a read of that
        many bytes worth opening there (then read into ``sealed`` and call open_jobs()); None
        if the read is to be opened here."""
        if self.worker is None or not worth_the_worker(plain_len, sealed_len) or self.send_key() is None:
            return None
        return self.worker.areas()

    def open_jobs(self, jobs: Sequence[OpenJob]) -> None:
        """Open each (block numbers, sealed, out) into ``out``, as BlockCipher.open_into: in the
        worker if the views are in its arena (arena()), else here. BlockAuthError as open_into."""
        if not jobs:
            return
        if self.worker is not None and self._key_id is not None and self.worker.open(self._key_id, jobs):
            return
        for numbers, sealed, out in jobs:  # no worker, or it is gone: the sealed bytes are unchanged
            self.cipher.open_into(numbers, sealed, out)

    def open_run(self, first: int, sealed: Bytes) -> bytearray:
        return self.cipher.open_run(first, sealed)

    def seal_run(self, first: int, plain: Bytes) -> bytearray:
        """Consecutive blocks from ``first`` on, sealed here with random nonces: a small write
        (EncryptedFS.seal_ahead calls it before the file's lock for whole blocks), or one the
        worker did not seal."""
        return self.cipher.seal_run(first, plain)

    def seal_jobs(self, jobs: Sequence[tuple[range, Bytes]], counters: Sequence[int] | None = None) -> list[Bytes]:
        """Each (block numbers, plaintext) sealed as BlockCipher.seal_range, job k with counter
        nonces from ``counters[k]`` if given: by the worker if the jobs are WORKER_MIN_BYTES or
        more and it holds the key, else here."""
        done = self.seal_in_worker(jobs, counters, send=True)
        if done is not None:
            return list(done)
        return [self.cipher.seal_range(numbers, plain, counter=None if counters is None else counters[k])
                for k, (numbers, plain) in enumerate(jobs)]

    def seal_in_worker(self, jobs: Sequence[tuple[range, Bytes]], counters: Sequence[int] | None = None,
                       send: bool = False) -> list[memoryview] | None:
        """As seal_jobs(), but only by the worker (None if it would not or cannot): a server seals
        a write ahead of its lock this way. ``send``: send the key if the worker lacks it."""
        worker = self.worker
        if worker is None or sum(len(p) for _n, p in jobs) < WORKER_MIN_BYTES:
            return None
        key_id = self.send_key() if send else self._key_id
        if key_id is None:
            return None
        return worker.seal(key_id, [(numbers, memoryview(plain)) for numbers, plain in jobs], counters)

    def close(self) -> None:
        """Drop the key from the worker (its file or volume is closed)."""
        with self._lock:
            key_id, self._key_id, self._key = self._key_id, None, None
        if key_id is not None and self.worker is not None:
            self.worker.drop_key(key_id)


class Sealers:
    """A daemon's sealing: in process, or with one sealing worker from start() to stop()."""

    def __init__(self, block_size: int, cipher_class: type[BlockCipher] = BlockCipher) -> None:
        self.block_size = block_size
        self.cipher_class = cipher_class
        self.worker: SealWorker | None = None

    def start(self) -> None:
        """Start the worker (with this daemon's cipher class: a benchmark's null cipher runs there too)."""
        if self.worker is None:
            self.worker = SealWorker(self.block_size, self.cipher_class)

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None

    def sealer(self, cipher: BlockCipher, key: bytes, scope: bytes, nonce_prefix: bytes | None = None) -> Sealer:
        """A sealer for ``cipher`` (made from ``key`` and ``scope``, and ``nonce_prefix`` if it
        seals with counters); the worker, if one runs, gets the key at its first use."""
        return Sealer(cipher, self.worker, key, scope, nonce_prefix)

    def request_buffer(self) -> memoryview | None:
        """A FUSE request buffer in the worker's arena (WRITE bodies reach it uncopied), if one runs."""
        return None if self.worker is None else self.worker.request_buffer()
