"""Whisper in PyTorch: an audio encoder and a text decoder, readable in one sitting.

The decoder reads and writes a `KVCache` (murmur.engine.kv) that holds one slot per batch row, so rows of
different lengths decode together and KV policies act on the cache, not on this file. The encoder
calls optional `EncoderHook`s between blocks, which is where frame sparsifiers plug in.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class ModelDims:
    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> Tensor:
    inc = torch.log(torch.tensor(max_timescale)) / (channels // 2 - 1)
    inv = torch.exp(-inc * torch.arange(channels // 2))
    t = torch.arange(length)[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1)


class MultiHeadAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)  # Whisper's key projections have no bias
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)
        self.qkv: nn.Module | None = None  # one [C, 3C] projection; the int8 loader sets it

    def fuse_qkv(self) -> None:
        """Join the three projections of the same input into one: int8 rows are quantised once and
        the integer sums are exact, so q, k and v keep their bits (a decode step ran 33 GEMMs)."""
        w = torch.cat([self.query.weight, self.key.weight, self.value.weight])
        b = torch.cat([self.query.bias, torch.zeros_like(self.query.bias), self.value.bias])
        self.qkv = nn.Linear(w.shape[1], w.shape[0], device=w.device, dtype=w.dtype)
        with torch.no_grad():
            self.qkv.weight.copy_(w)
            self.qkv.bias.copy_(b)

    def project(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v of `h` [B, T, C], each [B, H, T, D]."""
        if self.qkv is None:
            return self.heads(self.query(h)), self.heads(self.key(h)), self.heads(self.value(h))
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        return self.heads(q), self.heads(k), self.heads(v)

    def heads(self, x: Tensor) -> Tensor:  # [B, T, C] -> [B, H, T, D]
        b, t, c = x.shape
        return x.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)

    def merge(self, x: Tensor) -> Tensor:  # [B, H, T, D] -> [B, T, C]
        b, h, t, d = x.shape
        return x.transpose(1, 2).reshape(b, t, h * d)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int, cross_attention: bool = False):
        super().__init__()
        self.attn = MultiHeadAttention(n_state, n_head)
        self.attn_ln = nn.LayerNorm(n_state)
        self.cross_attn = MultiHeadAttention(n_state, n_head) if cross_attention else None
        self.cross_attn_ln = nn.LayerNorm(n_state) if cross_attention else None
        self.mlp = nn.Sequential(nn.Linear(n_state, 4 * n_state), nn.GELU(), nn.Linear(4 * n_state, n_state))
        self.mlp_ln = nn.LayerNorm(n_state)

    def encode(self, x: Tensor, need_weights: bool = False,
               attention: str = "sdpa") -> tuple[Tensor, Tensor | None]:
        """Encoder block; optionally also returns the head-averaged attention each frame receives."""
        a = self.attn
        h = self.attn_ln(x)
        q, k, v = a.project(h)
        received = None
        if need_weights:
            w = torch.softmax((q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5), dim=-1)
            o = w @ v
            received = w.mean(dim=1).sum(dim=1)  # [B, T]: attention mass landing on each frame
        elif attention == "matmul":
            o = blocked_attention(q, k, v)
        else:
            o = F.scaled_dot_product_attention(q, k, v)
        x = x + a.out(a.merge(o))
        x = x + self.mlp(self.mlp_ln(x))
        return x, received


class EncoderHook:
    """Runs between encoder blocks; may drop frames. Subclasses live in murmur.engine.sparsify."""

    def wants_weights(self, layer: int) -> bool:
        return False

    def after_block(self, layer: int, x: Tensor, received: Tensor | None) -> Tensor:
        return x


class AudioEncoder(nn.Module):
    def __init__(self, d: ModelDims):
        super().__init__()
        self.conv1 = nn.Conv1d(d.n_mels, d.n_audio_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d.n_audio_state, d.n_audio_state, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(d.n_audio_ctx, d.n_audio_state))
        self.blocks = nn.ModuleList(ResidualAttentionBlock(d.n_audio_state, d.n_audio_head)
                                    for _ in range(d.n_audio_layer))
        self.ln_post = nn.LayerNorm(d.n_audio_state)
        self.attention = "sdpa"  # or "matmul" (see blocked_attention); the loader picks per CPU

    @property
    def dtype(self) -> torch.dtype:
        return self.conv1.weight.dtype

    def forward(self, mel: Tensor, hooks: list[EncoderHook] = ()) -> Tensor:
        """mel [B, n_mels, 3000] -> features [B, frames, C] in the encoder's own dtype (it may run
        narrower than the decoder); frames < 1500 if a hook dropped some."""
        x = F.gelu(self.conv1(mel.to(self.dtype)))
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        x = x + self.positional_embedding[: x.shape[1]].to(x.dtype)
        for i, block in enumerate(self.blocks):
            need = any(h.wants_weights(i) for h in hooks)
            x, received = block.encode(x, need_weights=need, attention=self.attention)
            for h in hooks:
                x = h.after_block(i, x, received)
        return self.ln_post(x)


class TextDecoder(nn.Module):
    def __init__(self, d: ModelDims):
        super().__init__()
        self.token_embedding = nn.Embedding(d.n_vocab, d.n_text_state)
        self.positional_embedding = nn.Parameter(torch.empty(d.n_text_ctx, d.n_text_state))
        self.blocks = nn.ModuleList(ResidualAttentionBlock(d.n_text_state, d.n_text_head, cross_attention=True)
                                    for _ in range(d.n_text_layer))
        self.ln = nn.LayerNorm(d.n_text_state)
        # logit projection; None uses the tied token embedding. On CPU a faster copy goes here
        # (int8, or a contiguous [C, V] fp32): reading the 51k x C matrix dominates a decode step.
        self.output: nn.Module | None = None
        self.speech_attention = "sdpa"  # or "matmul" (see matmul_attention); the loader picks per CPU

    def cross_kv(self, features: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Project encoder features once per window into every layer's cross-attention K and V."""
        out = []
        for b in self.blocks:
            ca = b.cross_attn
            w = getattr(ca.key, "weight", None)  # a float projection takes its own dtype (int8 casts itself)
            x = features if w is None else features.to(w.dtype)
            out.append((ca.heads(ca.key(x)), ca.heads(ca.value(x))))
        return out

    def forward(self, tokens: Tensor, cache, start: int = 0, active=None, attn_probe=None,
                logits_at: list[int] | None = None) -> Tensor:
        """Decode `tokens` [R, T] for cache rows [start, start+R), appending their K/V; -> logits [R, T, V],
        or [R, len(logits_at), V] for only those positions (a prompt's prefill needs two of them).

        The cache decides positions, write slots and masks (see murmur.engine.kv.cache.KVCache.prepare).
        `attn_probe(layer, weights)` receives cross-attention weights when word timing needs them.
        """
        step = cache.prepare(start, start + tokens.shape[0], tokens.shape[1], active)
        x = self.token_embedding(tokens) + self.positional_embedding[step.positions]
        for i, block in enumerate(self.blocks):
            a = block.attn
            h = block.attn_ln(x)
            q, k, v = a.project(h)
            k_all, v_all = cache.write_self(i, step, k, v)
            x = x + a.out(a.merge(_attend(q, k_all, v_all, step.self_mask, step.per_query)))

            ca = block.cross_attn
            h = block.cross_attn_ln(x)
            q = ca.heads(ca.query(h))
            xk, xv = cache.cross(i, step)  # the cache may hold speech K/V narrower than x
            if attn_probe is not None:
                w = torch.softmax((q @ xk.transpose(-1, -2).to(q.dtype)) * (q.shape[-1] ** -0.5)
                                  + step.cross_bias, dim=-1)
                attn_probe(i, w)
                o = w @ xv.to(q.dtype)
            elif self.speech_attention == "matmul":
                o = matmul_attention(q.to(xk.dtype), xk, xv, step.cross_mask, step.cross_bias,
                                     step.per_query).to(q.dtype)
            else:
                o = _attend(q.to(xk.dtype), xk, xv, step.cross_mask, step.per_query).to(q.dtype)
            x = x + ca.out(ca.merge(o))
            x = x + block.mlp(block.mlp_ln(x))
        cache.commit(step)
        if logits_at is not None:
            x = x[:, logits_at]
        x = self.ln(x)
        if self.output is not None:
            return self.output(x).float()
        return (x @ self.token_embedding.weight.to(x.dtype).T).float()


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, per_query: bool | str) -> Tensor:
    """SDPA. With `per_query` (speculative verification) self-attention runs one query at a time over
    the keys a one-token step would read: the kernel's sums depend on the key length, so this keeps
    verified tokens bit-identical to plain decoding."""
    if not per_query or q.shape[2] == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    t, n = q.shape[2], k.shape[2]
    if mask is not None and mask.shape[2] == t and per_query == "whole":  # any bucketed length: one query reads them all
        return torch.cat([F.scaled_dot_product_attention(q[:, :, j:j + 1], k, v, attn_mask=mask[:, :, j:j + 1])
                          for j in range(t)], dim=2)
    if mask is not None and mask.shape[2] == t:  # self-attention: query j reads the keys a one-token step would
        return torch.cat([F.scaled_dot_product_attention(
            q[:, :, j:j + 1], k[:, :, :n - t + j + 1], v[:, :, :n - t + j + 1], attn_mask=mask[:, :, j:j + 1, :n - t + j + 1])
            for j in range(t)], dim=2)
    if k.dtype == torch.bfloat16 and mask is None:
        # cross: each row's queries folded into the batch over the same (expanded, not copied) keys;
        # bit-identical to one query a call for bf16 speech K/V, and 4x faster than the loop
        out = []
        for r in range(q.shape[0]):
            qq = q[r].transpose(0, 1)[:, :, None]  # [T, H, 1, D]
            o = F.scaled_dot_product_attention(qq, k[r:r + 1].expand(t, -1, -1, -1), v[r:r + 1].expand(t, -1, -1, -1))
            out.append(o[:, :, 0].transpose(0, 1))
        return torch.stack(out)
    return torch.cat([F.scaled_dot_product_attention(q[:, :, j:j + 1], k, v, attn_mask=mask) for j in range(t)], dim=2)


def matmul_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, bias: Tensor | float,
                     per_query: bool | str = False) -> Tensor:
    """Attention over the speech K/V as two batched matmuls and an fp32 softmax. With bf16 K/V on a
    CPU that has bf16 dot products but no AMX, this reads half of fp32's bytes at 1.5-2x fp32 SDPA's
    speed, where bf16 SDPA runs 2x slower than fp32 (docs/benchmarks.md). Each (row, head) is its own
    GEMM, so a row's result never depends on its neighbours; verification loops over queries so a
    verified token sees the one-query GEMM of plain decoding."""
    if per_query and q.shape[2] > 1:
        return torch.cat([matmul_attention(q[:, :, j:j + 1], k, v, mask, bias) for j in range(q.shape[2])], dim=2)
    s = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))  # the scale is a power of two: exact
    if mask is not None:
        s = s + bias
    return torch.matmul(torch.softmax(s, dim=-1, dtype=torch.float32).to(v.dtype), v)


def blocked_attention(q: Tensor, k: Tensor, v: Tensor, block: int = 64) -> Tensor:
    """Encoder self-attention as matmuls over blocks of `block` queries, so each block's scores stay
    in cache: in bf16 on AVX512-BF16 without AMX, 2x faster than bf16 SDPA (1500 frames, 6 heads)."""
    b, h, t, d = q.shape
    q3 = (q * d ** -0.5).reshape(b * h, t, d)
    kt, v3 = k.reshape(b * h, t, d).transpose(1, 2), v.reshape(b * h, t, d)
    out = torch.empty_like(q3)
    for s in range(0, t, block):
        torch.bmm(torch.softmax(torch.bmm(q3[:, s:s + block], kt), dim=-1), v3, out=out[:, s:s + block])
    return out.view(b, h, t, d)


class TiedLogits(nn.Module):
    """The tied logit projection from a contiguous [C, V] copy of the token embedding. On CPU a
    decode step reads the whole matrix; BLAS reads it 2.5x faster in this layout than transposed."""

    def __init__(self, embedding: Tensor):
        super().__init__()
        # not persistent: state_dict stays a plain Whisper checkpoint
        self.register_buffer("weight_t", embedding.detach().t().contiguous(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight_t


class Whisper(nn.Module):
    def __init__(self, dims: ModelDims):
        super().__init__()
        self.dims = dims
        self.encoder = AudioEncoder(dims)
        self.decoder = TextDecoder(dims)
        self.alignment_heads: list[tuple[int, int]] = []

    @property
    def is_multilingual(self) -> bool:
        return self.dims.n_vocab >= 51865

    @property
    def device(self) -> torch.device:
        return self.decoder.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.token_embedding.weight.dtype
