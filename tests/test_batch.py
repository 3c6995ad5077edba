"""murmur batch, local path: inputs, bad items, summary, reruns; a silent recording scores in meeteval."""
import json
import wave

import numpy as np
import pytest

from murmur.distributed.inputs import expand
from murmur.distributed.job import OutputDir, run_local


def _silent(path, seconds=4.0):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(np.zeros(int(16000 * seconds), np.int16).tobytes())
    return path


def _summary(out):
    return [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]


def test_inputs_folders_manifests_and_bad_lines(tmp_path, data_dir):
    m = tmp_path / "m.jsonl"
    m.write_text("\n".join([
        json.dumps({"audio": str(data_dir / "jfk" / "jfk.flac"), "id": "kennedy", "word_timestamps": True}),
        json.dumps({"audio": "x.wav", "beam_sise": 2}),  # typo: an error, never run with defaults
        "{not json",
        json.dumps({"audio": str(data_dir / "jfk" / "jfk.flac")}),
        json.dumps({"audio": str(data_dir / "jfk" / "jfk.flac")}),  # same id twice
    ]) + "\n")
    items = expand([str(data_dir / "sonnets"), str(m), str(tmp_path / "missing.wav")])
    by = {it.id: it for it in items}
    assert {"p001", "p002", "p003", "kennedy", "jfk", "missing"} <= set(by)
    assert by["kennedy"].options == {"word_timestamps": True} and by["kennedy"].error is None
    errors = [it.error for it in items if it.error]
    assert any("unknown option 'beam_sise'" in e for e in errors)
    assert any("not JSON" in e for e in errors)
    assert any("duplicate id 'jfk'" in e for e in errors)
    assert by["missing"].error is None  # decoding reports it, per item
    assert len({it.id for it in items}) == len(items)


def test_local_batch_bad_items_rerun_and_silent_seglst_in_meeteval(tmp_path, data_dir, tiny):
    import meeteval.io
    import meeteval.wer
    jfk = data_dir / "jfk" / "jfk.flac"
    silent = _silent(tmp_path / "silent.wav")
    (tmp_path / "bad.wav").write_text("not audio")
    (tmp_path / "empty.wav").write_bytes(b"")
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"audio": str(jfk), "id": "jfk-words", "word_timestamps": True}) + "\n")
    inputs = [str(jfk), str(silent), str(tmp_path / "missing.wav"), str(tmp_path / "bad.wav"),
              str(tmp_path / "empty.wav"), str(m)]
    out = tmp_path / "out"
    from murmur.options import TranscribeOptions
    o = TranscribeOptions()
    counts = run_local(expand(inputs), OutputDir(out, ["txt", "json", "seglst"]), tiny, o, progress=False)
    assert counts == {"ok": 3, "error": 3, "skipped": 0}
    lines = {x["id"]: x for x in _summary(out)}
    assert [x["id"] for x in _summary(out)] == ["jfk", "silent", "missing", "bad", "empty", "jfk-words"]
    assert "not found" in lines["missing"]["error"] and "empty" in lines["empty"]["error"]
    assert "not a readable audio file" in lines["bad"]["error"]
    assert lines["jfk"]["words"] > 15 and lines["silent"]["words"] == 0 and lines["jfk"]["duration"] == 11.0
    # the manifest's per-item option reached that item only
    assert "words" in json.loads((out / "jfk-words.json").read_text())["segments"][0]
    assert "words" not in json.loads((out / "jfk.json").read_text())["segments"][0]
    assert not list(out.glob(".*tmp"))

    # the silent recording names its session, so meeteval scores the whole batch
    silent_entries = json.loads((out / "silent.seglst").read_text())
    assert silent_entries == [{"session_id": "silent", "speaker": "spk0", "start_time": 0.0, "end_time": 0.0,
                               "words": ""}]
    hyp = meeteval.io.SegLST([e for f in ("jfk", "silent") for e in json.loads((out / f"{f}.seglst").read_text())])
    words = (data_dir / "jfk" / "jfk.txt").read_text()
    from murmur.eval.scoring import normalize
    ref = meeteval.io.SegLST([
        {"session_id": "jfk", "speaker": "A", "start_time": 0.0, "end_time": 11.0, "words": normalize(words)},
        {"session_id": "silent", "speaker": "A", "start_time": 0.0, "end_time": 0.0, "words": ""}])
    hyp = hyp.map(lambda e: {**e, "words": normalize(e["words"])})
    res = meeteval.wer.cpwer(ref, hyp)
    assert set(res) == {"jfk", "silent"} and res["silent"].errors == 0
    assert res["jfk"].error_rate < 0.2

    # rerun: nothing redone; a recording missing an output is redone, alone
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "summary.jsonl"}
    counts = run_local(expand(inputs), OutputDir(out, ["txt", "json", "seglst"]), tiny, o, progress=False)
    assert counts == {"ok": 0, "error": 3, "skipped": 3}
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "summary.jsonl"} == before
    (out / "jfk.json").unlink()
    counts = run_local(expand(inputs), OutputDir(out, ["txt", "json", "seglst"]), tiny, o, progress=False)
    assert counts == {"ok": 1, "error": 3, "skipped": 2}
    assert (out / "jfk.json").exists() and (out / "silent.txt").stat().st_mtime_ns == before["silent.txt"]
    assert [x["id"] for x in _summary(out)] == ["jfk", "silent", "missing", "bad", "empty", "jfk-words"]
    assert {x["id"]: x["status"] for x in _summary(out)}["silent"] == "skipped"


def test_batch_cli_help_and_bad_format(capsys):
    from murmur.cli import main
    with pytest.raises(SystemExit):
        main(["batch", "--help"])
    assert "--ray" in capsys.readouterr().out
    assert main(["batch", "x.wav", "--out", "/tmp/never", "-f", "txt,docx"]) == 1
    assert "unknown output format docx" in capsys.readouterr().err


def test_local_batch_decodes_recordings_together_as_transcribe_does(tmp_path, data_dir, tiny, monkeypatch):
    """Many recordings share the engine's rows; each output is still `murmur transcribe`'s (a timestamp
    may move 40 ms when other windows join the rows mid-decode, see tests/test_batch_ray.py), and a
    manifest item's diarization runs over its whole recording."""
    from murmur.distributed import workers
    from murmur.options import TranscribeOptions
    from murmur.output import writers
    from murmur.transcribe import transcribe
    clips = sorted((data_dir / "ljspeech").glob("LJ001-*.flac"))[:8]
    ami = data_dir / "ami" / "dev00.flac"
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"audio": str(ami), "diarize": True}) + "\n")
    rows = []
    close = workers.Transcriber.close

    def seen(self):  # the engine's mean busy rows a step, read before it stops
        st = self.engine_stats()
        rows.append(st["row_steps"] / max(st["steps"], 1))
        close(self)

    monkeypatch.setattr(workers.Transcriber, "close", seen)
    out = tmp_path / "out"
    counts = run_local(expand([str(c) for c in clips] + [str(m)]), OutputDir(out, ["json", "rttm"]), tiny,
                       TranscribeOptions(), progress=False)
    assert counts == {"ok": 9, "error": 0, "skipped": 0}
    assert rows and rows[0] > 2  # the clips' windows decoded side by side, not one after another
    for c in clips:
        want = json.loads(writers.render(transcribe(c, model=tiny), "json"))["segments"]
        got = json.loads((out / f"{c.stem}.json").read_text())["segments"]
        assert [s["text"] for s in got] == [s["text"] for s in want], c.stem
        assert all(abs(a[k] - b[k]) <= 0.1 for a, b in zip(got, want) for k in ("start", "end"))
    here = transcribe(ami, model=tiny, diarize=True)
    assert (out / "dev00.rttm").read_text() == writers.render(here, "rttm")
    assert json.loads((out / "dev00.json").read_text())["text"] == here.text


def test_local_batch_interrupted_stops_at_once_and_a_rerun_finishes(tmp_path, data_dir, tiny, monkeypatch):
    """Ctrl-C while recordings are in flight: the threads waiting on the engine return at once, what
    was written is complete, and a rerun does the rest."""
    from murmur.distributed import job
    from murmur.options import TranscribeOptions
    clips = sorted((data_dir / "ljspeech").glob("LJ001-*.flac"))[:6]
    report = job._report
    seen = []

    def interrupt(out, bar, counts, line):
        report(out, bar, counts, line)
        seen.append(line["id"])
        if len(seen) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(job, "_report", interrupt)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_local(expand([str(c) for c in clips]), OutputDir(out, ["txt"]), tiny, TranscribeOptions(), progress=False)
    monkeypatch.setattr(job, "_report", report)
    assert {x["id"] for x in _summary(out) if x["status"] == "ok"} >= set(seen)
    counts = run_local(expand([str(c) for c in clips]), OutputDir(out, ["txt"]), tiny, TranscribeOptions(),
                       progress=False)
    assert counts["ok"] + counts["skipped"] == 6 and counts["error"] == 0 and counts["skipped"] >= 2
    assert sorted(p.stem for p in out.glob("*.txt")) == sorted(c.stem for c in clips)


def test_groups_of_a_recording_detect_its_language_once(data_dir, monkeypatch):
    """On a multilingual model a recording's chunk groups, decoded at once as on Ray, share one
    language detection (each group ran the encoder on the same first 30 s before), and the text is
    `murmur transcribe`'s."""
    import importlib
    from concurrent.futures import ThreadPoolExecutor

    from murmur.distributed.workers import Transcriber, plan_recording
    from murmur.models.loading import get_model
    from murmur.options import TranscribeOptions
    tr = importlib.import_module("murmur.transcribe")  # the module: murmur.transcribe is also the function
    base = get_model("base")
    o = TranscribeOptions(chunk_size=5).with_(progress=False)
    jfk = str(data_dir / "jfk" / "jfk.flac")
    meta, data, _ = plan_recording(jfk, o, 1)
    assert meta["groups"] >= 2
    calls = []
    detect = tr.detect_language
    monkeypatch.setattr(tr, "detect_language", lambda *a: calls.append(1) or detect(*a))
    worker = Transcriber(base)
    try:
        with ThreadPoolExecutor(meta["groups"]) as pool:
            parts = list(pool.map(lambda gi: worker.transcribe(data, gi, o), range(meta["groups"])))
    finally:
        worker.close()
    assert len(calls) == 1
    assert {p[3] for p in parts} == {"en"}
    text = "".join(s.text for p in parts for segs in p[0] for s in segs).strip()
    monkeypatch.setattr(tr, "detect_language", detect)
    assert text == tr.transcribe(jfk, model=base, chunk_size=5).text
