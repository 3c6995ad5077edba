"""KV policies: what the decoder cache keeps of the output tokens (self-attention) and speech frames
(cross-attention) of each row, pluggable into `KVCache(policy=...)` without touching the model.

A policy names, per row, ranges of *logical* indices to evict: logical token positions for
self-attention, window frame indices for cross-attention. `Policies` (what the cache holds) combines
any number of them (a slot is kept only if every policy keeps it) and applies the union:

* physically (default, `physical=1`): the row's slots are compacted so `fill` / `frames` shrink; K
  already carries Whisper's absolute position, so logical positions stay what they were;
* logically (`physical=0`): only `self_keep` / `cross_keep` bits are cleared, the mask skips them.

Cuts are quantised to blocks (`block`, `speech_block`), so a row is compacted once per block, not
every step. Every decision is made on host mirrors of the layout (which logical index each physical
slot holds): no host-device sync and no per-step copy of the cache.

Policies:
  output-window  StreamingLLM: keep `sink` first tokens and the last `window` (to `window+block-1`).
  speech-window  Murmur's blind schedule: keep `speech_sink` frames; after `slide_delay` decode steps
                 evict `slide_rate` frames per step after the sink, up to `slide_cap`, leaving at
                 least `speech_window` frames.
  speech-follow  Keep `speech_sink` frames and everything from `margin` frames behind the row's last
                 emitted timestamp onwards: never evicts audio that is not transcribed yet.
  duo            DuoAttention: per decoder head (self and cross) a stored retrieval/streaming map;
                 retrieval heads see the whole cache, streaming heads sinks + a local window (self:
                 last `duo_window` tokens; cross: `duo_back` frames behind to `duo_ahead` frames
                 ahead of the last timestamp). Per-head masks only: the dense cache keeps every slot.
"""
from __future__ import annotations

import numpy as np
import torch

from murmur.errors import MurmurError

__all__ = ["Policies", "OutputWindow", "SpeechWindow", "SpeechFollow", "Duo", "parse_kv_policy",
           "POLICY_NAMES", "DEFAULTS"]


class KVPolicy:
    """One policy. Override the cuts; each returns a list of logical [a, b) ranges to evict."""
    name = "policy"
    per_head = False

    def self_cuts(self, lay: "Layout", cache, r: int) -> list[tuple[int, int]]:
        return []

    def cross_cuts(self, lay: "Layout", cache, r: int) -> list[tuple[int, int]]:
        return []

    def __add__(self, other):
        return Policies([self]) + other

    def describe(self) -> str:
        return self.name


def _down(x: int, block: int) -> int:
    return (x // block) * block if x > 0 else 0


class OutputWindow(KVPolicy):
    """StreamingLLM over output tokens: kept = [0, sink) U [pos - w, pos), window <= w < window + block."""
    name = "output-window"

    def __init__(self, sink: int = 4, window: int = 64, block: int = 16):
        if sink < 0 or window < 1 or block < 1:
            raise MurmurError("output-window needs sink >= 0, window >= 1, block >= 1")
        self.sink, self.window, self.block = sink, window, block

    def cut(self, pos: int) -> int:
        """Logical end of the evicted range [sink, cut)."""
        return self.sink + _down(pos - self.sink - self.window, self.block)

    def self_cuts(self, lay, cache, r):
        c = self.cut(int(cache.pos[r]))
        return [(self.sink, c)] if c > self.sink else []

    def budget(self) -> int:
        return self.sink + self.window + self.block - 1

    def describe(self):
        return f"{self.name}(sink={self.sink},window={self.window},block={self.block})"


class SpeechWindow(KVPolicy):
    """Blind schedule over frames: evicted = [sink, sink + e), e = min(cap, rate * (steps - delay))."""
    name = "speech-window"

    def __init__(self, speech_sink: int = 16, speech_window: int = 256, slide_delay: int = 16,
                 slide_rate: int = 8, slide_cap: int = 1000, speech_block: int = 32):
        if min(speech_sink, slide_delay, slide_rate, slide_cap) < 0 or speech_window < 1 or speech_block < 1:
            raise MurmurError("speech-window options must be >= 0 (window and block >= 1)")
        self.sink, self.window, self.delay = speech_sink, speech_window, slide_delay
        self.rate, self.cap, self.block = slide_rate, slide_cap, speech_block

    def evicted(self, steps: int, frames: int) -> int:
        e = min(self.cap, self.rate * max(0, steps - self.delay), frames - self.sink - self.window)
        return _down(e, self.block)

    def cross_cuts(self, lay, cache, r):
        e = self.evicted(int(cache.pos[r] - lay.prompt_len[r]), int(cache.frames_logical[r]))
        return [(self.sink, self.sink + e)] if e > 0 else []

    def describe(self):
        return (f"{self.name}(speech_sink={self.sink},speech_window={self.window},slide_delay={self.delay},"
                f"slide_rate={self.rate},slide_cap={self.cap},speech_block={self.block})")


class SpeechFollow(KVPolicy):
    """Evicted = [sink, anchor - margin) quantised down to the block; anchor = last timestamp's frame.

    With a sparsified encoder (fewer than `n_frames` frames loaded) slot j holds a frame no later
    than j + dropped, so the cut moves back by `dropped`: still never at or ahead of the timestamp.
    """
    name = "speech-follow"

    def __init__(self, speech_sink: int = 16, margin: int = 50, speech_block: int = 32):
        if min(speech_sink, margin) < 0 or speech_block < 1:
            raise MurmurError("speech-follow options must be >= 0 (block >= 1)")
        self.sink, self.margin, self.block = speech_sink, margin, speech_block

    def cut(self, anchor: int, frames: int, n_frames: int) -> int:
        if anchor < 0:
            return 0
        c = anchor - self.margin - (n_frames - frames)
        return _down(c, self.block)

    def cross_cuts(self, lay, cache, r):
        c = self.cut(int(lay.anchor[r]), int(cache.frames_logical[r]), cache.n_frames)
        return [(self.sink, c)] if c > self.sink else []

    def describe(self):
        return f"{self.name}(speech_sink={self.sink},margin={self.margin},speech_block={self.block})"


class Duo(KVPolicy):
    """DuoAttention: streaming heads see sinks and a local window, retrieval heads everything."""
    name = "duo"
    per_head = True

    def __init__(self, self_retrieval, cross_retrieval, duo_sink: int = 4, duo_window: int = 32,
                 duo_cross_sink: int = 0, duo_back: int = 50, duo_ahead: int = 300, source: str = ""):
        self.self_ret = torch.as_tensor(np.asarray(self_retrieval, dtype=bool))  # [L, H]
        self.cross_ret = torch.as_tensor(np.asarray(cross_retrieval, dtype=bool))
        self.sink, self.window = duo_sink, duo_window
        self.csink, self.back, self.ahead = duo_cross_sink, duo_back, duo_ahead
        self.source = source
        self._dev: dict = {}
        self._all = {"self": bool(self.self_ret.all()), "cross": bool(self.cross_ret.all())}  # host: no sync

    def _ret(self, which: str, device):
        key = (which, str(device))
        if key not in self._dev:
            t = self.self_ret if which == "self" else self.cross_ret
            self._dev[key] = t.to(device)
        return self._dev[key]

    def self_masks(self, lay: "Layout", cache, step) -> list | None:
        if self._all["self"]:
            return None
        ret = self._ret("self", cache.device)
        lpos = torch.from_numpy(lay.self_lpos[step.start:step.stop, :step.length].copy()).to(cache.device)
        lpos.scatter_(1, step.slots, step.positions)  # slots written by this step
        q = step.positions[:, :, None]  # [R, T, 1]
        k = lpos[:, None, :]  # [R, 1, L]
        local = (k < self.sink) | ((k > q - self.window) & (k <= q))  # [R, T, L]
        local = local[:, None]  # [R, 1, T, L]
        return [ret[layer][None, :, None, None] | local for layer in range(ret.shape[0])]

    def cross_masks(self, lay: "Layout", cache, step) -> list | None:
        if self._all["cross"]:
            return None
        ret = self._ret("cross", cache.device)
        fr = step.cross_len
        lpos, on = lay.cross_view(cache, step.start, step.stop, fr)  # [R, F] host
        anchor = np.maximum(lay.anchor[step.start:step.stop], 0)[:, None]
        local = (lpos < self.csink) | ((lpos >= anchor - self.back) & (lpos <= anchor + self.ahead))
        local &= on
        empty = ~local.any(axis=1)
        local[empty] = on[empty]  # never leave a streaming head nothing to read (no NaN rows)
        local = torch.from_numpy(local).to(cache.device)[:, None, None, :]  # [R, 1, 1, F]
        return [ret[layer][None, :, None, None] | local for layer in range(ret.shape[0])]

    def attended_fraction(self, n_self: np.ndarray, n_cross: np.ndarray) -> float:
        fs, fc = float(self.self_ret.float().mean()), float(self.cross_ret.float().mean())
        s = fs * n_self + (1 - fs) * np.minimum(n_self, self.sink + self.window)
        c = fc * n_cross + (1 - fc) * np.minimum(n_cross, self.csink + self.back + self.ahead + 1)
        return float(s.sum() + c.sum())

    def describe(self):
        return (f"{self.name}(retrieval self {int(self.self_ret.sum())}/{self.self_ret.numel()}, "
                f"cross {int(self.cross_ret.sum())}/{self.cross_ret.numel()}, sink={self.sink},"
                f"window={self.window},back={self.back},ahead={self.ahead})")


class Layout:
    """Host mirror of each row's cache layout: the logical index held by every physical slot."""

    def __init__(self, cache):
        R = cache.n_rows
        self.self_lpos = np.full((R, cache.n_ctx), -1, dtype=np.int64)
        self.self_on = np.zeros((R, cache.n_ctx), dtype=bool)  # mirrors self_keep over [0, fill)
        self.cross_lpos = np.full((R, cache.n_frames), -1, dtype=np.int64)
        self.cross_on = np.zeros((R, cache.n_frames), dtype=bool)
        self.synced = np.zeros(R, dtype=np.int64)  # slots whose lpos is known
        self.seen_pos = np.zeros(R, dtype=np.int64)
        self.prompt_len = np.zeros(R, dtype=np.int64)
        self.fresh = np.ones(R, dtype=bool)  # reset, cross layout not read yet
        self.anchor = np.full(R, -1, dtype=np.int64)  # frame of the last emitted timestamp
        self.row_arrays = ("self_lpos", "self_on", "cross_lpos", "cross_on", "synced", "seen_pos",
                           "prompt_len", "fresh", "anchor")

    def cross_view(self, cache, start: int, stop: int, fr: int) -> tuple[np.ndarray, np.ndarray]:
        """(logical frame of each cross slot, slot kept) for rows [start, stop), slots [0, fr)."""
        lpos = self.cross_lpos[start:stop, :fr].copy()
        on = self.cross_on[start:stop, :fr].copy()
        fresh = np.flatnonzero(self.fresh[start:stop])
        for i in fresh:  # prefill: the window was just loaded, nothing evicted
            n = int(cache.frames[start + i])
            lpos[i] = np.where(np.arange(fr) < n, np.arange(fr), -1)
            on[i] = lpos[i] >= 0
        return lpos, on


class Policies:
    """What `KVCache(policy=...)` holds: one or more KVPolicy objects applied together."""

    def __init__(self, policies, physical: bool = True):
        self.policies: list[KVPolicy] = list(policies)
        self.physical = physical
        self.per_head = any(p.per_head for p in self.policies)
        self._self = [p for p in self.policies if type(p).self_cuts is not KVPolicy.self_cuts]
        self._cross = [p for p in self.policies if type(p).cross_cuts is not KVPolicy.cross_cuts]
        self._duo = [p for p in self.policies if isinstance(p, Duo)]
        self.lay: Layout | None = None
        self._cache_id = None
        # diagnostics; mirrored into cache.stats
        self.counters = {"kv_self_evicted": 0, "kv_cross_evicted": 0, "kv_cross_evicted_ahead": 0,
                         "kv_compactions": 0}
        self.on_evict = None  # test hook: f(row, kind, logical indices evicted, anchor)
        if not self._cross and not self._duo:
            self.observe_tokens = None  # nothing reads timestamps: the engine skips the call

    def __add__(self, other):
        more = other.policies if isinstance(other, Policies) else [other]
        return Policies(self.policies + list(more), self.physical)

    def __repr__(self):
        mode = "physical" if self.physical else "logical"
        return "Policies(" + " + ".join(p.describe() for p in self.policies) + f", {mode})"

    def _layout(self, cache) -> Layout:
        if self.lay is None or self._cache_id != id(cache):
            self.lay, self._cache_id = Layout(cache), id(cache)
            self.counters = dict.fromkeys(self.counters, 0)
        return self.lay

    # --- cache hooks ---------------------------------------------------------------------------
    def reset(self, cache, start: int, stop: int) -> None:
        lay = self._layout(cache)
        s = slice(start, stop)
        lay.self_lpos[s], lay.self_on[s] = -1, False
        lay.cross_lpos[s], lay.cross_on[s] = -1, False
        lay.synced[s] = lay.seen_pos[s] = lay.prompt_len[s] = 0
        lay.fresh[s], lay.anchor[s] = True, -1

    def move(self, cache, src: int, dst: int, n: int) -> None:
        lay = self._layout(cache)
        for name in lay.row_arrays:
            a = getattr(lay, name)
            a[dst:dst + n] = a[src:src + n].copy()

    def gather(self, cache, dst: list[int], src: list[int]) -> None:
        """Beam search: rows take their source beam's state. Cross is not copied by the cache; copy it
        here where the source's speech layout differs, so a row never sees frames its beam evicted."""
        lay = self._layout(cache)
        differ = [(d, s) for d, s in zip(dst, src)
                  if d != s and (cache.frames[d] != cache.frames[s]
                                 or not np.array_equal(lay.cross_on[d], lay.cross_on[s])
                                 or not np.array_equal(lay.cross_lpos[d], lay.cross_lpos[s]))]
        if differ:
            dd, ss = [d for d, _ in differ], [s for _, s in differ]
            fr = int(cache.frames_logical[ss].max(initial=0))
            di, si = torch.tensor(dd, device=cache.device), torch.tensor(ss, device=cache.device)
            cache.xk[:, di, :, :fr] = cache.xk[:, si, :, :fr]
            cache.xv[:, di, :, :fr] = cache.xv[:, si, :, :fr]
            cache.cross_keep[di] = cache.cross_keep[si]
            cache.frames[dd] = cache.frames[ss]
            cache._cross_all_kept[dd] = cache._cross_all_kept[ss]
        for name in lay.row_arrays:
            a = getattr(lay, name)
            a[dst] = a[src].copy()

    def observe_tokens(self, cache, rows, stamp_frames) -> None:
        lay = self._layout(cache)
        lay.anchor[rows] = stamp_frames.cpu().numpy()

    def after_step(self, cache, start: int, stop: int) -> None:
        lay = self._layout(cache)
        rows = np.arange(start, stop)
        changed = rows[cache.pos[start:stop] != lay.seen_pos[start:stop]]
        for r in changed.tolist():
            self._sync(lay, cache, r)
            if self._self:
                cuts = [c for p in self._self for c in p.self_cuts(lay, cache, r)]
                if cuts:
                    self._apply(lay, cache, r, cuts, cross=False)
            if self._cross:
                cuts = [c for p in self._cross for c in p.cross_cuts(lay, cache, r)]
                if cuts:
                    self._apply(lay, cache, r, cuts, cross=True)
        cache.stats.update(self.counters)

    def _sync(self, lay: Layout, cache, r: int) -> None:
        if lay.fresh[r]:
            fr = int(cache.frames[r])
            lay.cross_lpos[r] = -1
            lay.cross_lpos[r, :fr] = np.arange(fr)
            lay.cross_on[r] = False
            lay.cross_on[r, :fr] = True
            lay.prompt_len[r] = cache.pos[r]
            lay.fresh[r] = False
        a, b = int(lay.synced[r]), int(cache.fill[r])
        n = b - a
        if n > 0:
            p = int(cache.pos[r])
            lay.self_lpos[r, a:b] = np.arange(p - n, p)
            lay.self_on[r, a:b] = True
        lay.synced[r] = b
        lay.seen_pos[r] = cache.pos[r]

    def _apply(self, lay: Layout, cache, r: int, cuts, cross: bool) -> None:
        n_phys = int(cache.frames[r] if cross else cache.fill[r])
        lpos = (lay.cross_lpos if cross else lay.self_lpos)[r, :n_phys]
        on = (lay.cross_on if cross else lay.self_on)[r, :n_phys]
        ev = np.zeros(n_phys, dtype=bool)
        for a, b in cuts:
            ev |= (lpos >= a) & (lpos < b)
        new = ev & on
        if not new.any():
            return
        gone = lpos[new]
        if cross:
            ahead = int((gone >= max(int(lay.anchor[r]), 0)).sum())
            self.counters["kv_cross_evicted"] += len(gone)
            self.counters["kv_cross_evicted_ahead"] += ahead
        else:
            self.counters["kv_self_evicted"] += len(gone)
        if self.on_evict is not None:
            self.on_evict(r, "cross" if cross else "self", gone.copy(), int(lay.anchor[r]))
        dev = cache.device
        keep_t = cache.cross_keep if cross else cache.self_keep
        if not self.physical:
            keep_t[r, torch.from_numpy(np.flatnonzero(new)).to(dev)] = False
            on[new] = False
            if cross:
                cache.cross_evicted(r, r + 1)
            return
        keep_idx = np.flatnonzero(~ev)  # physical mode: every slot in [0, n_phys) is on
        first = int(np.argmax(ev))  # slots before the first evicted one stay where they are
        n = len(keep_idx)
        if n > first:
            idx = torch.from_numpy(keep_idx[first:]).to(dev)
            for buf in ((cache.xk, cache.xv) if cross else (cache.k, cache.v)):
                row = buf[:, r]  # [L, H, S, D] view
                row[:, :, first:n] = row[:, :, idx]
        keep_t[r, n:n_phys] = False
        lpos_new = lpos[keep_idx]
        lpos[:n] = lpos_new
        lpos[n:] = -1
        on[n:] = False
        if cross:
            cache.frames[r] = n
        else:
            cache.fill[r] = n
            lay.synced[r] = n
        self.counters["kv_compactions"] += 1

    # --- per-head masks (duo) ------------------------------------------------------------------
    def per_head_self_mask(self, cache, step):
        return self._combine([d.self_masks(self._layout(cache), cache, step) for d in self._duo])

    def per_head_cross_mask(self, cache, step):
        return self._combine([d.cross_masks(self._layout(cache), cache, step) for d in self._duo])

    @staticmethod
    def _combine(masks):
        masks = [m for m in masks if m is not None]
        if not masks:
            return None
        out = masks[0]
        for m in masks[1:]:
            out = [a & b for a, b in zip(out, m)]
        return out

    # --- accounting ----------------------------------------------------------------------------
    def attended(self, cache, sel) -> float:
        lay = self._layout(cache)
        n_self = lay.self_on[sel].sum(axis=1)
        n_cross = np.where(lay.fresh[sel], cache.frames[sel], lay.cross_on[sel].sum(axis=1))
        if self._duo:
            return min(d.attended_fraction(n_self, n_cross) for d in self._duo)
        return float(n_self.sum() + n_cross.sum())


# --- parsing -------------------------------------------------------------------------------------
POLICY_NAMES = ("none", "output-window", "speech-window", "speech-follow", "duo")

# options per policy and their defaults (ints unless noted); `physical` applies to all
DEFAULTS = {
    "output-window": {"sink": 4, "window": 64, "block": 16},
    "speech-window": {"speech_sink": 16, "speech_window": 256, "slide_delay": 16, "slide_rate": 8,
                      "slide_cap": 1000, "speech_block": 32},
    "speech-follow": {"speech_sink": 16, "margin": 50, "speech_block": 32},
    "duo": {"duo_sink": 4, "duo_window": 32, "duo_cross_sink": 0, "duo_back": 50, "duo_ahead": 300,
            "duo_retrieval": -1.0, "duo_threshold": -1.0, "duo_map": ""},
}
_FLOAT = {"duo_retrieval", "duo_threshold"}
_STR = {"duo_map"}


def _value(key: str, raw: str):
    try:
        if key in _STR:
            return raw
        return float(raw) if key in _FLOAT else int(raw)
    except ValueError:
        raise MurmurError(f"--kv-opt {key}={raw!r}: expected {'a number' if key in _FLOAT else 'an integer'}") from None


def check_kv_policy(spec: str | None, opts: dict[str, str] | None = None) -> list[str]:
    """The policy names in `spec` other than 'none', once `spec` and `opts` are known to be valid
    (names, each key applying to one of them, values of the right kind); no model needed."""
    opts = dict(opts or {})
    names = [n.strip() for n in (spec or "none").split("+") if n.strip()]
    bad = [n for n in names if n not in POLICY_NAMES]
    if bad:
        raise MurmurError(f"unknown KV policy {bad[0]!r}: choose from {', '.join(POLICY_NAMES)} (combine with +)")
    names = [n for n in names if n != "none"]
    if len(set(names)) != len(names):
        raise MurmurError(f"KV policy {spec!r} names a policy twice")
    valid = {"physical"} | {k for n in names for k in DEFAULTS[n]}
    unknown = sorted(set(opts) - valid)
    if unknown:
        raise MurmurError(f"--kv-opt {unknown[0]!r} does not apply to {spec!r}; valid: {', '.join(sorted(valid))}")
    for k, v in opts.items():
        _value(k, v)
    return names


def parse_kv_policy(spec: str, opts: dict[str, str] | None = None, model=None) -> Policies | None:
    """`spec` 'none' | 'a+b+...' of POLICY_NAMES; `opts` key=value strings (see DEFAULTS, plus
    physical=0|1). Returns None for 'none' (the engine's policy-free path). `model` (a LoadedModel
    or name) picks duo's stored head map."""
    opts = dict(opts or {})
    names = check_kv_policy(spec, opts)
    if not names:
        return None
    physical = bool(_value("physical", opts.get("physical", "1")))
    out = []
    for n in names:
        kw = {k: (_value(k, opts[k]) if k in opts else v) for k, v in DEFAULTS[n].items()}
        if n == "output-window":
            out.append(OutputWindow(**kw))
        elif n == "speech-window":
            out.append(SpeechWindow(**kw))
        elif n == "speech-follow":
            out.append(SpeechFollow(**kw))
        elif n == "duo":
            out.append(make_duo(model, **kw))
    return Policies(out, physical=physical)


def make_duo(model=None, duo_retrieval: float = -1.0, duo_threshold: float = -1.0, duo_map: str = "",
             **kw) -> Duo:
    """Duo policy from a stored head map (murmur/data/duo_<model>.json, or the file `duo_map`).
    Retrieval heads: the `duo_retrieval` fraction of each kind's highest-scoring heads if given
    (>= 0), else the heads scoring at least `duo_threshold` if given, else the map's own choice
    (trained gates: gate >= 0.5; attention mass: the top half)."""
    from murmur.engine.duo import load_duo_map, retrieval_heads
    name = getattr(model, "name", model) or "tiny.en"
    hm = load_duo_map(name, path=duo_map or None)
    if duo_retrieval > 1.0:
        raise MurmurError("duo_retrieval must be a fraction in [0, 1]")
    if duo_retrieval >= 0:
        s_ret = retrieval_heads(hm["self_scores"], duo_retrieval)
        c_ret = retrieval_heads(hm["cross_scores"], duo_retrieval)
    elif duo_threshold >= 0:
        s_ret = np.asarray(hm["self_scores"]) >= duo_threshold
        c_ret = np.asarray(hm["cross_scores"]) >= duo_threshold
    else:
        s_ret = np.asarray(hm["self_retrieval"], dtype=bool)
        c_ret = np.asarray(hm["cross_retrieval"], dtype=bool)
    return Duo(s_ret, c_ret, source=hm.get("model", name), **kw)
