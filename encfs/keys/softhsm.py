"""The embedded default token: a private SoftHSM2 store under ``$ENCFS_HOME``.

Layout of ``$ENCFS_HOME/softhsm/``: ``softhsm2.conf`` (written last, so its
presence means provisioning finished), ``tokens/`` (SoftHSM2's object store),
``token-copies/`` (the last finished state of each of its files: tokenguard.py),
``user.pin`` and ``so.pin`` (mode 0600, random), or instead of those two
``pins.sealed`` (both PINs sealed under a passphrase: encfs.keys.pinseal).
Provisioning runs C_InitToken in a child process so that this process loads
SoftHSM2 only once the token exists and no PIN ever appears on a command line.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

from encfs.atomicfile import write_atomic
from encfs.errors import ConfigError, ModuleNotFound, StateError, TokenError, UsageError
from encfs.keys import pinseal
from encfs.keys.token import PinSource, TokenSpec
from encfs.keys.tokenguard import TokenFileCopies

TOKEN_LABEL = "encfs"
MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)


def softhsm_module() -> str:
    """Path of the installed SoftHSM2 module; ModuleNotFound if none."""
    for path in MODULE_CANDIDATES:
        if os.path.exists(path):
            return path
    raise ModuleNotFound("SoftHSM2 is not installed (libsofthsm2.so not found): apt-get install softhsm2")


def _write_private(path: Path, data: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def conf_text(tokendir: Path) -> str:
    """softhsm2.conf for the token in ``tokendir`` (absolute: SoftHSM2 resolves no relative paths)."""
    return ("# encfs embedded token; written by `encfs hsm init`\n"
            f"directories.tokendir = {tokendir}\n"
            "objectstore.backend = file\n"
            "log.level = ERROR\n"
            "slots.removable = false\n")


class EmbeddedSoftHSM:
    """The SoftHSM2 token that encfs provisions for itself."""

    def __init__(self, home: Path) -> None:
        self.dir = home / "softhsm"
        self.conf = self.dir / "softhsm2.conf"
        self.tokendir = self.dir / "tokens"
        self.user_pin = self.dir / "user.pin"
        self.so_pin = self.dir / "so.pin"
        self.sealed_pins = self.dir / "pins.sealed"
        self.copies = TokenFileCopies(self.tokendir, self.dir / "token-copies")

    @property
    def provisioned(self) -> bool:
        try:
            os.stat(self.conf)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise StateError(f"cannot use the embedded token in {self.dir}: {e.strerror}") from None
        return True

    def check_conf(self) -> None:
        """StateError in one line if softhsm2.conf cannot work: SoftHSM2 itself ignores lines it
        does not understand (then finds no token in its default directory) and fails to load,
        with no reason given, when the token directory is missing."""
        try:
            text = self.conf.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise StateError(f"cannot read the SoftHSM2 config {self.conf}: "
                             f"{getattr(e, 'strerror', None) or 'not UTF-8 text'}") from None
        settings = {}
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, eq, value = line.partition("=")
            if not eq or not name.strip():
                raise StateError(f"SoftHSM2 config {self.conf} is damaged: line {number} is not 'name = value'")
            settings[name.strip()] = value.strip()
        tokendir = settings.get("directories.tokendir")
        if not tokendir:
            raise StateError(f"SoftHSM2 config {self.conf} is damaged: it names no token directory "
                             f"(expected 'directories.tokendir = {self.tokendir}')")
        if not os.path.isdir(tokendir):
            raise StateError(f"SoftHSM2 config {self.conf} names token directory {tokendir}, which does not exist")
        if not os.access(tokendir, os.R_OK | os.W_OK | os.X_OK, effective_ids=True):
            raise StateError(f"SoftHSM2 config {self.conf} names token directory {tokendir}, which uid "
                             f"{os.geteuid()} cannot use")

    def spec(self, pin: str | None = None, passphrase_file: str | None = None) -> TokenSpec:
        """How to log in: ``pin`` if given (already unsealed, e.g. by a daemon's parent), else
        the sealed PINs if there are any (asking for the passphrase), else ``user.pin``."""
        if pin is not None:
            source = PinSource("value", pin)
        elif self.protected:
            source = PinSource("sealed", str(self.sealed_pins), passphrase_file)
        else:
            source = PinSource("file", str(self.user_pin))
        return TokenSpec(module=softhsm_module(), label=TOKEN_LABEL, pin=source, store_copies=self.copies)

    @property
    def protected(self) -> bool:
        """Whether the PINs are sealed under a passphrase (pins.sealed exists)."""
        return self.sealed_pins.exists()

    def _plain_pins(self) -> dict[str, str]:
        try:
            return {"so": self.so_pin.read_text(encoding="utf-8").strip("\r\n"),
                    "user": self.user_pin.read_text(encoding="utf-8").strip("\r\n")}
        except (OSError, UnicodeDecodeError) as e:
            raise StateError(f"cannot read the PIN files in {self.dir}: "
                             f"{getattr(e, 'strerror', None) or 'not UTF-8 text'}") from None

    def unseal(self, passphrase: str) -> dict[str, str]:
        try:
            data = self.sealed_pins.read_bytes()
        except OSError as e:
            raise StateError(f"cannot read {self.sealed_pins}: {e.strerror}") from None
        return pinseal.unseal(data, passphrase, self.sealed_pins)

    def protect(self, passphrase: str, old_passphrase: str | None = None) -> None:
        """Seal the PINs under ``passphrase`` and remove the plain PIN files; with the PINs
        already sealed, re-seal them (``old_passphrase`` opens them first)."""
        if self.protected:
            if old_passphrase is None:
                raise UsageError("the PINs are sealed already: give the current passphrase to change it")
            pins = self.unseal(old_passphrase)
        else:
            pins = self._plain_pins()
        write_atomic(self.sealed_pins, pinseal.seal(pins, passphrase), 0o600, sync_dir=True)
        for path in (self.user_pin, self.so_pin):  # a file system may keep the old blocks: see secrets.md
            path.unlink(missing_ok=True)

    def unprotect(self, passphrase: str) -> None:
        """Write the PINs back to user.pin and so.pin (mode 0600) and remove the sealed file."""
        if not self.protected:
            raise UsageError(f"the PINs in {self.dir} are not sealed under a passphrase")
        pins = self.unseal(passphrase)
        write_atomic(self.so_pin, pins["so"].encode(), 0o600, sync_dir=True)
        write_atomic(self.user_pin, pins["user"].encode(), 0o600, sync_dir=True)
        self.sealed_pins.unlink()

    def activate(self) -> None:
        """Point this process's SoftHSM2 at our config (before it is loaded), once it is checked."""
        self.check_conf()
        current = os.environ.get("SOFTHSM2_CONF")
        from encfs.keys import token as token_mod

        loaded = any("softhsm" in path for path in token_mod._LIBS)
        if loaded and current != str(self.conf):
            raise ConfigError(
                f"SoftHSM2 is already loaded in this process with {current}; "
                f"cannot switch to {self.conf}"
            )
        os.environ["SOFTHSM2_CONF"] = str(self.conf)

    def provision(self) -> bool:
        """Create the token if it does not exist; return True if it was created."""
        if self.provisioned:
            return False
        module = softhsm_module()
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)
        # Leftovers of an interrupted provisioning are ours to replace.
        shutil.rmtree(self.tokendir, ignore_errors=True)
        shutil.rmtree(self.copies.copydir, ignore_errors=True)
        for p in (self.user_pin, self.so_pin, self.sealed_pins):
            p.unlink(missing_ok=True)
        tmp_conf = self.dir / "softhsm2.conf.tmp"
        try:
            self.tokendir.mkdir(mode=0o700)
            _write_private(self.user_pin, secrets.token_urlsafe(24))
            _write_private(self.so_pin, secrets.token_urlsafe(24))
            tmp_conf.unlink(missing_ok=True)
            _write_private(tmp_conf, conf_text(self.tokendir))
            pkg_root = str(Path(__file__).resolve().parents[2])
            pythonpath = os.pathsep.join(filter(None, [pkg_root, os.environ.get("PYTHONPATH")]))
            env = dict(os.environ, SOFTHSM2_CONF=str(tmp_conf), PYTHONPATH=pythonpath)
            proc = subprocess.run(
                [sys.executable, "-P", "-m", "encfs.keys.softhsm_init", module, TOKEN_LABEL],
                input=f"{self.so_pin.read_text()}\n{self.user_pin.read_text()}\n",
                env=env, capture_output=True, text=True, timeout=60, check=False,
            )
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
                raise TokenError(f"cannot initialise the SoftHSM2 token: {last}")
            os.replace(tmp_conf, self.conf)
        except BaseException:
            shutil.rmtree(self.tokendir, ignore_errors=True)
            for p in (self.user_pin, self.so_pin, tmp_conf):
                p.unlink(missing_ok=True)
            raise
        return True
