"""The key daemon's secret operations (Secrets Manager's), decided on the secret's CMK policy with
the context ``{"encfs:secret": NAME}``, so a policy condition can name the secrets a principal
reaches; and RemoteSecretStore, the SecretStore methods asked of the daemon.

The daemon's SecretStore seals and opens values with its own key service, as the client it acts
for (the audit records of those KMS calls name that client).
"""

from __future__ import annotations

from typing import Any

from encfs.errors import UsageError
from encfs.keyd.call import Call, Handler, bool_arg, int_arg, str_arg
from encfs.keyd.protocol import b64, unb64

SECRET_CONTEXT = "encfs:secret"


def _name(a: dict[str, Any]) -> str:
    return str_arg(a, "SecretId")


def _store(c: Call) -> Any:
    if c.secrets is None:
        raise UsageError("this key daemon keeps no secrets")
    return c.secrets


def _allow(c: Call, action: str, name: str, key_id: str | None = None) -> Any:
    store = _store(c)
    # The secret's own CMK id (canonical, as the store wrote it), not resolved: a secret whose key
    # was deleted is still decided on that key, so its owner or an officer can describe and delete it.
    c.allow(action, key_id if key_id is not None else store.key_of(name), {SECRET_CONTEXT: name})
    return store


def _opt_str(a: dict[str, Any], name: str) -> str | None:
    value = a.get(name)
    if value is not None and not isinstance(value, str):
        raise UsageError(f"{name} must be a string")
    return value


def create_secret(c: Call, a: dict[str, Any]) -> dict[str, Any]:
    from encfs.keyd.secretstore import DEFAULT_KEY

    name = _name(a)
    key_id = c.ks.resolve_key_id(_opt_str(a, "KmsKeyId") or DEFAULT_KEY)
    store = _allow(c, "secretsmanager:CreateSecret", name, key_id)
    return dict(store.create(name, unb64(a.get("SecretValue"), "SecretValue"), key_id, str_arg(a, "Description", "")))


def put_secret_value(c: Call, a: dict[str, Any]) -> dict[str, Any]:
    name = _name(a)
    stages = a.get("VersionStages")
    if stages is not None and not (isinstance(stages, list) and all(isinstance(s, str) for s in stages)):
        raise UsageError("VersionStages must be a list of strings")
    store = _allow(c, "secretsmanager:PutSecretValue", name)
    return dict(store.put(name, unb64(a.get("SecretValue"), "SecretValue"), stages))


def get_secret_value(c: Call, a: dict[str, Any]) -> dict[str, Any]:
    name = _name(a)
    store = _allow(c, "secretsmanager:GetSecretValue", name)
    out = dict(store.get(name, _opt_str(a, "VersionId"), _opt_str(a, "VersionStage")))
    if "SecretBinary" in out:
        out["SecretBinary"] = b64(out["SecretBinary"])
    return out


def list_secrets(c: Call, a: dict[str, Any]) -> dict[str, Any]:
    c.allow("secretsmanager:ListSecrets", None)
    return {"SecretList": _store(c).list()}


def describe_secret(c: Call, a: dict[str, Any]) -> dict[str, Any]:
    name = _name(a)
    return dict(_allow(c, "secretsmanager:DescribeSecret", name).describe(name))


def rotate_secret(c: Call, a: dict[str, Any]) -> dict[str, Any]:
    name = _name(a)
    value = a.get("SecretValue")
    store = _allow(c, "secretsmanager:RotateSecret", name)
    return dict(store.rotate(name, None if value is None else unb64(value, "SecretValue")))


def delete_secret(c: Call, a: dict[str, Any]) -> dict[str, Any]:
    name = _name(a)
    window = a.get("RecoveryWindowInDays")
    store = _allow(c, "secretsmanager:DeleteSecret", name)
    return dict(store.delete(name, None if window is None else int_arg(a, "RecoveryWindowInDays"),
                             bool_arg(a, "ForceDeleteWithoutRecovery")))


def restore_secret(c: Call, a: dict[str, Any]) -> dict[str, Any]:
    name = _name(a)
    return dict(_allow(c, "secretsmanager:RestoreSecret", name).restore(name))


SECRET_OPERATIONS: dict[str, Handler] = {
    "CreateSecret": create_secret,
    "PutSecretValue": put_secret_value,
    "GetSecretValue": get_secret_value,
    "ListSecrets": list_secrets,
    "DescribeSecret": describe_secret,
    "RotateSecret": rotate_secret,
    "DeleteSecret": delete_secret,
    "RestoreSecret": restore_secret,
}


class RemoteSecretStore:
    """SecretStore's methods, answered by the key daemon (`encfs secret ... --keyd`)."""

    def __init__(self, service: Any) -> None:
        self.service = service

    def create(self, name: str, value: bytes, key: str | None = None, description: str = "") -> dict[str, Any]:
        return dict(self.service.call("CreateSecret", SecretId=name, SecretValue=b64(value), KmsKeyId=key,
                                      Description=description))

    def put(self, name: str, value: bytes, stages: list[str] | None = None) -> dict[str, Any]:
        return dict(self.service.call("PutSecretValue", SecretId=name, SecretValue=b64(value), VersionStages=stages))

    def get(self, name: str, version_id: str | None = None, version_stage: str | None = None) -> dict[str, Any]:
        out = dict(self.service.call("GetSecretValue", SecretId=name, VersionId=version_id,
                                     VersionStage=version_stage))
        if "SecretBinary" in out:
            out["SecretBinary"] = unb64(out["SecretBinary"], "SecretBinary")
        return out

    def list(self) -> list[dict[str, Any]]:
        return list(self.service.call("ListSecrets")["SecretList"])

    def describe(self, name: str) -> dict[str, Any]:
        return dict(self.service.call("DescribeSecret", SecretId=name))

    def rotate(self, name: str, value: bytes | None = None) -> dict[str, Any]:
        return dict(self.service.call("RotateSecret", SecretId=name, SecretValue=None if value is None else b64(value)))

    def delete(self, name: str, recovery_window_days: int | None = 30, force: bool = False) -> dict[str, Any]:
        return dict(self.service.call("DeleteSecret", SecretId=name, RecoveryWindowInDays=recovery_window_days,
                                      ForceDeleteWithoutRecovery=force))

    def restore(self, name: str) -> dict[str, Any]:
        return dict(self.service.call("RestoreSecret", SecretId=name))
