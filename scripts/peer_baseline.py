"""Peer baseline: faster-whisper (tiny.en int8, CPU, 2 threads) on the stitched long-form set.

    python scripts/peer_baseline.py [--repeat 1] [--gap 1.0] [--out bench_out]

Prints normalised WER and wall time for sequential greedy and batched decoding of
the stitched recording, then per-part WER with each clip transcribed alone
(sequential). WER: whisper_normalizer EnglishTextNormalizer on both sides (curly
apostrophes straightened first, as the normaliser only knows ASCII ones), jiwer,
pooled over all words of a part (not averaged per clip).

No table comes from it now: the README's faster-whisper rows come from `murmur bench --peers`
(the same peers, in a child process, in the same run as Murmur's).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from murmur.eval.bench import dataset, peers  # noqa: E402

PART_NAMES = ("ljspeech", "ami", "ted", "sonnets")


def _norm():
    from whisper_normalizer.english import EnglishTextNormalizer

    n = EnglishTextNormalizer()
    return lambda s: " ".join(n(s.replace("\u2019", "'").replace("\u2018", "'")).split())


NORM = _norm()


def wer(refs, hyps) -> tuple[float, int, int]:
    """(pooled WER, errors, reference words) over paired lists of strings."""
    import jiwer

    refs = [NORM(r) for r in refs]
    hyps = [NORM(h) for h in hyps]
    err = n = 0
    for r, h in zip(refs, hyps):
        nr = len(r.split())
        if nr == 0:  # jiwer rejects empty references; all hypothesis words are insertions
            err += len(h.split())
            continue
        o = jiwer.process_words(r, h)
        err += o.substitutions + o.deletions + o.insertions
        n += nr
    return (err / n if n else float("nan")), err, n


def split_by_clip(item, segments):
    """Approximate per-part attribution of a stitched run: each hypothesis segment
    goes to the clip holding its midpoint (segments can straddle boundaries)."""
    texts = {p: [] for p in PART_NAMES}
    refs = {p: [] for p in PART_NAMES}
    for c in item.clips:
        refs.setdefault(c["part"], []).append(c["reference"])
    bounds = [(c["start"], c["end"], c["part"]) for c in item.clips]
    for s in segments:
        mid = 0.5 * (s["start"] + s["end"])
        # nearest clip (mid may fall in a gap)
        part = min(bounds, key=lambda b: 0 if b[0] <= mid <= b[1]
                   else min(abs(mid - b[0]), abs(mid - b[1])))[2]
        texts.setdefault(part, []).append(s["text"])
    return {p: wer([" ".join(refs[p])], [" ".join(texts.get(p, []))])[0]
            for p in refs if refs[p]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--gap", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--compute-type", default="int8")
    ap.add_argument("--model", default=None, help="CTranslate2 model folder (default tiny.en)")
    ap.add_argument("--no-parts", action="store_true", help="skip per-clip runs")
    ap.add_argument("--batched-beam5", action="store_true",
                    help="also run batched with faster-whisper's default beam_size=5")
    ap.add_argument("--only", choices=("seq", "batched", "batched5"), default=None,
                    help="run one stitched configuration (fresh process = clean RSS figures)")
    ap.add_argument("--seed", type=int, default=peers.SEED,
                    help="CTranslate2 seed (sampling at fallback temperatures)")
    ap.add_argument("--out", default=None, help="folder for rows.csv/rows.json/plot.png")
    a = ap.parse_args(argv)

    model = a.model or peers.default_model_path()
    peers.SEED = a.seed  # read when the model is first built
    t = time.perf_counter()
    item = dataset.stitched(gap_s=a.gap, repeat=a.repeat)
    print(f"data: {dataset.data_dir()}  model: {model}")
    print(f"stitched: {item.name}  {len(item.clips)} clips  duration {item.duration:.1f} s "
          f"({item.duration / 60:.2f} min)  ref words {len(NORM(item.reference).split())}  "
          f"(built in {time.perf_counter() - t:.1f} s)")

    t = time.perf_counter()
    peers._model(model, a.compute_type)
    import psutil

    print(f"model load {time.perf_counter() - t:.2f} s (excluded from wall); "
          f"process RSS now {psutil.Process().memory_info().rss / 2**20:.0f} MB "
          f"(torch is loaded if murmur.audio decoded the audio)\n")

    runs = {"seq": ("sequential greedy", lambda: peers.faster_whisper_sequential(
                item, model, a.compute_type, beam_size=1)),
            "batched": (f"batched{a.batch_size} beam1", lambda: peers.faster_whisper_batched(
                item, model, a.batch_size, a.compute_type, beam_size=1)),
            "batched5": (f"batched{a.batch_size} beam5", lambda: peers.faster_whisper_batched(
                item, model, a.batch_size, a.compute_type, beam_size=5))}
    keys = [a.only] if a.only else ["seq", "batched"] + (["batched5"] if a.batched_beam5 else [])
    rows = []
    for key in keys:
        label, fn = runs[key]
        # other work on the machine inflates wall time: show the load it ran under
        load = os.getloadavg()[0]
        r = fn()
        w, err, n = wer([item.reference], [r["text"]])
        r.update(wer=w, errors=err, ref_words=n, kind="peer", audio_s=item.duration,
                 load_before=load)
        rows.append(r)
        print(f"{label:22s} WER {100 * w:6.2f}%  ({err}/{n})  wall {r['wall_s']:7.1f} s  "
              f"RTFx {r['rtfx']:5.1f}  peak RSS {r['peak_rss_mb']:.0f} MB "
              f"(+{r['peak_rss_delta_mb']:.0f} during run)  load {load:.1f}")
        if key == "seq":
            # batched segments are whole VAD chunks (up to 30 s of speech, spanning clips),
            # so this attribution is only meaningful for sequential
            parts = split_by_clip(item, r["segments"])
            print(" " * 22 + " approx. per part in stitched run: "
                  + "  ".join(f"{p} {100 * v:.2f}%" for p, v in parts.items()))

    if not a.no_parts and not a.only:
        print("\nper part, each clip transcribed alone (sequential greedy):")
        builders = dict(ljspeech=dataset.ljspeech_items, ami=dataset.ami_items,
                        ted=lambda: [dataset.ted_item()], sonnets=dataset.sonnet_items)
        for p in PART_NAMES:
            items = builders[p]()
            outs = [peers.faster_whisper_sequential(it, model, a.compute_type, 1) for it in items]
            w, err, n = wer([it.reference for it in items], [o["text"] for o in outs])
            wall = sum(o["wall_s"] for o in outs)
            dur = sum(it.duration for it in items)
            rows.append(dict(name=f"faster-whisper seq {p} clips alone", kind="peer-part",
                             wer=w, errors=err, ref_words=n, wall_s=wall, audio_s=dur,
                             rtfx=dur / wall))
            print(f"  {p:9s} {len(items):2d} clips  {dur:6.1f} s  WER {100 * w:6.2f}%  "
                  f"({err}/{n})  wall {wall:6.1f} s")

    if a.out:
        from murmur.eval.bench.plot import plot_accuracy_latency, write_csv, write_json

        out = Path(a.out)
        write_csv(rows, out / "peer_rows.csv")
        write_json(rows, out / "peer_rows.json")
        plot_accuracy_latency([r for r in rows if r["kind"] == "peer"], out / "peer_plot.png")
        print(f"\nwrote {out}/peer_rows.csv, peer_rows.json, peer_plot.png")


if __name__ == "__main__":
    main()
