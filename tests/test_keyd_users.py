"""The test users of the key daemon's tests (tests/keyd_users.py): created for real with useradd,
seen by the account database and by the principal code, removed however the test ends."""

from __future__ import annotations

import grp
import json
import os
import pwd
import subprocess
import sys
import time
from pathlib import Path

import pytest
from keyd_users import (
    PREFIX,
    UnixUsers,
    UserPython,
    as_user,
    remove_stale_users,
    run_as,
    temporary_users,
    unix_users_fixture,  # noqa: F401
    user_python_fixture,  # noqa: F401
)

from encfs.keyd.principal import Principal


def exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def test_users_are_real_and_in_their_groups(unix_users: UnixUsers, user_python: UserPython) -> None:
    shared = unix_users.group()
    alice = unix_users.create(supplementary=[shared])
    bob = unix_users.create(group=shared)
    name, uid, gid = alice
    assert name.startswith(PREFIX) and pwd.getpwnam(name).pw_uid == uid and uid != bob.uid
    assert grp.getgrgid(gid).gr_name == name and bob.gid == shared.gid
    assert Principal.from_peer(uid, gid, 1).names() == {f"uid:{uid}", f"user:{name}", f"group:{name}",
                                                        f"group:{shared.name}"}
    # As the user: its own ids, its supplementary group, and this checkout's encfs importable.
    probe = ("import json, os; from encfs.keyd.principal import Principal; "
             "print(json.dumps([os.getuid(), os.geteuid(), os.getgid(), sorted(Principal.this_process().names())]))")
    r = run_as(alice, [user_python.executable, "-c", probe], user_python.env(), cwd="/")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [uid, uid, gid, sorted([f"uid:{uid}", f"user:{name}", f"group:{name}",
                                                           f"group:{shared.name}"])]
    r = run_as(bob, ["id", "-g"])
    assert r.stdout.strip() == str(shared.gid)


def test_users_and_groups_are_removed_when_the_test_fails() -> None:
    with pytest.raises(RuntimeError, match="the test failed"), temporary_users() as users:
        shared = users.group()
        made = [users.create(group=shared), users.create(supplementary=[shared])]
        assert all(exists(u.name) for u in made)
        raise RuntimeError("the test failed")
    assert not any(exists(u.name) or group_exists(u.name) for u in made)
    assert not group_exists(shared.name)


def test_processes_left_running_as_a_user_do_not_keep_it() -> None:
    with temporary_users() as users:
        user = users.create()
        daemon = subprocess.Popen([*as_user(user), "sleep", "600"])
        # Leave the block (which removes the user) only once setpriv has become the user: before
        # that, nothing runs as the uid and the sleep would start after the removal (a flaky run).
        deadline = time.monotonic() + 30
        while str(user.uid) not in Path(f"/proc/{daemon.pid}/status").read_text().split("Uid:")[1].split()[:1]:
            assert time.monotonic() < deadline and daemon.poll() is None
            time.sleep(0.01)
    try:
        assert daemon.wait(timeout=30) == -9  # killed, so that userdel could remove the user
        assert not exists(user.name)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


def test_users_of_a_killed_run_are_removed_by_the_next() -> None:
    """A test process killed before its cleanup leaves its users; the next run removes them."""
    left = subprocess.run([sys.executable, "-c",
                           "import sys; from keyd_users import UnixUsers; print(UnixUsers().create().name)"],
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)), capture_output=True,
                          text=True, check=False, timeout=60)
    name = left.stdout.strip()
    assert left.returncode == 0 and exists(name), left.stderr
    remove_stale_users()
    assert not exists(name) and not group_exists(name)
