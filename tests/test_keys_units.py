"""Pure-function tests: context encoding, blob parsing, pkcs11 URIs, data-key cache."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from encfs.errors import ConfigError, InvalidCiphertext, UsageError
from encfs.keys.blob import HEADER_LEN, MIN_BLOB_LEN, BlobHeader, CiphertextBlob
from encfs.keys.cache import DataKeyCache
from encfs.keys.context import context_digest, encode_context, parse_context_args
from encfs.keys.pkcs11_uri import parse_pkcs11_uri

contexts = st.dictionaries(st.text(min_size=1, max_size=20), st.text(max_size=20), max_size=6)


@given(contexts)
def test_context_encoding_ignores_insertion_order(ctx: dict[str, str]) -> None:
    reordered = dict(reversed(list(ctx.items())))
    assert encode_context(ctx) == encode_context(reordered)


@given(contexts, contexts)
def test_context_encoding_is_injective(a: dict[str, str], b: dict[str, str]) -> None:
    if a != b:
        assert encode_context(a) != encode_context(b)


def test_context_encoding_resists_boundary_shifts() -> None:
    assert encode_context({"ab": "c"}) != encode_context({"a": "bc"})
    assert encode_context({}) == b"\x00\x00"
    assert context_digest(encode_context({"a": "b"})) != context_digest(encode_context({"a": "c"}))


def test_context_rejects_empty_key_and_bad_args() -> None:
    with pytest.raises(UsageError):
        encode_context({"": "x"})
    with pytest.raises(UsageError, match="KEY=VALUE"):
        parse_context_args(["novalue"])
    with pytest.raises(UsageError, match="twice"):
        parse_context_args(["a=1", "a=2"])
    assert parse_context_args(["a=1", "b=x=y", "c="]) == {"a": "1", "b": "x=y", "c": ""}


def _header() -> BlobHeader:
    return BlobHeader(uuid.UUID(int=7), 3, b"D" * 8, b"N" * 12)


def test_blob_round_trip() -> None:
    blob = CiphertextBlob(_header(), b"C" * 32 + b"T" * 16)
    packed = blob.pack()
    assert len(packed) == HEADER_LEN + 48
    parsed = CiphertextBlob.parse(packed)
    assert parsed == blob
    assert parsed.aad(b"\x00\x00") == packed[:HEADER_LEN] + b"\x00\x00"


@pytest.mark.parametrize("cut", [0, 1, HEADER_LEN, MIN_BLOB_LEN - 1])
def test_blob_truncated(cut: int) -> None:
    packed = CiphertextBlob(_header(), b"x" * 48).pack()
    with pytest.raises(InvalidCiphertext, match="truncated"):
        CiphertextBlob.parse(packed[:cut])


@pytest.mark.parametrize(("offset", "value", "message"), [
    (0, ord("X"), "magic"), (3, 9, "version"), (4, 77, "algorithm"),
])
def test_blob_bad_header_fields(offset: int, value: int, message: str) -> None:
    packed = bytearray(CiphertextBlob(_header(), b"x" * 48).pack())
    packed[offset] = value
    with pytest.raises(InvalidCiphertext, match=message):
        CiphertextBlob.parse(bytes(packed))


def test_blob_version_zero_rejected() -> None:
    packed = bytearray(CiphertextBlob(_header(), b"x" * 48).pack())
    packed[21:25] = b"\x00\x00\x00\x00"
    with pytest.raises(InvalidCiphertext, match="version 0"):
        CiphertextBlob.parse(bytes(packed))


def test_pkcs11_uri_full() -> None:
    uri = parse_pkcs11_uri("pkcs11:token=My%20HSM;serial=42;slot-id=3"
                           "?module-path=/opt/lib/p11.so&pin-source=file:/etc/pin")
    assert uri.token == "My HSM"
    assert uri.serial == "42"
    assert uri.slot_id == 3
    assert uri.module_path == "/opt/lib/p11.so"
    assert uri.pin_source == "file:/etc/pin"


@pytest.mark.parametrize(("text", "message"), [
    ("http://x", "must start"),
    ("pkcs11:token", "without '='"),
    ("pkcs11:bogus=1", "unsupported"),
    ("pkcs11:token=a;token=b", "twice"),
    ("pkcs11:slot-id=x", "not a number"),
    ("pkcs11:?module-name=softhsm2", "module-path"),
])
def test_pkcs11_uri_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_pkcs11_uri(text)


class _Tick:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_cache_limits_uses_age_and_size() -> None:
    tick = _Tick()
    cache = DataKeyCache(max_age=10, max_uses=3, max_entries=2, clock=tick)
    cache.put(b"b1", b"c", b"k1", "id", 1)  # the unwrap itself counts as use 1
    assert cache.get(b"b1", b"c") == (b"k1", "id", 1)
    assert cache.get(b"b1", b"c") == (b"k1", "id", 1)
    assert cache.get(b"b1", b"c") is None  # 3 uses reached
    assert cache.get(b"b1", b"other-context") is None
    cache.put(b"b2", b"c", b"k2", "id", 1)
    tick.t = 10.0
    assert cache.get(b"b2", b"c") is None  # aged out
    for i in range(3):
        cache.put(bytes([i]), b"c", b"k", "id", 1)
    assert len(cache) == 2
    assert cache.get(bytes([0]), b"c") is None  # least recently used evicted
    with pytest.raises(ValueError):
        DataKeyCache(max_uses=0)


def test_data_key_cache_lifetime_is_the_documented_five_minutes(service: Any) -> None:
    """The filesystem's cache of file data keys uses the documented default lifetime (it was an
    hour): an entry outlives what only the token knows (docs: README, "Data-key cache")."""
    from types import SimpleNamespace

    from encfs.blocks import BlockCipher
    from encfs.fuse.openfiles import OpenFiles
    from encfs.keys.cache import MAX_AGE, DataKeyCache
    from encfs.sealing import Sealers

    assert MAX_AGE == 300.0 and DataKeyCache().max_age == MAX_AGE
    config = SimpleNamespace(block_size=4096, key_id="alias/none", format=2, features=())
    files = OpenFiles(b"/nonexistent", config, service, BlockCipher, read_only=True,  # type: ignore[arg-type]
                      sealers=Sealers(4096))
    assert files.key_cache.max_age == MAX_AGE


def test_a_pkcs11_error_names_its_token_once(service: Any) -> None:
    import pkcs11.exceptions as p11e

    from encfs.errors import TokenError

    with pytest.raises(TokenError) as exc:
        with service.token._locked("probe"):
            raise p11e.GeneralError()
    message = str(exc.value)
    assert message.startswith(f"PKCS#11 probe failed on {service.token.spec.describe()}: "), message
    assert "token token" not in message


def test_two_objects_sharing_an_id_leave_the_session_usable(token: Any) -> None:
    """A token holding two objects with one id (left by a rotation before 8bfb053) fails that
    key's use in one line; the search must not stay open on the session, or every later lookup
    of any key fails (OperationActive)."""
    import os

    from encfs.errors import TokenError

    shared, other = os.urandom(20), os.urandom(20)
    token.generate_aes_key(shared, "twice")
    token.generate_aes_key(shared, "twice")
    token.generate_aes_key(other, "other")
    with pytest.raises(TokenError, match="several token objects share id"):
        token.key_record(shared)
    assert token.key_record(other) == ("other", True)
    with pytest.raises(TokenError, match="several token objects share id"):
        token.encrypt_gcm(shared, bytes(12), b"", b"x")
    assert len(token.encrypt_gcm(other, bytes(12), b"", b"x")) == 17
