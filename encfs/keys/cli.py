"""``encfs hsm ...`` and ``encfs key ...``: the key service on the command line.

Vocabulary, flag names and JSON field names follow the AWS KMS CLI (docs/dev/cli.md). Binary
data travels raw on stdin/stdout: ``--base64`` makes every ciphertext blob a command reads or
writes base64 text, ``--base64-in``/``--base64-out`` make stdin/stdout base64 whatever they hold;
``--json`` prints AWS's response object instead.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import shutil
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from encfs.cliargs import is_remote, open_key_service
from encfs.errors import NoKeyStore, UsageError
from encfs.keys.context import parse_context_args
from encfs.keys.metadata import ORIGIN_EXTERNAL, ORIGIN_TOKEN
from encfs.keys.service import MAX_ENCRYPT_PLAINTEXT, WRAPPING_ALGORITHMS
from encfs.output import print_json, print_record, report, wants_json

AddHsmOptions = Callable[[argparse.ArgumentParser], None]


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


# -- hsm -----------------------------------------------------------------------

def cmd_hsm_init(args: argparse.Namespace) -> int:
    from encfs.cliargs import home_of, hsm_options
    from encfs.keys.config import default_home, prepare_state_dir, resolve_token

    home = home_of(args) or default_home()
    hsm = hsm_options(args)
    _refuse_keyd(hsm, "init")  # before anything is created here
    prepare_state_dir(home)
    _spec, embedded = resolve_token(home, hsm)
    if args.protect_pin and embedded is None:
        raise UsageError("--protect-pin applies to the embedded SoftHSM2 token only")
    created = embedded.provision() if embedded is not None else False
    with open_key_service(args, provision=True) as ks:
        status = ks.token_status()  # also proves the login works
        # A PKCS#11 module's store is its metadata: made here only, once the login works, as a
        # CloudHSM key store is created and connected before its first key.
        made = ks.store.create() if embedded is None else False
    verb = "created" if created else "already initialised" if embedded else "reachable"
    out = {"Token": status["token"], "Model": status["model"], "Serial": status["serial"], "Created": created,
           "Embedded": embedded is not None}
    text = [f"token {status['token']!r} ({status['model']}, serial {status['serial']}) {verb}"]
    if embedded is None:
        text.append(f"key metadata {ks.store.path} {'created' if made else 'already there'}")
        out.update(MetadataFile=str(ks.store.path), MetadataCreated=made)
    if embedded is not None:
        if args.protect_pin and not embedded.protected:
            embedded.protect(_new_passphrase(args.passphrase_file))
        where = (f"sealed under a passphrase in {embedded.sealed_pins}" if embedded.protected
                 else f"in {embedded.dir}, mode 0600; `encfs hsm protect-pin` seals them under a passphrase")
        text.append(f"state directory: {home}  (PINs {where})")
        out.update(StateDirectory=str(home), PinsSealed=embedded.protected)
        if created:
            text.append(BACKUP_REMINDER.format(home=home))
            if wants_json(args):  # the reminder is for people: on stderr, as `key create` gives it
                print(f"encfs: note: {BACKUP_REMINDER.format(home=home)}", file=sys.stderr)
    report(args, out, "\n".join(text))
    return 0


# One line, on `hsm init` (when it creates the token) and on every `key create` with the embedded
# token: each new key's backing key exists only in this directory, so a backup made before it
# cannot open data under it.
BACKUP_REMINDER = ("back up the state directory {home}: it holds the only copy of the token's keys "
                   "(`encfs hsm backup FILE`)")


def _new_passphrase(passphrase_file: str | None) -> str:
    from encfs.keys.pinseal import read_passphrase

    return read_passphrase(passphrase_file, "new passphrase for the token PINs", confirm=True)


def _refuse_keyd(hsm: Any, command: str) -> None:
    """`encfs hsm init`, `protect-pin` and `unprotect-pin` act on this state directory's own token."""
    if hsm.keyd is not None:
        raise UsageError(f"`encfs hsm {command}` acts on this state directory's token: run it where the "
                         "token is, without --keyd")


def _embedded(args: argparse.Namespace, command: str) -> Any:
    from encfs.cliargs import home_of, hsm_options
    from encfs.keys.config import default_home, resolve_token

    home = home_of(args) or default_home()
    hsm = hsm_options(args)
    _refuse_keyd(hsm, command)  # the daemon's PINs are its host's: protect them there
    _spec, embedded = resolve_token(home, hsm)
    if embedded is None:
        raise UsageError(f"{command} applies to the embedded SoftHSM2 token; the PIN of a PKCS#11 module "
                         f"is kept where --pin-file or the config says")
    if not embedded.provisioned:
        raise NoKeyStore(home)
    return embedded


def cmd_hsm_protect_pin(args: argparse.Namespace) -> int:
    from encfs.keys.pinseal import read_passphrase

    embedded = _embedded(args, "protect-pin")
    if embedded.protected:  # change the passphrase
        old = read_passphrase(args.passphrase_file, "current passphrase for the token PINs")
        embedded.unseal(old)  # a wrong passphrase stops here, before the new one is asked for
        embedded.protect(_new_passphrase(args.new_passphrase_file), old)
        report(args, {"SealedPins": str(embedded.sealed_pins), "PassphraseChanged": True},
               f"passphrase of {embedded.sealed_pins} changed")
    else:
        if args.new_passphrase_file:
            raise UsageError("--new-passphrase-file changes the passphrase of sealed PINs; "
                             "to seal them, give the passphrase with --passphrase-file")
        embedded.protect(_new_passphrase(args.passphrase_file))
        report(args, {"SealedPins": str(embedded.sealed_pins), "PassphraseChanged": False},
               f"PINs sealed under a passphrase in {embedded.sealed_pins}; user.pin and so.pin removed")
    return 0


def cmd_hsm_unprotect_pin(args: argparse.Namespace) -> int:
    from encfs.keys.pinseal import read_passphrase

    embedded = _embedded(args, "unprotect-pin")
    if not embedded.protected:
        raise UsageError(f"the PINs in {embedded.dir} are not sealed under a passphrase")
    embedded.unprotect(read_passphrase(args.passphrase_file, "passphrase for the token PINs"))
    report(args, {"UserPinFile": str(embedded.user_pin), "SoPinFile": str(embedded.so_pin)},
           f"PINs written to {embedded.user_pin} and {embedded.so_pin} (mode 0600); "
           f"{embedded.sealed_pins.name} removed")
    return 0


def cmd_hsm_status(args: argparse.Namespace) -> int:
    with open_key_service(args) as ks:
        status = ks.token_status()
        if not is_remote(ks):  # a daemon's token store is on its host
            tokendir = ks.home / "softhsm" / "tokens"
            if tokendir.exists():
                status["token_store"] = str(tokendir)
                status["free_bytes"] = shutil.disk_usage(tokendir).free
            status["state_directory"] = str(ks.home)
    if args.json:
        _print_json(status)
        return 0
    for name in ("module", "library", "token", "slot", "serial", "manufacturer", "model",
                 "state_directory", "token_store", "free_bytes"):
        if name in status:
            print(f"{name:16} {status[name]}")
    for mech, offered in status["mechanisms"].items():
        print(f"{'mechanism':16} {mech}: {'offered' if offered else 'NOT offered'}")
    return 0


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


# -- parser ------------------------------------------------------------------------------------

def register(sub: Any, add_hsm_options: AddHsmOptions) -> None:
    def cmd(group: Any, name: str, func: Callable[[argparse.Namespace], int], help: str,
            json_flag: bool = False) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = group.add_parser(name, help=help, description=help)
        add_hsm_options(p)
        if json_flag:
            p.add_argument("--json", action="store_true", help="print JSON")
        p.set_defaults(func=func)
        return p

    def key_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("key", metavar="KEY", nargs="?", help="key id, alias/NAME or NAME")
        p.add_argument("--key-id", dest="key_id_option", metavar="KEY", help="KEY, as AWS spells it")

    def context_arg(p: argparse.ArgumentParser, help: str = "encryption context") -> None:
        p.add_argument("--encryption-context", "--context", dest="context", action="append", default=[],
                       metavar="K=V[,K=V]|JSON", help=f"{help}: K=V pairs or a JSON object (repeatable)")

    def base64_args(p: argparse.ArgumentParser, blob: str) -> None:
        g = p.add_argument_group("binary data on stdin/stdout (default: raw bytes)")
        g.add_argument("--base64", action="store_true", help=f"the ciphertext blob is base64 text ({blob})")
        g.add_argument("--base64-in", action="store_true", help="stdin is base64 text, whatever it holds")
        g.add_argument("--base64-out", action="store_true", help="stdout is base64 text, whatever it holds")

    hsm = sub.add_parser("hsm", help="the PKCS#11 token").add_subparsers(dest="hsm_command", required=True,
                                                                        metavar="COMMAND")
    p = cmd(hsm, "init", cmd_hsm_init, "provision the embedded SoftHSM2 token (or check a real HSM login)")
    p.add_argument("--protect-pin", action="store_true",
                   help="seal the embedded token's PINs under a passphrase (asked twice, or --passphrase-file)")
    cmd(hsm, "protect-pin", cmd_hsm_protect_pin,
        "seal the embedded token's PINs under a passphrase (or change that passphrase)").add_argument(
        "--new-passphrase-file", metavar="FILE", help="the new passphrase, when changing it")
    cmd(hsm, "unprotect-pin", cmd_hsm_unprotect_pin,
        "store the embedded token's PINs in plain files again (mode 0600)")
    cmd(hsm, "status", cmd_hsm_status, "module, token, slot, free space and mechanisms", json_flag=True)
    from encfs.keys import backupcli

    backupcli.register(hsm)

    key = sub.add_parser("key", help="customer master keys and data keys").add_subparsers(
        dest="key_command", required=True, metavar="COMMAND")

    from encfs.keyd import policycli

    policycli.register(key, add_hsm_options)

    p = cmd(key, "create", cmd_create, "create a customer master key; prints its id", json_flag=True)
    p.add_argument("--alias")
    p.add_argument("--description")
    p.add_argument("--origin", choices=("token", "external"), default="token",
                   help="token: generated on the token; external: import your own material later")

    cmd(key, "list", cmd_list, "list keys", json_flag=True)
    p = cmd(key, "describe", cmd_describe, "show a key's metadata", json_flag=True)
    key_arg(p)

    p = cmd(key, "alias", cmd_alias, "point alias NAME at KEY (creates or moves it)")
    p.add_argument("name", metavar="NAME", nargs="?")
    p.add_argument("key", metavar="KEY", nargs="?")
    p.add_argument("--alias-name", metavar="NAME", help="NAME, as AWS spells it (alias/NAME or NAME)")
    p.add_argument("--target-key-id", metavar="KEY", help="KEY, as AWS spells it")
    p.add_argument("--delete", action="store_true", help="delete alias NAME")
    cmd(key, "aliases", cmd_aliases, "list aliases", json_flag=True)

    for name, method, text, msg in (
        ("enable", "enable_key", "enable a key", lambda m: f"{m['KeyId']}: {m['KeyState']}"),
        ("disable", "disable_key", "disable a key", lambda m: f"{m['KeyId']}: {m['KeyState']}"),
        ("cancel-deletion", "cancel_key_deletion", "cancel a scheduled deletion (the key comes back Disabled)",
         lambda m: f"{m['KeyId']}: {m['KeyState']}"),
        ("rotate", "rotate_key", "rotate now: add a new backing-key version",
         lambda m: f"{m['KeyId']}: current version {m['CurrentKeyVersion']}"),
        ("disable-rotation", "disable_key_rotation", "stop automatic rotation",
         lambda m: f"{m['KeyId']}: automatic rotation off"),
        ("delete-imported-key-material", "delete_imported_key_material",
         "destroy imported key material (the key becomes PendingImport)",
         lambda m: f"{m['KeyId']}: {m['KeyState']}"),
    ):
        p = cmd(key, name, _state_cmd(method, msg), text, json_flag=True)
        key_arg(p)

    p = cmd(key, "retire-version", cmd_retire_version,
            "destroy an old backing-key version that no known blob is under (after `encfs rekey`)", json_flag=True)
    key_arg(p)
    p.add_argument("version", metavar="VERSION", type=int)

    p = cmd(key, "schedule-deletion", _state_cmd(
        "schedule_key_deletion", lambda m: f"{m['KeyId']}: {m['KeyState']}, material destroyed after {m['DeletionDate']}"),
        "schedule deletion after a waiting period of 7 to 30 days", json_flag=True)
    key_arg(p)
    p.add_argument("--pending-window-in-days", "--days", dest="days", type=int, default=30, metavar="DAYS",
                   help="waiting period in days (7-30, default 30)")

    p = cmd(key, "enable-rotation", _state_cmd(
        "enable_key_rotation", lambda m: f"{m['KeyId']}: rotates every {m['RotationPeriodInDays']} days, "
                                         f"next {m['NextRotationDate']}"),
        "rotate automatically every PERIOD days", json_flag=True)
    key_arg(p)
    p.add_argument("--rotation-period-in-days", "--period-days", dest="period_days", type=int, default=365,
                   metavar="DAYS", help="90-2560, default 365")

    p = cmd(key, "generate-data-key", cmd_generate_data_key,
            "new data key: JSON with base64 Plaintext and CiphertextBlob (with or without --json)")
    key_arg(p)
    context_arg(p)
    p.add_argument("--without-plaintext", action="store_true", help="return only the CiphertextBlob")
    p.add_argument("--number-of-bytes", type=int, help="1-1024 (default 32)")
    p.add_argument("--key-spec", choices=("AES_256", "AES_128"), help="AES_256: 32 bytes, AES_128: 16")
    g = p.add_argument_group("binary data")
    g.add_argument("--base64", "--base64-out", action="store_true",
                   help="accepted as on every command: the JSON always carries the blob and the key as base64")

    p = cmd(key, "encrypt", cmd_encrypt, f"encrypt stdin (at most {MAX_ENCRYPT_PLAINTEXT} bytes) to a blob on stdout")
    key_arg(p)
    context_arg(p)
    base64_args(p, "written")

    p = cmd(key, "decrypt", cmd_decrypt, "decrypt a blob on stdin; the key comes from the blob")
    context_arg(p)
    p.add_argument("--key-id", "--key", dest="key", metavar="KEY", help="fail unless the blob is under this key")
    base64_args(p, "read; the plaintext written stays raw unless --base64-out")

    p = cmd(key, "re-encrypt", cmd_re_encrypt, "move a blob on stdin under another key (plaintext never output)")
    p.add_argument("--destination-key-id", "--to", dest="to", required=True, metavar="KEY")
    context_arg(p, "the blob's current context")
    p.add_argument("--destination-encryption-context", "--to-context", dest="to_context", action="append",
                   metavar="K=V[,K=V]|JSON", help="new context (default: unchanged)")
    base64_args(p, "read and written")

    p = cmd(key, "get-parameters-for-import", cmd_get_import_params,
            "RSA public key and import token for wrapping your key material (JSON, with or without --json)")
    key_arg(p)
    p.add_argument("--wrapping-algorithm", choices=WRAPPING_ALGORITHMS, default="RSAES_OAEP_SHA_1")
    p.add_argument("--public-key-out", metavar="FILE",
                   help="also write the public key here as PEM (the output's PublicKey is base64 DER, as AWS's)")

    p = cmd(key, "import", cmd_import, "import 32 bytes of key material wrapped with the public key", json_flag=True)
    key_arg(p)
    p.add_argument("--encrypted-key-material", "--wrapped-material", dest="wrapped_material", required=True,
                   metavar="FILE", help="the wrapped key material (raw bytes; base64 text with --base64)")
    p.add_argument("--base64", "--base64-in", dest="base64", action="store_true",
                   help="FILE holds the wrapped key material as base64 text")
    p.add_argument("--import-token", required=True)
    p.add_argument("--valid-to", metavar="TIME", help="ISO 8601 expiry; the key returns to PendingImport then")

    p = cmd(key, "audit", cmd_audit, "the audit trail", json_flag=True)
    p.add_argument("--key-id", "--key", dest="key", metavar="KEY", help="only records about KEY")
    p.add_argument("--tail", type=int, metavar="N", help="only the last N records")
