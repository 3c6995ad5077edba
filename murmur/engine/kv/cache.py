"""The decoder's KV cache: one slot per batch row, preallocated, rows kept packed at the front.

Self-attention slots hold output tokens (prompt + generated); cross-attention slots hold speech
frames (encoder output of the row's window). Each row has a logical position (for Whisper's learned
positional embedding) and a physical fill pointer; they differ once a policy evicts and compacts.
A decode step runs over rows [0, hi) as views of the buffers, never copies; free slots inside that
range compute but keep nothing, and the engine fills them with the next ready window at once.
Policies (murmur.engine.kv.policies) see the cache after every step and clear `self_keep` / `cross_keep`
bits or compact slots; the model code never changes for them.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from murmur.memory import POOL

SELF_BUCKET = 64  # self-attention key lengths are multiples of this (see KVCache._bucket)


@dataclass
class Step:
    start: int
    stop: int
    n_tokens: int
    positions: Tensor  # [R, T] logical positions
    slots: Tensor  # [R, T] physical write slots
    length: int  # physical slots the attention reads: [0, length)
    self_mask: Tensor  # [R, 1, T, length] True = attend
    cross_len: int
    cross_mask: Tensor | None  # [R, 1, 1, F] or None when every frame is kept
    cross_bias: Tensor | float  # additive form of cross_mask, for explicit softmax
    active: np.ndarray | None = None  # rows in [start, stop) that hold a request
    # per-layer, per-head masks from a policy (DuoAttention): [R, H, T, length] / [R, H, 1, F].
    # write_self / cross swap them in for their layer, so the model reads step.self_mask as always.
    self_masks: list[Tensor] | None = None
    cross_masks: list[Tensor] | None = None
    cross_biases: list[Tensor] | None = None
    per_query: bool | str = False  # one query at a time (verification); 'whole': each reads all the step's keys
    paused: np.ndarray | None = None  # rows in [start, stop) that hold a request but sit this step out


class KVCache:
    def __init__(self, n_layer: int, n_rows: int, n_head: int, head_dim: int, n_ctx: int,
                 n_frames: int, dtype=torch.float32, device="cpu", policy=None, cross_dtype=None):
        shape = (n_layer, n_rows, n_head, n_ctx, head_dim)
        # from a pool: fresh buffers this size fault in every page (murmur.memory)
        self.k = POOL.zeros(self, shape, dtype, device)
        self.v = POOL.zeros(self, shape, dtype, device)
        xshape = (n_layer, n_rows, n_head, n_frames, head_dim)
        # speech K/V may be stored narrower (bf16): a decode step's largest read on CPU is these
        self.xk = POOL.zeros(self, xshape, cross_dtype or dtype, device)
        self.xv = POOL.zeros(self, xshape, cross_dtype or dtype, device)
        self.self_keep = torch.zeros(n_rows, n_ctx, dtype=torch.bool, device=device)
        self.cross_keep = torch.zeros(n_rows, n_frames, dtype=torch.bool, device=device)
        # host mirrors: no device sync to learn lengths
        self.fill = np.zeros(n_rows, dtype=np.int64)  # physical slots used
        self.pos = np.zeros(n_rows, dtype=np.int64)  # logical tokens seen
        self.frames = np.zeros(n_rows, dtype=np.int64)  # physical cross slots used
        self.frames_logical = np.zeros(n_rows, dtype=np.int64)  # frames the row's window had
        self.n_ctx, self.n_frames, self.n_rows = n_ctx, n_frames, n_rows
        self.device = device
        self.policy = policy
        self.stats = {"kv_logical": 0, "kv_physical": 0, "kv_physical_peak_per_row": 0, "kv_computed": 0}
        self._cross_all_kept = np.zeros(n_rows, dtype=bool)
        # speculative verification: the forward's commit waits in `held` until the engine knows how
        # many of each row's fed tokens it accepted (commit(step, keep))
        self.hold = False
        self.held: Step | None = None
        # a focus step (Engine: urgent rows only): rows [n_rows] that hold a request but do not
        # step; inside the step's range they compute into their next slot and keep nothing
        self.paused: np.ndarray | None = None

    # --- rows --------------------------------------------------------------------------------
    def reset(self, start: int, stop: int) -> None:
        self.fill[start:stop] = 0
        self.pos[start:stop] = 0
        self.self_keep[start:stop] = False
        if self.policy is not None:
            self.policy.reset(self, start, stop)

    @contextmanager
    def pausing(self, paused: np.ndarray | None):
        """Forwards inside see `paused` (None: no row paused)."""
        self.paused = paused
        try:
            yield
        finally:
            self.paused = None

    def truncate(self, row: int, n: int) -> None:
        """Row `row` forgets its tokens from the n-th on (a drafter's rollback; no policy, so slots
        are positions)."""
        self.self_keep[row, n:] = False
        self.fill[row] = self.pos[row] = n

    def load_cross(self, start: int, stop: int, kv: list[tuple[Tensor, Tensor]]) -> None:
        """Place one window's cross K/V (each [1, H, F, D]) into rows [start, stop)."""
        n = kv[0][0].shape[2]
        for layer, (k, v) in enumerate(kv):
            self.xk[layer, start:stop, :, :n] = k
            self.xv[layer, start:stop, :, :n] = v
        self.frames[start:stop] = n
        self.frames_logical[start:stop] = n
        self.cross_keep[start:stop] = False
        self.cross_keep[start:stop, :n] = True
        self._cross_all_kept[start:stop] = True

    def cross_evicted(self, start: int, stop: int) -> None:
        """Policies call this after clearing cross_keep bits, so steps stop taking the mask-free path."""
        self._cross_all_kept[start:stop] = False

    def move(self, src: int, dst: int, n: int) -> None:
        """Copy rows [src, src+n) to [dst, dst+n): packs active rows after one leaves."""
        s, d = slice(src, src + n), slice(dst, dst + n)
        f = int(self.fill[s].max(initial=0))
        fr = int(self.frames[s].max(initial=0))
        self.k[:, d, :, :f] = self.k[:, s, :, :f]
        self.v[:, d, :, :f] = self.v[:, s, :, :f]
        self.xk[:, d, :, :fr] = self.xk[:, s, :, :fr]
        self.xv[:, d, :, :fr] = self.xv[:, s, :, :fr]
        for t in (self.self_keep, self.cross_keep):
            t[d] = t[s]
        for a in (self.fill, self.pos, self.frames, self.frames_logical, self._cross_all_kept):
            a[d] = a[s]
        if self.policy is not None:
            self.policy.move(self, src, dst, n)

    def gather(self, dst: list[int], src: list[int]) -> None:
        """Beam search: row dst[i] takes the self-attention state of row src[i] (cross is shared)."""
        if dst == src:
            return
        f = int(self.fill[src].max(initial=0))
        d, s_ = torch.tensor(dst, device=self.device), torch.tensor(src, device=self.device)
        self.k[:, d, :, :f] = self.k[:, s_, :, :f]  # right side is a copy: safe when rows overlap
        self.v[:, d, :, :f] = self.v[:, s_, :, :f]
        self.self_keep[d] = self.self_keep[s_]
        for a in (self.fill, self.pos):
            a[dst] = a[src]
        if self.policy is not None:
            self.policy.gather(self, dst, src)

    # --- one forward call --------------------------------------------------------------------
    def _bucket(self, length: int) -> int:
        """Keys a step attends over: the longest row's, rounded up to a multiple of SELF_BUCKET.
        A one-query step's SDPA then gives the same bits for any such length (masked keys add exact
        zeros to lanes that end on a block), so a row's tokens never depend on the rows beside it;
        the whole context (448) took a fifth of the decode. Contexts off the grid attend over all."""
        if self.n_ctx % SELF_BUCKET:
            return self.n_ctx
        return min(-(-length // SELF_BUCKET) * SELF_BUCKET, self.n_ctx)

    def prepare(self, start: int, stop: int, n_tokens: int, active: np.ndarray | None = None) -> Step:
        """Plan a forward over rows [start, stop); inactive rows (free slots) compute but keep nothing."""
        fill, pos = self.fill[start:stop].copy(), self.pos[start:stop].copy()
        paused = None
        if active is not None:
            free = ~active
            if self.paused is not None:  # paused rows write their next slot (their next step overwrites it)
                paused = self.paused[start:stop] & free
                free &= ~paused
            fill[free], pos[free] = 0, 0
        if int(pos.max(initial=0)) + n_tokens > self.n_ctx or int(fill.max(initial=0)) + n_tokens > self.n_ctx:
            raise RuntimeError("decoder context exceeded; the caller must bound sample_len")
        ar = np.arange(n_tokens)
        slots_np = fill[:, None] + ar
        dev = self.device
        slots = torch.from_numpy(slots_np).to(dev)
        positions = torch.from_numpy(pos[:, None] + ar).to(dev)
        length = int(slots_np.max()) + 1
        if self.policy is None:
            length = self._bucket(length)
        self.self_keep[torch.arange(start, stop, device=dev)[:, None], slots] = True
        keep = self.self_keep[start:stop, :length]
        # a query sees kept slots up to its own (causal within a prefill)
        causal = torch.arange(length, device=dev)[None, None, :] <= slots[:, :, None]
        self_mask = (keep[:, None, :] & causal)[:, None]

        frames = self.frames[start:stop] if active is None else self.frames[start:stop][active]
        fr = int(self.frames[start:stop].max(initial=0))
        all_kept = self._cross_all_kept[start:stop] if active is None else self._cross_all_kept[start:stop][active]
        if all_kept.all() and (frames == fr).all():
            cross_mask, cross_bias = None, 0.0
        else:
            cross_mask = self.cross_keep[start:stop, :fr][:, None, None, :]
            cross_bias = torch.zeros(cross_mask.shape, dtype=self.k.dtype, device=dev)
            cross_bias.masked_fill_(~cross_mask, float("-inf"))
        step = Step(start, stop, n_tokens, positions, slots, length, self_mask, fr, cross_mask, cross_bias, active,
                    per_query=self.hold and ("whole" if self.policy is None else True),
                    paused=paused if paused is not None and paused.any() else None)
        if self.policy is not None and getattr(self.policy, "per_head", False):
            self._per_head(step)
        return step

    def _per_head(self, step: Step) -> None:
        """AND the policy's per-layer, per-head masks into the step's masks (no-policy path never comes here)."""
        sm = self.policy.per_head_self_mask(self, step)
        if sm is not None:
            step.self_masks = [step.self_mask & m for m in sm]
        cm = self.policy.per_head_cross_mask(self, step)
        if cm is not None:
            base = step.cross_mask if step.cross_mask is not None else self.cross_keep[step.start:step.stop, :step.cross_len][:, None, None, :]
            step.cross_masks = [base & m for m in cm]
            step.cross_biases = [torch.zeros(m.shape, dtype=self.k.dtype, device=self.device).masked_fill_(~m, float("-inf"))
                                 for m in step.cross_masks]

    def write_self(self, layer: int, step: Step, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if step.self_masks is not None:
            step.self_mask = step.self_masks[layer]
        rows = torch.arange(step.start, step.stop, device=self.device)[:, None]
        kb, vb = self.k[layer], self.v[layer]
        # [R, H, T, D] -> scatter along the slot axis, per row
        kb[rows, :, step.slots] = k.transpose(1, 2)
        vb[rows, :, step.slots] = v.transpose(1, 2)
        return kb[step.start:step.stop, :, :step.length], vb[step.start:step.stop, :, :step.length]

    def cross(self, layer: int, step: Step) -> tuple[Tensor, Tensor]:
        if step.cross_masks is not None:
            step.cross_mask, step.cross_bias = step.cross_masks[layer], step.cross_biases[layer]
        return (self.xk[layer, step.start:step.stop, :, :step.cross_len],
                self.xv[layer, step.start:step.stop, :, :step.cross_len])

    def commit(self, step: Step, keep: np.ndarray | None = None) -> None:
        """Advance rows past the step's tokens; with `keep` [R] only past each row's first keep[r]
        (verification rolls back rejected drafts: the rest of the row's slots lose their keep bit,
        so the cache is as if they were never fed). Under `hold` it only stores the step."""
        if self.hold:
            self.held = step
            return
        if step.paused is not None:  # their scratch slot keeps nothing
            r = torch.from_numpy(np.flatnonzero(step.paused)).to(self.device)
            self.self_keep[(r + step.start)[:, None], step.slots[r]] = False
        if keep is None:
            inc = step.n_tokens if step.active is None else step.n_tokens * step.active
        else:
            inc = keep if step.active is None else keep * step.active
            drop = np.arange(step.n_tokens)[None, :] >= keep[:, None]
            if step.active is not None:
                drop &= step.active[:, None]
            if drop.any():
                r, j = np.nonzero(drop)
                dev = self.device
                self.self_keep[torch.from_numpy(r + step.start).to(dev), step.slots[torch.from_numpy(r).to(dev),
                                                                                     torch.from_numpy(j).to(dev)]] = False
        self.fill[step.start:step.stop] += inc
        self.pos[step.start:step.stop] += inc
        if self.policy is not None:
            self.policy.after_step(self, step.start, step.stop)
        self._account(step.start, step.stop, step.active, step)

    def _account(self, start: int, stop: int, active: np.ndarray | None = None, step: Step | None = None) -> None:
        """Per-step sums over the rows that hold a request, from host arrays only (no device sync).

        kv_logical: tokens + frames the rows have seen; kv_physical: slots they occupy (fill + frames),
        which shrink only when a policy compacts; kv_attended (with a policy): entries attention reads,
        head-averaged, which logical (mask-only) eviction and per-head policies lower; kv_computed:
        entries the batched attention spans (every row of the step over the longest row's slots).
        """
        sel = slice(start, stop) if active is None else np.flatnonzero(active) + start
        phys = self.fill[sel] + self.frames[sel]
        if not len(phys):
            return
        self.stats["kv_logical"] += int(self.pos[sel].sum() + self.frames_logical[sel].sum())
        self.stats["kv_physical"] += int(phys.sum())
        self.stats["kv_physical_peak_per_row"] = max(self.stats["kv_physical_peak_per_row"], int(phys.max()))
        if step is not None:
            self.stats["kv_computed"] += (stop - start) * (step.length + step.cross_len)
        if self.policy is not None and hasattr(self.policy, "attended"):
            self.stats["kv_attended"] = self.stats.get("kv_attended", 0) + int(self.policy.attended(self, sel))
