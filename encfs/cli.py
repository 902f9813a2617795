"""The ``encfs`` command: argument parsing and error reporting.

Invariants:
- A failure prints exactly one line, ``encfs: <cause>``, on stderr and exits non-zero;
  tracebacks appear on stderr only with ENCFS_DEBUG=1.
- An internal error (a bug: exit 70) appends its traceback to ``<state dir>/log/encfs-cli.log``
  (directory 0700, file 0600, the daemons' rule: encfs.daemonlog) and its one line ends
  ``(details: <path>)``, or says why the log could not be written. The log gets the command's
  name, never its arguments, and Python tracebacks show no local variables: no PIN reaches it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NoReturn

from encfs import __version__, fsckcli, helpcli, recoverycli, statuscli
from encfs import rekeycli as rekey_cli
from encfs.block import cli as block_cli
from encfs.block import snapcli as snap_cli
from encfs.cliargs import add_hsm_options, home_of, hsm_options
from encfs.errors import EXIT_CODES, EncfsError
from encfs.fuse import cli as fuse_cli
from encfs.keyd import cli as keyd_cli
from encfs.keyd import secretcli
from encfs.keys import cli as keys_cli
from encfs.keys.config import default_home
from encfs.output import add_json_flag


def cmd_bench(args: argparse.Namespace) -> int:
    """`encfs bench`: run benchmarks/bench.py from the source tree (imported only here)."""
    import importlib.util

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"
    if not script.is_file():
        raise EncfsError(f"the benchmark harness {script} is not here: `encfs bench` runs from a source "
                         f"checkout (pip install -e .)")
    spec = importlib.util.spec_from_file_location("encfs_bench_harness", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return int(module.main(args.bench_args) or 0)


class CommandParser(argparse.ArgumentParser):
    """argparse's parser, with a usage error in one line, as every other failure (exit 2): argparse
    prints the whole usage first, which for `encfs volume attach` is a dozen lines. The usage stays
    one `--help` away, and the line says where."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"encfs: {self.prog.removeprefix('encfs ')}: {message} (see `{self.prog} --help`)\n"
                  if self.prog != "encfs" else f"encfs: {message} (see `encfs --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    codes = "\n".join(f"  {code:3}  {meaning}" for code, meaning in EXIT_CODES.items())
    parser = CommandParser(
        prog="encfs", description=helpcli.MAN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="The token options (--home, --config, --pkcs11-module, --token, --pkcs11-uri, --pin-file,\n"
               "--pin-env, --passphrase-file) and --json may come before the command as well as after it.\n\n"
               f"exit codes:\n{codes}")
    parser.add_argument("--version", action="version", version=f"encfs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    keys_cli.register(sub, add_hsm_options)
    secretcli.add_parser(sub, add_hsm_options)
    fuse_cli.register(sub, add_hsm_options)
    recoverycli.register(sub, add_hsm_options)
    block_cli.register(sub, add_hsm_options)
    snap_cli.register(sub, add_hsm_options)
    rekey_cli.register(sub, add_hsm_options)
    fsckcli.register(sub, add_hsm_options)
    statuscli.register(sub, add_hsm_options)
    helpcli.register(sub, add_hsm_options)
    keyd_cli.register(sub, add_hsm_options)
    bench = sub.add_parser("bench", add_help=False, prefix_chars="\0",
                           help="benchmark encfs against the native directory, a null cipher and peers "
                                "(`encfs bench --help`)")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)
    for path, command in iter_commands(parser):
        if path != ("bench",):  # bench passes its arguments to benchmarks/bench.py untouched
            add_json_flag(command)  # issue #23: every command takes --json (docs/dev/cli.md)
    return parser


def iter_commands(parser: argparse.ArgumentParser,
                  path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every command's parser (``("key", "list")``, ...), depth first, in registration order."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, child in subs[0].choices.items():
        yield from iter_commands(child, (*path, name))


def _mount_helper_argv(argv: list[str], commands: set[str]) -> list[str]:
    """mount(8), through /sbin/mount.fuse.encfs or mount.fuse3 (fstab type ``fuse.encfs``), runs
    ``encfs CIPHERDIR MOUNTPOINT [-sfnv] -o OPTS``: mount(8)'s conventions (-f is fake there)."""
    if len(argv) >= 2 and argv[0] not in commands and not argv[0].startswith("-") \
            and not argv[1].startswith("-"):
        from encfs.fuse.mounthelper import translate_helper_args

        return ["mount", *argv[:2], *translate_helper_args(argv[2:])]
    return argv


# Options every command that has them takes after its (sub)command; given before the command, as
# `encfs --home DIR key list` or `aws --profile P kms ...`, they are moved after it (issue #23).
GLOBAL_OPTIONS = {"--home": True, "--config": True, "--pkcs11-module": True, "--token": True,
                  "--pkcs11-uri": True, "--pin-file": True, "--pin-env": True, "--passphrase-file": True,
                  "--json": False}  # name -> takes a value


def _globals_after_command(argv: list[str]) -> list[str]:
    """Global options before the command moved to the end of the command line (before a ``--``),
    where the command's own parser reads them; one it does not take is refused there as usual."""
    moved: list[str] = []
    i = 0
    while i < len(argv) and argv[i].startswith("--") and argv[i] != "--":
        name, eq, _value = argv[i].partition("=")
        takes_value = GLOBAL_OPTIONS.get(name)
        if takes_value is None:
            break  # --version, --help, or a typo: the top-level parser answers
        if takes_value and not eq:
            if i + 1 >= len(argv):
                break
            moved += argv[i:i + 2]
            i += 2
        else:
            moved.append(argv[i])
            i += 1
    if not moved:
        return argv
    rest = argv[i:]
    end = rest.index("--") if "--" in rest else len(rest)
    return [*rest[:end], *moved, *rest[end:]]


class _WarningFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"encfs: {record.levelname.lower()}: {record.getMessage()}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. With ``argv`` None (a real process) no PIN stays on its command line or
    in its environment: see encfs.keys.pin_handoff, which may re-execute this process."""
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    handler = logging.StreamHandler(sys.stderr)  # warnings of a command: `encfs: warning: ...`
    handler.setFormatter(_WarningFormatter())
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    own_process = argv is None
    argv = _globals_after_command(_mount_helper_argv(list(sys.argv[1:] if argv is None else argv),
                                                     set(subparsers.choices)))
    args = parser.parse_args(argv)
    try:
        if getattr(args, "prepare", None) is not None:
            args.prepare(args)
        # A client of a key daemon reads no PIN; the daemon itself (`encfs keyd`) does (hsm_options).
        if own_process and hasattr(args, "pkcs11_uri") and (hsm := hsm_options(args)).keyd is None:
            from encfs.keys.pin_handoff import scrub

            args.handed_pin = scrub(home_of(args) or default_home(), hsm, sys.argv[1:]).pin
        if os.environ.get(TEST_INTERNAL_ERROR):
            raise RuntimeError(os.environ[TEST_INTERNAL_ERROR])
        return int(args.func(args) or 0)
    except EncfsError as e:
        print(f"encfs: {e.message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("encfs: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if e.filename is None or os.environ.get("ENCFS_DEBUG"):
            return _internal_error(e, args)
        # A file encfs could not use and no code path named: still the file and the cause.
        print(f"encfs: {os.fsdecode(e.filename)}: {e.strerror or e}", file=sys.stderr)
        return 74  # EX_IOERR
    except Exception as e:  # noqa: BLE001 - a bug still gets one line, never a traceback
        return _internal_error(e, args)


# Test-only: set to a message, any command fails with an internal error (RuntimeError) just before
# it runs (after its arguments and PIN handoff), so tests reach _internal_error through the real CLI.
TEST_INTERNAL_ERROR = "ENCFS_TEST_INTERNAL_ERROR"


def _command_name(args: argparse.Namespace) -> str:
    """``key create``: the (sub)command words, never an argument (which may name a secret file)."""
    return " ".join([str(args.command)] + [str(v) for k, v in vars(args).items()  # dest="key_command", ...
                                           if k.endswith("_command") and isinstance(v, str)])


def _log_internal_error(e: Exception, args: argparse.Namespace) -> str:
    """Append the traceback to the CLI's log; the path, or why it could not be written."""
    from datetime import datetime

    from encfs.cliargs import state_dir
    from encfs.daemonlog import default_log_file

    try:
        path = default_log_file(state_dir(args) if hasattr(args, "home") else default_home(), "cli")
    except Exception as le:  # noqa: BLE001 - the state dir itself is part of what may be broken
        return f"not logged: no state directory: {type(le).__name__}: {le}"
    entry = (f"{datetime.now().astimezone():%Y-%m-%d %H:%M:%S%z} encfs-cli[{os.getpid()}] internal error in "
             f"`encfs {_command_name(args)}` (encfs {__version__}):\n{traceback.format_exc()}\n")
    try:
        path.parent.mkdir(mode=0o700, exist_ok=True)  # in an existing state dir only: a typo creates nothing
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, entry.encode("utf-8", "backslashreplace"))
        finally:
            os.close(fd)
    except OSError as le:
        return f"not logged: {os.fsdecode(le.filename) if le.filename else path}: {le.strerror or le}"
    return f"details: {path}"


def _internal_error(e: Exception, args: argparse.Namespace) -> int:
    """A bug: one line that points to its traceback in the log (see the Invariants)."""
    if os.environ.get("ENCFS_DEBUG"):
        traceback.print_exc()
    where = _log_internal_error(e, args)
    message = " ".join(f"{type(e).__name__}: {e}".split())
    print(f"encfs: internal error: {message} ({where})", file=sys.stderr)
    return 70


if __name__ == "__main__":
    sys.exit(main())
