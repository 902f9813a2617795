"""Unix users created for a test, and commands run as them: the key daemon's clients must be other
users than the daemon's (its principals are uids and groups read with SO_PEERCRED).

`unix_users` (a fixture: import `unix_users_fixture`) creates system users named ``encfs-t-<random>``, without a home, each with
its own group or a shared one, and removes them, their groups and any process left running as them
when the test ends, passed or failed. A run killed before that leaves users behind; each one's
comment names the pid that created it, and the next run removes those whose creator is gone.

`run_as(user, argv, env)` runs a command as the user (setpriv: real and effective uid and gid,
the user's supplementary groups, nothing else). `user_python` gives an interpreter and a PYTHONPATH
that such a user can read, so `python -m encfs` as the user runs this checkout's encfs.
"""

from __future__ import annotations

import grp
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import pytest

PREFIX = "encfs-t-"
_COMMENT = "encfs test user, pid "  # + the creating process's pid (the stale-user sweep reads it)
NOBODY = 65534


class UnixUser(NamedTuple):
    name: str
    uid: int
    gid: int  # primary group: the user's own, or the shared group it was created in


class UnixGroup(NamedTuple):
    name: str
    gid: int


class UnixUsers:
    """Creates users and groups for one test; `remove_all` undoes everything it created."""

    def __init__(self) -> None:
        self.users: list[UnixUser] = []
        self.groups: list[UnixGroup] = []

    def group(self) -> UnixGroup:
        name = _fresh_name()
        _admin(["groupadd", "--system", name])
        group = UnixGroup(name, grp.getgrnam(name).gr_gid)
        self.groups.append(group)
        return group

    def create(self, group: UnixGroup | None = None, supplementary: Sequence[UnixGroup] = ()) -> UnixUser:
        """A user whose primary group is ``group`` (default: a new group of its own name), also in
        ``supplementary``."""
        name = _fresh_name()
        argv = ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell",
                "/usr/sbin/nologin", "--comment", f"{_COMMENT}{os.getpid()}"]
        argv += ["--gid", group.name] if group else ["--user-group"]
        if supplementary:
            argv += ["--groups", ",".join(g.name for g in supplementary)]
        _admin([*argv, name])
        pw = pwd.getpwnam(name)
        user = UnixUser(name, pw.pw_uid, pw.pw_gid)
        self.users.append(user)
        return user

    def remove_all(self) -> None:
        errors = []
        for user in reversed(self.users):
            try:
                _remove_user(user.name, user.uid)
            except subprocess.CalledProcessError as e:
                errors.append(f"{user.name}: {e.stderr}")
        for group in reversed(self.groups):
            if _exists(grp.getgrnam, group.name):
                _admin(["groupdel", group.name])
        self.users.clear()
        self.groups.clear()
        assert not errors, errors


@contextmanager
def temporary_users() -> Iterator[UnixUsers]:
    """UnixUsers for the block's duration, removed however it ends."""
    if os.geteuid() != 0:
        pytest.skip("creating users needs root")
    remove_stale_users()
    users = UnixUsers()
    try:
        yield users
    finally:
        users.remove_all()


@pytest.fixture(name="unix_users")
def unix_users_fixture() -> Iterator[UnixUsers]:
    """Import this into a test module (``from keyd_users import unix_users_fixture  # noqa: F401``)
    and ask for ``unix_users``."""
    with temporary_users() as users:
        yield users


def remove_stale_users() -> None:
    """Users (and their groups) left by a test process that no longer exists."""
    for pw in pwd.getpwall():
        if not pw.pw_name.startswith(PREFIX) or not pw.pw_gecos.startswith(_COMMENT):
            continue
        creator = int(pw.pw_gecos[len(_COMMENT):] or 0)
        if creator > 0 and not Path(f"/proc/{creator}").exists():
            _remove_user(pw.pw_name, pw.pw_uid)


def as_user(user: UnixUser) -> list[str]:
    """The argv prefix that runs a command as ``user`` (for Popen)."""
    return ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups", "--"]


def run_as(user: UnixUser, argv: Sequence[str], env: Mapping[str, str] | None = None,
           **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as ``user``; output captured as text, 120 s at most unless told."""
    kwargs.setdefault("timeout", 120)
    kwargs.setdefault("text", True)
    return subprocess.run([*as_user(user), *argv], env=None if env is None else dict(env), check=False,
                          capture_output=True, **kwargs)


class UserPython(NamedTuple):
    executable: str
    pythonpath: str

    def env(self, base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
        """``base`` (default os.environ) with this PYTHONPATH; SOFTHSM2_CONF dropped, since the
        in-process tests' token is root's."""
        out = dict(os.environ if base is None else base, PYTHONPATH=self.pythonpath, **extra)
        out.pop("SOFTHSM2_CONF", None)
        return out


@pytest.fixture(scope="session", name="user_python")
def user_python_fixture() -> Iterator[UserPython]:
    """An interpreter and PYTHONPATH any uid can use: this checkout and the venv's packages if
    they are readable by all, else a world-readable copy (removed at the end of the session)."""
    nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    # The venv's may sit under a private /root. Probe a child too: a mount re-executes
    # sys.executable (its seal worker), which can fail where the first exec did not.
    spawn = "import subprocess, sys; subprocess.run([sys.executable, '-c', ''], check=True)"
    for python in (sys.executable, "/usr/bin/python3"):
        if subprocess.run([*nobody, python, "-c", spawn], capture_output=True, check=False).returncode == 0:
            break
    else:
        pytest.fail("no Python interpreter is executable by other users")
    repo, site = str(Path(__file__).resolve().parents[1]), sysconfig.get_paths()["purelib"]
    copy: Path | None = None
    probe = subprocess.run([*nobody, python, "-c", "import encfs.keyd.principal, cryptography, trio"],
                           env=UserPython(python, f"{repo}:{site}").env(), capture_output=True, check=False)
    if probe.returncode != 0:  # the checkout or the venv is private to root: give everyone a copy
        copy = Path(tempfile.mkdtemp(prefix="encfs-users-", dir="/tmp"))
        copy.chmod(0o755)
        shutil.copytree(site, copy / "site", symlinks=True)
        shutil.copytree(Path(repo) / "encfs", copy / "src" / "encfs")
        repo, site = str(copy / "src"), str(copy / "site")
    try:
        yield UserPython(python, f"{repo}:{site}")
    finally:
        if copy is not None:
            shutil.rmtree(copy, ignore_errors=True)


def _fresh_name() -> str:
    return PREFIX + secrets.token_hex(4)


def _exists(lookup: Any, name: str) -> bool:
    try:
        lookup(name)
    except KeyError:
        return False
    return True


def _admin(argv: list[str]) -> None:
    """useradd and friends, retried while another process (an xdist worker) holds /etc/passwd's
    lock: exit 1 or 10 with "cannot lock"."""
    for attempt in range(50):
        p = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
        if p.returncode == 0:
            return
        if "lock" not in p.stderr or attempt == 49:
            raise subprocess.CalledProcessError(p.returncode, argv, p.stdout, p.stderr)
        time.sleep(0.1)


def _remove_user(name: str, uid: int) -> None:
    """Kill what still runs as the user (userdel refuses a busy user), then remove it; userdel
    removes its own group too. A shared group is the caller's to remove."""
    for _ in range(50):
        pids = _pids_of(uid)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    if _exists(pwd.getpwnam, name):
        _admin(["userdel", name])
    if _exists(grp.getgrnam, name):  # a user-private group userdel kept (USERGROUPS_ENAB no)
        _admin(["groupdel", name])


def _pids_of(uid: int) -> list[int]:
    """Live processes with ``uid`` as any of their uids (status, not the /proc entry's owner: that
    is root for a process that made itself non-dumpable, as a daemon holding a PIN should)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("State", "").split()[:1] != ["Z"] and str(uid) in fields.get("Uid", "").split():
            pids.append(int(entry.name))
    return pids
