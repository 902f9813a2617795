"""Encryption contexts: string maps bound to ciphertext as AAD.

Canonical encoding (docs/FORMAT.md, "Encryption context"):

    u16 count || for each pair sorted by UTF-8 key bytes:
        u16 len(key) || key || u16 len(value) || value

Invariants: the encoding is a pure function of the map (order of insertion
does not matter), injective (length-prefixed), and the empty map encodes to
``b"\\x00\\x00"``. Keys and values are non-empty for keys, at most 65535 bytes.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Mapping

from encfs.errors import UsageError

EncryptionContext = Mapping[str, str]

CONTEXT_DIGEST_LEN = 8


def encode_context(context: EncryptionContext) -> bytes:
    """Return the canonical byte encoding of ``context``."""
    try:
        items = sorted((k.encode("utf-8"), v.encode("utf-8")) for k, v in context.items())
    except UnicodeEncodeError:  # lone surrogates, e.g. undecodable bytes from argv
        raise UsageError("encryption context keys and values must be valid UTF-8 text") from None
    if len(items) > 0xFFFF:
        raise UsageError("encryption context has more than 65535 pairs")
    out = [struct.pack(">H", len(items))]
    for key, value in items:
        if not key:
            raise UsageError("encryption context keys must not be empty")
        for part in (key, value):
            if len(part) > 0xFFFF:
                raise UsageError("encryption context key or value longer than 65535 bytes")
            out.append(struct.pack(">H", len(part)))
            out.append(part)
    return b"".join(out)


def context_digest(encoded: bytes) -> bytes:
    """Short digest of an encoded context, stored in blob headers.

    It lets decrypt tell "wrong context" apart from "tampered blob". Contexts
    are not secret (as in AWS KMS, they appear in the audit trail).
    """
    return hashlib.sha256(encoded).digest()[:CONTEXT_DIGEST_LEN]


def _pairs(arg: str) -> list[tuple[str, str]]:
    """One ``--encryption-context`` argument: a JSON object, or AWS shorthand ``k=v,k2=v2``.

    A comma starts a new pair only where the text after it has an ``=`` before the next comma:
    ``a=x,y`` stays one pair (``a`` = ``x,y``), as it was before the shorthand was accepted."""
    if arg.lstrip().startswith("{"):
        try:
            obj = json.loads(arg)
        except ValueError:
            raise UsageError(f"encryption context is not a JSON object: {arg!r}") from None
        if not isinstance(obj, dict) or not all(isinstance(v, str) for v in obj.values()):
            raise UsageError(f"encryption context JSON must map strings to strings, got {arg!r}")
        return list(obj.items())
    pairs: list[tuple[str, str]] = []
    for part in arg.split(","):
        key, sep, value = part.partition("=")
        if pairs and (not sep or not key):
            pairs[-1] = (pairs[-1][0], f"{pairs[-1][1]},{part}")
        elif not sep or not key:
            raise UsageError(f"encryption context must be KEY=VALUE[,KEY=VALUE] or a JSON object, got {arg!r}")
        else:
            pairs.append((key, value))
    return pairs


def parse_context_args(args: Iterable[str]) -> dict[str, str]:
    """Parse CLI ``--encryption-context`` arguments into a context; a repeated key is an error."""
    context: dict[str, str] = {}
    for arg in args:
        for key, value in _pairs(arg):
            if key in context:
                raise UsageError(f"encryption context key {key!r} given twice")
            context[key] = value
    return context
