"""Early attentive encoder sparsification sweep (issue 4, item 2): layer k x fraction s, tiny.en greedy.

    python scripts/sparsity_sweep.py                     # timing + WER sweep, then the table
    python scripts/sparsity_sweep.py --phase timing      # encoder time only (fast)
    python scripts/sparsity_sweep.py --phase e2e --spec 0:0.5   # end-to-end wall A/B for one setting
    python scripts/sparsity_sweep.py --report            # reprint the table from the JSON
    python scripts/sparsity_sweep.py --specs off,1:0.6:8 --phase wer --out bench_out/part2.json
    python scripts/sparsity_sweep.py --report --merge bench_out/part2.json,bench_out/sparsity_timing.json

Encoder time: a fixed batch of 4 full 30-s windows (AMI clips), torch.set_num_threads(1), every
configuration timed once per round, rounds interleaved, median of --reps rounds (the machine is
shared, so the median of interleaved runs is what is comparable). WER: the 32 LJSpeech + 13 AMI
clips of scripts/_inside_chunk.py, each a sequential stream, batched together, pooled normalised
WER. A default must lose < 1 % WER relative and cut encoder time >= 1.4x.

Figures: docs/benchmarks.md, "Inside a chunk": the layer x fraction speed-ups and WER changes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from _inside_chunk import REPO, eval_set, run_set, table  # noqa: E402

from murmur.audio.decode import N_SAMPLES, log_mel_spectrogram  # noqa: E402
from murmur.engine.sparsify import parse_encoder_sparsity  # noqa: E402
from murmur.models.loading import get_model  # noqa: E402

OUT = REPO / "bench_out" / "sparsity_sweep.json"


def configs(layers, fractions):
    return ["off"] + [f"{k}:{s:g}" for k in layers for s in fractions]


def timing(specs, reps: int, threads: int = 1) -> dict:
    torch.set_num_threads(threads)
    loaded = get_model("tiny.en", "cpu")
    enc = loaded.model.encoder
    items = eval_set(("ami",))[:4]
    mel = torch.stack([log_mel_spectrogram(it["audio"][:N_SAMPLES], padding=N_SAMPLES)[:, :3000] for it in items])
    hooks = {s: parse_encoder_sparsity(s, loaded) for s in specs}
    times = {s: [] for s in specs}
    with torch.inference_mode():
        enc(mel[:1])  # warm-up
        for _ in range(reps):
            for s in specs:
                t0 = time.perf_counter()
                enc(mel, hooks=hooks[s])
                times[s].append(time.perf_counter() - t0)
    base = statistics.median(times["off"])
    return {s: {"enc_s": statistics.median(v), "enc_speedup": base / statistics.median(v), "enc_all": v}
            for s, v in times.items()}


def wer_sweep(specs, threads: int, res: dict, out: Path) -> None:
    items = eval_set()
    for s in specs:
        if s in res.get("wer", {}):
            continue
        loaded = get_model("tiny.en", "cpu")
        r = run_set(items, kv_policy=None, encoder_hooks=parse_encoder_sparsity(s, loaded), threads=threads)
        res.setdefault("wer", {})[s] = r
        out.write_text(json.dumps(res, indent=1))
        print(f"{s:8s} WER {r['wer']:.4f} clean {r['clean_wer']:.4f} {r['parts']} enc {r['encode_s']:.1f}s dec {r['decode_s']:.1f}s "
              f"wall {r['wall_s']:.1f}s", flush=True)


def e2e(spec: str, reps: int, threads: int = 1) -> dict:
    """End-to-end wall over the eval set, `off` and `spec` alternated, median of reps."""
    items = eval_set()
    loaded = get_model("tiny.en", "cpu")
    walls = {"off": [], spec: []}
    for _ in range(reps):
        for s in ("off", spec):
            r = run_set(items, encoder_hooks=parse_encoder_sparsity(s, loaded), threads=threads)
            walls[s].append((r["wall_s"], r["encode_s"], r["decode_s"]))
    out = {}
    for s, v in walls.items():
        out[s] = {"wall_s": statistics.median(x[0] for x in v), "encode_s": statistics.median(x[1] for x in v),
                  "decode_s": statistics.median(x[2] for x in v), "runs": v}
    return out


def report(res: dict) -> str:
    rows = []
    base = res.get("wer", {}).get("off")
    for s in res.get("specs", []):
        r = {"config": s}
        if s != "off":  # tiny.en: 4 encoder layers; attention FLOPs scale with frames squared
            k, frac = int(s.split(":")[0]), float(s.split(":")[1])
            r["enc_attn_saved"] = (4 - 1 - k) / 4 * (1 - (1 - frac) ** 2)
            r["cross_kv"] = 1 - frac
        t = res.get("timing", {}).get(s)
        if t:
            r.update(enc_ms=1000 * t["enc_s"], enc_speedup=t["enc_speedup"])
        w = res.get("wer", {}).get(s)
        if w:
            r.update(WER=w["wer"], clean=w.get("clean_wer"), lj=w["parts"].get("ljspeech"),
                     ami11=w["parts"].get("ami11"), enc_s=w["encode_s"], dec_s=w["decode_s"], wall_s=w["wall_s"])
            if base and w.get("clean_wer") is not None:
                r["rel_clean"] = w["clean_wer"] / base["clean_wer"] - 1
                r["rel_lj"] = w["parts"]["ljspeech"] / base["parts"]["ljspeech"] - 1
        rows.append(r)
    txt = table(rows, ["config", "enc_ms", "enc_speedup", "enc_attn_saved", "cross_kv", "WER", "clean",
                       "rel_clean", "lj", "rel_lj", "ami11", "enc_s", "dec_s", "wall_s"])
    ok = [r for r in rows if r["config"] != "off" and r.get("rel_clean", 1) < 0.01]
    fast = [r for r in ok if r.get("enc_speedup", 0) >= 1.4]
    pick = max(fast or ok, key=lambda r: r.get("enc_speedup", 0), default=None)
    txt += "\n\nWER loss < 1 % relative: " + (", ".join(r["config"] for r in ok) or "none")
    txt += "\n... and encoder >= 1.4x: " + (", ".join(r["config"] for r in fast) or "none")
    if pick:
        txt += f"\nbest: {pick['config']} (encoder {pick.get('enc_speedup', 0):.2f}x, clean WER {pick['rel_clean']:+.2%})"
    if res.get("e2e"):
        txt += "\n\nend-to-end (median of interleaved runs, 1 thread):"
        for s, v in res["e2e"].items():
            txt += f"\n  {s:8s} wall {v['wall_s']:.1f}s encode {v['encode_s']:.1f}s decode {v['decode_s']:.1f}s"
    return txt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="0,1,2,3")
    ap.add_argument("--fractions", default="0.2,0.3,0.4,0.5,0.6,0.7")
    ap.add_argument("--phase", default="timing,wer", help="timing, wer, e2e (comma separated)")
    ap.add_argument("--spec", default=None, help="setting for --phase e2e")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--specs", default=None, help="explicit settings, e.g. off,1:0.5,1:0.6:8")
    ap.add_argument("--merge", default="", help="more result JSONs (from parallel runs) to show together")
    ap.add_argument("--report", action="store_true")
    a = ap.parse_args()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    res = json.loads(a.out.read_text()) if a.out.is_file() else {}
    for extra in filter(None, a.merge.split(",")):
        more = json.loads(Path(extra).read_text())
        res["specs"] = list(dict.fromkeys(res.get("specs", []) + more.get("specs", [])))
        for k in ("wer", "timing"):
            res[k] = {**more.get(k, {}), **res.get(k, {})}
    if not a.report:
        specs = (a.specs.split(",") if a.specs else
                 configs([int(x) for x in a.layers.split(",")], [float(x) for x in a.fractions.split(",")]))
        res["specs"] = list(dict.fromkeys(res.get("specs", []) + specs))
        phases = a.phase.split(",")
        if "timing" in phases:
            res["timing"] = {**res.get("timing", {}), **timing(specs, a.reps)}
            a.out.write_text(json.dumps(res, indent=1))
        if "wer" in phases:
            wer_sweep(specs, a.threads, res, a.out)
        if "e2e" in phases:
            res["e2e"] = e2e(a.spec, max(1, a.reps // 2 + 1))
            a.out.write_text(json.dumps(res, indent=1))
    print(report(res))


if __name__ == "__main__":
    main()
