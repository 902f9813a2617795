"""contrib/systemd's units pass `systemd-analyze verify` (syntax, known directives, the command
exists), with the command pointed at this checkout's encfs. This machine's PID 1 is not systemd,
so the units are not run here: what they run (`encfs mount --foreground`, `encfs umount`, `encfs
volume attach-all`, `encfs keyd`) is tested through the CLI elsewhere; the key daemon's socket
activation is tested by test_keyd_activation.py with a launcher that does what systemd does."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).parent.parent / "contrib" / "systemd"
ENCFS = Path(sys.executable).parent / "encfs"  # the console script pip installed beside this Python


SYSUSERS = UNITS.parent / "sysusers.d"


def installed(tmp_path: Path) -> Path:
    """Every unit, in one directory (a .socket is verified with the .service it starts), with the
    command pointed at this checkout's encfs."""
    assert ENCFS.is_file() and shutil.which("systemd-analyze"), "quickstart.sh installs both"
    for unit in UNITS.iterdir():
        text = unit.read_text()
        if unit.suffix == ".service":
            assert "/usr/local/bin/encfs " in text  # where `pip install` puts the command system-wide
        name = unit.name.replace("@.", "@cipher.")  # a template is verified as one of its instances
        (tmp_path / name).write_text(text.replace("/usr/local/bin/encfs ", f"{ENCFS} "))
    return tmp_path


@pytest.mark.parametrize("unit", ["encfs-mount@cipher.service", "encfs-volumes.service", "encfs-keyd.service",
                                  "encfs-keyd.socket"])
def test_unit_verifies_cleanly(unit: str, tmp_path: Path) -> None:
    p = subprocess.run(["systemd-analyze", "verify", str(installed(tmp_path) / unit)], check=False,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout + p.stderr == "", p.stdout + p.stderr


def test_keyd_unit_is_hardened(tmp_path: Path) -> None:
    """systemd's own score of the sandbox: 1.5 ("OK") when written; a directive dropped by mistake
    (ProtectSystem=, the syscall filter) raises it past the threshold."""
    p = subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=20", "--no-pager",
                        str(installed(tmp_path) / "encfs-keyd.service")], check=False, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    for directive in ("ProtectSystem=", "ProtectHome=", "PrivateTmp=", "NoNewPrivileges="):
        assert any(line.startswith("\u2713 " + directive) for line in p.stdout.splitlines()), directive


def test_keyd_user_is_declared(tmp_path: Path) -> None:
    """The service's User= exists once systemd-sysusers has read contrib/sysusers.d."""
    (tmp_path / "etc").mkdir()
    conf = (SYSUSERS / "encfs-keyd.conf").read_text()
    p = subprocess.run(["systemd-sysusers", f"--root={tmp_path}", "-"], check=False, input=conf,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    users = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()}
    groups = {line.split(":")[0] for line in (tmp_path / "etc/group").read_text().splitlines()}
    service = (UNITS / "encfs-keyd.service").read_text()
    assert "User=encfs-keyd\n" in service and "Group=encfs-keyd\n" in service
    assert "encfs-keyd" in groups and users["encfs-keyd"][5:] == ["/var/lib/encfs-keyd", "/usr/sbin/nologin"]
