"""Physical KV per row on one 30-min full-mode chunk (issue 4: bounded by the policy's budget
whatever the chunk length), and whether a speech policy ever evicts audio ahead of the transcript.

    python scripts/kv_bound.py [--minutes 30] [--configs none,output-window+speech-window,...]

The recording loops real clips (scripts/_inside_chunk.looped); chunk_size None is sequential
mode: one stream, each 30-s window decoded with the previous text as prompt. Budget per row =
output-window's sink + window + block - 1 tokens plus the window's 1500 frames (the speech policies
start each window with every frame). Prints, per configuration, the peak and mean physical KV per
row, the budget, frames evicted at or ahead of the last timestamp, and the time taken.

Figure: docs/benchmarks.md, "Inside a chunk": a 30-min `full` chunk keeps its per-row KV within
the policy's budget, and speech-follow never evicts ahead of the last timestamp.
"""
from __future__ import annotations

import argparse
import time

import torch

from _inside_chunk import looped  # noqa: E402

from murmur.engine.kv.policies import OutputWindow, parse_kv_policy  # noqa: E402
from murmur.models.loading import get_model  # noqa: E402
from murmur.transcribe import transcribe  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--configs", default="none,output-window+speech-window,output-window+speech-follow")
    ap.add_argument("--opts", default="", help="key=value,... for every policy")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import os
    os.environ["MURMUR_THREADS"] = str(a.threads)
    loaded = get_model("tiny.en", "cpu")
    audio = looped(a.minutes * 60)
    opts = dict(kv.split("=", 1) for kv in a.opts.split(",") if kv)
    print(f"recording: {len(audio) / 16000 / 60:.1f} min of looped real speech, full mode (one chunk)")
    for spec in a.configs.split(","):
        pol = parse_kv_policy(spec, {k: v for k, v in opts.items()}, loaded)
        t0 = time.perf_counter()
        t = transcribe(audio, loaded, kv_policy=pol, temperature=0.0)
        s = t.stats
        ow = [p for p in (pol.policies if pol else []) if isinstance(p, OutputWindow)]
        self_budget = ow[0].budget() if ow else loaded.model.dims.n_text_ctx
        budget = self_budget + loaded.model.dims.n_audio_ctx
        row_steps = max(1, s["tokens"])
        print(f"{spec:32s} windows {s['windows']:3d}  peak/row {s['kv_physical_peak_per_row']:5d}  "
              f"budget {budget:5d} ({'OK' if s['kv_physical_peak_per_row'] <= budget else 'OVER'})  "
              f"mean phys/row-step {s['kv_physical'] / row_steps:7.1f}  phys/log {s['kv_physical'] / max(1, s['kv_logical']):.3f}  "
              f"cross evicted {s.get('kv_cross_evicted', 0):6d} ahead of stamp {s.get('kv_cross_evicted_ahead', 0):5d}  "
              f"{time.perf_counter() - t0:6.1f}s", flush=True)


if __name__ == "__main__":
    main()
