"""No PIN in any encfs process's command line or environment (issue #18, item 7).

Real mounts, real volume attachments and real key commands, for every way of giving a
PIN: ``pin-value`` in a pkcs11 URI, ``--pin-env``, ``pin-env`` in a config file given
through the mount helper's ``-o config=``, ``--pin-file``, and the embedded token's own
PIN file. While each process is running, every process's /proc/PID/cmdline and
/proc/PID/environ on the machine is searched for the PIN (it is random, so a hit can
only be a leak). The search is meaningful only if the processes it must cover exist:
each test first finds the daemon and its sealing worker (or the key command, waiting
on its stdin).

The "vendor" token is a SoftHSM2 token encfs did not provision, reached through
``--pkcs11-module``/``--pkcs11-uri`` as a real HSM would be (as in test_cli_keys_vendor.py).
The ``--pin-file`` and embedded cases were never broken; they guard the other paths.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import run_encfs
from procs import children, running

from encfs.fuse.mount import is_mounted
from encfs.keys.softhsm import EmbeddedSoftHSM, softhsm_module

MODULE = softhsm_module()
PIN_VAR = "ENCFS_TEST_HSM_PIN"


# -- the search ------------------------------------------------------------------------------


def pin_holders(pin: str) -> list[str]:
    """Every /proc/PID/cmdline or /proc/PID/environ on the machine that contains ``pin``."""
    needle = pin.encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        for name in ("cmdline", "environ"):
            try:
                data = Path(f"/proc/{entry}/{name}").read_bytes()
            except OSError:
                continue  # gone meanwhile
            if needle in data:
                found.append(f"/proc/{entry}/{name}")
    return found


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.decode(errors="replace").partition("=")[::2] for item in raw.split(b"\0") if item)


def assert_no_pin(pin: str, pids: list[int]) -> None:
    assert pids and all(running(p) for p in pids), f"the processes to search are not running: {pids}"
    assert pin_holders(pin) == []
    for pid in pids:
        assert PIN_VAR not in environ_of(pid), pid


# -- a token encfs did not provision, and a filesystem and a volume under its key --------------


@pytest.fixture(scope="module")
def vendor(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("pin-vendor")
    emb = EmbeddedSoftHSM(base / "token")
    assert emb.provision()
    v: dict[str, Any] = {"base": base, "pin": emb.user_pin.read_text().strip(), "pin_file": str(emb.user_pin),
                         "env": {"SOFTHSM2_CONF": str(emb.conf)}, "home": base / "home"}
    sel = ("--pkcs11-module", MODULE, "--token", "encfs", "--pin-file", v["pin_file"])
    for args in (("hsm", "init", *sel), ("key", "create", "--alias", "v", *sel), ("init", str(base / "cipher"), "--key", "v", *sel)):
        proc = run_encfs(*args, home=v["home"], env=v["env"])
        assert proc.returncode == 0, proc.stderr
    v["cipher"] = base / "cipher"
    return v


def _uri(v: dict[str, Any]) -> str:
    return f"pkcs11:token=encfs?module-path={MODULE}&pin-value={v['pin']}"


def pin_options(v: dict[str, Any], how: str, tmp: Path) -> tuple[list[str], dict[str, str]]:
    """Command-line options and environment that give the vendor token's PIN ``how``."""
    if how == "uri":
        return ["--pkcs11-uri", _uri(v)], {}
    if how == "uri=":
        return [f"--pkcs11-uri={_uri(v)}"], {}
    if how == "env":
        return ["--pkcs11-module", MODULE, "--token", "encfs", "--pin-env", PIN_VAR], {PIN_VAR: v["pin"]}
    if how == "uri-env":
        return ["--pkcs11-uri", f"pkcs11:token=encfs?module-path={MODULE}&pin-source=env:{PIN_VAR}"], \
            {PIN_VAR: v["pin"]}
    if how == "file":
        return ["--pkcs11-module", MODULE, "--token", "encfs", "--pin-file", v["pin_file"]], {}
    raise AssertionError(how)


@pytest.fixture
def fs_copy(vendor: dict[str, Any], tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    cipher, mp = tmp_path / "cipher", tmp_path / "plain"
    shutil.copytree(vendor["cipher"], cipher)
    mp.mkdir()
    try:
        yield cipher, mp
    finally:
        _unmount(mp)


def _unmount(mp: Path) -> None:
    for flags in ("-u", "-uz"):
        if is_mounted(mp):
            subprocess.run(["fusermount3", flags, str(mp)], capture_output=True, timeout=30)


def daemon_and_worker(cipher: Path) -> list[int]:
    """The mount daemon of ``cipher`` (its command line names it) and the daemon's children."""
    proc = subprocess.run(["pgrep", "-f", f"{cipher} "], capture_output=True, text=True, timeout=10)
    daemons = [int(p) for p in proc.stdout.split()]
    assert len(daemons) == 1, daemons
    workers = children(daemons[0])
    assert len(workers) == 1, workers  # the sealing worker
    assert b"encfs.sealworker" in Path(f"/proc/{workers[0]}/cmdline").read_bytes()
    return daemons + workers


def _wait_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 30
    while any(running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


# -- mounts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["uri", "uri=", "env", "uri-env", "file"])
def test_daemonized_mount_shows_no_pin(how: str, vendor: dict[str, Any], fs_copy: tuple[Path, Path],
                                       tmp_path: Path) -> None:
    cipher, mp = fs_copy
    opts, env = pin_options(vendor, how, tmp_path)
    proc = run_encfs("mount", str(cipher), str(mp), *opts, home=vendor["home"], env={**vendor["env"], **env})
    assert proc.returncode == 0, proc.stderr
    pids = daemon_and_worker(cipher)
    (mp / "f").write_bytes(b"written through a mount the PIN unlocked")
    assert (mp / "f").read_bytes() == b"written through a mount the PIN unlocked"
    assert_no_pin(vendor["pin"], pids)
    _unmount(mp)
    _wait_gone(pids)


@pytest.mark.parametrize("how", ["uri", "env"])
def test_foreground_mount_shows_no_pin(how: str, vendor: dict[str, Any], fs_copy: tuple[Path, Path],
                                       tmp_path: Path) -> None:
    cipher, mp = fs_copy
    opts, env = pin_options(vendor, how, tmp_path)
    full_env = dict(os.environ, ENCFS_HOME=str(vendor["home"]), **vendor["env"], **env)
    with open(tmp_path / "mount.log", "wb") as log:
        p = subprocess.Popen([sys.executable, "-m", "encfs", "mount", "--foreground", str(cipher), str(mp), *opts],
                             env=full_env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while not is_mounted(mp):
            assert p.poll() is None, (tmp_path / "mount.log").read_text()
            assert time.monotonic() < deadline, "the mount did not become ready"
            time.sleep(0.05)
        pids = daemon_and_worker(cipher)
        assert pids[0] == p.pid  # the foreground process serves the mount itself
        (mp / "f").write_bytes(b"x")
        assert_no_pin(vendor["pin"], pids)
    finally:
        _unmount(mp)
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


def test_mount_helper_with_config_pin_env_shows_no_pin(vendor: dict[str, Any], fs_copy: tuple[Path, Path],
                                                       tmp_path: Path) -> None:
    """fstab: mount(8) runs `encfs CIPHERDIR MOUNTPOINT -o config=FILE`; the file names a PIN variable."""
    cipher, mp = fs_copy
    cfg = tmp_path / "encfs.toml"
    cfg.write_text(f'[hsm]\nmodule = "{MODULE}"\ntoken = "encfs"\npin-env = "{PIN_VAR}"\n')
    proc = run_encfs(str(cipher), str(mp), "-o", f"rw,config={cfg}", home=vendor["home"],
                     env={**vendor["env"], PIN_VAR: vendor["pin"]})
    assert proc.returncode == 0, proc.stderr
    pids = daemon_and_worker(cipher)
    (mp / "f").write_bytes(b"x")
    assert_no_pin(vendor["pin"], pids)
    _unmount(mp)
    _wait_gone(pids)


def test_embedded_token_mount_shows_no_pin(fs_home: Path, tmp_path: Path) -> None:
    cipher, mp = tmp_path / "cipher", tmp_path / "plain"
    mp.mkdir()
    assert run_encfs("init", str(cipher), "--key", "fs", home=fs_home).returncode == 0
    pin = (fs_home / "softhsm" / "user.pin").read_text().strip()
    try:
        proc = run_encfs("mount", str(cipher), str(mp), home=fs_home)
        assert proc.returncode == 0, proc.stderr
        pids = daemon_and_worker(cipher)
        (mp / "f").write_bytes(b"x")
        assert_no_pin(pin, pids)
    finally:
        _unmount(mp)


# -- key commands ----------------------------------------------------------------------------


def _reading_stdin(pid: int) -> bool:
    """Whether ``pid`` sleeps in read(0, ...): on x86_64 and aarch64, /proc/PID/syscall starts with
    the syscall number and its first argument."""
    read_nr = {"x86_64": "0", "aarch64": "63"}[platform.machine()]
    try:
        fields = Path(f"/proc/{pid}/syscall").read_text().split()
    except OSError:
        return False
    return fields[:2] == [read_nr, "0x0"]


@pytest.mark.parametrize("how", ["uri", "env"])
def test_key_command_shows_no_pin(how: str, vendor: dict[str, Any], tmp_path: Path) -> None:
    """`encfs key encrypt` waits for its plaintext on stdin: by then its PIN must be gone."""
    if platform.machine() not in ("x86_64", "aarch64"):
        pytest.skip("needs the read syscall number of this architecture")
    opts, env = pin_options(vendor, how, tmp_path)
    full_env = dict(os.environ, ENCFS_HOME=str(vendor["home"]), **vendor["env"], **env)
    p = subprocess.Popen([sys.executable, "-m", "encfs", "key", "encrypt", "v", *opts], env=full_env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not _reading_stdin(p.pid):
            assert p.poll() is None, p.stderr.read()
            assert time.monotonic() < deadline, "encfs key encrypt never read its stdin"
            time.sleep(0.01)
        assert_no_pin(vendor["pin"], [p.pid])
        out, err = p.communicate(b"plaintext", timeout=60)
        assert p.returncode == 0, err
        assert out and b"plaintext" not in out
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)


# -- volumes ---------------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/loop-control"),
                    reason="attaching volumes needs root and loop devices")
@pytest.mark.parametrize("how", ["uri", "env"])
def test_volume_attach_shows_no_pin(how: str, vendor: dict[str, Any], tmp_path: Path) -> None:
    from volume_helpers import Rig

    rig = Rig(tmp_path, vendor["home"])
    rig.env.update(vendor["env"])
    try:
        image = tmp_path / "vol.img"
        file_opts, _ = pin_options(vendor, "file", tmp_path)
        rig.ok("volume", "create", image, "--size", "16M", "--key", "v", *file_opts)
        opts, env = pin_options(vendor, how, tmp_path)
        proc = run_encfs("volume", "attach", str(image), *opts, home=vendor["home"], env={**rig.env, **env})
        assert proc.returncode == 0, proc.stderr
        [row] = json.loads(rig.ok("volume", "list", "--json"))["Volumes"]
        pids = [row["Pid"], *children(row["Pid"])]
        assert len(pids) == 2, pids  # the daemon and its sealing worker
        with open(row["Device"], "r+b") as dev:  # the unlocked volume serves its loop device
            dev.write(b"z" * 4096)
            dev.flush()
            os.fsync(dev.fileno())
        assert_no_pin(vendor["pin"], pids)
        rig.detach(str(image))
    finally:
        rig.cleanup()


# -- the pieces ------------------------------------------------------------------------------


def test_uri_without_pin_value_keeps_everything_else() -> None:
    from encfs.keys.pkcs11_uri import has_pin_value, without_pin_value

    base = "pkcs11:token=a;serial=1"
    assert without_pin_value(f"{base}?module-path=/m.so&pin-value=s3cret") == f"{base}?module-path=/m.so"
    assert without_pin_value(f"{base}?pin-value=s3cret&module-path=/m.so") == f"{base}?module-path=/m.so"
    assert without_pin_value(f"{base}?pin-value=s3cret") == base
    assert without_pin_value(f"{base}?module-path=/pin-value=x.so") == f"{base}?module-path=/pin-value=x.so"
    assert has_pin_value(f"{base}?pin-value=") and not has_pin_value(f"{base};pin-value=x")
    assert not has_pin_value(f"{base}?module-path=/pin-value=x.so")


def test_scrubbed_arguments_hold_no_pin() -> None:
    from encfs.errors import UsageError
    from encfs.keys.pin_handoff import _scrub_argv

    uri = "pkcs11:token=a?module-path=/m.so&pin-value=s3cret"
    clean = "pkcs11:token=a?module-path=/m.so"
    assert _scrub_argv(["key", "list", "--pkcs11-uri", uri], uri) == ["key", "list", "--pkcs11-uri", clean]
    assert _scrub_argv(["key", "list", f"--pkcs11-u={uri}"], uri) == ["key", "list", f"--pkcs11-u={clean}"]
    with pytest.raises(UsageError):  # the URI spelled differently elsewhere: refuse rather than leave it
        _scrub_argv(["key", "list", "--pkcs11-uri", uri, "x" + uri], uri)


def test_errors_about_a_uri_never_show_its_pin(tmp_path: Path) -> None:
    proc = run_encfs("key", "list", "--pkcs11-uri", "pkcs12:token=a?module-path=/m.so&pin-value=s3cret",
                     home=tmp_path / "home")
    err = proc.stderr.decode()
    assert proc.returncode == 1 and err.startswith("encfs: not a pkcs11 URI") and err.count("\n") == 1, err
    assert "s3cret" not in err


@pytest.mark.parametrize("how", ["env", "uri"])
def test_the_key_daemon_shows_no_pin_whatever_its_config_names(vendor: dict[str, Any], tmp_path: Path,
                                                                 how: str) -> None:
    """`encfs keyd` reads the PIN (it is the daemon), also when its state directory's config has a
    [keyd] table naming a daemon for clients (that once skipped the PIN hand-off)."""
    from keyd_rig import keyd

    home = tmp_path / "home"
    shutil.copytree(vendor["home"], home)
    (home / "config.toml").write_text('[keyd]\naddress = "/nonexistent/keyd.sock"\n')
    opts, env = pin_options(vendor, how, tmp_path)
    with keyd(home, tmp_path / "keyd.sock", *opts, env={**vendor["env"], **env}) as proc:
        workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert_no_pin(vendor["pin"], [proc.pid, *map(int, workers)])
