"""What the engine talks to: the draft sources of a run, each row's adaptive draft length, and the
acceptance rule of speculative sampling.

The engine (murmur.engine.runner) asks `propose` for each busy row's draft before a step, feeds the row's
pending token and the draft in one forward, keeps the longest prefix greedy decoding (or speculative
sampling) would have produced and rolls the rest back in the KV cache. Sources plug in here, like KV
policies into the cache: the model code never changes for them.
"""
from __future__ import annotations

import torch
from torch import Tensor

from murmur.engine.decoding import sample
from murmur.errors import MurmurError
from murmur.spec.base import Draft, DraftSource


def speculative_sample(p: Tensor, draft: list[int], generator: torch.Generator,
                       q: Tensor | None = None) -> tuple[int, int]:
    """Speculative sampling over `p` [n+1, V] (the target's distribution at each draft position) and
    the draft's tokens, drawn from `q` [n, V] (None: a deterministic draft, q one-hot). Token i is
    accepted with probability min(1, p/q); the first rejected one is resampled from max(0, p - q)
    normalised, so the output follows p exactly. Returns (accepted tokens, the next token)."""
    for i, t in enumerate(draft):
        qt = 1.0 if q is None else float(q[i, t])
        u = float(torch.rand(1, generator=generator, dtype=torch.float64, device=p.device))
        if u * qt < float(p[i, t]):
            continue
        res = p[i].clone()
        if q is None:
            res[t] = 0.0
        else:
            res = (res - q[i]).clamp_(min=0.0)
        if not float(res.sum()) > 0:  # p == q up to rounding: any token of p
            res = p[i]
        return i, int(sample(res[None], generator))
    n = len(draft)
    return n, int(sample(p[n:n + 1], generator))


class Speculator:
    """The run's sources (first longest draft wins) and per-row draft lengths: a row's length grows
    after a fully accepted draft and falls back to what was accepted after a rejection."""

    def __init__(self, sources: list[DraftSource], k: int = 8, k_min: int = 1, k_max: int = 16):
        if not sources:
            raise MurmurError("speculative decoding needs at least one draft source")
        if not 1 <= k_min <= k <= k_max:
            raise MurmurError("speculative lengths need 1 <= k_min <= k <= k_max")
        self.sources, self.k0, self.k_min, self.k_max = sources, k, k_min, k_max
        self.k: dict[int, int] = {}

    def describe(self) -> str:
        return "+".join(s.describe() for s in self.sources)

    def admit(self, engine, act) -> None:
        for r in act.rows:
            self.k[r] = self.k0
        act.spec_u = [None]  # admission drew step 0's uniforms
        act.spec_n = [1] * len(act.rows)
        for s in self.sources:
            s.admit(engine, act)

    def prepare(self, engine, acts) -> None:
        for s in self.sources:
            s.prepare(engine, acts, self.length)

    def length(self, row: int) -> int:
        """Row `row`'s draft length now (adapted by feedback)."""
        return self.k.get(row, self.k0)

    def propose(self, engine, act, j: int, row: int) -> Draft | None:
        k = self.length(row)
        best = None
        for s in self.sources:
            d = s.propose(engine, act, j, row, k)
            if d is not None and d.tokens and (best is None or len(d.tokens) > len(best.tokens)):
                best = d
        if best is not None and len(best.tokens) > k:
            best = Draft(best.tokens[:k])
        return best

    def feedback(self, row: int, n: int, accepted: int) -> None:
        k = self.length(row)
        if accepted >= n:
            self.k[row] = min(self.k_max, k + max(1, k // 2))
        else:
            self.k[row] = max(self.k_min, accepted + 1)

    def after_forward(self, engine, hi: int, index) -> None:
        for s in self.sources:
            s.after_forward(engine, hi, index)

    def accept_sampled(self, logits: Tensor, draft: Draft | None, temperature: float, act, j: int) -> tuple[int, int]:
        """A fallback row j of `act`: filtered `logits` [n+1, V] at its positions. Drafts here are
        deterministic (q one-hot), where speculative sampling accepts token d with probability p(d):
        so does sampling each position with the uniform plain decoding would have drawn for it and
        comparing. That is the rule used: the same distribution, and the same samples as without
        speculation, so a run's fallbacks (and all that follows them) stay token-identical."""
        toks = draft.tokens if draft is not None else []
        probs = torch.softmax(logits / temperature, dim=-1)
        cdf = probs.cumsum(dim=-1, dtype=torch.float64)
        n0 = act.spec_n[j]
        u = torch.tensor([[_uniform(act, n0 + i, j)] for i in range(len(toks) + 1)], dtype=torch.float64,
                         device=logits.device)
        got = torch.searchsorted(cdf, u * cdf[:, -1:], side="right").squeeze(1).clamp_(max=probs.shape[1] - 1).tolist()
        na = 0
        while na < len(toks) and got[na] == toks[na]:
            na += 1
        act.spec_n[j] = n0 + na + 1
        return na, got[na]


def _uniform(act, step: int, j: int) -> float:
    """The uniform plain decoding draws for row j's token `step`: each step draws one per row of the
    request from its generator (murmur.engine.decoding.sample); admission drew step 0."""
    u = act.spec_u
    while len(u) <= step:
        u.append(torch.rand(len(act.rows), 1, generator=act.gen, dtype=torch.float64,
                            device=act.gen.device)[:, 0].tolist())
    return u[step][j]


SOURCE_NAMES = ("recycle", "mtp")


def _value(raw: str):
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def parse_speculative(spec: str | None, opts: dict[str, str] | None = None, model=None) -> Speculator | None:
    """'none' | 'recycle' | 'mtp' | 'draft:MODEL' (sources combine with '+'); `opts` (from --spec-opt key=value): k,
    k_min, k_max (draft lengths: start, floor, ceiling), ngram (recycle's realignment n-gram), heads
    (a file of MTP heads; default: the user's retrained heads, else the shipped ones)."""
    if spec is None or spec == "none" or spec == "":
        return None
    opts = {k.replace("-", "_"): _value(v) if isinstance(v, str) else v for k, v in (opts or {}).items()}
    known = {"k", "k_min", "k_max", "ngram", "heads"}
    bad = set(opts) - known
    if bad:
        raise MurmurError(f"unknown --spec-opt {', '.join(sorted(bad))}; known: {', '.join(sorted(known))}")
    sources: list[DraftSource] = []
    for name in spec.split("+"):
        name = name.strip()
        if name == "recycle":
            from murmur.spec.recycle import Recycle
            sources.append(Recycle(ngram=int(opts.get("ngram", 3))))
        elif name == "mtp":
            if model is None:
                raise MurmurError("speculative source 'mtp' needs the model its heads were trained for")
            from murmur.spec.mtp import MTP, load_heads
            sources.append(MTP(load_heads(model, opts.get("heads")), model.model.decoder))
        elif name.startswith("draft:") and len(name) > 6:
            if model is None:
                raise MurmurError(f"speculative source {name!r} needs the target model")
            from murmur.models.loading import get_model
            from murmur.spec.draft import DraftModel
            dev = model.model.device
            sources.append(DraftModel(get_model(name[6:], None if dev.type == "cpu" else str(dev)), model))
        else:
            raise MurmurError(f"unknown speculative source {name!r}; choose none, {', '.join(SOURCE_NAMES)}"
                              " or draft:MODEL (combine with '+')")
    k = int(opts.get("k", 8))
    return Speculator(sources, k=k, k_min=int(opts.get("k_min", 1)), k_max=int(opts.get("k_max", max(16, k))))
