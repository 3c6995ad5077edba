"""VAD (Silero, real speech) and chunker invariants."""
import math
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from murmur.audio import vad
from murmur.audio.chunker import CHUNK_SIZES, Chunk, make_chunks, merge_regions, parse_chunk_size
from murmur.audio.vad import VadOptions, regions_from_probs, speech_probs, speech_regions

SR = 16000


def _load(path: Path) -> np.ndarray:
    # Decoded here with PyAV so these tests don't depend on murmur.audio.decode.
    out = []
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SR)
    with av.open(str(path)) as container:
        for frame in container.decode(audio=0):
            out += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    out += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(out).astype(np.float32)


@pytest.fixture(scope="module")
def jfk(jfk_path):
    return _load(jfk_path)


@pytest.fixture(scope="module")
def ami_stitched(data_dir):
    """The 13 AMI clips joined with 2 s of digital silence (~6.9 min) and its VAD regions."""
    clips = sorted((data_dir / "ami").glob("*.flac"))
    assert len(clips) == 13
    gap = np.zeros(2 * SR, dtype=np.float32)
    parts = []
    for c in clips:
        parts += [_load(c), gap]
    audio = np.concatenate(parts[:-1])
    return audio, speech_regions(audio)


def _check_regions(regions, duration):
    assert regions == sorted(regions)
    for s, e in regions:
        assert 0.0 <= s < e <= duration + 1e-6
    for (_, e0), (s1, _) in zip(regions, regions[1:]):
        assert e0 <= s1


def _check_chunks(chunks, regions, limit):
    """Ordered, non-overlapping, within the limit, covering every region exactly."""
    assert all(isinstance(c, Chunk) for c in chunks)
    for c in chunks:
        assert c.regions, "empty chunk"
        assert c.start == c.regions[0][0]
        assert c.end == max(e for _, e in c.regions)
        assert all(c.start <= s < e <= c.end for s, e in c.regions)
        if limit is not None:
            assert c.duration <= limit + 1e-6, (c.duration, limit)
    for a, b in zip(chunks, chunks[1:]):
        assert a.end <= b.start
    # The chunks' speech, re-merged, is exactly the merged input: nothing lost or added.
    covered = merge_regions([r for c in chunks for r in c.regions])
    expected = merge_regions(regions)
    assert len(covered) == len(expected)
    for (s0, e0), (s1, e1) in zip(covered, expected):
        assert s0 == pytest.approx(s1, abs=1e-9) and e0 == pytest.approx(e1, abs=1e-9)


# --------------------------------------------------------------------------- VAD

def test_vad_finds_speech_in_jfk(jfk):
    duration = len(jfk) / SR
    regions = speech_regions(jfk)
    _check_regions(regions, duration)
    speech = sum(e - s for s, e in regions)
    # ~11 s clip with a few pauses between phrases: most of it is speech.
    assert speech >= 0.6 * duration
    assert regions[0][0] < 1.0 and regions[-1][1] > duration - 1.0


def test_vad_silence_and_low_noise_give_nothing():
    assert speech_regions(np.zeros(60 * SR, dtype=np.float32)) == []
    noise = np.random.default_rng(0).standard_normal(30 * SR).astype(np.float32) * 0.003
    assert speech_regions(noise) == []
    assert speech_regions(np.zeros(0, dtype=np.float32)) == []
    assert speech_regions(np.zeros(100, dtype=np.float32)) == []  # shorter than a frame


def test_speech_probs_frames_and_reuse(jfk):
    p = speech_probs(jfk)
    assert p.dtype == np.float32 and len(p) == math.ceil(len(jfk) / 512)
    assert ((p >= 0) & (p <= 1)).all() and p.max() > 0.9
    assert regions_from_probs(p, len(jfk)) == speech_regions(jfk)
    assert len(speech_probs(np.zeros(0, dtype=np.float32))) == 0


def test_vad_options_change_result(jfk):
    default = speech_regions(jfk)
    # Long min_silence bridges the phrase pauses; strict threshold finds less speech.
    bridged = speech_regions(jfk, options=VadOptions(min_silence_s=2.0))
    assert len(bridged) < len(default)
    strict = speech_regions(jfk, options=VadOptions(threshold=0.95))
    assert sum(e - s for s, e in strict) < sum(e - s for s, e in default)
    with pytest.raises(ValueError):
        VadOptions(threshold=1.5)
    with pytest.raises(ValueError):
        speech_regions(jfk, sr=8000)
    with pytest.raises(ValueError):
        speech_regions(np.zeros((2, 1000), dtype=np.float32))


def test_vad_model_cached_and_single_threaded():
    assert vad._vad() is vad._vad()
    opts = vad._vad().model.session.get_session_options()
    assert 1 <= opts.intra_op_num_threads <= 2 and opts.inter_op_num_threads == 1


def test_streaming_fallback_matches(jfk):
    v = vad._vad()
    if v.kind != "sequence":
        pytest.skip("installed silero_vad has no sequence model")
    stream = vad._Vad(prefer_sequence=False)
    assert stream.kind == "stream"
    np.testing.assert_allclose(stream.probs(jfk), v.probs(jfk), atol=1e-5)


def test_loading_vad_keeps_torch_threads():
    # silero_vad sets torch threads to 1 on import; only a fresh process shows it.
    code = (
        "import numpy as np, torch; torch.set_num_threads(2);"
        "from murmur.audio.vad import speech_regions; speech_regions(np.zeros(16000, np.float32));"
        "print(torch.get_num_threads())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.stdout.strip().splitlines()[-1] == "2"


# --------------------------------------------------------------------------- chunker

@pytest.mark.parametrize("size", ["10", "30", "60", "120", "300", "600", "full"])
def test_chunks_on_real_vad_output(ami_stitched, size):
    audio, regions = ami_stitched
    _check_regions(regions, len(audio) / SR)
    assert len(regions) > 20
    limit = None if size == "full" else float(size)  # 10 s forces cuts inside speech
    for a in (audio, None):
        chunks = make_chunks(regions, limit, audio=a)
        _check_chunks(chunks, regions, limit)
        if limit is None:
            assert len(chunks) == 1
            assert (chunks[0].start, chunks[0].end) == (regions[0][0], regions[-1][1])
        else:
            # each chunk holds at most `limit` seconds of speech
            assert len(chunks) >= math.ceil(sum(e - s for s, e in regions) / limit - 1e-9)


def test_nested_and_overlapping_regions():
    regions = [(10, 20), (12, 15), (0, 5), (4, 6), (19, 25), (40, 41), (30, 31), (30.5, 30.7), (50, 50)]
    assert merge_regions(regions) == [(0, 6), (10, 25), (30, 31), (40, 41)]
    full = make_chunks(regions, None)
    assert len(full) == 1 and (full[0].start, full[0].end) == (0, 41)
    chunks = make_chunks(regions, 30)
    _check_chunks(chunks, regions, 30)
    assert [(c.start, c.end) for c in chunks] == [(0, 25), (30, 41)]
    # A nested region listed last must not pull the chunk's end back.
    assert [(c.start, c.end) for c in make_chunks([(10, 20), (12, 15)], 30)] == [(10, 20)]
    chunks = make_chunks([(0, 28), (1, 2), (29, 35)], 30)
    assert [(c.start, c.end) for c in chunks] == [(0, 28), (29, 35)]
    assert make_chunks([], 30) == [] and make_chunks([], None) == []


def test_chunk_closes_at_longest_pause_near_limit():
    # 2 s pause at 24 s beats the 0.1 s one at 29.5 s, both in the last 20 % of 30 s.
    regions = [(0, 20), (20.1, 24), (26, 27), (27.05, 29.5), (29.6, 35)]
    chunks = make_chunks(regions, 30)
    _check_chunks(chunks, regions, 30)
    assert [(c.start, c.end) for c in chunks] == [(0, 24), (26, 35)]


def test_long_region_cut_at_quiet_points(data_dir):
    """100 s of real speech as one region, limit 30 s: cuts land in inserted quiet gaps."""
    clips = sorted((data_dir / "ljspeech").glob("*.flac"))
    audio = np.concatenate([_load(c) for c in clips])[: 100 * SR].copy()
    assert len(audio) == 100 * SR
    # 60 ms near-silent gaps (shorter than VAD's 0.1 s min_silence), placed inside
    # words' regions and inside each successive search band [s+24, s+30].
    gaps = [26.5, 54.0, 80.0]
    gap_len = 0.06
    rng = np.random.default_rng(0)
    for g in gaps:
        a = int(g * SR)
        audio[a : a + int(gap_len * SR)] = rng.standard_normal(int(gap_len * SR)) * 1e-5

    # The VAD does not split at these gaps: only the chunker's energy search sees them.
    for s, e in speech_regions(audio):
        for g in gaps:
            assert not (g - 0.05 < s < g + gap_len + 0.05 or g - 0.05 < e < g + gap_len + 0.05)

    chunks = make_chunks([(0.0, 100.0)], 30, audio=audio)
    _check_chunks(chunks, [(0.0, 100.0)], 30)
    cuts = [c.end for c in chunks[:-1]]
    assert len(cuts) == 3
    for cut, g in zip(cuts, gaps):
        assert g <= cut <= g + gap_len, (cut, g)
    assert [c.start for c in chunks[1:]] == cuts  # pieces of one region abut

    # Without audio the cut is blind, exactly at the limit.
    blind = make_chunks([(0.0, 100.0)], 30)
    assert [(c.start, c.end) for c in blind] == [(0, 30), (30, 60), (60, 90), (90, 100)]
    # Region running past the end of the audio: blind cuts there, no error.
    short = make_chunks([(0.0, 100.0)], 30, audio=audio[: 50 * SR])
    _check_chunks(short, [(0.0, 100.0)], 30)


def test_parse_chunk_size():
    assert CHUNK_SIZES == ("30", "60", "120", "300", "600", "full")
    assert [parse_chunk_size(s) for s in CHUNK_SIZES] == [30.0, 60.0, 120.0, 300.0, 600.0, None]
    assert parse_chunk_size(" FULL ") is None and parse_chunk_size(60) == 60.0
    for bad in ("45", "abc", "", "0", "-30", "30s", None):
        with pytest.raises(ValueError, match="choose one of 30, 60"):
            parse_chunk_size(bad)
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            make_chunks([(0, 1)], bad)


def test_long_audio_vad_runs_in_blocks_that_do_not_depend_on_threads(ami_stitched):
    import torch

    from murmur.threads import torch_threads
    audio = ami_stitched[0]
    assert audio.size > vad.BLOCK_FRAMES * vad.FRAME_SAMPLES  # ~6.9 min: two blocks
    with torch_threads(1):
        one = speech_probs(audio)
    with torch_threads(2):
        two = speech_probs(audio)
    assert torch.get_num_threads() >= 1 and np.array_equal(one, two)
    assert len(one) == math.ceil(audio.size / vad.FRAME_SAMPLES)
    # against one pass over the whole: only frames just after the block start move
    whole = vad._vad().probs(audio)
    assert float(np.mean(np.abs(whole - one) > 0.05)) < 0.01
    a, b = (regions_from_probs(p, audio.size) for p in (whole, one))
    speech = lambda rs: sum(e - s for s, e in rs)  # noqa: E731
    assert abs(speech(a) - speech(b)) < 0.01 * speech(a)
