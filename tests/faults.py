"""The fault catalogue: each test of a fault says, with ``@fault(when, what)``, the situation
and what the package does in it. docs/weights.md's "What happens when…" table is this catalogue, in
this order; tests/test_faults.py fails when they differ. Print the table with

    python tests/faults.py
"""
from __future__ import annotations

import importlib
import pathlib
import sys

# Test modules holding @fault tests, in the order their rows appear in the table.
MODULES = ("test_download", "test_faults", "test_cache_faults", "test_fault_processes", "test_loading", "test_manifest",
           "test_cache", "test_disk_faults", "test_tool_faults", "test_checkpoint_faults")

_registered: dict[str, tuple[str, str]] = {}


def fault(when: str, what: str):
    """Record that the decorated test shows: ``when`` this happens, ``what`` the package does."""
    def mark(test):
        _registered[f"{pathlib.Path(test.__code__.co_filename).name}::{test.__name__}"] = (when, what)
        return test
    return mark


def catalogue() -> list[tuple[str, str, str]]:
    """(when, what, test) for every fault test, in table order."""
    for name in MODULES:
        importlib.import_module(name)
    order = {f"{name}.py": i for i, name in enumerate(MODULES)}
    rows = [(when, what, test) for test, (when, what) in _registered.items()]
    return sorted(rows, key=lambda row: order[row[2].split("::")[0]])  # stable: definition order within a file


def table() -> str:
    lines = ["| When… | What happens | Test |", "|---|---|---|"]
    lines += [f"| {when} | {what} | `{test}` |" for when, what, test in catalogue()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
    import faults  # the module the tests register with

    print(faults.table())
