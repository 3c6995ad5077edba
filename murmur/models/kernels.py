"""The kernel each op class runs on this CPU: what `auto` resolves to, and `murmur info`.

The rules come from measurements (docs/benchmarks.md, `murmur info --bench` shows them again on any
machine): bf16 is chosen only where the CPU has it in hardware; int8 runs on fbgemm's GEMM, with
8-bit rows where AVX-512 VNNI makes its sums exact, else 7-bit. `torch._int_mm` (oneDNN) is only a
candidate: generic code without VNNI, and slower than fbgemm with it (the logit head, 384x51864, one
row: 2.3 against 0.68 ms on a Xeon with AMX; an encoder GEMM 10.0 against 6.9 ms). The speech K/V
are bf16 wherever bf16 is native: on AMX read by SDPA; on AVX512-BF16 without AMX, where bf16 SDPA
runs 2-3x slower than fp32, by two matmuls (murmur.models.whisper.matmul_attention), which beat fp32
SDPA there; fp32 on AVX2.
"""
from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass

import torch

from murmur.cpu import CPUInfo, cpu_info


@dataclass(frozen=True)
class KernelPlan:
    compute_type: str  # resolved: auto never appears here
    encoder: str  # GEMMs of the encoder and the cross K/V projections (once per window)
    decoder: str  # per-token GEMMs and the logit head (memory-bound)
    speech_kv: str  # storage dtype of the decoder's cross-attention K/V
    attention: str  # attention over the speech K/V: "sdpa" or "matmul"
    encoder_attention: str  # the encoder's self-attention: "sdpa" or "matmul" (blocked)
    lstm: str  # VAD / speaker LSTMs
    int8: str | None  # int8 GEMM when one is used: "fbgemm8" or "fbgemm" (7-bit rows)

    def as_dict(self) -> dict:
        return asdict(self)


def int8_kernel(info: CPUInfo | None = None) -> str:
    info = info or cpu_info()
    return "fbgemm8" if info.avx512 and "vnni" in info.features else "fbgemm"


@functools.lru_cache(maxsize=None)
def _plan(compute_type: str, cuda: bool, info: CPUInfo) -> KernelPlan:
    if compute_type == "auto":
        # a CPU decode step is memory-bound, and int8 weights are a quarter of fp32's bytes
        compute_type = "float16" if cuda else ("int8_bfloat16" if info.native_bf16 else "int8")
    lstm = "bf16" if info.native_bf16 else "fp32"
    # bf16 matmuls without AMX: oneDNN's are fast, SDPA's bf16 kernel is not
    matmul = "matmul" if not cuda and info.family == "avx512_bf16" else "sdpa"
    if cuda or not compute_type.startswith("int8"):
        name = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[compute_type]
        kv = "fp32" if compute_type == "float32" and not cuda else name
        att = matmul if name == "bf16" else "sdpa"
        return KernelPlan(compute_type, name, name, kv, att, att, lstm, None)
    kernel = int8_kernel(info)
    enc = "bf16" if compute_type == "int8_bfloat16" else f"int8 {kernel}"
    kv = "bf16" if info.native_bf16 else "fp32"
    return KernelPlan(compute_type, enc, f"int8 {kernel}", kv, matmul if kv == "bf16" else "sdpa",
                      matmul if enc == "bf16" else "sdpa", lstm, kernel)


def kernel_plan(compute_type: str = "auto", device: str = "cpu") -> KernelPlan:
    """The plan for a compute type on `device` (cached: start-up pays one /proc/cpuinfo read)."""
    return _plan(compute_type, str(device).startswith("cuda"), cpu_info())


def facts(compute_type: str = "auto") -> dict:
    """What a benchmark records beside its figures: the CPU, torch, and the plan."""
    info = cpu_info()
    return {"cpu": info.model, "cpu_family": info.family, "cpu_features": sorted(info.features),
            "cpu_forced": info.forced, "torch": torch.__version__,
            "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "plan": kernel_plan(compute_type).as_dict()}


# --- micro-benchmark of the candidate paths (murmur info --bench) ------------------------------

def _time(fn, budget: float) -> float:
    fn()
    best, t_end = float("inf"), time.perf_counter() + budget
    while True:
        t0 = time.perf_counter()
        fn()
        t = time.perf_counter()
        best = min(best, t - t0)
        if t >= t_end:
            return best * 1e3


@torch.inference_mode()
def micro_bench(budget: float = 0.3, d: int = 384, vocab: int = 51864, frames: int = 1500,
                rows: int = 16, heads: int = 6) -> list[dict]:
    """ms (best of a short run) of each candidate for each op class, at tiny.en's sizes."""
    from murmur.models.quant import Fbgemm8Linear, FbgemmLinear, Int8Linear

    info = cpu_info()
    out = []

    def linear_row(op: str, m: int, k: int, n: int) -> None:
        x = torch.randn(m, k)
        lin = torch.nn.Linear(k, n)
        cands = {"fp32": lin, "int8 fbgemm": FbgemmLinear(lin.weight, lin.bias),
                 "int8 onednn": Int8Linear(lin.weight, lin.bias)}
        if int8_kernel(info) == "fbgemm8":  # 8-bit fbgemm rows are exact only with VNNI
            cands["int8 fbgemm8"] = Fbgemm8Linear(lin.weight, lin.bias)
        if info.native_bf16:
            lb = torch.nn.Linear(k, n).to(torch.bfloat16)
            cands["bf16"] = lambda _x, xb=x.to(torch.bfloat16): lb(xb)
        times = {}
        for name, f in cands.items():
            # _int_mm without VNNI, bf16 without hardware: generic code, 30-70x slower; one call says so
            slow = (name == "int8 onednn" and int8_kernel(info) != "fbgemm8")
            times[name] = _time(lambda: f(x), 0.0 if slow else budget)
        if not info.native_bf16:
            times["bf16"] = None  # never chosen here: no bf16 in hardware
        out.append({"op": op, "shape": f"{m}x{k} @ {k}x{n}", "ms": times})

    linear_row("encoder GEMM", frames, d, 4 * d)
    linear_row("decoder GEMM, 1 row", 1, d, 4 * d)
    linear_row(f"decoder GEMM, {rows} rows", rows, d, 4 * d)
    linear_row("logit head, 1 row", 1, d, vocab)
    linear_row(f"logit head, {rows} rows", rows, d, vocab)
    q = torch.randn(rows, heads, 1, d // heads)
    times = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if dt == torch.bfloat16 and not info.native_bf16:
            times[name] = None
            continue
        k = torch.randn(rows, heads, frames, d // heads, dtype=dt)
        v = torch.randn_like(k)
        qd = q.to(dt)
        times[f"{name} sdpa"] = _time(lambda: torch.nn.functional.scaled_dot_product_attention(qd, k, v), budget)
        if dt == torch.bfloat16:
            from murmur.models.whisper import matmul_attention
            times["bf16 matmul"] = _time(lambda: matmul_attention(qd, k, v, None, 0.0), budget)
    out.append({"op": f"speech attention, {rows} rows", "shape": f"{rows}x{heads}x{frames}x{d // heads}",
                "ms": times})
    return out


def format_info(bench: list[dict] | None = None) -> str:
    info = cpu_info()
    f = facts()
    lines = [f"CPU        {info.model}",
             f"features   {' '.join(sorted(info.features)) or '-'}",
             f"family     {info.family}" + (f" (forced by {info.forced})" if info.forced else ""),
             f"torch      {f['torch']} (ATen capability {f['torch_capability']}, {f['threads']} threads)",
             "", "path per op class (compute type auto, then each explicit one):"]
    for ct in ("auto", "int8", "int8_bfloat16", "float32"):
        p = kernel_plan(ct)
        lines.append(f"  {ct:<14} -> {p.compute_type:<14} encoder {p.encoder:<13} decoder {p.decoder:<13} "
                     f"speech K/V {p.speech_kv:<5} attention {p.attention:<6} encoder attention "
                     f"{p.encoder_attention:<6} LSTMs {p.lstm}")
    if not info.native_bf16:
        lines.append("  (int8_bfloat16 runs here only when asked for: no bf16 in hardware, it is slow)")
    lines += ["", "force another family's paths: MURMUR_CPU=avx2 (our probe) with ATEN_CPU_CAPABILITY=avx2 "
              "ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2; fbgemm picks its kernels itself"]
    if bench:
        lines += ["", "micro-benchmark, ms (best of a short run; - = never chosen here):"]
        for row in bench:
            cells = "  ".join(f"{k} {'-' if v is None else f'{v:.3f}'}" for k, v in row["ms"].items())
            lines.append(f"  {row['op']:<26} {row['shape']:<22} {cells}")
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="the CPU, its features and the kernel chosen for each op class")
    p.add_argument("--bench", action="store_true", help="time each candidate path here (about 10 s)")
    p.add_argument("--json", action="store_true", help="facts as JSON")
    p.set_defaults(func=_cmd)


def _cmd(args) -> int:
    import json

    bench = micro_bench() if args.bench else None
    if args.json:
        print(json.dumps({**facts(), "bench": bench}, indent=2))
    else:
        print(format_info(bench))
    return 0
