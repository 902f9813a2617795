"""``encfs secret ...``: the Secrets Manager of encfs on the command line (issue #24).

Vocabulary, flags and JSON fields follow the AWS Secrets Manager CLI. ``secret put NAME`` is AWS's
create-secret when NAME is new (with ``--kms-key-id``, ``--description``) and put-secret-value
otherwise; ``secret create`` is create-secret alone. A value comes from ``--secret-string-file FILE``,
else stdin (asked for without echo on a terminal), byte for byte (a trailing newline is kept).
``secret get`` writes the value raw to stdout, as ``key decrypt`` writes a plaintext; ``--json``
prints AWS's GetSecretValue object instead (``SecretString``, or ``SecretBinary`` as base64).

Every command reaches its store through ``open_secret_store`` and the SecretStore methods alone,
so that a remote store (the key daemon's) can stand in for the local one.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

from encfs.cliargs import is_remote, open_key_service
from encfs.errors import SecretNotFound, UsageError
from encfs.keyd.secretdoc import MAX_VALUE_BYTES
from encfs.keyd.secretstore import DEFAULT_KEY, RANDOM_PASSWORD_LENGTH, SecretStore
from encfs.output import print_json, print_record, report, wants_json

AddHsmOptions = Callable[[argparse.ArgumentParser], None]


@contextmanager
def open_secret_store(args: argparse.Namespace) -> Iterator[SecretStore]:
    """The secret store the arguments name: the key daemon's with --keyd (RemoteSecretStore: the same
    methods, decided by the secret's key policy), else the local key service's state directory."""
    with open_key_service(args) as ks:
        if is_remote(ks):
            from encfs.keyd.secretops import RemoteSecretStore

            yield cast(SecretStore, RemoteSecretStore(ks))
        else:
            yield SecretStore(ks.home, ks)


def _read_value(args: argparse.Namespace, stdin: bool = True) -> bytes | None:
    """The value from --secret-string-file, else stdin (None: neither, where stdin is not asked)."""
    limit = MAX_VALUE_BYTES
    if args.value_file is not None:
        try:
            with open(args.value_file, "rb") as f:
                data = f.read(limit + 1)
        except OSError as e:
            raise UsageError(f"cannot read {args.value_file}: {e.strerror}") from None
    elif not stdin:
        return None
    elif sys.stdin.isatty():
        data = getpass.getpass("secret value: ").encode()
    else:
        data = sys.stdin.buffer.read(limit + 1)
    if len(data) > limit:
        raise UsageError(f"a secret value is at most {limit} bytes")
    return data


def _staged(result: dict[str, Any]) -> str:
    stages = result.get("VersionStages")
    return f" ({', '.join(stages)})" if stages else ""


def cmd_create(args: argparse.Namespace) -> int:
    value = _read_value(args)
    assert value is not None
    with open_secret_store(args) as store:
        result = store.create(args.name, value, args.kms_key_id, args.description or "")
    report(args, result, f"{result['Name']}: created, version {result['VersionId']} (AWSCURRENT) "
                         f"under key {result['KmsKeyId']}")
    return 0


def cmd_put(args: argparse.Namespace) -> int:
    value = _read_value(args)
    assert value is not None
    with open_secret_store(args) as store:
        try:
            described = store.describe(args.name)
        except SecretNotFound:
            described = None
        if described is None:
            if args.version_stages:
                raise UsageError("--version-stages applies to a secret that exists: a new one's first "
                                 "version is AWSCURRENT")
            result = store.create(args.name, value, args.kms_key_id, args.description or "")
            report(args, result, f"{result['Name']}: created, version {result['VersionId']} (AWSCURRENT) "
                                 f"under key {result['KmsKeyId']}")
            return 0
        if args.kms_key_id is not None and args.kms_key_id != described["KmsKeyId"]:
            raise UsageError(f"secret {args.name} exists, under key {described['KmsKeyId']}: --kms-key-id "
                             f"applies to a new secret (give that key id, or leave it out)")
        if args.description is not None and args.description != described["Description"]:
            raise UsageError(f"secret {args.name} exists: --description applies to a new secret")
        result = store.put(args.name, value, args.version_stages)
    report(args, result, f"{result['Name']}: version {result['VersionId']}{_staged(result)}")
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    with open_secret_store(args) as store:
        result = store.get(args.name, args.version_id, args.version_stage)
    if wants_json(args):
        if "SecretBinary" in result:
            result = {**result, "SecretBinary": base64.b64encode(result["SecretBinary"]).decode()}
        print_json(result)
        return 0
    value = result["SecretBinary"] if "SecretBinary" in result else result["SecretString"].encode("utf-8")
    sys.stdout.buffer.write(value)
    sys.stdout.buffer.flush()
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with open_secret_store(args) as store:
        entries = store.list()
    if wants_json(args):
        print_json({"SecretList": entries})
        return 0
    print(f"{'NAME':40}  {'KMS KEY ID':36}  {'LAST CHANGED':24}  STATE")
    for e in entries:
        state = f"deleted on {e['DeletedDate']}" if "DeletedDate" in e else "-"
        print(f"{e['Name']:40}  {e['KmsKeyId']:36}  {e['LastChangedDate']:24}  {state}")
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    with open_secret_store(args) as store:
        meta = store.describe(args.name)
    if wants_json(args):
        print_json(meta)
        return 0
    versions = "; ".join(f"{v['VersionId']} ({v['CreatedDate']}{', ' if v['VersionStages'] else ''}"
                         f"{', '.join(v['VersionStages'])})" for v in meta["Versions"])
    print_record({k: v for k, v in meta.items() if k not in ("VersionIdsToStages", "Versions")}
                 | {"Versions": versions}, False)
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    value = _read_value(args, stdin=False)
    with open_secret_store(args) as store:
        result = store.rotate(args.name, value)
    report(args, result, f"{result['Name']}: rotated, version {result['VersionId']} is AWSCURRENT")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with open_secret_store(args) as store:
        result = store.delete(args.name, args.days, force=args.force)
    text = (f"{result['Name']}: deleted" if args.force else
            f"{result['Name']}: scheduled for deletion on {result['DeletionDate']} "
            f"(`encfs secret restore {result['Name']}` until then)")
    report(args, result, text)
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    with open_secret_store(args) as store:
        result = store.restore(args.name)
    report(args, result, f"{result['Name']}: restored")
    return 0


def add_parser(subparsers: Any, add_hsm_options: AddHsmOptions) -> None:
    group = subparsers.add_parser("secret", help="secrets: versioned values sealed under a CMK "
                                                 "(AWS Secrets Manager)").add_subparsers(
        dest="secret_command", required=True, metavar="COMMAND")

    def cmd(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = group.add_parser(name, help=help, description=help)
        add_hsm_options(p)
        if name != "list":
            p.add_argument("name", metavar="NAME", help="secret name: 1-512 of A-Z a-z 0-9 / _ + = . @ -")
        p.set_defaults(func=func)
        return p

    def value_arg(p: argparse.ArgumentParser, default: str) -> None:
        p.add_argument("--secret-string-file", "--secret-binary-file", dest="value_file", metavar="FILE",
                       help=f"read the value (1-{MAX_VALUE_BYTES} bytes, kept byte for byte) from FILE "
                            f"(default: {default})")

    def creation_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--kms-key-id", metavar="KEY", help=f"the CMK that seals its values (default {DEFAULT_KEY})")
        p.add_argument("--description", metavar="TEXT")

    p = cmd("put", cmd_put, "store a value: creates NAME if new (create-secret), else adds a version "
                            "(put-secret-value); the value is read from stdin unless --secret-string-file")
    creation_args(p)
    value_arg(p, "stdin")
    p.add_argument("--version-stages", nargs="+", metavar="STAGE",
                   help="stages of the new version (default AWSCURRENT)")
    p = cmd("create", cmd_create, "create secret NAME with its first value (stdin unless --secret-string-file)")
    creation_args(p)
    value_arg(p, "stdin")
    p = cmd("get", cmd_get, "write a version's value to stdout (default: the AWSCURRENT one)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--version-id", metavar="ID")
    which.add_argument("--version-stage", metavar="STAGE", help="e.g. AWSPREVIOUS")
    cmd("list", cmd_list, "list secrets (names, keys, dates; never values)")
    cmd("describe", cmd_describe, "a secret's metadata and versions with their stages")
    p = cmd("rotate", cmd_rotate, "new AWSCURRENT version (AWSPENDING until done); the old one becomes "
                                  "AWSPREVIOUS")
    value_arg(p, f"a random {RANDOM_PASSWORD_LENGTH}-character password")
    p = cmd("delete", cmd_delete, "schedule deletion after a recovery window (7-30 days), or delete at once")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--recovery-window-in-days", dest="days", type=int, metavar="DAYS", help="7-30, default 30")
    when.add_argument("--force-delete-without-recovery", dest="force", action="store_true",
                      help="delete now, with no way back")
    cmd("restore", cmd_restore, "cancel a scheduled deletion")
