"""KV policies (issue 4, item 1): WER, KV kept and speed per configuration, tiny.en greedy.

    python scripts/kv_policy_eval.py                 # WER + KV sweep over CONFIGS, then the table
    python scripts/kv_policy_eval.py --phase speed   # 1-thread A/B of the defaults against none
    python scripts/kv_policy_eval.py --report        # reprint from bench_out/kv_policy_eval.json

Set: the 32 LJSpeech + 13 AMI clips of scripts/_inside_chunk.py, each a sequential stream, batched
together (batch 8). Columns: pooled normalised WER and its relative change; KV as fractions of the
logical KV (tokens + frames each row has seen, summed over steps): physical = resident slots,
attended = what attention reads (head-averaged for duo), attention FLOPs saved = 1 - attended,
computed = what the batched dense attention spans (every row over the longest row); `ahead` =
frames evicted at or ahead of the row's last emitted timestamp; decode and wall seconds.
Speed: decode_s of the whole set at torch.set_num_threads(1), none and each default alternated,
median of --reps runs (the machine is shared: compare only the interleaved medians).

No table of docs/benchmarks.md comes from it: the KV-policy table there is `murmur bench
--kv-policies` on the stitched set; this is the per-clip view (WER per part, KV attended and computed).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from _inside_chunk import REPO, eval_set, kv_columns, run_set, table  # noqa: E402

from murmur.engine.kv.policies import parse_kv_policy  # noqa: E402
from murmur.models.loading import get_model  # noqa: E402

OUT = REPO / "bench_out" / "kv_policy_eval.json"

CONFIGS = [
    ("none", {}),
    ("output-window", {"window": "32"}),
    ("output-window", {"window": "64"}),
    ("output-window", {"window": "128"}),
    ("output-window", {"window": "64", "physical": "0"}),
    ("speech-window", {}),
    ("speech-window", {"slide_rate": "4", "slide_delay": "32"}),
    ("speech-window", {"slide_rate": "16", "slide_delay": "8", "slide_cap": "1200", "speech_window": "128"}),
    ("speech-follow", {"margin": "100"}),
    ("speech-follow", {"margin": "50"}),
    ("speech-follow", {"margin": "25"}),
    ("speech-follow", {"margin": "0"}),
    ("duo", {"duo_retrieval": "0.75"}),
    ("duo", {"duo_retrieval": "0.5"}),
    ("duo", {"duo_retrieval": "0.25"}),
    ("output-window+speech-follow", {"window": "64", "margin": "50"}),
]
# defaults compared for speed
SPEED = [("output-window", {}), ("speech-follow", {}), ("output-window+speech-follow", {}), ("duo", {})]


def key(spec, opts):
    return spec + ("" if not opts else " " + ",".join(f"{k}={v}" for k, v in sorted(opts.items())))


def sweep(configs, res, out: Path, threads: int) -> None:
    items = eval_set()
    loaded = get_model("tiny.en", "cpu")
    fc: dict = {}  # encoder outputs shared by the runs: policies never change the encoder
    for spec, opts in configs:
        k = key(spec, opts)
        if k in res.get("runs", {}):
            continue
        r = run_set(items, kv_policy=parse_kv_policy(spec, opts, loaded), threads=threads, feature_cache=fc)
        res.setdefault("runs", {})[k] = r
        out.write_text(json.dumps(res, indent=1))
        c = kv_columns(r)
        print(f"{k:50s} WER {r['wer']:.4f} clean {r['clean_wer']:.4f} {r['parts']} phys {c['phys/log']:.3f} att {c['attended/log']:.3f} "
              f"ahead {c['ahead']} dec {r['decode_s']:.1f}s", flush=True)


def speed(reps: int, res: dict, out: Path) -> None:
    items = eval_set()
    loaded = get_model("tiny.en", "cpu")
    runs = {key(s, o): [] for s, o in [("none", {})] + SPEED}
    for _ in range(reps):
        for s, o in [("none", {})] + SPEED:
            r = run_set(items, kv_policy=parse_kv_policy(s, o, loaded), threads=1)
            runs[key(s, o)].append((r["decode_s"], r["wall_s"]))
            print(key(s, o), f"decode {r['decode_s']:.1f}s wall {r['wall_s']:.1f}s", flush=True)
    res["speed"] = {k: {"decode_s": statistics.median(x[0] for x in v), "wall_s": statistics.median(x[1] for x in v),
                        "runs": v} for k, v in runs.items()}
    out.write_text(json.dumps(res, indent=1))


def report(res: dict) -> str:
    runs = res.get("runs", {})
    base = runs.get("none")
    rows = []
    for k, r in runs.items():
        row = {"config": k, "WER": r["wer"], "clean": r.get("clean_wer"), "lj": r["parts"].get("ljspeech"),
               "ami11": r["parts"].get("ami11"), "dec_s": r["decode_s"], "wall_s": r["wall_s"], **kv_columns(r)}
        if base and r.get("clean_wer") is not None:
            row["rel_clean"] = r["clean_wer"] / base["clean_wer"] - 1
        rows.append(row)
    txt = table(rows, ["config", "WER", "clean", "rel_clean", "lj", "ami11", "phys/log", "attended/log",
                       "attn_flops_saved", "computed/log", "peak_row", "ahead", "dec_s", "wall_s"])
    if res.get("speed"):
        sp = res["speed"]
        b = sp.get("none")
        txt += "\n\nspeed, 1 thread, median of interleaved runs:\n"
        txt += table([{"config": k, "decode_s": v["decode_s"], "wall_s": v["wall_s"],
                       "decode_vs_none": (b["decode_s"] / v["decode_s"]) if b else None} for k, v in sp.items()],
                     ["config", "decode_s", "wall_s", "decode_vs_none"])
    return txt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", default="wer", help="wer, speed (comma separated)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--report", action="store_true")
    a = ap.parse_args()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    res = json.loads(a.out.read_text()) if a.out.is_file() else {}
    if not a.report:
        if "wer" in a.phase:
            sweep(CONFIGS, res, a.out, a.threads)
        if "speed" in a.phase:
            speed(a.reps, res, a.out)
    print(report(res))


if __name__ == "__main__":
    main()
