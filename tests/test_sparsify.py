"""Early attentive encoder sparsification (murmur.engine.sparsify) on the real tiny.en encoder and speech."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from murmur.engine.sparsify import AttentiveFrameDrop, parse_encoder_sparsity
from murmur.errors import MurmurError


@pytest.fixture(scope="module")
def mel(jfk_path):
    from murmur.audio.decode import N_SAMPLES, load_audio, log_mel_spectrogram
    a = load_audio(jfk_path)
    return log_mel_spectrogram(a, padding=N_SAMPLES)[:, :3000][None]


def _blocks(enc, mel, upto):
    """The encoder's activations after block `upto` and the attention mass each frame received there."""
    x = F.gelu(enc.conv1(mel.to(enc.dtype)))
    x = F.gelu(enc.conv2(x)).transpose(1, 2) + enc.positional_embedding
    received = None
    for i, b in enumerate(enc.blocks[: upto + 1]):
        x, received = b.encode(x, need_weights=i == upto, attention=enc.attention)
    return x, received


@pytest.mark.parametrize("layer,frac", [(1, 0.4)])
@torch.inference_mode()
def test_keeps_most_attended_frames_in_order(tiny, mel, layer, frac):
    enc = tiny.model.encoder
    hook = AttentiveFrameDrop(layer, frac)
    out = enc(mel, hooks=[hook])
    n = round(1500 * (1 - frac))
    assert out.shape == (1, n, tiny.model.dims.n_audio_state)
    kept = hook.kept[0]
    assert len(kept) == n and bool((kept[1:] > kept[:-1]).all())  # temporal order, no repeats
    x, received = _blocks(enc, mel, layer)
    top = set(received[0].topk(n).indices.tolist())
    assert set(kept.tolist()) == top
    # the remaining blocks ran on exactly the kept frames
    y = x[:, kept]
    for b in enc.blocks[layer + 1:]:
        y, _ = b.encode(y, attention=enc.attention)
    torch.testing.assert_close(out, enc.ln_post(y), rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_query_stride_estimate(tiny, mel):
    """Scoring from every 8th query lets block k run fused and keeps nearly the same frames."""
    enc = tiny.model.encoder
    exact, est = AttentiveFrameDrop(1, 0.5), parse_encoder_sparsity("1:0.5:8", tiny)[0]
    assert not est.wants_weights(1) and exact.wants_weights(1)
    enc(mel, hooks=[exact])
    out = enc(mel, hooks=[est])
    assert out.shape[1] == 750 and bool((est.kept[0][1:] > est.kept[0][:-1]).all())
    overlap = len(set(exact.kept[0].tolist()) & set(est.kept[0].tolist())) / 750
    assert overlap > 0.8
    with pytest.raises(MurmurError):
        parse_encoder_sparsity("0:0.5:8", tiny)  # nothing runs before block 0 to score it


@torch.inference_mode()
def test_off_and_zero_are_identity(tiny, mel):
    enc = tiny.model.encoder
    full = enc(mel)
    assert parse_encoder_sparsity("off") == [] and parse_encoder_sparsity("1:0") == []
    assert torch.equal(enc(mel, hooks=[AttentiveFrameDrop(1, 0.0)]), full)


def test_parse_encoder_sparsity(tiny):
    (h,) = parse_encoder_sparsity("1:0.4", tiny)
    assert (h.layer, h.fraction) == (1, 0.4)
    for bad in ("1", "a:0.5", "1:1.0", "-1:0.5", "1:0.5:x", "1:0.5:2:1"):
        with pytest.raises(MurmurError):
            parse_encoder_sparsity(bad)
    with pytest.raises(MurmurError):
        parse_encoder_sparsity("4:0.5", tiny)  # tiny has encoder layers 0..3


def test_transcribe_with_sparse_encoder(tiny, jfk_path):
    """Cross-attention reads the kept frames only, the transcript survives, KV shrinks."""
    from murmur.eval.scoring import wer
    from murmur.transcribe import transcribe
    ref = (jfk_path.parent / "jfk.txt").read_text()
    base = transcribe(jfk_path, tiny)
    t = transcribe(jfk_path, tiny, encoder_hooks=parse_encoder_sparsity("1:0.5", tiny))
    assert wer(ref, t.text)["wer"] <= wer(ref, base.text)["wer"] + 0.05
    assert t.stats["kv_physical_peak_per_row"] <= 750 + 448
    assert t.stats["kv_physical"] < base.stats["kv_physical"]
