"""Early attentive encoder sparsification: after encoder layer k keep the fraction (1 - s) of frames
that receive the most self-attention and run the remaining layers on those alone.

Positions are added before the first block, so a kept frame carries its own position and dropping
the rest is safe; kept frames stay in temporal order. The decoder's cross-attention then reads only
the kept frames (KVCache.load_cross takes fewer than 1500). Every window of a batch keeps the same
number of frames, so the batch stays one tensor.
"""
from __future__ import annotations

import torch
from torch import Tensor

from murmur.errors import MurmurError
from murmur.models.whisper import EncoderHook

# Chosen by scripts/sparsity_sweep.py (see its docstring for the table): the default of
# `--encoder-sparsity default`. "off" until a setting meets the bar (see the report).
DEFAULT_SPEC = "off"


class AttentiveFrameDrop(EncoderHook):
    """Drop the fraction `fraction` of frames after encoder block `layer` (0-based).

    The score of a frame is the head-averaged attention mass it receives in block `layer`.
    `query_stride` 1 takes it exactly from the block (the encoder then runs that block's attention
    as an explicit softmax, which costs more than the fused kernel). `query_stride` n > 1 (needs
    `encoder` and layer >= 1) estimates it from every n-th query before the block runs, with the
    block's own weights, and lets the block run fused: far cheaper, nearly the same frames.
    """

    def __init__(self, layer: int, fraction: float, query_stride: int = 1, encoder=None):
        if layer < 0:
            raise MurmurError(f"encoder sparsity layer must be >= 0, got {layer}")
        if not 0.0 <= fraction < 1.0:
            raise MurmurError(f"encoder sparsity fraction must be in [0, 1), got {fraction}")
        if query_stride < 1 or (query_stride > 1 and (encoder is None or layer < 1)):
            raise MurmurError("a query stride > 1 needs the encoder and a layer >= 1")
        self.layer, self.fraction, self.stride = layer, fraction, query_stride
        self.encoder = encoder
        self.kept: Tensor | None = None  # [B, F'] frame indices of the last batch, for inspection
        self._score: Tensor | None = None

    def wants_weights(self, layer: int) -> bool:
        return layer == self.layer and self.fraction > 0 and self.stride == 1

    def _estimate(self, x: Tensor) -> Tensor:
        """Attention mass each frame will receive in block `layer`, from every stride-th query."""
        a = self.encoder.blocks[self.layer].attn
        h = self.encoder.blocks[self.layer].attn_ln(x)
        q = a.heads(a.query(h[:, ::self.stride]))
        k = a.heads(a.key(h))
        w = torch.softmax((q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5), dim=-1)
        return w.mean(dim=1).sum(dim=1)

    def after_block(self, layer: int, x: Tensor, received: Tensor | None) -> Tensor:
        if self.fraction <= 0:
            return x
        if self.stride > 1 and layer == self.layer - 1:
            self._score = self._estimate(x)
            return x
        if layer != self.layer:
            return x
        score = received if self.stride == 1 else self._score
        self._score = None
        if score is None:
            raise RuntimeError("AttentiveFrameDrop needs the encoder's attention mass at its layer")
        t = x.shape[1]
        n = max(1, int(round(t * (1.0 - self.fraction))))
        idx = score.topk(n, dim=1).indices.sort(dim=1).values  # [B, n] in temporal order
        self.kept = idx
        return x.gather(1, idx[:, :, None].expand(-1, -1, x.shape[2]))

    def __repr__(self) -> str:
        return f"AttentiveFrameDrop(layer={self.layer}, fraction={self.fraction}, query_stride={self.stride})"


def sparsity_spec(spec: str | None) -> tuple[int, float, int] | None:
    """'off' | 'default' | 'LAYER:FRACTION[:STRIDE]' -> (layer, fraction, stride), None for off;
    a MurmurError for anything else. No model needed."""
    spec = (spec or "off").strip().lower()
    if spec == "default":
        spec = DEFAULT_SPEC
    if spec in ("off", "none", ""):
        return None
    try:
        parts = spec.split(":")
        if len(parts) not in (2, 3):
            raise ValueError
        layer, frac = int(parts[0]), float(parts[1])
        stride = int(parts[2]) if len(parts) == 3 else 1
    except ValueError:
        raise MurmurError(f"--encoder-sparsity {spec!r}: expected LAYER:FRACTION[:STRIDE] (e.g. 1:0.5) or off") from None
    return layer, frac, stride


def parse_encoder_sparsity(spec: str | None, model=None) -> list[EncoderHook]:
    """'off' | 'default' | 'LAYER:FRACTION[:STRIDE]' (e.g. '1:0.5', '1:0.5:8') -> encoder hooks.
    STRIDE > 1 scores frames from every STRIDE-th query (needs `model`, layer >= 1). `model`
    (Whisper or LoadedModel), when given, also checks the layer exists."""
    parsed = sparsity_spec(spec)
    if parsed is None:
        return []
    layer, frac, stride = parsed
    spec = spec.strip().lower()
    m = getattr(model, "model", model)
    if m is not None and hasattr(m, "dims") and layer >= m.dims.n_audio_layer:
        raise MurmurError(f"--encoder-sparsity layer {layer}: the model has encoder layers 0..{m.dims.n_audio_layer - 1}")
    if frac == 0:
        return []
    if stride > 1 and m is None:
        raise MurmurError(f"--encoder-sparsity {spec!r}: a query stride needs the model")
    return [AttentiveFrameDrop(layer, frac, stride, m.encoder if stride > 1 else None)]
