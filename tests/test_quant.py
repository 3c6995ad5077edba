"""Row-wise int8 linears on both GEMMs: a row's result must not depend on its batch neighbours,
and each stays close to float32."""
from __future__ import annotations

import pytest
import torch

from murmur.models.kernels import int8_kernel
from murmur.models.quant import INT8_LAYERS, Fbgemm8Linear, FbgemmLinear, Int8Linear, quantize_linears


def _runs_here(kernel: str) -> None:
    # without AVX-512 VNNI 8-bit rows saturate int16 pair sums (fbgemm8, and oneDNN's AVX2 kernels
    # under ONEDNN_MAX_CPU_ISA=AVX2); the plan takes fbgemm8 only with it, and oneDNN nowhere
    if kernel in ("fbgemm8", "onednn") and int8_kernel() != "fbgemm8":
        pytest.skip(f"{kernel} is tested only with AVX-512 VNNI")


@pytest.mark.parametrize("kernel", sorted(INT8_LAYERS))
@pytest.mark.parametrize("shape", [(384, 1536), (1536, 384), (384, 51864)])
def test_int8_rows_are_batch_invariant_and_close_to_float(kernel, shape):
    """Tolerance: relative error per row under 0.02 (oneDNN and fbgemm8, 8-bit rows) and 0.03
    (fbgemm, 7-bit rows), measured 0.008 and 0.015 on random weights and activations."""
    _runs_here(kernel)
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(*shape)
    torch.nn.init.normal_(lin.weight, std=0.05, generator=g)
    q = INT8_LAYERS[kernel].from_linear(lin)
    x = torch.randn(16, shape[0], generator=g)
    x[3] *= 100  # one loud row must not change the others' scales
    with torch.inference_mode():
        batch = q(x)
        for i in range(len(x)):
            assert torch.equal(q(x[i:i + 1])[0], batch[i])
        assert torch.equal(q(x[5:13]), batch[5:13])
        ref = lin(x)
    rel = (batch - ref).norm(dim=1) / ref.norm(dim=1)
    assert float(rel.max()) < (0.03 if kernel == "fbgemm" else 0.02)
    # any leading shape, as the model calls it ([B, T, C])
    assert q(x.view(4, 4, shape[0])).shape == (4, 4, shape[1])


def test_fbgemm_sums_are_exact_where_8_bits_would_saturate():
    """Rows that put the largest activations on the largest weights: with 7-bit activations
    fbgemm's int16 pair sums cannot saturate, so the result is the exact integer product."""
    w = torch.full((8, 64), 0.5)
    x = torch.ones(4, 64)
    q = FbgemmLinear(w, None)
    with torch.inference_mode():
        y = q(x)
    assert torch.allclose(y, x @ w.t(), rtol=0.02)


def test_fbgemm8_sums_are_exact_with_vnni():
    """The same rows with 8-bit activations (255 * 127 per product, past int16 in a pair): exact only
    because VNNI sums in int32, which is why the plan takes fbgemm8 only there."""
    _runs_here("fbgemm8")
    w = torch.full((8, 64), 0.5)
    x = torch.ones(4, 64)
    with torch.inference_mode():
        y = Fbgemm8Linear(w, None)(x)
    assert torch.allclose(y, x @ w.t(), rtol=0.01)


def test_quantize_linears_swaps_nested_layers():
    for layer in (Int8Linear, FbgemmLinear):
        m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(),
                                torch.nn.Sequential(torch.nn.Linear(16, 8, bias=False)))
        quantize_linears(m, layer=layer)
        assert isinstance(m[0], layer) and isinstance(m[2][0], layer) and m[2][0].bias is None
        assert m(torch.randn(2, 8)).shape == (2, 8)


@pytest.mark.parametrize("kernel", sorted(INT8_LAYERS))
def test_fused_qkv_keeps_the_bits_of_three_projections(kernel):
    _runs_here(kernel)
    from murmur.models.whisper import MultiHeadAttention
    g = torch.Generator().manual_seed(0)
    a = MultiHeadAttention(384, 6)
    for lin in (a.query, a.key, a.value):
        torch.nn.init.normal_(lin.weight, std=0.05, generator=g)
    a.fuse_qkv()
    quantize_linears(a, layer=INT8_LAYERS[kernel])
    h = torch.randn(3, 5, 384, generator=g)
    with torch.inference_mode():
        fused = a.project(h)
        a.qkv = None
        apart = a.project(h)
    assert all(torch.equal(x, y) for x, y in zip(fused, apart))
