"""Who asks the key daemon: a local process (peer credentials) or a TLS client (certificate subject).

Invariants:
- A principal is decided by the transport, never by anything the client sends: SO_PEERCRED on the
  Unix socket, the verified certificate's subject on TCP.
- Its names are what key policies, grants and roles list: ``uid:N``, ``user:NAME`` and
  ``group:NAME`` (primary and supplementary groups) for a local process; the RFC 4514 subject
  (``CN=host1,O=example``) for a TLS client. A local principal without a daemon (``local``) is the
  process itself, for the audit trail only: without a daemon nothing is checked.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass
from typing import Any

UNIX, TLS, LOCAL = "unix", "tls", "local"


@dataclass(frozen=True)
class Principal:
    kind: str
    uid: int | None = None
    gid: int | None = None
    pid: int | None = None
    user: str | None = None
    groups: tuple[str, ...] = ()
    subject: str | None = None

    @classmethod
    def from_peer(cls, uid: int, gid: int, pid: int, kind: str = UNIX) -> Principal:
        """A local process by its credentials; user and group names from the account database
        (a uid without an account has only ``uid:N``)."""
        try:
            pw = pwd.getpwuid(uid)
        except KeyError:
            return cls(kind, uid, gid, pid, None, _group_names([gid]))
        try:
            gids = os.getgrouplist(pw.pw_name, gid)
        except OSError:
            gids = [gid]
        return cls(kind, uid, gid, pid, pw.pw_name, _group_names(gids))

    @classmethod
    def this_process(cls) -> Principal:
        return cls.from_peer(os.getuid(), os.getgid(), os.getpid(), kind=LOCAL)

    @classmethod
    def from_certificate(cls, subject: str) -> Principal:
        return cls(TLS, subject=subject)

    def names(self) -> frozenset[str]:
        cached: frozenset[str] | None = self.__dict__.get("_names")
        if cached is not None:  # asked on every check of every request
            return cached
        if self.kind == TLS:
            cached = frozenset([self.subject or ""])
        else:
            out = {f"uid:{self.uid}"}
            if self.user:
                out.add(f"user:{self.user}")
            out.update(f"group:{g}" for g in self.groups)
            cached = frozenset(out)
        object.__setattr__(self, "_names", cached)
        return cached

    def describe(self) -> str:
        """For one-line errors: ``uid 1001 (alice)`` or ``CN=host1,O=example``."""
        if self.kind == TLS:
            return str(self.subject)
        return f"uid {self.uid} ({self.user})" if self.user else f"uid {self.uid}"

    def audit_fields(self) -> dict[str, Any]:
        """The audit record's ``principal`` object (FORMAT.md section 5)."""
        if self.kind == TLS:
            return {"kind": TLS, "subject": self.subject}
        return {"kind": self.kind, "uid": self.uid, "user": self.user or str(self.uid), "pid": self.pid}


def _group_names(gids: list[int]) -> tuple[str, ...]:
    names = []
    for g in dict.fromkeys(gids):
        try:
            names.append(grp.getgrgid(g).gr_name)
        except KeyError:
            names.append(str(g))
    return tuple(names)
