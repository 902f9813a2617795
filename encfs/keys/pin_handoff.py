"""Taking PINs off the command line and out of the environment (docs/dev/secrets.md).

A PIN given as ``pin-value`` in a pkcs11 URI on the command line is readable by every
local user in /proc/PID/cmdline; a PIN in an environment variable (``--pin-env``,
``pin-source=env:VAR``, ``pin-env`` in the config file) is inherited by every child and
stays in /proc/PID/environ of this process and of every daemon forked from it. Python
cannot change what the kernel shows for either (``os.environ.pop`` leaves the initial
environment block in place, and argv lives in memory CPython has already copied), so the
CLI re-executes itself once, before it does anything else: same interpreter, same
arguments except the URI's ``pin-value``, same environment except the PIN variables, and
the PIN on a pipe whose read end ENCFS_PIN_FD names. The new process reads the PIN, closes
the pipe and drops ENCFS_PIN_FD before any command runs.

Invariants:
- after ``scrub`` returns (in the re-executed process, or at once when there was nothing
  to take), no argument holds a ``pin-value`` and no PIN variable is in the environment,
  so neither the daemons forked later nor any child (sealing worker, fusermount3,
  losetup, SoftHSM2 provisioning) can show one;
- the PIN crosses the exec only through the pipe; the re-executed process resolves the
  token exactly as the first one did (``HsmOptions.pin`` takes the place of the source it
  came from, which had the highest precedence left).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from encfs.errors import EncfsError, UsageError
from encfs.keys.config import HsmOptions, resolve_token
from encfs.keys.pkcs11_uri import has_pin_value, without_pin_value

PIN_FD_ENV = "ENCFS_PIN_FD"
_ENCODING = ("utf-8", "surrogateescape")  # how os.environ and argv map bytes to str


def take_handed_pin() -> str | None:
    """The PIN a re-execution handed over (read to the end, pipe closed), or None."""
    text = os.environ.pop(PIN_FD_ENV, None)
    if text is None:
        return None
    try:
        fd = int(text)
        chunks = []
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
        os.close(fd)
    except (ValueError, OSError):
        raise UsageError(f"{PIN_FD_ENV}={text!r} does not name a readable descriptor") from None
    return b"".join(chunks).decode(*_ENCODING)


def _interpreter_argv() -> list[str]:
    """How this process was started, up to the arguments encfs parses: the same interpreter,
    its options and the script or ``-m encfs`` (so that ps and pgrep see the same command)."""
    tail = len(sys.argv) - 1
    orig = list(getattr(sys, "orig_argv", []))
    if orig and tail >= 0 and len(orig) > tail and orig[len(orig) - tail:] == sys.argv[1:]:
        return [sys.executable, *orig[1:len(orig) - tail]]
    return [sys.executable, "-P", "-m", "encfs"]  # -P: never the current directory's "encfs"


def _scrub_argv(argv: Sequence[str], uri: str) -> list[str]:
    """``argv`` with the URI, as an argument of its own or as ``--opt=URI``, without its pin-value."""
    clean = without_pin_value(uri)
    out = []
    for arg in argv:
        if arg == uri:
            arg = clean
        elif arg.startswith("--") and arg.endswith("=" + uri):
            arg = arg[: len(arg) - len(uri)] + clean
        out.append(arg)
    if any("pkcs11:" in a and has_pin_value(a) for a in out):  # e.g. an abbreviation of the option
        raise UsageError("cannot take the PIN off the command line: give the pkcs11 URI as one argument "
                         "(better: --pin-file or pin-source=file:PATH)")
    return out


def scrub(home: Path, opts: HsmOptions, argv: Sequence[str]) -> HsmOptions:
    """Make sure no PIN stays in this process's argv or environment; return the options to use.

    ``argv`` are the arguments encfs parses (sys.argv[1:]). Re-executes this process (and
    does not return) when the URI on the command line holds a PIN or a PIN variable is set;
    in the re-executed process, returns ``opts`` with the handed-over PIN.
    """
    handed = take_handed_pin()
    if handed is not None:
        return replace(opts, pin=handed)
    uri_pin = opts.uri is not None and has_pin_value(opts.uri)
    names = {opts.pin_env} if opts.pin_env else set()
    try:
        spec, _embedded = resolve_token(home, opts)
    except EncfsError:
        spec = None  # the command reports it; a failing command ends soon with its arguments
    pin = None
    if spec is not None and spec.pin.kind in ("env", "value"):
        if spec.pin.kind == "env":
            names.add(spec.pin.where)
        pin = spec.pin.resolve(spec.label or "the token")  # an unset variable is reported now
    names = {n for n in names if n in os.environ}
    if not uri_pin and not names:
        return opts
    args = _scrub_argv(argv, opts.uri) if uri_pin and opts.uri is not None else list(argv)
    env = {k: v for k, v in os.environ.items() if k not in names and k != PIN_FD_ENV}
    fds = []
    if pin is not None:
        rfd, wfd = os.pipe()  # a PIN fits the pipe's buffer: write it all, then exec
        try:
            os.write(wfd, pin.encode(*_ENCODING))
        finally:
            os.close(wfd)
        os.set_inheritable(rfd, True)
        env[PIN_FD_ENV] = str(rfd)
        fds.append(rfd)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [*_interpreter_argv(), *args], env)
    except OSError as e:
        for fd in fds:
            os.close(fd)
        raise EncfsError(f"cannot re-execute {sys.executable} to take the PIN off the command line and out "
                         f"of the environment: {e.strerror}") from None
    raise AssertionError("unreachable")  # pragma: no cover
