"""int8 linear layers for the CPU, as CTranslate2 does them.

The int8 layers keep int8 weights with one scale per output channel and quantise activations
per row, so a row's result never depends on which rows share its batch (continuous batching gives
the same text as decoding a chunk alone). They differ in the GEMM underneath:

- `Int8Linear`: symmetric int8 rows into `torch._int_mm` (oneDNN). Generic code without VNNI
  (2.4 GOP/s on an AVX2 EPYC, 60x slower than fbgemm) and slower than fbgemm with it (a Xeon with
  AMX: the logit head 2.3 against 0.68 ms a row), so only `murmur info --bench` runs it.
- `FbgemmLinear`: fbgemm's dynamic int8 GEMM, which has real kernels on every x86 CPU. fbgemm
  quantises its input with one range per tensor; each row is scaled to [-1, 1] first and two
  pinned input columns (+1, -1, with zero weights) fix that range, so the quantisation is a
  function of the row alone. Without VNNI fbgemm sums u8*s8 pairs in int16 (vpmaddubsw), which
  saturates at 8 bits, so there activations take 7 bits (reduce_range) and every sum is exact;
  with AVX-512 VNNI it sums in int32, so `Fbgemm8Linear` keeps 8 bits.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch import Tensor, nn


def _per_channel(w: Tensor) -> tuple[Tensor, Tensor]:
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


class Int8Linear(nn.Module):
    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__()
        q, scale = _per_channel(weight.detach().float())
        # [in, out] as a transposed view of [out, in]: oneDNN's fastest layout for a few rows
        self.register_buffer("weight_t", q.t())
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.in_features, self.out_features = q.shape[1], q.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        return cls(linear.weight, linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1]).float()
        # in place where the result is new: an encoder window's activations are tens of MB, and
        # every fresh tensor of that size is fresh pages to fault in
        row = x.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12).div_(127.0)
        xq = torch.div(x, row).round_().to(torch.int8)
        y = torch._int_mm(xq, self.weight_t).float().mul_(row).mul_(self.scale)
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 oneDNN"


@contextlib.contextmanager
def _engine(name: str):
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = old


class FbgemmLinear(nn.Module):
    def __init__(self, weight: Tensor, bias: Tensor | None, reduce_range: bool = True):
        super().__init__()
        w = weight.detach().float()
        n, k = w.shape
        q, scale = _per_channel(w)
        pinned = torch.cat([q, torch.zeros(n, 2, dtype=torch.int8)], 1)
        with warnings.catch_warnings(), _engine("fbgemm"):
            warnings.simplefilter("ignore")  # torch 2.13 marks quantized tensors deprecated
            qw = torch._make_per_channel_quantized_tensor(pinned, scale.double(),
                                                          torch.zeros(n, dtype=torch.long), 0)
            self.packed = torch.ops.quantized.linear_prepack(qw, None)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.in_features, self.out_features, self.reduce_range = k, n, reduce_range

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "FbgemmLinear":
        return cls(linear.weight, linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        shape, k = x.shape, self.in_features
        x = x.reshape(-1, k).float()
        row = x.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12)
        xp = torch.empty(x.shape[0], k + 2)
        torch.div(x, row, out=xp[:, :k])
        xp[:, k] = 1.0
        xp[:, k + 1] = -1.0
        y = torch.ops.quantized.linear_dynamic(xp, self.packed, self.reduce_range).mul_(row)
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        bits = 7 if self.reduce_range else 8
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 fbgemm ({bits}-bit rows)"


class Fbgemm8Linear(FbgemmLinear):
    """8-bit rows: only where VNNI sums u8*s8 in int32 (vpdpbusd), so no pair sum saturates."""

    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__(weight, bias, reduce_range=False)


INT8_LAYERS = {"onednn": Int8Linear, "fbgemm": FbgemmLinear, "fbgemm8": Fbgemm8Linear}


def quantize_linears(module: nn.Module, skip=(), layer: type[nn.Module] = FbgemmLinear) -> None:
    """Swap every nn.Linear inside `module` for an int8 `layer`, in place, except those in `skip`."""
    for name, child in list(module.named_children()):
        if any(child is m for m in skip):
            continue
        if isinstance(child, nn.Linear):
            setattr(module, name, layer.from_linear(child))
        else:
            quantize_linears(child, skip, layer)
