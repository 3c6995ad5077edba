"""`WS /v1/realtime?intent=transcription`: OpenAI's realtime transcription events over murmur's
streaming transcriber.

In: `session.update` (or the older `transcription_session.update`) with the input format as
`session.audio.input.format` ({"type": "audio/pcm", "rate": 24000|16000}) or `input_audio_format`
("pcm16", 24 kHz), language and prompt (`...transcription`), turn detection (null = off);
`input_audio_buffer.append` (base64 pcm16), `.commit`, `.clear`.
Out: `session.created`/`session.updated`, `input_audio_buffer.speech_started`/`speech_stopped`
(from the VAD), `input_audio_buffer.committed`, `conversation.item.input_audio_transcription.delta`
(committed text), `...completed` (each turn's transcript), `error`.

Every connection is one StreamingTranscriber on the app's shared engine (`app.state.stream_engine`,
made on first use from `app.state.model` or tiny.en). A connection's audio is decoded by a worker
task that takes all audio received since its last update at once, so a slow update never queues
work, and a bad message gets an `error` event without ending the session or touching the others.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import json
import threading

import numpy as np
from fastapi import APIRouter, FastAPI, WebSocket, WebSocketDisconnect

from murmur.errors import MurmurError

RATES = (24000, 16000)
MAX_MESSAGE = 4 << 20  # bytes of one client event (~1.4 min of base64 24-kHz pcm16)
MAX_PENDING_S = 60.0  # audio waiting for the worker beyond this is an error, not a memory leak

router = APIRouter()
_ids = itertools.count(1)
_engine_lock = threading.Lock()


def shared_engine(app):
    """The app's engine for live streams: the server's own when it set `app.state.stream_engine`."""
    with _engine_lock:
        eng = getattr(app.state, "stream_engine", None)
        if eng is None:
            from murmur.models.loading import get_model
            from murmur.stream.scheduler import SharedEngine
            model = getattr(app.state, "model", None) or get_model("tiny.en")
            eng = app.state.stream_engine = SharedEngine(get_model(model))
        return eng


class _Resampler:
    """pcm16 at the session's rate -> float32 at 16 kHz; stateful across pieces (PyAV)."""

    def __init__(self, rate: int):
        self.rate = rate
        self.rs = None
        if rate != 16000:
            import av
            self.rs = av.AudioResampler(format="s16", layout="mono", rate=16000)

    def __call__(self, pcm: np.ndarray) -> np.ndarray:
        if self.rs is None or pcm.size == 0:
            return pcm.astype(np.float32) / 32768.0
        import av
        f = av.AudioFrame.from_ndarray(pcm[None], format="s16", layout="mono")
        f.sample_rate = self.rate
        out = [o.to_ndarray().reshape(-1) for o in self.rs.resample(f)]
        return (np.concatenate(out) if out else np.zeros(0, np.int16)).astype(np.float32) / 32768.0


def _error(message: str, code: str = "invalid_request_error", event_id=None, param=None) -> dict:
    return {"type": "error", "event_id": f"event_{next(_ids)}",
            "error": {"type": "invalid_request_error", "code": code, "message": message, "param": param,
                      "event_id": event_id}}


class _Session:
    def __init__(self, ws: WebSocket, engine):
        self.ws, self.engine = ws, engine
        self.id = f"sess_{next(_ids)}"
        self.rate = 24000
        self.turn_detection = True
        self.language = None
        self.prompt = None
        self.legacy = False  # the client spoke transcription_session.*: answer in kind
        self.st = None
        self.resample = _Resampler(self.rate)
        self.pending: list[np.ndarray] = []
        self.pending_n = 0
        self.odd = b""
        self.wake = asyncio.Event()
        self.item = None
        self.prev_item = None
        self.item_text: list[str] = []
        self.closed = False
        self.lock = asyncio.Lock()  # one update at a time per connection

    # --- out ---------------------------------------------------------------------------------
    async def send(self, ev: dict) -> None:
        ev.setdefault("event_id", f"event_{next(_ids)}")
        await self.ws.send_text(json.dumps(ev))

    def config(self) -> dict:
        td = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500} \
            if self.turn_detection else None
        if self.legacy:
            return {"id": self.id, "object": "realtime.transcription_session",
                    "input_audio_format": "pcm16", "input_audio_rate": self.rate,
                    "input_audio_transcription": {"model": "murmur", "language": self.language, "prompt": self.prompt or ""},
                    "turn_detection": td}
        return {"id": self.id, "object": "realtime.session", "type": "transcription",
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": self.rate},
                                    "transcription": {"model": "murmur", "language": self.language,
                                                      "prompt": self.prompt or ""},
                                    "turn_detection": td}}}

    # --- in ----------------------------------------------------------------------------------
    async def handle(self, raw: str) -> None:
        if len(raw) > MAX_MESSAGE:
            return await self.send(_error(f"event larger than {MAX_MESSAGE} bytes", "message_too_large"))
        try:
            ev = json.loads(raw)
            kind = ev["type"]
        except (ValueError, KeyError, TypeError):
            return await self.send(_error("events are JSON objects with a 'type'", "invalid_json"))
        eid = ev.get("event_id")
        if kind in ("session.update", "transcription_session.update"):
            return await self.update(ev.get("session") or {}, kind.startswith("transcription_session"), eid)
        if kind == "input_audio_buffer.append":
            return await self.append(ev.get("audio"), eid)
        if kind == "input_audio_buffer.commit":
            return await self.run(final=True)
        if kind == "input_audio_buffer.clear":
            async with self.lock:
                self.pending, self.pending_n = [], 0
                if self.st is not None:
                    self.st.clear()
                self.item_text = []
            return await self.send({"type": "input_audio_buffer.cleared"})
        await self.send(_error(f"unsupported event type {kind!r}", "unknown_event", eid, "type"))

    async def update(self, s: dict, legacy: bool, eid) -> None:
        if not isinstance(s, dict):
            return await self.send(_error("session must be an object", "invalid_value", eid, "session"))
        self.legacy = legacy
        inp = ((s.get("audio") or {}).get("input") or {}) if isinstance(s.get("audio"), dict) else {}
        rate = self.rate
        fmt = inp.get("format")
        if isinstance(fmt, dict):
            if fmt.get("type", "audio/pcm") != "audio/pcm":
                return await self.send(_error(f"input format {fmt.get('type')!r} is not supported: audio/pcm only",
                                              "unsupported_format", eid, "session.audio.input.format.type"))
            rate = fmt.get("rate", 24000)
        old = s.get("input_audio_format")
        if old is not None:
            if old != "pcm16":
                return await self.send(_error(f"input_audio_format {old!r} is not supported: pcm16 only",
                                              "unsupported_format", eid, "session.input_audio_format"))
            rate = s.get("input_audio_rate", 24000)
        if rate not in RATES:
            return await self.send(_error(f"sample rate {rate!r} is not supported: 24000 or 16000",
                                          "unsupported_sample_rate", eid, "session.audio.input.format.rate"))
        tr = inp.get("transcription") or s.get("input_audio_transcription") or {}
        td_present = "turn_detection" in inp or "turn_detection" in s
        td = inp.get("turn_detection", s.get("turn_detection"))
        if self.st is not None and (tr or td_present) and self.st.received:
            return await self.send(_error("language, prompt and turn detection are fixed once audio has come",
                                          "session_locked", eid))
        if isinstance(tr, dict) and tr.get("language"):  # checked before any setting changes
            from murmur.transcribe import check_language
            try:
                check_language(self.engine.loaded, tr["language"])
            except MurmurError as e:
                return await self.send(_error(str(e), "invalid_value", eid,
                                              "session.audio.input.transcription.language"))
        if rate != self.rate:
            self.rate, self.resample = rate, _Resampler(rate)
        if isinstance(tr, dict):
            self.language = tr.get("language") or self.language
            self.prompt = tr.get("prompt") or self.prompt
        if td_present:
            self.turn_detection = td is not None
        if self.st is not None and not self.st.received:
            self.st = None  # made again with these settings on the first audio
        await self.send({"type": "transcription_session.updated" if legacy else "session.updated",
                         "session": self.config()})

    async def append(self, audio, eid) -> None:
        if not isinstance(audio, str):
            return await self.send(_error("input_audio_buffer.append needs base64 'audio'", "invalid_value", eid, "audio"))
        try:
            b = self.odd + base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            return await self.send(_error("audio is not valid base64", "invalid_base64", eid, "audio"))
        cut = len(b) - len(b) % 2
        self.odd = b[cut:]
        if not cut:
            return
        if self.pending_n / 16000 > MAX_PENDING_S:
            return await self.send(_error("audio arrives faster than it can be transcribed; dropped",
                                          "buffer_overflow", eid))
        x = self.resample(np.frombuffer(b[:cut], dtype="<i2"))
        self.pending.append(x)
        self.pending_n += x.size
        self.wake.set()

    # --- the worker --------------------------------------------------------------------------
    def _transcriber(self):
        if self.st is None:
            from murmur.stream.transcriber import StreamingTranscriber, StreamOptions
            opts = StreamOptions(vad=self.turn_detection, language=self.language, prompt=self.prompt)
            self.st = StreamingTranscriber(self.engine.loaded, opts, decoder=self.engine)
        return self.st

    async def run(self, final: bool = False) -> None:
        async with self.lock:
            st = self._transcriber()
            audio = np.concatenate(self.pending) if self.pending else np.zeros(0, np.float32)
            self.pending, self.pending_n = [], 0
            res = await asyncio.to_thread(st.feed, audio) if audio.size else None
            if res is not None:
                await self.emit(res)
            if final:
                if st.turn_open or st.vad is None:
                    if self.item is None:
                        self._new_item()
                    item = self.item
                    await self.send({"type": "input_audio_buffer.committed", "item_id": item,
                                     "previous_item_id": self.prev_item})
                    await self.emit(await asyncio.to_thread(st.flush))
                else:
                    await self.send(_error("no speech to commit", "input_audio_buffer_commit_empty"))

    def _new_item(self) -> None:
        self.prev_item, self.item = self.item, f"item_{next(_ids)}"
        self.item_text = []

    async def emit(self, res) -> None:
        """Events and committed words in the order the stream produced them."""
        done = 0
        for ev in res.events:
            await self._words(res.committed[done:ev.after])
            done = max(done, ev.after)
            await self._event(ev)
        await self._words(res.committed[done:])

    async def _words(self, words) -> None:
        if not words:
            return
        if self.item is None:
            self._new_item()
        text = "".join(w.word for w in words)
        if not self.item_text:
            text = text.lstrip()
        self.item_text.append(text)
        await self.send({"type": "conversation.item.input_audio_transcription.delta",
                         "item_id": self.item, "content_index": 0, "delta": text})

    async def _event(self, ev) -> None:
        if ev.kind == "speech_started":
            self._new_item()
            await self.send({"type": "input_audio_buffer.speech_started",
                             "audio_start_ms": int(ev.time * 1000), "item_id": self.item})
        elif ev.kind == "speech_stopped":
            await self.send({"type": "input_audio_buffer.speech_stopped",
                             "audio_end_ms": int(ev.time * 1000), "item_id": self.item})
            if self.turn_detection:
                await self.send({"type": "input_audio_buffer.committed", "item_id": self.item,
                                 "previous_item_id": self.prev_item})
        elif ev.kind == "turn_completed" and self.item is not None:
            await self.send({"type": "conversation.item.input_audio_transcription.completed",
                             "item_id": self.item, "content_index": 0, "transcript": "".join(self.item_text),
                             "usage": {"type": "duration", "seconds": round(self.st.time, 3)}})
            self.item_text = []
            self.item = None

    async def worker(self) -> None:
        while not self.closed:
            await self.wake.wait()
            self.wake.clear()
            try:
                await self.run()
            except Exception as e:  # noqa: BLE001 - one stream's failure is its own
                await self.send(_error(f"transcription failed: {e}", "server_error"))


@router.websocket("/v1/realtime")
async def realtime(ws: WebSocket, intent: str = "transcription"):
    await ws.accept()
    if intent != "transcription":
        await ws.send_text(json.dumps(_error(f"intent {intent!r} is not served here: transcription only",
                                             "unsupported_intent")))
        await ws.close(code=1008)
        return
    engine = await asyncio.to_thread(shared_engine, ws.app)
    s = _Session(ws, engine)
    await s.send({"type": "session.created", "session": s.config()})
    worker = asyncio.create_task(s.worker())
    try:
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                break
            if msg.get("text") is not None:
                await s.handle(msg["text"])
            else:
                await s.send(_error("send events as text frames", "invalid_frame"))
    except WebSocketDisconnect:
        pass
    finally:
        s.closed = True
        worker.cancel()
        if s.st is not None:
            s.st.closed = True  # the client is gone: nothing to flush to, release its state
            s.st.buffer = np.zeros(0, np.float32)


def create_app(model="tiny.en") -> FastAPI:
    """A FastAPI app with only the realtime endpoint (tests; `murmur serve` mounts `router`)."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        yield
        eng = getattr(app.state, "stream_engine", None)
        if eng is not None:
            eng.close()

    app = FastAPI(title="murmur realtime", lifespan=lifespan)
    app.state.model = model
    app.include_router(router)
    return app
