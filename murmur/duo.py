"""DuoAttention head maps for the decoder: which self- and cross-attention heads are retrieval heads
(full cache) and which are streaming heads (sinks + a local window).

Calibration (`murmur duo-calibrate`, `calibrate_duo`) needs no labels: it transcribes unlabelled
audio greedily, replays each window teacher-forced with explicit attention (murmur.analyze) and
scores every head by the attention mass that falls outside its streaming budget:

* self:  outside the first `self_sink` tokens and the last `self_window` tokens;
* cross: outside [last timestamp - `cross_back`, last timestamp + `cross_ahead`] frames.

A head with more mass outside is more of a retrieval head. The map stores the scores; the policy
makes the `duo_retrieval` fraction of highest-scoring heads (per kind) retrieval heads. Maps ship
in murmur/data/duo_<model>.json; a recalibrated map goes to $MURMUR_CACHE (default
~/.cache/murmur)/duo_<model>.json and takes precedence.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from .errors import ModelError

DATA = Path(__file__).resolve().parent / "data"


def _key(model_name: str) -> str:
    return Path(str(model_name)).name.replace(os.sep, "_") or "model"


def user_map_path(model_name: str) -> Path:
    base = Path(os.environ.get("MURMUR_CACHE", Path.home() / ".cache" / "murmur"))
    return base / f"duo_{_key(model_name)}.json"


def shipped_map_path(model_name: str) -> Path:
    return DATA / f"duo_{_key(model_name)}.json"


def load_duo_map(model_name: str = "tiny.en", path: str | os.PathLike | None = None) -> dict:
    """The head map: `path`, else the user's recalibrated map, else the one shipped with Murmur."""
    cands = [Path(path)] if path else [user_map_path(model_name), shipped_map_path(model_name)]
    for p in cands:
        if p.is_file():
            try:
                hm = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise ModelError(f"DuoAttention head map {p} is unreadable: {e}") from None
            hm["path"] = str(p)
            return hm
    raise ModelError(f"no DuoAttention head map for model {model_name!r} (looked in "
                     f"{', '.join(map(str, cands))}); run `murmur duo-calibrate` to make one")


def retrieval_heads(scores, fraction: float) -> np.ndarray:
    """[L, H] bool: the `fraction` of heads with the highest scores (ties broken by order)."""
    s = np.asarray(scores, dtype=np.float64)
    k = int(round(fraction * s.size))
    out = np.zeros(s.size, dtype=bool)
    if k > 0:
        out[np.argsort(-s.ravel(), kind="stable")[:k]] = True
    return out.reshape(s.shape)


def default_calibration_audio(limit: int = 48) -> list[Path]:
    """LibriSpeech test-other utterances (sorted, first `limit`) and the interview, from shared data."""
    roots = [Path(os.environ["MURMUR_DATA"])] if os.environ.get("MURMUR_DATA") else []
    roots += [Path(__file__).resolve().parents[2] / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    d = next((r / "librispeech_other_noref" for r in roots if (r / "librispeech_other_noref").is_dir()), None)
    if d is None:
        raise FileNotFoundError("no calibration audio given and ../shared/data/librispeech_other_noref not found")
    files = sorted(d.rglob("*.flac"))[:limit]
    inter = d / "interview_X2zqiX6yL3I.mp3"
    return files + ([inter] if inter.is_file() else [])


def calibrate_duo(model_name: str = "tiny.en", audio_paths=None, out_path: str | os.PathLike | None = None,
                  retrieval_fraction: float = 0.5, max_windows: int | None = 4, **params) -> dict:
    """Score every decoder head on unlabelled audio and write the head map (JSON) to `out_path`
    (default: the user's map, which load_duo_map prefers to the shipped one). Returns the map."""
    from .analyze import collect
    from .transcribe import get_model
    t0 = time.perf_counter()
    loaded = get_model(model_name)
    paths = list(audio_paths) if audio_paths else default_calibration_audio()
    res = collect(loaded, paths, max_windows=max_windows, encoder=False, **params)
    s_scores = res["decoder_self"]["nonlocal"]
    c_scores = res["decoder_cross"]["nonlocal"]
    hm = {
        "model": loaded.name,
        "kind": "DuoAttention head map: score = attention mass outside the streaming budget",
        "params": res["params"],
        "self_scores": s_scores,
        "cross_scores": c_scores,
        "retrieval_fraction": retrieval_fraction,
        "self_retrieval": retrieval_heads(s_scores, retrieval_fraction).astype(int).tolist(),
        "cross_retrieval": retrieval_heads(c_scores, retrieval_fraction).astype(int).tolist(),
        "calibration": {"files": len(paths), "windows": res["windows"], "queries": res["queries"],
                        "audio": sorted({Path(p).parent.name if Path(p).suffix == ".flac" else Path(p).name
                                         for p in paths})[:8],
                        "seconds": round(time.perf_counter() - t0, 1)},
    }
    out = Path(out_path) if out_path else user_map_path(loaded.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(hm, indent=1) + "\n", encoding="utf-8")
    hm["path"] = str(out)
    return hm
