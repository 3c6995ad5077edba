"""Where the time goes: one transcription of the stitched set, per stage and per operator.

    python scripts/profile_stages.py                      # chunk 30, batch 16, auto compute type
    python scripts/profile_stages.py --chunk-size full --compute-type int8 --top 15

Prints the per-stage split of an unprofiled run's wall time (from the engine's own timers), then the
operators that took the most self CPU time in a second run under torch.profiler (which adds a little
overhead of its own).

Figures: docs/benchmarks.md, "Where the time goes" (chunk 30, 2 threads).
"""
from __future__ import annotations

import argparse

import torch

from murmur.eval.bench import dataset
from murmur.models.loading import get_model
from murmur.transcribe import set_threads, transcribe


def stages(stats: dict) -> list[tuple[str, float]]:
    dec = stats["decode_s"]
    rest = dec - stats["prefill_s"] - stats["forward_s"]
    known = stats["vad_s"] + stats["encode_s"] + dec + stats["stitch_s"]
    return [("VAD", stats["vad_s"]), ("encoder", stats["encode_s"]),
            ("decoder prefill (cross K/V, prompt)", stats["prefill_s"]),
            ("decoder steps: forward", stats["forward_s"]),
            ("decoder steps: logit rules, selection, bookkeeping", rest),
            ("stitch", stats["stitch_s"]), ("other (mel, scheduling, audio)", stats["wall_s"] - known)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunk-size", default="30")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--compute-type", default="auto")
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args()
    set_threads()
    item = dataset.stitched()
    loaded = get_model("tiny.en", compute_type=a.compute_type)
    kw = dict(chunk_size=a.chunk_size, batch_size=a.batch_size)
    transcribe(item.audio[:16000 * 20], loaded, **kw)  # warm-up
    r = transcribe(item.audio, loaded, **kw)
    s = r.stats
    print(f"tiny.en {loaded.compute_type}, chunk {a.chunk_size}, batch {s['batch_size']}, "
          f"{torch.get_num_threads()} threads, {item.duration / 60:.1f} min: wall {s['wall_s']:.2f} s, "
          f"{s['tokens']} tokens in {s['windows']} windows, {s['mean_active_rows']} rows a step")
    print(f"{'stage':<52} {'s':>7} {'%':>6}")
    for name, t in stages(s):
        print(f"{name:<52} {t:7.2f} {100 * t / s['wall_s']:6.1f}")
    with torch.profiler.profile() as prof:
        transcribe(item.audio, loaded, **kw)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.top))


if __name__ == "__main__":
    main()
