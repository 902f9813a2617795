"""The machine under `encfs bench` (bench.py): its description for results.json and results.md (CPUs,
memory, kernel, disks, tool versions), the backing store's filesystem and journal, and the state of free
page reporting to the hypervisor, with the memory warm-up for a run with reporting off.
"""

from __future__ import annotations

import mmap
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from bench_util import MiB

# A page order above x86-64's largest free block (MAX_PAGE_ORDER, 10): nothing is reported.
NO_REPORTING_ORDER = 11
_VIRTIO_BALLOON = "0x0005"
_VIRTIO_BALLOON_F_REPORTING = 5


def free_page_reporting(sys_root: Path = Path("/sys")) -> str | None:
    """Whether the guest hands freed pages back to the hypervisor: "on (order N)", "off (order N)",
    or None when no virtio balloon with free page reporting exists (bare metal, most VMs).

    When on, every drop_caches frees gigabytes that the host then reclaims; the reads that
    fill them again take host page faults. Measured on this project's VM: a 1 GiB cold read
    during a reporting pass ran at 675 MB/s against 1,209 without one, and alternate cold reads
    were slow (773-1,305 MB/s); with reporting off, 24 cold reads of four volumes fell within 985-1,295."""
    reporting = False
    for dev in sorted((sys_root / "bus/virtio/devices").glob("*")):
        try:
            kind = (dev / "device").read_text().strip()
            features = (dev / "features").read_text().strip()
        except OSError:
            continue
        if kind == _VIRTIO_BALLOON and features[_VIRTIO_BALLOON_F_REPORTING:_VIRTIO_BALLOON_F_REPORTING + 1] == "1":
            reporting = True
    if not reporting:
        return None
    try:
        order = int((sys_root / "module/page_reporting/parameters/page_reporting_order").read_text())
    except (OSError, ValueError):
        return "on"
    return f"{'off' if order >= NO_REPORTING_ORDER else 'on'} (order {order})"


def refault_memory(margin: int | None = None) -> tuple[float, int]:
    """Touch the free RAM once but ``margin`` (default: a quarter of the RAM, at least 1 GiB, so
    that other processes' allocations meanwhile do not wake the OOM killer), then free it;
    returns the seconds taken and the bytes touched.

    Pages the guest reported free are gone from the host until touched again, and the first run
    that fills the page cache pays the host's faults: measured here, the first 1 GiB sequential
    write after a reporting pass ran at 231 MB/s, the next at 755; after touching all free RAM
    (67 s when all of it had been reported), 710 and 718. Touching 6 GiB was not enough (585):
    the page cache does not take the freed pages first. With reporting off, the pages touched
    here stay backed for the timed runs."""
    info = {}
    with open("/proc/meminfo") as f:
        for ln in f:
            name, value = ln.split(":", 1)
            info[name] = int(value.split()[0]) * 1024
    if margin is None:
        margin = max(1 << 30, info.get("MemTotal", 0) // 4)
    size = (info.get("MemFree", 0) - margin) // MiB * MiB
    if size <= 0:
        return 0.0, 0
    t0 = time.perf_counter()
    chunk = bytes(64 * MiB)
    with mmap.mmap(-1, size) as m:
        for off in range(0, size, len(chunk)):
            m[off:off + min(len(chunk), size - off)] = chunk[:min(len(chunk), size - off)]
    return time.perf_counter() - t0, size


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
    except OSError:
        pass
    mem = ""
    try:
        mem = next((ln.split(":", 1)[1].strip() for ln in open("/proc/meminfo") if ln.startswith("MemTotal")), "")
    except OSError:
        pass
    disk = subprocess.run(["lsblk", "-d", "-o", "NAME,SIZE,ROTA,MODEL,TYPE"], capture_output=True, text=True).stdout
    versions = {}
    for tool, args in (("fio", ["--version"]), ("gocryptfs", ["-version"]), ("securefs", ["version"]),
                       ("cryfs", ["--version"]), ("nbdkit", ["--version"]), ("nbdfuse", ["--version"]),
                       ("cryptsetup", ["--version"])):
        if shutil.which(tool):
            p = subprocess.run([tool, *args], capture_output=True, text=True, timeout=30,
                               env=dict(os.environ, CRYFS_NO_UPDATE_CHECK="true"))
            versions[tool] = ((p.stdout or p.stderr).strip().splitlines() or [""])[0]
    return {"cpus": os.cpu_count(), "cpu_model": cpu, "memory": mem, "kernel": platform.release(),
            "platform": platform.platform(), "python": platform.python_version(), "disks": disk.strip(),
            "tools": versions, "free_page_reporting": free_page_reporting()}


def backing_store(path: Path, proc: Path = Path("/proc"), sys_root: Path = Path("/sys")) -> dict[str, Any]:
    """The filesystem under ``path``: its type, device and, for ext4, whether it has a journal
    (None when unknown). An ext4 without a journal makes a new inode skip every inode freed in the
    last 60-360 s, checking each one (fs/ext4/ialloc.c, recently_deleted): measured on this
    project's VM, one create in a directory after 2,000 deletes took 90-190 us against 4 without
    them, so each target's small-file creates depend on how many files the targets before it
    deleted (benchmarks/README.md)."""
    from encfs.fuseproto.mounting import mount_table

    st = os.stat(path)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    try:
        fstype, source = next(((m.fstype, m.source) for m in mount_table(proc / "self/mountinfo") if m.device == dev),
                              ("", ""))
    except OSError:
        fstype, source = "", ""
    journal = None
    # jbd2 names a journal by the kernel's name of the device ("dm-0-8", "loop0-8"), which the mount
    # source need not be (/dev/mapper/vg-root, /dev/root); a "/" in it is written "!".
    kernel_name = (sys_root / "dev/block" / dev).resolve().name if (sys_root / "dev/block" / dev).exists() else ""
    if fstype == "ext4" and kernel_name and (proc / "fs/jbd2").is_dir():
        journal = any(p.name.rsplit("-", 1)[0].replace("!", "/") == kernel_name
                      for p in (proc / "fs/jbd2").iterdir())
    return {"fstype": fstype, "source": source, "journal": journal}


def describe_backing_store(store: dict[str, Any]) -> str:
    journal = {True: ", with a journal", False: ", WITHOUT a journal", None: ""}[store["journal"]]
    return f"{store['fstype'] or 'unknown'} on {store['source'] or 'unknown'}{journal}"
