"""End-to-end checks of the core: bundled weights, tokenizer, decoding rules, CLI and bad input."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import wave

import numpy as np
import pytest
import torch

import murmur
from murmur.audio.decode import load_audio
from murmur.engine.decoding import DecodingOptions, LogitRules, RowState
from murmur.errors import ModelError
from murmur.eval.scoring import normalize
from murmur.models.ctranslate2 import read_ct2

JFK = ("And so, my fellow Americans, ask not what your country can do for you; "
       "ask what you can do for your country.")


@pytest.fixture(scope="module")
def tiny():
    return murmur.load_model("tiny.en", compute_type="float32")  # exact checks against the reference


@pytest.fixture(scope="module")
def jfk_audio(jfk_path):
    return load_audio(jfk_path)


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "murmur.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def test_cli_transcribes_jfk_exactly(jfk_path, tmp_path):
    out = tmp_path / "jfk.json"
    r = run_cli("transcribe", jfk_path, "--format", "json", "--output", out)
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    assert normalize(d["text"]) == normalize(JFK)
    assert set(d) >= {"text", "duration", "model", "segments", "stats"}
    assert d["model"] == "tiny.en" and abs(d["duration"] - 11.0) < 0.1
    assert {"wall_s", "rtfx"} <= set(d["stats"])
    for s in d["segments"]:
        assert 0 <= s["start"] < s["end"] <= d["duration"] + 0.5
    # the summary and progress go to stderr, never into the transcript
    assert "RTFx" in r.stderr


def test_cli_stdout_txt(jfk_path):
    r = run_cli("transcribe", jfk_path, "-q")
    assert r.returncode == 0, r.stderr
    assert normalize(r.stdout) == normalize(JFK)


def test_weights_map_onto_module(tiny):
    d = tiny.model.dims
    assert (d.n_audio_layer, d.n_text_layer, d.n_audio_state, d.n_vocab) == (4, 4, 384, 51864)
    assert tiny.model.alignment_heads[0] == (1, 0)
    # key projections have no bias, and the fused cross-attention K/V were split in two halves
    blk = tiny.model.decoder.blocks[0]
    assert blk.cross_attn.key.bias is None and blk.attn.key.bias is None
    assert not torch.equal(blk.cross_attn.key.weight, blk.cross_attn.value.weight)


def test_tokenizers_encode_like_whisper():
    tiny = murmur.load_model("tiny.en").tokenizer
    base = murmur.load_model("base").tokenizer
    assert tiny.encode(" the") == [262]
    assert base.encode(" the") == [264]  # the packaged tokenizer.json says [220, 3322]
    assert base.sot_sequence("en") == [50258, 50259, 50359]
    assert tiny.sot_sequence() == [50257]
    assert (tiny.timestamp_begin, base.timestamp_begin) == (50363, 50364)
    text = " Hello world, it's 1961!"
    assert tiny.decode(tiny.encode(text)) == text and base.decode(base.encode(text)) == text


def test_base_multilingual_detects_english(jfk_audio):
    r = murmur.transcribe(jfk_audio, "base")
    assert r.language == "en"
    assert normalize(r.text) == normalize(JFK)


def test_beam_search(tiny, jfk_audio):
    r = murmur.transcribe(jfk_audio, tiny, beam_size=5)
    assert normalize(r.text) == normalize(JFK)


def test_temperature_fallback_runs(tiny, jfk_audio):
    # an impossible log-prob bar forces every fallback temperature; the last result is kept
    r = murmur.transcribe(jfk_audio, tiny, logprob_threshold=0.0, no_speech_threshold=None)
    assert r.stats["fallbacks"] == 5
    assert len(normalize(r.text).split()) > 10


def test_cli_compute_types_are_the_loaders():
    from murmur import cli
    from murmur.models import loading
    assert cli.COMPUTE_TYPES == loading.COMPUTE_TYPES


def test_sampling_follows_the_distribution():
    from murmur.engine.decoding import sample
    probs = torch.tensor([[0.0, 0.1, 0.0, 0.2, 0.3, 0.4, 0.0]]).expand(40000, -1)
    got = sample(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(got, minlength=7).double() / len(got)
    assert freq[[0, 2, 6]].sum() == 0  # zero-probability tokens never come
    torch.testing.assert_close(freq, probs[0].double(), atol=0.01, rtol=0)
    assert torch.equal(sample(probs[:50], torch.Generator().manual_seed(1)),
                       sample(probs[:50], torch.Generator().manual_seed(1)))


def test_initial_prompt_is_used(tiny, jfk_audio):
    r = murmur.transcribe(jfk_audio, tiny, initial_prompt="JFK INAUGURAL ADDRESS, 1961.")
    assert "country" in r.text.lower()


def test_timestamp_rules_vectorised(tiny):
    tok = tiny.tokenizer
    tsb = tok.timestamp_begin
    rules = LogitRules(tok, tiny.model.dims.n_vocab, DecodingOptions(), tiny.suppress_tokens,
                       tiny.suppress_tokens_begin, "cpu")
    st = RowState.zeros(3, "cpu")
    # row 0: nothing sampled; row 1: text after one stamp; row 2: a lone stamp after text
    st.push(slice(1, 3), torch.tensor([tsb + 10, tsb + 10]), tsb)
    st.push(slice(1, 3), torch.tensor([400, 500]), tsb)
    st.push(slice(2, 3), torch.tensor([tsb + 40]), tsb)
    logits = torch.zeros(3, tiny.model.dims.n_vocab)
    logits[2, tok.eot] = 10.0  # outweighs the stamps' total mass, so text is not forced out
    logits = rules(logits, st)
    ok = torch.isfinite(logits)
    assert not ok[0, :tsb].any() and ok[0, tsb:tsb + 51].all() and not ok[0, tsb + 51:].any()
    assert not ok[1, tsb:tsb + 11].any() and ok[1, tsb + 11:].all()  # stamps never go back
    assert not ok[2, :tok.eot].any() and ok[2, tok.eot]  # after a lone stamp: stamp or eot
    assert not ok[2, tsb:tsb + 40].any() and ok[2, tsb + 40]
    assert not ok[:, tok.no_timestamps].any()


def test_truncated_model_is_a_clear_error(tmp_path, tiny):
    bad = tmp_path / "model.bin"
    bad.write_bytes((tiny.path / "model.bin").read_bytes()[:100_000])
    with pytest.raises(ModelError, match="truncated"):
        read_ct2(bad)
    with pytest.raises(ModelError, match="not found"):
        murmur.load_model(tmp_path / "nope")


# --- bad input through the CLI: a clear error or an empty transcript, never a traceback -----------
def _wav(path, samples: np.ndarray, rate: int, channels: int = 1):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


def _float_wav(path, samples: np.ndarray, rate: int = 16000):
    data = samples.astype("<f4").tobytes()
    hdr = (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt " +
           struct.pack("<IHHIIHH", 16, 3, 1, rate, rate * 4, 4, 32) + b"data" + struct.pack("<I", len(data)))
    path.write_bytes(hdr + data)


@pytest.mark.parametrize("kind", ["empty", "garbage", "nan"])
def test_cli_rejects_bad_files_cleanly(tmp_path, kind):
    f = tmp_path / f"{kind}.wav"
    if kind == "empty":
        f.write_bytes(b"")
    elif kind == "garbage":
        f.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    else:
        _float_wav(f, np.full(32000, np.nan, dtype=np.float32))
    r = run_cli("transcribe", f, "-q")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and r.stderr.startswith("error:")
    assert f.name in r.stderr


def test_truncated_mp3_gives_its_prefix(data_dir, tmp_path):
    f = tmp_path / "cut.mp3"
    f.write_bytes((data_dir / "sonnets" / "p001.mp3").read_bytes()[:120_000])
    r = run_cli("transcribe", f, "-q")
    assert r.returncode == 0, r.stderr
    assert "fairest creatures" in r.stdout


def test_8khz_stereo(tmp_path, jfk_path):
    a = load_audio(jfk_path, sr=8000)
    f = tmp_path / "jfk8k.wav"
    _wav(f, np.stack([a, 0.5 * a], 1).reshape(-1), 8000, channels=2)
    r = run_cli("transcribe", f, "-q")
    assert r.returncode == 0, r.stderr
    words = set(normalize(r.stdout).split())
    # 8 kHz loses the band above 4 kHz; tiny.en may drop a plural, so allow two misses.
    assert len(words & set(normalize(JFK).split())) >= 12


def test_long_silence_is_empty_and_quick(tmp_path, tiny):
    # 20 min of digital silence in sequential mode: no hallucinated "you you you", no decoding at all
    r = murmur.transcribe(np.zeros(16000 * 1200, dtype=np.float32), tiny)
    assert r.text == "" and r.segments == [] and r.stats["windows"] == 0


def test_int8_matches_float32_on_jfk(tiny, jfk_audio):
    """The CPU defaults must not change a clean transcript: int8 (every Linear and the tied logit
    head) and, where bf16 is native, int8_bfloat16 (bf16 encoder)."""
    from murmur.cpu import native_bf16
    assert murmur.load_model("tiny.en").compute_type == ("int8_bfloat16" if native_bf16() else "int8")
    ref = murmur.transcribe(jfk_audio, tiny).text
    for ct in ("int8", "int8_bfloat16") if native_bf16() else ("int8",):
        q = murmur.load_model("tiny.en", compute_type=ct)
        assert q.compute_type == ct and q.model.decoder.output is not None
        assert q.model.encoder.dtype == (torch.bfloat16 if ct == "int8_bfloat16" else torch.float32)
        assert murmur.transcribe(jfk_audio, q).text == ref
    with pytest.raises(ModelError, match="compute type"):
        murmur.load_model("tiny.en", compute_type="int4")


def test_progress_counts_recording_seconds(tiny, jfk_audio):
    # chunked mode decodes only speech, yet the bar advances in recording seconds and ends full
    seen = []
    r = murmur.transcribe(jfk_audio, tiny, chunk_size=30, progress=lambda done, total: seen.append((done, total)))
    assert seen and all(t == pytest.approx(r.duration) for _, t in seen)
    assert seen[-1][0] == pytest.approx(r.duration, abs=0.05)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_openmp_spin_default_keeps_a_users_value():
    # a short OpenMP spin keeps 2-thread runs usable on a busy machine (docs/benchmarks.md)
    code = "import os, murmur; print(os.environ['GOMP_SPINCOUNT'])"
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "10000"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "GOMP_SPINCOUNT": "5"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "5"


def test_threads_follow_idle_cores_unless_pinned(monkeypatch):
    """Unpinned, a run takes the cores other programs leave idle (looked at once per 10 s);
    MURMUR_THREADS or an explicit count wins. The tokens do not depend on it (docs/benchmarks.md)."""
    import psutil

    import murmur.threads

    T = sys.modules["murmur.transcribe"]
    old = torch.get_num_threads()
    calls = []

    def load(interval=None, percpu=False):
        calls.append(interval)
        return [100.0, 3.0]

    monkeypatch.setattr(psutil, "cpu_percent", load)
    monkeypatch.delenv("MURMUR_THREADS", raising=False)
    monkeypatch.setattr(murmur.threads, "_IDLE", (-1e9, 0))
    try:
        T.set_threads()
        assert torch.get_num_threads() == 1 and calls == [0.05]
        T.set_threads()
        assert len(calls) == 1  # within 10 s: the last look stands
        monkeypatch.setenv("MURMUR_THREADS", "2")
        T.set_threads()
        assert torch.get_num_threads() == 2 and len(calls) == 1
        T.set_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(old)
