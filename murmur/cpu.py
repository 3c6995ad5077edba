"""What this processor does well: its vector features, probed once, and the family they make.

Kernels are chosen by family, not by what torch can call: on an AVX2-only CPU a bf16 matmul or
`torch._int_mm` falls to generic code that runs 30-70x slower than fp32. `MURMUR_CPU` forces a
family (`avx2`, `avx512`, `avx512_bf16`, `amx`) so one machine can run another family's paths;
torch's `ATEN_CPU_CAPABILITY=avx2` and oneDNN's `ONEDNN_MAX_CPU_ISA=AVX2` lower it the same way.
"""
from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

FAMILIES = ("generic", "avx2", "avx512", "avx512_bf16", "amx")
# /proc/cpuinfo flag -> our name
_FLAGS = {"avx2": "avx2", "fma": "fma", "f16c": "f16c", "avx512f": "avx512", "avx512bw": "avx512bw",
          "avx512_vnni": "vnni", "avx_vnni": "avx_vnni", "avx512_bf16": "avx512_bf16",
          "amx_tile": "amx", "amx_bf16": "amx_bf16", "amx_int8": "amx_int8"}
# ONEDNN_MAX_CPU_ISA -> the highest family oneDNN may then use
_ONEDNN_CAP = {"SSE41": "generic", "AVX": "generic", "AVX2": "avx2", "AVX2_VNNI": "avx2",
               "AVX2_VNNI_2": "avx2", "AVX512_CORE": "avx512", "AVX512_CORE_VNNI": "avx512",
               "AVX512_CORE_BF16": "avx512_bf16", "AVX10_1_512": "avx512_bf16"}


@dataclass(frozen=True)
class CPUInfo:
    model: str
    features: frozenset[str]  # detected on the chip
    family: str  # what the kernels are chosen for (may be forced lower)
    forced: str | None  # how the family was forced, if it was

    @property
    def native_bf16(self) -> bool:
        """bf16 in hardware (AVX512-BF16 or AMX): bf16 GEMMs and LSTMs have real kernels."""
        return self.family in ("avx512_bf16", "amx")

    @property
    def avx512(self) -> bool:
        return self.family in ("avx512", "avx512_bf16", "amx")


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return model, flags


def _family(features: set[str]) -> str:
    if {"amx", "amx_bf16"} <= features:
        return "amx"
    if {"avx512", "avx512_bf16"} <= features:
        return "avx512_bf16"
    if "avx512" in features:
        return "avx512"
    if {"avx2", "fma"} <= features:
        return "avx2"
    return "generic"


@functools.lru_cache(maxsize=1)
def cpu_info() -> CPUInfo:
    model, flags = _cpuinfo()
    features = {ours for flag, ours in _FLAGS.items() if flag in flags}
    if not flags:  # no /proc/cpuinfo: ask torch
        import torch

        cap = torch.backends.cpu.get_cpu_capability().lower()
        features |= {"avx2", "fma"} if cap.startswith("avx") else set()
        features |= {"avx512"} if cap == "avx512" else set()
        if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
            features.add("avx512_bf16")
        if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
            features |= {"amx", "amx_bf16"}
    family, forced = _family(features), None
    want = os.environ.get("MURMUR_CPU", "").strip().lower()
    aten = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    if want:
        if want not in FAMILIES:
            from murmur.errors import MurmurError

            raise MurmurError(f"MURMUR_CPU={want!r}: choose one of {', '.join(FAMILIES)}")
        if FAMILIES.index(want) < FAMILIES.index(family):
            family, forced = want, f"MURMUR_CPU={want}"
    else:  # torch's and oneDNN's own caps lower the family too: their kernels obey them
        onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
        cap = {"avx2": "avx2", "default": "generic"}.get(aten) or _ONEDNN_CAP.get(onednn)
        if cap and FAMILIES.index(cap) < FAMILIES.index(family):
            family = cap
            forced = f"ATEN_CPU_CAPABILITY={aten}" if aten in ("avx2", "default") else f"ONEDNN_MAX_CPU_ISA={onednn}"
    return CPUInfo(model, frozenset(features), family, forced)


def native_bf16() -> bool:
    """The CPU computes bf16 in hardware, so bf16 paths may be chosen or asked for."""
    return cpu_info().native_bf16
