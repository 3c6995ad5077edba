"""Load a Hugging Face transformers Whisper folder (config.json + safetensors).

It returns an fp32 CPU `LoadedModel`; `murmur.models.loading.load_model` moves it to its device and
dtype. transformers' parameter names are mapped onto ours (openai-whisper's).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import torch

from murmur.errors import ModelError
from murmur.models.common import (LoadedModel, _default_heads, _fill_encoder_positions, _heads_from_mask,
                                  _load_state, _to_fp32, new_whisper)
from murmur.models.ctranslate2 import _tokenizer_for
from murmur.models.tokenizer import Tokenizer
from murmur.models.whisper import ModelDims


_HF_TOP = {
    "encoder.positional_embedding": "encoder.embed_positions.weight",
    "decoder.positional_embedding": "decoder.embed_positions.weight",
    "decoder.token_embedding.weight": "decoder.embed_tokens.weight",
    "encoder.ln_post.weight": "encoder.layer_norm.weight",
    "encoder.ln_post.bias": "encoder.layer_norm.bias",
    "decoder.ln.weight": "decoder.layer_norm.weight",
    "decoder.ln.bias": "decoder.layer_norm.bias",
}


_HF_BLOCK = {
    "attn.query": "self_attn.q_proj", "attn.key": "self_attn.k_proj",
    "attn.value": "self_attn.v_proj", "attn.out": "self_attn.out_proj",
    "cross_attn.query": "encoder_attn.q_proj", "cross_attn.key": "encoder_attn.k_proj",
    "cross_attn.value": "encoder_attn.v_proj", "cross_attn.out": "encoder_attn.out_proj",
    "attn_ln": "self_attn_layer_norm", "cross_attn_ln": "encoder_attn_layer_norm",
    "mlp.0": "fc1", "mlp.2": "fc2", "mlp_ln": "final_layer_norm",
}



def hf_name(ours: str) -> str:
    """Our (openai) parameter name -> transformers' WhisperModel name, without the "model." prefix."""
    if ours in _HF_TOP:
        return _HF_TOP[ours]
    m = re.fullmatch(r"(encoder|decoder)\.blocks\.(\d+)\.(.+)\.(weight|bias)", ours)
    if m:
        return f"{m[1]}.layers.{m[2]}.{_HF_BLOCK[m[3]]}.{m[4]}"
    return ours  # conv1/conv2 are named alike


def _read_json(p: Path) -> dict:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ModelError(f"cannot read {p}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{p} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{p} should hold a JSON object")
    return data


def _hf_dims(config: dict, where: Path) -> ModelDims:
    if config.get("model_type", "whisper") != "whisper":
        raise ModelError(f"{where} describes a {config['model_type']!r} model, not Whisper")
    keys = ["num_mel_bins", "max_source_positions", "d_model", "encoder_attention_heads", "encoder_layers",
            "vocab_size", "max_target_positions", "decoder_attention_heads", "decoder_layers"]
    missing = [k for k in keys if k not in config]
    if missing:
        raise ModelError(f"{where} lacks {missing}")
    d = config["d_model"]
    # our blocks hard-wire Whisper's shape: 4x GELU MLP, unscaled embeddings
    for k in ("encoder_ffn_dim", "decoder_ffn_dim"):
        if config.get(k, 4 * d) != 4 * d:
            raise ModelError(f"{where}: {k}={config[k]} but Murmur's blocks need 4*d_model={4 * d}")
    if config.get("activation_function", "gelu") != "gelu" or config.get("scale_embedding", False):
        raise ModelError(f"{where}: unsupported variant (activation_function="
                         f"{config.get('activation_function')!r}, scale_embedding={config.get('scale_embedding')})")
    try:
        return ModelDims(n_mels=int(config["num_mel_bins"]), n_audio_ctx=int(config["max_source_positions"]),
                         n_audio_state=int(d), n_audio_head=int(config["encoder_attention_heads"]),
                         n_audio_layer=int(config["encoder_layers"]), n_vocab=int(config["vocab_size"]),
                         n_text_ctx=int(config["max_target_positions"]), n_text_state=int(d),
                         n_text_head=int(config["decoder_attention_heads"]),
                         n_text_layer=int(config["decoder_layers"]))
    except (TypeError, ValueError) as e:
        raise ModelError(f"{where}: bad dimension ({e})") from None


def _safetensor_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # sharded: the index names the shards
        names = sorted(set(_read_json(index).get("weight_map", {}).values()))
        files = [folder / n for n in names]
        absent = [f.name for f in files if not f.is_file()]
        if absent or not files:
            raise ModelError(f"{index} names shards that are missing: {absent or 'none listed'}")
        return files
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{folder} has no *.safetensors file")
    return files


def _read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ModelError("loading a Hugging Face folder needs the 'safetensors' package: "
                         "pip install safetensors") from None
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            part = load_file(str(f), device="cpu")
        except Exception as e:  # SafetensorError for a bad header, OSError for I/O
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"{f} is not a readable safetensors file (truncated or corrupt?): {msg[:200]}") from None
        tensors.update(part)
    # WhisperForConditionalGeneration prefixes "model."; a bare WhisperModel does not
    return {k.removeprefix("model."): v for k, v in tensors.items()}


def _hf_vocab_tokenizer(folder: Path, dims: ModelDims) -> Tokenizer | None:
    """Rebuild vocabulary.txt (tokens in id order, which is Whisper's rank order) from vocab.json or
    tokenizer.json, so a fine-tune with its own vocabulary decodes right. None if neither exists."""
    vocab: dict | None = None
    added: dict[int, str] = {}
    if (folder / "vocab.json").is_file():
        vocab = _read_json(folder / "vocab.json")
        if (folder / "added_tokens.json").is_file():
            added = {int(i): t for t, i in _read_json(folder / "added_tokens.json").items()}
    elif (folder / "tokenizer.json").is_file():
        tj = _read_json(folder / "tokenizer.json")
        vocab = (tj.get("model") or {}).get("vocab")
        added = {int(a["id"]): a["content"] for a in tj.get("added_tokens", []) if "id" in a and "content" in a}
    if not isinstance(vocab, dict):
        return None
    multilingual = dims.n_vocab >= 51865
    eot = 50256 + int(multilingual)  # Whisper's layout: BPE ranks, then <|endoftext|>, then specials
    by_id = {int(i): t for t, i in vocab.items()}
    by_id.update({i: t for i, t in added.items() if i >= eot})
    gaps = [i for i in range(eot) if i not in by_id]
    if gaps:
        raise ModelError(f"{folder}: the tokenizer vocabulary lacks ids {gaps[:5]}; expected {eot} BPE tokens")
    if by_id.get(eot, "<|endoftext|>") != "<|endoftext|>":
        raise ModelError(f"{folder}: token {eot} is {by_id[eot]!r}, not <|endoftext|>; not a Whisper vocabulary")
    # specials are found by position, so names past <|endoftext|> only need to be unique
    lines = [by_id[i] for i in range(eot)] + ["<|endoftext|>"]
    lines += [by_id.get(i, f"<|special_{i}|>") for i in range(eot + 1, dims.n_vocab)]
    text = "\n".join(lines) + "\n"
    # the file name carries the content hash: the tokenizer cache is keyed by path
    name = f"vocabulary-{hashlib.sha1(text.encode()).hexdigest()[:16]}.txt"
    cache = Path(os.environ.get("MURMUR_CACHE", Path.home() / ".cache" / "murmur")) / "vocab"
    for d in (cache, Path(tempfile.gettempdir()) / "murmur-vocab"):
        try:
            d.mkdir(parents=True, exist_ok=True)
            target = d / name
            if not target.is_file():
                tmp = d / f"{name}.tmp{os.getpid()}"
                tmp.write_text(text, encoding="utf-8")
                os.replace(tmp, target)
            break
        except OSError:
            continue
    else:
        raise ModelError(f"cannot write the vocabulary rebuilt from {folder} to {cache}")
    tok = Tokenizer.from_vocabulary(target, multilingual=multilingual)
    if tok.n_vocab != dims.n_vocab:
        raise ModelError(f"{folder}: rebuilt vocabulary has {tok.n_vocab} tokens but the model has {dims.n_vocab}")
    return tok


def load_hf_folder(path: str | os.PathLike) -> LoadedModel:
    """A transformers Whisper folder: config.json + model.safetensors (or shards) [+ generation_config.json]."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} has no config.json; not a Hugging Face model folder")
    config = _read_json(folder / "config.json")
    dims = _hf_dims(config, folder / "config.json")
    tensors = _read_safetensors(_safetensor_files(folder))

    model = new_whisper(dims)
    sd, missing = {}, []
    for ours in model.state_dict():
        theirs = hf_name(ours)
        if theirs in tensors:
            sd[ours] = tensors[theirs]
        elif ours != "encoder.positional_embedding":
            missing.append(theirs)
    if missing:
        raise ModelError(f"{folder}: missing weights {missing[:3]}{'...' if len(missing) > 3 else ''} "
                         f"({len(missing)} of {len(model.state_dict())})")
    # the output head is tied to the token embedding; a separate one would be silently ignored, so refuse
    head = tensors.get("proj_out.weight")
    emb = tensors["decoder.embed_tokens.weight"]
    if head is not None and (head.shape != emb.shape or not torch.equal(head, emb)):
        raise ModelError(f"{folder}: proj_out.weight differs from the token embedding; Murmur needs them tied")
    sd = _to_fp32(sd, folder)
    _fill_encoder_positions(sd, dims)
    _load_state(model, sd, folder)

    gen = _read_json(folder / "generation_config.json") if (folder / "generation_config.json").is_file() else {}
    heads = gen.get("alignment_heads")
    model.alignment_heads = _heads_from_mask(heads, dims, folder) if heads else _default_heads(dims)

    tok = None
    if not (folder / "vocabulary.txt").is_file():
        tok = _hf_vocab_tokenizer(folder, dims)
    tok = tok or _tokenizer_for(folder, dims)
    # transformers stores the same lists openai-whisper computes; prefer the folder's own
    suppress = gen.get("suppress_tokens", config.get("suppress_tokens")) or tok.non_speech_tokens()
    begin = gen.get("begin_suppress_tokens", config.get("begin_suppress_tokens")) or [220, tok.eot]
    suppress = [int(t) for t in suppress if int(t) != tok.eot]  # suppressing eot would never end a window
    return LoadedModel(model, tok, folder.name, folder, suppress, [int(t) for t in begin])
