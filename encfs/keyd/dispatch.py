"""The key daemon's operations: each request's action is decided, then run on the KeyService.

Invariants:
- One table (OPERATIONS) names every operation, the handler that decodes its arguments, decides
  and runs it, and whether it may join a batch. Nothing reaches the KeyService, the secret store
  or the access-control state without its ``AccessControl.check`` first.
- The key an action is decided on is the one the request will act on: an alias is resolved to
  its key id, and a ciphertext blob's key id is read from the blob, before the check.
- Every call runs on the daemon's one token thread (server.py): the KeyService is never entered
  by two threads. Records the KeyService writes name the client (AuditLog.acting_for); a denial
  is one record with ``outcome: denied`` and the reason.
- ``EncfsInternal`` (encfs's reserved ``encfs:`` context keys, for mounts and volumes) is
  honoured: through the daemon, who may mint under which context is the key policy's to say.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from encfs.errors import EncfsError, UsageError
from encfs.keyd.accessops import ACCESS_OPERATIONS
from encfs.keyd.call import Access, Call, Handler, context_arg, data_key_json
from encfs.keyd.keyops import KEY_OPERATIONS
from encfs.keyd.principal import Principal
from encfs.keyd.secretops import SECRET_OPERATIONS
from encfs.keys.service import KeyService

OPERATIONS: dict[str, Handler] = {**KEY_OPERATIONS, **ACCESS_OPERATIONS, **SECRET_OPERATIONS}


@dataclass
class Request:
    principal: Principal
    op: str
    args: dict[str, Any]


class Dispatcher:
    """Runs requests on the KeyService: one at a time, or a batch of GenerateDataKey requests for
    one key as one token pass (KeyService.generate_data_keys), each still decided on its own."""

    def __init__(self, ks: KeyService, access: Access, secrets: Any = None,
                 operations: Mapping[str, Handler] | None = None) -> None:
        self.ks = ks
        self.access = access
        self.secrets = secrets
        self.operations = dict(OPERATIONS if operations is None else operations)

    def call(self, principal: Principal, op: str, args: dict[str, Any]) -> dict[str, Any]:
        handler = self.operations.get(op)
        if handler is None:
            raise UsageError(f"the key daemon has no operation {op!r}")
        c = Call(principal, self.ks, self.access, self.secrets)
        with self.ks.audit.acting_for(principal.audit_fields()):
            return handler(c, args)

    def run_batch(self, requests: Sequence[Request]) -> list[dict[str, Any] | EncfsError]:
        """Every request's reply or error, in order. GenerateDataKey requests for the same key,
        size and flags share one token pass; everything else runs alone."""
        try:
            with self.ks.token.held(), self.ks.audit.batched():
                return self._run_batch(requests)
        except EncfsError as e:  # the batch's audit records could not be written: no reply goes out
            return [e] * len(requests)

    def _run_batch(self, requests: Sequence[Request]) -> list[dict[str, Any] | EncfsError]:
        out: list[dict[str, Any] | EncfsError | None] = [None] * len(requests)
        groups: dict[tuple[str, int, bool], list[int]] = {}
        for i, r in enumerate(requests):
            a = r.args
            size, internal = a.get("NumberOfBytes", 32), a.get("EncfsInternal", False)
            if (r.op == "GenerateDataKey" and a.get("WithPlaintext", True) is True and isinstance(a.get("KeyId"), str)
                    and type(size) is int and type(internal) is bool):  # anything else: alone, to its one-line error
                groups.setdefault((a["KeyId"], size, internal), []).append(i)
        for (ref, size, internal), members in groups.items():
            if len(members) > 1:
                self._generate_together(requests, members, ref, size, internal, out)
        for i, r in enumerate(requests):
            if out[i] is None:
                out[i] = self._one(r)
        return [x for x in out if x is not None]

    def _one(self, r: Request) -> dict[str, Any] | EncfsError:
        try:
            return self.call(r.principal, r.op, r.args)
        except EncfsError as e:
            return e

    def _generate_together(self, requests: Sequence[Request], members: list[int], ref: str, size: int,
                           internal: bool, out: list[dict[str, Any] | EncfsError | None]) -> None:
        try:
            key_id = self.ks.resolve_key_id(ref)
        except EncfsError:
            return  # each alone: each gets its own error
        allowed, contexts = [], []
        for i in members:
            r = requests[i]
            try:
                context = context_arg(r.args)
                Call(r.principal, self.ks, self.access, self.secrets).allow("kms:GenerateDataKey", key_id, context)
            except EncfsError as e:
                out[i] = e
                continue
            allowed.append(i)
            contexts.append(context)
        if not allowed:
            return
        try:
            keys = self.ks.generate_data_keys(key_id, contexts, size, encfs_internal=internal,
                                              principals=[requests[i].principal.audit_fields() for i in allowed])
        except EncfsError as e:
            for i in allowed:
                out[i] = e
            return
        for i, dk in zip(allowed, keys):
            out[i] = data_key_json(dk)
