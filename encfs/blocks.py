"""The AEAD block layer shared by the filesystem and the volumes.

Content is cut into fixed-size plaintext blocks; each block is sealed on its
own with AES-256-GCM under the owner's data key (a file's or a volume's).
The block size belongs to the owner's format: volumes use 4 KiB sectors, a
filesystem records 4 KiB or 32 KiB in its config. Every size shares this framing:

    sealed block = nonce (12) || ciphertext (len(plaintext)) || tag (16)
    AAD          = scope || u64 block number (big-endian)

``scope`` names the owner (a file id, a volume id), so a block cannot be
moved to another position or another owner without failing authentication.

A seal takes its nonce in one of two ways; a reader needs neither (it reads
the nonce from the block):

- random (the default): every seal draws a fresh random 96-bit nonce;
  callers keep the number of seals per data key well under 2**32 (the
  budget of NIST SP 800-38D 8.3, random construction: the chance of any
  repeated nonce stays below 2**-32);
- counter (``counter=`` on a cipher made with a ``nonce_prefix``): nonce =
  prefix (4 bytes) || u64 counter, big-endian, and a run of blocks takes
  consecutive counter values: the deterministic construction of SP 800-38D
  8.2.1, fixed field = the prefix, invocation field = the 64-bit counter.
  Nonces are unique by construction, with no budget but the counter's range.
  The caller owns the counter and must never hand out a value twice under
  one key. (Sealing the very same block again, same number and plaintext,
  under the same counter gives the same bytes and so reveals nothing: a
  retry may reuse its counters.) A key sealed with counter nonces is not
  also used with random ones, which would bring back the chance of a
  repeated nonce that the counters remove.

The offset arithmetic is pure and lives in module-level functions so that
callers (FUSE read/write, volume I/O) and tests share one definition; each
takes the plaintext block size (default PLAIN_BLOCK, 4 KiB).
"""

from __future__ import annotations

import contextlib
import functools
import os
import struct
import threading
from typing import NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from encfs.errors import IntegrityError

PLAIN_BLOCK = 4096
MAX_BLOCK = 1 << 20
NONCE_LEN = 12
TAG_LEN = 16
OVERHEAD = NONCE_LEN + TAG_LEN
SEALED_BLOCK = PLAIN_BLOCK + OVERHEAD
NONCE_PREFIX_LEN = 4  # counter nonces: prefix || u64 counter

_U64 = struct.Struct(">Q")

# Held while a run of small blocks is sealed or opened. Each AES-GCM call releases the GIL
# while it runs; for a 4 KiB block that is a fraction of a microsecond, and server threads
# working through runs side by side handed the GIL back and forth at every block (a
# volume's 1 GiB read made twelve times the futex calls of the null cipher). Taking turns
# per run costs one hand-over per run. From TURN_BELOW up, a block keeps the GIL released
# long enough for threads to decrypt in parallel on separate cores, so those runs do not take
# turns (benchmarks/HISTORY.md, a9e0ad8). Nor does a run of one block (a 4 KiB random read or
# write): it has no hand-overs to save, and a thread that found the lock taken slept until the
# holder's AES-GCM call was done: 20% of the random reads' IOPS (benchmarks/HISTORY.md).
AEAD_TURN = threading.Lock()
TURN_BELOW = 16 * 1024
_NO_TURN = contextlib.nullcontext()


_COUNTER_LIMIT = 1 << 64
_CACHED_RUNS = 256  # a 1 MiB write of 4 KiB blocks
_FIELD = 1 << 8 * NONCE_LEN


@functools.lru_cache(maxsize=64)
def _ramp(count: int) -> int:
    """0, 1, ..., count - 1 in the 96-bit fields of one integer, the first one most significant:
    sum of (count-1-j) * F**j for F = 2**96 is (sum of F**j, minus count) / (F - 1)."""
    ramp: int = ((_FIELD ** count - 1) // (_FIELD - 1) - count) // (_FIELD - 1)
    return ramp


def counter_nonces(prefix: bytes, first: int, count: int) -> bytes:
    """``count`` nonces laid end to end, nonce i = prefix (4 bytes) || u64 big-endian (first + i);
    ValueError if the prefix is not 4 bytes or a counter would fall outside 0 .. 2**64 - 1.

    Every nonce of the run is first written with counter ``first``, and i is added to nonce i
    with one addition of big integers (no counter reaches 2**64, so nothing carries into a
    prefix): half the time of one struct.pack of a repeated format (benchmarks/HISTORY.md, 35c516d).
    """
    if len(prefix) != NONCE_PREFIX_LEN:
        raise ValueError(f"a nonce prefix is {NONCE_PREFIX_LEN} bytes, not {len(prefix)}")
    if first < 0 or count < 0 or first + count > _COUNTER_LIMIT:
        raise ValueError(f"counters {first} to {first + count - 1} are not all in 0 to 2**64 - 1")
    if not count:
        return b""
    ramp = _ramp(count) if count <= _CACHED_RUNS else _ramp.__wrapped__(count)
    same = int.from_bytes((bytes(prefix) + _U64.pack(first)) * count, "big")
    return (same + ramp).to_bytes(NONCE_LEN * count, "big")


class BlockAuthError(IntegrityError):
    """A sealed block failed authentication (tampered, moved, truncated or wrong key)."""

    def __init__(self, block_no: int) -> None:
        super().__init__(f"block {block_no} failed authentication")
        self.block_no = block_no


def check_block_size(block: int) -> int:
    """``block`` if it is a valid plaintext block size (a power of two, 4 KiB to 1 MiB)."""
    if not (PLAIN_BLOCK <= block <= MAX_BLOCK and block & (block - 1) == 0):
        raise ValueError(f"block size must be a power of two from {PLAIN_BLOCK} to {MAX_BLOCK}, not {block}")
    return block


def blocks_touched(offset: int, length: int, block: int = PLAIN_BLOCK) -> range:
    """Block numbers that plaintext bytes [offset, offset+length) fall in."""
    if offset < 0 or length < 0:
        raise ValueError("offset and length must be non-negative")
    if length == 0:
        return range(offset // block, offset // block)
    return range(offset // block, (offset + length - 1) // block + 1)


def sealed_offset(block_no: int, header_len: int = 0, block: int = PLAIN_BLOCK) -> int:
    """Where block ``block_no`` starts in a sealed stream behind a header."""
    return header_len + block_no * (block + OVERHEAD)


def sealed_size(plain_size: int, header_len: int = 0, block: int = PLAIN_BLOCK) -> int:
    """Size of the sealed stream holding ``plain_size`` plaintext bytes."""
    full, rest = divmod(plain_size, block)
    return header_len + full * (block + OVERHEAD) + (rest + OVERHEAD if rest else 0)


def plain_size(sealed_len: int, header_len: int = 0, block: int = PLAIN_BLOCK) -> int:
    """Inverse of sealed_size. ValueError if no plaintext size maps to ``sealed_len``."""
    body = sealed_len - header_len
    if body < 0:
        raise ValueError(f"sealed stream of {sealed_len} bytes is shorter than its header")
    full, rest = divmod(body, block + OVERHEAD)
    if rest == 0:
        return full * block
    if rest <= OVERHEAD:
        raise ValueError(f"sealed stream ends in a fragment of {rest} bytes")
    return full * block + rest - OVERHEAD


def run_blocks(first_block: int, sealed_len: int, block: int = PLAIN_BLOCK) -> tuple[range, int]:
    """The block numbers and the plaintext length of ``sealed_len`` sealed bytes laid end to
    end from block ``first_block`` (every block full but the last); BlockAuthError if they end
    in a fragment too short to be a sealed block (a torn write or a truncated file)."""
    full, rest = divmod(sealed_len, block + OVERHEAD)
    if 0 < rest <= OVERHEAD:
        raise BlockAuthError(first_block + full)
    count = full + (1 if rest else 0)
    return range(first_block, first_block + count), sealed_len - count * OVERHEAD


class RunViews:
    """Every block's views of one place of a buffer for sealed runs and one for their plaintext,
    made once and reused by every run laid there: the sealing worker keeps them for the places
    of its arena that its slots use. Slicing three memoryviews per block took a quarter of the
    time of opening a 1 MiB run of 4 KiB blocks (benchmarks/HISTORY.md). Runs of full blocks
    only: block i is sealed in ``nonces[i] + bodies[i]`` (ciphertext and tag), plain in
    ``plains[i]``."""

    __slots__ = ("bodies", "nonces", "plains")

    def __init__(self, sealed: memoryview, plain: memoryview, block_size: int) -> None:
        step = block_size + OVERHEAD
        starts = range(0, min(len(sealed) // step, len(plain) // block_size) * step, step)
        self.nonces = [sealed[p:p + NONCE_LEN] for p in starts]
        self.bodies = [sealed[p + NONCE_LEN:p + step] for p in starts]
        self.plains = [plain[p:p + block_size] for p in range(0, len(starts) * block_size, block_size)]

    def check(self, block_numbers: range, block_size: int) -> None:
        """ValueError unless a run of ``block_numbers`` fits these views of ``block_size`` blocks."""
        if len(block_numbers) > len(self.plains) or self.plains and len(self.plains[0]) != block_size:
            raise ValueError(f"{len(block_numbers)} blocks of {block_size} bytes do not fit these views")


class BlockCipher:
    """Seals and opens blocks of one owner. One instance per data key (reuse it).

    ``block_size`` is the plaintext block size; a sealed block is at most
    ``block_size + OVERHEAD`` bytes. ``nonce_prefix`` (4 bytes) lets the seal methods take a
    ``counter`` (counter nonces, see the module docstring); without one they only draw random nonces.
    """

    __slots__ = ("_aead", "_scope", "_turn", "block_size", "nonce_prefix", "sealed_block")

    def __init__(self, key: bytes, scope: bytes, block_size: int = PLAIN_BLOCK,
                 nonce_prefix: bytes | None = None) -> None:
        if len(key) != 32:
            raise ValueError("BlockCipher needs a 256-bit key")
        if nonce_prefix is not None and len(nonce_prefix) != NONCE_PREFIX_LEN:
            raise ValueError(f"a nonce prefix is {NONCE_PREFIX_LEN} bytes, not {len(nonce_prefix)}")
        self._aead = AESGCM(key)
        self._scope = bytes(scope)
        self.nonce_prefix = None if nonce_prefix is None else bytes(nonce_prefix)
        self.block_size = check_block_size(block_size)
        self.sealed_block = block_size + OVERHEAD
        self._turn: contextlib.AbstractContextManager[object] = AEAD_TURN if block_size < TURN_BELOW else _NO_TURN

    def aad(self, block_no: int) -> bytes:
        return self._scope + _U64.pack(block_no)

    def nonces(self, count: int, counter: int | None = None) -> bytes:
        """The nonces of a run of ``count`` blocks, laid end to end: random (one getrandom(2)
        for the run) or, from ``counter`` on, counter nonces under this cipher's prefix
        (ValueError if it has none)."""
        if counter is None:
            return os.urandom(NONCE_LEN * count)
        if self.nonce_prefix is None:
            raise ValueError("counter nonces need a cipher made with a nonce prefix")
        return counter_nonces(self.nonce_prefix, counter, count)

    def seal(self, block_no: int, plaintext: bytes, counter: int | None = None) -> bytes:
        """nonce || ciphertext || tag for ``plaintext`` (at most block_size bytes); the nonce is
        random, or the counter nonce of ``counter``."""
        if not 0 < len(plaintext) <= self.block_size:
            raise ValueError(f"a block holds 1 to {self.block_size} bytes, not {len(plaintext)}")
        nonce = self.nonces(1, counter)
        return nonce + self._aead.encrypt(nonce, plaintext, self.aad(block_no))

    def open(self, block_no: int, sealed: bytes | bytearray | memoryview) -> bytes:
        """Plaintext of a sealed block; BlockAuthError if it does not authenticate."""
        if not OVERHEAD < len(sealed) <= self.sealed_block:
            raise BlockAuthError(block_no)
        mv = memoryview(sealed)
        try:  # slices of a memoryview: no copy of the block before decryption
            return self._aead.decrypt(mv[:NONCE_LEN], mv[NONCE_LEN:], self.aad(block_no))
        except InvalidTag:
            raise BlockAuthError(block_no) from None

    def seal_into(self, block_numbers: range, plaintext: bytes | bytearray | memoryview, out: memoryview | bytearray,
                  counter: int | None = None) -> None:
        """Seal ``plaintext`` as consecutive blocks laid end to end in ``out``, block i under
        number ``block_numbers[i]``. Every block but the last is full; ``out`` is exactly
        ``len(plaintext) + len(block_numbers) * OVERHEAD`` bytes (ValueError otherwise).

        Without ``counter``, one getrandom(2) supplies every nonce of the run: large writes make
        no system call per block. With it, block i takes the counter nonce of ``counter + i``
        (ValueError if the cipher has no nonce prefix). Blocks are sealed in place into ``out``.
        """
        pt, out = memoryview(plaintext).cast("B"), memoryview(out).cast("B")
        count, step, size = len(block_numbers), self.sealed_block, self.block_size
        if count and not (count - 1) * size < len(pt) <= count * size:
            raise ValueError(f"{len(pt)} bytes are not {count} blocks of {size} bytes")
        self.check_run(block_numbers, len(out), len(pt))
        nonces = memoryview(self.nonces(count, counter))
        encrypt_into, scope, pack = self._aead.encrypt_into, self._scope, _U64.pack
        if count == 1:  # a 4 KiB random write: no loop, and no turn to take (AEAD_TURN)
            out[:NONCE_LEN] = nonces
            encrypt_into(nonces, pt, scope + pack(block_numbers[0]), out[NONCE_LEN:])
            return
        # Slices past the end stop at it, so the last (possibly short) block needs no special case.
        with self._turn:
            for block_no, pos, ipos, npos in zip(block_numbers, range(0, len(out), step), range(0, len(pt), size),
                                                 range(0, len(nonces), NONCE_LEN)):
                nonce = nonces[npos:npos + NONCE_LEN]
                out[pos:pos + NONCE_LEN] = nonce
                encrypt_into(nonce, pt[ipos:ipos + size], scope + pack(block_no), out[pos + NONCE_LEN:pos + step])

    def seal_views(self, block_numbers: range, views: RunViews, counter: int | None = None) -> None:
        """seal_into for a run of full blocks whose plaintext lies in ``views.plains``, sealed into
        the views' nonces and bodies."""
        views.check(block_numbers, self.block_size)
        nonces = memoryview(self.nonces(len(block_numbers), counter))
        encrypt_into, scope, pack = self._aead.encrypt_into, self._scope, _U64.pack
        with self._turn:
            for block_no, npos, nonce_at, body, plain in zip(block_numbers, range(0, len(nonces), NONCE_LEN),
                                                             views.nonces, views.bodies, views.plains):
                nonce = nonces[npos:npos + NONCE_LEN]
                nonce_at[:] = nonce
                encrypt_into(nonce, plain, scope + pack(block_no), body)

    def seal_range(self, block_numbers: range, plaintext: bytes | bytearray | memoryview,
                   counter: int | None = None) -> bytearray:
        """seal_into a new buffer of the right size."""
        out = bytearray(len(plaintext) + len(block_numbers) * OVERHEAD)
        self.seal_into(block_numbers, plaintext, out, counter)
        return out

    def seal_run(self, first_block: int, plaintext: bytes | bytearray | memoryview, counter: int | None = None) -> bytearray:
        """Seal consecutive blocks numbered from ``first_block``; only the last may be short."""
        return self.seal_range(range(first_block, first_block - (-len(plaintext) // self.block_size)), plaintext,
                               counter)

    def check_run(self, block_numbers: range, sealed_len: int, out_len: int) -> None:
        """What open_into and seal_into need of their arguments: ValueError if ``sealed_len`` bytes cannot
        be ``len(block_numbers)`` blocks of plaintext ``out_len``; BlockAuthError if the
        last block is a fragment too short to be sealed."""
        count = len(block_numbers)
        if not count:
            if sealed_len or out_len:
                raise ValueError("no block numbers for a non-empty run")
            return
        last = sealed_len - (count - 1) * self.sealed_block  # the last block's sealed length
        if last > self.sealed_block or out_len != sealed_len - count * OVERHEAD:
            raise ValueError(f"{count} sealed blocks in {sealed_len} bytes cannot fill {out_len} bytes")
        if last <= OVERHEAD:
            raise BlockAuthError(block_numbers[-1])

    def open_into(self, block_numbers: range, sealed: bytes | bytearray | memoryview, out: memoryview | bytearray) -> None:
        """Open the sealed blocks laid end to end in ``sealed`` into ``out``, block i under number
        ``block_numbers[i]``. Every block but the last is full; ``out`` is exactly as long as
        their plaintext (ValueError otherwise).

        Decrypting in place saves a copy of every block. Raises BlockAuthError at the first
        block that does not authenticate, after zeroing that block's part of ``out``: bytes
        that failed authentication never stay behind in a caller's buffer.
        """
        mv, out = memoryview(sealed), memoryview(out).cast("B")
        self.check_run(block_numbers, len(mv), len(out))
        step, size = self.sealed_block, self.block_size
        decrypt_into, scope, pack = self._aead.decrypt_into, self._scope, _U64.pack
        if len(block_numbers) == 1:  # a 4 KiB random read: no loop, and no turn to take (AEAD_TURN)
            try:
                decrypt_into(mv[:NONCE_LEN], mv[NONCE_LEN:], scope + pack(block_numbers[0]), out)
            except InvalidTag:
                _unauthentic(block_numbers[0], out)
            return
        # Slices past the end stop at it, so the last (possibly short) block needs no special case.
        with self._turn:
            for block_no, pos, opos in zip(block_numbers, range(0, len(mv), step), range(0, len(out), size)):
                try:
                    decrypt_into(mv[pos:pos + NONCE_LEN], mv[pos + NONCE_LEN:pos + step], scope + pack(block_no),
                                 out[opos:opos + size])
                except InvalidTag:
                    _unauthentic(block_no, out[opos:opos + size])

    def open_views(self, block_numbers: range, views: RunViews) -> None:
        """open_into for a run of full blocks sealed in the views' nonces and bodies, opened into
        ``views.plains``."""
        views.check(block_numbers, self.block_size)
        decrypt_into, scope, pack = self._aead.decrypt_into, self._scope, _U64.pack
        with self._turn:
            for block_no, nonce, body, plain in zip(block_numbers, views.nonces, views.bodies, views.plains):
                try:
                    decrypt_into(nonce, body, scope + pack(block_no), plain)
                except InvalidTag:
                    _unauthentic(block_no, plain)

    def open_run(self, first_block: int, sealed: bytes | bytearray | memoryview) -> bytearray:
        """Open consecutive sealed blocks (as written by seal_run)."""
        numbers, plain_len = run_blocks(first_block, len(sealed), self.block_size)
        out = bytearray(plain_len)
        self.open_into(numbers, sealed, out)
        return out


def _unauthentic(block_no: int, plain: memoryview) -> NoReturn:
    """Block ``block_no`` failed authentication: zero what its decryption may have left in
    ``plain`` (bytes that failed authentication never stay in a caller's buffer) and raise."""
    plain[:] = bytes(len(plain))
    raise BlockAuthError(block_no) from None
