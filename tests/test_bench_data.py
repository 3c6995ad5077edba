"""Benchmark material and plotting helpers (no faster-whisper here: bench-only extra)."""
import json

import numpy as np
import pytest

from murmur.eval.bench import dataset
from murmur.eval.bench.plot import pareto_front, plot_accuracy_latency, write_csv, write_json

SR = dataset.SAMPLE_RATE

try:
    dataset.data_dir()
    HAVE_DATA = True
except FileNotFoundError:
    HAVE_DATA = False

needs_data = pytest.mark.skipif(not HAVE_DATA, reason="../shared/data not present")


@pytest.fixture(scope="module")
def parts():
    return dict(ljspeech=dataset.ljspeech_items(), ami=dataset.ami_items(),
                ted=[dataset.ted_item()], sonnets=dataset.sonnet_items())


@needs_data
def test_items_basic(parts):
    assert len(parts["ljspeech"]) == 32
    assert len(parts["ami"]) == 13
    assert len(parts["sonnets"]) == 3
    for items in parts.values():
        for it in items:
            assert it.audio.dtype == np.float32 and it.audio.ndim == 1
            assert it.duration == pytest.approx(len(it.audio) / SR)
            assert it.reference.strip()
    ami = parts["ami"]
    assert all(abs(it.duration - 30) < 0.5 for it in ami)
    for it in ami:
        starts = [s["start_time"] for s in it.ref_segments]
        assert starts == sorted(starts)
        assert it.reference == " ".join(s["words"] for s in it.ref_segments)
    jfk = dataset.jfk_item()
    assert 10 < jfk.duration < 12 and "ask not" in jfk.reference


@needs_data
def test_stitched_duration_reference_and_offsets(parts):
    gap = 1.0
    st = dataset.stitched(gap_s=gap)
    clips = [it for p in ("ljspeech", "ami", "ted", "sonnets") for it in parts[p]]
    n = len(clips)
    assert n == 49
    expect = sum(len(c.audio) for c in clips) + (n - 1) * int(gap * SR)
    assert len(st.audio) == expect
    assert st.duration == pytest.approx(expect / SR)
    assert st.reference == " ".join(c.reference for c in clips)
    # the parts appear in the fixed order
    pos = [st.reference.index(parts[p][0].reference[:40])
           for p in ("ljspeech", "ami", "ted", "sonnets")]
    assert pos == sorted(pos)
    assert [c["name"] for c in st.clips] == [c.name for c in clips]

    # AMI times shifted by the clip offsets, speakers prefixed by session
    lj = sum(c.duration for c in parts["ljspeech"]) + len(parts["ljspeech"]) * gap
    a0, a1 = parts["ami"][0], parts["ami"][1]
    segs = st.ref_segments
    assert len(segs) == sum(len(c.ref_segments) for c in parts["ami"])
    first = [s for s in segs if s["speaker"].startswith(a0.name + "_")]
    second = [s for s in segs if s["speaker"].startswith(a1.name + "_")]
    assert first[0]["start_time"] == pytest.approx(a0.ref_segments[0]["start_time"] + lj, abs=2e-3)
    off1 = lj + a0.duration + gap
    assert min(s["start_time"] for s in second) >= off1 - 1e-3
    assert second[0]["start_time"] == pytest.approx(a1.ref_segments[0]["start_time"] + off1, abs=2e-3)
    assert {s["session_id"] for s in segs} == {st.name}
    # the audio at a clip's recorded offset is that clip
    c = st.clips[33]
    i = int(round(c["start"] * SR))
    np.testing.assert_array_equal(st.audio[i:i + SR], a1.audio[:SR])


@needs_data
def test_stitched_repeat_and_ami_only():
    one = dataset.stitched(parts=("ami", "ted"), gap_s=0.5)
    two = dataset.stitched(parts=("ami", "ted"), gap_s=0.5, repeat=2)
    # a gap also separates the loops
    assert len(two.audio) == 2 * len(one.audio) + int(0.5 * SR)
    assert two.reference == one.reference + " " + one.reference
    assert len(two.ref_segments) == 2 * len(one.ref_segments)
    loop = one.duration + 0.5
    assert two.ref_segments[len(one.ref_segments)]["start_time"] == pytest.approx(
        one.ref_segments[0]["start_time"] + loop, abs=2e-3)

    ami = dataset.stitched_ami()
    assert ami.duration == pytest.approx(13 * 30 + 12 * 1.0, abs=0.5) and len(ami.clips) == 13
    assert {s["session_id"] for s in ami.ref_segments} == {"stitched_ami"}
    with pytest.raises(ValueError):
        dataset.stitched(parts=("nope",))


def test_data_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MURMUR_DATA", str(tmp_path))
    assert dataset.data_dir() == tmp_path.resolve()


def test_pareto_front():
    pts = [(10, 0.20), (5, 0.30), (20, 0.10), (12, 0.25), (5, 0.35), (30, 0.10), (1, 0.9)]
    # (12,.25) dominated by (10,.20); (5,.35) by (5,.30); (30,.10) by (20,.10)
    assert pareto_front(pts) == [6, 1, 0, 2]
    assert pareto_front([]) == []
    assert pareto_front([(1, 1), (1, 1)]) == [0, 1]


def test_plot_and_dumps(tmp_path):
    rows = [dict(name="a", wer=12.0, wall_s=30.0, kind="murmur"),
            dict(name="b", wer=10.0, wall_s=60.0, kind="murmur"),
            dict(name="fw seq", wer=11.0, wall_s=90.0, kind="peer", segments=[{"x": 1}]),
            dict(name="fw batched", wer=15.0, wall_s=20.0, kind="peer")]
    png = plot_accuracy_latency(rows, tmp_path / "f" / "plot.png")
    data = png.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    csv_text = write_csv(rows, tmp_path / "rows.csv").read_text()
    assert csv_text.splitlines()[0].split(",") == ["name", "wer", "wall_s", "kind"]
    assert len(csv_text.splitlines()) == 5
    back = json.loads(write_json(rows, tmp_path / "rows.json").read_text())
    assert back[2]["segments"] == [{"x": 1}]
