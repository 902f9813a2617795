"""Socket activation: the listening sockets systemd passes to `encfs keyd` (encfs-keyd.socket), read
as sd_listen_fds(3) reads them, without linking libsystemd.

Invariants:
- Sockets are taken only when LISTEN_PID is this process: the variables may have been inherited
  from a parent that was activated itself, and its descriptors are not ours.
- LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES are removed from the environment whatever the outcome
  (sd_listen_fds with unset_environment=1), so processes the daemon starts never take them.
- Descriptors start at 3 (SD_LISTEN_FDS_START) and are made close-on-exec once taken.
- A stream socket that is not listening (a socket unit with Accept=yes passes a connection, one per
  service instance) is refused with a ConfigError: the daemon serves all clients from one process.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import MutableMapping

from encfs.errors import ConfigError

LISTEN_FDS_START = 3
_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def inherited_sockets() -> list[socket.socket]:
    """The sockets systemd passed to this process, in the socket unit's order; [] without any."""
    return [sock for _, sock in named_inherited_sockets()]


def named_inherited_sockets(environ: MutableMapping[str, str] | None = None) -> list[tuple[str, socket.socket]]:
    """As inherited_sockets, each with its name (the socket unit's FileDescriptorName=, by default
    the unit's name; "unknown" when systemd passed no names), as sd_listen_fds_with_names(3)."""
    env = os.environ if environ is None else environ
    values = {name: env.get(name) for name in _VARIABLES}
    for name in _VARIABLES:
        env.pop(name, None)
    pid, count = values["LISTEN_PID"], values["LISTEN_FDS"]
    if pid is None or count is None:
        return []
    try:
        if int(pid) != os.getpid():
            return []
        n = int(count)
    except ValueError:
        raise ConfigError(f"socket activation: malformed LISTEN_PID={pid!r} or LISTEN_FDS={count!r}") from None
    if n < 0:
        raise ConfigError(f"socket activation: malformed LISTEN_FDS={count!r}")
    names = values["LISTEN_FDNAMES"].split(":") if values["LISTEN_FDNAMES"] else []
    if len(names) != n:  # sd_listen_fds_with_names: no names, or a wrong count, means "unknown"
        names = ["unknown"] * n
    out = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + n):
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError as e:
            raise ConfigError(f"socket activation: LISTEN_FDS={n} but descriptor {fd} is not open ({e.strerror})") from None
        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        out.append(_listening_socket(fd))
    return list(zip(names, out, strict=True))


def _listening_socket(fd: int) -> socket.socket:
    try:
        sock = socket.socket(fileno=fd)  # family and type are read from the descriptor
    except OSError as e:
        raise ConfigError(f"socket activation: descriptor {fd} is not a socket ({e.strerror})") from None
    if sock.type == socket.SOCK_STREAM and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()  # not ours to close: the error ends the daemon, which closes everything anyway
        raise ConfigError(f"socket activation: descriptor {fd} is a connected socket, not a listening one "
                          "(the socket unit must not set Accept=yes)")
    return sock
