"""Word timestamps from cross-attention, as openai-whisper computes them.

One decoder forward over `sot + <|notimestamps|> + text + eot` against a window's encoder output;
the alignment heads' cross-attention (softmax over the window's real frames, standardised per frame
over tokens, median-filtered along time, averaged over heads) is a token-by-frame score matrix, and
DTW through its negation gives each token's first frame. Word starts and ends are the frames where
their first token and the next word's first token begin. openai's heuristics follow: long words at
sentence ends are clamped to twice the median word duration, punctuation merges into its neighbour,
and the first/last word of a segment is reconciled with the segment's own timestamps. One addition:
DTW only sees audio up to SPAN_MARGIN past the text's last timestamp. openai re-seeks to the last
word instead; our decoding never depends on words, so the next window starts at the decoder's seek
and audio beyond it belongs to that window (letting DTW stretch words over it dragged a whole
window's words seconds late on AMI trn07).

Entry points:
- `align_window(loaded, features, text_tokens, ...)`: words of one decoded 30-s window;
- `add_word_timestamps(loaded, segments, source, ...)`: fills `Segment.words` for the segments of
  one window (source = its encoder features [1, F, C]) or of a whole recording (source = audio
  samples or its padded log-mel, segments on the same clock): a post-pass that re-windows by 30 s;
- `words_for_segments(segments, words)`: hands a word list out to the segments it belongs to.
"""
from __future__ import annotations

import difflib
import re
import string
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from murmur.audio.decode import HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE, log_mel_spectrogram
from murmur.engine.kv.cache import KVCache
from murmur.types import Segment, Word

TOKENS_PER_SECOND = SAMPLE_RATE / HOP_LENGTH / 2  # encoder frames per second (50)
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # mel frames per second (100)
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
SENTENCE_END_MARKS = ".。!！?？"
SPAN_MARGIN = 0.5  # s of audio past the text's last timestamp that its words may still take
_NO_SPACE_LANGUAGES = {"zh", "ja", "th", "lo", "my", "yue"}
# Heads picked by scripts/alignment_heads.py on the 13 AMI clips (best single heads by median start
# error, top-k by the pooled curve). The default for the bundled models; `heads=` overrides.
# tiny.en: median |start error| 0.105 -> 0.050 s vs the bundled set (also on held-out halves);
# base: 0.060 -> 0.050 s, within the 0.02 s frame step, so the bundled set is fine there.
MEASURED_ALIGNMENT_HEADS = {
    "tiny.en": [(3, 2), (2, 1), (1, 5), (3, 3), (3, 5), (2, 5), (3, 4), (2, 0)],
    "base": [(5, 1), (5, 6), (4, 7), (3, 1), (4, 3), (5, 4), (5, 7), (5, 5), (5, 3), (4, 2), (4, 1)],
}


@dataclass
class WordTiming:
    """One word in window-local seconds, with the tokens it covers (kept for punctuation merging)."""
    word: str
    tokens: list[int]
    start: float
    end: float
    probability: float


# --- DTW -----------------------------------------------------------------------------------------
def dtw(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Monotonic path of least total cost through `x` [N, M] from (0, 0) to (N-1, M-1).

    Same recurrence and tie-breaking as openai-whisper's numba `dtw_cpu`, vectorised along
    anti-diagonals (cells with i + j = d depend only on diagonals d-1 and d-2), so a 200 x 1500
    matrix costs ~1700 numpy steps instead of 300k Python ones. Returns (token_indices, frame_indices).
    """
    x = np.asarray(x, dtype=np.float64)
    n, m = x.shape
    # float32 cost as in openai, so ties break the same way
    cost = np.full((n + 1) * (m + 1), np.inf, dtype=np.float32)
    trace = np.full((n + 1) * (m + 1), -1, dtype=np.int8)
    cost[0] = 0
    xf = x.ravel()
    w = m + 1  # row stride of the (n+1) x (m+1) tables
    for d in range(2, n + m + 1):
        i0, i1 = max(1, d - m), min(n, d - 1)
        if i0 > i1:
            continue
        # flat index of (i, d - i) is i*w + d - i = d + i*m: one strided slice per diagonal
        idx = slice(d + i0 * m, d + i1 * m + 1, m)
        c0 = cost[slice(idx.start - w - 1, idx.stop - w - 1, m)]  # (i-1, j-1)
        c1 = cost[slice(idx.start - w, idx.stop - w, m)]  # (i-1, j)
        c2 = cost[slice(idx.start - 1, idx.stop - 1, m)]  # (i, j-1)
        t = np.where((c0 < c1) & (c0 < c2), 0, np.where((c1 < c0) & (c1 < c2), 1, 2))
        c = np.where(t == 0, c0, np.where(t == 1, c1, c2)).astype(np.float64)
        # x[i-1, j-1] sits at (i-1)*m + d-i-1 = d - m - 1 + i*(m-1)
        xs = d - m - 1 + i0 * (m - 1)
        xv = xf[xs: xs + (i1 - i0) * (m - 1) + 1: m - 1] if m > 1 else xf[i0 - 1: i1]
        cost[idx] = xv + c
        trace[idx] = t
    trace = trace.reshape(n + 1, m + 1)
    trace[0, :] = 2
    trace[:, 0] = 1
    i, j = n, m
    path = []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        t = trace[i, j]
        if t == 0:
            i, j = i - 1, j - 1
        elif t == 1:
            i -= 1
        else:
            j -= 1
    p = np.array(path[::-1], dtype=np.int64).reshape(-1, 2)
    return p[:, 0], p[:, 1]


# a sorting network for 7 values: 16 compare-exchanges (tests check it on all 128 0/1 inputs)
_SORT7 = ((0, 6), (2, 3), (4, 5), (0, 2), (1, 4), (3, 6), (0, 1), (2, 5), (3, 4), (1, 2), (4, 6),
          (2, 3), (4, 5), (1, 2), (3, 4), (5, 6))


def median_filter(x: torch.Tensor, width: int) -> torch.Tensor:
    """Median over a sliding window along the last axis, reflect-padded (openai's CPU path)."""
    pad = width // 2
    if x.shape[-1] <= pad:
        return x
    nd = x.ndim
    y = x
    while y.ndim < 3:  # reflect padding needs a batch/channel axis
        y = y[None]
    y = F.pad(y, (pad, pad), mode="reflect")
    if width == 7:
        # elementwise min/max over 7 shifted views: the same medians, 3x faster than sorting
        # every unfolded window (19 -> 7 ms for a window's 8 heads x ~110 tokens x 1500 frames)
        n = y.shape[-1] - 6
        v = [y[..., i:i + n] for i in range(7)]
        for a, b in _SORT7:
            v[a], v[b] = torch.minimum(v[a], v[b]), torch.maximum(v[a], v[b])
        y = v[3]
    else:
        y = y.unfold(-1, width, 1).sort()[0][..., pad]
    while y.ndim > nd:
        y = y[0]
    return y


# --- words -----------------------------------------------------------------------------------------
def split_words(tokenizer, tokens: Sequence[int]) -> tuple[list[str], list[list[int]]]:
    """openai's word split: tokens grouped into valid-unicode pieces, then a new word at each leading
    space or punctuation piece. Unlike Tokenizer.split_to_word_tokens, punctuation stands alone, which
    the sentence-end and merging heuristics need."""
    tokens = [int(t) for t in tokens]
    full = tokenizer.decode(tokens)
    pieces, groups, cur, off = [], [], [], 0
    for t in tokens:
        cur.append(t)
        dec = tokenizer.decode(cur)
        bad = dec.find("\ufffd")
        # a replacement char is only real if the full text has one at the same place
        if bad < 0 or (off + bad < len(full) and full[off + bad] == "\ufffd"):
            pieces.append(dec)
            groups.append(cur)
            cur = []
            off += len(dec)
    if cur:  # a trailing partial character: keep its tokens
        pieces.append(tokenizer.decode(cur))
        groups.append(cur)
    if getattr(tokenizer, "language", None) in _NO_SPACE_LANGUAGES:
        return pieces, groups
    words, wgroups = [], []
    for p, g in zip(pieces, groups):
        if not words or p.startswith(" ") or p.strip() in string.punctuation:
            words.append(p)
            wgroups.append(list(g))
        else:
            words[-1] += p
            wgroups[-1].extend(g)
    return words, wgroups


# --- attention -----------------------------------------------------------------------------------
def _heads(loaded, heads) -> list[tuple[int, int]]:
    hs = heads if heads is not None else (MEASURED_ALIGNMENT_HEADS.get(loaded.name) or loaded.model.alignment_heads)
    if not hs:
        d = loaded.model.dims  # openai's default when a model names none: every head of the top half
        hs = [(layer, h) for layer in range(d.n_text_layer // 2, d.n_text_layer) for h in range(d.n_text_head)]
    return [(int(a), int(b)) for a, b in hs]


@torch.inference_mode()
def cross_attention(loaded, features: torch.Tensor, text_tokens: Sequence[int], tokenizer=None,
                    heads=None, language: str | None = None) -> tuple[torch.Tensor, list[float], int]:
    """One forced decoder pass; returns (weights [K, T_all, F] of the K heads in order, text token
    probabilities, index of the <|notimestamps|> row). heads="all" returns every (layer, head)."""
    model = loaded.model
    tok = tokenizer or loaded.tokenizer
    d = model.dims
    if heads == "all":
        hs = [(layer, h) for layer in range(d.n_text_layer) for h in range(d.n_text_head)]
    else:
        hs = _heads(loaded, heads)
    sot = tok.sot_sequence(language or tok.language, timestamps=False)  # ends with <|notimestamps|>
    text = [int(t) for t in text_tokens]
    seq = sot + text + [tok.eot]
    features = features.to(model.device, model.dtype)
    if len(seq) > d.n_text_ctx:
        raise ValueError(f"{len(text)} text tokens do not fit the decoder context of {d.n_text_ctx}")
    cache = KVCache(d.n_text_layer, 1, d.n_text_head, d.n_text_state // d.n_text_head, len(seq),
                    features.shape[1], dtype=model.dtype, device=model.device)
    cache.load_cross(0, 1, model.decoder.cross_kv(features))
    want: dict[int, list[int]] = {}
    for layer, h in hs:
        want.setdefault(layer, []).append(h)
    got: dict[int, torch.Tensor] = {}

    def probe(layer: int, w: torch.Tensor) -> None:
        if layer in want:
            got[layer] = w[0, want[layer]].float()

    logits = model.decoder(torch.tensor([seq], device=model.device), cache, attn_probe=probe)[0]
    weights = torch.stack([got[layer][want[layer].index(h)] for layer, h in hs])
    row0 = len(sot) - 1  # the <|notimestamps|> position predicts the first text token
    probs = logits[row0:row0 + len(text), :tok.eot].float().softmax(-1)
    idx = torch.tensor(text, dtype=torch.long, device=probs.device)
    p = probs[torch.arange(len(text), device=probs.device), idx].tolist() if text else []
    return weights.cpu(), p, row0


def alignment_matrices(weights: torch.Tensor, row0: int, n_text: int, num_frames: int,
                       medfilt_width: int = 7) -> torch.Tensor:
    """Per-head score matrices [K, n_text + 1, frames] from cross-attention `weights` [K, T_all, F]:
    rows are <|notimestamps|> and the text tokens, columns the window's real encoder frames."""
    n = max(1, min(num_frames // 2, weights.shape[-1]))
    w = weights[..., :n]
    # the probe's softmax ran over the whole window; renormalising over the real frames equals
    # openai's softmax of the cropped logits
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
    std, mean = torch.std_mean(w, dim=-2, keepdim=True, unbiased=False)  # over all tokens, as openai
    w = (w - mean) / std.clamp_min(1e-12)
    w = median_filter(w, medfilt_width)
    return w[:, row0:row0 + n_text + 1]


def token_frames(weights: torch.Tensor, row0: int, n_text: int, num_frames: int,
                 medfilt_width: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """DTW path (token rows, encoder frames) through the head-averaged alignment matrix."""
    matrix = alignment_matrices(weights, row0, n_text, num_frames, medfilt_width).mean(0)
    return dtw(-matrix.double().numpy())


def timings_from_path(words: list[str], groups: list[list[int]], probs: list[float],
                      text_idx: np.ndarray, time_idx: np.ndarray) -> list[WordTiming]:
    if not words:
        return []
    bounds = np.pad(np.cumsum([len(g) for g in groups]), (1, 0))
    jumps = np.pad(np.diff(text_idx), (1, 0), constant_values=1).astype(bool)
    jump_times = time_idx[jumps] / TOKENS_PER_SECOND  # each row's first frame
    starts, ends = jump_times[bounds[:-1]], jump_times[bounds[1:]]
    return [WordTiming(w, list(g), float(s), float(e), float(np.mean(probs[a:b])))
            for w, g, s, e, a, b in zip(words, groups, starts, ends, bounds[:-1], bounds[1:])]


def _clamp_sentence_ends(alignment: list[WordTiming]) -> float:
    """openai's hack: words next to sentence-end marks are at most twice the median word long.
    Returns the median word duration (capped at 0.7 s) that later heuristics use."""
    durations = np.array([t.end - t.start for t in alignment])
    durations = durations[durations.nonzero()]
    median = min(0.7, float(np.median(durations))) if len(durations) else 0.0
    longest = median * 2
    if len(durations):
        for i in range(1, len(alignment)):
            if alignment[i].end - alignment[i].start > longest:
                if alignment[i].word in SENTENCE_END_MARKS:
                    alignment[i].end = alignment[i].start + longest
                elif alignment[i - 1].word in SENTENCE_END_MARKS:
                    alignment[i].start = alignment[i].end - longest
    return median


def merge_punctuations(alignment: list[WordTiming], prepended: str = PREPEND_PUNCTUATIONS,
                       appended: str = APPEND_PUNCTUATIONS) -> None:
    """Opening marks join the next word, closing marks the previous one; emptied entries stay ''."""
    i, j = len(alignment) - 2, len(alignment) - 1
    while i >= 0:
        prev, nxt = alignment[i], alignment[j]
        if prev.word.startswith(" ") and prev.word.strip() in prepended:
            nxt.word, nxt.tokens = prev.word + nxt.word, prev.tokens + nxt.tokens
            prev.word, prev.tokens = "", []
        else:
            j = i
        i -= 1
    i, j = 0, 1
    while j < len(alignment):
        prev, nxt = alignment[i], alignment[j]
        if not prev.word.endswith(" ") and nxt.word in appended:
            prev.word, prev.tokens = prev.word + nxt.word, prev.tokens + nxt.tokens
            nxt.word, nxt.tokens = "", []
        else:
            i = j
        j += 1


def _align(loaded, features, text_tokens, tokenizer=None, num_frames: int = N_FRAMES, heads=None,
           medfilt_width: int = 7, prepend: str = PREPEND_PUNCTUATIONS,
           append: str = APPEND_PUNCTUATIONS) -> tuple[list[WordTiming], float]:
    tok = tokenizer or loaded.tokenizer
    text = [int(t) for t in text_tokens if int(t) < tok.eot]
    if not text:
        return [], 0.0
    if features.shape[1] != loaded.model.dims.n_audio_ctx:
        raise ValueError(f"word timing needs all {loaded.model.dims.n_audio_ctx} encoder frames, got "
                         f"{features.shape[1]}: encode the window without frame-dropping hooks")
    weights, probs, row0 = cross_attention(loaded, features, text, tok, heads)
    ti, fi = token_frames(weights, row0, len(text), num_frames, medfilt_width)
    words, groups = split_words(tok, text)
    alignment = timings_from_path(words, groups, probs, ti, fi)
    median = _clamp_sentence_ends(alignment)
    merge_punctuations(alignment, prepend, append)
    return alignment, median


def _mapper(time_offset: float, time_map: Callable[[float], float] | None) -> Callable[[float], float]:
    if time_map is None:
        return lambda t: time_offset + t
    return lambda t: time_map(time_offset + t)


def align_window(loaded, features: torch.Tensor, text_tokens: Sequence[int], tokenizer=None,
                 time_offset: float = 0.0, num_frames: int = N_FRAMES, *, time_map=None, heads=None,
                 medfilt_width: int = 7, prepend_punctuations: str = PREPEND_PUNCTUATIONS,
                 append_punctuations: str = APPEND_PUNCTUATIONS) -> list[Word]:
    """Words of one decoded window.

    features: the window's encoder output [1, n_audio_ctx, C]; text_tokens: what was decoded
    (timestamp and special tokens are ignored); num_frames: the window's real mel frames (attention
    beyond them is padding); a word at window time t gets time `time_map(time_offset + t)`
    (identity map when None). heads: (layer, head) pairs overriding the model's alignment heads.
    """
    alignment, _ = _align(loaded, features, text_tokens, tokenizer, num_frames, heads, medfilt_width,
                          prepend_punctuations, append_punctuations)
    at = _mapper(time_offset, time_map)
    return [Word(at(t.start), at(t.end), t.word, t.probability) for t in alignment if t.word]


def words_for_segments(segments: list[Segment], words: list[Word]) -> list[Segment]:
    """Set each segment's `words`. When the words spell the segments' text (they came from the same
    tokens) the word stream is cut at the segments' text lengths, which is exact; otherwise each word
    goes to the segment holding its midpoint, or the nearest one."""
    if not segments:
        return segments
    if "".join(w.word for w in words) == "".join(s.text for s in segments):
        k = 0
        for s in segments:
            got, n = [], 0
            while k < len(words) and n < len(s.text):
                got.append(words[k])
                n += len(words[k].word)
                k += 1
            s.words = got
        return segments
    for s in segments:
        s.words = []
    for w in words:
        mid = (w.start + w.end) / 2
        best = min(segments, key=lambda s: 0.0 if s.start <= mid <= s.end else min(abs(mid - s.start), abs(mid - s.end)))
        best.words.append(w)
    return segments


def _fix_segment_edges(segments: list[Segment], median: float, last_speech: float) -> float:
    """openai's per-segment heuristics, on absolute times; returns the new last speech time."""
    longest = median * 2
    for seg in segments:
        words = seg.words
        if not words:
            continue
        # the first word after a pause must not absorb the pause
        if words[0].end - last_speech > median * 4 and (
                words[0].end - words[0].start > longest
                or (len(words) > 1 and words[1].end - words[0].start > longest * 2)):
            if len(words) > 1 and words[1].end - words[1].start > longest:
                boundary = max(words[1].end / 2, words[1].end - longest)
                words[0].end = words[1].start = boundary
            words[0].start = max(0.0, words[0].end - longest)
        # prefer the segment's own start when the first word is too long, else adopt the word's
        if seg.start < words[0].end and seg.start - 0.5 > words[0].start:
            words[0].start = max(0.0, min(words[0].end - median, seg.start))
        else:
            seg.start = words[0].start
        if seg.end > words[-1].start and seg.end + 0.5 < words[-1].end:
            words[-1].end = max(words[-1].start + median, seg.end)
        else:
            seg.end = words[-1].end
        # keep every word inside its segment (openai can leave the first one before it)
        seg.start, seg.end = min(seg.start, words[0].start), max(seg.end, words[-1].end)
        last_speech = seg.end
    return last_speech


def _encode(loaded, mel: torch.Tensor) -> torch.Tensor:
    model = loaded.model
    with torch.inference_mode():
        return model.encoder(mel[None].to(model.device, model.dtype))


def add_word_timestamps(loaded, segments: list[Segment], source, *, tokenizer=None, time_offset: float = 0.0,
                        num_frames: int | None = None, time_map=None, last_speech_timestamp: float = 0.0,
                        floor: float | None = None, heads=None, medfilt_width: int = 7,
                        prepend_punctuations: str = PREPEND_PUNCTUATIONS,
                        append_punctuations: str = APPEND_PUNCTUATIONS) -> float:
    """Fill `words` of `segments` (and let their edges follow the words, as openai does).

    source is one of
    - encoder features [1, F, C] of the one window these segments came from, whose frame 0 is at
      `time_offset` (chunk clock; `time_map` maps that to segment time) with `num_frames` real mel
      frames (default 3000);
    - audio samples (1-D) or their log-mel [n_mels, N] padded as ChunkStream pads it, starting at
      `time_offset` on the segments' clock (num_frames = content frames, default from the audio or
      N): a post-pass that packs consecutive segments into 30-s windows and aligns each.
    Words are kept within SPAN_MARGIN of the text's last timestamp (features) or last segment end
    (post-pass). `floor`: no word starts before it (the previous window's end). Returns the last
    speech time, to pass as `last_speech_timestamp` for the next window.
    """
    tok = tokenizer or loaded.tokenizer
    segments = [s for s in segments if any(t < tok.eot for t in s.tokens)]
    if not segments:
        return last_speech_timestamp
    kw = dict(heads=heads, medfilt_width=medfilt_width, prepend=prepend_punctuations, append=append_punctuations)
    if torch.is_tensor(source) and source.ndim == 3:
        stamps = [t for s in segments for t in s.tokens if t >= tok.timestamp_begin]
        text_end = (stamps[-1] - tok.timestamp_begin) * 0.02 if stamps else None  # 20 ms per stamp
        jobs = [(source, time_offset, num_frames or N_FRAMES, segments, text_end)]
    else:
        if time_map is not None:
            raise ValueError("the post-pass needs segments on the audio's own clock (no time_map)")
        if torch.is_tensor(source) and source.ndim == 2:
            mel = source
        else:
            audio = np.asarray(source, dtype=np.float32)
            num_frames = num_frames or int(round(len(audio) / HOP_LENGTH))
            mel = log_mel_spectrogram(audio, n_mels=loaded.model.dims.n_mels, padding=N_SAMPLES)
        jobs = _windows(loaded, mel, segments, time_offset, num_frames or mel.shape[-1])
    for feats, offset, frames, group, text_end in jobs:
        text = [t for s in group for t in s.tokens if t < tok.eot]
        if text_end is not None and SPAN_MARGIN is not None:
            # the decoder placed this text before text_end (its last timestamp); audio after it is
            # the next window's, and letting DTW spread the words over it drags them late
            frames = min(frames, max(2, int(round((text_end + SPAN_MARGIN) * FRAMES_PER_SECOND))))
        alignment, median = _align(loaded, feats, text, tok, frames, **kw)
        at = _mapper(offset, time_map)
        words = [Word(at(t.start), at(t.end), t.word, t.probability) for t in alignment if t.word]
        if floor is not None:
            for w in words:
                w.start = max(w.start, floor)
                w.end = max(w.end, w.start)
        words_for_segments(group, words)
        last_speech_timestamp = _fix_segment_edges(group, median, last_speech_timestamp)
        if group[-1].words:
            floor = group[-1].end
    return last_speech_timestamp


def _windows(loaded, mel, segments, time_offset, content_frames):
    """Greedy 30-s windows over a recording's segments: each starts where the previous group ended
    (like the decoder's seek) unless its first segment does not fit, then at that segment."""
    start = 0
    i = 0
    while i < len(segments):
        first = int(np.floor((segments[i].start - time_offset) * FRAMES_PER_SECOND))
        if first < start or (segments[i].end - time_offset) * FRAMES_PER_SECOND - start > N_FRAMES:
            start = max(0, min(first, content_frames - 1))
        j = i
        while j < len(segments) and (segments[j].end - time_offset) * FRAMES_PER_SECOND - start <= N_FRAMES + 1:
            j += 1
        j = max(j, i + 1)  # a segment longer than a window still gets aligned (its tail is cut)
        seg = mel[:, start:start + N_FRAMES]
        if seg.shape[-1] < N_FRAMES:
            seg = F.pad(seg, (0, N_FRAMES - seg.shape[-1]))
        frames = max(1, min(N_FRAMES, content_frames - start))
        offset = time_offset + start / FRAMES_PER_SECOND
        yield _encode(loaded, seg), offset, frames, segments[i:j], segments[j - 1].end - offset
        start = max(start + 1, int(round((segments[j - 1].end - time_offset) * FRAMES_PER_SECOND)))
        i = j


# --- evaluation ------------------------------------------------------------------------------------
def _norm_word(w: str) -> str:
    w = w.lower().replace("\u2019", "'").replace("\u2018", "'")
    return re.sub(r"[^a-z0-9']", "", w).strip("'")


def word_start_errors(reference: Sequence[tuple[str, float]], words: Sequence[Word]) -> np.ndarray:
    """Signed start errors (hypothesis - reference, s) of the words that match the reference
    (text, start) list after normalising (lowercase, letters/digits/apostrophes) and aligning the two
    word sequences with difflib; unmatched words on either side are ignored."""
    ref = [(n, t) for n, t in ((_norm_word(w), t) for w, t in reference) if n]
    hyp = [(n, w.start) for n, w in ((_norm_word(w.word), w) for w in words) if n]
    sm = difflib.SequenceMatcher(None, [r[0] for r in ref], [h[0] for h in hyp], autojunk=False)
    return np.array([hyp[b + k][1] - ref[a + k][1]
                     for a, b, size in sm.get_matching_blocks() for k in range(size)], dtype=np.float64)
