"""Operations tooling of the `encfs` CLI (issue #23): shell completion and the man page generated
from the parser, an internal error's log, and `install-mount-helper` next to files it did not write.

Every test drives the real CLI in a subprocess; the shells, groff and mandoc are the real ones
(quickstart.sh installs zsh and mandoc).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from conftest import run_encfs


def ok(*args: str, home: Path, env: dict[str, str] | None = None) -> str:
    proc = run_encfs(*args, home=home, env=env)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout.decode()


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed: bash quickstart.sh installs it"
    return path


# -- completion -------------------------------------------------------------------------------

def _bash_complete(script: Path, *words: str) -> list[str]:
    """What bash's completion function offers for the command line ``words`` (the last one is
    being completed), exactly as readline would call it."""
    line = " ".join(words)
    program = (f'source {script}\n'
               f'COMP_WORDS=({" ".join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}\n'
               f'COMP_LINE={line!r}; COMP_POINT={len(line)}\n'
               f'_shtab_encfs encfs {words[-1]!r} {words[-2]!r}\n'
               'printf "%s\\n" "${COMPREPLY[@]}"\n')
    proc = subprocess.run([tool("bash"), "--norc", "--noprofile", "-c", program], capture_output=True,
                          text=True, timeout=30, cwd="/")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_bash_completion_names_commands_and_nested_options(tmp_path: Path) -> None:
    script = tmp_path / "encfs.bash"
    script.write_text(ok("completion", "bash", home=tmp_path / "home"))
    proc = subprocess.run([tool("bash"), "--norc", "--noprofile", "-c", f"source {script}; complete -p encfs"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout.strip().endswith(" encfs"), (proc.stdout, proc.stderr)
    assert "-F _shtab_encfs" in proc.stdout

    assert {"key", "volume", "mount", "completion", "man"} <= set(_bash_complete(script, "encfs", ""))
    assert _bash_complete(script, "encfs", "vol") == ["volume"]
    assert _bash_complete(script, "encfs", "key", "create", "--al") == ["--alias"]
    assert {"--read-only", "--name", "--log-file"} <= set(_bash_complete(script, "encfs", "volume", "attach", "--"))
    assert _bash_complete(script, "encfs", "key", "create", "--origin", "") == ["token", "external"]
    # a CIPHERDIR completes as a directory
    (tmp_path / "cipher-dir").mkdir()
    (tmp_path / "cipher-file").write_text("")
    assert _bash_complete(script, "encfs", "mount", f"{tmp_path}/cipher-") == [f"{tmp_path}/cipher-dir"]


def test_zsh_completion_is_valid_zsh_with_nested_options(tmp_path: Path) -> None:
    text = ok("completion", "zsh", home=tmp_path / "home")
    assert text.startswith("#compdef encfs")
    script = tmp_path / "_encfs"
    script.write_text(text)
    proc = subprocess.run([tool("zsh"), "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "_shtab_encfs_key_create" in text and "--alias" in text
    assert "_shtab_encfs_volume_attach" in text and "--read-only" in text
    # `eval "$(encfs completion zsh)"` (README) registers it with zsh's completion system
    proc = subprocess.run([tool("zsh"), "-f", "-c", f'autoload -Uz compinit && compinit -u -D && eval "$(<{script})" '
                           "&& print -r -- ${_comps[encfs]}"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout.strip() == "_shtab_encfs", (proc.stdout, proc.stderr)


# -- man page ---------------------------------------------------------------------------------

def test_man_page_is_clean_roff_naming_nested_commands(tmp_path: Path) -> None:
    page = tmp_path / "encfs.1"
    page.write_text(ok("man", home=tmp_path / "home", env={"SOURCE_DATE_EPOCH": "1764892800"}))
    text = page.read_text()
    assert text.startswith('.TH ENCFS "1" "December 5, 2025" "encfs ')
    for needle in ("encfs key create", "\\-\\-alias", "encfs volume attach", "\\-\\-read\\-only",
                   "encfs install\\-mount\\-helper", "ENCFS_HOME"):
        assert needle in text, needle
    groff = subprocess.run([tool("groff"), "-man", "-Tutf8", "-ww", "-z", str(page)], capture_output=True,
                           text=True, timeout=60, env=dict(os.environ, LC_ALL="C.UTF-8"))
    assert groff.returncode == 0 and groff.stderr == "", groff.stderr
    lint = subprocess.run([tool("mandoc"), "-T", "lint", "-W", "warning", str(page)], capture_output=True,
                          text=True, timeout=60)
    assert lint.returncode == 0 and lint.stdout + lint.stderr == "", lint.stdout + lint.stderr
    rendered = subprocess.run([tool("man"), "-l", str(page)], capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, MANPAGER="cat", PAGER="cat", MANWIDTH="100"))
    assert rendered.returncode == 0 and "encfs volume attach" in rendered.stdout, rendered.stderr


def test_bad_source_date_epoch_is_one_line(tmp_path: Path) -> None:
    proc = run_encfs("man", home=tmp_path / "home", env={"SOURCE_DATE_EPOCH": "soon"})
    err = proc.stderr.decode()
    assert proc.returncode == 1 and err.count("\n") == 1 and err.startswith("encfs: SOURCE_DATE_EPOCH="), err


# -- internal errors ----------------------------------------------------------------------------

BUG = {"ENCFS_TEST_INTERNAL_ERROR": "injected bug\nsecond line"}  # test-only hook (encfs/cli.py)


def internal_error_line(proc: subprocess.CompletedProcess[bytes]) -> str:
    err = proc.stderr.decode()
    assert proc.returncode == 70, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("encfs: internal error: RuntimeError: injected bug second line ("), err
    return err.strip()


def test_internal_error_is_one_line_pointing_to_its_traceback(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    pin = "pin-4711-never-logged"
    proc = run_encfs("key", "list", "--pin-env", "THE_PIN", home=home, env={**BUG, "THE_PIN": pin})
    log = home / "log" / "encfs-cli.log"
    assert internal_error_line(proc).endswith(f"(details: {log})")
    assert (log.parent.stat().st_mode & 0o777, log.stat().st_mode & 0o777) == (0o700, 0o600)
    text = log.read_text()
    assert "internal error in `encfs key list`" in text and "Traceback (most recent call last):" in text
    assert text.rstrip().endswith("RuntimeError: injected bug\nsecond line"), text
    assert pin not in text and "THE_PIN" not in text  # neither the PIN nor the arguments
    # the next one is appended, with --home naming the state directory
    other = tmp_path / "other-home"
    typo = run_encfs("key", "aliases", "--home", str(other), home=home, env=BUG)
    assert internal_error_line(typo).endswith(f"(not logged: {other / 'log'}: No such file or directory)")
    assert not other.exists(), "a mistyped --home was created"
    other.mkdir()
    proc = run_encfs("key", "aliases", "--home", str(other), home=home, env=BUG)
    assert internal_error_line(proc).endswith(f"(details: {other / 'log' / 'encfs-cli.log'})")
    assert "`encfs key aliases`" in (other / "log" / "encfs-cli.log").read_text()
    assert log.read_text() == text


def test_internal_error_says_when_its_log_cannot_be_written(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "log").write_text("not a directory")
    line = internal_error_line(run_encfs("man", home=home, env=BUG))
    assert line.endswith(f"(not logged: {home / 'log'}: File exists)"), line
    assert (home / "log").read_text() == "not a directory"


def test_internal_error_with_encfs_debug_prints_the_traceback_too(tmp_path: Path) -> None:
    (tmp_path / "home").mkdir()
    proc = run_encfs("man", home=tmp_path / "home", env={**BUG, "ENCFS_DEBUG": "1"})
    err = proc.stderr.decode()
    assert proc.returncode == 70 and err.startswith("Traceback (most recent call last):"), err
    assert err.splitlines()[-1].endswith(f"(details: {tmp_path / 'home' / 'log' / 'encfs-cli.log'})")


# -- install-mount-helper next to another package's files -------------------------------------------

MARKER = "# installed by `encfs install-mount-helper`"


def test_install_mount_helper_keeps_a_helper_it_did_not_install(tmp_path: Path) -> None:
    home = tmp_path / "home"
    helper = tmp_path / "mount.fuse.encfs"
    foreign = b"#!/bin/sh\n# a legacy EncFS setup's helper\nexec /usr/bin/encfs \"$@\"\n"
    helper.write_bytes(foreign)
    helper.chmod(0o700)
    proc = run_encfs("install-mount-helper", "--path", str(helper), home=home)
    err = proc.stderr.decode()
    assert proc.returncode == 75 and err.count("\n") == 1, err
    assert err.startswith(f"encfs: {helper} exists and was not installed by encfs") and "--force" in err, err
    assert helper.read_bytes() == foreign and helper.stat().st_mode & 0o777 == 0o700
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mount.fuse.encfs"]  # no temporary file left

    # its own is replaced (an older one: another python); --force replaces a foreign one
    helper.write_text(f"#!/bin/sh\n{MARKER}\nexec /old/python -m encfs \"$@\"\n")
    ok("install-mount-helper", "--path", str(helper), home=home)
    assert helper.read_text().splitlines()[1] == MARKER and "/old/python" not in helper.read_text()
    helper.write_bytes(foreign)
    ok("install-mount-helper", "--force", "--path", str(helper), home=home)
    assert helper.read_text().splitlines()[1] == MARKER and helper.stat().st_mode & 0o777 == 0o755

    directory = tmp_path / "dir"
    directory.mkdir()
    proc = run_encfs("install-mount-helper", "--path", str(directory), home=home)
    assert proc.returncode == 75 and proc.stderr.decode() == f"encfs: {directory} is a directory: not replaced\n"


def test_the_mount_helper_never_runs_an_encfs_planted_in_the_current_directory(tmp_path: Path) -> None:
    """mount(8) runs the helper as root from root's current directory: a package named encfs there
    (a user's /tmp/encfs/) must not be what runs (`python -m` would import it first without -P)."""
    helper = tmp_path / "mount.fuse.encfs"
    ok("install-mount-helper", "--path", str(helper), home=tmp_path / "home")
    cwd = tmp_path / "cwd"
    (cwd / "encfs").mkdir(parents=True)
    (cwd / "encfs" / "__init__.py").write_text("")
    (cwd / "encfs" / "__main__.py").write_text("open('PLANTED-RAN', 'w').close()\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    proc = subprocess.run([str(helper), "--version"], cwd=cwd, env=env, capture_output=True, timeout=60)
    assert not (cwd / "PLANTED-RAN").exists(), "the planted package ran"
    assert proc.returncode == 0 and proc.stdout.startswith(b"encfs "), proc.stdout + proc.stderr


def test_a_usage_error_is_one_line_that_names_the_help(tmp_path: Path) -> None:
    for argv, start in ((["volume", "create", "x"], "encfs: volume create: the following arguments are required"),
                        (["no-such-command"], "encfs: argument COMMAND: invalid choice: 'no-such-command'")):
        proc = run_encfs(*argv, home=tmp_path / "home")
        err = proc.stderr.decode()
        assert proc.returncode == 2 and err.count("\n") == 1 and err.startswith(start), err
        assert err.rstrip().endswith(f"(see `encfs{' volume create' if len(argv) == 3 else ''} --help`)"), err
