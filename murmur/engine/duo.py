"""DuoAttention head maps for the decoder at run time: which self- and cross-attention heads are
retrieval heads (full cache) and which are streaming heads (sinks + a local window), and the
locality windows that define the streaming budget.

The streaming budget: self: the first `self_sink` tokens and the last `self_window`; cross:
[last timestamp - `cross_back`, last timestamp + `cross_ahead`] frames.

The map stores the scores and its choice of retrieval heads: gates >= 0.5, or the top half by
mass (the policy's `duo_retrieval` fraction or `duo_threshold` override it). Maps ship in
murmur/data/duo_<model>.json; a recalibrated map (murmur.eval.duo_calibration) goes to
$MURMUR_CACHE (default ~/.cache/murmur)/duo_<model>.json and takes precedence.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from murmur.errors import ModelError
from murmur.paths import model_files

# locality windows, shared with the attention analysis, DuoAttention's calibration and policy defaults
SELF_SINK, SELF_WINDOW = 4, 32
CROSS_SINK, CROSS_BACK, CROSS_AHEAD = 0, 50, 300


def user_map_path(model_name: str) -> Path:
    return model_files("duo", model_name, "json")[0]


def shipped_map_path(model_name: str) -> Path:
    return model_files("duo", model_name, "json")[1]


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
