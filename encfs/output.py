"""How commands print: JSON for scripts (``--json``), aligned "name  value" lines or a sentence for
people (lists joined with commas, nested values as JSON), as the AWS CLI's json and text outputs.

Invariants (docs/dev/cli.md):
- Every JSON document a command prints goes through print_json(): one object on stdout, its keys
  PascalCase at every depth (AWS's names: KeyId, CreationDate...), whatever the record's keys
  were inside encfs. Only data keeps its own keys: the pairs of an encryption context (any key
  ending in ``context``), and the maps keyed by name or number in DATA_MAPS.
- Messages and warnings never go to stdout (logging and ``encfs: ...`` lines go to stderr).
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

# Where a generic snake_case -> PascalCase spelling is not the AWS (or the clearer) name.
NAMES = {
    "fs_id": "FileSystemId", "cipherdir": "CipherDir", "mountpoint": "MountPoint",
    "header_mac": "HeaderMac", "state_directory": "StateDirectory",
    "loop": "Device",  # a loop device: Device, as an EBS attachment's
}
DATA_MAPS = {"mechanisms", "algorithms",  # `hsm status`: PKCS#11 mechanism names, blob algorithm ids
             "versionidstostages", "secretversionstostages"}  # secrets: version id -> stages
_SNAKE = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)*")


def pascal(name: str) -> str:
    """``key_id`` -> ``KeyId``; a name already PascalCase (or anything else) stays as it is."""
    if name in NAMES:
        return NAMES[name]
    if not _SNAKE.fullmatch(name):
        return name
    return "".join(part[:1].upper() + part[1:] for part in name.split("_"))


def _verbatim(name: str) -> bool:
    """A value whose keys are data, not field names (an encryption context's pairs, mechanisms)."""
    return name.lower().endswith("context") or name.lower() in DATA_MAPS


def pascal_keys(value: Any) -> Any:
    """``value`` with every dict key PascalCase, at every depth (user data kept: _verbatim)."""
    if isinstance(value, dict):
        return {pascal(k): (v if _verbatim(k) else pascal_keys(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [pascal_keys(v) for v in value]
    return value


def print_json(record: dict[str, Any], indent: int | None = 2) -> None:
    """The one way a command prints JSON: one object, PascalCase keys."""
    print(json.dumps(pascal_keys(record), indent=indent))


def print_record(record: dict[str, Any], as_json: bool, width: int = 20) -> None:
    if as_json:
        print_json(record)
        return
    for name, value in record.items():
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = ", ".join(value)
        elif isinstance(value, (list, dict)):
            value = json.dumps(value)
        print(f"{name:{width}} {value}")


def wants_json(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False))


def report(args: argparse.Namespace, record: dict[str, Any], text: str | None) -> None:
    """A command's result: ``record`` as JSON with --json, else the sentence ``text`` (None: nothing)."""
    if wants_json(args):
        print_json(record)
    elif text is not None:
        print(text)


JSON_HELP = "print the result as one JSON object (PascalCase keys, as the AWS CLI)"


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    """--json on a command that has none yet (encfs.cli gives it to every command that prints)."""
    if not any("--json" in a.option_strings for a in parser._actions):
        parser.add_argument("--json", action="store_true", help=JSON_HELP)
