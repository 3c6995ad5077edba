"""`murmur serve` against a live server on a free loopback port: the official openai client, batch
invariance under concurrency, cancellation, bounds and hostile input, and a bounded schema fuzz."""
from __future__ import annotations

import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

KEY = "sekret"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Live:
    def __init__(self, config):
        import uvicorn

        from murmur.serve.app import create_app
        self.app = create_app(config)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            assert time.monotonic() - t0 < 30, "server did not start"
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(15)
        assert not self.thread.is_alive()

    def metric(self, name: str) -> float:
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)


@pytest.fixture(scope="module")
def server(tiny):
    from murmur.serve.app import ServerConfig
    live = _Live(ServerConfig(models=["tiny.en"], device="cpu", request_timeout_s=120))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def strict(tiny):
    """A key, a 2 MB upload cap and 20 s of queued audio at most."""
    from murmur.serve.app import ServerConfig
    live = _Live(ServerConfig(models=["tiny.en"], device="cpu", api_key=KEY, max_upload_mb=2,
                              max_queued_audio_s=20, request_timeout_s=60))
    yield live
    live.stop()


def _wav(audio: np.ndarray) -> bytes:
    import wave
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def test_openai_client(server, jfk_path):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=60, max_retries=0)
    with open(jfk_path, "rb") as f:
        r = client.audio.transcriptions.create(model="tiny.en", file=f)
    assert "ask not what your country can do for you" in r.text.lower()
    with open(jfk_path, "rb") as f:
        v = client.audio.transcriptions.create(model="tiny.en", file=f, response_format="verbose_json",
                                               timestamp_granularities=["word"])
    words = v.words
    assert len(words) >= 20 and words[0].word.strip().lower() == "and"
    assert all(0 <= w.start <= w.end <= 11.1 for w in words)
    assert all(a.start <= b.start for a, b in zip(words, words[1:]))
    assert v.segments and v.text == r.text
    with open(jfk_path, "rb") as f:
        events = list(client.audio.transcriptions.create(model="tiny.en", file=f, stream=True))
    kinds = [e.type for e in events]
    assert kinds[-1] == "transcript.text.done" and kinds[:-1] and set(kinds[:-1]) == {"transcript.text.delta"}
    assert "".join(e.delta for e in events[:-1]) == events[-1].text == r.text
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny.en"]


def test_concurrent_requests_match_cli(server, tiny, data_dir):
    """Requests with different options decode together in one engine; each text and segment is what
    `transcribe()` gives the same file alone (batch invariance)."""
    from murmur.transcribe import transcribe
    cases = [
        (data_dir / "ted" / "bill_gates-TED.mp3", {}),
        (data_dir / "ami" / "trn03.flac", {}),
        (data_dir / "ami" / "dev00.flac", {"prompt": "Meeting about remote controls."}),
        (data_dir / "jfk" / "jfk.flac", {"temperature": "0"}),
        (data_dir / "ljspeech" / "LJ001-0001.flac", {"chunk_size": "full"}),
        (data_dir / "ami" / "tst00.flac", {"chunk_size": "60"}),
    ]

    def post(case):
        path, fields = case
        with open(path, "rb") as f:
            r = httpx.post(server.url + "/v1/audio/transcriptions", files={"file": (path.name, f)},
                           data={"response_format": "verbose_json", **fields}, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()

    t0 = time.monotonic()
    with ThreadPoolExecutor(len(cases)) as ex:
        got = list(ex.map(post, cases))
    assert time.monotonic() - t0 < 120
    for (path, fields), g in zip(cases, got):
        kw = {"chunk_size": fields.get("chunk_size", "30")}
        if "prompt" in fields:
            kw["initial_prompt"] = fields["prompt"]
        if "temperature" in fields:
            kw["temperature"] = (float(fields["temperature"]),)
        want = transcribe(path, model=tiny, **kw)
        assert g["text"] == want.text, path.name
        assert [s["tokens"] for s in g["segments"]] == [s.tokens for s in want.segments], path.name
        assert [s["start"] for s in g["segments"]] == [round(s.start, 3) for s in want.segments]


def test_disconnect_cancels(server, data_dir):
    """A client that goes away mid-decode frees its rows at once; the server keeps serving."""
    from murmur.eval.bench.dataset import stitched
    audio = stitched(parts=("ljspeech",)).audio  # 3.7 min: many seconds to decode
    body = _wav(audio)
    decoded = server.metric("murmur_audio_seconds_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/audio/transcriptions", files={"file": ("long.wav", body)},
                   timeout=httpx.Timeout(30, read=2.0))
    t0 = time.monotonic()  # its job may still be planned (VAD) when the client goes: wait for that
    while (httpx.get(server.url + "/health").json()["queued_audio_s"] or server.metric("murmur_queue_depth")
           or server.metric("murmur_active_rows")):
        assert time.monotonic() - t0 < 30, "cancelled request still holds rows"
        time.sleep(0.1)
    # it was dropped, not decoded to the end
    assert server.metric("murmur_audio_seconds_total") == decoded
    r = httpx.post(server.url + "/v1/audio/transcriptions", files={"file": ("j.flac", data_dir.joinpath(
        "jfk", "jfk.flac").read_bytes())}, timeout=60)
    assert "ask not" in r.json()["text"]


def _error(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_bounds_and_bad_input(strict, jfk_path, data_dir):
    url = strict.url + "/v1/audio/transcriptions"
    auth = {"Authorization": f"Bearer {KEY}"}
    jfk = jfk_path.read_bytes()
    assert _error(httpx.post(url, files={"file": ("a.flac", jfk)}), 401)["type"] == "authentication_error"
    _error(httpx.post(url, files={"file": ("a.flac", jfk)}, headers={"Authorization": "Bearer nope"}), 401)
    _error(httpx.get(strict.url + "/v1/models"), 401)
    for name, data in [("x.txt", b"this is not audio at all" * 10), ("e.wav", b""),
                       ("t.flac", jfk[:200]), ("z.bin", bytes(range(256)) * 64)]:
        assert _error(httpx.post(url, files={"file": (name, data)}, headers=auth), 400)["param"] == "file"
    assert _error(httpx.post(url, files={"file": ("a.flac", jfk)}, data={"model": "large-v9"},
                             headers=auth), 400)["param"] == "model"
    assert _error(httpx.post(url, files={"file": ("a.flac", jfk)}, data={"response_format": "docx"},
                             headers=auth), 400)["param"] == "response_format"
    _error(httpx.post(url, data={"model": "tiny.en"}, headers=auth), 400)  # no file
    _error(httpx.post(strict.url + "/v1/audio/translations", files={"file": ("a.flac", jfk)}, headers=auth), 400)
    # over the cap: refused on its Content-Length, and counted when the body is chunked
    big = _wav(np.zeros(16000 * 80, np.float32))  # 2.6 MB
    assert _error(httpx.post(url, files={"file": ("b.wav", big)}, headers=auth), 413)["code"] == "file_too_large"

    def chunks():
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]
    boundary = "xyz"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"b.wav\"\r\n"
            "Content-Type: audio/wav\r\n\r\n").encode()

    def multipart():
        yield head
        yield from chunks()
        yield f"\r\n--{boundary}--\r\n".encode()
    r = httpx.post(url, content=multipart(), headers={**auth, "Content-Type": f"multipart/form-data; boundary={boundary}"})
    _error(r, 413)
    # 40 s of audio is over the 20 s queue bound: 429 with Retry-After
    r = httpx.post(url, files={"file": ("m.wav", _wav(np.zeros(16000 * 30, np.float32)))}, headers=auth)
    _error(r, 429)
    assert int(r.headers["Retry-After"]) >= 1
    # an upload cut off mid-stream
    with socket.create_connection(("127.0.0.1", strict.port), timeout=5) as s:
        s.sendall((f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                   f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: 500000\r\n\r\n")
                  .encode() + head + jfk[:50000])
    # still serving after all of it
    r = httpx.post(url, files={"file": ("a.flac", jfk)}, data={"response_format": "text"}, headers=auth, timeout=60)
    assert r.status_code == 200 and "ask not what your country" in r.text
    r = httpx.post(url, files={"file": ("a.flac", jfk)}, data={"response_format": "srt"}, headers=auth, timeout=60)
    assert r.text.startswith("1\n00:00:00,000 --> ")
    assert httpx.get(strict.url + "/health").json()["status"] == "ok"


def test_schema_fuzz(strict):
    """Bounded property-based fuzz of the OpenAPI schema: no 5xx, and the server stays up."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    schema = schemathesis.openapi.from_url(strict.url + "/openapi.json")
    ops = [r.ok() for r in schema.get_all_operations()]
    assert {op.path for op in ops} >= {"/v1/audio/transcriptions", "/v1/audio/translations", "/health"}
    seen = []

    @given(case=st.one_of([op.as_strategy() for op in ops]))
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def fuzz(case):
        auth = {"Authorization": f"Bearer {KEY}"} if len(seen) % 2 else {}
        r = case.call(base_url=strict.url, headers=auth, timeout=30)
        seen.append((case.path, r.status_code))
        assert r.status_code < 500, (case.path, r.status_code, r.text[:300])

    t0 = time.monotonic()
    fuzz()
    assert len(seen) >= 20 and time.monotonic() - t0 < 120
    assert any(p == "/v1/audio/transcriptions" and c == 400 for p, c in seen)
    assert httpx.get(strict.url + "/health").status_code == 200


class _FakeSched:
    """A request's windows as plain tokens: what ServerScheduler asks of a StreamScheduler."""

    def __init__(self, windows: int):
        self.left, self.out = windows, 0

    def pop_ready(self, n):
        k = min(n, self.left)
        self.left -= k
        self.out += k
        return [object() for _ in range(k)]

    def finished(self):
        return self.left == 0 and self.out == 0

    def complete(self, req):
        self.out -= 1


class _FakeJob:
    def __init__(self, seconds):
        self.seconds, self.streams = seconds, [object()]

    def remaining_seconds(self):
        return self.seconds

    def take_finished_segments(self):
        return []


def test_admission_spreads_encodes_keeps_a_row_free_and_lets_short_requests_through():
    from murmur.serve import hub
    s = hub.ServerScheduler(max_open=32, max_windows=15)
    entries = {}
    for name, seconds, windows in (("long", 900.0, 40), ("short", 11.0, 1)):
        e = hub.Entry(job=_FakeJob(seconds), loop=None, done=None)
        e.sched = _FakeSched(windows)
        entries[name] = e
    s._entries.append(entries["long"])
    got = []
    while len(got) < 40:
        step = s.pop_ready(16)
        if not step:
            break
        assert len(step) <= hub.ADMIT_PER_STEP  # encoder passes spread between steps
        got += step
    assert len(got) == 15 and entries["long"].in_flight == 15  # one row stays free
    s._entries.append(entries["short"])
    assert len(s.pop_ready(1)) == 1 and entries["short"].in_flight == 1  # the newcomer starts at once
    entries["long"].in_flight -= 1  # a long window finished: its row is free again...
    entries["long"].sched.out -= 1
    assert s.pop_ready(2) == []  # ...but stays so while the short request decodes
    # while it decodes beside the long one, its windows step alone (Engine._focus)
    urgent = s.focus()
    req = type("R", (), {})
    req.owner = entries["short"].job.streams[0]
    assert urgent(req)
    req.owner = entries["long"].job.streams[0]
    assert not urgent(req)
    entries["short"].in_flight = 8  # short ones holding half the rows: the long one gets rows again
    assert len(s.pop_ready(2)) == 1
    s._entries.remove(entries["long"])
    assert s.focus() is None  # nobody to wait for it
