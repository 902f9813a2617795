"""The key daemon's wire format: length-prefixed JSON frames, one request or reply each.

Invariants:
- A frame is a u32 big-endian length, then that many bytes of one JSON object (UTF-8). A length
  over MAX_FRAME, or a payload that is not a JSON object, is a ProtocolError: the server replies
  once where it can, then closes that connection only.
- Request: ``{"Id": int, "Op": str, "Args": {...}}``; reply: ``{"Id": int, "Result": {...}}`` or
  ``{"Id": int, "Error": {"Type": str, "Message": str, "ExitCode": int}}``. Replies may come out of
  order; the client matches them by Id.
- ``Type`` names an ``encfs.errors`` class: the client raises that class with the same one-line
  message and exit code, so a command prints the same error with a daemon as without one. A Type
  the client does not know becomes a plain EncfsError with the reply's exit code.
- Binary values travel as base64 strings (the keys' names end in ``Blob``, ``Plaintext``,
  ``Value`` or ``Material``, as AWS's JSON does); ``b64``/``unb64`` are the only coders.
"""

from __future__ import annotations

import base64
import binascii
import struct
from typing import Any

import orjson  # the frame codec: 4 JSON passes per request were a tenth of the daemon's rate

from encfs import errors
from encfs.errors import EncfsError, UsageError

MAX_FRAME = 1 << 20  # KMS payloads are <= 4 KiB of plaintext; secrets are <= 64 KiB (as AWS's)
HEADER = struct.Struct(">I")


class ProtocolError(Exception):
    """A malformed or oversized frame: the connection that sent it is closed."""


def encode_frame(message: dict[str, Any]) -> bytes:
    try:
        data = orjson.dumps(message)
    except TypeError as e:  # a value JSON cannot hold: a bug of the caller, named in one line
        raise UsageError(f"a key daemon message cannot be encoded: {e}") from None
    if len(data) > MAX_FRAME:
        raise UsageError(f"a key daemon message is {len(data)} bytes; at most {MAX_FRAME} are allowed")
    return HEADER.pack(len(data)) + data


def frame_length(header: bytes) -> int:
    (n,) = HEADER.unpack(header)
    if n > MAX_FRAME:
        raise ProtocolError(f"frame of {n} bytes is over the limit of {MAX_FRAME}")
    return int(n)


def decode_payload(data: bytes) -> dict[str, Any]:
    try:
        message = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ProtocolError("frame is not JSON") from None
    if not isinstance(message, dict):
        raise ProtocolError("frame is not a JSON object")
    return message


def error_body(exc: EncfsError) -> dict[str, Any]:
    return {"Type": type(exc).__name__, "Message": exc.message, "ExitCode": exc.exit_code}


def raise_error(body: Any) -> None:
    """Raise the EncfsError a reply's ``Error`` describes."""
    if not isinstance(body, dict):
        raise errors.KeydUnavailable("the key daemon sent a malformed error reply")
    cls = getattr(errors, str(body.get("Type")), None)
    if not (isinstance(cls, type) and issubclass(cls, EncfsError)):
        cls = EncfsError
    exc = cls.__new__(cls)
    Exception.__init__(exc, " ".join(str(body.get("Message", "key daemon error")).split()))
    code = body.get("ExitCode")
    if isinstance(code, int) and code != cls.exit_code:
        exc.exit_code = code
    raise exc


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise UsageError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(f"{what} is not valid base64") from None
