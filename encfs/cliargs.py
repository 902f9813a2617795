"""What every command that reaches the key service takes from its arguments: the state
directory and the token options (``add_hsm_options`` adds them to a command's parser).

The command modules (keys/cli.py, block/cli.py, snapcli.py, rekeycli.py, fuse/cli.py,
fsckcli.py) open their key service here, one way, rather than each its own.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, cast

from encfs.keys.config import HsmOptions, default_home, keyd_options

if TYPE_CHECKING:
    from encfs.keys.service import KeyService


def add_hsm_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("token selection (default: the embedded SoftHSM2 token)")
    g.add_argument("--home", help="state directory (default $ENCFS_HOME or ~/.local/share/encfs)")
    g.add_argument("--config", help="config file (default $ENCFS_HOME/config.toml)")
    g.add_argument("--pkcs11-module", metavar="PATH", help="PKCS#11 module of a real HSM")
    g.add_argument("--token", metavar="LABEL", help="token label on that module")
    g.add_argument("--pkcs11-uri", metavar="URI", help="RFC 7512 pkcs11: URI naming module and token")
    g.add_argument("--pin-file", metavar="FILE", help="read the user PIN from FILE")
    g.add_argument("--pin-env", metavar="VAR", help="read the user PIN from environment variable VAR")
    g.add_argument("--passphrase-file", metavar="FILE",
                   help="passphrase of the embedded token's sealed PINs (default: ask on the terminal)")
    k = parser.add_argument_group("key daemon (instead of a token: `encfs keyd`; or [keyd] in the config)")
    k.add_argument("--keyd", metavar="SOCKET|HOST:PORT",
                   help="ask the key daemon at this Unix socket, or TCP address with mutual TLS")
    k.add_argument("--keyd-ca", metavar="FILE", help="CA certificate that signed the daemon's TLS certificate")
    k.add_argument("--keyd-cert", metavar="FILE", help="this client's TLS certificate")
    k.add_argument("--keyd-key", metavar="FILE", help="this client's TLS private key")


def hsm_options(args: argparse.Namespace) -> HsmOptions:
    """The token options, and the key daemon to ask instead (--keyd, or the config's [keyd]). A
    command that serves the token itself (``serves_token``: `encfs keyd`) asks no daemon, whatever
    its config's [keyd] table names for clients (still checked)."""
    keyd = keyd_options(state_dir(args), args.config, getattr(args, "keyd", None), getattr(args, "keyd_ca", None),
                        getattr(args, "keyd_cert", None), getattr(args, "keyd_key", None))
    if getattr(args, "serves_token", False):
        keyd = None
    return HsmOptions(uri=args.pkcs11_uri, module=args.pkcs11_module, token=args.token,
                      pin_file=args.pin_file, pin_env=args.pin_env, config=args.config,
                      pin=getattr(args, "handed_pin", None), passphrase_file=getattr(args, "passphrase_file", None),
                      keyd=keyd)


def home_of(args: argparse.Namespace) -> Path | None:
    """--home as given (None: the key service's default, $ENCFS_HOME or ~/.local/share/encfs)."""
    return Path(args.home).expanduser().absolute() if args.home else None


def state_dir(args: argparse.Namespace) -> Path:
    """The state directory itself: --home, else the default."""
    return home_of(args) or default_home()


def open_key_service(args: argparse.Namespace, provision: bool = False) -> KeyService:
    """The key service for the home and token the arguments name (a context manager). Only
    `encfs hsm init` passes ``provision``: any other command on a home without the embedded
    token fails with NoKeyStore."""
    return open_service(home_of(args), hsm_options(args), provision=provision)


def open_service(home: Path | None, hsm: HsmOptions, provision: bool = False) -> KeyService:
    """The key service itself (the token), or with ``hsm.keyd`` a RemoteKeyService that asks the
    key daemon: the same methods and errors (encfs.keyd.client), typed as KeyService for its
    callers. A command that needs more than those methods (the token's own state) says so."""
    if hsm.keyd is not None:
        assert not provision, "`encfs hsm init` refuses --keyd before it creates anything"
        from encfs.keyd.client import connect

        return cast("KeyService", connect(hsm.keyd, home))
    from encfs.keys.service import KeyService

    return KeyService.open(home, hsm, provision=provision)


def is_remote(ks: object) -> bool:
    """Whether ``ks`` asks a key daemon (encfs.keyd.client.RemoteKeyService) rather than a token."""
    return bool(getattr(ks, "remote", False))
