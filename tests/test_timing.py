"""Word timestamps: DTW, the word split, and word times on real speech (tiny.en, CPU)."""
import json

import numpy as np
import pytest

from murmur.speakers.timing import (_SORT7, WordTiming, add_word_timestamps, dtw, median_filter,
                                    merge_punctuations, split_words, word_start_errors, words_for_segments)
from murmur.types import Segment, Word


def test_dtw_known_paths():
    # a cheap diagonal through a square
    x = np.array([[0, 9, 9], [9, 0, 9], [9, 9, 0]], dtype=float)
    ti, fi = dtw(x)
    assert ti.tolist() == [0, 1, 2] and fi.tolist() == [0, 1, 2]
    # 2 tokens over 5 frames: token 0 owns frames 0-1, token 1 frames 2-4
    x = np.array([[0, 0, 5, 5, 5], [5, 5, 0, 0, 0]], dtype=float)
    ti, fi = dtw(x)
    assert ti.tolist() == [0, 0, 1, 1, 1] and fi.tolist() == [0, 1, 2, 3, 4]
    # diagonal steps, then the last token holds the remaining frame
    x = np.array([[0, 5, 5, 5], [5, 0, 5, 5], [5, 5, 0, 0]], dtype=float)
    ti, fi = dtw(x)
    assert ti.tolist() == [0, 1, 2, 2] and fi.tolist() == [0, 1, 2, 3]
    # ties resolve as openai's dtw_cpu (frame steps win backwards): a flat matrix moves to the last token first
    ti, fi = dtw(np.zeros((2, 3)))
    assert ti.tolist() == [0, 1, 1, 1] and fi.tolist() == [0, 0, 1, 2]
    # degenerate shapes
    assert [a.tolist() for a in dtw(np.zeros((1, 1)))] == [[0], [0]]
    assert [a.tolist() for a in dtw(np.zeros((3, 1)))] == [[0, 1, 2], [0, 0, 0]]


def test_median_filter_network_equals_sorting():
    import itertools

    import torch
    # the 7-value network sorts every 0/1 input, hence every input (the 0-1 principle)
    for bits in itertools.product((0, 1), repeat=7):
        v = list(bits)
        for a, b in _SORT7:
            v[a], v[b] = min(v[a], v[b]), max(v[a], v[b])
        assert v == sorted(bits)
    g = torch.Generator().manual_seed(0)
    for x in (torch.randn(3, 11, 40, generator=g), torch.randint(0, 3, (2, 50), generator=g).float(),
              torch.randn(9, generator=g)):
        pad = torch.nn.functional.pad(x.reshape(1, -1, x.shape[-1]), (3, 3), mode="reflect")
        ref = pad.unfold(-1, 7, 1).sort()[0][..., 3].reshape(x.shape)  # the sorting path
        assert torch.equal(median_filter(x, 7), ref)
    x = torch.randn(4, 30, generator=g)
    assert torch.equal(median_filter(x, 5)[:, 2:-2], x.unfold(-1, 5, 1).median(-1).values)
    assert torch.equal(median_filter(x[:, :3], 7), x[:, :3])  # shorter than the half width


def test_dtw_is_minimal_on_random_matrices():
    # brute force over every monotonic path on small matrices
    rng = np.random.default_rng(1)

    def best(x):
        n, m = x.shape
        c = np.full((n + 1, m + 1), np.inf)
        c[0, 0] = 0
        for i in range(1, n + 1):
            for j in range(1, m + 1):
                c[i, j] = x[i - 1, j - 1] + min(c[i - 1, j - 1], c[i - 1, j], c[i, j - 1])
        return c[n, m]

    for n, m in [(2, 2), (3, 7), (6, 4), (5, 20)]:
        x = rng.random((n, m))
        ti, fi = dtw(x)
        steps = np.stack([np.diff(ti), np.diff(fi)])
        assert ti[0] == fi[0] == 0 and ti[-1] == n - 1 and fi[-1] == m - 1
        assert ((steps >= 0) & (steps <= 1)).all() and (steps.sum(0) >= 1).all()
        assert x[ti, fi].sum() == pytest.approx(best(x))


def test_merge_punctuations():
    al = [WordTiming(w, [i], i, i + 1, 1.0) for i, w in enumerate([" \"", "Hi", ",", " there", "."])]
    merge_punctuations(al)
    assert [a.word for a in al] == ["", " \"Hi,", "", " there.", ""]


def test_words_for_segments_by_text_and_by_time():
    segs = [Segment(0.0, 1.0, " a b"), Segment(1.0, 2.0, " c.")]
    words = [Word(0.1, 0.4, " a"), Word(0.5, 0.9, " b"), Word(1.2, 1.5, " c.")]
    words_for_segments(segs, words)
    assert [[w.word for w in s.words] for s in segs] == [[" a", " b"], [" c."]]
    words_for_segments(segs, [Word(1.1, 1.3, " x"), Word(0.2, 0.3, " y")])  # text differs: by time
    assert [[w.word for w in s.words] for s in segs] == [[" y"], [" x"]]


def _transcribe_with_words(loaded, path):
    from murmur.transcribe import transcribe
    return transcribe(path, loaded, chunk_size=None, word_timestamps=True)


def test_split_words_keeps_text(tiny):
    tok = tiny.tokenizer
    text = " Hello, world! It's 3.5% (roughly) “quoted” ünïcödé 東京."
    ids = tok.encode(text)
    words, groups = split_words(tok, ids)
    assert "".join(words) == text and sum(groups, []) == ids
    assert "," in words and "!" in words  # punctuation stands alone before merging


def _check_words(segments):
    """Words spell their segment, sit inside it, never go back in time, carry a probability."""
    assert segments and all(s.words for s in segments)
    last = 0.0
    for s in segments:
        assert "".join(w.word for w in s.words) == s.text
        for w in s.words:
            assert s.start - 1e-6 <= w.start <= w.end <= s.end + 1e-6
            assert w.start >= last - 1e-6
            last = w.start
            assert 0.0 <= w.probability <= 1.0


def test_jfk_words_in_stream(tiny, jfk_path):
    tr = _transcribe_with_words(tiny, jfk_path)
    _check_words(tr.segments)
    words = [w for s in tr.segments for w in s.words]
    assert [w.word.strip(" ,.").lower() for w in words][:5] == ["and", "so", "my", "fellow", "americans"]
    assert 9.5 < words[-1].start < 10.5  # "country.", said around 9.9-10.4 s


def test_ami_word_starts_post_pass(tiny, data_dir):
    from murmur.audio.decode import load_audio
    from murmur.transcribe import transcribe
    clip = "trn03"  # 103 reference words and quick to decode (no fallbacks)
    path = data_dir / "ami" / f"{clip}.flac"
    ref = sorted(((e["words"], e["start_time"])
                  for e in json.loads((data_dir / "ami" / "ami30.words.seglst.json").read_text())
                  if e["session_id"] == clip), key=lambda x: x[1])
    segments = transcribe(path, tiny, chunk_size=None).segments
    add_word_timestamps(tiny, segments, load_audio(path))
    _check_words(segments)
    errors = np.abs(word_start_errors(ref, [w for s in segments for w in s.words]))
    assert len(errors) >= 0.5 * len(ref)
    assert np.median(errors) < 0.3
