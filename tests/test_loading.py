"""OpenAI .pt and Hugging Face folders load to the same weights and text as the bundled tiny.en; bad files fail clearly."""
import base64
import gzip
import json
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch

import murmur
from murmur import ModelError
from murmur.models.ctranslate2 import _bundled_tiny_dir
from murmur.models.whisper import ModelDims, Whisper


def to_hf(name: str) -> str:
    """openai-whisper name -> transformers WhisperForConditionalGeneration name (written apart from the loader)."""
    for a, b in [
        ("encoder.positional_embedding", "encoder.embed_positions.weight"),
        ("decoder.positional_embedding", "decoder.embed_positions.weight"),
        ("decoder.token_embedding.", "decoder.embed_tokens."),
        ("encoder.ln_post.", "encoder.layer_norm."),
        ("decoder.ln.", "decoder.layer_norm."),
        (".blocks.", ".layers."),
        (".cross_attn_ln.", ".encoder_attn_layer_norm."),
        (".attn_ln.", ".self_attn_layer_norm."),
        (".cross_attn.", ".encoder_attn."),
        (".attn.", ".self_attn."),
        (".query.", ".q_proj."), (".key.", ".k_proj."), (".value.", ".v_proj."), (".out.", ".out_proj."),
        (".mlp.0.", ".fc1."), (".mlp.2.", ".fc2."), (".mlp_ln.", ".final_layer_norm."),
    ]:
        name = name.replace(a, b)
    return "model." + name


def hf_config(d: ModelDims) -> dict:
    # the fields transformers' WhisperConfig writes (subset that matters, plus some it always writes)
    return {
        "architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper",
        "activation_function": "gelu", "d_model": d.n_audio_state,
        "encoder_layers": d.n_audio_layer, "encoder_attention_heads": d.n_audio_head,
        "decoder_layers": d.n_text_layer, "decoder_attention_heads": d.n_text_head,
        "encoder_ffn_dim": 4 * d.n_audio_state, "decoder_ffn_dim": 4 * d.n_text_state,
        "num_mel_bins": d.n_mels, "vocab_size": d.n_vocab,
        "max_source_positions": d.n_audio_ctx, "max_target_positions": d.n_text_ctx,
        "scale_embedding": False, "tie_word_embeddings": True, "torch_dtype": "float32",
        "bos_token_id": 50257, "eos_token_id": 50256, "pad_token_id": 50256, "decoder_start_token_id": 50257,
    }


def write_hf(folder, sd, dims, prefix=True, shards=1, dtype=torch.float32, extra=None, gen=None):
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    hf = {to_hf(k) if prefix else to_hf(k).removeprefix("model."): v.to(dtype).contiguous().clone()
          for k, v in sd.items()}
    hf.update(extra or {})
    (folder / "config.json").write_text(json.dumps(hf_config(dims), indent=2))
    if gen is not None:
        (folder / "generation_config.json").write_text(json.dumps(gen))
    if shards == 1:
        save_file(hf, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    names = sorted(hf)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: hf[n] for n in names[i::shards]}
        save_file(part, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def packed_heads(heads, dims) -> bytes:
    # openai-whisper's _ALIGNMENT_HEADS format: base85(gzip(bool[n_text_layer, n_text_head]))
    mask = np.zeros((dims.n_text_layer, dims.n_text_head), dtype=bool)
    for layer, h in heads:
        mask[layer, h] = True
    return base64.b85encode(gzip.compress(mask.tobytes()))


@pytest.fixture(scope="module")
def bundled():
    return murmur.load_model("tiny.en", device="cpu", compute_type="float32")  # exact weight checks


@pytest.fixture(scope="module")
def bundled_sd(bundled):
    return {k: v.clone() for k, v in bundled.model.state_dict().items()}


@pytest.fixture(scope="module")
def bundled_text(bundled, jfk_path):
    return murmur.transcribe(str(jfk_path), bundled).text


@pytest.fixture(scope="module")
def openai_pt(tmp_path_factory, bundled, bundled_sd):
    path = tmp_path_factory.mktemp("pt") / "tiny.en.pt"
    dims = bundled.model.dims
    torch.save({"dims": asdict(dims), "model_state_dict": bundled_sd,
                "alignment_heads": packed_heads(bundled.model.alignment_heads, dims)}, path)
    return path


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, bundled, bundled_sd):
    folder = tmp_path_factory.mktemp("hf") / "whisper-tiny.en"
    heads = [list(h) for h in bundled.model.alignment_heads]
    write_hf(folder, bundled_sd, bundled.model.dims,
             gen={"alignment_heads": heads, "begin_suppress_tokens": [220, 50256],
                  "suppress_tokens": bundled.suppress_tokens})
    # HF tokenizer files: vocab.json holds the BPE ranks + <|endoftext|>, added_tokens.json the specials
    lines = (_bundled_tiny_dir() / "vocabulary.txt").read_text(encoding="utf-8").split("\n")[:-1]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(lines[:50257])}))
    (folder / "added_tokens.json").write_text(json.dumps({t: i for i, t in enumerate(lines) if i >= 50257}))
    return folder


def assert_same_weights(loaded, sd, cast=None):
    got = loaded.model.state_dict()
    assert set(got) == set(sd)
    for k, v in sd.items():
        want = v.to(cast).float() if cast else v
        assert got[k].dtype == torch.float32, k
        assert torch.equal(got[k], want), k


def test_openai_checkpoint_roundtrip(openai_pt, bundled, bundled_sd, bundled_text, jfk_path):
    loaded = murmur.load_model(openai_pt, device="cpu", compute_type="float32")
    assert loaded.model.dims == bundled.model.dims
    assert_same_weights(loaded, bundled_sd)
    assert loaded.model.alignment_heads == bundled.model.alignment_heads
    assert loaded.suppress_tokens == bundled.tokenizer.non_speech_tokens()
    assert loaded.suppress_tokens_begin == [220, bundled.tokenizer.eot]
    assert murmur.transcribe(str(jfk_path), loaded).text == bundled_text


def test_hf_folder_roundtrip(hf_folder, bundled, bundled_sd, bundled_text, jfk_path, monkeypatch, tmp_path):
    monkeypatch.setenv("MURMUR_CACHE", str(tmp_path / "cache"))
    loaded = murmur.load_model(hf_folder, device="cpu", compute_type="float32")
    assert loaded.model.dims == bundled.model.dims
    assert_same_weights(loaded, bundled_sd)
    assert loaded.model.alignment_heads == bundled.model.alignment_heads
    assert sorted(loaded.suppress_tokens) == sorted(bundled.suppress_tokens)
    # the vocabulary rebuilt from vocab.json matches the bundled one
    assert loaded.tokenizer.n_vocab == bundled.tokenizer.n_vocab
    text = " And so my fellow Americans, ask not what your country can do for you"
    assert loaded.tokenizer.encode(text) == bundled.tokenizer.encode(text)
    assert murmur.transcribe(str(jfk_path), loaded).text == bundled_text


def test_hf_names_are_transformers_names(hf_folder):
    from safetensors import safe_open
    with safe_open(str(hf_folder / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    for n in ["model.encoder.conv1.weight", "model.encoder.embed_positions.weight",
              "model.encoder.layers.0.self_attn.q_proj.bias", "model.encoder.layers.3.fc2.weight",
              "model.encoder.layer_norm.bias", "model.decoder.embed_tokens.weight",
              "model.decoder.layers.2.encoder_attn.v_proj.weight", "model.decoder.layers.1.encoder_attn_layer_norm.weight",
              "model.decoder.layers.0.final_layer_norm.bias", "model.decoder.layer_norm.weight"]:
        assert n in names, n
    assert not any(n.endswith("k_proj.bias") for n in names)
    assert not any(".blocks." in n or "attn_ln" in n or ".mlp." in n for n in names)


def test_hf_sharded_fp16_unprefixed_with_tied_head(tmp_path, bundled, bundled_sd):
    # a bare WhisperModel export in fp16, split in shards, carrying an explicit (tied) proj_out and no tokenizer
    folder = tmp_path / "sharded"
    emb = bundled_sd["decoder.token_embedding.weight"].half()
    write_hf(folder, bundled_sd, bundled.model.dims, prefix=False, shards=3, dtype=torch.float16,
             extra={"proj_out.weight": emb.clone()})
    loaded = murmur.load_model(folder, device="cpu", compute_type="float32")
    assert_same_weights(loaded, bundled_sd, cast=torch.float16)
    d = bundled.model.dims
    assert loaded.model.alignment_heads == [(l, h) for l in range(d.n_text_layer // 2, d.n_text_layer)
                                            for h in range(d.n_text_head)]
    assert loaded.tokenizer.n_vocab == d.n_vocab  # bundled vocabulary fallback
    assert loaded.suppress_tokens == bundled.tokenizer.non_speech_tokens()


def test_names_match_openai_whisper(bundled, bundled_sd):
    whisper = pytest.importorskip("whisper")
    ref = whisper.model.Whisper(whisper.model.ModelDimensions(**asdict(bundled.model.dims)))
    ref.load_state_dict(bundled_sd, strict=True)
    # and openai's own head list for tiny.en agrees with the bundled one
    ref.set_alignment_heads(whisper._ALIGNMENT_HEADS["tiny.en"])
    heads = sorted(map(tuple, ref.alignment_heads.indices().T.tolist()))
    assert heads == sorted(bundled.model.alignment_heads)


# --- alignment head formats, vocabulary rebuild --------------------------------------------------
SMALL = ModelDims(n_mels=80, n_audio_ctx=16, n_audio_state=32, n_audio_head=2, n_audio_layer=1,
                  n_vocab=51864, n_text_ctx=8, n_text_state=32, n_text_head=2, n_text_layer=2)


@pytest.fixture(scope="module")
def small_sd():
    torch.manual_seed(0)
    m = Whisper(SMALL)
    with torch.no_grad():
        m.decoder.positional_embedding.normal_()
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("fmt", ["packed", "str", "dense", "sparse", "pairs", "absent"])
def test_openai_alignment_head_formats(tmp_path, small_sd, fmt):
    mask = torch.zeros(SMALL.n_text_layer, SMALL.n_text_head, dtype=torch.bool)
    mask[1, 0] = mask[0, 1] = True
    heads = {"packed": packed_heads([(0, 1), (1, 0)], SMALL),
             "str": packed_heads([(0, 1), (1, 0)], SMALL).decode(),
             "dense": mask, "sparse": mask.to_sparse(), "pairs": [[0, 1], [1, 0]]}.get(fmt)
    ckpt = {"dims": asdict(SMALL), "model_state_dict": {k: v.half() for k, v in small_sd.items()}}
    if heads is not None:
        ckpt["alignment_heads"] = heads
    torch.save(ckpt, tmp_path / "m.pt")
    loaded = murmur.load_model(tmp_path / "m.pt", device="cpu", compute_type="float32")
    assert loaded.model.alignment_heads == ([(0, 1), (1, 0)] if heads is not None else [(1, 0), (1, 1)])
    assert_same_weights(loaded, small_sd, cast=torch.float16)


def test_vocab_json_order_is_used(tmp_path, monkeypatch):
    from murmur.models.huggingface import _hf_vocab_tokenizer
    monkeypatch.setenv("MURMUR_CACHE", str(tmp_path / "cache"))
    lines = (_bundled_tiny_dir() / "vocabulary.txt").read_text(encoding="utf-8").split("\n")[:-1]
    vocab = {t: i for i, t in enumerate(lines[:50257])}
    a, b = lines[1000], lines[1001]
    vocab[a], vocab[b] = 1001, 1000  # a fine-tune's own id order must win over the bundled one
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    tok = _hf_vocab_tokenizer(tmp_path, SMALL)
    assert tok.n_vocab == SMALL.n_vocab and tok.eot == 50256
    assert tok.bpe.id_to_token(1000) == b and tok.bpe.id_to_token(1001) == a
    del vocab[a]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ModelError, match="lacks ids"):
        _hf_vocab_tokenizer(tmp_path, SMALL)


# --- bad input -----------------------------------------------------------------------------------
def test_truncated_pt(tmp_path, small_sd):
    good = tmp_path / "good.pt"
    torch.save({"dims": asdict(SMALL), "model_state_dict": small_sd}, good)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelError, match="not a readable PyTorch checkpoint"):
        murmur.load_model(bad)


def test_random_bytes_pt(tmp_path):
    bad = tmp_path / "noise.pt"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelError, match="not a readable PyTorch checkpoint"):
        murmur.load_model(bad)


def test_pt_that_is_not_a_checkpoint(tmp_path, small_sd):
    torch.save(small_sd, tmp_path / "bare.pt")  # a bare state dict has no dims
    with pytest.raises(ModelError, match="expected keys 'dims' and 'model_state_dict'"):
        murmur.load_model(tmp_path / "bare.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ModelError, match="not an openai-whisper checkpoint"):
        murmur.load_model(tmp_path / "list.pt")


class Pickled:
    pass


def test_pt_with_pickled_objects_is_refused(tmp_path, small_sd):
    torch.save({"dims": asdict(SMALL), "model_state_dict": small_sd, "extra": Pickled()}, tmp_path / "obj.pt")
    with pytest.raises(ModelError, match="holds a pickled .*Pickled"):
        murmur.load_model(tmp_path / "obj.pt")


def test_pt_missing_weight_and_dim(tmp_path, small_sd):
    sd = dict(small_sd)
    del sd["decoder.blocks.1.cross_attn.key.weight"]
    torch.save({"dims": asdict(SMALL), "model_state_dict": sd}, tmp_path / "a.pt")
    with pytest.raises(ModelError, match=r"missing weights \['decoder.blocks.1.cross_attn.key.weight'\]"):
        murmur.load_model(tmp_path / "a.pt")
    dims = asdict(SMALL)
    del dims["n_text_head"]
    torch.save({"dims": dims, "model_state_dict": small_sd}, tmp_path / "b.pt")
    with pytest.raises(ModelError, match=r"'dims' lacks \['n_text_head'\]"):
        murmur.load_model(tmp_path / "b.pt")


def test_hf_corrupt_safetensors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf_config(SMALL)))
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64 + np.random.default_rng(1).bytes(1000))
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        murmur.load_model(tmp_path)


def test_hf_missing_tensor_is_named(tmp_path, small_sd):
    sd = dict(small_sd)
    del sd["decoder.blocks.0.mlp.2.bias"]
    write_hf(tmp_path, sd, SMALL)
    with pytest.raises(ModelError, match=r"missing weights \['decoder.layers.0.fc2.bias'\]"):
        murmur.load_model(tmp_path)


def test_hf_untied_head_refused(tmp_path, small_sd):
    write_hf(tmp_path, small_sd, SMALL, extra={"proj_out.weight": torch.randn(SMALL.n_vocab, SMALL.n_text_state)})
    with pytest.raises(ModelError, match="tied"):
        murmur.load_model(tmp_path)


def test_hf_without_safetensors_package(tmp_path, small_sd, monkeypatch):
    write_hf(tmp_path, small_sd, SMALL)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # import now raises ImportError
    with pytest.raises(ModelError, match="pip install safetensors"):
        murmur.load_model(tmp_path)


def test_nonexistent_path(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        murmur.load_model(tmp_path / "nope.pt")


def test_truncated_ct2_folder(tmp_path):
    src = _bundled_tiny_dir()
    with open(src / "model.bin", "rb") as f:
        (tmp_path / "model.bin").write_bytes(f.read(1 << 20))
    for n in ("config.json", "vocabulary.txt"):
        (tmp_path / n).write_bytes((src / n).read_bytes())
    with pytest.raises(ModelError, match="truncated"):
        murmur.load_model(tmp_path)


def test_built_tokenizer_is_cached_by_content_and_a_damaged_cache_is_rebuilt(monkeypatch, tmp_path):
    from murmur.models import tokenizer as T
    from murmur.models.ctranslate2 import _bundled_tiny_dir
    monkeypatch.setenv("MURMUR_CACHE", str(tmp_path))
    vocab = str(_bundled_tiny_dir() / "vocabulary.txt")
    text = " Hello world, it's 1961! Printing, in the only sense"
    T._build.cache_clear()
    fresh, n = T._build(vocab)
    (cached,) = tmp_path.glob("bpe_*.json")
    T._build.cache_clear()
    again, n2 = T._build(vocab)  # from the file this time
    assert n2 == n and again.encode(text).ids == fresh.encode(text).ids
    cached.write_text("{ not json")
    T._build.cache_clear()
    rebuilt, _ = T._build(vocab)
    assert rebuilt.encode(text).ids == fresh.encode(text).ids
    T._build.cache_clear()


def test_a_model_built_for_a_checkpoint_leaves_torch_layers_initialising():
    from murmur.models.common import new_whisper
    m = new_whisper(SMALL)
    assert isinstance(m, Whisper) and m.dims == SMALL
    lin = torch.nn.Linear(8, 8)  # layers built afterwards get their usual random init
    conv = torch.nn.Conv1d(2, 2, 3)
    assert lin.weight.abs().sum() > 0 and conv.weight.abs().sum() > 0
    assert torch.nn.LayerNorm(4).weight.eq(1).all()
