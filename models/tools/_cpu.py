"""The CPU features that decide which precision is fast: AVX2, AVX-512 (F, VNNI, BF16), AMX
(BF16, INT8). Read from ``/proc/cpuinfo`` on Linux, else from the probes PyTorch ships
(cpuinfo-based, any OS); printed by the benchmark and used to choose OpenVINO's precision."""
from __future__ import annotations

import contextlib
import functools
import pathlib
import platform
import subprocess
import sys
from typing import Any

# Linux /proc/cpuinfo flag names; "avx_vnni" is the 256-bit VNNI of Alder Lake and later.
FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8")


def _from_cpuinfo(text: str) -> dict[str, Any] | None:
    """Vendor, model name and features from the text of ``/proc/cpuinfo`` (its first CPU)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block is enough
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    if not flags:
        return None
    found: dict[str, Any] = {"vendor": fields.get("vendor_id") or fields.get("cpu implementer", ""),
                             "model": fields.get("model name") or fields.get("cpu model", ""),
                             "source": "/proc/cpuinfo"}
    found.update({name: name in flags for name in FEATURES})
    # ARM (Graviton 3, Neoverse V1/V2, Apple M2 under Linux) calls its bfloat16 instructions "bf16"
    found["arm_bf16"] = "bf16" in flags and "asimd" in flags
    return found


def _from_torch() -> dict[str, Any]:
    """Off Linux: PyTorch's cpuinfo probes (no avx512f/amx_int8 split: AVX-512 and AMX tiles)."""
    import torch

    def probe(name: str) -> bool:
        with contextlib.suppress(AttributeError, RuntimeError):
            return bool(getattr(torch.cpu, name)())
        return False

    amx = probe("_is_amx_tile_supported")
    found: dict[str, Any] = {"vendor": "", "model": _model_name(), "source": "torch.cpu probes"}
    found.update({"avx2": probe("_is_avx2_supported"), "avx512f": probe("_is_avx512_supported"),
                  "avx512_vnni": probe("_is_vnni_supported") and probe("_is_avx512_supported"),
                  "avx512_bf16": probe("_is_avx512_bf16_supported"), "avx_vnni": False,
                  "amx_bf16": amx, "amx_int8": amx, "arm_bf16": False})
    return found


def _model_name() -> str:
    if sys.platform == "darwin":
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5).stdout.strip()
    return platform.processor() or platform.machine()


@functools.cache
def cpu_features() -> dict[str, Any]:
    """``vendor``, ``model`` (the CPU's name), ``source`` (where this was read), and for each of
    ``FEATURES`` (and ``arm_bf16``) whether the CPU has it."""
    with contextlib.suppress(OSError):
        found = _from_cpuinfo(pathlib.Path("/proc/cpuinfo").read_text(errors="replace"))
        if found is not None:
            return found
    return _from_torch()


def native_bf16(features: dict[str, Any] | None = None) -> bool:
    """Whether the CPU computes in bfloat16 natively (AVX-512 BF16, AMX-BF16, ARM BF16);
    elsewhere a runtime either falls back to float32 or emulates it, slower than float32."""
    f = features if features is not None else cpu_features()
    return bool(f.get("avx512_bf16") or f.get("amx_bf16") or f.get("arm_bf16"))


def native_int8(features: dict[str, Any] | None = None) -> bool:
    """Whether the CPU has int8 dot-product instructions (VNNI, AMX-INT8); AVX2 alone multiplies
    int8 through 16-bit sums, where INT8 gains little over float32."""
    f = features if features is not None else cpu_features()
    return bool(f.get("avx512_vnni") or f.get("avx_vnni") or f.get("amx_int8"))


def summary(features: dict[str, Any] | None = None) -> str:
    """One line: the CPU and the features it has, e.g. ``AMD EPYC: avx2 (no avx512f, amx)``."""
    f = features if features is not None else cpu_features()
    have = [name for name in FEATURES if f.get(name)]
    missing = [name for name in ("avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if not f.get(name)]
    return (f"{f.get('model') or 'unknown CPU'}: {' '.join(have) or 'none of ' + ' '.join(FEATURES)}"
            + (f" (no {' '.join(missing)})" if missing and have else ""))
