"""What `encfs bench` (bench.py) reports: the metrics, the ratio columns and their denominators, the
summary of each cell's samples, and the outputs: results.json, results.md (the machine and the tables,
also printed) and bench.png.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from bench_machine import describe_backing_store
from bench_util import log

# metric key -> (label, unit)
METRICS = {
    "seq_write": ("sequential write + fsync", "MB/s"),
    "seq_read_cold": ("sequential read, cold cache", "MB/s"),
    "two_writers": ("two writers, two files, + fsync (aggregate)", "MB/s"),
    "rand_read_4k": ("fio 4 KiB random read, QD16", "IOPS"),
    "rand_write_4k": ("fio 4 KiB random write, QD16", "IOPS"),
    "small_create": ("small files: create+write (+sync)", "files/s"),
    "small_stat": ("small files: stat, cold", "files/s"),
    "small_read": ("small files: read, cold", "files/s"),
    "small_delete": ("small files: delete (+sync)", "files/s"),
    "untar": ("untar source tree (+sync)", "entries/s"),
    "sqlite": ("SQLite insert+commit", "tx/s"),
}
KEY_METRICS = {
    "generate_data_key": ("key service: GenerateDataKey", "ops/s"),
    "decrypt": ("key service: Decrypt data key", "ops/s"),
}

# The filesystem peers (issue #25's goal: every row at least the best of them, per row).
PEERS = ("gocryptfs", "securefs", "cryfs")
# The rows whose workload waits for fsync (fio's random writes end in one): a target whose fsync did
# not survive its daemon's kill (bench_durability.py) is no "best peer" on them. The rows that end in
# sync(2) are not among them: on a /dev/fuse mount sync asks the daemon nothing (FUSE_SYNCFS is
# sent only to servers that set sync_fs, virtiofs), so no daemon is held to them there.
DURABLE_ROWS = frozenset({"seq_write", "two_writers", "rand_write_4k", "sqlite"})

RATIOS: list[tuple[str, str, str | tuple[str, ...]]] = [  # (label, numerator, denominator: a target or
    # the best of several on each row)
    ("encfs / null cipher", "encfs", "encfs-null"),
    ("pyfuse3 server / encfs server", "encfs-pyfuse3", "encfs"),
    ("pyfuse3 server / encfs server, null cipher", "encfs-pyfuse3-null", "encfs-null"),
    ("encfs / gocryptfs", "encfs", "gocryptfs"),
    ("encfs / best peer", "encfs", PEERS),
    ("encfs / baseline checkout", "encfs", "encfs-baseline"),
    ("encfs over io_uring / encfs", "encfs-uring", "encfs"),
    ("encfs over io_uring / gocryptfs", "encfs-uring", "gocryptfs"),
    ("encfs over io_uring / its baseline checkout", "encfs-uring", "encfs-uring-baseline"),
    ("encfs --keep-cpu-awake / encfs", "encfs-awake", "encfs"),
    ("encfs --keep-cpu-awake / gocryptfs", "encfs-awake", "gocryptfs"),
    ("encfs 32 KiB blocks / encfs", "encfs-32k", "encfs"),
    ("encfs 32 KiB blocks / its null cipher", "encfs-32k", "encfs-null-32k"),
    ("encfs volume / null-cipher volume", "encfs-volume", "encfs-volume-null"),
    ("encfs volume / its baseline checkout", "encfs-volume", "encfs-volume-baseline"),
    ("volume format 2 / format 1", "encfs-volume", "encfs-volume-v1"),
    ("format-1 volume / its null cipher", "encfs-volume-v1", "encfs-volume-null-v1"),
    ("encfs volume / plain loop", "encfs-volume", "loop-plain"),
    ("encfs volume / userspace LUKS", "encfs-volume", "luks-nbdkit"),
]


def not_durable(targets: dict[str, dict[str, Any]]) -> frozenset[str]:
    """The targets whose fsync probe (bench_durability.py) lost the file."""
    return frozenset(t for t, s in targets.items() if (s.get("fsync_probe") or {}).get("durable") is False)


def denominator(results: dict[str, dict[str, Any]], b: str | tuple[str, ...], key: str,
                lost_fsync: frozenset[str] = frozenset()) -> tuple[str, dict[str, Any] | None]:
    """A ratio's denominator on one row: the target ``b``, or the one of ``b`` with the highest
    median there (name, summary), leaving out on DURABLE_ROWS the targets of ``lost_fsync``; the
    summary is None if no such target measured the row."""
    names = (b,) if isinstance(b, str) else tuple(
        t for t in b if key not in DURABLE_ROWS or t not in lost_fsync)
    if not names:
        return b[0], None
    measured = [(results[t][key]["median"], t) for t in names if results.get(t, {}).get(key)]
    if not measured:
        return names[0], None
    best = max(measured)[1]
    return best, results[best][key]


def summarize(samples: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": samples}


def summarize_rows(module: Any, samples: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    """A sibling module's samples, summarized and labelled, in its order."""
    return {k: dict(summarize(v), label=module.label(k)[0], unit=module.label(k)[1])
            for k, v in sorted(samples.items(), key=lambda kv: module.order(kv[0]))}


def fmt(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:,.1f}" if v >= 10 else f"{v:.2f}"


def markdown(result: dict[str, Any]) -> str:
    names = [t for t in result["targets"] if result["targets"][t]["status"] == "ok"]
    res = result["results"]
    lines = [f"Median of {result['repeats']} repetition(s) (min-max below the median); all rates, higher is better. "
             f"Scale `{result['scale']['name']}`.", ""]
    lines.append("| workload | unit | " + " | ".join(names) + " |")
    lines.append("|---|---|" + "---:|" * len(names))
    for key, (label, unit) in METRICS.items():
        cells = []
        for t in names:
            s = res.get(t, {}).get(key)
            cells.append(f"{fmt(s['median'])}<br><sub>{fmt(s['min'])}-{fmt(s['max'])}</sub>" if s else "-")
        if any(c != "-" for c in cells):
            lines.append(f"| {label} | {unit} | " + " | ".join(cells) + " |")
    ks = result.get("key_service") or {}
    for key, (label, unit) in KEY_METRICS.items():
        if key in ks:
            s = ks[key]
            lines.append(f"| {label} (not per target) | {unit} | {fmt(s['median'])} "
                         f"<sub>{fmt(s['min'])}-{fmt(s['max'])}</sub> |" + " |" * (len(names) - 1))
    lines += ["", "Ratios of medians (1.00 = as fast; below 1 = slower):", ""]
    lines.append("| workload | " + " | ".join(r[0] for r in RATIOS) + " |")
    lines.append("|---|" + "---:|" * len(RATIOS))
    reasons = {}
    lost = not_durable(result["targets"])
    for key, (label, _unit) in METRICS.items():
        cells = []
        for rlabel, a, b in RATIOS:
            bname, sb = denominator(res, b, key, lost)
            sa = res.get(a, {}).get(key)
            if sa and sb and sb["median"] > 0:
                cells.append(f"{sa['median'] / sb['median']:.2f}" + ("" if isinstance(b, str) else f" ({bname})"))
            elif sa and not isinstance(b, str) and key in DURABLE_ROWS and any(
                    res.get(t, {}).get(key) for t in b if t in lost):
                reasons[rlabel] = ("where every peer that measured a row lost its fsync'd file in the fsync "
                                   "probe (below)")
                cells.append("n/a")
            else:
                missing = next((t for t in (a, bname) if not res.get(t, {}).get(key)), bname)
                reasons[missing] = (result["targets"].get(missing, {}).get("reason")
                                    or ("no numbers for rows whose workload did not run or gave none "
                                        "(--workloads, or see the notes)"
                                        if res.get(missing) else "not selected (--targets)"))
                cells.append("n/a")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if reasons:
        lines += [""] + [f"- n/a `{t}`: {r}" for t, r in reasons.items()]
    probes = {t: s["fsync_probe"] for t, s in result["targets"].items() if s.get("fsync_probe")}
    if probes:
        lines += ["", "fsync probe (a file written and fsync'd, its daemon killed with SIGKILL at once, mounted "
                      "again; benchmarks/bench_durability.py): "
                  + ", ".join(f"{t} **{p['detail']}**" if p["durable"] is False else f"{t} {p['detail']}"
                              for t, p in probes.items())]
        if lost:
            rows = "; ".join(METRICS[k][0] for k in METRICS if k in DURABLE_ROWS)
            lines += ["", f"Not durable, so not a \"best peer\" on the rows that wait for fsync ({rows}): "
                          + ", ".join(f"`{t}`" for t in sorted(lost)) + "."]
    mib = result["scale"]["snapshot_mib"]
    for key, intro in (("snapshots", f"Snapshots of a format-2 volume of {mib} MiB (no filesystem; "
                                     "benchmarks/snapshot_bench.py)"),
                       ("rekey", f"Re-key and check of a format-2 volume of {mib} MiB and of a CIPHERDIR "
                                 "holding the source tree (benchmarks/rekey_bench.py)"),
                       ("keyd", "The key daemon (`encfs keyd`, a fresh embedded token) beside the key service in "
                                "process, in the same repetition (benchmarks/keyd_bench.py; #24's goal: a ratio of "
                                "at least 0.5 at 16 clients)")):
        rows = result.get(key) or {}
        if rows:
            how = ("rates in operations per second and their ratios, higher is better" if key == "keyd"
                   else "times in seconds, lower is better")
            lines += ["", f"{intro}, median of the repetitions (min-max); {how}:", "",
                      "| measure | unit | median | min-max |", "|---|---|---:|---:|"]
            for s in rows.values():
                f = (lambda v: f"{v:.3f}") if s["unit"] in ("s", "ratio") else fmt
                lines.append(f"| {s['label']} | {s['unit']} | {f(s['median'])} | {f(s['min'])}-{f(s['max'])} |")
    other = [(t, v) for t, v in result["targets"].items() if v["status"] != "ok"]
    if other:
        lines += ["", "Targets not measured: " + "; ".join(f"`{t}` ({v['reason']})" for t, v in other)]
    fd = result.get("extra", {}).get("fio_direct")
    if fd:
        lines += ["", "fio O_DIRECT: " + ", ".join(f"{t} {'yes' if v else 'no (buffered)'}" for t, v in fd.items())]
    if result["notes"]:
        lines += [""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines)


def charts(result: dict[str, Any], out: Path) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("note: matplotlib is not installed: no PNG charts (pip install 'encfs[bench]' or matplotlib)")
        return []
    names = [t for t in result["targets"] if result["targets"][t]["status"] == "ok"]
    keys = [k for k in METRICS if any(k in result["results"].get(t, {}) for t in names)]
    cols = 2
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(13, 3.2 * rows), squeeze=False)
    colors = {t: plt.cm.tab10(i % 10) for i, t in enumerate(names)}
    for ax, key in zip(axes.flat, keys):
        label, unit = METRICS[key]
        xs, med, lo, hi, cs = [], [], [], [], []
        for t in names:
            s = result["results"].get(t, {}).get(key)
            if s:
                xs.append(t)
                med.append(s["median"])
                lo.append(s["median"] - s["min"])
                hi.append(s["max"] - s["median"])
                cs.append(colors[t])
        ax.barh(xs, med, xerr=[lo, hi], color=cs, capsize=3)
        ax.invert_yaxis()
        ax.set_title(f"{label} ({unit})", fontsize=10)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(f"encfs bench ({result['scale']['name']}, median of {result['repeats']}, "
                 f"bars = min-max), higher is better", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path = out / "bench.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [str(path)]


def write_results(result: dict[str, Any], out: Path, workdir: str) -> None:
    """Fill in ``result``'s ratios, write results.json, results.md and bench.png into ``out`` and
    print the tables and what was written (``workdir``: where the backing stores were)."""
    lost = not_durable(result["targets"])
    for label, a, b in RATIOS:
        for key in METRICS:
            sa, sb = result["results"].get(a, {}).get(key), denominator(result["results"], b, key, lost)[1]
            result["ratios"].setdefault(label, {})[key] = (sa["median"] / sb["median"]) if sa and sb else None
    table = markdown(result)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    m = result["machine"]
    (out / "results.md").write_text(
        f"# encfs bench, {result['date']}\n\nMachine: {m['cpus']} CPUs ({m['cpu_model']}), {m['memory']} RAM, "
        f"kernel {m['kernel']}, Python {m['python']}; backing store in {workdir} "
        f"({describe_backing_store(m['backing_store'])}); "
        f"free page reporting to the hypervisor: {m['free_page_reporting'] or 'none'}.\n\n"
        f"```\n{m['disks']}\n```\n\nTools: " + ", ".join(f"{k}: {v}" for k, v in m["tools"].items())
        + f"\n\nWall time: {result['seconds']} s.\n\n{table}\n")
    pngs = charts(result, out)
    print(table)
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'}" + "".join(f", {p}" for p in pngs))
