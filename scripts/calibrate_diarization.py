"""Calibrate murmur.speakers.diarize's clustering on the 13 AMI clips (30 s each, 1-4 speakers).

Embeds every clip once (speech regions and windows as DiarizeOptions() sets them), then sweeps
linkage x distance threshold x min_cluster and prints, per setting, the exact speaker-count
hits, the DER averaged over clips, the pooled DER and its parts. The setting kept maximises hits,
then minimises the mean DER. With 13 clips that choice is fitted on the test set itself, so the
script also prints a leave-one-out estimate (setting chosen on 12 clips, scored on the 13th), and
two floors: its VAD misses some quiet speech, which no clustering can recover, and labelling one
speaker at a time misses all overlap (the overlap stage, DiarizeOptions.overlap, gets under it).

DER: murmur.eval.scoring.der, as `murmur bench` and `murmur eval` score it (pyannote.metrics, 0.25 s
collar on each side of every reference boundary, overlap scored, scored span from the first to the
last turn of either side), against ami30.rttm. A clip whose reference holds no speech outside the
collars has no DER and is left out of the DER means (none with ami30.rttm; trn01 and trn02 with
the bench's SegLST turns, which keep only speech with words).

The last table says where the errors come from: per clip, missed speech / false alarm / confusion,
the speaker counts, two floors (our VAD with the reference labels inside it, overlap kept; the
same with one speaker at a time, the best without the overlap stage), and the clustering with the
true number of speakers forced (num_speakers), or with the number that speak >= 2 s.

    python scripts/calibrate_diarization.py [--data ../shared/data/ami]

Figures: docs/benchmarks.md, "Speakers and words": where the DER errors come from (missed speech,
confusion, false alarm, the VAD floor) and the clustering setting kept.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
from pathlib import Path

import numpy as np
from murmur.audio.decode import load_audio
from murmur.audio.vad import meeting_options, speech_regions
from murmur.eval.scoring import der, read_turns
from murmur.speakers import diarize as D
from murmur.speakers.segmentation import speaker_counts

CLIPS = ["dev00", "dev01", *(f"trn0{i}" for i in range(1, 10)), "tst00", "tst01"]
PARTS = ("missed detection", "false alarm", "confusion")


def load_reference(rttm: Path) -> dict[str, list[tuple[float, float, str]]]:
    turns = read_turns(rttm)
    return {c: turns.get(c, []) for c in CLIPS}


def score(ref: list, pieces) -> dict:
    d = der(ref, pieces)
    return {"diarization error rate": d["der"], "missed detection": d["missed"],
            "false alarm": d["false_alarm"], "confusion": d["confusion"], "total": d["total"],
            "n_hyp": len({p[2] for p in pieces}), "n_ref": len({r[2] for r in ref})}


def vad_floor(ref: list, regions) -> dict:
    """The reference turns cut to our speech regions: errors are the VAD's alone."""
    return score(ref, [(max(s, a), min(e, b), k) for s, e, k in ref for a, b in regions
                       if min(e, b) > max(s, a)])


def single_speaker_floor(ref: list, regions, step: float = 0.01) -> dict:
    """Inside our speech regions, the one reference speaker whose turn began last: perfect
    clustering that labels one speaker at a time."""
    pieces = []
    for a, b in regions:
        for t in np.arange(a, b, step):
            active = [(s, k) for s, e, k in ref if s <= t < e]
            pieces.append((t, t + step, max(active)[1] if active else "?"))
    return score(ref, pieces)


def summary(rows: list[dict]) -> dict:
    rows_d = [r for r in rows if r["diarization error rate"] is not None]
    tot = sum(r["total"] for r in rows_d)
    out = {"hits": sum(r["n_hyp"] == r["n_ref"] for r in rows),
           "mean": float(np.mean([r["diarization error rate"] for r in rows_d])),
           "pooled": sum(sum(r[p] for p in PARTS) for r in rows_d) / tot}
    out.update({p: sum(r[p] for r in rows_d) / tot for p in PARTS})
    return out


def _mean_der(rows) -> float:
    return float(np.mean([r["diarization error rate"] for r in rows
                          if r["diarization error rate"] is not None]))


def best(results: dict, clips: list[str]):
    # most exact counts first, then the lowest DER averaged over clips
    return max(results, key=lambda k: (sum(results[k][c]["n_hyp"] == results[k][c]["n_ref"]
                                           for c in clips),
                                       -_mean_der([results[k][c] for c in clips])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path,
                    default=Path(__file__).resolve().parents[2] / "shared" / "data" / "ami")
    args = ap.parse_args()
    ref = load_reference(args.data / "ami30.rttm")
    base = D.DiarizeOptions()

    cache = {}
    for c in CLIPS:
        audio = load_audio(args.data / f"{c}.flac")
        regions = D._join(speech_regions(audio, D.SR, base.vad or meeting_options()))
        mel = D.mel_frames(audio)
        spans = D._spans(regions, len(mel), base)
        # overlap counts once per clip over every speech window (diarize runs only the windows
        # that hold a speaker change; on these clips that is nearly all of them)
        full = speaker_counts(audio, regions, base.overlap_step, base.bf16) if base.overlap else None
        cache[c] = (regions, spans, D.embed_windows(mel, spans, base.threads, base.bf16), len(mel),
                    None if full is None else (lambda changes, x=full: x))

    grid = {"linkage": ["average", "complete"],
            "threshold": [round(t, 2) for t in np.arange(0.20, 0.501, 0.01)],
            "min_cluster": [1, 2, 3]}
    results = {}
    print(f"{'linkage':9} {'thr':>5} {'minc':>4} {'hits':>4} {'meanDER':>8} {'pooled':>7} "
          f"{'miss':>6} {'FA':>6} {'conf':>6}")
    for vals in itertools.product(*grid.values()):
        opts = dataclasses.replace(base, **dict(zip(grid, vals)))
        res = {}
        for c, (regions, spans, emb, n, counts) in cache.items():
            turns = D._label(regions, spans, emb, n, opts, counts=counts) if spans else []
            res[c] = score(ref[c], [(t.start, t.end, t.speaker) for t in turns])
        results[vals] = res
        s = summary(list(res.values()))
        print(f"{vals[0]:9} {vals[1]:5.2f} {vals[2]:4d} {s['hits']:4d} {s['mean']:8.3f} "
              f"{s['pooled']:7.3f} {s['missed detection']:6.3f} {s['false alarm']:6.3f} "
              f"{s['confusion']:6.3f}")

    chosen = best(results, CLIPS)
    print(f"\nchosen: linkage={chosen[0]} threshold={chosen[1]} min_cluster={chosen[2]}  "
          f"(DiarizeOptions now: linkage={base.linkage} threshold={base.threshold} "
          f"min_cluster={base.min_cluster})")
    s = summary(list(results[chosen].values()))
    print(f"all    mean DER {s['mean']:.3f}  pooled {s['pooled']:.3f} (miss {s['missed detection']:.3f}"
          f" FA {s['false alarm']:.3f} conf {s['confusion']:.3f})  exact count {s['hits']}/13")

    loo = []
    for c in CLIPS:
        k = best(results, [x for x in CLIPS if x != c])
        loo.append(results[k][c])
    s = summary(loo)
    print(f"leave-one-out: mean DER {s['mean']:.3f}  pooled {s['pooled']:.3f}  "
          f"exact count {s['hits']}/13")

    # where the errors come from, with the settings DiarizeOptions has now
    floors = {"vad": [], "single": [], "true k": [], "k >= 2 s": []}
    print("\nerror sources, DiarizeOptions() as now; DER parts in % of the clip's scored speech")
    print(f"{'clip':6} {'DER':>6} {'miss':>6} {'FA':>6} {'conf':>6} {'spk':>5} | {'VAD fl':>6} "
          f"{'1-spk fl':>8} {'true k':>6} {'k>=2s':>6}")
    now = []
    for c in CLIPS:
        regions, spans, emb, n, counts = cache[c]
        big = sum(sum(e - s for s, e, k in ref[c] if k == spk) >= 2.0 for spk in {r[2] for r in ref[c]})
        forced = {}
        for name, k in (("true k", len({r[2] for r in ref[c]})), ("k >= 2 s", max(big, 1))):
            turns = D._label(regions, spans, emb, n, base, num=k, counts=counts) if spans else []
            forced[name] = score(ref[c], [(t.start, t.end, t.speaker) for t in turns])
            floors[name].append(forced[name])
        turns = D._label(regions, spans, emb, n, base, counts=counts) if spans else []
        r = score(ref[c], [(t.start, t.end, t.speaker) for t in turns])
        now.append(r)
        floors["vad"].append(vad_floor(ref[c], regions))
        floors["single"].append(single_speaker_floor(ref[c], regions))
        if r["diarization error rate"] is None:
            print(f"{c:6} {'-':>6} (no reference speech outside the collars) {r['n_hyp']}/{r['n_ref']}")
            continue
        pct = lambda x, q=r: 100 * x / q["total"]  # noqa: E731
        fl = [100 * floors[k][-1]["diarization error rate"] for k in floors]
        print(f"{c:6} {100 * r['diarization error rate']:6.1f} " + " ".join(
            f"{pct(r[p]):6.1f}" for p in PARTS) + f" {r['n_hyp']:>2}/{r['n_ref']:<2} | "
            f"{fl[0]:6.1f} {fl[1]:8.1f} {fl[2]:6.1f} {fl[3]:6.1f}")
    s = summary(now)
    print(f"mean   {100 * s['mean']:6.1f} " + " ".join(f"{100 * s[p]:6.1f}" for p in PARTS)
          + f" {s['hits']:>2}/13 | " + " ".join(
              f"{100 * summary(floors[k])['mean']:{w}.1f}" for k, w in zip(floors, (6, 8, 6, 6)))
          + "   (parts pooled)")


if __name__ == "__main__":
    main()
