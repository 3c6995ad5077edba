"""Word-timestamp accuracy on the 13 AMI clips against the manual word times.

    python scripts/word_timing_eval.py [--model tiny.en] [--heads bundled|L:H,L:H,...] [--mode post|stream|both]

Each clip is transcribed with murmur.transcribe(path, model, chunk_size=None); words then come from
`--mode post`: murmur.speakers.timing.add_word_timestamps over the finished segments and the clip's audio
(a post-pass), or `--mode stream`: transcribe(..., word_timestamps=True), the per-window hook
inside ChunkStream. Hypothesis words are matched to the reference words (ami30.words.seglst.json,
all speakers, sorted by start) by normalised text with difflib; the figures are over matched words: median and 90th percentile of |hyp start - ref start|, pooled.

Figures: docs/benchmarks.md, "Speakers and words": median and 90th-percentile start error
(`--mode stream`).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from murmur.audio.decode import load_audio  # noqa: E402
from murmur.models.loading import get_model  # noqa: E402
from murmur.speakers.timing import add_word_timestamps, word_start_errors  # noqa: E402
from murmur.transcribe import transcribe  # noqa: E402

CLIPS = ("dev00", "dev01", "trn01", "trn02", "trn03", "trn04", "trn05", "trn06", "trn07", "trn08", "trn09",
         "tst00", "tst01")
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def ami_reference(data_dir: Path) -> dict[str, list[tuple[str, float]]]:
    """Reference (word, start) per clip, every speaker merged in time order (the audio is a mix)."""
    out: dict[str, list[tuple[str, float]]] = {}
    for e in json.loads((data_dir / "ami" / "ami30.words.seglst.json").read_text()):
        out.setdefault(e["session_id"], []).append((e["words"], float(e["start_time"])))
    return {k: sorted(v, key=lambda x: x[1]) for k, v in out.items()}


def parse_heads(text: str | None):
    if not text or text == "bundled":
        return None
    return [tuple(int(x) for x in h.split(":")) for h in text.split(",")]


def clip_words(loaded, path: Path, mode: str, heads=None):
    """Segments (with words) of one clip; `heads` overrides the model's alignment heads."""
    saved = loaded.model.alignment_heads
    if heads is not None:
        loaded.model.alignment_heads = [tuple(h) for h in heads]
    try:
        if mode == "stream":
            return transcribe(path, loaded, chunk_size=None, word_timestamps=True).segments
        segments = transcribe(path, loaded, chunk_size=None).segments
        add_word_timestamps(loaded, segments, load_audio(path))
        return segments
    finally:
        loaded.model.alignment_heads = saved


def summarize(errors: np.ndarray) -> dict:
    a = np.abs(errors)
    if not len(a):
        return {"n": 0, "median": float("nan"), "p90": float("nan"), "mean": float("nan")}
    return {"n": int(len(a)), "median": float(np.median(a)), "p90": float(np.percentile(a, 90)),
            "mean": float(a.mean()), "bias": float(np.median(errors))}


def evaluate(loaded, data_dir: Path, mode: str, heads=None, verbose: bool = True) -> dict:
    ref = ami_reference(data_dir)
    pooled, per_clip = [], {}
    for clip in CLIPS:
        t0 = time.perf_counter()
        segs = clip_words(loaded, data_dir / "ami" / f"{clip}.flac", mode, heads)
        words = [w for s in segs for w in s.words]
        e = word_start_errors(ref.get(clip, []), words)
        pooled.append(e)
        per_clip[clip] = summarize(e) | {"ref": len(ref.get(clip, [])), "hyp": len(words)}
        if verbose:
            r = per_clip[clip]
            print(f"  {clip}: ref {r['ref']:4d} hyp {r['hyp']:4d} matched {r['n']:4d}  "
                  f"median {r['median']:.3f}  p90 {r['p90']:.3f}  ({time.perf_counter() - t0:.1f} s)", flush=True)
    return {"pooled": summarize(np.concatenate(pooled)), "clips": per_clip}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny.en")
    ap.add_argument("--heads", default="bundled", help="'bundled' or layer:head pairs, e.g. 2:0,3:1")
    ap.add_argument("--mode", choices=("post", "stream", "both"), default="post")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    loaded = get_model(args.model, args.device)
    heads = parse_heads(args.heads)
    shown = heads if heads is not None else loaded.model.alignment_heads
    print(f"model {args.model}  heads {[list(h) for h in shown]}")
    for mode in (("post", "stream") if args.mode == "both" else (args.mode,)):
        print(f"mode {mode}:")
        r = evaluate(loaded, args.data, mode, heads)["pooled"]
        print(f"AMI word starts ({args.model}, {mode}): matched {r['n']}  median |err| {r['median']:.3f} s  "
              f"p90 {r['p90']:.3f} s  mean {r['mean']:.3f} s  median signed {r['bias']:+.3f} s  "
              f"(target median <= 0.15 s: {'met' if r['median'] <= 0.15 else 'NOT met'})")


if __name__ == "__main__":
    main()
