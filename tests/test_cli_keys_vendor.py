"""The ``encfs`` CLI end to end on a real-HSM code path: real subprocesses, real SoftHSM2 tokens,
no mocks.

The "vendor HSM" tests point the real-HSM code path (--pkcs11-module, --token,
--pin-file/--pin-env, pkcs11: URIs, config files) at a separate SoftHSM2 token
provisioned by the test itself (the module-scoped ``vendor`` fixture). A wrong PIN,
a missing module, an unknown token label, bad URIs and no PIN source are one line
each and change nothing.

Error contract (issue): every failure prints exactly one line ``encfs: <cause>``
on stderr, exits non-zero, shows no traceback and leaves no half-created state.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import BINARY, MODULE, blob_key_version, create_key, fail, ok, ok_json, state, token_objects

from encfs.keys.softhsm import EmbeddedSoftHSM

# -- a real-HSM code path: SoftHSM2 as the vendor module --------------------------------------------


@pytest.fixture(scope="module")
def vendor(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A SoftHSM2 token encfs did not provision itself: the stand-in for a vendor HSM."""
    base = tmp_path_factory.mktemp("vendor")
    emb = EmbeddedSoftHSM(base)
    assert emb.provision()  # C_InitToken in a child process; this process never loads SoftHSM2
    pin = emb.user_pin.read_text().strip()
    return {"conf": str(emb.conf), "pin_file": str(emb.user_pin), "pin": pin, "tokendir": emb.tokendir,
            "env": {"SOFTHSM2_CONF": str(emb.conf)}}


def vendor_args(v: dict[str, Any]) -> tuple[str, ...]:
    return ("--pkcs11-module", MODULE, "--token", "encfs", "--pin-file", v["pin_file"])


def _vendor_roundtrip(home: Path, v: dict[str, Any], *sel: str, env: dict[str, str] | None = None) -> None:
    env = {**v["env"], **(env or {})}
    objects_before = token_objects(v["tokendir"])
    ok("hsm", "init", *sel, home=home, env=env)  # a module's key store (keys.json) is made here only
    key = create_key(home, "--alias", "vendor", *sel, env=env)
    assert len(token_objects(v["tokendir"])) == len(objects_before) + 1  # the CMK is on the vendor token
    assert not (home / "softhsm").exists()  # and the embedded token was never provisioned
    blob = ok("key", "encrypt", "vendor", *sel, home=home, input=BINARY, env=env)
    assert blob_key_version(blob)[0] == key
    assert ok("key", "decrypt", *sel, home=home, input=blob, env=env) == BINARY
    dk = ok_json("key", "generate-data-key", "vendor", *sel, home=home, env=env)
    assert len(base64.b64decode(dk["Plaintext"])) == 32


def test_vendor_module_pin_file(tmp_path: Path, vendor: dict[str, Any]) -> None:
    home = tmp_path / "home"
    _vendor_roundtrip(home, vendor, *vendor_args(vendor))
    status = ok_json("hsm", "status", "--json", *vendor_args(vendor), home=home, env=vendor["env"])
    assert status["Module"] == MODULE and status["Token"] == "encfs"
    assert "reachable" in ok("hsm", "init", *vendor_args(vendor), home=home, env=vendor["env"]).decode()
    assert not (home / "softhsm").exists()


def test_vendor_module_pin_env(tmp_path: Path, vendor: dict[str, Any]) -> None:
    home = tmp_path / "home"
    sel = ("--pkcs11-module", MODULE, "--token", "encfs", "--pin-env", "MY_HSM_PIN")
    _vendor_roundtrip(home, vendor, *sel, env={"MY_HSM_PIN": vendor["pin"]})
    fail("key", "encrypt", "vendor", *sel, home=home, input=b"x", env=vendor["env"],
         needles=("MY_HSM_PIN", "not set"))
    fail("key", "encrypt", "vendor", *sel, home=home, input=b"x",
         env={**vendor["env"], "MY_HSM_PIN": "wrong-pin"}, needles=("wrong PIN",))


def test_vendor_pkcs11_uri(tmp_path: Path, vendor: dict[str, Any]) -> None:
    home = tmp_path / "home"
    uri = f"pkcs11:token=encfs?module-path={MODULE}&pin-source=file:{vendor['pin_file']}"
    _vendor_roundtrip(home, vendor, "--pkcs11-uri", uri)
    # A bare path as pin-source means a file (RFC 7512); percent-encoding is decoded.
    uri2 = f"pkcs11:token=%65ncfs?module-path={MODULE}&pin-source={vendor['pin_file']}"
    assert ok_json("hsm", "status", "--json", "--pkcs11-uri", uri2, home=home, env=vendor["env"])["Token"] == "encfs"


def test_vendor_config_file_in_home(tmp_path: Path, vendor: dict[str, Any]) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[hsm]\nmodule = "{MODULE}"\ntoken = "encfs"\npin-file = "{vendor["pin_file"]}"\n')
    _vendor_roundtrip(home, vendor)


def test_vendor_config_file_explicit(tmp_path: Path, vendor: dict[str, Any]) -> None:
    home = tmp_path / "home"
    cfg = tmp_path / "elsewhere.toml"
    cfg.write_text(f'[hsm]\nuri = "pkcs11:token=encfs?module-path={MODULE}"\npin-env = "CFG_PIN"\n')
    _vendor_roundtrip(home, vendor, "--config", str(cfg), env={"CFG_PIN": vendor["pin"]})
    fail("key", "list", "--config", str(tmp_path / "nope.toml"), home=home, env=vendor["env"],
         needles=("config file not found", "nope.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text('[hsm]\nmodule = "x"\npassword = "1234"\n')
    fail("key", "list", "--config", str(bad), home=home, needles=("password",))
    bad.write_text("[hsm\n")
    fail("key", "list", "--config", str(bad), home=home, needles=("bad.toml",))


def vendor_home(tmp_path: Path, v: dict[str, Any]) -> Path:
    """A home whose key store lives on the vendor token (`encfs hsm init` made its keys.json)."""
    home = tmp_path / "home"
    assert "created" in ok("hsm", "init", *vendor_args(v), home=home, env=v["env"]).decode()
    return home


def test_vendor_wrong_pin_changes_nothing(tmp_path: Path, vendor: dict[str, Any]) -> None:
    home = vendor_home(tmp_path, vendor)
    sel = vendor_args(vendor)
    key = create_key(home, "--alias", "v", *sel, env=vendor["env"])
    blob = ok("key", "encrypt", key, *sel, home=home, input=b"vendor secret", env=vendor["env"])
    wrong = tmp_path / "wrong.pin"
    wrong.write_text("0000\n")
    bad = ("--pkcs11-module", MODULE, "--token", "encfs", "--pin-file", str(wrong))
    before = state(home, vendor["tokendir"])
    for args, stdin in ((("key", "create", "--alias", "w"), b""), (("key", "encrypt", key), b"x"),
                        (("key", "decrypt"), blob), (("key", "rotate", key), b""),
                        (("hsm", "status"), b"")):
        msg = fail(*args, *bad, home=home, input=stdin, env=vendor["env"], needles=("wrong PIN", "'encfs'"))
        assert "0000" not in msg
    assert state(home, vendor["tokendir"]) == before
    fail("key", "decrypt", "--pkcs11-module", MODULE, "--token", "encfs", "--pin-file",
         str(tmp_path / "absent.pin"), home=home, input=blob, env=vendor["env"], needles=("absent.pin",))
    assert ok("key", "decrypt", *sel, home=home, input=blob, env=vendor["env"]) == b"vendor secret"


def test_vendor_missing_module(tmp_path: Path, vendor: dict[str, Any]) -> None:
    """A module that is gone (README "Exit codes": a PKCS#11 module not found is 66)."""
    home = vendor_home(tmp_path, vendor)
    before = state(home, vendor["tokendir"])
    missing = str(tmp_path / "libvendor-pkcs11.so")
    fail("key", "create", "--pkcs11-module", missing, "--token", "encfs", "--pin-file", vendor["pin_file"],
         home=home, env=vendor["env"], needles=("PKCS#11 module not found", missing), exit_code=66)
    fail("key", "create", "--pkcs11-uri", f"pkcs11:token=encfs?module-path={missing}",
         "--pin-file", vendor["pin_file"], home=home, env=vendor["env"], needles=("PKCS#11 module not found",),
         exit_code=66)
    notlib = tmp_path / "notalib.so"
    notlib.write_bytes(b"this is not an ELF file")
    fail("key", "create", "--pkcs11-module", str(notlib), "--pin-file", vendor["pin_file"],
         home=home, env=vendor["env"], needles=("notalib.so",))
    # `hsm init` makes nothing either when the module cannot be loaded.
    fail("hsm", "init", "--pkcs11-module", missing, "--pin-file", vendor["pin_file"], home=tmp_path / "new",
         env=vendor["env"], needles=(missing,), exit_code=66)
    assert state(home, vendor["tokendir"]) == before and not (home / "softhsm").exists()
    assert not (tmp_path / "new" / "keys.json").exists()


def test_vendor_unknown_token_label(tmp_path: Path, vendor: dict[str, Any]) -> None:
    """A label no token has (README "Exit codes": a token not found is 66)."""
    home = vendor_home(tmp_path, vendor)
    before = state(home, vendor["tokendir"])
    fail("key", "create", "--pkcs11-module", MODULE, "--token", "prod-hsm-7", "--pin-file", vendor["pin_file"],
         home=home, env=vendor["env"], needles=("prod-hsm-7",), exit_code=66)
    fail("hsm", "status", "--pkcs11-uri", f"pkcs11:token=nope;serial=1?module-path={MODULE}",
         "--pin-file", vendor["pin_file"], home=home, env=vendor["env"], needles=("nope",), exit_code=66)
    fail("hsm", "init", "--pkcs11-module", MODULE, "--token", "prod-hsm-7", "--pin-file", vendor["pin_file"],
         home=tmp_path / "new", env=vendor["env"], needles=("prod-hsm-7",), exit_code=66)
    assert state(home, vendor["tokendir"]) == before
    assert not (tmp_path / "new" / "keys.json").exists()


def test_vendor_bad_uris(tmp_path: Path, vendor: dict[str, Any]) -> None:
    home = vendor_home(tmp_path, vendor)
    before = state(home, vendor["tokendir"])
    cases = {
        "token=encfs": "pkcs11:",
        f"pkcs11:token=encfs?module-path={MODULE}&color=blue": "color",
        f"pkcs11:token=encfs;flavour=x?module-path={MODULE}": "flavour",
        f"pkcs11:token?module-path={MODULE}": "without '='",
        f"pkcs11:token=a;token=b?module-path={MODULE}": "twice",
        f"pkcs11:slot-id=one?module-path={MODULE}": "slot-id",
        "pkcs11:token=encfs?module-name=softhsm2": "module-path",
        f"pkcs11:token=encfs?module-path={MODULE}&pin-source=ftp:x": "PIN file ftp:x",
    }
    for uri, needle in cases.items():
        fail("key", "create", "--pkcs11-uri", uri, home=home, env=vendor["env"], needles=(needle,))
    fail("key", "create", "--token", "encfs", "--pin-file", vendor["pin_file"], home=home, env=vendor["env"],
         needles=("--pkcs11-module",))
    assert state(home, vendor["tokendir"]) == before and not (home / "softhsm").exists()


def test_vendor_no_pin_source_without_tty(tmp_path: Path, vendor: dict[str, Any]) -> None:
    home = vendor_home(tmp_path, vendor)
    keys = (home / "keys.json").read_bytes()
    before = token_objects(vendor["tokendir"])
    fail("key", "create", "--pkcs11-module", MODULE, "--token", "encfs", home=home, env=vendor["env"],
         needles=("--pin-file", "'encfs'"))
    fail("key", "create", "--pkcs11-uri", f"pkcs11:token=encfs?module-path={MODULE}", home=home,
         env=vendor["env"], needles=("--pin-file",))
    assert token_objects(vendor["tokendir"]) == before
    assert (home / "keys.json").read_bytes() == keys
