"""Model runner with token-level continuous batching.

A `Request` is one 30-s window to decode. The engine keeps up to `batch_size` decoder rows busy:
each step decodes one token for every active row; a request whose rows finish hands its result back
to the scheduler and its rows go at once to the next ready request, so no row waits for another and
no padding is decoded. Windows are encoded as they are admitted (in batches on CUDA).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import Tensor

from murmur.engine.decoding import BeamGroup, DecodingOptions, LogitRules, RowState, rank, sample
from murmur.engine.kv.cache import KVCache
from murmur.models.common import LoadedModel

STOP_EVERY = 8  # steps between stop checks: a check decodes and compresses the row's text
FOCUS_RUN = 8  # focus steps in a row (urgent requests' rows only) before one step of every row


@dataclass
class Request:
    mel: Tensor  # [n_mels, 3000] window, zero-padded
    prompt: list[int]  # decoder input: optional <|startofprev|> context, then the SOT sequence
    temperature: float = 0.0
    sample_len: int = 224
    owner: Any = None  # the stream that submitted it
    tag: Any = None
    features: Tensor | None = None  # encoder output, kept across temperature fallbacks
    # called on a greedy row's tokens every STOP_EVERY steps; True ends the row as rejected
    stop_check: Callable[[list[int]], bool] | None = None
    key: tuple = ()  # what the request is (where its window starts, temperature index): seeds its sampling
    # tokens this window is expected to repeat (a rejected decode, the last window's unfinished tail, a
    # live stream's previous hypothesis): speculative decoding's `recycle` source drafts from them
    draft: list[int] | None = None
    # results
    tokens: list[int] = field(default_factory=list)
    sum_logprob: float = 0.0
    no_speech_prob: float = 0.0
    stopped: bool = False  # stop_check ended it: its tokens are a truncated, rejected decode

    @property
    def avg_logprob(self) -> float:
        return self.sum_logprob / (len(self.tokens) + 1)


class Scheduler(Protocol):
    def pop_ready(self, n: int) -> list[Request]: ...
    def complete(self, request: Request) -> None: ...
    def finished(self) -> bool: ...


class _Active:
    """A request in flight and the rows it holds."""

    def __init__(self, req: Request, rows: list[int], beam: BeamGroup | None):
        self.req, self.rows, self.beam = req, rows, beam
        self.gen: torch.Generator | None = None
        self.seqs: list[list[int]] = [[] for _ in rows]
        self.sums = [0.0] * len(rows)
        self.done = [False] * len(rows)
        self.stopped = [False] * len(rows)


class Engine:
    def __init__(self, loaded: LoadedModel, options: DecodingOptions = DecodingOptions(),
                 batch_size: int = 8, encoder_batch: int | None = None, kv_policy=None,
                 encoder_hooks=(), seed: int = 0, max_streams: int | None = None, speculative=None):
        self.loaded = loaded
        self.model = loaded.model
        self.tok = loaded.tokenizer
        self.options = options
        d = self.model.dims
        self.group = max(options.beam_size, options.best_of if any(t > 0 for t in options.temperature) else 1)
        if max_streams:  # rows no stream can fill would only cost their cache (150 MB of speech K/V per 16 rows)
            batch_size = min(batch_size, max_streams * self.group)
        self.batch_size = max(batch_size, self.group)
        self.device = self.model.device
        # on CPU a window's 1500 frames already fill the GEMMs; batching windows only makes
        # activations too large for the allocator to reuse (int8 encoder: 250 vs 390 ms a window)
        self.encoder_batch = encoder_batch or (min(self.batch_size, 8) if self.device.type == "cuda" else 1)
        self.cache = KVCache(d.n_text_layer, self.batch_size, d.n_text_head, d.n_text_state // d.n_text_head,
                             d.n_text_ctx, d.n_audio_ctx, dtype=self.model.dtype, device=self.device,
                             policy=kv_policy, cross_dtype=loaded.cross_dtype)
        self.rules = LogitRules(self.tok, d.n_vocab, options, loaded.suppress_tokens,
                                loaded.suppress_tokens_begin, self.device)
        self.state = RowState.zeros(self.batch_size, self.device)
        self.encoder_hooks = list(encoder_hooks)
        self.owner_of: list[_Active | None] = [None] * self.batch_size
        self.last_token = torch.zeros(self.batch_size, dtype=torch.long, device=self.device)
        self.seed = seed
        # a murmur.spec Speculator: rows verify drafted tokens in one forward (beam search never drafts)
        self.spec = speculative if options.beam_size == 1 else None
        # decode_s = prefill_s (admission: cross K/V, prompt) + forward_s (steps) + the rest of the
        # steps (logit rules, selection, bookkeeping)
        self.stats = {"encode_s": 0.0, "decode_s": 0.0, "prefill_s": 0.0, "forward_s": 0.0, "windows": 0,
                      "steps": 0, "tokens": 0, "row_steps": 0, "slot_steps": 0, "encoded_windows": 0,
                      "joined_running": 0, "target_forwards": 0, "prefills": 0, "draft_tokens": 0,
                      "accepted_tokens": 0, "draft_s": 0.0, "focus_steps": 0}
        self._focused = 0  # focus steps in a row (see _focus)

    # --- encoder -----------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, reqs: list[Request]) -> None:
        todo = [r for r in reqs if r.features is None]
        for i in range(0, len(todo), self.encoder_batch):
            part = todo[i:i + self.encoder_batch]
            t0 = time.perf_counter()
            mel = torch.stack([r.mel for r in part]).to(self.device, self.model.dtype)
            feats = self.model.encoder(mel, hooks=self.encoder_hooks)
            for r, f in zip(part, feats):
                r.features = f[None]
            self.stats["encode_s"] += time.perf_counter() - t0
            self.stats["encoded_windows"] += len(part)

    # --- admission ---------------------------------------------------------------------------
    def _free_rows(self) -> list[int]:
        return [i for i, o in enumerate(self.owner_of) if o is None]

    @torch.inference_mode()
    def _admit(self, req: Request) -> None:
        t0 = time.perf_counter()
        n = self.rows_for(req)
        rows = self._free_rows()[:n]
        if self.stats["steps"] and any(o is not None for o in self.owner_of):
            self.stats["joined_running"] += 1  # continuous batching: it joins rows mid-decode
        beam = BeamGroup(n, self.options.patience, self.tok.eot) if (req.temperature == 0 and n > 1) else None
        act = _Active(req, rows, beam)
        if req.temperature > 0:
            # a generator per request, seeded by what the request is: its samples never depend on
            # which rows share its steps, so batching and scheduling leave the text as it is
            act.gen = torch.Generator(device=self.device).manual_seed(hash((self.seed, req.key)) & (2**63 - 1))
        for r in rows:
            self.owner_of[r] = act
        r0 = rows[0]
        self.cache.reset(r0, r0 + 1)
        self.cache.load_cross(r0, r0 + 1, self.model.decoder.cross_kv(req.features))
        prompt = torch.tensor([req.prompt], dtype=torch.long, device=self.device)
        sot = req.prompt.index(self.tok.sot)
        logits = self.model.decoder(prompt, self.cache, r0, logits_at=[sot, len(req.prompt) - 1])[0]
        self.stats["target_forwards"] += 1
        self.stats["prefills"] += 1
        if self.spec is not None:
            self.spec.admit(self, act)
        req.no_speech_prob = float(torch.softmax(logits[0], -1)[self.tok.no_speech])
        for r in rows[1:]:  # every candidate starts from the same prefilled prompt
            self.cache.move(r0, r, 1)
        self.state.reset(rows)
        self._select(logits[-1:].expand(len(rows), -1).clone(), rows, [act])
        self.stats["prefill_s"] += time.perf_counter() - t0
        self.stats["decode_s"] += time.perf_counter() - t0

    # --- one decode step over all rows ---------------------------------------------------------
    @torch.inference_mode()
    def _step(self, hi: int, plain: bool = False, focus: list[_Active] | None = None) -> None:
        """A token for every busy row of [0, hi); with `focus`, only for those requests' rows: the
        step spans their rows alone and the other busy rows in that span sit it out (paused)."""
        if self.spec is not None and not plain:
            return self._spec_step(hi)
        self.stats["target_forwards"] += 1
        t0 = time.perf_counter()
        lo, paused = 0, None
        if focus is None:
            active = np.array([o is not None for o in self.owner_of[:hi]])
        else:
            rows = [r for a in focus for r in a.rows]
            lo, hi = min(rows), max(rows) + 1
            hot = {id(a) for a in focus}
            active = np.array([o is not None and id(o) in hot for o in self.owner_of[lo:hi]])
            paused = np.zeros(self.batch_size, dtype=bool)
            paused[lo:hi] = [o is not None and id(o) not in hot for o in self.owner_of[lo:hi]]
            self.stats["focus_steps"] += 1
        with self.cache.pausing(paused):
            logits = self.model.decoder(self.last_token[lo:hi, None], self.cache, lo, active=active)[:, -1]
        self.stats["forward_s"] += time.perf_counter() - t0
        if focus is not None:
            sel = np.flatnonzero(active)
            self._select(logits[torch.from_numpy(sel)], (sel + lo).tolist(), focus)
        else:
            if not active.all():
                logits[torch.from_numpy(~active)] = 0.0  # free slots: keep NaNs out of sampling
            self._select(logits, list(range(hi)), self._acts(hi))
        self.stats["steps"] += 1
        self.stats["row_steps"] += int(active.sum())
        self.stats["slot_steps"] += hi - lo
        self.stats["decode_s"] += time.perf_counter() - t0

    def _focus(self, urgent: Callable[[], Callable[[Request], bool] | None]) -> list[_Active] | None:
        """The requests the scheduler calls urgent, when other busy rows could wait for them: at
        most FOCUS_RUN steps in a row, so that waiting rows still move at 1/(FOCUS_RUN+1) speed.
        Not with a KV policy or speculation, whose per-step work covers every row of the span."""
        if self.spec is not None or self.cache.policy is not None:
            return None
        if self._focused >= FOCUS_RUN or (pred := urgent()) is None:
            self._focused = 0
            return None
        acts = self._acts()
        hot = [a for a in acts if pred(a.req)]
        if not hot or len(hot) == len(acts):
            self._focused = 0
            return None
        self._focused += 1
        return hot

    def _acts(self, hi: int | None = None) -> list[_Active]:
        """The requests holding rows of [0, hi), each once."""
        return list({id(o): o for o in self.owner_of[:hi] if o is not None}.values())

    def _select(self, logits: Tensor, rows: list[int], acts: list[_Active]) -> None:
        """Filter `logits` [len(rows), V] of cache `rows`, pick each row's next token and record it."""
        idx = torch.tensor(rows, device=self.device)
        where = {r: i for i, r in enumerate(rows)}
        st = self.state
        logits = self.rules(logits.float(), RowState(st.n_sampled[idx], st.last[idx], st.penult[idx],
                                                     st.last_stamp[idx]))
        nxt = logits.argmax(dim=-1)
        for a in acts:  # sample only the rows of requests at a fallback temperature
            if a.req.temperature > 0:
                hot = torch.tensor([where[r] for r in a.rows], device=self.device)
                nxt[hot] = sample(torch.softmax(logits[hot] / a.req.temperature, dim=-1), a.gen)
        norm = logits.logsumexp(dim=-1)
        lp = logits.gather(1, nxt[:, None]).squeeze(1) - norm
        nxt_h, lp_h = nxt.tolist(), lp.tolist()
        for act in acts:
            if act.beam is not None:
                sel = [where[r] for r in act.rows]
                self._beam_step(act, logits[sel] - norm[sel, None], nxt, where)
                continue
            for j, r in enumerate(act.rows):
                if act.done[j]:
                    continue
                i = where[r]
                self._take(act, j, nxt_h[i], lp_h[i])
        self.last_token[idx] = nxt
        st.push(idx, nxt, self.tok.timestamp_begin)
        observe = getattr(self.cache.policy, "observe_tokens", None)
        if observe is not None:  # KV policies that follow the transcript: frame of each row's last stamp, -1 if none
            stamps = st.last_stamp[idx]
            observe(self.cache, rows, torch.where(stamps >= 0, stamps - self.tok.timestamp_begin, -1))
        for act in acts:
            if all(act.done):
                self._finish(act)

    # --- speculative decoding: verify each row's draft in one forward -------------------------
    def _spec_step(self, hi: int) -> None:
        t0 = time.perf_counter()
        active = np.array([o is not None for o in self.owner_of[:hi]])
        acts = self._acts(hi)
        drafts = {}
        self.spec.prepare(self, acts)
        for a in acts:
            for j, r in enumerate(a.rows):
                if not a.done[j]:
                    d = self.spec.propose(self, a, j, r)
                    if d is not None and len(d.tokens):
                        drafts[r] = d
        t1 = time.perf_counter()
        self.stats["draft_s"] += t1 - t0
        if not drafts and all(a.req.temperature == 0 for a in acts):
            # nothing to verify: the plain step, without the verify path's bookkeeping (sampling
            # rows stay on that path, which draws their uniforms in its own order)
            self.stats["decode_s"] += t1 - t0
            self._step(hi, plain=True)
            self.spec.after_forward(self, hi, np.zeros(hi, dtype=np.int64))
            return
        self.stats["target_forwards"] += 1
        n = 1 + max((len(d.tokens) for d in drafts.values()), default=0)
        # column 0 is each row's pending token; shorter drafts are padded (and rolled back)
        tokens = self.last_token[:hi, None].repeat(1, n)
        for r, d in drafts.items():
            tokens[r, 1:1 + len(d.tokens)] = torch.tensor(d.tokens, device=self.device)
        self.cache.hold = True
        try:
            logits = self.model.decoder(tokens, self.cache, 0, active=active)
        finally:
            self.cache.hold = False
        step, self.cache.held = self.cache.held, None
        self.stats["forward_s"] += time.perf_counter() - t1
        if not active.all():
            logits[torch.from_numpy(~active)] = 0.0
        keep = self._verify(logits, drafts, hi, acts)
        self.cache.commit(step, keep)
        self.spec.after_forward(self, hi, keep - 1)
        self.stats["steps"] += 1
        self.stats["row_steps"] += int(active.sum())
        self.stats["slot_steps"] += hi
        self.stats["decode_s"] += time.perf_counter() - t0

    def _verify(self, logits: Tensor, drafts: dict, hi: int, acts: list[_Active]) -> np.ndarray:
        """Accept each row's longest draft prefix that decoding would have produced, then the model's
        own token. The logit rules see position j of a row as if draft[:j] had been decoded, so greedy
        verification gives plain greedy's tokens. Returns the fed tokens each row keeps."""
        st, tsb, eot = self.state, self.tok.timestamp_begin, self.tok.eot
        cols = [t[:hi].tolist() for t in (st.n_sampled, st.last, st.penult, st.last_stamp)]
        rr, jj, rs, offs = [], [], ([], [], [], []), []
        for r in range(hi):
            toks = drafts[r].tokens if r in drafts else ()
            a, b, c, e = (x[r] for x in cols)
            offs.append(len(rr))
            for j in range(len(toks) + 1):
                rr.append(r), jj.append(j)
                for lst, v in zip(rs, (a, b, c, e)):
                    lst.append(v)
                if j < len(toks):
                    t = toks[j]
                    a, b, c, e = a + 1, t, b, (t if t >= tsb else e)
        dev = self.device
        lg = self.rules(logits[torch.tensor(rr, device=dev), torch.tensor(jj, device=dev)].float(),
                        RowState(*(torch.tensor(x, dtype=torch.long, device=dev) for x in rs)))
        best = lg.argmax(dim=-1).tolist()
        chains = [[best[offs[r]]] for r in range(hi)]  # free and finished rows: as the plain step
        keep = np.ones(hi, dtype=np.int64)
        for act in acts:
            for j, r in enumerate(act.rows):
                if act.done[j]:
                    continue
                d = drafts.get(r)
                toks = d.tokens if d is not None else []
                o = offs[r]
                if act.req.temperature > 0:
                    na, last = self.spec.accept_sampled(lg[o:o + len(toks) + 1], d, act.req.temperature, act, j)
                else:
                    na = 0
                    while na < len(toks) and best[o + na] == toks[na]:
                        na += 1
                    last = best[o + na]
                chains[r] = list(toks[:na]) + [last]
                keep[r] = na + 1
                if d is not None:
                    self.stats["draft_tokens"] += len(toks)
                    self.stats["accepted_tokens"] += na
                    self.spec.feedback(r, len(toks), na)
        ms = [offs[r] + i for r in range(hi) for i in range(len(chains[r]))]
        ts = [t for c in chains for t in c]
        lps = (lg[ms, ts] - lg[ms].logsumexp(dim=-1)).tolist()
        lp_at = {}
        k = 0
        for r in range(hi):
            lp_at[r] = lps[k:k + len(chains[r])]
            k += len(chains[r])
        for act in acts:
            for j, r in enumerate(act.rows):
                if act.done[j]:
                    continue
                for t, lp in zip(chains[r], lp_at[r]):
                    if self._take(act, j, t, lp):
                        break
        # row state after each row's chain, as pushing its tokens one by one would leave it
        for r in range(hi):
            a, b, c, e = (x[r] for x in cols)
            for t in chains[r]:
                a, b, c, e = a + 1, t, b, (t if t >= tsb else e)
            for x, v in zip(cols, (a, b, c, e)):
                x[r] = v
        for t, x in zip((st.n_sampled, st.last, st.penult, st.last_stamp), cols):
            t[:hi] = torch.tensor(x, dtype=torch.long, device=dev)
        self.last_token[:hi] = torch.tensor([c[-1] for c in chains], dtype=torch.long, device=dev)
        observe = getattr(self.cache.policy, "observe_tokens", None)
        if observe is not None:
            stamps = st.last_stamp[:hi]
            observe(self.cache, list(range(hi)), torch.where(stamps >= 0, stamps - tsb, -1))
        for act in acts:
            if all(act.done):
                self._finish(act)
        return keep

    def _take(self, act: _Active, j: int, t: int, lp: float) -> bool:
        """Record token `t` (log-prob `lp`) for candidate `j` of `act`: eot, the sample length and
        the stop check end it. True when the candidate is done."""
        act.sums[j] += lp
        self.stats["tokens"] += 1
        if t == self.tok.eot:
            act.done[j] = True
        else:
            seq = act.seqs[j]
            seq.append(t)
            if len(seq) >= act.req.sample_len:
                act.done[j] = True
            elif (act.req.stop_check is not None and len(seq) % STOP_EVERY == 0
                  and act.req.stop_check(seq)):
                act.done[j] = act.stopped[j] = True
        return act.done[j]

    def _beam_step(self, act: _Active, logprobs: Tensor, nxt: Tensor, where: dict[int, int]) -> None:
        src, toks, done = act.beam.step(logprobs)
        self.stats["tokens"] += len(act.rows)
        if len(toks) == len(act.rows):
            src_rows = [act.rows[s] for s in src]
            self.cache.gather(act.rows, src_rows)  # rows take the state of their source beam
            self.state.copy(torch.tensor(src_rows), torch.tensor(act.rows))
            for r, t in zip(act.rows, toks):
                nxt[where[r]] = t
        else:
            done = True
        if done or len(act.beam.sequences[0]) >= act.req.sample_len:
            act.done = [True] * len(act.rows)

    def _finish(self, act: _Active) -> None:
        req = act.req
        if act.beam is not None:
            cands = act.beam.close()
        else:
            # a stopped candidate competes only if every candidate was stopped
            keep = [j for j in range(len(act.rows)) if not act.stopped[j]] or range(len(act.rows))
            cands = {}
            for j in keep:
                cands.setdefault(tuple(act.seqs[j]), act.sums[j])
            req.stopped = all(act.stopped)
        seq, lp = rank(cands, self.options.length_penalty)
        req.tokens, req.sum_logprob = list(seq), lp
        for r in act.rows:
            self.owner_of[r] = None
        self.stats["windows"] += 1
        self._completed.append(req)

    # --- main loop ---------------------------------------------------------------------------
    def rows_for(self, req: Request) -> int:
        """Rows a request decodes on: one per beam, or best_of candidates at a fallback temperature."""
        return self.options.beam_size if req.temperature == 0 else self.options.best_of

    def run(self, scheduler: Scheduler) -> None:
        """Decode until the scheduler has nothing left. Before every step each free row takes the
        next ready window; a request that needs more rows than are free (a fallback's best_of
        candidates) waits at the head of the line while the running rows finish."""
        self._completed: list[Request] = []
        self._held: deque[Request] = deque()
        held = self._held
        # a long-lived scheduler (the server's) may cancel requests and wait for work
        cancelled = getattr(scheduler, "take_cancelled", None)
        wait = getattr(scheduler, "wait_for_work", None)
        urgent = getattr(scheduler, "focus", None)  # which requests may step while others wait
        while True:
            if cancelled is not None and (drop := cancelled()) is not None:
                self.cancel(drop)
            if not held and self._free_rows():
                reqs = scheduler.pop_ready(len(self._free_rows()))
                self.encode(reqs)
                held.extend(reqs)
            admitted = 0
            while held and self.rows_for(held[0]) <= len(self._free_rows()):
                self._admit(held.popleft())
                self._drain(scheduler)
                admitted += 1
            busy = [i for i, o in enumerate(self.owner_of) if o is not None]
            if busy:
                self._step(busy[-1] + 1, focus=self._focus(urgent) if urgent is not None else None)
                self._drain(scheduler)
            elif scheduler.finished():
                return
            elif not admitted and wait is not None:
                wait()
            elif not admitted:  # every row is free, yet nothing came: the scheduler must have work
                raise RuntimeError("scheduler stalled: no ready request and not finished")

    def cancel(self, drop: Callable[[Request], bool]) -> None:
        """Forget the requests `drop` names: held ones leave the line, running ones free their rows
        now (a row's cache and state are reset when the next request is admitted to it)."""
        keep = [r for r in self._held if not drop(r)]
        self._held.clear()
        self._held.extend(keep)
        for i, act in enumerate(self.owner_of):
            if act is not None and drop(act.req):
                self.owner_of[i] = None
        self._completed = [r for r in self._completed if not drop(r)]

    def _drain(self, scheduler: Scheduler) -> None:
        done, self._completed = self._completed, []
        for req in done:
            scheduler.complete(req)
