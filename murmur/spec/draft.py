"""`draft:MODEL`: a smaller Whisper drafts for the target, as in SpecASR and assisted generation.

The drafter runs its own encoder on the same window and keeps its own KV cache, one row per target
row. Before each verify step it catches up with what the target accepted (rolling its cache back to
the longest common prefix) and decodes up to k tokens greedily, all drafting rows in one batch.
Vocabularies may differ (tiny.en is English-only with GPT-2's ids, base is multilingual): tokens
cross through text, as universal assisted generation does. Text runs are decoded by one tokenizer
and encoded by the other; timestamps and end-of-text map by position. The target verifies the
result, so its output is its own whatever the drafter says.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from murmur.engine.kv.cache import KVCache
from murmur.spec.base import Draft, DraftSource


def convert(ids, src, dst) -> list[int]:
    """Tokens of `src` (a murmur Tokenizer) as tokens of `dst`: text through text, timestamps and
    the control tokens by what they are."""
    out, run = [], []
    for t in ids:
        t = int(t)
        if t < src.eot:
            run.append(t)
            continue
        if run:
            out += dst.encode(src.decode(run))
            run = []
        if t >= src.timestamp_begin:
            out.append(dst.timestamp_begin + t - src.timestamp_begin)
        else:
            for name in ("eot", "sot", "sot_prev", "no_timestamps", "no_speech", "transcribe", "translate"):
                if t == getattr(src, name):
                    if name in ("transcribe", "translate") and not dst.multilingual:
                        break  # English-only models have no task token
                    out.append(getattr(dst, name))
                    break
    if run:
        out += dst.encode(src.decode(run))
    return out


def _common(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class DraftModel(DraftSource):
    name = "draft"

    def __init__(self, drafter, target):
        """`drafter`, `target`: LoadedModels (murmur.models.common)."""
        self.d = drafter
        self.dtok, self.ttok = drafter.tokenizer, target.tokenizer
        self.same_vocab = (self.dtok.multilingual == self.ttok.multilingual
                           and self.dtok.n_vocab == self.ttok.n_vocab)
        self.cache: KVCache | None = None
        self.fed: dict[int, list[int]] = {}  # row -> drafter tokens its cache holds (prompt first)
        self.prompt: dict[int, list[int]] = {}  # row -> the drafter's prompt
        self.drafts: dict[int, list[int]] = {}
        dv = drafter.model.dims.n_vocab
        # controls the drafter must not draft (its start tokens, languages, tasks)
        self.banned = torch.zeros(dv, dtype=torch.bool, device=drafter.model.device)
        self.banned[self.dtok.eot + 1:self.dtok.timestamp_begin] = True

    def describe(self) -> str:
        return f"draft:{self.d.name}"

    def _to_d(self, ids):
        return list(ids) if self.same_vocab else convert(ids, self.ttok, self.dtok)

    def _to_t(self, ids):
        return list(ids) if self.same_vocab else convert(ids, self.dtok, self.ttok)

    @torch.inference_mode()
    def admit(self, engine, act) -> None:
        t0 = time.perf_counter()
        d = self.d.model
        if self.cache is None or self.cache.n_rows < engine.batch_size:
            dims = d.dims
            self.cache = KVCache(dims.n_text_layer, engine.batch_size, dims.n_text_head,
                                 dims.n_text_state // dims.n_text_head, dims.n_text_ctx, dims.n_audio_ctx,
                                 dtype=d.dtype, device=d.device, cross_dtype=self.d.cross_dtype)
        mel = act.req.mel[None].to(d.device, d.encoder.dtype)
        kv = d.decoder.cross_kv(d.encoder(mel))
        prompt = self._to_d(act.req.prompt)
        for r in act.rows:
            self.cache.reset(r, r + 1)
            self.cache.load_cross(r, r + 1, kv)
            self.fed[r], self.prompt[r] = [], prompt
            self.drafts.pop(r, None)
        engine.stats["draft_s"] += time.perf_counter() - t0

    @torch.inference_mode()
    def prepare(self, engine, acts, k) -> None:
        """Draft for every busy row of `acts`, up to k(row) tokens each."""
        self.drafts = {}
        if self.cache is None:
            return
        cache, n_ctx = self.cache, self.d.model.dims.n_text_ctx
        rows, first, body = [], {}, {}
        for a in acts:
            for j, r in enumerate(a.rows):
                if a.done[j] or r not in self.fed:
                    continue
                body[r] = self._to_d(a.seqs[j])
                want = self.prompt[r] + body[r]
                if len(want) + k(r) > n_ctx:
                    continue
                fed = self.fed[r]
                n = min(_common(want, fed), len(want) - 1)  # at least one token to feed: its logits draft
                cache.truncate(r, n)
                first[r] = want[n:]
                self.fed[r] = want
                rows.append(r)
        if not rows:
            return
        got: dict[int, list[int]] = {r: [] for r in rows}
        # catch up: rows feeding one token share a forward, longer catch-ups (a new window's prompt,
        # a rejected stretch) go one row at a time
        ones = [r for r in rows if len(first[r]) == 1]
        if ones:
            self._forward(ones, [[first[r][0]] for r in ones], got)
        for r in rows:
            if len(first[r]) > 1:
                self._forward([r], [first[r]], got)
        going = [r for r in rows if got[r][-1] != self.dtok.eot and len(got[r]) < k(r)]
        while going:
            self._forward(going, [[got[r][-1]] for r in going], got)
            for r in going:
                self.fed[r].append(got[r][-2])
            going = [r for r in going if got[r][-1] != self.dtok.eot and len(got[r]) < k(r)]
        for a in acts:
            for j, r in enumerate(a.rows):
                if r in got:
                    self.drafts[r] = self._target_draft(a.seqs[j], body[r], got[r])

    def _forward(self, rows: list[int], tokens: list[list[int]], got: dict[int, list[int]]) -> None:
        """Feed each row its tokens (all the same length) and take its greedy next token."""
        cache = self.cache
        lo, hi = min(rows), max(rows) + 1
        active = np.zeros(hi - lo, dtype=bool)
        active[np.array(rows) - lo] = True
        paused = np.zeros(cache.n_rows, dtype=bool)
        paused[lo:hi] = [r in self.fed and not active[r - lo] for r in range(lo, hi)]
        x = torch.zeros(hi - lo, len(tokens[0]), dtype=torch.long, device=cache.device)
        for r, t in zip(rows, tokens):
            x[r - lo] = torch.tensor(t, device=cache.device)
        with cache.pausing(paused):
            logits = self.d.model.decoder(x, cache, lo, active=active, logits_at=[x.shape[1] - 1])[:, -1]
        logits.masked_fill_(self.banned, float("-inf"))
        best = logits.argmax(dim=-1).tolist()
        for r in rows:
            got[r].append(best[r - lo])

    def _target_draft(self, seq: list[int], body_d: list[int], drafted: list[int]) -> list[int]:
        """The target tokens that continue `seq` with the drafter's `drafted` tokens: its whole
        hypothesis mapped over, less `seq`; where the two split the last word differently, only the
        drafted tokens mapped on their own."""
        if self.same_vocab:
            return list(drafted)
        whole = self._to_t(body_d + drafted)
        if whole[:len(seq)] == seq:
            return whole[len(seq):]
        return self._to_t(drafted)

    def propose(self, engine, act, j, row, k):
        d = self.drafts.get(row)
        return Draft(d[:k]) if d else None
