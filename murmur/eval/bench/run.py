"""`murmur bench`: accuracy against latency, Murmur's configurations and the peers in one run."""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

import numpy as np

from murmur.eval.bench import dataset, peers
from murmur.eval.bench.plot import pareto_front, plot_accuracy_latency, write_csv, write_json

SETS = ("stitched", "ami", "ljspeech", "ami-clips", "ljspeech-clips", "noref")


def _wer(ref: str, hyp: str) -> dict:
    from murmur.eval.scoring import wer
    return wer(ref, hyp)


def load_set(name: str, repeat: int = 1) -> list[dataset.Item]:
    """A named benchmark set; '*-clips' sets are many items, each transcribed whole and pooled."""
    if name == "stitched":
        return [dataset.stitched(repeat=repeat)]
    if name == "ami":
        return [dataset.stitched_ami()]
    if name == "ljspeech":
        return [dataset.stitched(parts=("ljspeech",), repeat=repeat)]
    if name == "ami-clips":
        return dataset.ami_items()
    if name == "ljspeech-clips":
        return dataset.ljspeech_items()
    if name == "noref":
        return [dataset.noref_15min()]
    raise SystemExit(f"unknown set {name!r}; choose from {', '.join(SETS)}")


def item_from_files(audio: str, ref: str | None) -> dataset.Item:
    from murmur.audio.decode import load_audio
    from murmur.eval.scoring import read_any
    a = load_audio(audio)
    text = ""
    if ref:
        entries = read_any(ref)
        text = " ".join(e["words"] for e in sorted(entries, key=lambda e: (e.get("start_time") or 0)))
    return dataset.Item(name=Path(audio).stem, audio=a, reference=text, duration=len(a) / 16000)


def _pool(rows: list[dict]) -> dict:
    """Sum errors and words over items: one WER for the set, not a mean of clip WERs."""
    err = sum(r["errors"] for r in rows if r.get("errors") is not None)
    n = sum(r["length"] for r in rows if r.get("length"))
    return {"wer": 100 * err / n if n else None, "errors": err, "ref_words": n}


def speaker_scores(item: dataset.Item, result) -> dict:
    """cpWER, tcpWER (5 s collar) and DER (0.25 s collar) where the item has speaker references.
    Words are scored against the SegLST; DER and the speaker count against the item's turns
    (ami30.rttm) where it has them, else against the SegLST's segments."""
    from murmur.eval.scoring import cpwer, der, tcpwer
    from murmur.output.writers import seglst
    ref = [dict(e, session_id=item.name) for e in item.ref_segments]
    hyp = [dict(e, session_id=item.name) for e in seglst(result)]
    ref_turns = item.ref_turns or [(e["start_time"], e["end_time"], e["speaker"]) for e in ref]
    if len({e["speaker"] for e in ref}) > 20 and item.clips:
        # meeteval refuses more than 20 speakers per session (a stitched set of meetings has 37):
        # score each source clip as its own session; DER below still spans the whole recording
        def session(e):
            mid = (e["start_time"] + e["end_time"]) / 2
            return next((c["name"] for c in item.clips if c["start"] <= mid < c["end"]), item.clips[-1]["name"])
        ref = [dict(e, session_id=session(e)) for e in ref]
        hyp = [dict(e, session_id=session(e)) for e in hyp]
    cp, tcp = cpwer(ref, hyp), tcpwer(ref, hyp)
    out = {"cpwer": (cp["errors"], cp["length"]), "tcpwer": (tcp["errors"], tcp["length"]),
           "speakers_exact": len({t.speaker for t in result.turns}) == len({t[2] for t in ref_turns})}
    if result.turns:
        d = der(ref_turns, result.turns)
        if d["der"] is not None:  # None: no reference speech outside the collars
            out["der"] = (d["missed"] + d["false_alarm"] + d["confusion"], d["total"])
            out["der_clip"] = 100 * d["der"]
    return out


def run_murmur(items, model, chunk_size, batch_size, beam_size=1, kv_policy=None, kv_opts=None,
               sparsity=None, progress=False, diarize=False, compute_type="auto", speculative="none",
               spec_opts=None) -> dict:
    """One configuration over the set: a row of pooled scores and stage times; the transcripts go
    under the row's "transcripts" key (cmd_bench writes them out and drops the key)."""
    from murmur.models.loading import get_model
    from murmur.options import TranscribeOptions
    from murmur.transcribe import transcribe
    loaded = get_model(model, compute_type=compute_type)
    # a spec, not a policy object: transcribe makes a fresh policy per item (policies hold per-run state)
    options = TranscribeOptions(chunk_size=chunk_size, batch_size=batch_size, beam_size=beam_size, progress=progress,
                                compute_type=compute_type, kv_policy=kv_policy, kv_opts=kv_opts,
                                encoder_sparsity=sparsity, speculative=speculative, spec_opts=spec_opts)
    per, stats, spk, hyps = [], [], [], []
    mon = peers._PeakRSS()
    with mon.watch():
        t0 = time.perf_counter()
        for it in items:
            r = transcribe(it.audio, loaded, options.with_(diarize=diarize and bool(it.ref_segments)))
            stats.append(r.stats)
            hyps.append({"item": it.name, "text": r.text,
                         "segments": [{"start": round(g.start, 3), "end": round(g.end, 3), "text": g.text,
                                       "tokens": g.tokens} for g in r.segments]})
            if it.reference:
                per.append(_wer(it.reference, r.text))
            if diarize and it.ref_segments:
                spk.append(speaker_scores(it, r))
        wall = time.perf_counter() - t0
    audio_s = sum(it.duration for it in items)
    agg = lambda k: round(sum(s.get(k) or 0 for s in stats), 3)  # noqa: E731
    slot_steps = sum(s.get("batch_occupancy", 0) for s in stats) / max(len(stats), 1)
    kv_log, kv_phys = agg("kv_logical"), agg("kv_physical")
    row = {
        "name": f"murmur {loaded.compute_type} chunk={chunk_size} batch={batch_size}"
                + (f" beam={beam_size}" if beam_size > 1 else "")
                + (f" kv={kv_policy}" if kv_policy and kv_policy != "none" else "")
                + (f" sparsity={sparsity}" if sparsity and sparsity != "off" else "")
                + (f" spec={speculative}" if speculative and speculative != "none" else ""),
        "kind": "murmur", "compute_type": loaded.compute_type, "chunk_size": chunk_size,
        "batch_size": batch_size, "beam_size": beam_size,
        "kv_policy": kv_policy or "none", "encoder_sparsity": sparsity or "off",
        "speculative": speculative or "none", "target_forwards": int(agg("target_forwards")),
        "draft_tokens": int(agg("draft_tokens")), "accepted_tokens": int(agg("accepted_tokens")),
        "draft_s": agg("draft_s"), "tokens_per_forward": round(agg("tokens") / max(agg("row_forwards"), 1), 3),
        **_pool(per), "wall_s": round(wall, 2), "rtfx": round(audio_s / wall, 2), "audio_s": round(audio_s, 1),
        "peak_rss_mb": round(mon.peak / 2**20, 1),
        # the samples the bench holds in memory before the run: RSS can be flat only above them
        "input_audio_mb": round(sum(it.audio.nbytes for it in items) / 2**20, 1),
        "tokens_per_s": round(agg("tokens") / max(agg("decode_s"), 1e-9), 1),
        "vad_s": agg("vad_s"), "encode_s": agg("encode_s"), "decode_s": agg("decode_s"),
        "prefill_s": agg("prefill_s"), "forward_s": agg("forward_s"), "stitch_s": agg("stitch_s"),
        "chunks": int(agg("chunks")), "windows": int(agg("windows")), "fallbacks": int(agg("fallbacks")),
        "echo_retries": int(agg("echo_retries")),
        "batch_occupancy": round(slot_steps, 3), "wasted_row_frac": round(1 - slot_steps, 3),
        "mean_active_rows": round(np.mean([s.get("mean_active_rows", 0) for s in stats]), 2),
        "kv_logical": kv_log, "kv_physical": kv_phys,
        "kv_kept_frac": round(kv_phys / kv_log, 3) if kv_log else None,
        "kv_physical_peak_per_row": max((s.get("kv_physical_peak_per_row", 0) for s in stats), default=0),
        "diarize_s": agg("diarize_s"),
    }
    # pooled over clips like WER (errors / reference words; DER: error time / speech time), so a
    # clip with two reference words cannot swamp the set; der_mean is the per-clip average
    for k in ("cpwer", "tcpwer", "der"):
        vals = [x[k] for x in spk if k in x]
        row[k] = round(100 * sum(e for e, _ in vals) / max(sum(n for _, n in vals), 1e-9), 2) if vals else None
    clip_der = [x["der_clip"] for x in spk if "der_clip" in x]
    row["der_mean"] = round(float(np.mean(clip_der)), 2) if clip_der else None
    row["speakers_exact"] = f"{sum(x['speakers_exact'] for x in spk)}/{len(spk)}" if spk else None
    row["transcripts"] = hyps
    return row


def run_peer(items, peer: str, batch_size: int = 8, beam_size: int = 1) -> dict:
    if peer not in peers.PEERS:  # before spawning the child, which checks again
        raise SystemExit(f"unknown peer {peer!r}: choose {' or '.join(peers.PEERS)}")
    results = peers.run_isolated([it.audio for it in items], peer, batch_size, beam_size)
    per = [_wer(it.reference, r["text"]) for it, r in zip(items, results) if it.reference]
    walls = sum(r["wall_s"] for r in results)
    peaks = max(r["peak_rss_mb"] for r in results)
    r = results[-1]
    audio_s = sum(it.duration for it in items)
    name = r["name"]
    return {"name": name, "kind": "peer", "chunk_size": "vad" if "batched" in name else "full",
            "batch_size": batch_size if "batched" in name else 1, "beam_size": beam_size,
            **_pool(per), "wall_s": round(walls, 2), "rtfx": round(audio_s / walls, 2),
            "audio_s": round(audio_s, 1), "peak_rss_mb": round(peaks, 1),
            "transcripts": [{"item": it.name, "text": r["text"]} for it, r in zip(items, results)]}


def _csv_list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="accuracy-latency benchmark against peers, with a plot")
    p.add_argument("--set", default="stitched", choices=SETS, help="benchmark set built from ../shared/data")
    p.add_argument("--audio", help="benchmark any audio file instead of a built-in set")
    p.add_argument("--ref", help="reference for --audio: text, SegLST, STM")
    p.add_argument("--model", default="tiny.en")
    p.add_argument("--chunk-sizes", default="30,120,full", help="comma list of 30,60,120,300,600,full")
    p.add_argument("--batch-sizes", default="8", help="comma list")
    p.add_argument("--beam-size", type=int, default=1)
    p.add_argument("--compute-types", default="auto", help="comma list of auto,int8,float32,...")
    p.add_argument("--kv-policies", default="none", help="comma list, e.g. none,output-window,duo")
    p.add_argument("--kv-opt", action="append", default=[], help="key=value for the policies")
    p.add_argument("--encoder-sparsities", default="off", help="comma list, e.g. off,1:0.5")
    p.add_argument("--speculative", default="none", help="comma list, e.g. none,recycle (sweep axis)")
    p.add_argument("--spec-opt", action="append", default=[], help="key=value for the speculative sources")
    p.add_argument("--repeat", type=int, default=1, help="loop the stitched set N times")
    p.add_argument("--peers", default="", help="comma list: faster-whisper,faster-whisper-batched")
    p.add_argument("--peer-batch-size", type=int, default=8)
    p.add_argument("--out", default="bench-out", help="folder for CSV, JSON, the PNG plot and transcripts/ (each configuration's text and tokens)")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--diarize", action="store_true",
                   help="label speakers and report cpWER/tcpWER/DER where the set has speaker references")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from murmur.transcribe import set_threads
    # every run, ours and the peers' child processes, on the same fixed thread count (not the
    # load-dependent default), so that runs compare
    os.environ.setdefault("MURMUR_THREADS", str(os.cpu_count() or 1))
    set_threads()
    console = Console(stderr=True)
    items = [item_from_files(args.audio, args.ref)] if args.audio else load_set(args.set, args.repeat)
    audio_s = sum(i.duration for i in items)
    console.print(f"set: {args.audio or args.set} ×{args.repeat}: {len(items)} item(s), {audio_s / 60:.1f} min")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kv_opts = dict(o.split("=", 1) for o in args.kv_opt)
    rows = []
    for peer in _csv_list(args.peers):
        console.print(f"running peer {peer} ...")
        rows.append(run_peer(items, peer, args.peer_batch_size, args.beam_size))
        console.print(_line(rows[-1]))
    configs = itertools.product(_csv_list(args.compute_types), _csv_list(args.chunk_sizes),
                                [int(b) for b in _csv_list(args.batch_sizes)],
                                _csv_list(args.kv_policies), _csv_list(args.encoder_sparsities),
                                _csv_list(args.speculative))
    for ct, chunk, batch, kv, sp, spec in configs:
        console.print(f"running murmur {ct} chunk={chunk} batch={batch} kv={kv} sparsity={sp} spec={spec} ...")
        rows.append(run_murmur(items, args.model, chunk, batch, args.beam_size, kv, kv_opts, sp, args.progress,
                               args.diarize, compute_type=ct, speculative=spec, spec_opts=args.spec_opt))
        console.print(_line(rows[-1]))
    front = set(pareto_front([(r["wall_s"], r["wer"] if r["wer"] is not None else 0) for r in rows]))
    for i, r in enumerate(rows):
        r["pareto"] = i in front
    fastest_peer = min((r for r in rows if r["kind"] == "peer"), key=lambda r: r["wall_s"], default=None)
    seq_peer = next((r for r in rows if r["kind"] == "peer" and r["chunk_size"] == "full"), None)
    for r in rows:
        if fastest_peer and r["kind"] == "murmur":
            r["wall_vs_fastest_peer"] = round(r["wall_s"] / fastest_peer["wall_s"], 3)
        if seq_peer and r["kind"] == "murmur":
            r["wall_vs_seq_peer"] = round(r["wall_s"] / seq_peer["wall_s"], 3)
            if r["wer"] is not None and seq_peer["wer"] is not None:
                r["wer_minus_seq_peer"] = round(r["wer"] - seq_peer["wer"], 2)
    from murmur.models.kernels import facts, kernel_plan
    machine = facts()
    for r in rows:  # every figure names the CPU it was measured on
        r.update(cpu=machine["cpu"], cpu_family=machine["cpu_family"], cpu_forced=machine["cpu_forced"],
                 torch=machine["torch"], threads=machine["threads"])
        if r["kind"] == "murmur":
            p = kernel_plan(r.get("compute_type", "auto"))
            r["kernels"] = f"encoder {p.encoder}, decoder {p.decoder}, speech K/V {p.speech_kv}"
    _write_transcripts(rows, out / "transcripts")
    write_csv(rows, out / "bench.csv")
    write_json(rows, out / "bench.json")
    if any(r["wer"] is not None for r in rows):
        plot_accuracy_latency(rows, out / "bench.png",
                              title=f"{args.model}, {args.audio or args.set} ({audio_s / 60:.1f} min)")
    table = Table(title="murmur bench")
    cols = ["name", "wer", "cpwer", "tcpwer", "der", "der_mean", "speakers_exact", "wall_s", "rtfx", "peak_rss_mb", "tokens_per_s", "vad_s", "encode_s", "decode_s",
            "target_forwards", "tokens_per_forward",
            "batch_occupancy", "wall_vs_fastest_peer", "wall_vs_seq_peer", "pareto"]
    shown = [c for c in cols if any(r.get(c) is not None for r in rows)]
    for c in shown:
        table.add_column(c)
    for r in rows:
        table.add_row(*[_fmt(r.get(c)) for c in cols if c in shown])
    Console(width=max(Console().width, 200)).print(table)  # a pipe reports 80 columns: keep the table readable
    console.print(f"CPU: {machine['cpu']} ({machine['cpu_family']}"
                  + (f", forced by {machine['cpu_forced']}" if machine["cpu_forced"] else "")
                  + f"), torch {machine['torch']}, {machine['threads']} threads")
    console.print(f"wrote {out / 'bench.csv'}, {out / 'bench.json'}, {out / 'transcripts'}/" +
                  (f", {out / 'bench.png'}" if (out / "bench.png").exists() else ""))
    return 0


def _write_transcripts(rows: list[dict], folder: Path) -> None:
    """Each configuration's hypotheses: <name>.txt (one item's text a line) and <name>.json (with
    segments and their tokens, so two runs can be compared token for token)."""
    import json
    import re

    folder.mkdir(parents=True, exist_ok=True)
    for r in rows:
        hyps = r.pop("transcripts", [])
        stem = re.sub(r"[^A-Za-z0-9.+:-]+", "_", r["name"].replace("=", "-")).strip("_")
        (folder / f"{stem}.txt").write_text("".join(h["text"] + "\n" for h in hyps), encoding="utf-8")
        (folder / f"{stem}.json").write_text(json.dumps(hyps, indent=1) + "\n", encoding="utf-8")


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def _line(r: dict) -> str:
    wer = f"{r['wer']:.2f}%" if r.get("wer") is not None else "-"
    spec = (f", decode {r['decode_s']:.2f} s, forwards {r['target_forwards']}, tokens/forward "
            f"{r['tokens_per_forward']}" if r.get("target_forwards") else "")
    return f"  {r['name']}: WER {wer}, wall {r['wall_s']:.1f} s, RTFx {r['rtfx']}{spec}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="murmur")
    add_parser(parser.add_subparsers(dest="command", required=True))
    a = parser.parse_args()
    sys.exit(a.func(a))
