"""Load Whisper weights offline: bundled names, CTranslate2 folders, OpenAI .pt, Hugging Face folders
(murmur.models.ctranslate2, .openai, .huggingface), then cast or quantise them for the device.

Nothing here touches the network. A missing or corrupt model raises ModelError naming the problem.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from murmur.cpu import native_bf16
from murmur.errors import ModelError
from murmur.memory import keep_freed_memory
from murmur.models.common import LoadedModel
from murmur.models.ctranslate2 import BUNDLED, load_ct2_folder
from murmur.models.kernels import kernel_plan
from murmur.models.whisper import TiedLogits, Whisper


COMPUTE_TYPES = ("auto", "int8", "int8_bfloat16", "float32", "float16", "bfloat16")


def quantize_int8(model: Whisper, bf16_encoder: bool = False, kernel: str = "fbgemm") -> Whisper:
    """int8 for every Linear and the tied logit projection (CPU), row-wise, on `kernel`'s GEMM
    (a key of murmur.models.quant.INT8_LAYERS): see murmur.models.quant.

    With `bf16_encoder` the encoder and the decoder's cross K/V projections (which run once per
    window on 1500 frames, not once per token) stay in bf16 instead: on a CPU with bf16 in
    hardware their large GEMMs beat int8's, whose per-row quantisation passes cost more than the
    integer products."""
    from murmur.models.quant import INT8_LAYERS, quantize_linears
    layer = INT8_LAYERS[kernel]
    once_per_window = [m for b in model.decoder.blocks for m in (b.cross_attn.key, b.cross_attn.value)]
    for b in model.decoder.blocks if bf16_encoder else [*model.encoder.blocks, *model.decoder.blocks]:
        b.attn.fuse_qkv()  # before quantising: the fused rows get the same per-channel scales
    if bf16_encoder:
        model.encoder.to(torch.bfloat16)
        for m in once_per_window:
            m.to(torch.bfloat16)
    else:
        quantize_linears(model.encoder, layer=layer)
    quantize_linears(model.decoder, skip=once_per_window if bf16_encoder else (), layer=layer)
    model.decoder.output = layer(model.decoder.token_embedding.weight, None)
    return model


def load_model(name_or_path: str | os.PathLike = "tiny.en", device: str | None = None,
               dtype: torch.dtype | None = None, compute_type: str = "auto") -> LoadedModel:
    """Load a model by bundled name or local path.

    Compute types:
      int8           (CPU) every Linear int8, row-wise, so batch-invariant (murmur.models.quant), on
                     fbgemm (8-bit rows with AVX-512 VNNI, else 7-bit); speech K/V of the decoder
                     cache in bf16 where bf16 is native (a decode step's largest read, halved), else fp32.
      int8_bfloat16  (CPU) the per-token decoder as int8; the encoder and the cross K/V
                     projections in bf16. Where the CPU has bf16 in hardware, their large GEMMs
                     run 2.7x faster than int8's (see quantize_int8).
      float32, float16, bfloat16: the whole model in that dtype.
    'auto' is float16 on CUDA; on CPU int8_bfloat16 where bf16 is native, else int8 (murmur.models.kernels).
    `dtype` overrides a float compute type."""
    if compute_type not in COMPUTE_TYPES:
        raise ModelError(f"compute type {compute_type!r}: choose one of {', '.join(COMPUTE_TYPES)}")
    key = str(name_or_path)
    if key in BUNDLED:
        loaded = load_ct2_folder(BUNDLED[key](), name=key)
    else:
        path = Path(key).expanduser()
        if not path.exists():
            raise ModelError(f"model {key!r} not found: give one of {sorted(BUNDLED)} or a local path "
                             "(Murmur never downloads models)")
        if path.is_dir() and (path / "model.bin").is_file():
            loaded = load_ct2_folder(path)
        elif path.is_file() and path.name == "model.bin":
            loaded = load_ct2_folder(path.parent)
        elif path.is_file() and path.suffix == ".pt":
            from murmur.models.openai import load_openai_checkpoint
            loaded = load_openai_checkpoint(path)
        elif path.is_dir() and any(path.glob("*.safetensors")) and (path / "config.json").is_file():
            from murmur.models.huggingface import load_hf_folder
            loaded = load_hf_folder(path)
        else:
            raise ModelError(f"{path} is not a Whisper model: expected a CTranslate2 folder (model.bin), "
                             "an OpenAI .pt checkpoint, or a Hugging Face folder (config.json + *.safetensors)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = str(device).startswith("cuda")
    if compute_type.startswith("int8") and cuda:
        raise ModelError(f"compute type {compute_type} is CPU only; use float16 or bfloat16 on CUDA")
    plan = kernel_plan(compute_type, device)  # auto: the fastest accurate path on this CPU
    if not cuda:
        keep_freed_memory()  # encoder windows then reuse mapped pages: 25 % faster here (murmur.memory)
    compute_type = plan.compute_type
    if not cuda and "bfloat16" in compute_type and not native_bf16():
        warnings.warn(f"compute type {compute_type} on a CPU without bf16 in hardware runs generic code, "
                      "30-70x slower; 'auto' picks int8 here", stacklevel=2)
    if dtype is None:
        dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(compute_type, torch.float32)
    loaded.model.to(device=device, dtype=dtype).eval()
    loaded.model.requires_grad_(False)
    if compute_type.startswith("int8"):
        quantize_int8(loaded.model, bf16_encoder=compute_type == "int8_bfloat16", kernel=plan.int8)
        loaded.cross_dtype = torch.bfloat16 if plan.speech_kv == "bf16" else torch.float32
    elif not cuda:
        loaded.model.decoder.output = TiedLogits(loaded.model.decoder.token_embedding.weight)
    loaded.model.encoder.attention = plan.encoder_attention
    loaded.model.decoder.speech_attention = plan.attention
    loaded.compute_type = compute_type
    loaded.plan = plan
    return loaded


_MODELS: dict[tuple, LoadedModel] = {}


def get_model(model: str | LoadedModel, device: str | None = None, compute_type: str = "auto") -> LoadedModel:
    """Load once per process: the CLI, the server and the benchmark share weights."""
    if isinstance(model, LoadedModel):
        return model
    key = (str(model), device, compute_type)
    if key not in _MODELS:
        _MODELS[key] = load_model(model, device=device, compute_type=compute_type)
    return _MODELS[key]
