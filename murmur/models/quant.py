"""int8 linear layers for the CPU, as CTranslate2 does them: int8 weights with one scale per output
channel, activations quantised on the fly with one scale per row, integer products summed in int32.

A row's scale depends on that row alone and int32 sums are exact, so a row's result never depends
on which rows share its batch: continuous batching gives the same text as decoding a chunk alone.
(torch.ao's dynamic quantisation scales the whole batch with one number, which breaks this.)
A decode step is memory-bound on CPU, and int8 weights are a quarter of the bytes of fp32.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class Int8Linear(nn.Module):
    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        # [in, out] as a transposed view of [out, in]: oneDNN's fastest layout for a few rows
        self.register_buffer("weight_t", q.t())
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.in_features, self.out_features = w.shape[1], w.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        return cls(linear.weight, linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1]).float()
        # in place where the result is new: an encoder window's activations are tens of MB, and
        # every fresh tensor of that size is fresh pages to fault in
        row = x.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12).div_(127.0)  # 5x faster than an inf-norm
        xq = torch.div(x, row).round_().to(torch.int8)
        y = torch._int_mm(xq, self.weight_t).float().mul_(row).mul_(self.scale)
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_linears(module: nn.Module, skip=()) -> None:
    """Swap every nn.Linear inside `module` for an Int8Linear, in place, except those in `skip`."""
    for name, child in list(module.named_children()):
        if any(child is m for m in skip):
            continue
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear.from_linear(child))
        else:
            quantize_linears(child, skip)
