"""``encfs hsm init|protect-pin|unprotect-pin|status``: the handlers of the commands on the
token itself (cli.py builds their parsers; ``hsm backup|restore`` are backupcli.py's). Also
BACKUP_REMINDER, which ``key create`` prints too.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from typing import Any

from encfs.cliargs import is_remote, open_key_service
from encfs.errors import NoKeyStore, UsageError
from encfs.output import print_json, report, wants_json


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
        print_json(status)
        return 0
    for name in ("module", "library", "token", "slot", "serial", "manufacturer", "model",
                 "state_directory", "token_store", "free_bytes"):
        if name in status:
            print(f"{name:16} {status[name]}")
    for mech, offered in status["mechanisms"].items():
        print(f"{'mechanism':16} {mech}: {'offered' if offered else 'NOT offered'}")
    return 0
