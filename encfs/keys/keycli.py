"""``encfs key ...``: the handlers of the key commands (cli.py builds their parsers), and the
stdin/stdout helpers they share. Key management, cryptographic operations, imported key
material and the audit trail; the conventions for binary data and ``--json`` are in cli.py's
module docstring.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from encfs.cliargs import is_remote, open_key_service
from encfs.errors import UsageError
from encfs.keys.context import parse_context_args
from encfs.keys.hsmcli import BACKUP_REMINDER
from encfs.keys.metadata import ORIGIN_EXTERNAL, ORIGIN_TOKEN
from encfs.keys.service import MAX_ENCRYPT_PLAINTEXT
from encfs.output import print_json, print_record, report, wants_json


def _print_json(data: Any) -> None:
    print_json(data)


def _read_stdin(limit: int | None, what: str) -> bytes:
    data = sys.stdin.buffer.read(limit + 1 if limit is not None else -1)
    if limit is not None and len(data) > limit:
        raise UsageError(f"{what} on stdin is over {limit} bytes")
    return data


def _decode_b64(data: bytes, what: str) -> bytes:
    try:
        return base64.b64decode(b"".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(f"{what} is not valid base64") from None


def _write_out(data: bytes, as_base64: bool) -> None:
    sys.stdout.buffer.write(base64.b64encode(data) + b"\n" if as_base64 else data)
    sys.stdout.buffer.flush()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _blob_key(blob: bytes) -> tuple[str, int]:
    """The CMK id and version a (valid) ciphertext blob names."""
    from encfs.keys.blob import CiphertextBlob

    header = CiphertextBlob.parse(blob).header
    return str(header.key_id), header.key_version


def _one_of(positional: str | None, option: str | None, what: str, flag: str) -> str | None:
    if positional is not None and option is not None and positional != option:
        raise UsageError(f"{what} given twice ({positional} and {flag} {option}): give one")
    return positional if positional is not None else option


def _key(args: argparse.Namespace) -> str:
    """KEY, given as the positional argument or as AWS's --key-id (one of them, once)."""
    key = _one_of(getattr(args, "key", None), getattr(args, "key_id_option", None), "KEY", "--key-id")
    if key is None:
        raise UsageError("a key is needed: give KEY or --key-id KEY (a key id, alias/NAME or NAME)")
    return str(key)


def _parse_time(text: str) -> float:
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"not an ISO 8601 time: {text!r}") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.timestamp()


# -- key management ---------------------------------------------------------------

def _version_use(v: dict[str, Any]) -> str:
    state = v.get("KeyVersionState", "")
    if state == "Retired":
        return f"retired {v['RetiredDate']}"
    used = v.get("UsedBy")
    holders = "use unknown" if used == "unknown" else (f"used by {', '.join(used)}" if used else "no known blobs")
    return f"{state.lower()}, {holders}" if state in ("Current",) else holders


def _describe_text(meta: dict[str, Any]) -> None:
    versions = "; ".join(f"v{v['Version']} ({v['CreationDate']}, {_version_use(v)})" for v in meta.get("KeyVersions", []))
    print_record({**meta, **({"KeyVersions": versions} if "KeyVersions" in meta else {})}, False)


def cmd_create(args: argparse.Namespace) -> int:
    origin = ORIGIN_EXTERNAL if args.origin == "external" else ORIGIN_TOKEN
    with open_key_service(args) as ks:
        meta = ks.create_key(args.description or "", alias=args.alias, origin=origin)
        if ks.embedded:
            print(f"encfs: note: {BACKUP_REMINDER.format(home=ks.home)}", file=sys.stderr)
    if args.json:
        _print_json(meta)
    else:
        print(meta["KeyId"])
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with open_key_service(args) as ks:
        keys = ks.list_keys()
    if args.json:
        _print_json({"Keys": keys})
        return 0
    print(f"{'KEY ID':36}  {'STATE':15}  {'VER':>3}  {'ORIGIN':8}  ALIASES / DESCRIPTION")
    for k in keys:
        names = ",".join(a.removeprefix("alias/") for a in k["Aliases"])
        print(f"{k['KeyId']:36}  {k['KeyState']:15}  {k['CurrentKeyVersion'] or '-':>3}  {k['Origin']:8}  "
              f"{names} {k['Description']}".rstrip())
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    with open_key_service(args) as ks:
        meta = ks.describe_key(_key(args))
    _print_json(meta) if args.json else _describe_text(meta)
    return 0


def cmd_alias(args: argparse.Namespace) -> int:
    """NAME and KEY as arguments, or as AWS's --alias-name and --target-key-id (create-alias and
    update-alias in one: an alias is created or moved)."""
    positional = [a for a in (args.name, args.key) if a is not None]
    if args.alias_name is not None and len(positional) == 1:  # `alias --alias-name N KEY`
        positional = [args.alias_name, positional[0]]
    name_arg, key_arg_ = (positional + [None, None])[:2]
    given = _one_of(name_arg, args.alias_name, "NAME", "--alias-name")
    key = _one_of(key_arg_, args.target_key_id, "KEY", "--target-key-id")
    if given is None:
        raise UsageError("alias needs NAME (or --alias-name NAME)")
    name = f"alias/{given.removeprefix('alias/')}"
    with open_key_service(args) as ks:
        if args.delete:
            ks.delete_alias(given)
            report(args, {"AliasName": name, "Deleted": True}, f"deleted alias {given}")
            return 0
        if not key:
            raise UsageError("alias needs NAME and KEY (or --target-key-id KEY; or --delete NAME)")
        key_id = ks.update_alias(given, key)
    report(args, {"AliasName": name, "TargetKeyId": key_id}, f"{name} -> {key_id}")
    return 0


def cmd_aliases(args: argparse.Namespace) -> int:
    with open_key_service(args) as ks:
        aliases = ks.list_aliases()
    if args.json:
        _print_json({"Aliases": [{"AliasName": a, "TargetKeyId": k} for a, k in sorted(aliases.items())]})
    else:
        for a, k in sorted(aliases.items()):
            print(f"{a:40} {k}")
    return 0


def _state_cmd(method: str, describe: Callable[[dict[str, Any]], str]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        extra = {}
        if getattr(args, "days", None) is not None:  # --pending-window-in-days
            extra["days"] = args.days
        if getattr(args, "period_days", None) is not None:  # --rotation-period-in-days
            extra["period_days"] = args.period_days
        with open_key_service(args) as ks:
            meta = getattr(ks, method)(_key(args), **extra)
        _print_json(meta) if args.json else print(describe(meta))
        return 0
    return run


def cmd_retire_version(args: argparse.Namespace) -> int:
    with open_key_service(args) as ks:
        meta = ks.retire_key_version(_key(args), args.version)
    _print_json(meta) if args.json else print(f"{meta['KeyId']}: version {args.version} retired "
                                              "(its backing key is destroyed)")
    return 0


# -- cryptographic operations -------------------------------------------------------

def cmd_generate_data_key(args: argparse.Namespace) -> int:
    context = parse_context_args(args.context)
    with open_key_service(args) as ks:
        dk = ks.generate_data_key(_key(args), context, _number_of_bytes(args), not args.without_plaintext)
    out: dict[str, Any] = {"KeyId": dk.key_id, "KeyVersion": dk.key_version, "CiphertextBlob": _b64(dk.ciphertext_blob)}
    if dk.plaintext is not None:
        out["Plaintext"] = _b64(dk.plaintext)
    _print_json(out)  # with or without --json: binary fields base64, as AWS's response
    return 0


def _number_of_bytes(args: argparse.Namespace) -> int:
    spec = {"AES_256": 32, "AES_128": 16}.get(args.key_spec) if args.key_spec else None
    if spec is not None and args.number_of_bytes is not None and args.number_of_bytes != spec:
        raise UsageError(f"--key-spec {args.key_spec} is {spec} bytes, --number-of-bytes says "
                         f"{args.number_of_bytes}: give one")
    return spec if spec is not None else 32 if args.number_of_bytes is None else int(args.number_of_bytes)


# --base64 (docs/dev/cli.md): every ciphertext blob the command reads or writes on stdin/stdout is
# base64 text; --base64-in / --base64-out: stdin / stdout is base64 text, whatever it carries.
def _stdin_b64(args: argparse.Namespace, blob: bool) -> bool:
    return bool(args.base64_in or (blob and args.base64))


def _stdout_b64(args: argparse.Namespace, blob: bool) -> bool:
    return bool(args.base64_out or (blob and args.base64))


def _read_in(args: argparse.Namespace, limit: int, what: str, blob: bool) -> bytes:
    data = _read_stdin(None if _stdin_b64(args, blob) else limit, what)
    if _stdin_b64(args, blob):
        data = _decode_b64(data, f"{what} on stdin")
        if len(data) > limit:
            raise UsageError(f"{what} on stdin is over {limit} bytes")
    return data


def cmd_encrypt(args: argparse.Namespace) -> int:
    context = parse_context_args(args.context)
    plaintext = _read_in(args, MAX_ENCRYPT_PLAINTEXT, "plaintext", blob=False)
    with open_key_service(args) as ks:
        blob = ks.encrypt(_key(args), plaintext, context)
    if wants_json(args):
        key_id, version = _blob_key(blob)
        _print_json({"CiphertextBlob": _b64(blob), "KeyId": key_id, "KeyVersion": version,
                     "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"})
    else:
        _write_out(blob, _stdout_b64(args, blob=True))
    return 0


def _read_blob(args: argparse.Namespace) -> bytes:
    return _read_in(args, 1 << 20, "ciphertext blob", blob=True)


def cmd_decrypt(args: argparse.Namespace) -> int:
    context = parse_context_args(args.context)
    blob = _read_blob(args)
    with open_key_service(args) as ks:
        result = ks.decrypt(blob, context, key=args.key)
    if wants_json(args):
        _print_json({"KeyId": result.key_id, "KeyVersion": result.key_version, "Plaintext": _b64(result.plaintext),
                     "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"})
    else:
        _write_out(result.plaintext, _stdout_b64(args, blob=False))
    return 0


def cmd_re_encrypt(args: argparse.Namespace) -> int:
    context = parse_context_args(args.context)
    dest_context = parse_context_args(args.to_context) if args.to_context else None
    blob = _read_blob(args)
    with open_key_service(args) as ks:
        new_blob = ks.re_encrypt(blob, context, args.to, dest_context)
    if wants_json(args):
        (source, source_version), (key_id, version) = _blob_key(blob), _blob_key(new_blob)
        _print_json({"CiphertextBlob": _b64(new_blob), "SourceKeyId": source, "SourceKeyVersion": source_version,
                     "KeyId": key_id, "KeyVersion": version,
                     "SourceEncryptionAlgorithm": "SYMMETRIC_DEFAULT",
                     "DestinationEncryptionAlgorithm": "SYMMETRIC_DEFAULT"})
    else:
        _write_out(new_blob, _stdout_b64(args, blob=True))
    return 0


# -- imported key material ------------------------------------------------------------

def cmd_get_import_params(args: argparse.Namespace) -> int:
    """AWS's GetParametersForImport: the wrapping public key as base64 DER (``PublicKey``) in the
    output, and as PEM in --public-key-out FILE if given (what openssl pkeyutl takes)."""
    from cryptography.hazmat.primitives import serialization

    out = Path(args.public_key_out) if args.public_key_out else None
    if out is not None and not out.parent.is_dir():  # check before new import parameters replace the old ones
        raise UsageError(f"cannot write {out}: no such directory {out.parent}")
    with open_key_service(args) as ks:
        params = ks.get_parameters_for_import(_key(args), args.wrapping_algorithm)
    if out is not None:
        try:
            out.write_bytes(params.public_key_pem)
        except OSError as e:
            raise UsageError(f"cannot write {out}: {e.strerror}") from None
    from encfs.keys.audit import iso_time

    der = serialization.load_pem_public_key(params.public_key_pem).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    record = {"KeyId": params.key_id, "WrappingAlgorithm": params.wrapping_algorithm,
              "ImportToken": params.import_token, "PublicKey": _b64(der),
              "ParametersValidTo": iso_time(params.valid_to)}
    if out is not None:
        record["PublicKeyFile"] = args.public_key_out
    _print_json(record)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    try:
        wrapped = Path(args.wrapped_material).read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {args.wrapped_material}: {e.strerror}") from None
    if args.base64:  # the wrapped material is a blob: base64 text with --base64
        wrapped = _decode_b64(wrapped, f"{args.wrapped_material}")
    valid_to = _parse_time(args.valid_to) if args.valid_to else None
    with open_key_service(args) as ks:
        meta = ks.import_key_material(_key(args), wrapped, args.import_token, valid_to)
    _print_json(meta) if args.json else print(f"imported key material into {meta['KeyId']}: {meta['KeyState']}")
    return 0


# -- audit ---------------------------------------------------------------------------------

def cmd_audit(args: argparse.Namespace) -> int:
    from encfs.errors import KeyNotFound
    from encfs.keys.audit import former_key_ids

    with open_key_service(args) as ks:
        key_ids: set[str] = set()
        gone: KeyNotFound | None = None
        if args.key:
            try:
                key_ids = {ks.describe_key(args.key)["KeyId"]}
            except KeyNotFound as e:
                gone = e
        # The rotated files too, oldest first; a key daemon's trail through the daemon (encfs:ReadAudit).
        records = cast(Any, ks).read_audit() if is_remote(ks) else list(ks.audit.read_all())
        if gone is not None:
            # Deleted (or an alias since deleted): its history stays, as CloudTrail keeps a
            # deleted key's events; what the trail never named is still not found.
            key_ids = former_key_ids(records, args.key)
            if not key_ids:
                raise gone
        if args.key:
            records = [r for r in records if key_ids & {r.get("key_id"), r.get("destination_key_id")}]
    if args.tail is not None:
        if args.tail < 0:
            raise UsageError(f"--tail {args.tail}: give a number of records, 0 or more")
        records = records[len(records) - args.tail:] if args.tail < len(records) else records
    if args.json:  # CloudTrail's shape: {"Records": [...]}, PascalCase (the log itself stays as FORMAT.md §5)
        _print_json({"Records": records})
        return 0
    for r in records:
        ctx = r.get("encryption_context")
        ctx_text = ",".join(f"{k}={v}" for k, v in ctx.items()) if isinstance(ctx, dict) and ctx else "-"
        ver = f"v{r['key_version']}" if r.get("key_version") else "-"
        principal = r.get("principal")
        p = principal if isinstance(principal, dict) else {}  # a record's fields, or "?"
        who = (str(p.get("subject", "?")) if p.get("kind") == "tls"  # a key daemon's TLS client
               else f"{p.get('user', '?')}({p.get('uid', '?')})/{p.get('pid', '?')}")
        line = (f"{r.get('time', '?')}  {who:18}  {r.get('operation', '?'):32} {r.get('key_id') or '-':36} {ver:4} "
                f"{ctx_text}  {r.get('outcome', '?')}")
        if r.get("error"):
            line += f": {r['error']}"
        print(line)
    return 0
