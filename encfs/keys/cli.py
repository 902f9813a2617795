"""``encfs hsm ...`` and ``encfs key ...``: the key service on the command line.

Vocabulary, flag names and JSON field names follow the AWS KMS CLI (docs/dev/cli.md). Binary
data travels raw on stdin/stdout: ``--base64`` makes every ciphertext blob a command reads or
writes base64 text, ``--base64-in``/``--base64-out`` make stdin/stdout base64 whatever they hold;
``--json`` prints AWS's response object instead.

The handlers are in hsmcli.py (``encfs hsm ...``) and keycli.py (``encfs key ...``); this module
builds the argparse tree (register) and every name it defined before is still importable from it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from encfs.keys.hsmcli import (
    BACKUP_REMINDER,
    _embedded,
    _new_passphrase,
    _refuse_keyd,
    cmd_hsm_init,
    cmd_hsm_protect_pin,
    cmd_hsm_status,
    cmd_hsm_unprotect_pin,
)
from encfs.keys.keycli import (
    _b64,
    _blob_key,
    _decode_b64,
    _describe_text,
    _key,
    _number_of_bytes,
    _one_of,
    _parse_time,
    _print_json,
    _read_blob,
    _read_in,
    _read_stdin,
    _state_cmd,
    _stdin_b64,
    _stdout_b64,
    _version_use,
    _write_out,
    cmd_alias,
    cmd_aliases,
    cmd_audit,
    cmd_create,
    cmd_decrypt,
    cmd_describe,
    cmd_encrypt,
    cmd_generate_data_key,
    cmd_get_import_params,
    cmd_import,
    cmd_list,
    cmd_re_encrypt,
    cmd_retire_version,
)
from encfs.keys.service import MAX_ENCRYPT_PLAINTEXT, WRAPPING_ALGORITHMS

AddHsmOptions = Callable[[argparse.ArgumentParser], None]


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


# Every name this module defined before the handlers moved stays importable here, the private ones too.
__all__ = ["BACKUP_REMINDER", "AddHsmOptions", "_b64", "_blob_key", "_decode_b64", "_describe_text", "_embedded",
           "_key", "_new_passphrase", "_number_of_bytes", "_one_of", "_parse_time", "_print_json", "_read_blob",
           "_read_in", "_read_stdin", "_refuse_keyd", "_state_cmd", "_stdin_b64", "_stdout_b64", "_version_use",
           "_write_out", "cmd_alias", "cmd_aliases", "cmd_audit", "cmd_create", "cmd_decrypt", "cmd_describe",
           "cmd_encrypt", "cmd_generate_data_key", "cmd_get_import_params", "cmd_hsm_init", "cmd_hsm_protect_pin",
           "cmd_hsm_status", "cmd_hsm_unprotect_pin", "cmd_import", "cmd_list", "cmd_re_encrypt", "cmd_retire_version",
           "register"]
