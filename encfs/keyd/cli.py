"""`encfs keyd`: run the key daemon in the foreground (systemd's Type=simple; contrib/systemd).

It opens the key service once (the PIN from the usual sources: --pin-file, the config, the
embedded token's file, or sealed PINs with --passphrase-file), then serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from encfs.errors import Busy, EncfsError, StateError, UsageError

DEFAULT_SOCKET = "/run/encfs/keyd.sock"
LOCK_NAME = "keyd.lock"
log = logging.getLogger("encfs.keyd")


def register(sub: Any, add_hsm_options: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("keyd", help="serve the key service to other processes and hosts, by key policy",
                       description="The key daemon: holds the token and its PIN, and answers `--keyd` clients "
                                   "(encfs key, secret, mount, volume) as key policies, grants and roles allow.")
    add_hsm_options(p)
    p.add_argument("--socket", metavar="PATH", help=f"Unix socket to serve on (default {DEFAULT_SOCKET}; "
                                                    "ignored under systemd socket activation)")
    p.add_argument("--listen", metavar="HOST:PORT", help="also serve TCP with mutual TLS (needs the --tls-* files)")
    p.add_argument("--tls-cert", metavar="FILE", help="the daemon's TLS certificate (PEM)")
    p.add_argument("--tls-key", metavar="FILE", help="its private key (PEM)")
    p.add_argument("--tls-ca", metavar="FILE", help="CA whose certificates clients must present")
    p.add_argument("--json", action="store_true", help="when ready, print {Socket, Inherited, Listen} on stdout")
    p.add_argument("--stall-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="close a client that leaves a frame unfinished, or reads none of its replies, this long "
                        "(default 30; an idle client between requests is never closed)")
    p.add_argument("--roles", metavar="FILE", help="roles file (default <state dir>/keyd.toml; docs/keyd.md)")
    p.set_defaults(func=cmd_keyd, serves_token=True)  # hsm_options: its config's [keyd] is for its clients


def _listen_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--listen {text!r}: give HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def cmd_keyd(args: argparse.Namespace) -> int:
    import trio

    from encfs.cliargs import hsm_options, state_dir
    from encfs.keyd import worker
    from encfs.keyd.roles import Roles
    from encfs.keyd.server import KeyDaemon, tcp_listeners, tls_principal, unix_listener, unix_principal
    from encfs.keys.config import prompt_before_fork
    from encfs.output import print_json

    if getattr(args, "keyd", None):
        raise UsageError("`encfs keyd` serves the token itself: --keyd names a daemon to ask, not one to run")
    tls = None
    if args.listen:
        if not (args.tls_cert and args.tls_key and args.tls_ca):
            raise UsageError("--listen needs --tls-cert, --tls-key and --tls-ca (clients must present certificates)")
        from encfs.keyd.tls import server_context

        tls = server_context(Path(args.tls_cert), Path(args.tls_key), Path(args.tls_ca))
    home = state_dir(args)
    state_lock = _lock_state(home)  # held (and by the token worker, which inherits it) until exit
    if args.roles and not os.path.exists(args.roles):
        raise UsageError(f"--roles {args.roles}: no such file")
    roles = Roles.load(Path(args.roles) if args.roles else home / "keyd.toml")
    from encfs.daemon import keep_secrets_in_memory
    from encfs.keyd.activation import inherited_sockets

    keep_secrets_in_memory()  # it holds the PIN and the token session: no core dumps, no same-uid ptrace
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # a client gone mid-reply is EPIPE for that client, not death
    inherited = inherited_sockets()
    socket_path = Path(args.socket or DEFAULT_SOCKET)
    if not inherited:
        socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    listeners: list[tuple[Any, Any]] = [(unix_listener(socket_path, s), unix_principal) for s in inherited]
    if not inherited:
        listeners.append((unix_listener(socket_path), unix_principal))
    try:
        # The token worker opens the token in its own process (worker.py); a PIN asked on the
        # terminal is asked here, before the fork, and handed over in memory.
        hsm = prompt_before_fork(home, hsm_options(args))
        worker_sock, worker_pid = worker.start(home, hsm, roles, close_in_child=[lst for lst, _ in listeners])
        daemon = KeyDaemon(worker_sock, args.stall_timeout)

        async def main() -> None:
            if tls is not None:
                host, port = _listen_address(args.listen)
                listeners.extend((lst, tls_principal) for lst in await tcp_listeners(host, port, tls))
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async with trio.open_nursery() as nursery:
                    await nursery.start(daemon.serve, listeners)
                    where = "inherited socket(s)" if inherited else str(socket_path)
                    if args.json:  # one object when ready: what it serves on
                        print_json({"Socket": None if inherited else str(socket_path), "Inherited": len(inherited),
                                    "Listen": args.listen if tls else None})
                        sys.stdout.flush()
                    else:
                        print(f"encfs keyd: serving on {where}" + (f" and {args.listen} (TLS)" if tls else ""),
                              file=sys.stderr, flush=True)
                    async for _sig in signals:
                        nursery.cancel_scope.cancel()
                        break

        try:
            trio.run(main)
        except BaseExceptionGroup as group:  # trio's: the one-line error inside it, if there is one
            found: BaseException | None = group.subgroup(EncfsError)
            while isinstance(found, BaseExceptionGroup):
                found = found.exceptions[0]
            raise found or group from None
        finally:
            worker.stop(worker_sock, worker_pid)
    finally:
        if not inherited:
            try:
                os.unlink(socket_path)
            except OSError:
                pass
        if state_lock is not None:
            os.close(state_lock)
    return 0


def _lock_state(home: Path) -> int | None:
    """Refuse to serve a state directory another daemon serves: both would hold the token's
    session and write the same policies, grants and secrets, each trusting its own cache. An
    flock on ``<home>/keyd.lock``, inherited by the forked worker, so it lasts as long as either
    process does. A home that does not exist takes no lock: opening the token refuses it."""
    try:
        fd = os.open(home / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateError(f"cannot lock {home / LOCK_NAME}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise Busy(f"another key daemon serves {home}: stop it first, or give --home another state directory") from None
    return fd
