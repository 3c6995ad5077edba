"""Speaker diarization on real speech, and speaker assignment on hand-made segments."""
import socket

import numpy as np
import pytest

from murmur.cpu import native_bf16
from murmur.speakers import diarize as D
from murmur.speakers.diarize import assign_speakers, diarize
from murmur.types import Segment, Turn, Word

SR = 16000


@pytest.fixture(scope="module")
def dialogue(data_dir):
    """LJSpeech (speaker A) and the TED talk (speaker B) alternating, 2 turns each, 0.4 s apart.
    Returns the audio and the true (start, end, speaker) turns."""
    from murmur.audio.decode import load_audio

    ted = load_audio(data_dir / "ted" / "bill_gates-TED.mp3")
    parts = [
        ("A", load_audio(data_dir / "ljspeech" / "LJ001-0001.flac")),
        ("B", ted[2 * SR:12 * SR]),
        ("A", load_audio(data_dir / "ljspeech" / "LJ001-0003.flac")),
        ("B", ted[20 * SR:30 * SR]),
    ]
    gap = np.zeros(int(0.4 * SR), np.float32)
    audio, truth, t = [], [], 0.0
    for who, x in parts:
        audio += [x, gap]
        truth.append((t, t + len(x) / SR, who))
        t += (len(x) + len(gap)) / SR
    return np.concatenate(audio), truth


@pytest.fixture(scope="module")
def dialogue_turns(dialogue):
    return diarize(dialogue[0])


def _speaker_at(turns, t):
    hits = [x.speaker for x in turns if x.start <= t < x.end]
    return hits[0] if hits else None


def test_two_speakers_found_with_boundaries(dialogue, dialogue_turns):
    _, truth = dialogue
    turns = dialogue_turns
    assert {x.speaker for x in turns} == {"SPEAKER_00", "SPEAKER_01"}
    assert turns[0].speaker == "SPEAKER_00"  # named by first appearance
    assert all(a.start <= b.start for a, b in zip(turns, turns[1:]))
    # every speaker change lies within 1 s of a true change (the middle of the 0.4 s gap)
    changes = [b.start for a, b in zip(turns, turns[1:]) if a.speaker != b.speaker]
    true_changes = [(a[1] + b[0]) / 2 for a, b in zip(truth, truth[1:])]
    assert len(changes) == len(true_changes)
    for c, t in zip(changes, true_changes):
        assert abs(c - t) <= 1.0, (changes, true_changes)
    # and inside each true turn, one label, the same one for both turns of a speaker
    label = {}
    for s, e, who in truth:
        inside = {_speaker_at(turns, t) for t in np.arange(s + 1.0, e - 1.0, 0.25)} - {None}
        assert len(inside) == 1, (s, e, inside)
        assert label.setdefault(who, inside.pop()) == _speaker_at(turns, (s + e) / 2)
    assert label == {"A": "SPEAKER_00", "B": "SPEAKER_01"}


def test_global_speaker_map_across_chunks(dialogue, dialogue_turns):
    """Diarize once, then slice the turns into 15 s chunks as the transcriber would: a speaker
    keeps its label in every chunk (the map is global, never rebuilt per chunk)."""
    audio, truth = dialogue
    dur = len(audio) / SR
    seen: dict[str, set] = {"A": set(), "B": set()}
    for c0 in np.arange(0, dur, 15.0):
        c1 = min(dur, c0 + 15.0)
        chunk = [Turn(max(t.start, c0), min(t.end, c1), t.speaker)
                 for t in dialogue_turns if t.end > c0 and t.start < c1]
        for s, e, who in truth:
            for t in np.arange(max(s, c0) + 0.5, min(e, c1) - 0.5, 0.5):
                if (sp := _speaker_at(chunk, t)) is not None:
                    seen[who].add(sp)
    assert seen == {"A": {"SPEAKER_00"}, "B": {"SPEAKER_01"}}
    # segments transcribed chunk by chunk get the same names from the one global turn list
    segs = [Segment(s + 1, e - 1, f" turn {i}") for i, (s, e, _) in enumerate(truth)]
    assert [x.speaker for x in assign_speakers(segs, dialogue_turns)] == [
        "SPEAKER_00", "SPEAKER_01", "SPEAKER_00", "SPEAKER_01"]


@pytest.mark.parametrize("chunk", [15, None])
def test_transcribe_labels_words_across_chunks(dialogue, dialogue_turns, tiny, chunk):
    """transcribe(diarize=True) on the real dialogue, chunked (15 s: chunks end inside turns) and
    sequential: the turns are diarize()'s own (the chunker's VAD regions are reused, not redone
    differently), and every word inside a true turn carries that speaker's one label."""
    from murmur.transcribe import transcribe

    audio, truth = dialogue
    r = transcribe(audio, tiny, chunk_size=chunk, diarize=True)
    assert [t.speaker for t in r.turns] == [t.speaker for t in dialogue_turns]
    assert np.allclose([(t.start, t.end) for t in r.turns],
                       [(t.start, t.end) for t in dialogue_turns], atol=1e-3)
    seen: dict[str, set] = {"A": set(), "B": set()}
    for w in (w for seg in r.segments for w in seg.words):
        mid = (w.start + w.end) / 2
        who = [k for s, e, k in truth if s + 0.5 <= mid < e - 0.5]
        if who:
            seen[who[0]].add(w.speaker)
    assert seen == {"A": {"SPEAKER_00"}, "B": {"SPEAKER_01"}}


def test_long_recordings_cluster_a_sample(dialogue, dialogue_turns, monkeypatch):
    """Past MAX_CLUSTER_WINDOWS the clustering takes an even sample and the rest join the nearest
    centroid (bounded memory on hours of audio): on the dialogue, a sample of 20 of its windows
    still finds the two speakers, and labels at least 95 % of the speech as all windows do."""
    audio, _ = dialogue
    monkeypatch.setattr(D, "MAX_CLUSTER_WINDOWS", 20)
    turns = diarize(audio)
    assert {t.speaker for t in turns} == {"SPEAKER_00", "SPEAKER_01"}
    grid = np.arange(0, len(audio) / SR, 0.05)
    same = [_speaker_at(turns, t) == _speaker_at(dialogue_turns, t) for t in grid]
    assert np.mean(same) >= 0.95


def test_bf16_embeddings_match_float(dialogue):
    """The bf16 LSTM (the default where the CPU has bf16) gives the float32 embeddings on real
    speech, to a cosine of 0.99; where the CPU has no bf16, asking for it runs float32."""
    mel = D.mel_frames(dialogue[0])
    spans = [(a, a + 150) for a in range(0, len(mel) - 150, 75)]
    e32, e16 = D.embed_windows(mel, spans, bf16=False), D.embed_windows(mel, spans, bf16=True)
    assert np.allclose(np.linalg.norm(e16, axis=1), 1, atol=1e-5)
    assert (e32 * e16).sum(1).min() > 0.99
    if not native_bf16():
        assert np.array_equal(e32, e16)


def test_no_bf16_lstm_without_native_bf16(dialogue, monkeypatch):
    """A CPU without bf16 (probe forced to AVX2) never runs a bf16 LSTM, even when asked."""
    monkeypatch.setattr(D, "native_bf16", lambda: False)
    mel = D.mel_frames(dialogue[0])
    spans = [(a, a + 150) for a in range(0, 600, 75)]
    assert np.array_equal(D.embed_windows(mel, spans, bf16=True), D.embed_windows(mel, spans, bf16=False))


def test_num_speakers_one_forces_one_label(dialogue):
    turns = diarize(dialogue[0], num_speakers=1)
    assert turns and {x.speaker for x in turns} == {"SPEAKER_00"}
    assert diarize(dialogue[0], max_speakers=1)[0].speaker == "SPEAKER_00"


def test_given_regions_and_num_speakers(dialogue):
    audio, truth = dialogue
    turns = diarize(audio, regions=[(s, e) for s, e, _ in truth], num_speakers=2)
    assert {x.speaker for x in turns} == {"SPEAKER_00", "SPEAKER_01"}
    # no turn outside the given regions
    assert all(any(s - 1e-6 <= x.start and x.end <= e + 1e-6 for s, e, _ in truth) for x in turns)


def test_forced_count_skips_outlier_windows(data_dir):
    """AMI dev01 (two speakers, 9 s and 6 s): num_speakers=2 must find those two, not one
    speaker plus a lone outlier window (a plain 2-cluster cut of the tree did: DER 34 %)."""
    from murmur.audio.decode import load_audio
    from murmur.eval.scoring import der

    ami = data_dir / "ami"
    ref = [(float(f[3]), float(f[3]) + float(f[4]), f[7]) for f in
           (line.split() for line in (ami / "ami30.rttm").read_text().splitlines()) if f[1] == "dev01"]
    audio = load_audio(ami / "dev01.flac")
    forced, auto = diarize(audio, num_speakers=2), diarize(audio)
    assert {t.speaker for t in forced} == {"SPEAKER_00", "SPEAKER_01"}
    assert der(ref, forced)["der"] < 0.15
    assert forced == auto  # the threshold finds the same two here
    three = diarize(audio, min_speakers=3)
    assert len({t.speaker for t in three}) == 3


def test_touching_regions_are_joined():
    assert D._join([(3.0, 4.0), (0.0, 1.0), (1.0, 2.5), (2.5005, 2.8)]) == [(0.0, 2.8), (3.0, 4.0)]


def test_silence_and_noise_give_no_turns():
    assert diarize(np.zeros(10 * SR, np.float32)) == []
    assert diarize(np.zeros(0, np.float32)) == []
    assert diarize(np.zeros(SR, np.float32), regions=[]) == []


def test_bad_arguments():
    with pytest.raises(ValueError):
        diarize(np.zeros(SR, np.float32), num_speakers=0)
    with pytest.raises(ValueError):
        diarize(np.zeros(SR, np.float32), min_speakers=3, max_speakers=2)


def test_encoder_loads_offline_and_matches_resemblyzer_mel(monkeypatch):
    """The GE2E weights come from the installed package; loading opens no socket."""
    def no_network(*a, **k):
        raise AssertionError("the speaker encoder tried to open a socket")

    monkeypatch.setattr(D, "_ENCODER", None)
    monkeypatch.setattr(socket, "socket", no_network)
    enc = D.load_encoder()
    x = np.random.default_rng(0).standard_normal(3 * SR).astype(np.float32) * 0.005  # -46 dBFS: gets raised
    mel = D.mel_frames(x)
    assert mel.shape == (3 * SR // 160 + 1, 40)
    e = D.embed_windows(mel, [(0, 150), (100, 250)])
    assert e.shape == (2, 256) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert enc is D.load_encoder()
    librosa = pytest.importorskip("librosa")
    ref = librosa.feature.melspectrogram(y=x * 10 ** ((-30 - 10 * np.log10(np.mean(x ** 2))) / 20),
                                         sr=SR, n_fft=400, hop_length=160, n_mels=40)
    assert np.allclose(mel.numpy(), ref.T, rtol=1e-4, atol=1e-6 * ref.max())


# --- assign_speakers on hand-made input -------------------------------------------------------

def _w(s, e, text):
    return Word(s, e, text)


TURNS = [Turn(0.0, 2.0, "SPEAKER_00"), Turn(2.0, 4.0, "SPEAKER_01"), Turn(6.0, 8.0, "SPEAKER_00")]


def test_words_take_speaker_of_most_overlap_and_segments_split():
    seg = Segment(0.0, 4.0, " Hello there. General Kenobi.", words=[
        _w(0.0, 0.5, " Hello"), _w(0.6, 1.2, " there."),
        _w(1.8, 2.6, " General"),  # 0.2 s with 00, 0.6 s with 01
        _w(2.7, 3.5, " Kenobi.")], tokens=[1, 2, 3], avg_logprob=-0.2)
    out = assign_speakers([seg], TURNS)
    assert [(s.start, s.end, s.text, s.speaker) for s in out] == [
        (0.0, 1.2, " Hello there.", "SPEAKER_00"), (1.8, 3.5, " General Kenobi.", "SPEAKER_01")]
    assert [w.speaker for w in out[0].words + out[1].words] == ["SPEAKER_00"] * 2 + ["SPEAKER_01"] * 2
    assert out[1].avg_logprob == -0.2 and out[1].tokens == []
    assert seg.speaker is None and seg.words[0].speaker is None  # inputs untouched


def test_unsplit_segment_keeps_its_text_and_times():
    seg = Segment(6.0, 7.9, " One voice.", words=[_w(6.1, 6.5, " One"), _w(6.6, 7.5, " voice.")],
                  tokens=[7, 8])
    (out,) = assign_speakers([seg], TURNS)
    assert (out.start, out.end, out.text, out.speaker, out.tokens) == (
        6.0, 7.9, " One voice.", "SPEAKER_00", [7, 8])


def test_word_without_overlap_takes_nearest_turn():
    seg = Segment(4.2, 5.8, " a b", words=[_w(4.2, 4.4, " a"), _w(5.5, 5.8, " b")])
    out = assign_speakers([seg], TURNS)  # gap 4..6: "a" is nearer turn 2, "b" nearer turn 3
    assert [(s.text, s.speaker) for s in out] == [(" a", "SPEAKER_01"), (" b", "SPEAKER_00")]
    (zero,) = assign_speakers([Segment(3.0, 3.0, " x", words=[_w(3.0, 3.0, " x")])], TURNS)
    assert zero.speaker == "SPEAKER_01"  # a zero-length word inside a turn belongs to it


def test_segments_without_words_and_overlapping_turns():
    turns = [Turn(0.0, 10.0, "SPEAKER_00"), Turn(2.0, 3.0, "SPEAKER_01"),
             Turn(3.5, 4.5, "SPEAKER_01"), Turn(11.0, 12.0, "SPEAKER_01")]
    segs = [Segment(2.0, 4.0, " mostly zero"), Segment(10.2, 10.4, " gap"),
            Segment(11.0, 12.0, " one")]
    out = assign_speakers(segs, turns)
    # 2..4: SPEAKER_00 overlaps 2 s, SPEAKER_01 1.5 s over two turns; 10.2..10.4: nearest is 00
    assert [s.speaker for s in out] == ["SPEAKER_00", "SPEAKER_00", "SPEAKER_01"]
    assert assign_speakers(segs, []) == segs
    assert assign_speakers([], turns) == []


def test_auto_threads_follow_idle_cores(monkeypatch):
    """threads="auto": the process's torch threads, capped at the cores other programs leave idle."""
    import psutil
    import torch

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    for load, want in (([3.0, 5.0], 2), ([100.0, 4.0], 1), ([97.0, 99.0], 1), ([1.0] * 8, 2)):
        monkeypatch.setattr(psutil, "cpu_percent", lambda interval=None, percpu=False, v=load: v)
        assert D.idle_threads() == want
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert D.idle_threads() == 1
