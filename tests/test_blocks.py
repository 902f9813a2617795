"""The AEAD block layer: offset arithmetic and authentication of position and owner."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from encfs.blocks import (
    NONCE_LEN,
    NONCE_PREFIX_LEN,
    OVERHEAD,
    PLAIN_BLOCK,
    SEALED_BLOCK,
    BlockAuthError,
    BlockCipher,
    RunViews,
    blocks_touched,
    counter_nonces,
    plain_size,
    run_blocks,
    sealed_offset,
    sealed_size,
)

KEY = bytes(range(32))


block_sizes = st.sampled_from([4096, 8192, 32768, 1 << 20])


@given(st.integers(0, 10**9), st.integers(0, 10**6), block_sizes)
def test_blocks_touched_covers_exactly_the_range(offset: int, length: int, block: int) -> None:
    r = blocks_touched(offset, length, block)
    if length == 0:
        assert len(r) == 0
        return
    assert r.start * block <= offset < (r.start + 1) * block
    end = offset + length - 1
    assert (r.stop - 1) * block <= end < r.stop * block


@given(st.integers(0, 10**10), st.integers(0, 100), block_sizes)
def test_sealed_size_round_trips(size: int, header: int, block: int) -> None:
    assert plain_size(sealed_size(size, header, block), header, block) == size
    assert sealed_size(size, header, block) >= size + header
    full = size // block
    assert sealed_offset(full, header, block) == sealed_size(full * block, header, block)


@given(st.integers(0, 10**6), st.integers(0, 10**7), block_sizes)
def test_run_blocks_inverts_sealed_size(first: int, sealed_len: int, block: int) -> None:
    full, rest = divmod(sealed_len, block + OVERHEAD)
    if 0 < rest <= OVERHEAD:  # no plaintext seals to this length: a torn last block
        with pytest.raises(BlockAuthError) as e:
            run_blocks(first, sealed_len, block)
        assert e.value.block_no == first + full
        return
    numbers, plain_len = run_blocks(first, sealed_len, block)
    assert sealed_size(plain_len, 0, block) == sealed_len
    assert numbers == blocks_touched(first * block, plain_len, block)


def test_sealed_layout_numbers() -> None:
    assert SEALED_BLOCK == 4124
    assert sealed_size(0) == 0
    assert sealed_size(1) == 1 + OVERHEAD
    assert sealed_size(PLAIN_BLOCK) == SEALED_BLOCK
    assert sealed_size(PLAIN_BLOCK + 1, 18) == 18 + SEALED_BLOCK + 1 + OVERHEAD
    assert sealed_offset(3, 18) == 18 + 3 * SEALED_BLOCK
    for bad in (1, OVERHEAD, SEALED_BLOCK + OVERHEAD):
        with pytest.raises(ValueError):
            plain_size(bad)
    with pytest.raises(ValueError):
        plain_size(5, 18)


def test_seal_open_round_trip_and_fresh_nonces() -> None:
    bc = BlockCipher(KEY, b"file-1")
    data = os.urandom(PLAIN_BLOCK)
    a, b = bc.seal(0, data), bc.seal(0, data)
    assert a != b  # a fresh nonce on every write
    assert bc.open(0, a) == bc.open(0, b) == data
    assert len(a) == SEALED_BLOCK


PREFIX = bytes.fromhex("9f3c01d7")


def reference_nonces(prefix: bytes, first: int, count: int) -> bytes:
    return b"".join(prefix + struct.pack(">Q", first + i) for i in range(count))


@given(st.binary(min_size=4, max_size=4), st.integers(0, 2**64) | st.integers(2**64 - 400, 2**64),
       st.integers(0, 300))
def test_counter_nonces_are_the_prefix_and_consecutive_counters(prefix: bytes, first: int, count: int) -> None:
    if first + count > 2**64:
        with pytest.raises(ValueError):
            counter_nonces(prefix, first, count)
        return
    nonces = counter_nonces(prefix, first, count)
    assert nonces == reference_nonces(prefix, first, count)
    assert len(nonces) == NONCE_LEN * count


def test_counter_nonces_bounds() -> None:
    assert NONCE_PREFIX_LEN == 4
    assert counter_nonces(PREFIX, 2**64 - 1, 1) == PREFIX + b"\xff" * 8  # the last counter value
    assert counter_nonces(PREFIX, 2**64 - 256, 256)[-12:] == PREFIX + b"\xff" * 8
    assert counter_nonces(PREFIX, 2**32 - 1, 2) == PREFIX + bytes.fromhex("00000000ffffffff") \
        + PREFIX + bytes.fromhex("0000000100000000")  # a carry stays inside the counter
    assert counter_nonces(PREFIX, 0, 0) == b""
    assert counter_nonces(PREFIX, 2**64, 0) == b""
    for first, count in ((2**64, 1), (2**64 - 1, 2), (2**64 - 255, 256), (-1, 1), (-1, 0), (0, -1)):
        with pytest.raises(ValueError):
            counter_nonces(PREFIX, first, count)
    for prefix in (b"", PREFIX[:3], PREFIX + b"\0", bytes(12)):
        with pytest.raises(ValueError):
            counter_nonces(prefix, 0, 1)


def test_counter_mode_seals_with_counter_nonces_and_is_deterministic() -> None:
    bc = BlockCipher(KEY, b"vol", nonce_prefix=PREFIX)
    assert bc.nonce_prefix == PREFIX
    data = os.urandom(3 * PLAIN_BLOCK + 100)
    counter = 2**32 + 7
    sealed = bc.seal_run(5, data, counter=counter)
    assert len(sealed) == sealed_size(len(data))
    got = [bytes(sealed[i * SEALED_BLOCK:i * SEALED_BLOCK + NONCE_LEN]) for i in range(4)]
    assert got == [PREFIX + struct.pack(">Q", counter + i) for i in range(4)]
    assert bc.open_run(5, sealed) == data
    assert BlockCipher(KEY, b"vol").open_run(5, sealed) == data  # a reader needs no prefix
    # same key, scope, prefix, counter and plaintext: the same bytes; anything else differs
    assert BlockCipher(KEY, b"vol", nonce_prefix=PREFIX).seal_run(5, data, counter=counter) == sealed
    assert bc.seal_run(5, data, counter=counter + 1) != sealed
    assert BlockCipher(KEY, b"vol", nonce_prefix=bytes(4)).seal_run(5, data, counter=counter) != sealed

    one = bc.seal(9, b"hello", counter=counter)
    assert one[:NONCE_LEN] == PREFIX + struct.pack(">Q", counter)
    assert bc.open(9, one) == b"hello"
    assert bc.seal(9, b"hello", counter=counter) == one

    numbers = range(11, 19, 2)  # any block numbering: the counters still follow the run's order
    four = os.urandom(4 * PLAIN_BLOCK)
    out = bytearray(4 * SEALED_BLOCK)
    bc.seal_into(numbers, four, out, counter=0)
    assert [bytes(out[i * SEALED_BLOCK:i * SEALED_BLOCK + NONCE_LEN]) for i in range(4)] \
        == [PREFIX + struct.pack(">Q", i) for i in range(4)]
    assert bc.seal_range(numbers, four, counter=0) == out
    opened = bytearray(4 * PLAIN_BLOCK)
    bc.open_into(numbers, out, opened)
    assert opened == four


def test_counter_mode_needs_a_prefix_and_counters_in_range() -> None:
    plain = BlockCipher(KEY, b"f")
    assert plain.nonce_prefix is None
    with pytest.raises(ValueError):
        plain.seal(0, b"x", counter=0)
    with pytest.raises(ValueError):
        plain.seal_run(0, bytes(PLAIN_BLOCK), counter=0)
    with pytest.raises(ValueError):
        plain.seal_range(range(1), bytes(PLAIN_BLOCK), counter=0)
    out = bytearray(SEALED_BLOCK)
    with pytest.raises(ValueError):
        plain.seal_into(range(1), bytes(PLAIN_BLOCK), out, counter=0)
    assert out == bytes(SEALED_BLOCK)  # nothing sealed
    for prefix in (b"", bytes(3), bytes(5)):
        with pytest.raises(ValueError):
            BlockCipher(KEY, b"f", nonce_prefix=prefix)
    bc = BlockCipher(KEY, b"f", nonce_prefix=PREFIX)
    assert bc.seal_run(0, bytes(2 * PLAIN_BLOCK), counter=2**64 - 2)[SEALED_BLOCK:SEALED_BLOCK + NONCE_LEN] \
        == PREFIX + b"\xff" * 8
    with pytest.raises(ValueError):  # the third block would need counter 2**64
        bc.seal_run(0, bytes(3 * PLAIN_BLOCK), counter=2**64 - 2)
    with pytest.raises(ValueError):
        bc.seal(0, b"x", counter=-1)


def test_a_cipher_with_a_prefix_still_draws_random_nonces_without_a_counter() -> None:
    bc = BlockCipher(KEY, b"f", nonce_prefix=PREFIX)
    a, b = bc.seal_run(0, bytes(2 * PLAIN_BLOCK)), bc.seal_run(0, bytes(2 * PLAIN_BLOCK))
    assert a != b
    nonces = {bytes(s[i:i + NONCE_LEN]) for s in (a, b) for i in (0, SEALED_BLOCK)}
    assert len(nonces) == 4
    assert bc.open_run(0, a) == bc.open_run(0, b) == bytes(2 * PLAIN_BLOCK)


def test_position_owner_and_key_are_authenticated() -> None:
    bc = BlockCipher(KEY, b"file-1")
    sealed = bc.seal(5, b"hello")
    with pytest.raises(BlockAuthError):
        bc.open(6, sealed)  # moved to another block
    with pytest.raises(BlockAuthError):
        BlockCipher(KEY, b"file-2").open(5, sealed)  # moved to another file
    with pytest.raises(BlockAuthError):
        BlockCipher(bytes(32), b"file-1").open(5, sealed)  # another key
    for i in range(len(sealed)):
        flipped = bytearray(sealed)
        flipped[i] ^= 0x80
        with pytest.raises(BlockAuthError):
            bc.open(5, bytes(flipped))
    for cut in (0, OVERHEAD, len(sealed) - 1):
        with pytest.raises(BlockAuthError):
            bc.open(5, sealed[:cut])


def test_runs_reject_swapped_blocks() -> None:
    bc = BlockCipher(KEY, b"f")
    data = os.urandom(3 * PLAIN_BLOCK + 100)
    sealed = bc.seal_run(7, data)
    assert len(sealed) == sealed_size(len(data))
    assert bc.open_run(7, sealed) == data
    swapped = sealed[SEALED_BLOCK:2 * SEALED_BLOCK] + sealed[:SEALED_BLOCK] + sealed[2 * SEALED_BLOCK:]
    with pytest.raises(BlockAuthError) as info:
        bc.open_run(7, swapped)
    assert info.value.block_no == 7


@pytest.mark.parametrize("block", [4096, 32768])
def test_runs_of_each_block_size(block: int) -> None:
    bc = BlockCipher(KEY, b"f", block)
    assert bc.block_size == block and bc.sealed_block == block + OVERHEAD
    data = os.urandom(2 * block + 5)
    sealed = bc.seal_run(3, data)
    assert len(sealed) == sealed_size(len(data), 0, block)
    assert bc.open_run(3, sealed) == data
    assert bc.open(4, sealed[block + OVERHEAD:2 * (block + OVERHEAD)]) == data[block:2 * block]
    with pytest.raises(ValueError):
        bc.seal(0, bytes(block + 1))
    with pytest.raises(BlockAuthError):  # longer than one sealed block of this size
        bc.open(3, sealed[:block + OVERHEAD + 1])
    with pytest.raises(BlockAuthError):
        BlockCipher(KEY, b"f", block).open_run(4, sealed)  # shifted by one block


def test_open_into_takes_any_block_numbering_and_leaves_no_unauthenticated_bytes() -> None:
    bc = BlockCipher(KEY, b"vol")
    data = os.urandom(4 * PLAIN_BLOCK)
    numbers = range(11, 19, 2)  # a volume's slot numbering: every other block number
    sealed = bytearray(len(data) + len(numbers) * OVERHEAD)
    bc.seal_into(numbers, data, sealed)
    out = bytearray(len(data))
    bc.open_into(numbers, sealed, memoryview(out))
    assert out == data
    with pytest.raises(BlockAuthError) as info:
        bc.open_into(range(12, 20, 2), sealed, bytearray(len(data)))  # the other slot's numbers
    assert info.value.block_no == 12

    tampered = bytearray(sealed)
    tampered[2 * SEALED_BLOCK + 100] ^= 1
    out = bytearray(b"\xee" * len(data))
    with pytest.raises(BlockAuthError) as info:
        bc.open_into(numbers, tampered, out)
    assert info.value.block_no == 15
    assert out[:2 * PLAIN_BLOCK] == data[:2 * PLAIN_BLOCK]  # authenticated before the bad block
    assert out[2 * PLAIN_BLOCK:3 * PLAIN_BLOCK] == bytes(PLAIN_BLOCK)  # the bad block's bytes are gone

    short = bytearray(bc.seal_run(0, data[:PLAIN_BLOCK + 100]))  # the last block is short
    short[-1] ^= 1
    out = bytearray(b"\xee" * (PLAIN_BLOCK + 100))
    with pytest.raises(BlockAuthError) as info:
        bc.open_into(range(2), short, out)
    assert info.value.block_no == 1
    assert out == data[:PLAIN_BLOCK] + bytes(100)

    with pytest.raises(ValueError):  # the buffer does not fit the run
        bc.open_into(numbers, sealed, bytearray(len(data) - 1))
    with pytest.raises(ValueError):  # more sealed bytes than blocks
        bc.open_into(range(11, 17, 2), sealed, bytearray(3 * PLAIN_BLOCK))
    with pytest.raises(BlockAuthError):  # a torn fragment after the last full block
        bc.open_run(0, bc.seal_run(0, data)[:SEALED_BLOCK + OVERHEAD])


@pytest.mark.parametrize("block", [4096, 32768])
def test_views_kept_for_a_place_seal_and_open_as_the_run_methods(block: int) -> None:
    """seal_views and open_views through RunViews made once for a place do what seal_into and
    open_into do there, for runs of other blocks and bytes, shorter runs and a tampered block."""
    count, step = 5, block + OVERHEAD
    arena = memoryview(bytearray(count * step + count * block))
    sealed_area, plain_area = arena[:count * step], arena[count * step:]
    views = RunViews(sealed_area, plain_area, block)
    bc = BlockCipher(KEY, b"f", block, nonce_prefix=b"\1\2\3\4")
    for first in (0, 7):
        data = os.urandom(count * block)
        plain_area[:] = data
        bc.seal_views(range(first, first + count), views, counter=100 + first)
        assert bytes(sealed_area) == bytes(bc.seal_range(range(first, first + count), data, 100 + first))
        plain_area[:] = bytes(len(plain_area))
        bc.open_views(range(first, first + count), views)
        assert bytes(plain_area) == data
    bc.seal_views(range(3), views)  # random nonces, a shorter run
    assert bc.open_run(0, sealed_area[:3 * step]) == data[:3 * block]
    sealed_area[step + 50] ^= 1
    plain_area[:] = b"\xee" * len(plain_area)
    with pytest.raises(BlockAuthError) as info:
        bc.open_views(range(3), views)
    assert info.value.block_no == 1
    assert plain_area[:block] == data[:block]  # authenticated before the bad block
    assert plain_area[block:2 * block] == bytes(block)  # the bad block's bytes are gone
    with pytest.raises(ValueError):  # longer than the views
        bc.open_views(range(count + 1), views)
    with pytest.raises(ValueError):  # views of another block size
        BlockCipher(KEY, b"f", 2 * block).seal_views(range(1), views)


@pytest.mark.parametrize("block,turns", [(4096, True), (8192, True), (16384, False), (32768, False)])
def test_runs_of_small_blocks_take_turns(block: int, turns: bool) -> None:
    """A run of blocks under TURN_BELOW is sealed or opened whole while it holds AEAD_TURN;
    larger blocks run in parallel (see encfs.blocks)."""
    import threading

    from encfs.blocks import AEAD_TURN

    bc = BlockCipher(KEY, b"f", block)
    sealed = bc.seal_run(0, bytes(3 * block))
    done = threading.Event()
    worker = threading.Thread(target=lambda: (bc.open_run(0, sealed), bc.seal_run(0, b"x"), done.set()))
    with AEAD_TURN:
        worker.start()
        assert done.wait(0.3 if turns else 10) is not turns
    assert done.wait(10)
    worker.join()


@pytest.mark.parametrize("length", [1, 100, PLAIN_BLOCK])
def test_a_run_of_one_block_round_trips_and_leaves_no_unauthenticated_bytes(length: int) -> None:
    bc = BlockCipher(KEY, b"f")
    data = os.urandom(length)
    sealed = bytearray(bc.seal_run(7, data))
    assert len(sealed) == length + OVERHEAD and bc.open_run(7, sealed) == data
    assert bc.open(7, sealed) == data  # the one-block form of both agrees
    with pytest.raises(BlockAuthError) as info:
        bc.open_run(8, sealed)  # another place
    assert info.value.block_no == 8
    sealed[NONCE_LEN] ^= 1
    out = bytearray(b"\xee" * length)
    with pytest.raises(BlockAuthError):
        bc.open_into(range(7, 8), sealed, out)
    assert out == bytes(length)


def test_a_run_of_one_block_does_not_take_turns() -> None:
    """A single small block is sealed and opened while another thread holds AEAD_TURN: there
    is no hand-over in it to save, and waiting for the lock costs a sleep and a wake-up."""
    import threading

    from encfs.blocks import AEAD_TURN

    bc = BlockCipher(KEY, b"f", 4096)
    sealed = bc.seal_run(0, bytes(4096))
    done = threading.Event()
    worker = threading.Thread(target=lambda: (bc.open_run(0, sealed), bc.seal_run(0, b"x"), done.set()))
    with AEAD_TURN:
        worker.start()
        assert done.wait(10)
    worker.join()


@pytest.mark.parametrize("block", [0, 2048, 4095, 8191, 12288, 2 << 20])
def test_bad_block_sizes_are_refused(block: int) -> None:
    with pytest.raises(ValueError):
        BlockCipher(KEY, b"f", block)


def test_block_size_limits() -> None:
    bc = BlockCipher(KEY, b"f")
    with pytest.raises(ValueError):
        bc.seal(0, b"")
    with pytest.raises(ValueError):
        bc.seal(0, bytes(PLAIN_BLOCK + 1))
    with pytest.raises(ValueError):
        BlockCipher(bytes(16), b"f")


def test_seal_into_needs_exactly_the_sealed_size() -> None:
    bc = BlockCipher(KEY, b"vol")
    data = os.urandom(2 * PLAIN_BLOCK + 5)  # two full blocks and a short one
    numbers = range(4, 10, 2)
    out = bytearray(len(data) + 3 * OVERHEAD)
    bc.seal_into(numbers, data, out)
    opened = bytearray(len(data))
    bc.open_into(numbers, out, opened)
    assert opened == data
    for wrong_out in (len(out) - 1, len(out) + 1):
        with pytest.raises(ValueError):
            bc.seal_into(numbers, data, bytearray(wrong_out))
    with pytest.raises(ValueError):  # three block numbers for two blocks of plaintext
        bc.seal_into(numbers, data[:2 * PLAIN_BLOCK], bytearray(2 * PLAIN_BLOCK + 3 * OVERHEAD))


_pages = st.integers(0, 1024).map(lambda n: n * 4096)  # aligned to 4 KiB, and to 32 KiB one time in 8


@given(_pages | st.integers(0, 1 << 22), _pages | st.integers(0, 1 << 22), st.sampled_from([4096, 32768]))
def test_whole_blocks_are_the_blocks_a_write_replaces_entirely(offset: int, length: int, block: int) -> None:
    from encfs.fuse.content import whole_blocks
    blocks = whole_blocks(offset, length, block)
    touched = blocks_touched(offset, length, block)
    keeps_old_bytes = length == 0 or offset > touched.start * block or offset + length < touched.stop * block
    assert (blocks is None) == keeps_old_bytes
    if blocks is not None:
        assert blocks == touched
