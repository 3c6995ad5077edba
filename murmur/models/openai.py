"""Load a Whisper checkpoint saved by openai-whisper (.pt).

It returns an fp32 CPU `LoadedModel`; `murmur.models.loading.load_model` moves it to its device and
dtype. Our module's names are openai-whisper's, so the state dict loads as is.
"""
from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path

from murmur.errors import ModelError
from murmur.models.common import (LoadedModel, _default_heads, _fill_encoder_positions, _heads_from_mask,
                                  _load_state, _to_fp32, new_whisper, read_checkpoint)
from murmur.models.ctranslate2 import _tokenizer_for
from murmur.models.whisper import ModelDims


_DIM_FIELDS = [f.name for f in fields(ModelDims)]


def load_openai_checkpoint(path: str | os.PathLike) -> LoadedModel:
    """An openai-whisper checkpoint: {"dims": {...}, "model_state_dict": {...}[, "alignment_heads": ...]}."""
    path = Path(path)
    ckpt = read_checkpoint(path, "({'dims': ..., 'model_state_dict': ...})")
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt or "dims" not in ckpt:
        have = sorted(map(str, ckpt))[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ModelError(f"{path} is not an openai-whisper checkpoint: expected keys 'dims' and "
                         f"'model_state_dict', found {have}")
    raw_dims, sd = ckpt["dims"], ckpt["model_state_dict"]
    if not isinstance(raw_dims, dict) or not isinstance(sd, dict):
        raise ModelError(f"{path}: 'dims' and 'model_state_dict' must be dicts")
    missing = [k for k in _DIM_FIELDS if k not in raw_dims]
    if missing:
        raise ModelError(f"{path}: 'dims' lacks {missing}")
    try:
        dims = ModelDims(**{k: int(raw_dims[k]) for k in _DIM_FIELDS})
    except (TypeError, ValueError) as e:
        raise ModelError(f"{path}: bad 'dims' ({e})") from None
    sd = dict(sd)
    # the head mask is a non-persistent buffer in openai-whisper; accept it at top level or in the state dict
    heads = ckpt.get("alignment_heads", sd.pop("alignment_heads", None))
    sd = _to_fp32(sd, path)
    _fill_encoder_positions(sd, dims)
    model = new_whisper(dims)
    _load_state(model, sd, path)
    model.alignment_heads = _heads_from_mask(heads, dims, path) if heads is not None else _default_heads(dims)
    tok = _tokenizer_for(path.parent, dims)
    return LoadedModel(model, tok, path.stem, path, tok.non_speech_tokens(), [220, tok.eot])
