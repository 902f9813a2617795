"""What KeyService's mixins (keyadmin.py, cryptoops.py, keyimport.py) use of the service and of
one another, declared once for the type checker: the fields KeyService sets and the methods the
others define. Nothing here exists at run time."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from encfs.keys.audit import AuditLog
    from encfs.keys.budget import SealBudget
    from encfs.keys.metadata import KeyDB, KeyRecord, KeyStore, KeyVersion
    from encfs.keys.token import Token
    from encfs.keys.usage import UsageLedger


class ServiceFields:
    """The base of KeyService's mixins (see the module docstring)."""

    if TYPE_CHECKING:  # defined by KeyService.__init__
        token: Token
        clock: Callable[[], float]
        store: KeyStore
        audit: AuditLog
        budget: SealBudget
        usage: UsageLedger

        # defined by KeyService
        def _audited(self, operation: str, **fields: Any) -> AbstractContextManager[dict[str, Any]]: ...
        def _db(self) -> KeyDB: ...
        def _destroy_material(self, rec: KeyRecord, *, versions: bool, wrapping: bool) -> None: ...
        def _add_version(self, rec: KeyRecord, now: float, operation: str = "RotateKey") -> int: ...
        def _token_use(self, rec: KeyRecord, version: KeyVersion, operation: str,
                       info: dict[str, Any]) -> AbstractContextManager[None]: ...
        @staticmethod
        def _require(rec: KeyRecord, operation: str) -> None: ...

        # defined by KeyAdministration
        def _transition(self, operation: str, key: str,
                        change: Callable[[KeyRecord, float], None]) -> dict[str, Any]: ...
