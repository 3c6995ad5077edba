"""The kernel plan per CPU family, and the default path's batch invariance on each family."""
from __future__ import annotations

import pytest
import torch

import murmur
from murmur import cpu
from murmur.audio.decode import load_audio
from murmur.models import kernels
from murmur.models.quant import Fbgemm8Linear, FbgemmLinear, Int8Linear


@pytest.fixture
def family(monkeypatch):
    """Force the probe to a family (as MURMUR_CPU does); the real probe comes back after."""
    def force(name):
        monkeypatch.setenv("MURMUR_CPU", name)
        cpu.cpu_info.cache_clear()
        return cpu.cpu_info()
    yield force
    monkeypatch.delenv("MURMUR_CPU", raising=False)
    cpu.cpu_info.cache_clear()


def _rank(name):
    return cpu.FAMILIES.index(name)


def test_no_bf16_anywhere_without_native_bf16(family):
    """An AVX2 CPU gets int8 on fbgemm, fp32 speech K/V and fp32 LSTMs: no bf16 path at all."""
    info = family("avx2")
    if info.family != "avx2":
        pytest.skip("this CPU is below AVX2")
    for ct in ("auto", "int8", "float32"):
        plan = kernels.kernel_plan(ct)
        assert "bf16" not in (plan.encoder, plan.decoder, plan.speech_kv, plan.lstm), plan
    plan = kernels.kernel_plan("auto")
    assert plan.compute_type == "int8" and plan.int8 == "fbgemm"


def test_plans_of_the_bf16_families():
    feats = frozenset({"avx2", "fma", "avx512", "vnni", "avx512_bf16", "amx", "amx_bf16"})
    amx = kernels._plan("auto", False, cpu.CPUInfo("x", feats, "amx", None))
    zen5 = kernels._plan("auto", False, cpu.CPUInfo("x", feats - {"amx", "amx_bf16"}, "avx512_bf16", None))
    assert (amx.compute_type, amx.encoder, amx.int8, amx.speech_kv) == ("int8_bfloat16", "bf16", "fbgemm8", "bf16")
    assert (amx.attention, amx.encoder_attention) == ("sdpa", "sdpa")
    # 8-bit fbgemm rows only with VNNI's exact int32 sums
    assert kernels._plan("int8", False, cpu.CPUInfo("x", frozenset({"avx2", "fma"}), "avx2", None)).int8 == "fbgemm"
    # bf16 SDPA without AMX ran 2-3x slower than fp32: there bf16 attention runs as matmuls
    assert (zen5.encoder, zen5.int8, zen5.speech_kv) == ("bf16", "fbgemm8", "bf16")
    assert (zen5.attention, zen5.encoder_attention) == ("matmul", "matmul")
    assert kernels._plan("auto", True, cpu.CPUInfo("x", feats, "amx", None)).compute_type == "float16"


def test_auto_model_on_avx2_has_no_bf16_tensor(family):
    if family("avx2").family != "avx2":
        pytest.skip("this CPU is below AVX2")
    m = murmur.load_model("tiny.en")
    assert m.compute_type == "int8" and m.cross_dtype == torch.float32
    layers = [x for x in m.model.modules() if isinstance(x, (FbgemmLinear, Int8Linear))]
    assert layers and all(isinstance(x, FbgemmLinear) and not isinstance(x, Fbgemm8Linear) for x in layers)
    assert all(t.dtype != torch.bfloat16 for t in m.model.state_dict().values())


def _clip(data_dir):
    return load_audio(data_dir / "ami" / "dev00.flac")


@pytest.mark.parametrize("forced", [None, "avx2"])
def test_default_tokens_identical_at_batch_1_and_16(family, data_dir, forced):
    """Continuous batching relies on it: every path `auto` can choose gives a row the same tokens
    whichever rows share its steps (this CPU's own plan, and AVX2's forced)."""
    if forced:
        if _rank(family(forced).family) < _rank("avx2"):
            pytest.skip("this CPU is below AVX2")
    m = murmur.load_model("tiny.en")
    audio = _clip(data_dir)
    one = murmur.transcribe(audio, m, chunk_size=6, batch_size=1)
    many = murmur.transcribe(audio, m, chunk_size=6, batch_size=16)
    assert one.stats["chunks"] >= 3 and many.stats["mean_active_rows"] > 1
    assert [(s.start, s.end, s.text) for s in one.segments] == [(s.start, s.end, s.text) for s in many.segments]


_BUCKETS = """
import torch
from murmur.engine.kv.cache import SELF_BUCKET
g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    for n in (1, 17, 63, 64, 65, 200, 383, 447):  # keys a row has written
        q = torch.randn(4, 6, 1, 64, generator=g).to(dtype)
        k, v = (torch.randn(4, 6, 448, 64, generator=g).to(dtype) for _ in range(2))
        outs = []
        for length in range(-(-n // SELF_BUCKET) * SELF_BUCKET, 449, SELF_BUCKET):
            mask = torch.zeros(4, 1, 1, length, dtype=torch.bool)
            mask[..., :n] = True
            outs.append(torch.nn.functional.scaled_dot_product_attention(
                q, k[:, :, :length], v[:, :, :length], attn_mask=mask))
        assert all(torch.equal(o, outs[0]) for o in outs), (dtype, n)
print("ok")
"""


@pytest.mark.parametrize("capability", [None, "avx2"])
def test_self_attention_bits_do_not_depend_on_the_bucket(capability):
    """A step attends over the longest row's keys rounded up to SELF_BUCKET: a row's output must be
    the same bits for every such length, or its tokens would depend on its neighbours."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, **({"ATEN_CPU_CAPABILITY": capability} if capability else {}))
    out = subprocess.run([sys.executable, "-c", _BUCKETS], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_attention_paths_match_sdpa(dtype):
    from murmur.models.whisper import blocked_attention, matmul_attention
    g = torch.Generator().manual_seed(0)
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # bf16 inputs: a few ulps of bf16
    q, k, v = (torch.randn(3, 6, 1500, 64, generator=g).to(dtype) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert (blocked_attention(q, k, v).float() - ref).abs().max() < tol
    qs = q[:, :, :2]
    mask = torch.ones(3, 1, 1, 1500, dtype=torch.bool)
    mask[1, ..., 1200:] = False  # a row whose window is shorter
    bias = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))
    ref = torch.nn.functional.scaled_dot_product_attention(qs.float(), k.float(), v.float(), attn_mask=mask)
    got = matmul_attention(qs, k, v, mask, bias)
    assert (got.float() - ref).abs().max() < tol
    # a row's result is the same alone, and query by query (verification) as in one call
    assert torch.equal(matmul_attention(qs[1:2], k[1:2], v[1:2], mask[1:2], bias[1:2]), got[1:2])
    assert torch.equal(matmul_attention(qs, k, v, mask, bias, per_query=True)[:, :, 1:2],
                       matmul_attention(qs[:, :, 1:2], k, v, mask, bias))


def test_info_names_the_cpu_and_a_path_per_op(capsys):
    from murmur.cli import main
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert cpu.cpu_info().model in out and "speech K/V" in out and "encoder" in out
    rows = kernels.micro_bench(budget=0.01)
    assert {r["op"].split(",")[0] for r in rows} >= {"encoder GEMM", "logit head", "speech attention"}
    assert all(v is None or v > 0 for r in rows for v in r["ms"].values())
