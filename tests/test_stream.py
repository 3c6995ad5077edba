"""Live transcription (murmur.stream) on real speech, played as fast as it decodes (feed() needs
no real clock: updates happen at fixed audio positions)."""
import asyncio
import base64
import json
import socket
import threading
import time

import numpy as np
import pytest

from murmur.errors import MurmurError
from murmur.eval.scoring import wer

SR = 16000


@pytest.fixture(scope="module")
def jfk(jfk_path):
    from murmur.audio.decode import load_audio
    return load_audio(jfk_path)


def _play(st, audio, piece_s):
    """Feed in pieces; returns (words in commit order, results)."""
    n = max(1, int(round(piece_s * SR)))
    words, results = [], []
    for i in range(0, len(audio), n):
        r = st.feed(audio[i:i + n])
        results.append(r)
        words += r.committed
    r = st.close()
    results.append(r)
    words += r.committed
    return words, results


def test_piece_size_does_not_change_commits_and_committed_text_is_final(tiny, jfk):
    from murmur.stream.transcriber import StreamingTranscriber, StreamOptions
    opts = StreamOptions(step_s=1.0)
    small, res_small = _play(StreamingTranscriber(tiny, opts), jfk, 0.02)
    big, _ = _play(StreamingTranscriber(tiny, opts), jfk, 1.0)
    assert [w.word for w in small] == [w.word for w in big]
    assert max(abs(a.start - b.start) + abs(a.end - b.end) for a, b in zip(small, big)) <= 0.2
    text = "".join(w.word for w in small)
    assert wer("And so my fellow Americans ask not what your country can do for you ask what you can do "
               "for your country.", text)["wer"] <= 0.15
    # what was committed stays: each turn's transcript is exactly the words committed for it, in
    # order, and times never go back
    turns = [e.text for r in res_small for e in r.events if e.kind == "turn_completed"]
    assert " ".join(t for t in turns if t) == " ".join(text.split())
    assert all(b.start >= a.end - 1e-6 for a, b in zip(small, small[1:]))


def test_a_feed_behind_real_time_runs_only_its_latest_update(tiny, jfk):
    """Audio that piled up while the stream's last update decoded (a loaded engine) is decoded once,
    at its newest position: every skipped update would only have put the stream further behind."""
    from murmur.stream.transcriber import StreamingTranscriber, StreamOptions
    late = StreamingTranscriber(tiny, StreamOptions(vad=False))
    late.feed(jfk[:4 * SR])  # eight update positions in one feed
    assert late.stats["updates"] == 1
    every = StreamingTranscriber(tiny, StreamOptions(vad=False, max_backlog_s=10.0))
    every.feed(jfk[:4 * SR])
    assert every.stats["updates"] == 8


def test_words_wait_at_most_max_wait_for_agreement(tiny, jfk):
    """With an agreement no update reaches (n = 30), words commit only at turn ends unless max_wait_s
    commits them from the latest hypothesis once their audio ended that long before the audio heard."""
    from murmur.stream.transcriber import StreamingTranscriber, StreamOptions
    never = StreamOptions(agreement=30, max_wait_s=None)
    late, results = _play(StreamingTranscriber(tiny, never), jfk, 0.5)
    assert not any(r.committed for r in results if not any(e.kind == "turn_completed" for e in r.events))
    st = StreamingTranscriber(tiny, StreamOptions(agreement=30, max_wait_s=1.0))
    n, early, words = SR // 2, [], []
    for i in range(0, len(jfk), n):
        r = st.feed(jfk[i:i + n])
        words += r.committed
        if not any(e.kind == "turn_completed" for e in r.events):
            assert all(w.end <= st.time - 1.0 + 1e-6 for w in r.committed)
            early += r.committed
    words += st.close().committed
    assert len(early) >= 10  # most of JFK's 22 words settle before its turn ends
    # the same words as committing at turn ends only (earlier hypotheses, so not always identical)
    assert wer("".join(w.word for w in late), "".join(w.word for w in words))["wer"] <= 0.15


def test_prompt_tokens_bound_the_prompt(tiny, jfk):
    from murmur.stream.transcriber import StreamingTranscriber, StreamOptions
    long = "Fellow citizens of the republic, " * 40
    assert len(StreamingTranscriber(tiny, StreamOptions(prompt=long, prompt_tokens=16)).context) == 16
    st = StreamingTranscriber(tiny, StreamOptions(prompt=long, prompt_tokens=0))
    assert st.context == [] and st._request(jfk[:SR]).prompt[0] != tiny.tokenizer.sot_prev
    _play(st, jfk, 1.0)
    assert st.context == []
    with pytest.raises(MurmurError):
        StreamOptions(prompt_tokens=300)


def test_every_word_once_across_trims(tiny, data_dir):
    """Three LJSpeech sentences back to back, no turn detection: the buffer is cut at committed
    sentence ends, and the committed words match the offline transcript (none lost or doubled)."""
    import murmur
    from murmur.audio.decode import load_audio
    from murmur.stream.transcriber import StreamingTranscriber, StreamOptions
    audio = np.concatenate([load_audio(data_dir / "ljspeech" / f"LJ001-00{i}.flac") for i in ("02", "08", "09", "13", "15")])
    st = StreamingTranscriber(tiny, StreamOptions(vad=False, step_s=1.0, trim_s=3.0))
    words, _ = _play(st, audio, 0.5)
    assert st.stats["trims"] >= 2
    offline = murmur.transcribe(audio, tiny).text
    got = "".join(w.word for w in words)
    w = wer(offline, got)
    assert w["wer"] <= 0.08, (offline, got)
    assert w["ins"] + w["dele"] <= 2, (offline, got)


def test_turn_end_after_a_trim_hears_no_thank_you(tiny, data_dir):
    """LJSpeech sentences a second apart, turn detection on: a long sentence's buffer is trimmed
    at its end before the turn ends, and the turn's last update then held only silence, where
    Whisper heard "Thank you." (three times in these clips). Its tentative words are the rest."""
    import murmur
    from murmur.audio.decode import load_audio
    from murmur.stream.transcriber import StreamingTranscriber, StreamOptions
    gap = np.zeros(SR, np.float32)
    clips = [load_audio(data_dir / "ljspeech" / f"LJ001-000{i}.flac") for i in (1, 2, 3)]
    audio = np.concatenate([x for c in clips for x in (c, gap)])
    st = StreamingTranscriber(tiny, StreamOptions())
    words, results = _play(st, audio, 0.1)
    got = "".join(w.word for w in words)
    assert "thank" not in got.lower(), got
    assert sum(e.kind == "turn_completed" for r in results for e in r.events) >= 3
    assert wer(murmur.transcribe(audio, tiny).text, got)["wer"] <= 0.08, got


def test_encoder_pad_encodes_less_and_commits_the_same_words(tiny, jfk):
    from murmur.stream.transcriber import MIN_INPUT, LocalDecoder, StreamingTranscriber, StreamOptions

    class Seen(LocalDecoder):
        def __init__(self, loaded):
            super().__init__(loaded)
            self.frames = []

        def decode(self, req):
            self.frames.append(req.mel.shape[-1])
            return super().decode(req)

    opts = StreamOptions(step_s=1.0, encoder_pad_s=8.0)
    dec = Seen(tiny)
    small, _ = _play(StreamingTranscriber(tiny, opts, decoder=dec), jfk, 0.02)
    big, _ = _play(StreamingTranscriber(tiny, opts), jfk, 1.0)
    assert dec.frames and all(MIN_INPUT <= f < 3000 and f % 200 == 0 for f in dec.frames), dec.frames
    assert [w.word for w in small] == [w.word for w in big]
    text = "".join(w.word for w in small)
    assert wer("And so my fellow Americans ask not what your country can do for you ask what you can do "
               "for your country.", text)["wer"] <= 0.15, text
    with pytest.raises(MurmurError):
        StreamOptions(encoder_pad_s=-1.0)


def test_multilingual_stream_detects_its_language_until_words_settle(jfk):
    """base with no language: each update detects it (as a file's first 30 s are) until words are
    committed, then it is fixed; the words are those of the language given."""
    from murmur.models.loading import get_model
    from murmur.stream.transcriber import StreamingTranscriber, StreamOptions
    base = get_model("base")
    auto = StreamingTranscriber(base, StreamOptions())
    words, _ = _play(auto, jfk, 0.5)
    forced = StreamingTranscriber(base, StreamOptions(language="en"))
    want, _ = _play(forced, jfk, 0.5)
    assert auto.language == "en" and words and [w.word for w in words] == [w.word for w in want]
    assert 1 <= auto.stats["detections"] < auto.stats["updates"]
    assert forced.stats["detections"] == 0
    with pytest.raises(MurmurError, match="unknown language"):
        StreamingTranscriber(base, StreamOptions(language="xx"))


def test_silence_and_bad_input(tiny):
    from murmur.stream.transcriber import StreamingTranscriber, StreamOptions
    st = StreamingTranscriber(tiny, StreamOptions())
    sizes = []
    for _ in range(600):  # ten minutes of silence: nothing decoded, memory flat
        r = st.feed(np.zeros(SR, np.float32))
        assert not r.committed
        sizes.append(st.memory_bytes())
    assert st.stats["updates"] == 0 and max(sizes) < 64_000 and sizes[-1] == sizes[10]
    with pytest.raises(MurmurError):
        st.feed(np.array([0.0, np.nan], np.float32))
    with pytest.raises(MurmurError):
        st.feed(b"\x00\x01\x02")
    assert not st.close().committed
    with pytest.raises(MurmurError):
        st.feed(np.zeros(10, np.float32))
    with pytest.raises(MurmurError):
        StreamOptions(policy="wait-k")


def test_priority_scheduler_serves_live_first():
    from murmur.engine.runner import Request
    from murmur.stream.scheduler import FILE, LIVE, PriorityScheduler

    class Files:
        def __init__(self):
            self.reqs = [Request(mel=None, prompt=[], tag=f"f{i}") for i in range(6)]

        def pop_ready(self, n):
            out, self.reqs = self.reqs[:n], self.reqs[n:]
            return out

        def complete(self, req):
            pass

        def finished(self):
            return not self.reqs

    s = PriorityScheduler(reserve_live=1)
    s.add_source(Files(), FILE)
    assert s.focus() is None
    live = Request(mel=None, prompt=[], tag="live")
    s.submit(live, LIVE)
    got = s.pop_ready(4)
    assert [r.tag for r in got] == ["live", "f0", "f1"]  # live first; one row kept back for live streams
    urgent = s.focus()  # beside file windows, live updates step alone (Engine._focus)
    assert urgent(live) and not urgent(got[1])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_realtime_websocket_jfk(tiny, jfk):
    """A plain websockets client speaking OpenAI's realtime transcription events to a live server
    on 127.0.0.1: errors for bad input, a client that drops mid-word, deltas and completed turns."""
    import uvicorn
    import websockets

    from murmur.stream.realtime import create_app

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(tiny), host="127.0.0.1", port=port, log_level="warning",
                                           ws="websockets-sansio", lifespan="on"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    url = f"ws://127.0.0.1:{port}/v1/realtime?intent=transcription"
    # 24 kHz pcm16 (the default format), JFK then a second of silence to end the last turn
    import av
    rs = av.AudioResampler(format="s16", layout="mono", rate=24000)
    f = av.AudioFrame.from_ndarray((np.concatenate([jfk, np.zeros(SR, np.float32)]) * 32767)
                                   .astype(np.int16)[None], format="s16", layout="mono")
    f.sample_rate = SR
    pcm = b"".join(o.to_ndarray().tobytes() for o in rs.resample(f) + rs.resample(None))

    async def drop_mid_word():
        async with websockets.connect(url) as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                      "audio": base64.b64encode(pcm[48000 * 2:48000 * 3]).decode()}))
        # closed without a commit: the server must just let it go

    async def client():
        async with websockets.connect(url) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
            await ws.send(json.dumps({"type": "session.update", "session": {"input_audio_format": "pcm16",
                                                                           "input_audio_rate": 44100}}))
            bad = json.loads(await ws.recv())
            assert bad["type"] == "error" and bad["error"]["code"] == "unsupported_sample_rate"
            await ws.send(json.dumps({"type": "session.update", "session": {"audio": {"input": {
                "transcription": {"language": "fr"}}}}}))  # tiny.en is English-only
            bad = json.loads(await ws.recv())
            assert bad["error"]["code"] == "invalid_value" and "English-only" in bad["error"]["message"]
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": "%%% not base64"}))
            assert json.loads(await ws.recv())["error"]["code"] == "invalid_base64"
            await ws.send("not json")
            assert json.loads(await ws.recv())["type"] == "error"
            await drop_mid_word()
            step = 24000 * 2 // 10  # 100 ms pieces
            for i in range(0, len(pcm), step):
                await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                          "audio": base64.b64encode(pcm[i:i + step]).decode()}))
            deltas, done, kinds = [], [], set()
            while " ".join(done).lower().count("country") < 2:
                ev = json.loads(await asyncio.wait_for(ws.recv(), 120))
                kinds.add(ev["type"])
                if ev["type"].endswith("transcription.delta"):
                    deltas.append(ev["delta"])
                elif ev["type"].endswith("transcription.completed"):
                    done.append(ev["transcript"])
            return deltas, done, kinds

    try:
        deltas, done, kinds = asyncio.run(asyncio.wait_for(client(), 240))
    finally:
        server.should_exit = True
        th.join(15)
    assert {"input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped"} <= kinds
    text = " ".join(done)
    assert wer("And so my fellow Americans ask not what your country can do for you ask what you can do "
               "for your country.", text)["wer"] <= 0.15, text
    assert " ".join(" ".join(deltas).split()) == " ".join(text.split())
