import io
import json

import pytest

from murmur.errors import MurmurError
from murmur.output import writers
from murmur.types import Segment, Transcript, Turn, Word


def make(speakers=("SPEAKER_00", "SPEAKER_01"), turns=False, source="/x/meeting one.flac"):
    segs = [
        Segment(0.0, 1.5, " Hello there.", speaker=speakers[0],
                words=[Word(0.0, 0.5, " Hello", 0.9, speakers[0]), Word(0.5, 1.5, " there.", 0.8, speakers[0])]),
        Segment(3661.5, 3663.25, " General\nKenobi!", speaker=speakers[1]),
    ]
    t = Transcript(text="Hello there. General Kenobi!", duration=3663.25, model="base", segments=segs,
                   language="en", source=source)
    if turns:
        t.turns = [Turn(0.0, 2.0, "A"), Turn(3661.0, 3664.0, "B")]
    return t


def test_timestamps():
    assert writers.timestamp(3661.5) == "01:01:01,500"
    assert writers.timestamp(3661.5, ".") == "01:01:01.500"
    assert writers.timestamp(0) == "00:00:00,000"
    assert writers.timestamp(1.9996) == "00:00:02,000"  # rounds once, never "00:00:01,1000"
    assert writers.timestamp(-0.01) == "00:00:00,000"


def test_srt_with_speakers():
    assert writers.render(make(), "srt") == (
        "1\n00:00:00,000 --> 00:00:01,500\n[SPEAKER_00] Hello there.\n\n"
        "2\n01:01:01,500 --> 01:01:03,250\n[SPEAKER_01] General Kenobi!\n"
    )


def test_vtt_without_speakers_skips_empty_cues():
    t = make(speakers=(None, None))
    t.segments.append(Segment(4000.0, 4001.0, "  "))
    assert writers.render(t, "vtt") == (
        "WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello there.\n\n"
        "01:01:01.500 --> 01:01:03.250\nGeneral Kenobi!\n"
    )


def test_txt():
    assert writers.render(make(), "txt") == "[SPEAKER_00] Hello there.\n[SPEAKER_01] General Kenobi!\n"
    assert writers.render(make(speakers=(None, None)), "txt") == "Hello there.\nGeneral Kenobi!\n"


def test_json_is_to_dict():
    t = make()
    assert json.loads(writers.render(t, "json")) == t.to_dict()
    assert "Kenobi" in writers.render(t, "json")


def test_seglst_loads_in_meeteval():
    import meeteval.io
    import meeteval.wer

    t = make(speakers=("SPEAKER_00", None))
    data = json.loads(writers.render(t, "seglst"))
    assert data == [
        {"session_id": "meeting one", "speaker": "SPEAKER_00", "start_time": 0.0, "end_time": 1.5,
         "words": "Hello there."},
        {"session_id": "meeting one", "speaker": "spk0", "start_time": 3661.5, "end_time": 3663.25,
         "words": "General Kenobi!"},
    ]
    s = meeteval.io.SegLST(data)
    assert meeteval.wer.cpwer(s, s)["meeting one"].errors == 0
    assert json.loads(writers.render(make(source=None), "seglst"))[0]["session_id"] == "session"


def test_stm_and_rttm():
    assert writers.render(make(), "stm") == (
        "meeting_one 1 SPEAKER_00 0.000 1.500 Hello there.\n"
        "meeting_one 1 SPEAKER_01 3661.500 3663.250 General Kenobi!\n"
    )
    assert writers.render(make(), "rttm") == (
        "SPEAKER meeting_one 1 0.000 1.500 <NA> <NA> SPEAKER_00 <NA> <NA>\n"
        "SPEAKER meeting_one 1 3661.500 1.750 <NA> <NA> SPEAKER_01 <NA> <NA>\n"
    )
    # diarization turns win over segments
    assert writers.render(make(turns=True), "rttm").splitlines()[1] == \
        "SPEAKER meeting_one 1 3661.000 3.000 <NA> <NA> B <NA> <NA>"
    assert writers.render(make(speakers=(None, None)), "rttm") == ""


def test_written_files_read_back(tmp_path):
    from murmur.eval import scoring

    t = make()
    for fmt in ("seglst", "stm", "rttm"):
        path = tmp_path / f"out.{'json' if fmt == 'seglst' else fmt}"
        writers.write_file(t, fmt, path)
        got = scoring.read_any(path)
        assert [(e["start_time"], e["end_time"]) for e in got] == [(0.0, 1.5), (3661.5, 3663.25)]
        assert {e["speaker"] for e in got} == {"SPEAKER_00", "SPEAKER_01"}


def test_write_and_stdout(tmp_path, capsys):
    buf = io.StringIO()
    writers.write(make(), "txt", buf)
    assert buf.getvalue() == writers.render(make(), "txt")
    writers.write_file(make(), "srt", "-")
    assert capsys.readouterr().out == writers.render(make(), "srt")
    writers.write_file(make(), "vtt", tmp_path / "a.vtt")
    assert (tmp_path / "a.vtt").read_text(encoding="utf-8").startswith("WEBVTT\n")
    assert set(writers.FORMATS) == {"txt", "json", "srt", "vtt", "seglst", "stm", "rttm"}


def test_unknown_format(tmp_path):
    with pytest.raises(MurmurError, match="docx"):
        writers.write_file(make(), "docx", tmp_path / "x.docx")
    assert not (tmp_path / "x.docx").exists()
