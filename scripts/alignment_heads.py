"""Pick alignment heads by measuring them against AMI's manual word times.

    python scripts/alignment_heads.py [--models tiny.en base] [--k-max 12]

For each model, each of the 13 AMI clips (30 s, one window) is transcribed (chunk_size=None) and its
text forced through the decoder once, keeping every decoder head's cross-attention. Each
(layer, head) alone then times the words (openai's recipe: softmax over real frames, per-frame
standardising, median filter 7, DTW, sentence-end clamp, punctuation merging), and its word starts
are scored against the reference (matched by normalised text, difflib). Heads are ranked by the
pooled median |start error|; the top-k sets (averaging their matrices, as the bundled set does) are
scored for k = 1..k-max, and k is picked on that curve. Because picking and scoring on the same 13
clips flatters the pick, a 2-fold check (rank and pick k on one half of the clips, score on the
other) compares picked vs bundled on held-out clips. Last, bundled vs picked through the full
post-pass (murmur.speakers.timing.add_word_timestamps, with segment-edge heuristics).

Figure: docs/benchmarks.md, "Speakers and words": the alignment heads behind its word times.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from word_timing_eval import CLIPS, DEFAULT_DATA, ami_reference, summarize  # noqa: E402

from murmur.audio.decode import HOP_LENGTH, N_FRAMES, N_SAMPLES, load_audio, log_mel_spectrogram  # noqa: E402
from murmur.speakers.timing import (_clamp_sentence_ends, add_word_timestamps, alignment_matrices,  # noqa: E402
                                    cross_attention, dtw, merge_punctuations, split_words, timings_from_path,
                                    word_start_errors)
from murmur.models.loading import get_model  # noqa: E402
from murmur.speakers import timing  # noqa: E402
from murmur.transcribe import transcribe  # noqa: E402
from murmur.types import Word  # noqa: E402


class Clip:
    """One clip's transcript and every head's alignment matrix [K, n_text + 1, frames]."""

    def __init__(self, loaded, name: str, path: Path, ref):
        self.name, self.ref = name, ref
        self.segments = transcribe(path, loaded, chunk_size=None).segments
        self.audio = load_audio(path)
        tok = loaded.tokenizer
        self.text = [t for s in self.segments for t in s.tokens if t < tok.eot]
        self.words, self.groups = split_words(tok, self.text)
        frames = min(N_FRAMES, int(round(len(self.audio) / HOP_LENGTH)))
        if self.segments:  # as the post-pass: the words stay near the span the decoder gave the text
            frames = min(frames, int(round((self.segments[-1].end + timing.SPAN_MARGIN) * 100)))
        mel = log_mel_spectrogram(self.audio, n_mels=loaded.model.dims.n_mels, padding=N_SAMPLES)[:, :N_FRAMES]
        with torch.inference_mode():
            feats = loaded.model.encoder(mel[None].to(loaded.model.device, loaded.model.dtype))
        d = loaded.model.dims
        self.heads = [(layer, h) for layer in range(d.n_text_layer) for h in range(d.n_text_head)]
        if self.text:
            w, self.probs, row0 = cross_attention(loaded, feats, self.text, heads="all")
            self.mats = alignment_matrices(w, row0, len(self.text), frames)
        else:
            self.probs, self.mats = [], None

    def errors(self, head_idx: list[int]) -> np.ndarray:
        """Signed start errors of the matched words when only these heads (indices) align."""
        if self.mats is None:
            return np.zeros(0)
        ti, fi = dtw(-self.mats[head_idx].mean(0).double().numpy())
        alignment = timings_from_path(self.words, [list(g) for g in self.groups], self.probs, ti, fi)
        _clamp_sentence_ends(alignment)
        merge_punctuations(alignment)
        words = [Word(t.start, t.end, t.word, t.probability) for t in alignment if t.word]
        return word_start_errors(self.ref, words)


def pooled(clips, head_idx) -> dict:
    return summarize(np.concatenate([c.errors(head_idx) for c in clips]))


def rank_heads(clips, n_heads) -> list[tuple[int, dict]]:
    scores = [(k, pooled(clips, [k])) for k in range(n_heads)]
    return sorted(scores, key=lambda x: (x[1]["median"], x[1]["p90"]))


def pick_k(clips, order, k_max) -> tuple[int, list[tuple[int, dict]]]:
    curve = [(k, pooled(clips, order[:k])) for k in range(1, min(k_max, len(order)) + 1)]
    best = min(curve, key=lambda x: (round(x[1]["median"], 4), x[1]["p90"]))[0]
    return best, curve


def full_pipeline(loaded, clips, heads) -> dict:
    errs = []
    for c in clips:
        segs = copy.deepcopy(c.segments)
        add_word_timestamps(loaded, segs, c.audio, heads=heads)
        errs.append(word_start_errors(c.ref, [w for s in segs for w in s.words]))
    return summarize(np.concatenate(errs))


def fmt(r: dict) -> str:
    return (f"median {r['median']:.3f}  p90 {r['p90']:.3f}  mean {r['mean']:.3f}  "
            f"signed median {r['bias']:+.3f}  n {r['n']}")


def run(model: str, data_dir: Path, k_max: int, device: str) -> None:
    loaded = get_model(model, device)
    ref = ami_reference(data_dir)
    bundled = [tuple(h) for h in loaded.model.alignment_heads]
    print(f"\n=== {model}: bundled heads {[list(h) for h in bundled]}", flush=True)
    t0 = time.perf_counter()
    clips = []
    for name in CLIPS:
        clips.append(Clip(loaded, name, data_dir / "ami" / f"{name}.flac", ref.get(name, [])))
        print(f"  {name}: {len(clips[-1].words)} words ({time.perf_counter() - t0:.0f} s)", flush=True)
    heads = clips[0].heads
    index = {h: i for i, h in enumerate(heads)}
    b_idx = [index[h] for h in bundled]
    print(f"transcribed and probed 13 clips in {time.perf_counter() - t0:.0f} s", flush=True)

    ranking = rank_heads(clips, len(heads))
    print("\nper head, alone (pooled over 13 clips; * = bundled):")
    print(" rank  layer head   median |err|   p90     mean   signed median  matched")
    for r, (k, s) in enumerate(ranking, 1):
        mark = "*" if k in b_idx else " "
        print(f" {r:4d}  {heads[k][0]:5d} {heads[k][1]:4d} {mark}  {s['median']:8.3f}   {s['p90']:6.3f}  "
              f"{s['mean']:6.3f}  {s['bias']:+9.3f}     {s['n']:6d}")
    order = [k for k, _ in ranking]
    best_k, curve = pick_k(clips, order, k_max)
    print("\ntop-k sets (heads averaged), all 13 clips:")
    for k, s in curve:
        print(f"  k={k:2d}  {fmt(s)}{'   <- picked' if k == best_k else ''}")
    chosen = [heads[k] for k in order[:best_k]]
    print(f"  bundled ({len(bundled)})  {fmt(pooled(clips, b_idx))}")

    # held-out check: pick on one half, score on the other
    print("\n2-fold check (rank + pick k on one half of the clips, score on the other half):")
    halves = (clips[0::2], clips[1::2])
    for a, b in ((0, 1), (1, 0)):
        fit, test = halves[a], halves[b]
        o = [k for k, _ in rank_heads(fit, len(heads))]
        kk, _ = pick_k(fit, o, k_max)
        print(f"  fit {'+'.join(c.name for c in fit)}\n    picked k={kk} {[list(heads[k]) for k in o[:kk]]}")
        print(f"    held-out picked : {fmt(pooled(test, o[:kk]))}")
        print(f"    held-out bundled: {fmt(pooled(test, b_idx))}")

    print("\nfull post-pass (add_word_timestamps: window, segment-edge heuristics), all 13 clips:")
    rb, rc = full_pipeline(loaded, clips, bundled), full_pipeline(loaded, clips, chosen)
    print(f"  bundled {[list(h) for h in bundled]}\n    {fmt(rb)}")
    print(f"  picked  {[list(h) for h in chosen]}\n    {fmt(rc)}")
    verdict = "beats" if rc["median"] < rb["median"] else "does not beat"
    print(f"  measured set {verdict} the bundled one on the median ({rc['median']:.3f} vs {rb['median']:.3f} s)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["tiny.en", "base"])
    ap.add_argument("--k-max", type=int, default=12)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    for m in args.models:
        run(m, args.data, args.k_max, args.device)


if __name__ == "__main__":
    main()
