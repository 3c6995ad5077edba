"""Decoding rules: options, logit filters and token selection, batched over rows.

As in openai-whisper, logit filters are separate from the token selectors. Unlike it, every filter
is vectorised over the batch: per-row state lives in tensors, so a step has no Python loop over rows.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from murmur.models.tokenizer import Tokenizer

NEG_INF = float("-inf")


@dataclass(frozen=True)
class DecodingOptions:
    language: str | None = None  # None: English for .en models, detected for multilingual ones
    task: str = "transcribe"
    temperature: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    beam_size: int = 1  # 1 = greedy
    best_of: int = 5  # candidates when sampling at temperature > 0
    patience: float = 1.0
    length_penalty: float | None = None
    sample_len: int | None = None  # default: half the text context
    suppress_tokens: str | tuple[int, ...] = "-1"  # "-1": the model's non-speech symbols
    suppress_blank: bool = True
    without_timestamps: bool = False
    max_initial_timestamp: float = 1.0
    compression_ratio_threshold: float | None = 2.4
    # stop a greedy decode once its text so far is over the compression threshold, when a fallback
    # temperature is left to retry it: a loop would otherwise run to sample_len only to be rejected
    stop_loops_early: bool = True
    logprob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    condition_on_previous_text: bool = True
    prompt_reset_on_temperature: float = 0.5
    initial_prompt: str | None = None

    def with_(self, **kw) -> "DecodingOptions":
        return replace(self, **kw)


def compression_ratio(text: str) -> float:
    b = text.encode("utf-8")
    return len(b) / len(zlib.compress(b)) if b else 0.0


@dataclass
class RowState:
    """What the filters need to know of each row's sampled tokens (excluding the prompt)."""
    n_sampled: Tensor  # [N] long
    last: Tensor  # [N] long, -1 if none
    penult: Tensor  # [N] long, -1 if none
    last_stamp: Tensor  # [N] long, last timestamp token, -1 if none

    @classmethod
    def zeros(cls, n: int, device) -> "RowState":
        z = torch.zeros(n, dtype=torch.long, device=device)
        return cls(z.clone(), z - 1, z - 1, z - 1)

    def reset(self, rows) -> None:
        self.n_sampled[rows] = 0
        self.last[rows] = -1
        self.penult[rows] = -1
        self.last_stamp[rows] = -1

    def copy(self, src, dst) -> None:
        for t in (self.n_sampled, self.last, self.penult, self.last_stamp):
            t[dst] = t[src]

    def push(self, rows: slice | Tensor, tokens: Tensor, timestamp_begin: int) -> None:
        self.penult[rows] = self.last[rows]
        self.last[rows] = tokens
        self.n_sampled[rows] += 1
        is_ts = tokens >= timestamp_begin
        self.last_stamp[rows] = torch.where(is_ts, tokens, self.last_stamp[rows])


class LogitRules:
    """Suppress tokens and blanks, and Whisper's timestamp grammar, applied to [R, V] logits."""

    def __init__(self, tokenizer: Tokenizer, n_vocab: int, options: DecodingOptions,
                 suppress: list[int], suppress_begin: list[int], device):
        self.tok = tokenizer
        self.timestamps = not options.without_timestamps
        ids = set(suppress) if options.suppress_tokens == "-1" else set(
            int(t) for t in options.suppress_tokens)
        ids |= {tokenizer.transcribe, tokenizer.translate, tokenizer.sot, tokenizer.sot_prev,
                tokenizer.sot_lm, tokenizer.no_speech}
        ids.discard(-1)
        self.suppress = torch.zeros(n_vocab, dtype=torch.bool, device=device)
        self.suppress[sorted(i for i in ids if 0 <= i < n_vocab)] = True
        if self.timestamps:
            self.suppress[tokenizer.no_timestamps] = True
        self.suppress_bias = _bias(self.suppress)
        begin = sorted(set(suppress_begin) | {220, tokenizer.eot}) if options.suppress_blank else []
        self.suppress_begin = torch.tensor(begin, dtype=torch.long, device=device)
        self.max_initial = (round(options.max_initial_timestamp / 0.02)
                            if options.max_initial_timestamp is not None else None)
        self.cols = torch.arange(n_vocab, device=device)

    def __call__(self, logits: Tensor, st: RowState) -> Tensor:
        """Filters `logits` [R, V] in place. Row conditions become additive -inf biases over column
        ranges (adds vectorise on CPU where masked_fill does not), and nothing syncs with the host."""
        tsb, eot = self.tok.timestamp_begin, self.tok.eot
        logits.add_(self.suppress_bias)
        first = st.n_sampled == 0
        if len(self.suppress_begin):
            cols = self.suppress_begin
            logits[:, cols] = logits[:, cols] + _bias(first)[:, None]
        if not self.timestamps:
            return logits
        last_ts = st.last >= tsb
        pen_ts = (st.n_sampled < 2) | (st.penult >= tsb)
        lone = last_ts & ~pen_ts
        # a lone stamp must be followed by another stamp or eot; a window opens with a stamp
        logits[:, :eot].add_(_bias(lone | first)[:, None])
        logits[:, eot:tsb].add_(_bias(first)[:, None])
        ts = logits[:, tsb:]
        ts.add_(_bias(last_ts & pen_ts)[:, None])  # a pair of stamps closes a segment: text next
        # stamps never go back, and a segment has nonzero length
        floor = torch.where(lone, st.last_stamp, st.last_stamp + 1) - tsb
        ts_cols = self.cols[None, : ts.shape[1]]
        ts.add_(_bias((st.last_stamp >= 0)[:, None] & (ts_cols < floor[:, None])))
        if self.max_initial is not None:
            ts.add_(_bias(first[:, None] & (ts_cols > self.max_initial)))
        # if the stamps together outweigh any single text token, emit a stamp (same softmax normaliser)
        force = ts.logsumexp(dim=-1) > logits[:, :tsb].amax(dim=-1)
        logits[:, :tsb].add_(_bias(force)[:, None])
        return logits


def _bias(mask: Tensor) -> Tensor:
    """True -> -inf, False -> 0."""
    return torch.zeros(mask.shape, device=mask.device).masked_fill_(mask, NEG_INF)


def sample(probs: Tensor, generator: torch.Generator) -> Tensor:
    """One token per row of `probs` [R, V], by inverse CDF: multinomial's distribution at 27x its
    speed on CPU (one uniform a row, not a draw per vocabulary entry). side="right" never picks a
    zero-probability token."""
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64, device=probs.device)
    return torch.searchsorted(cdf, u * cdf[:, -1:], side="right").squeeze(1).clamp_(max=probs.shape[1] - 1)


@dataclass
class BeamGroup:
    """Beam search over one request's rows (openai-whisper's BeamSearchDecoder, per request)."""
    beam_size: int
    patience: float
    eot: int
    sequences: list[list[int]] = field(default_factory=list)  # per live beam
    sum_logprobs: list[float] = field(default_factory=list)
    finished: dict[tuple[int, ...], float] = field(default_factory=dict)

    def __post_init__(self):
        self.sequences = [[] for _ in range(self.beam_size)]
        self.sum_logprobs = [0.0] * self.beam_size
        self.max_candidates = round(self.beam_size * self.patience)

    def step(self, logprobs: Tensor) -> tuple[list[int], list[int], bool]:
        """logprobs [beam, V] -> (source beam per row, next token per row, done)."""
        top_lp, top_tok = logprobs.topk(self.beam_size + 1, dim=-1)
        top_lp, top_tok = top_lp.tolist(), top_tok.tolist()
        scores: dict[tuple[int, ...], tuple[float, int, int]] = {}
        for b in range(self.beam_size):
            for lp, t in zip(top_lp[b], top_tok[b]):
                seq = tuple(self.sequences[b] + [t])
                s = self.sum_logprobs[b] + lp
                if seq not in scores or scores[seq][0] < s:
                    scores[seq] = (s, b, t)
        src, nxt, seqs, sums = [], [], [], []
        for seq, (s, b, t) in sorted(scores.items(), key=lambda kv: kv[1][0], reverse=True):
            if t == self.eot:
                if len(self.finished) < self.max_candidates and seq[:-1] not in self.finished:
                    self.finished[seq[:-1]] = s
            else:
                seqs.append(list(seq)), sums.append(s), src.append(b), nxt.append(t)
                if len(seqs) == self.beam_size:
                    break
        self.sequences, self.sum_logprobs = seqs, sums
        done = len(self.finished) >= self.max_candidates or not seqs
        return src, nxt, done

    def close(self) -> dict[tuple[int, ...], float]:
        if not self.finished:  # nothing ended: take the live beams
            self.finished = {tuple(s): lp for s, lp in zip(self.sequences, self.sum_logprobs)}
        return self.finished


def rank(candidates: dict[tuple[int, ...], float], length_penalty: float | None) -> tuple[tuple[int, ...], float]:
    """Pick the best sequence by length-normalised log-probability."""
    def score(item):
        seq, lp = item
        n = len(seq)
        pen = n if length_penalty is None else ((5 + n) / 6) ** length_penalty
        return lp / max(pen, 1e-9)
    return max(candidates.items(), key=score)
