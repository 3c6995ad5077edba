"""The long-form engine: chunk streams, continuous batching and the stitcher, on real speech."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

import murmur
from murmur.audio.decode import SAMPLE_RATE
from murmur.engine.decoding import DecodingOptions
from murmur.engine.longform import ChunkStream
from murmur.engine.runner import Engine
from murmur.engine.scheduler import StreamScheduler
from murmur.eval.bench import dataset
from murmur.transcribe import plan_chunks


@pytest.fixture(scope="module")
def recording():
    """Three talkative AMI clips and six LJSpeech sentences back to back with 1-s gaps: about 2.2 min."""
    ami = {it.name: it for it in dataset.ami_items()}
    items = [ami[k] for k in ("dev00", "dev01", "tst00")] + dataset.ljspeech_items()[:6]
    gap = np.zeros(SAMPLE_RATE, dtype=np.float32)
    return np.concatenate([x for it in items for x in (it.audio, gap)])


class CountingScheduler(StreamScheduler):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.decoded = Counter()

    def complete(self, req):
        self.decoded[(req.owner.index, req.owner.seek, req.tag["t_index"], req.tag["prompted"])] += 1
        super().complete(req)


def _run(tiny, plans, batch_size):
    tok = tiny.tokenizer
    opts = DecodingOptions(language="en")
    streams = [ChunkStream(p.pieces, tok, opts, p.time_map, index=i, language="en") for i, p in enumerate(plans)]
    engine = Engine(tiny, opts, batch_size=batch_size)
    sched = CountingScheduler(streams, max_open=2 * batch_size)
    engine.run(sched)
    return streams, sched, engine


def test_scheduler_decodes_every_window_once_and_matches_chunks_alone(tiny, recording):
    # 20-s chunks: eight of them for four rows, so later windows must join rows mid-decode (at 30 s,
    # five chunks, a fallback that takes every row can leave each later admission an empty batch)
    plans, _ = plan_chunks(recording, 20.0)
    assert len(plans) >= 6
    streams, sched, engine = _run(tiny, plans, batch_size=4)
    # every (chunk, seek, temperature) window is decoded exactly once, and each stream finished
    assert set(sched.decoded.values()) == {1}
    assert sum(s.windows + s.fallbacks + s.echo_retries for s in streams) == len(sched.decoded)
    assert all(s.done for s in streams)
    # continuous batching: rows ran side by side, and a window joined rows that were mid-decode
    assert engine.stats["row_steps"] / engine.stats["steps"] > 3
    assert engine.stats["joined_running"] >= 1
    # the same chunks decoded one at a time give the same text
    for p, s in zip(plans, streams):
        alone, _, _ = _run(tiny, [p], batch_size=1)
        assert [x.text for x in alone[0].segments] == [x.text for x in s.segments]


def test_full_chunk_is_sequential_mode(tiny, recording):
    seq = murmur.transcribe(recording, tiny, chunk_size=None)
    full = murmur.transcribe(recording, tiny, chunk_size="full", batch_size=16)
    assert full.text == seq.text and full.stats["chunks"] == 1


def test_chunked_output_is_ordered_and_in_recording_time(tiny, recording):
    r = murmur.transcribe(recording, tiny, chunk_size="30", batch_size=8)
    starts = [s.start for s in r.segments]
    assert starts == sorted(starts)
    assert all(a.end <= b.start + 1e-6 for a, b in zip(r.segments, r.segments[1:]))
    assert r.segments[-1].end <= len(recording) / SAMPLE_RATE + 0.5
    # the last LJSpeech sentence sits at the end of the recording, in its own time
    assert r.segments[-1].start > 110
    assert r.stats["chunks"] >= 4 and 0 < r.stats["batch_occupancy"] <= 1


def test_a_window_that_copies_its_prompt_is_decoded_again_without_it(tiny):
    tok = tiny.tokenizer
    ts = tok.timestamp_begin
    audio = dataset.ljspeech_items()[0].audio
    st = ChunkStream(audio, tok, DecodingOptions(language="en"), language="en")
    said = tok.encode(" I think it should be a break for Ash, but maybe that should be in the end.")
    st.all_tokens = [ts] + said + [ts + 500]
    first = st.next_request()
    assert first.prompt[0] == tok.sot_prev and first.tag["prompted"]
    # the decode repeats the context's words (a loop carried from the last window)
    first.tokens = [ts] + tok.encode(" I think it should be a break for Ash.") + [ts + 300]
    retry = st.on_result(first)
    assert retry is not None and st.echo_retries == 1
    assert tok.sot_prev not in retry.prompt and not retry.tag["prompted"]
    assert retry.tag["t_index"] == first.tag["t_index"] and torch.equal(retry.mel, first.mel)
    # the fresh decode is kept, and the next window is not prompted with the dropped context
    retry.tokens = [ts] + tok.encode(" Printing, in the only sense.") + [ts + 300]
    assert st.on_result(retry) is None
    assert st.segments[-1].text.strip() == "Printing, in the only sense."
    assert st.all_tokens[st.prompt_reset_since:] == retry.tokens


def test_short_or_new_text_is_not_an_echo(tiny):
    tok = tiny.tokenizer
    ts = tok.timestamp_begin
    audio = dataset.ljspeech_items()[0].audio
    for words in (" Okay. Okay.", " Printing, in the only sense with which we are concerned."):
        st = ChunkStream(audio, tok, DecodingOptions(language="en"), language="en")
        st.all_tokens = [ts] + tok.encode(" Okay. Okay. I think it should be a break.") + [ts + 500]
        req = st.next_request()
        req.tokens = [ts] + tok.encode(words) + [ts + 300]
        assert st.on_result(req) is None and st.echo_retries == 0


class FocusScheduler(StreamScheduler):
    """Calls the first chunk's windows urgent, as the server does a short request's beside long ones."""

    def focus(self):
        return lambda req: req.owner.index == 0


def test_focus_steps_leave_every_row_its_tokens(tiny, recording):
    """Steps over the urgent request's rows alone (the others paused in place) change no text."""
    plans, _ = plan_chunks(recording, 20.0)
    tok, opts = tiny.tokenizer, DecodingOptions(language="en")
    out, spans = {}, {"focus": [], "full": []}

    class Spans(Engine):  # the rows each step spans, by kind
        def _step(self, hi, plain=False, focus=None):
            n = self.stats["slot_steps"]
            super()._step(hi, plain, focus)
            spans["full" if focus is None else "focus"].append(self.stats["slot_steps"] - n)

    for name, cls in (("plain", StreamScheduler), ("focus", FocusScheduler)):
        streams = [ChunkStream(p.pieces, tok, opts, p.time_map, index=i, language="en") for i, p in enumerate(plans)]
        engine = Spans(tiny, opts, batch_size=4)
        engine.run(cls(streams, max_open=8))
        out[name] = ([[s.tokens for s in st.segments] for st in streams], engine.stats)
    assert out["focus"][0] == out["plain"][0]
    st = out["focus"][1]
    assert 0 < st["focus_steps"] < st["steps"] and out["plain"][1]["focus_steps"] == 0
    # focus steps span fewer rows than the steps of every row
    assert max(spans["focus"]) < engine.batch_size and np.mean(spans["focus"]) < np.mean(spans["full"])
