import argparse
import json
from pathlib import Path

import pytest

from murmur.errors import ReferenceError_
from murmur.eval import cli as cli_eval, scoring
from murmur.types import Turn

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
AMI = DATA / "ami"
SESSIONS = {"dev00", "dev01", "tst00", "tst01", *(f"trn0{i}" for i in range(1, 10))}
needs_ami = pytest.mark.skipif(not AMI.is_dir(), reason=f"shared data not found at {AMI}")


def seg(sid, spk, start, end, words):
    return {"session_id": sid, "speaker": spk, "start_time": start, "end_time": end, "words": words}


def meeteval_seglst(entries):
    import meeteval.io
    return meeteval.io.SegLST([{**e, "words": scoring.normalize(e["words"])} for e in entries])


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------ WER

def test_normalize():
    assert scoring.normalize("Hello, World!  Um, Mr. Smith") == "hello world mister smith"


def test_wer_hand_made_and_meeteval_agree():
    from meeteval.wer.wer.siso import siso_word_error_rate

    ref, hyp = "The cat sat on the mat.", "the cat SIT on mat, please"
    # sat->sit (sub), second "the" (del), "please" (ins): 3 errors over 6 words
    assert scoring.wer(ref, hyp) == {"wer": 0.5, "errors": 3, "length": 6, "ins": 1, "dele": 1, "sub": 1}
    direct = siso_word_error_rate(scoring.normalize(ref), scoring.normalize(hyp))
    assert (direct.errors, direct.length) == (3, 6)
    assert scoring.wer("Mr. Smith, um, paid $10", "mister smith paid ten dollars")["errors"] == 0
    assert scoring.wer("", "")["wer"] is None


# ---------------------------------------------------------- cpWER / tcpWER

REF = [seg("s", "A", 0, 3, "a b c"), seg("s", "B", 4, 6, "d e")]


def test_cpwer_swapped_labels_is_zero():
    hyp = [seg("s", "B", 0, 3, "A b c."), seg("s", "A", 4, 6, "d, e")]
    r = scoring.cpwer(REF, hyp)
    assert r["wer"] == 0 and r["sessions"]["s"]["errors"] == 0


def test_cpwer_hand_made_and_meeteval_agree():
    import meeteval.wer

    hyp = [seg("s", "X", 0, 3, "a b"), seg("s", "Y", 4, 6, "d e f")]
    r = scoring.cpwer(REF, hyp)
    # A<->X loses "c" (del), B<->Y gains "f" (ins): 2 errors over 5 words
    assert (r["errors"], r["length"], r["ins"], r["dele"], r["sub"]) == (2, 5, 1, 1, 0)
    direct = meeteval.wer.cpwer(meeteval_seglst(REF), meeteval_seglst(hyp))["s"]
    assert (direct.errors, direct.length) == (r["errors"], r["length"])


def test_tcpwer_collar():
    ref = [seg("s", "A", 0, 1, "hello")]
    near = scoring.tcpwer(ref, [seg("s", "Z", 1, 2, "hello")], collar=5)
    far = scoring.tcpwer(ref, [seg("s", "Z", 10, 11, "hello")], collar=5)
    assert near["errors"] == 0
    assert (far["errors"], far["ins"], far["dele"]) == (2, 1, 1)  # too far: a deletion plus an insertion
    assert scoring.cpwer(ref, [seg("s", "Z", 10, 11, "hello")])["errors"] == 0  # cpWER ignores time


def test_missing_hypothesis_session_counts_as_deletions():
    ref = REF + [seg("t", "A", 0, 1, "x y")]
    r = scoring.cpwer(ref, [seg("s", "A", 0, 3, "a b c"), seg("s", "B", 4, 6, "d e")])
    assert r["sessions"]["t"]["dele"] == 2 and r["errors"] == 2
    with pytest.raises(ReferenceError_, match="zzz"):
        scoring.cpwer(REF, [seg("zzz", "A", 0, 1, "a")])


# ------------------------------------------------------------------- DER

def test_der_collar_is_per_side():
    from pyannote.core import Annotation, Segment, Timeline
    from pyannote.metrics.diarization import DiarizationErrorRate

    ref = [Turn(0, 10, "A"), Turn(10, 20, "B")]
    hyp = [Turn(0, 12, "x"), Turn(12, 20, "y")]
    assert scoring.der(ref, hyp, collar=0)["der"] == pytest.approx(2 / 20)
    # +-0.25 s around 0, 10 and 20 leaves 19 s scored; 10.25..12 is confused
    got = scoring.der(ref, hyp, collar=0.25)
    assert got["total"] == pytest.approx(19) and got["der"] == pytest.approx(1.75 / 19)
    # the same number from pyannote called directly, whose collar is the full width
    r, h = Annotation(), Annotation()
    for ann, turns in ((r, ref), (h, hyp)):
        for t in turns:
            ann[Segment(t.start, t.end)] = t.speaker
    direct = DiarizationErrorRate(collar=0.5)(r, h, uem=Timeline([Segment(0, 20)]))
    assert got["der"] == pytest.approx(direct)
    assert scoring.der(ref, ref)["der"] == 0


# --------------------------------------------------------------- readers

@needs_ami
def test_read_real_ami():
    seglst = scoring.read_any(AMI / "ami30.seglst.json")
    stm = scoring.read_any(AMI / "ami30.stm")
    rttm = scoring.read_any(AMI / "ami30.rttm")
    for entries in (seglst, stm, rttm):
        assert {e["session_id"] for e in entries} == SESSIONS
        assert all(e["end_time"] >= e["start_time"] for e in entries)
    assert sorted((e["session_id"], e["start_time"], e["speaker"], e["words"]) for e in stm) == \
        sorted((e["session_id"], e["start_time"], e["speaker"], e["words"]) for e in seglst)
    assert rttm[0] == seg("dev00", "MEE009", 1.44, 1.44 + 11.872, "")


def test_reads_plain_text_and_sniffs_content(tmp_path):
    assert scoring.read_any(write(tmp_path / "a.txt", "Hello\nworld \n")) == \
        [seg("a", None, None, None, "Hello world")]
    assert scoring.read_any(write(tmp_path / "b.ref", "x 1 A 0.5 1 <o,f0,male> hi there\n"))[0] == \
        seg("x", "A", 0.5, 1.0, "hi there")
    assert scoring.read_any(write(tmp_path / "c", "SPEAKER x 1 0 2 <NA> <NA> A <NA> <NA>\n"))[0]["end_time"] == 2


@pytest.mark.parametrize("name,text,match", [
    ("bad.json", '[{"session_id": "a",\n "words": }]', r"bad\.json:2: bad JSON"),
    ("key.json", '[{"session_id": "a", "speaker": "A", "start_time": 0, "end_time": 1}]', r"key\.json:entry 0: .*words"),
    ("time.json", '[{"session_id": "a", "words": "x", "start_time": "soon", "end_time": 1}]', "not a number"),
    ("short.stm", "a 1 A 0 1 fine\na 1 A 2\n", r"short\.stm:2: .*5 fields"),
    ("order.stm", "a 1 A 3 1 backwards\n", r"order\.stm:1: end 1.0 is before start 3.0"),
    ("neg.rttm", "SPEAKER a 1 0 1 <NA> <NA> A <NA> <NA>\nSPEAKER a 1 5 -1 <NA> <NA> A <NA> <NA>\n",
     r"neg\.rttm:2: negative duration"),
    ("cols.rttm", "SPEAKER a 1 0 1 A\n", r"cols\.rttm:1: .*10 fields"),
])
def test_malformed_files_name_file_and_line(tmp_path, name, text, match):
    with pytest.raises(ReferenceError_, match=match):
        scoring.read_any(write(tmp_path / name, text))


def test_missing_file(tmp_path):
    with pytest.raises(ReferenceError_, match="nope.stm"):
        scoring.read_any(tmp_path / "nope.stm")


# ------------------------------------------------------------- evaluate

@needs_ami
@pytest.mark.parametrize("hyp,ref", [("ami30.seglst.json", "ami30.seglst.json"), ("ami30.stm", "ami30.seglst.json"),
                                     ("ami30.rttm", "ami30.rttm")])
def test_reference_against_itself_scores_zero(hyp, ref):
    res = scoring.evaluate(AMI / hyp, AMI / ref)
    assert set(res["sessions"]) == SESSIONS
    o = res["overall"]
    if ref.endswith(".rttm"):
        assert o["wer"] is None and o["cpwer"] is None
    else:
        assert o["wer"]["wer"] == o["cpwer"]["wer"] == o["tcpwer"]["wer"] == 0
        assert o["wer"]["length"] > 700
    assert o["der"]["der"] == 0 and o["der"]["total"] > 100
    assert res["sessions"]["tst00"]["ref_speakers"] == res["sessions"]["tst00"]["hyp_speakers"] == 4


@needs_ami
def test_evaluate_agrees_with_meeteval_on_a_damaged_hypothesis(tmp_path):
    import meeteval.wer

    ref = scoring.read_any(AMI / "ami30.seglst.json")
    hyp = []
    for i, e in enumerate(ref):
        words = e["words"].split()
        # drop every 3rd segment's last word, merge two speakers' labels, shift some segments by 7 s
        hyp.append({**e, "words": " ".join(words[:-1] if i % 3 == 0 else words),
                    "speaker": "MERGED" if e["speaker"] in ("MEE009", "MEE012") else e["speaker"],
                    "start_time": e["start_time"] + (7 if i % 4 == 0 else 0),
                    "end_time": e["end_time"] + (7 if i % 4 == 0 else 0)})
    res = scoring.evaluate(write(tmp_path / "hyp.json", json.dumps(hyp)), AMI / "ami30.seglst.json")
    cp = sum(meeteval.wer.cpwer(meeteval_seglst(ref), meeteval_seglst(hyp)).values())
    tcp = sum(meeteval.wer.tcpwer(meeteval_seglst(ref), meeteval_seglst(hyp), collar=5).values())
    o = res["overall"]
    assert (o["cpwer"]["errors"], o["cpwer"]["length"]) == (cp.errors, cp.length)
    assert (o["tcpwer"]["errors"], o["tcpwer"]["length"]) == (tcp.errors, tcp.length)
    assert 0 < o["cpwer"]["wer"] < o["tcpwer"]["wer"]  # shifted words cost more under a time constraint
    assert o["wer"]["dele"] > 0 and o["der"]["der"] > 0


def test_evaluate_single_session_text_files(tmp_path):
    res = scoring.evaluate(write(tmp_path / "clip.txt", "the cat sat"), write(tmp_path / "ref.txt", "The cat sat down."))
    assert list(res["sessions"]) == ["ref"]  # one session each: matched whatever the names
    assert res["overall"]["wer"]["errors"] == 1
    assert res["overall"]["cpwer"] is None and res["overall"]["der"] is None
    table = scoring.format_table(res)
    assert "ref" in table and "25.0%" in table


@needs_ami
def test_cli_eval_json(capsys):
    parser = argparse.ArgumentParser()
    cli_eval.add_parser(parser.add_subparsers())
    args = parser.parse_args(["eval", str(AMI / "ami30.stm"), str(AMI / "ami30.seglst.json"), "--json",
                              "--collar", "2", "--der-collar", "0"])
    assert cli_eval.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["collar"] == 2 and out["der_collar"] == 0 and out["overall"]["cpwer"]["wer"] == 0
    args = parser.parse_args(["eval", str(AMI / "ami30.stm"), str(AMI / "ami30.seglst.json")])
    cli_eval.run(args)
    assert "overall" in capsys.readouterr().out


@needs_ami
def test_murmur_json_output_against_multi_session_reference(tmp_path):
    from murmur.output import writers
    from murmur.types import Segment, Transcript

    ref = [e for e in scoring.read_any(AMI / "ami30.seglst.json") if e["session_id"] == "dev00"]
    t = Transcript(text="", duration=30.0, model="m", source="/clips/dev00.flac", segments=[
        Segment(e["start_time"], e["end_time"], e["words"], speaker=f"S{e['speaker']}") for e in ref])
    writers.write_file(t, "json", tmp_path / "dev00.json")
    full = scoring.evaluate(tmp_path / "dev00.json", AMI / "ami30.seglst.json")
    assert full["sessions"]["dev00"]["cpwer"]["wer"] == 0
    assert full["sessions"]["dev01"]["wer"]["wer"] == 1  # missing from the hypothesis: all deleted
    part = scoring.evaluate(tmp_path / "dev00.json", AMI / "ami30.seglst.json", partial=True)
    assert list(part["sessions"]) == ["dev00"]
    o = part["overall"]
    assert o["wer"]["wer"] == o["cpwer"]["wer"] == o["tcpwer"]["wer"] == o["der"]["der"] == 0
