"""``encfs completion bash|zsh`` and ``encfs man``: shell completion and the manual page.

Both are generated from the command's own parser (encfs.cli.build_parser), by maintained
libraries (shtab for completion, argparse-manpage for roff: docs/dev/cli.md), so they never
drift from the options the commands take; nothing here is written by hand.

Invariants:
- The output is a pure function of the parser and the version (the man page's date is
  $SOURCE_DATE_EPOCH's when it is set), so a packager's build is reproducible.
- The libraries are imported only by these two commands: other commands do not pay for them.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from encfs.errors import EncfsError
from encfs.output import print_json, wants_json

SHELLS = ("bash", "zsh")

# Positionals and options that name a directory or a file complete as such (shtab's own
# shtab.DIRECTORY and shtab.FILE, spelt out so building the parser does not import shtab).
_DIRECTORY = {"bash": "_shtab_compgen_dirs", "zsh": "_files -/", "tcsh": "d"}
_FILE = {"bash": "_shtab_compgen_files", "zsh": "_files", "tcsh": "f"}
_DIR_METAVARS = {"CIPHERDIR", "MOUNTPOINT", "CIPHERDIR|MOUNTPOINT", "DIR", "HOME"}
_DIR_DESTS = {"home"}
_FILE_METAVARS = {"FILE", "PATH", "KEYFILE", "VOL", "NEWIMG", "TARGET"}  # VOL: a name or an image path
_FILE_DESTS = {"config", "path", "pin_file", "passphrase_file", "log_file"}

MAN_DESCRIPTION = ("transparent encrypting storage: a key service over a PKCS#11 token, "
                   "encrypted FUSE filesystems and encrypted block volumes")


def _parser() -> argparse.ArgumentParser:
    from encfs.cli import build_parser  # here: encfs.cli registers this module's commands

    return build_parser()


def _walk(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # an alias maps to the same parser
                yield from _walk(sub)


def _mark_paths(parser: argparse.ArgumentParser) -> None:
    """Let shtab complete directories and file names where an argument names one."""
    for p in _walk(parser):
        for action in p._actions:
            metavar = action.metavar if isinstance(action.metavar, str) else None
            if metavar in _DIR_METAVARS or action.dest in _DIR_DESTS:
                action.complete = _DIRECTORY  # type: ignore[attr-defined]
            elif metavar in _FILE_METAVARS or action.dest in _FILE_DESTS:
                action.complete = _FILE  # type: ignore[attr-defined]


def completion_script(shell: str) -> str:
    import shtab

    parser = _parser()
    _mark_paths(parser)
    return str(shtab.complete(parser, shell=shell))


def _man_date() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    try:
        when = (datetime.datetime.fromtimestamp(int(epoch), datetime.UTC) if epoch
                else datetime.datetime.now(datetime.UTC))
    except (ValueError, OverflowError, OSError) as e:
        raise EncfsError(f"SOURCE_DATE_EPOCH={epoch!r} is not a time in seconds: {e}") from None
    return f"{when:%B} {when.day}, {when.year}"  # man(7)'s and mandoc's preferred form


def man_page() -> str:
    from argparse_manpage.manpage import Manpage

    from encfs import __version__

    parser = _parser()
    old = os.environ.get("COLUMNS")
    # One usage line per command: roff fills and breaks it itself. argparse's own wrapping
    # indents continuation lines with spaces, which roff keeps, and a lone long word on such a
    # line cannot be adjusted (a groff -ww warning).
    os.environ["COLUMNS"] = "10000"
    try:
        page = Manpage(parser, _data={"project_name": "encfs", "version": __version__, "manual_title": "encfs manual",
                                      "description": MAN_DESCRIPTION, "date": _man_date()})
        text = str(page)
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    return text + _SEE_ALSO


_SEE_ALSO = """.SH ENVIRONMENT
.TP
\\fBENCFS_HOME\\fR
state directory (default ~/.local/share/encfs)
.TP
\\fBENCFS_DEBUG\\fR
set to 1: an internal error prints its traceback on stderr too (it is always
appended to \\fI<state dir>/log/encfs\\-cli.log\\fR)
.SH SEE ALSO
\\fBmount\\fR(8), \\fBfstab\\fR(5), \\fBmount.fuse3\\fR(8), \\fBfusermount3\\fR(1)
"""


def cmd_completion(args: argparse.Namespace) -> int:
    script = completion_script(args.shell)
    if wants_json(args):  # every command takes --json (docs/dev/cli.md): the script as a string
        print_json({"Shell": args.shell, "Script": script})
    else:
        sys.stdout.write(script)
    return 0


def cmd_man(args: argparse.Namespace) -> int:
    page = man_page()
    if wants_json(args):
        print_json({"Format": "roff", "Section": 1, "Page": page})
    else:
        sys.stdout.write(page)
    return 0


def register(sub: Any, add_hsm_options: Callable[[argparse.ArgumentParser], None]) -> None:
    del add_hsm_options  # neither command reaches the token
    p = sub.add_parser("completion", help="print the shell completion script: "
                       "`source <(encfs completion bash)`, or save it (README)")
    p.add_argument("shell", choices=SHELLS, metavar="{bash,zsh}", help="the shell to complete for")
    p.set_defaults(func=cmd_completion)

    p = sub.add_parser("man", help="print the manual page (roff): `encfs man | man -l -`")
    p.set_defaults(func=cmd_man)
