"""Shared by scripts/sparsity_sweep.py, kv_policy_eval.py and kv_bound.py (issue 4: inside a chunk).

`eval_set()` is the measurement subset: the 32 LJSpeech clips and the 13 AMI 30-s clips, each with
its reference. `run_set()` transcribes every clip as its own sequential stream, all of them side by
side in one continuously batched engine (what `transcribe` does for the chunks of one recording),
and returns pooled normalised WER per part plus the engine and KV statistics. `wer` pools all
45 clips; `clean_wer` leaves out the two AMI clips without a transcript (UNSCORED), where tiny.en's
hallucinations swing the pooled figure by +-10 points between otherwise equal runs.

Not a measurement itself: the clip set and runner behind sparsity_sweep.py, kv_policy_eval.py and
kv_bound.py (docs/benchmarks.md, "Inside a chunk").
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from murmur.audio.decode import SAMPLE_RATE, load_audio  # noqa: E402
from murmur.engine.decoding import DecodingOptions  # noqa: E402
from murmur.engine.longform import ChunkStream  # noqa: E402
from murmur.engine.runner import Engine  # noqa: E402
from murmur.engine.scheduler import StreamScheduler  # noqa: E402
from murmur.eval.scoring import wer  # noqa: E402
from murmur.models.loading import get_model  # noqa: E402
from murmur.output.stitcher import stitch  # noqa: E402


# AMI clips whose first 30 s are almost unannotated (1 and 2 reference words): any output there is
# insertions, so they measure hallucination, not recognition. "clean" WER = LJSpeech + the other 11.
UNSCORED = ("trn01", "trn02")


def data_dir() -> Path:
    env = os.environ.get("MURMUR_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def eval_set(parts=("ljspeech", "ami"), n_lj: int = 32, n_ami: int = 13) -> list[dict]:
    d = data_dir()
    items = []
    if "ljspeech" in parts:
        for line in (d / "ljspeech" / "ljspeech.psv").read_text(encoding="utf-8").splitlines()[:n_lj]:
            uid, text = line.split("|", 1)
            items.append({"part": "ljspeech", "name": uid, "audio": load_audio(d / "ljspeech" / f"{uid}.flac"),
                          "ref": text})
    if "ami" in parts:
        segs = json.loads((d / "ami" / "ami30.seglst.json").read_text(encoding="utf-8"))
        names = ("dev00", "dev01", "trn01", "trn02", "trn03", "trn04", "trn05", "trn06", "trn07", "trn08",
                 "trn09", "tst00", "tst01")[:n_ami]
        for n in names:
            ss = sorted((s for s in segs if s["session_id"] == n), key=lambda s: s["start_time"])
            items.append({"part": "ami", "name": n, "audio": load_audio(d / "ami" / f"{n}.flac"),
                          "ref": " ".join(s["words"] for s in ss)})
    return items


class _CachedEngine(Engine):
    """Reuses encoder outputs of identical windows across runs (KV policies never change the
    encoder): WER runs get faster, features stay bit-identical. Not for timing the encoder."""

    def __init__(self, *a, feature_cache: dict, **kw):
        super().__init__(*a, **kw)
        self.fc = feature_cache

    def encode(self, reqs):
        import hashlib
        keys = {}
        for r in reqs:
            if r.features is None:
                keys[id(r)] = k = hashlib.sha1(r.mel.numpy().tobytes()).hexdigest()
                if k in self.fc:
                    r.features = self.fc[k]
        super().encode(reqs)
        for r in reqs:
            if id(r) in keys:
                self.fc.setdefault(keys[id(r)], r.features)


def run_set(items, model="tiny.en", kv_policy=None, encoder_hooks=(), batch_size: int = 8,
            threads: int | None = None, options: DecodingOptions | None = None,
            feature_cache: dict | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    loaded = get_model(model, "cpu")
    tok = loaded.tokenizer
    tok.language = "en"
    opts = options or DecodingOptions(language="en")
    streams = [ChunkStream(it["audio"], tok, opts, index=i, n_text_ctx=loaded.model.dims.n_text_ctx, language="en")
               for i, it in enumerate(items)]
    if feature_cache is not None and not encoder_hooks:
        eng = _CachedEngine(loaded, opts, batch_size=batch_size, kv_policy=kv_policy, feature_cache=feature_cache)
    else:
        eng = Engine(loaded, opts, batch_size=batch_size, kv_policy=kv_policy, encoder_hooks=encoder_hooks)
    t0 = time.perf_counter()
    eng.run(StreamScheduler(streams, max_open=2 * eng.batch_size))
    wall = time.perf_counter() - t0
    per_part: dict[str, dict] = {}
    hyps, clips = [], []
    for it, s in zip(items, streams):
        hyp = "".join(seg.text for seg in stitch([s.segments])).strip()
        hyps.append(hyp)
        w = wer(it["ref"], hyp)
        clips.append({"name": it["name"], "part": it["part"], "errors": w["errors"], "length": w["length"],
                      "ins": w["ins"], "dele": w["dele"], "sub": w["sub"]})
        for part in (it["part"],) + (("ami11",) if it["part"] == "ami" and it["name"] not in UNSCORED else ()):
            p = per_part.setdefault(part, {"errors": 0, "length": 0})
            p["errors"] += w["errors"]
            p["length"] += w["length"]
    for p in per_part.values():
        p["wer"] = p["errors"] / max(p["length"], 1)
    tot_e = sum(p["errors"] for k, p in per_part.items() if k != "ami11")
    tot_n = sum(p["length"] for k, p in per_part.items() if k != "ami11")
    clean = [p for k, p in per_part.items() if k in ("ljspeech", "ami11")]
    clean_wer = sum(p["errors"] for p in clean) / max(1, sum(p["length"] for p in clean))
    cs = eng.cache.stats
    return {
        "wer": tot_e / max(tot_n, 1), "errors": tot_e, "words": tot_n, "clean_wer": clean_wer,
        "clips": clips,
        "parts": {k: round(v["wer"], 4) for k, v in per_part.items()},
        "wall_s": wall, "encode_s": eng.stats["encode_s"], "decode_s": eng.stats["decode_s"],
        "tokens": eng.stats["tokens"], "windows": eng.stats["windows"],
        "kv": dict(cs), "hyps": hyps,
    }


def kv_columns(r: dict) -> dict:
    """Fractions of the logical KV: physical (resident slots), attended (read by attention, head-
    averaged) and computed (spanned by the batched attention); attention FLOPs saved = 1 - attended."""
    kv = r["kv"]
    lg = max(kv["kv_logical"], 1)
    att = kv.get("kv_attended", kv["kv_physical"])
    return {"phys/log": kv["kv_physical"] / lg, "attended/log": att / lg,
            "attn_flops_saved": 1 - att / lg, "computed/log": kv.get("kv_computed", 0) / lg,
            "peak_row": kv["kv_physical_peak_per_row"], "ahead": kv.get("kv_cross_evicted_ahead", 0)}


def looped(seconds: float, gap_s: float = 0.5) -> np.ndarray:
    """A long recording of real speech: LJSpeech, AMI, TED and sonnets clips in a fixed order,
    separated by `gap_s` of silence, looped to `seconds`."""
    d = data_dir()
    files = [d / "ljspeech" / f"LJ001-{i:04d}.flac" for i in range(1, 33)]
    files += sorted((d / "ami").glob("*.flac")) + [d / "ted" / "bill_gates-TED.mp3"]
    files += sorted((d / "sonnets").glob("*.mp3"))
    gap = np.zeros(int(gap_s * SAMPLE_RATE), np.float32)
    pieces, n = [], 0
    need = int(seconds * SAMPLE_RATE)
    while n < need:
        for f in files:
            a = load_audio(f)
            pieces += [a, gap]
            n += len(a) + len(gap)
            if n >= need:
                break
    return np.concatenate(pieces)[:need]


def table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(out)
