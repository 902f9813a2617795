"""RFC 7512 ``pkcs11:`` URIs, as far as encfs needs them.

Path attributes select the token (``token``, ``serial``, ``manufacturer``,
``model``, ``slot-id``); query attributes name the module (``module-path``)
and the PIN (``pin-source`` = ``file:PATH`` or ``env:VAR``, or ``pin-value``).
Unknown attributes are rejected, as the RFC asks for attributes a consumer
does not understand in a URI it must act on.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

from encfs.errors import ConfigError

_PATH_ATTRS = {"token", "serial", "manufacturer", "model", "slot-id", "object", "id", "type",
               "library-manufacturer", "library-description", "library-version"}
_QUERY_ATTRS = {"module-path", "module-name", "pin-source", "pin-value"}


@dataclass(frozen=True)
class Pkcs11Uri:
    """A parsed ``pkcs11:`` URI (only the attributes encfs acts on are kept)."""

    token: str | None = None
    serial: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    slot_id: int | None = None
    module_path: str | None = None
    pin_source: str | None = None
    pin_value: str | None = None


def _is_pin_value(item: str) -> bool:
    return item.partition("=")[0] == "pin-value"


def has_pin_value(uri: str) -> bool:
    """Whether ``uri`` carries a literal PIN (a ``pin-value`` query attribute)."""
    return any(_is_pin_value(item) for item in uri.partition("?")[2].split("&"))


def without_pin_value(uri: str) -> str:
    """``uri`` with every ``pin-value`` query attribute removed (everything else as written)."""
    path, sep, query = uri.partition("?")
    kept = [item for item in query.split("&") if not _is_pin_value(item)] if sep else []
    return path + ("?" + "&".join(kept) if any(kept) else "")


def parse_pkcs11_uri(uri: str) -> Pkcs11Uri:
    """Parse ``uri``; raise ConfigError naming the offending part (never the PIN)."""
    if not uri.startswith("pkcs11:"):
        raise ConfigError(f"not a pkcs11 URI (must start with 'pkcs11:'): {without_pin_value(uri)!r}")
    body = uri[len("pkcs11:"):]
    path, _, query = body.partition("?")
    values: dict[str, str] = {}
    for part, sep, allowed in ((path, ";", _PATH_ATTRS), (query, "&", _QUERY_ATTRS)):
        if not part:
            continue
        for item in part.split(sep):
            if not item:
                continue
            name, eq, raw = item.partition("=")
            if not eq:
                raise ConfigError(f"pkcs11 URI attribute without '=': {item!r}")
            if name not in allowed:
                raise ConfigError(f"unsupported pkcs11 URI attribute {name!r}")
            if name in values:
                raise ConfigError(f"pkcs11 URI attribute {name!r} given twice")
            values[name] = unquote(raw)
    if "module-name" in values and "module-path" not in values:
        raise ConfigError("pkcs11 URI: give module-path (module-name lookup is not supported)")
    slot_id = None
    if "slot-id" in values:
        try:
            slot_id = int(values["slot-id"])
        except ValueError:
            raise ConfigError(f"pkcs11 URI slot-id is not a number: {values['slot-id']!r}") from None
    return Pkcs11Uri(
        token=values.get("token"),
        serial=values.get("serial"),
        manufacturer=values.get("manufacturer"),
        model=values.get("model"),
        slot_id=slot_id,
        module_path=values.get("module-path"),
        pin_source=values.get("pin-source"),
        pin_value=values.get("pin-value"),
    )
