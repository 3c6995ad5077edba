"""Calibrate murmur.diarize's clustering on the 13 AMI clips (30 s each, 1-4 speakers).

Embeds every clip once (speech regions and windows as DiarizeOptions() sets them), then sweeps
linkage x distance threshold x min_cluster and prints, per setting, the exact speaker-count
hits, the DER averaged over clips, the pooled DER and its parts. The setting kept maximises hits,
then minimises the mean DER. With 13 clips that choice is fitted on the test set itself, so the
script also prints a leave-one-out estimate (setting chosen on 12 clips, scored on the 13th), and
two floors that no clustering can beat: this pipeline labels one speaker at a time, and its VAD
misses some quiet speech.

DER: pyannote.metrics DiarizationErrorRate(collar=0.5), overlap scored. md-eval's "0.25 s collar"
is 0.25 s on each side of every reference boundary; pyannote's `collar` is the whole width
(pyannote/metrics/utils.py, UEMSupportMixin.extrude: Segment(t - 0.5 * collar, t + 0.5 * collar)),
hence 0.5. The scored span (UEM) is the whole clip.

    python scripts/calibrate_diarization.py [--data ../shared/data/ami]
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
from pathlib import Path

import numpy as np
from pyannote.core import Annotation, Segment as PSeg, Timeline
from pyannote.metrics.diarization import DiarizationErrorRate

from murmur import diarize as D
from murmur.audio import load_audio
from murmur.vad import speech_regions

CLIPS = ["dev00", "dev01", *(f"trn0{i}" for i in range(1, 10)), "tst00", "tst01"]
PARTS = ("missed detection", "false alarm", "confusion")


def load_reference(rttm: Path) -> dict[str, Annotation]:
    ref = {c: Annotation(uri=c) for c in CLIPS}
    for line in rttm.read_text().splitlines():
        f = line.split()
        if f and f[1] in ref:
            ref[f[1]][PSeg(float(f[3]), float(f[3]) + float(f[4]))] = f[7]
    return ref


def score(ref: Annotation, pieces, dur: float) -> dict:
    hyp = Annotation(uri=ref.uri)
    for i, (s, e, spk) in enumerate(pieces):
        hyp[PSeg(s, e), i] = spk
    d = DiarizationErrorRate(collar=0.5)(ref, hyp, uem=Timeline([PSeg(0, dur)]), detailed=True)
    d["n_hyp"], d["n_ref"] = len(hyp.labels()), len(ref.labels())
    return d


def single_speaker_floor(ref: Annotation, regions, dur: float) -> dict:
    """Oracle labels inside speech regions (None: the reference's own), one speaker at a time
    (the one whose turn began last): what perfect clustering would score with that VAD and no
    overlap detection."""
    pieces, step = [], 0.01
    for t in np.arange(0, dur, step):
        active = [(seg.start, spk) for seg, _, spk in ref.itertracks(yield_label=True)
                  if seg.start <= t < seg.end]
        if regions is None or any(s <= t < e for s, e in regions):
            if active or regions is not None:
                pieces.append((t, t + step, max(active)[1] if active else "?"))
    return score(ref, pieces, dur)


def summary(rows: list[dict]) -> dict:
    tot = sum(r["total"] for r in rows)
    out = {"hits": sum(r["n_hyp"] == r["n_ref"] for r in rows),
           "mean": float(np.mean([r["diarization error rate"] for r in rows])),
           "pooled": sum(sum(r[p] for p in PARTS) for r in rows) / tot}
    out.update({p: sum(r[p] for r in rows) / tot for p in PARTS})
    return out


def best(results: dict, clips: list[str]):
    # most exact counts first, then the lowest DER averaged over clips
    return max(results, key=lambda k: (sum(results[k][c]["n_hyp"] == results[k][c]["n_ref"]
                                           for c in clips),
                                       -np.mean([results[k][c]["diarization error rate"]
                                                 for c in clips])))


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
        regions = speech_regions(audio, D.SR, base.vad or D._vad_defaults())
        mel = D.mel_frames(audio)
        spans = D._spans(regions, len(mel), base)
        cache[c] = (regions, spans, D.embed_windows(mel, spans, base.threads), len(mel),
                    len(audio) / D.SR)

    grid = {"linkage": ["average", "complete"],
            "threshold": [round(t, 2) for t in np.arange(0.20, 0.501, 0.01)],
            "min_cluster": [1, 2, 3]}
    results = {}
    print(f"{'linkage':9} {'thr':>5} {'minc':>4} {'hits':>4} {'meanDER':>8} {'pooled':>7} "
          f"{'miss':>6} {'FA':>6} {'conf':>6}")
    for vals in itertools.product(*grid.values()):
        opts = dataclasses.replace(base, **dict(zip(grid, vals)))
        res = {}
        for c, (regions, spans, emb, n, dur) in cache.items():
            turns = D._label(regions, spans, emb, n, opts) if spans else []
            res[c] = score(ref[c], [(t.start, t.end, t.speaker) for t in turns], dur)
        results[vals] = res
        s = summary(list(res.values()))
        print(f"{vals[0]:9} {vals[1]:5.2f} {vals[2]:4d} {s['hits']:4d} {s['mean']:8.3f} "
              f"{s['pooled']:7.3f} {s['missed detection']:6.3f} {s['false alarm']:6.3f} "
              f"{s['confusion']:6.3f}")

    chosen = best(results, CLIPS)
    print(f"\nchosen: linkage={chosen[0]} threshold={chosen[1]} min_cluster={chosen[2]}  "
          f"(DiarizeOptions now: linkage={base.linkage} threshold={base.threshold} "
          f"min_cluster={base.min_cluster})")
    print(f"{'clip':6} {'DER':>6} {'miss':>6} {'FA':>6} {'conf':>6} {'scored':>7} {'spk':>5}")
    for c in CLIPS:
        r = results[chosen][c]
        print(f"{c:6} {r['diarization error rate']:6.3f} " + " ".join(
            f"{r[p]:6.2f}" for p in PARTS) + f" {r['total']:6.2f}s {r['n_hyp']}/{r['n_ref']}")
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

    floor = [single_speaker_floor(ref[c], cache[c][0], cache[c][4]) for c in CLIPS]
    oracle = [single_speaker_floor(ref[c], None, cache[c][4]) for c in CLIPS]
    for name, rows in (("floor, our VAD + perfect single-speaker labels", floor),
                       ("floor, perfect VAD + perfect single-speaker labels", oracle)):
        s = summary(rows)
        print(f"{name}: mean DER {s['mean']:.3f}  pooled {s['pooled']:.3f} "
              f"(miss {s['missed detection']:.3f} FA {s['false alarm']:.3f})")


if __name__ == "__main__":
    main()
