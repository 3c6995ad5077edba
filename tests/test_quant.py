"""Row-wise int8 linears: a row's result must not depend on its batch neighbours."""
from __future__ import annotations

import torch

from murmur.models.quant import Int8Linear, quantize_linears


def test_int8_rows_are_batch_invariant_and_close_to_float():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(384, 1536)
    torch.nn.init.normal_(lin.weight, std=0.05, generator=g)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(16, 384, generator=g)
    x[3] *= 100  # one loud row must not change the others' scales
    with torch.inference_mode():
        batch = q(x)
        for i in range(len(x)):
            assert torch.equal(q(x[i:i + 1])[0], batch[i])
        ref = lin(x)
    rel = (batch - ref).norm(dim=1) / ref.norm(dim=1)
    assert float(rel.max()) < 0.02
    # any leading shape, as the model calls it ([B, T, C])
    assert q(x.view(4, 4, 384)).shape == (4, 4, 1536)


def test_quantize_linears_swaps_nested_layers():
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(),
                            torch.nn.Sequential(torch.nn.Linear(16, 8, bias=False)))
    quantize_linears(m)
    assert isinstance(m[0], Int8Linear) and isinstance(m[2][0], Int8Linear) and m[2][0].bias is None
    assert m(torch.randn(2, 8)).shape == (2, 8)
