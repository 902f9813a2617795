"""Concurrency of the key service on a real SoftHSM2 token.

Threads share one KeyService (and so one PKCS#11 session, which SoftHSM2
cannot use concurrently without the token layer's lock). Processes each open
their own KeyService on the same metadata home and the same token, exchange
ciphertext blobs through files and update aliases concurrently; no metadata
update may be lost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from encfs.keys.cache import DataKeyCache
from encfs.keys.service import KeyService, token_object_id
from encfs.keys.softhsm import EmbeddedSoftHSM
from encfs.keys.token import Token

N_THREADS = 8
ROUND_TRIPS = 150


def _run_threads(n: int, fn: Any) -> list[Any]:
    """Run fn(i) in n threads that start together; re-raise the first failure."""
    barrier = threading.Barrier(n)

    def start(i: int) -> Any:
        barrier.wait(timeout=60)
        return fn(i)

    with ThreadPoolExecutor(max_workers=n) as pool:
        futures = [pool.submit(start, i) for i in range(n)]
        return [f.result(timeout=300) for f in futures]


def test_threads_round_trip_data_keys(service: KeyService) -> None:
    keys = [service.create_key(description=f"thread key {i}")["KeyId"] for i in range(2)]

    def work(i: int) -> tuple[int, set[bytes]]:
        key = keys[i % len(keys)]
        ctx = {"thread": str(i)}
        seen: set[bytes] = set()
        for n in range(ROUND_TRIPS):
            dk = service.generate_data_key(key, ctx)
            assert dk.plaintext is not None and len(dk.plaintext) == 32
            out = service.decrypt(dk.ciphertext_blob, ctx)
            assert out.plaintext == dk.plaintext, (i, n)
            assert out.key_id == key
            seen.add(dk.plaintext)
        return i, seen

    results = _run_threads(N_THREADS, work)
    all_keys: set[bytes] = set()
    for i, seen in results:
        assert len(seen) == ROUND_TRIPS, i
        all_keys |= seen
    assert len(all_keys) == N_THREADS * ROUND_TRIPS  # every data key distinct

    # every call was audited as a success, with whole (parseable) lines
    recs = list(service.audit.read())
    gen = [r for r in recs if r["operation"] == "GenerateDataKey"]
    dec = [r for r in recs if r["operation"] == "Decrypt"]
    assert len(gen) == len(dec) == N_THREADS * ROUND_TRIPS
    assert all(r["outcome"] == "success" for r in gen + dec)


def test_threads_encrypt_while_rotating_and_caching(service: KeyService) -> None:
    """Data keys made during concurrent rotations all decrypt, cached or not."""
    key = service.create_key(alias="busy")["KeyId"]
    cache = DataKeyCache(max_uses=3)
    rotations = 5

    def work(i: int) -> list[tuple[bytes, bytes, int]]:
        if i == 0:
            for _ in range(rotations):
                service.rotate_key("busy")
            return []
        made = []
        for n in range(40):
            ctx = {"t": str(i), "n": str(n)}
            blob = service.encrypt("alias/busy", f"{i}:{n}".encode(), ctx)
            made.append((blob, f"{i}:{n}".encode(), n))
            out = service.decrypt(blob, ctx, cache=cache)
            assert out.plaintext == f"{i}:{n}".encode()
            assert service.decrypt(blob, ctx, cache=cache).plaintext == out.plaintext
        return made

    results = _run_threads(6, work)
    assert service.describe_key(key)["CurrentKeyVersion"] == rotations + 1
    versions = set()
    for i, made in enumerate(results):
        for blob, plaintext, n in made:
            out = service.decrypt(blob, {"t": str(i), "n": str(n)})
            assert out.plaintext == plaintext
            versions.add(out.key_version)
    assert versions <= set(range(1, rotations + 2))
    assert cache.hits > 0


def test_threads_metadata_updates_are_not_lost(service: KeyService) -> None:
    keys = [service.create_key()["KeyId"] for _ in range(2)]

    def work(i: int) -> list[str]:
        created = [service.create_key(alias=f"t{i}-key")["KeyId"]]
        for n in range(10):
            service.update_alias(f"t{i}-a{n}", keys[(i + n) % 2])
        service.delete_alias(f"t{i}-a0")
        return created

    results = _run_threads(N_THREADS, work)
    aliases = service.list_aliases()
    listed = {k["KeyId"] for k in service.list_keys()}
    for i, created in enumerate(results):
        assert aliases[f"alias/t{i}-key"] == created[0]
        assert created[0] in listed
        assert f"alias/t{i}-a0" not in aliases
        for n in range(1, 10):
            assert aliases[f"alias/t{i}-a{n}"] == keys[(i + n) % 2]
    assert len(listed) == 2 + N_THREADS
    assert len(aliases) == N_THREADS * 10


# -- processes -----------------------------------------------------------------

HELPER = textwrap.dedent(r"""
    import json, sys
    from pathlib import Path
    from encfs.keys.service import KeyService, token_object_id
    from encfs.keys.softhsm import EmbeddedSoftHSM
    from encfs.keys.token import Token
    hsm_parent, home, action, arg = sys.argv[1:]
    token = Token(EmbeddedSoftHSM(Path(hsm_parent)).spec())
    if action == "create":
        ks = KeyService(Path(home), token)
        key = ks.create_key(description="made by a helper process")["KeyId"]
        print(json.dumps({"key": key, "blob": ks.encrypt(key, arg.encode()).hex()}))
    elif action == "has":
        print(json.dumps({"has": token.has_object(bytes.fromhex(arg))}))
    token.close()
""")


def _helper(softhsm: EmbeddedSoftHSM, home: Path, action: str, arg: str) -> dict[str, Any]:
    env = dict(os.environ, SOFTHSM2_CONF=str(softhsm.conf))
    proc = subprocess.run([sys.executable, "-c", HELPER, str(softhsm.dir.parent), str(home), action, arg],
                          env=env, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return json.loads(proc.stdout)


def test_keys_created_by_another_process_stay_visible(softhsm: EmbeddedSoftHSM, token: Token,
                                                      tmp_path: Path, clock: Any) -> None:
    """This process writes to the token after another process created a key; it must still find that key.

    SoftHSM2 re-indexes a token only when the token's generation counter moved since
    this process last looked, and this process's own writes absorb the other
    process's increment: the other key stays invisible unless the service reloads.
    """
    home = tmp_path / "home"
    ks = KeyService(home, token, clock=clock)
    try:
        mine = ks.create_key()["KeyId"]
        theirs = _helper(softhsm, home, "create", "sealed elsewhere")
        ks.create_key()  # a write by this process after the other process's write
        out = ks.decrypt(bytes.fromhex(theirs["blob"]))
        assert (out.key_id, out.plaintext) == (theirs["key"], b"sealed elsewhere")
        assert ks.describe_key(theirs["key"])["TokenAttributes"]["sensitive"] is True

        # deleting it from this process really destroys the other process's token object
        victim = _helper(softhsm, home, "create", "x")
        ks.rotate_key(mine)  # another write by this process
        ks.schedule_key_deletion(victim["key"], days=7)
        clock.advance(days=8)
        assert victim["key"] not in {k["KeyId"] for k in ks.list_keys()}
        tid = token_object_id(victim["key"], 1)
        assert not token.has_object(tid)
        assert _helper(softhsm, home, "has", tid.hex()) == {"has": False}  # a fresh process agrees
        assert _helper(softhsm, home, "has", token_object_id(mine, 2).hex()) == {"has": True}
    finally:
        ks.audit.close()

CHILD = textwrap.dedent(r"""
    import json, os, sys, time
    from pathlib import Path
    from encfs.keys.service import KeyService
    from encfs.keys.softhsm import EmbeddedSoftHSM
    from encfs.keys.token import Token

    hsm_parent, home, xdir, me, nprocs, nkeys, ndk, naliases = sys.argv[1:]
    me, nprocs, nkeys, ndk, naliases = int(me), int(nprocs), int(nkeys), int(ndk), int(naliases)
    xdir = Path(xdir)
    ks = KeyService(Path(home), Token(EmbeddedSoftHSM(Path(hsm_parent)).spec()))

    def wait_for(path):
        deadline = time.monotonic() + 20
        while not path.exists():
            if time.monotonic() > deadline:
                sys.exit(f"child {me}: gave up waiting for {path}")
            time.sleep(0.02)

    # start together, so that metadata writes really overlap
    (xdir / f"ready-{me}").touch()
    for j in range(nprocs):
        wait_for(xdir / f"ready-{j}")

    keys = [ks.create_key(description=f"proc {me} key {k}", alias=f"p{me}-k{k}")["KeyId"]
            for k in range(nkeys)]
    out = {"pid": os.getpid(), "keys": keys, "items": []}
    for n in range(ndk):
        ctx = {"proc": str(me), "n": str(n)}
        if n % 2:
            dk = ks.generate_data_key(keys[n % nkeys], ctx)
            out["items"].append({"blob": dk.ciphertext_blob.hex(), "plaintext": dk.plaintext.hex(), "ctx": ctx})
        else:
            msg = f"message {n} from process {me}".encode()
            blob = ks.encrypt(f"alias/p{me}-k{n % nkeys}", msg, ctx)
            out["items"].append({"blob": blob.hex(), "plaintext": msg.hex(), "ctx": ctx})
        # interleave metadata writes with crypto
        if n < naliases:
            ks.update_alias(f"p{me}-a{n}", keys[n % nkeys])
            ks.update_alias("shared", keys[0])
    for n in range(ndk, naliases):
        ks.update_alias(f"p{me}-a{n}", keys[n % nkeys])
    tmp = xdir / f"{me}.json.tmp"
    tmp.write_text(json.dumps(out))
    os.replace(tmp, xdir / f"{me}.json")

    # decrypt what every other process produced, and move some of it under our own key
    checked = 0
    for j in range(nprocs):
        if j == me:
            continue
        wait_for(xdir / f"{j}.json")
        theirs = json.loads((xdir / f"{j}.json").read_text())
        for item in theirs["items"]:
            got = ks.decrypt(bytes.fromhex(item["blob"]), item["ctx"])
            assert got.plaintext.hex() == item["plaintext"], (j, item)
            assert got.key_id in theirs["keys"]
            checked += 1
        moved = ks.re_encrypt(bytes.fromhex(theirs["items"][0]["blob"]), theirs["items"][0]["ctx"],
                              keys[0], {"moved-by": str(me)})
        assert ks.decrypt(moved, {"moved-by": str(me)}).plaintext.hex() == theirs["items"][0]["plaintext"]
        assert ks.describe_key(f"p{j}-k0")["KeyId"] == theirs["keys"][0]
    ks.close()
    print(json.dumps({"me": me, "checked": checked}))
""")


def test_processes_share_token_and_metadata(softhsm: EmbeddedSoftHSM, token: Token, tmp_path: Path) -> None:
    nprocs, nkeys, ndk, naliases = 4, 3, 12, 15
    home = tmp_path / "shared-home"
    xdir = tmp_path / "exchange"
    xdir.mkdir()
    hsm_parent = softhsm.dir.parent
    env = dict(os.environ, SOFTHSM2_CONF=str(softhsm.conf))
    pkg_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [pkg_root, os.environ.get("PYTHONPATH")]))
    procs = [
        subprocess.Popen([sys.executable, "-c", CHILD, str(hsm_parent), str(home), str(xdir), str(i),
                          str(nprocs), str(nkeys), str(ndk), str(naliases)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for i in range(nprocs)
    ]
    outputs = []
    try:
        for i, p in enumerate(procs):
            out, err = p.communicate(timeout=240)
            outputs.append((p.returncode, out.decode(), err.decode()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = {i: (rc, err[-3000:]) for i, (rc, out, err) in enumerate(outputs) if rc != 0}
    assert not failed, "\n\n".join(f"child {i} exit {rc}:\n{e}" for i, (rc, e) in failed.items())
    for i, (rc, out, err) in enumerate(outputs):
        report = json.loads(out.strip().splitlines()[-1])
        assert report == {"me": i, "checked": (nprocs - 1) * ndk}

    # every key and alias made by every process survived in keys.json
    meta = json.loads((home / "keys.json").read_text())
    produced = [json.loads((xdir / f"{i}.json").read_text()) for i in range(nprocs)]
    all_keys = [k for p in produced for k in p["keys"]]
    assert len(set(all_keys)) == nprocs * nkeys
    assert set(meta["keys"]) == set(all_keys)
    for k in all_keys:
        assert meta["keys"][k]["state"] == "Enabled"
        assert [v["version"] for v in meta["keys"][k]["versions"]] == [1]
        assert token.has_object(token_object_id(k, 1))
    aliases = meta["aliases"]
    for i, p in enumerate(produced):
        for k in range(nkeys):
            assert aliases[f"alias/p{i}-k{k}"] == p["keys"][k]
        for n in range(naliases):
            assert aliases[f"alias/p{i}-a{n}"] == p["keys"][n % nkeys]
    assert aliases["alias/shared"] in {p["keys"][0] for p in produced}
    assert len(aliases) == nprocs * (nkeys + naliases) + 1

    # this process (whose SoftHSM2 was loaded before the children ran) sees their keys too
    ks = KeyService(home, token)
    try:
        for p in produced:
            item = p["items"][-1]
            assert ks.decrypt(bytes.fromhex(item["blob"]), item["ctx"]).plaintext.hex() == item["plaintext"]
        # audit: whole JSON lines from every child, none carrying a plaintext
        raw = (home / "audit.log").read_bytes()
        recs = [json.loads(line) for line in raw.splitlines()]
        pids = {r["principal"]["pid"] for r in recs}
        assert {p["pid"] for p in produced} <= pids
        assert sum(r["operation"] == "UpdateAlias" for r in recs) == nprocs * (naliases + min(ndk, naliases))
        assert all(r["outcome"] == "success" for r in recs)
        for p in produced:
            for item in p["items"]:
                assert bytes.fromhex(item["plaintext"]) not in raw
                assert item["plaintext"].encode() not in raw
    finally:
        ks.audit.close()


@pytest.mark.parametrize("nprocs", [3])
def test_processes_racing_on_one_alias_and_key_state(softhsm: EmbeddedSoftHSM, token: Token, tmp_path: Path,
                                                      nprocs: int) -> None:
    """Concurrent transitions on one key from several processes leave consistent metadata."""
    home = tmp_path / "race-home"
    ks = KeyService(home, token)
    key = ks.create_key(alias="contended")["KeyId"]
    script = textwrap.dedent(r"""
        import sys
        from pathlib import Path
        from encfs.keys.service import KeyService
        from encfs.keys.softhsm import EmbeddedSoftHSM
        from encfs.keys.token import Token
        hsm_parent, home, me, phase = sys.argv[1:]
        ks = KeyService(Path(home), Token(EmbeddedSoftHSM(Path(hsm_parent)).spec()))
        if phase == "states":
            for n in range(20):
                ks.disable_key("contended")
                ks.enable_key("contended")
                ks.update_alias(f"race-{me}-{n}", "contended")
        else:
            for n in range(2):
                ks.rotate_key("contended")
        ks.close()
    """)
    env = dict(os.environ, SOFTHSM2_CONF=str(softhsm.conf))
    # Two rounds: a rotation racing with another process's disable would rightly fail.
    for phase in ("states", "rotate"):
        procs = [subprocess.Popen([sys.executable, "-c", script, str(softhsm.dir.parent), str(home), str(i),
                                   phase], env=env, stderr=subprocess.PIPE) for i in range(nprocs)]
        try:
            errs = [p.communicate(timeout=240)[1].decode() for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        for p, err in zip(procs, errs):
            assert p.returncode == 0, f"{phase}: {err[-3000:]}"
    try:
        desc = ks.describe_key(key)
        # every process's two rotations produced a distinct version: none lost or duplicated
        assert [v["Version"] for v in desc["KeyVersions"]] == list(range(1, 2 * nprocs + 2))
        for v in range(1, 2 * nprocs + 2):
            assert token.has_object(token_object_id(key, v))
        assert desc["KeyState"] == "Enabled"
        assert len(desc["Aliases"]) == 1 + 20 * nprocs
        ks.encrypt(key, b"still works")
    finally:
        ks.audit.close()
