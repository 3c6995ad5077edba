"""How safe is stopping a greedy decode early once its text is over the compression threshold?

Runs the stitched set without stopping, records for every decode that could have been stopped the
step at which its text first went over the threshold, and whether the finished decode was rejected
anyway (its full text over the threshold). Then runs it with stopping on, and prints WER and time
for both. A false stop is a decode the rule stops that would have passed.

    python scripts/loop_stop_eval.py --chunk-size full

Figure: docs/benchmarks.md, "Accuracy against latency": decodes over the compression-ratio
threshold stop early when a fallback temperature is left (DecodingOptions.stop_loops_early).
"""
from __future__ import annotations

import argparse
import time

from murmur.engine.decoding import DecodingOptions, compression_ratio
from murmur.engine.longform import ChunkStream
from murmur.engine.runner import STOP_EVERY
from murmur.eval.bench import dataset
from murmur.eval.scoring import wer
from murmur.models.loading import get_model
from murmur.transcribe import set_threads, transcribe


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunk-size", default="full")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    set_threads()
    item = dataset.stitched()
    loaded = get_model("tiny.en")
    chunk = None if args.chunk_size == "full" else float(args.chunk_size)

    crossed: dict[int, int] = {}  # id(tokens list) -> step of first crossing
    finals: list[tuple[int | None, float, int]] = []
    orig_check, orig_result = ChunkStream._over_compression, ChunkStream.on_result

    def record(self, tokens):
        if id(tokens) not in crossed and orig_check(self, tokens):
            crossed[id(tokens)] = len(tokens)
        return False

    def on_result(self, req):
        if req.stop_check is not None:
            text = self.tokenizer.decode([t for t in req.tokens if t < self.tokenizer.eot])
            finals.append((req.tag.get("cross"), compression_ratio(text), len(req.tokens)))
        return orig_result(self, req)

    # tag each request with the step at which one of its rows first crossed, when it finishes
    import murmur.engine.runner as eng
    orig_finish = eng.Engine._finish

    def finish(self, act):
        act.req.tag["cross"] = next((crossed.pop(id(s)) for s in act.seqs if id(s) in crossed), None)
        return orig_finish(self, act)

    runs = {}
    for mode in ("off", "on"):
        if mode == "off":
            ChunkStream._over_compression, ChunkStream.on_result, eng.Engine._finish = record, on_result, finish
        else:
            ChunkStream._over_compression, ChunkStream.on_result, eng.Engine._finish = (
                orig_check, orig_result, orig_finish)
        t0 = time.perf_counter()
        r = transcribe(item.audio, loaded, chunk_size=chunk, batch_size=args.batch_size,
                       decoding=DecodingOptions(stop_loops_early=True))
        runs[mode] = (wer(item.reference, r.text)["wer"] * 100, time.perf_counter() - t0, r.stats)

    thr = DecodingOptions().compression_ratio_threshold
    stopped = [f for f in finals if f[0] is not None]
    true_stop = [f for f in stopped if f[1] > thr]
    print(f"decodes that could stop: {len(finals)}; the rule stops {len(stopped)} "
          f"(check every {STOP_EVERY} steps)")
    print(f"  rejected anyway when run to the end: {len(true_stop)}; false stops: {len(stopped) - len(true_stop)}")
    saved = sum(n - c for c, _, n in stopped)
    print(f"  tokens saved: {saved} of {sum(n for _, _, n in finals)} in stoppable decodes")
    for mode, (w, wall, st) in runs.items():
        print(f"stop {mode}: WER {w:.2f} %, wall {wall:.1f} s, decode {st['decode_s']:.1f} s, "
              f"fallbacks {st['fallbacks']}, tokens {st['tokens']}")


if __name__ == "__main__":
    main()
