"""DuoAttention calibration: score every decoder head and write the head map the `duo` KV policy
reads (murmur.engine.duo).

Calibration (`murmur calibrate-duo`, `calibrate_duo`) needs no labels: it transcribes unlabelled
audio greedily and replays each window teacher-forced (murmur.eval.analyze). Two ways to score a head:

* `gates` (default; DuoAttention's own method): every head mixes full and streaming attention,
  alpha * full + (1 - alpha) * streaming, and the gates alpha in [0, 1] are trained (Adam, the
  model frozen, float32) to keep the last hidden states of the full-attention pass, with an L1
  pull towards 0; a head whose gate stays high needs its full cache.
* `mass`: the attention mass that falls outside the streaming budget (one pass, no training).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from murmur.engine.duo import (CROSS_AHEAD, CROSS_BACK, CROSS_SINK, SELF_SINK, SELF_WINDOW, retrieval_heads,
                               user_map_path)
from murmur.errors import ModelError

GATE_THRESHOLD = 0.5  # a trained gate at least this high: a retrieval head


def default_calibration_audio(limit: int = 48) -> list[Path]:
    """LibriSpeech test-other utterances (sorted, first `limit`) and the interview, from shared data."""
    roots = [Path(os.environ["MURMUR_DATA"])] if os.environ.get("MURMUR_DATA") else []
    roots += [Path(__file__).resolve().parents[3] / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    d = next((r / "librispeech_other_noref" for r in roots if (r / "librispeech_other_noref").is_dir()), None)
    if d is None:
        raise FileNotFoundError("no calibration audio given and ../shared/data/librispeech_other_noref not found")
    files = sorted(d.rglob("*.flac"))[:limit]
    inter = d / "interview_X2zqiX6yL3I.mp3"
    return files + ([inter] if inter.is_file() else [])


def train_gates(loaded, windows, steps: int = 200, lr: float = 0.05, l1: float = 0.05,
                batch: int = 8, seed: int = 0, **params) -> tuple[np.ndarray, np.ndarray, list]:
    """DuoAttention's gate optimisation on decoded `windows` (analyze.decode_windows) of a float32
    model: returns the self and cross gates [L, H] and the distillation loss every 20 steps."""
    import torch

    from murmur.eval.analyze import anchors, decoder_replay
    p = _budget(params)
    m = loaded.model
    from murmur.models.quant import INT8_LAYERS
    if m.dtype != torch.float32 or any(isinstance(x, tuple(INT8_LAYERS.values())) for x in m.modules()):
        raise ModelError("gate training needs the float32 model (gradients do not pass int8)")
    tsb = loaded.tokenizer.timestamp_begin
    data = []
    with torch.no_grad():  # not inference_mode: these tensors take part in the backward pass
        for w in windows:
            cross = m.decoder.cross_kv(m.encoder(w.mel[None].to(m.device, m.dtype)))
            toks = torch.tensor([w.prompt + w.tokens], device=m.device)
            t = toks.shape[1]
            q, k = torch.arange(t)[:, None], torch.arange(t)[None]
            near = (k < p["self_sink"]) | (k > q - p["self_window"])
            anc = torch.from_numpy(np.maximum(anchors(w, tsb), 0))[:, None]
            fr = torch.arange(cross[0][0].shape[2])[None]
            seen = (fr < p["cross_sink"]) | ((fr >= anc - p["cross_back"]) & (fr <= anc + p["cross_ahead"]))
            d = dict(cross=cross, toks=toks, near=near.to(m.device), seen=seen.to(m.device), p0=len(w.prompt))
            d["target"] = decoder_replay(m, cross, toks, _full)[0, d["p0"]:]
            data.append(d)
    L, H = m.dims.n_text_layer, m.dims.n_text_head
    gates = {"self": torch.ones(L, H, requires_grad=True), "cross": torch.ones(L, H, requires_grad=True)}
    opt = torch.optim.Adam(list(gates.values()), lr=lr)
    rng = np.random.default_rng(seed)
    log = []
    for step in range(steps):
        loss = 0.0
        pick = rng.choice(len(data), size=min(batch, len(data)), replace=False)
        for j in pick:
            d = data[j]

            def attend(kind, layer, scores, v, d=d):
                keep = d["near"] if kind == "self" else d["seen"]
                full = torch.softmax(scores, dim=-1) @ v
                stream = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1) @ v
                g = gates[kind][layer][None, :, None, None]
                return g * full + (1 - g) * stream

            out = decoder_replay(m, d["cross"], d["toks"], attend)[0, d["p0"]:]
            loss = loss + ((out - d["target"]) ** 2).mean() / (d["target"] ** 2).mean()
        loss = loss / len(pick)
        opt.zero_grad()
        (loss + l1 * (gates["self"].mean() + gates["cross"].mean()) / 2).backward()
        opt.step()
        with torch.no_grad():
            for g in gates.values():
                g.clamp_(0, 1)
        if step % 20 == 0 or step == steps - 1:
            log.append(round(float(loss.detach()), 5))
    return gates["self"].detach().numpy(), gates["cross"].detach().numpy(), log


def _budget(params: dict) -> dict:
    """The streaming budget: the engine's locality windows, overridden by `params`."""
    return dict(self_sink=SELF_SINK, self_window=SELF_WINDOW, cross_sink=CROSS_SINK,
                cross_back=CROSS_BACK, cross_ahead=CROSS_AHEAD) | params


def _full(kind, layer, scores, v):
    import torch

    return torch.softmax(scores, dim=-1) @ v


def calibrate_duo(model_name: str = "tiny.en", audio_paths=None, out_path: str | os.PathLike | None = None,
                  retrieval_fraction: float = 0.5, max_windows: int | None = 4, method: str = "gates",
                  steps: int = 200, **params) -> dict:
    """Score every decoder head on unlabelled audio and write the head map (JSON) to `out_path`
    (default: the user's map, which load_duo_map prefers to the shipped one). Returns the map.
    method: "gates" (trained, float32 model; retrieval heads: gate >= 0.5) or "mass" (attention
    outside the budget; retrieval heads: the `retrieval_fraction` with most)."""
    from murmur.audio.decode import load_audio
    from murmur.eval.analyze import collect, decode_windows
    from murmur.models.loading import get_model
    t0 = time.perf_counter()
    paths = list(audio_paths) if audio_paths else default_calibration_audio()
    if method == "gates":
        loaded = get_model(model_name, compute_type="float32")
        windows = decode_windows(loaded, [load_audio(p) for p in paths], max_windows)
        s_scores, c_scores, log = train_gates(loaded, windows, steps=steps, **params)
        s_scores, c_scores = np.round(s_scores, 4).tolist(), np.round(c_scores, 4).tolist()
        res = {"params": _budget(params), "windows": len(windows), "distill_loss": log}
        kind = "DuoAttention head map: score = trained gate (full vs streaming attention)"
        # a gate says itself whether its head needs the full cache
        choose = {"retrieval_threshold": GATE_THRESHOLD}
        s_ret, c_ret = (np.asarray(x) >= GATE_THRESHOLD for x in (s_scores, c_scores))
    elif method == "mass":
        loaded = get_model(model_name)
        res = collect(loaded, paths, max_windows=max_windows, encoder=False, **params)
        s_scores = res["decoder_self"]["nonlocal"]
        c_scores = res["decoder_cross"]["nonlocal"]
        kind = "DuoAttention head map: score = attention mass outside the streaming budget"
        choose = {"retrieval_fraction": retrieval_fraction}
        s_ret, c_ret = (retrieval_heads(x, retrieval_fraction) for x in (s_scores, c_scores))
    else:
        raise ModelError(f"calibration method {method!r}: expected gates or mass")
    hm = {
        "model": loaded.name,
        "kind": kind,
        "params": res["params"],
        "self_scores": s_scores,
        "cross_scores": c_scores,
        **choose,
        "self_retrieval": s_ret.astype(int).tolist(),
        "cross_retrieval": c_ret.astype(int).tolist(),
        "calibration": {"method": method, "files": len(paths), "windows": res["windows"],
                        **({"queries": res["queries"]} if "queries" in res else
                           {"steps": steps, "distill_loss": res["distill_loss"]}),
                        "audio": sorted({Path(p).parent.name if Path(p).suffix == ".flac" else Path(p).name
                                         for p in paths})[:8],
                        "seconds": round(time.perf_counter() - t0, 1)},
    }
    out = Path(out_path) if out_path else user_map_path(loaded.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(hm, indent=1) + "\n", encoding="utf-8")
    hm["path"] = str(out)
    return hm
