"""Which token to use: command line, then config file, then the embedded SoftHSM2.

Config file (``$ENCFS_HOME/config.toml`` or ``--config FILE``)::

    [hsm]
    uri = "pkcs11:token=prod;serial=1234?module-path=/opt/cloudhsm/lib/libcloudhsm_pkcs11.so"
    # or: module = "/path/to/module.so" and token = "LABEL"
    pin-file = "/etc/encfs/hsm.pin"      # or pin-env = "HSM_PIN"; default: prompt

Precedence for every setting: command line > URI > config file. With no
module anywhere, encfs uses its embedded SoftHSM2 token (created by `encfs hsm init` only).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

from encfs.errors import ConfigError, StateError
from encfs.keys.pkcs11_uri import parse_pkcs11_uri
from encfs.keys.softhsm import EmbeddedSoftHSM
from encfs.keys.token import PinSource, TokenSpec


def default_home() -> Path:
    env = os.environ.get("ENCFS_HOME")
    if env:
        return Path(env).expanduser().absolute()
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(base) / "encfs"


@dataclass(frozen=True)
class HsmOptions:
    """Token selection as given on a command line (all optional)."""

    uri: str | None = None
    module: str | None = None
    token: str | None = None
    pin_file: str | None = None
    pin_env: str | None = None
    config: str | None = None
    pin: str | None = field(default=None, repr=False)  # already read (a daemon's parent prompted)
    passphrase_file: str | None = None  # opens the embedded token's sealed PINs (encfs.keys.pinseal)
    keyd: KeydOptions | None = None  # use `encfs keyd` instead of a token (--keyd or [keyd] in the config)


@dataclass(frozen=True)
class KeydOptions:
    """Where a key daemon answers (a Unix socket, or HOST:PORT with mutual TLS and these files)."""

    address: str
    ca: str | None = None
    cert: str | None = None
    key: str | None = None


def check_state_dir(home: Path) -> None:
    """StateError in one line if ``home`` exists but this process cannot use it."""
    try:
        st = os.stat(home)
    except FileNotFoundError:
        return
    except OSError as e:
        raise StateError(f"cannot use state directory {home}: {e.strerror}") from None
    if not os.path.isdir(home):
        raise StateError(f"state directory {home} is not a directory")
    if not os.access(home, os.R_OK | os.W_OK | os.X_OK, effective_ids=True):
        raise StateError(f"state directory {home} (owner {_user(st.st_uid)}, mode {st.st_mode & 0o7777:04o}) is "
                         f"not usable by {_user(os.geteuid())}: give your own with --home or ENCFS_HOME")


def _user(uid: int) -> str:
    import pwd

    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def prepare_state_dir(home: Path) -> None:
    """Create ``home`` (mode 0700) if needed and check that this process can use it."""
    check_state_dir(home)
    try:
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise StateError(f"cannot create state directory {home}: {e.strerror}") from None


def _read_config(home: Path, explicit: str | None) -> dict[str, object]:
    path = Path(explicit) if explicit else home / "config.toml"
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file not found: {path}") from None
        return {}
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    hsm = data.get("hsm", {})
    if not isinstance(hsm, dict):
        raise ConfigError(f"config file {path}: [hsm] must be a table")
    unknown = set(hsm) - {"uri", "module", "token", "pin-file", "pin-env"}
    if unknown:
        raise ConfigError(f"config file {path}: unknown [hsm] setting {min(unknown)!r}")
    return hsm


_KEYD_SETTINGS = {"address", "ca", "cert", "key"}


def keyd_options(home: Path, config: str | None, address: str | None, ca: str | None = None,
                 cert: str | None = None, key: str | None = None) -> KeydOptions | None:
    """The key daemon to use: --keyd (and its TLS files) first, then the config file's ``[keyd]``
    table (``address = "/run/encfs/keyd.sock"`` or ``"host:7300"``, ``ca``, ``cert``, ``key``);
    None: no daemon, the token directly."""
    conf: dict[str, object] = {}
    path = Path(config) if config else home / "config.toml"
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f).get("keyd", {})
    except (FileNotFoundError, tomllib.TOMLDecodeError, OSError):
        table = {}  # reported by _read_config when the token is used; a daemon needs only --keyd
    if isinstance(table, dict):
        unknown = set(table) - _KEYD_SETTINGS
        if unknown:
            raise ConfigError(f"config file {path}: unknown [keyd] setting {min(unknown)!r}")
        conf = table
    found = address or conf.get("address")
    if not found:
        return None
    if not isinstance(found, str):
        raise ConfigError(f"config file {path}: [keyd] address must be a string")

    def pick(given: str | None, name: str) -> str | None:
        value = given or conf.get(name)
        return str(value) if value else None

    return KeydOptions(found, pick(ca, "ca"), pick(cert, "cert"), pick(key, "key"))


def resolve_token(home: Path, opts: HsmOptions) -> tuple[TokenSpec, EmbeddedSoftHSM | None]:
    """Return the token to use and, for the embedded default, its provisioner."""
    check_state_dir(home)
    conf = _read_config(home, opts.config)
    uri_text = opts.uri or conf.get("uri")
    uri = parse_pkcs11_uri(str(uri_text)) if uri_text else None
    module = opts.module or (uri.module_path if uri else None) or conf.get("module")
    if not module:
        if opts.token or opts.pin_file or opts.pin_env or uri:
            raise ConfigError("--token, --pin-file, --pin-env and pkcs11 URIs need a PKCS#11 module "
                              "(--pkcs11-module or module-path in the URI)")
        embedded = EmbeddedSoftHSM(home)
        return embedded.spec(opts.pin, opts.passphrase_file), embedded
    if opts.passphrase_file:
        raise ConfigError("--passphrase-file opens the embedded token's sealed PINs; "
                          "a PKCS#11 module takes --pin-file")
    label = opts.token or (uri.token if uri else None) or conf.get("token")
    if opts.pin is not None:
        pin = PinSource("value", opts.pin)
    elif opts.pin_file:
        pin = PinSource("file", opts.pin_file)
    elif opts.pin_env:
        pin = PinSource("env", opts.pin_env)
    elif uri and uri.pin_value is not None:
        pin = PinSource("value", uri.pin_value)
    elif uri and uri.pin_source:
        src = uri.pin_source
        # RFC 7512: pin-source is a URI; a bare path means a file.
        is_spec = src.startswith(("file:", "env:")) or src == "prompt"
        pin = PinSource.parse(src) if is_spec else PinSource("file", src)
    elif conf.get("pin-file"):
        pin = PinSource("file", str(conf["pin-file"]))
    elif conf.get("pin-env"):
        pin = PinSource("env", str(conf["pin-env"]))
    else:
        pin = PinSource("prompt")
    return TokenSpec(
        module=str(module),
        label=str(label) if label else None,
        pin=pin,
        serial=uri.serial if uri else None,
        slot_id=uri.slot_id if uri else None,
    ), None


def prompt_before_fork(home: Path, opts: HsmOptions) -> HsmOptions:
    """Ask for the PIN (or the passphrase of the embedded token's sealed PINs) now if the token
    needs one: a daemon has no terminal after fork. The daemon gets the PIN in ``pin``, in the
    memory it inherits, and never asks again. With a key daemon there is no PIN to ask."""
    if opts.keyd is not None:
        return opts
    spec, embedded = resolve_token(home, opts)
    if (embedded is None and spec.pin.kind == "prompt") or spec.pin.kind == "sealed":
        return replace(opts, pin=spec.pin.resolve(spec.label or "the token"))
    return opts
