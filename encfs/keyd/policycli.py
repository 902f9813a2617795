"""`encfs key get-policy|put-policy` and `encfs key grant create|list|retire|revoke`.

Key policies and grants are the key daemon's: these commands need `--keyd` (or ``[keyd]`` in the
config). Without a daemon, whoever holds the token's PIN can use every key, and a policy would
protect nothing: the commands say so in one line rather than pretend.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from encfs.errors import UsageError
from encfs.keys.context import parse_context_args
from encfs.output import print_json, report

AddHsmOptions = Callable[[argparse.ArgumentParser], None]


def _remote(args: argparse.Namespace) -> Any:
    from encfs.cliargs import hsm_options, open_service, state_dir

    hsm = hsm_options(args)
    if hsm.keyd is None:
        raise UsageError("key policies and grants are kept by the key daemon: give --keyd SOCKET|HOST:PORT "
                         "(or [keyd] address in the config)")
    return open_service(state_dir(args), hsm)


def _key(args: argparse.Namespace) -> str:
    key = args.key or args.key_id_option
    if not key:
        raise UsageError("a key is needed: give KEY or --key-id KEY (a key id, alias/NAME or NAME)")
    return str(key)


def cmd_get_policy(args: argparse.Namespace) -> int:
    with _remote(args) as ks:
        policy = ks.get_key_policy(_key(args))
    print_json({"Policy": json.dumps(policy), "PolicyName": "default"} if args.json else policy)
    return 0


def cmd_put_policy(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.policy in (None, "-") else _read_policy_file(args.policy)
    try:
        policy = json.loads(text)
    except ValueError as e:
        raise UsageError(f"the policy is not JSON: {e}") from None
    with _remote(args) as ks:
        ks.put_key_policy(_key(args), policy)
    report(args, {"KeyId": _key(args), "PolicyName": "default"}, None)
    return 0


def _read_policy_file(name: str) -> str:
    path = name.removeprefix("file://")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(64 * 1024)
    except OSError as e:
        raise UsageError(f"cannot read the policy file {path}: {e.strerror}") from None


def cmd_grant_create(args: argparse.Namespace) -> int:
    constraints: dict[str, dict[str, str]] = {}
    if args.context_equals:
        constraints["EncryptionContextEquals"] = parse_context_args(args.context_equals)
    if args.context_subset:
        constraints["EncryptionContextSubset"] = parse_context_args(args.context_subset)
    operations = [op for item in args.operations for op in item.split(",") if op]
    with _remote(args) as ks:
        out = ks.create_grant(_key(args), args.grantee, operations, constraints or None, args.retiring_principal,
                              args.name)
    print_json(out) if args.json else print(out["GrantId"])
    return 0


def cmd_grant_list(args: argparse.Namespace) -> int:
    with _remote(args) as ks:
        grants = ks.list_grants(_key(args))
    if args.json:
        print_json({"Grants": grants})
        return 0
    print(f"{'GRANT ID':36}  {'GRANTEE':24}  OPERATIONS / CONSTRAINTS / RETIRING PRINCIPAL")
    for g in grants:
        constraints = json.dumps(g["Constraints"], separators=(",", ":")) if g.get("Constraints") else "-"
        print(f"{g.get('GrantId', ''):36}  {g.get('GranteePrincipal', ''):24}  {','.join(g.get('Operations', []))} "
              f"{constraints} {g.get('RetiringPrincipal') or '-'}")
    return 0


def cmd_grant_retire(args: argparse.Namespace) -> int:
    with _remote(args) as ks:
        ks.retire_grant(_key(args), args.grant_id)
    report(args, {"KeyId": _key(args), "GrantId": args.grant_id, "Retired": True}, None)
    return 0


def cmd_grant_revoke(args: argparse.Namespace) -> int:
    with _remote(args) as ks:
        ks.revoke_grant(_key(args), args.grant_id)
    report(args, {"KeyId": _key(args), "GrantId": args.grant_id, "Revoked": True}, None)
    return 0


def register(key: Any, add_hsm_options: AddHsmOptions) -> None:
    """Add the policy and grant commands to `encfs key`'s subcommands."""

    def cmd(group: Any, name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = group.add_parser(name, help=help, description=help)
        add_hsm_options(p)
        p.add_argument("key", metavar="KEY", nargs="?", help="key id, alias/NAME or NAME")
        p.add_argument("--key-id", dest="key_id_option", metavar="KEY", help="KEY, as AWS spells it")
        p.set_defaults(func=func)
        return p

    p = cmd(key, "get-policy", cmd_get_policy, "print a key's policy (JSON; needs --keyd)")
    p.add_argument("--json", action="store_true", help="AWS's GetKeyPolicy response (the policy as a string)")
    p = cmd(key, "put-policy", cmd_put_policy, "replace a key's policy (JSON from --policy FILE or stdin; needs --keyd)")
    p.add_argument("--json", action="store_true", help="print {KeyId, PolicyName}")
    p.add_argument("--policy", metavar="FILE", help="the policy document (file://FILE as AWS, or - for stdin)")

    grant = key.add_parser("grant", help="grants: give a principal operations on a key at once (needs --keyd)"
                           ).add_subparsers(dest="grant_command", required=True, metavar="COMMAND")
    p = cmd(grant, "create", cmd_grant_create, "create a grant; prints its id")
    p.add_argument("--grantee", "--grantee-principal", dest="grantee", required=True, metavar="PRINCIPAL",
                   help="user:NAME, group:NAME, uid:N or a certificate subject (CN=...)")
    p.add_argument("--operations", action="append", required=True, metavar="OP[,OP]",
                   help="Decrypt, Encrypt, GenerateDataKey, ReEncryptFrom, ReEncryptTo, CreateGrant, "
                        "RetireGrant, DescribeKey, ...")
    p.add_argument("--context-equals", action="append", default=[], metavar="K=V",
                   help="the grant applies only to exactly this encryption context")
    p.add_argument("--context-subset", action="append", default=[], metavar="K=V",
                   help="the grant applies to contexts that include these pairs")
    p.add_argument("--retiring-principal", metavar="PRINCIPAL", help="who else may retire the grant")
    p.add_argument("--name", help="a name for the grant")
    p.add_argument("--json", action="store_true", help="print {GrantId, GrantToken}")
    p = cmd(grant, "list", cmd_grant_list, "list a key's grants")
    p.add_argument("--json", action="store_true", help="print AWS's ListGrants response")
    for name, func, text in (("retire", cmd_grant_retire, "retire a grant (its grantee or retiring principal)"),
                             ("revoke", cmd_grant_revoke, "revoke a grant (an administrator of the key)")):
        p = cmd(grant, name, func, text)
        p.add_argument("--grant-id", required=True)
        p.add_argument("--json", action="store_true", help="print {KeyId, GrantId, Retired|Revoked}")
