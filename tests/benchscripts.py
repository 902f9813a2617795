"""The scripts under benchmarks/ (not a package), loaded as modules for their tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def load_script(name: str) -> ModuleType:
    """benchmarks/``name``.py as a fresh module, registered in sys.modules (dataclasses look
    their module up there)."""
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", BENCHMARKS / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def mounted_under(path: Path) -> list[str]:
    """The mountpoints below ``path`` (what a run left mounted there)."""
    with open("/proc/self/mounts", encoding="utf-8") as f:
        return [ln.split()[1] for ln in f if ln.split()[1].startswith(str(path))]
