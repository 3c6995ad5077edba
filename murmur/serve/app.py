"""The HTTP side: OpenAI's audio endpoints, bounds on what a request may cost, metrics."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import re
import tempfile
import time
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from murmur.errors import MurmurError
from murmur.serve.hub import POLICIES, EngineLoop, Entry, engine_options

log = logging.getLogger("murmur.serve")

FORMATS = ("json", "text", "srt", "vtt", "verbose_json", "seglst", "rttm")
MAX_PROMPT_CHARS = 4000
UPLOAD_BLOCK = 1 << 20


@dataclass
class ServerConfig:
    models: list[str] = field(default_factory=lambda: ["tiny.en"])
    batch_size: int = 16
    api_key: str | None = None
    max_upload_mb: float = 100.0
    max_queued_audio_s: float = 4 * 3600.0
    request_timeout_s: float = 600.0
    admission: str = "round-robin"
    device: str | None = None
    compute_type: str = "auto"


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type, self.headers = type_, headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.type, self.headers)


def error_response(status, message, param=None, code=None, type_="invalid_request_error", headers=None):
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class _TooLarge(Exception):
    pass


class UploadLimit:
    """ASGI middleware: a body over the cap gets 413 before it is read. A declared Content-Length
    over the cap is refused unread; an undeclared (chunked) body is counted as it arrives."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(send)
        seen = 0
        over = started = False

        async def counted():
            nonlocal seen, over
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    over = True
                    raise _TooLarge  # stops the form parser, whatever it answers is replaced
            return msg

        async def tracked(msg):
            nonlocal started
            if over:  # the app's answer to a body it could not finish: 413 instead
                if not started and msg["type"] == "http.response.start":
                    started = True
                    await self._refuse(send)
                return
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send):
        mb = self.max_bytes / (1 << 20)
        resp = error_response(413, f"upload over the limit of {mb:g} MB", "file", "file_too_large")
        await resp({"type": "http"}, None, send)


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        r = self.registry = CollectorRegistry()
        self.requests = Counter("murmur_requests", "Requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.audio = Counter("murmur_audio_seconds", "Audio seconds transcribed", registry=r)
        self.latency = Histogram("murmur_request_latency_seconds", "Time from upload to answer",
                                 buckets=(0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256, 600), registry=r)
        self.queue = Gauge("murmur_queue_depth", "Requests submitted and not yet decoded", registry=r)
        self.rows = Gauge("murmur_active_rows", "Decoder rows busy now, all engines", registry=r)
        self.queued_audio = Gauge("murmur_queued_audio_seconds", "Audio seconds left to decode", registry=r)


class Hub:
    """The models kept loaded and one engine loop per engine configuration."""

    def __init__(self, config: ServerConfig):
        from murmur.models.loading import get_model
        self.config = config
        self.models = {}
        for name in config.models:
            loaded = get_model(name, config.device, config.compute_type)
            self.models[name] = loaded
        self.default_model = config.models[0]
        self.loops: dict[tuple, EngineLoop] = {}
        self._done: deque[tuple[float, float]] = deque()  # (when, audio seconds) of finished requests

    def model(self, name: str | None):
        if not name or name == "whisper-1":  # OpenAI's name: clients default to it
            name = self.default_model
        if name not in self.models:
            raise ApiError(400, f"unknown model {name!r}: this server has {', '.join(self.models)}",
                           "model", "model_not_found")
        return name, self.models[name]

    def loop_for(self, model_name: str, loaded, o) -> EngineLoop:
        """Requests share an engine unless what the engine itself uses differs."""
        from murmur.transcribe import engine_plugins, plugins_key
        eopts = engine_options(o.decoding_options())
        key = (model_name, eopts, plugins_key(o), o.seed)
        if key not in self.loops:
            from murmur.engine.runner import Engine
            engine = Engine(loaded, eopts, batch_size=self.config.batch_size, seed=o.seed,
                            **engine_plugins(loaded, o))
            self.loops[key] = EngineLoop(engine, self.config.admission)
        return self.loops[key]

    def decoded(self, seconds: float) -> None:
        now = time.monotonic()
        self._done.append((now, seconds))
        while self._done and self._done[0][0] < now - 60:
            self._done.popleft()

    def rate(self) -> float:
        """Audio seconds decoded per second over the last minute (at least 10: a guess when idle)."""
        return max(10.0, sum(s for _, s in self._done) / 60.0)

    def queued_audio(self) -> float:
        return sum(e.job.remaining_seconds() for lp in self.loops.values() for e in lp.scheduler.pending())

    def close(self) -> None:
        for lp in self.loops.values():
            lp.close()


def _parse_bool(v: str | bool | None, name: str) -> bool:
    if v is None or isinstance(v, bool):
        return bool(v)
    t = str(v).strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off", ""):
        return False
    raise ApiError(400, f"{name} must be true or false, got {v!r}", name)


@dataclass
class Form_:
    """A request's options, checked: what the pipeline gets."""
    model: str
    response_format: str
    stream: bool
    options: object  # murmur.options.TranscribeOptions


FIELDS = ("language", "prompt", "temperature", "chunk_size", "diarize", "num_speakers", "kv_policy")


def read_form(hub: Hub, task, model, response_format, granularities, stream, **fields) -> tuple[Form_, object]:
    """The form's text fields -> TranscribeOptions, through the parser every text source shares."""
    from murmur.options import TranscribeOptions
    name, loaded = hub.model(model)
    fmt = (response_format or "json").strip()
    if fmt not in FORMATS:
        raise ApiError(400, f"unknown response_format {fmt!r}: choose from {', '.join(FORMATS)}",
                       "response_format")
    if task == "translate" and not loaded.tokenizer.multilingual:
        raise ApiError(400, f"model {name} is English-only: it cannot translate", "model")
    given = {k: v for k, v in fields.items() if v not in (None, "")}
    if len(given.get("prompt", "")) > MAX_PROMPT_CHARS:
        raise ApiError(400, f"prompt over {MAX_PROMPT_CHARS} characters", "prompt")
    if "language" in given:
        given["language"] = given["language"].strip().lower()
    if "num_speakers" in given and given["num_speakers"].strip().lstrip("+").isdigit() \
            and int(given["num_speakers"]) > 32:
        raise ApiError(400, "num_speakers must be at most 32", "num_speakers")
    if "temperature" in given:  # one value, no fallback: as `murmur transcribe --temperature`
        try:
            t = float(given["temperature"])
        except ValueError:
            raise ApiError(400, f"temperature {given['temperature']!r}: expected a number", "temperature") from None
        if not 0.0 <= t <= 1.0:
            raise ApiError(400, "temperature must be between 0 and 1", "temperature")
    grans = set()
    for g in granularities or []:
        for part in str(g).split(","):
            part = part.strip()
            if part not in ("word", "segment"):
                raise ApiError(400, f"unknown timestamp granularity {part!r}: word or segment",
                               "timestamp_granularities[]")
            grans.add(part)
    if fmt in ("seglst", "rttm") and "diarize" not in given:
        given["diarize"] = "true"  # speakers by default for speaker formats, as the CLI
    try:
        o = TranscribeOptions.from_mapping({**given, "task": task})
        from murmur.transcribe import check_language, engine_plugins
        check_language(loaded, o.language)
        engine_plugins(loaded, o)  # a bad policy is the request's 400, not the engine's error
    except MurmurError as e:
        msg = str(e)
        param = next((f for f in FIELDS if f in msg or f.replace("_", " ") in msg), None)
        raise ApiError(400, msg, param) from None
    o = o.with_(batch_size=hub.config.batch_size, word_timestamps="word" in grans or o.diarize)
    return Form_(name, fmt, _parse_bool(stream, "stream"), o), loaded


async def _save_upload(file: UploadFile) -> str:
    """Copy the (already spooled) upload block by block into a named temp file for the decoder."""
    # the upload's extension only (a format hint for the demuxer: raw MP3 probes poorly without it);
    # nothing else of the client's file name reaches the file system
    ext = os.path.splitext(file.filename or "")[1]
    fd, path = tempfile.mkstemp(prefix="murmur-upload-", suffix=ext if re.fullmatch(r"\.[A-Za-z0-9]{1,8}", ext) else "")
    try:
        with os.fdopen(fd, "wb") as out:
            while block := await file.read(UPLOAD_BLOCK):
                await run_in_threadpool(out.write, block)
    except BaseException:
        os.unlink(path)
        raise
    return path


def render(transcript, form: Form_, task: str):
    from murmur.output import writers
    fmt = form.response_format
    if fmt == "json":
        return JSONResponse({"text": transcript.text})
    if fmt == "text":
        return PlainTextResponse(transcript.text + "\n")
    if fmt in ("srt", "vtt"):
        return PlainTextResponse(writers.render(transcript, fmt), media_type="text/plain")
    if fmt == "seglst":
        return JSONResponse(writers.seglst(transcript))
    if fmt == "rttm":
        return PlainTextResponse(writers.render(transcript, "rttm"))
    segs = []
    for i, s in enumerate(transcript.segments):
        d = {"id": i, "seek": 0, "start": round(s.start, 3), "end": round(s.end, 3), "text": s.text,
             "tokens": [t for t in s.tokens], "temperature": s.temperature,
             "avg_logprob": s.avg_logprob, "compression_ratio": s.compression_ratio,
             "no_speech_prob": s.no_speech_prob}
        if s.speaker is not None:
            d["speaker"] = s.speaker
        segs.append(d)
    body = {"task": "translate" if task == "translate" else "transcribe", "language": transcript.language,
            "duration": round(transcript.duration, 3), "text": transcript.text, "segments": segs}
    if form.options.word_timestamps:
        body["words"] = [{"word": w.word.strip(), "start": round(w.start, 3), "end": round(w.end, 3),
                          **({"speaker": w.speaker} if w.speaker is not None else {})}
                         for s in transcript.segments for w in s.words]
    return JSONResponse(body)


def create_app(config: ServerConfig, hub: Hub | None = None) -> FastAPI:
    if config.admission not in POLICIES:
        raise MurmurError(f"unknown admission policy {config.admission!r}: choose from {', '.join(POLICIES)}")
    hub = hub or Hub(config)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app):
        yield
        hub.close()
        live = getattr(app.state, "stream_engine", None)
        if live is not None:
            live.close()

    app = FastAPI(title="Murmur", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible speech recognition; concurrent requests share one engine.")
    app.state.hub, app.state.metrics = hub, metrics
    # WS /v1/realtime?intent=transcription (murmur.stream): live streams on the hub's default model
    from murmur.stream.realtime import router as realtime_router
    app.state.model = hub.models[hub.default_model]
    app.include_router(realtime_router)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query", "header")]
        param = loc[0] if loc else None
        msg = f"{param}: {first.get('msg', 'invalid request')}" if param else first.get("msg", "invalid request")
        return error_response(400, msg, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), type_="invalid_request_error"
                              if exc.status_code < 500 else "server_error")

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal error", type_="server_error")

    def check_key(request: Request) -> None:
        if not config.api_key:
            return
        got = request.headers.get("authorization", "")
        token = got[7:] if got[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), config.api_key.encode()):
            raise ApiError(401, "invalid or missing API key", code="invalid_api_key",
                           type_="authentication_error")

    async def handle(request: Request, task: str, file: UploadFile, **fields):
        t0 = time.monotonic()
        endpoint = "transcriptions" if task == "transcribe" else "translations"
        try:
            resp = await _handle(request, task, file, t0, **fields)
        except ApiError as e:
            metrics.requests.labels(endpoint, str(e.status)).inc()
            raise
        metrics.requests.labels(endpoint, str(resp.status_code)).inc()
        return resp

    async def _handle(request: Request, task: str, file: UploadFile, t0: float, **fields):
        check_key(request)
        form, loaded = read_form(hub, task, **fields)
        if file is None:
            raise ApiError(400, "file is required", "file")
        path = await _save_upload(file)
        try:
            from murmur.audio.decode import SAMPLE_RATE, load_audio
            try:
                audio = await run_in_threadpool(load_audio, path)
            except MurmurError as e:
                # the message would name our temp file: say what was wrong with the upload instead
                raise ApiError(400, str(e).replace(path, "the uploaded file"), "file", "invalid_audio") from None
        finally:
            os.unlink(path)
        duration = len(audio) / SAMPLE_RATE
        queued = hub.queued_audio()
        if queued + duration > config.max_queued_audio_s:
            # wait for enough of the queue to drain at the rate audio is being decoded
            excess = queued + duration - config.max_queued_audio_s
            retry = max(1, min(3600, math.ceil(excess / hub.rate())))
            raise ApiError(429, f"{queued:.0f} s of audio already queued (limit "
                           f"{config.max_queued_audio_s:g} s); try again later",
                           code="rate_limit_exceeded", type_="rate_limit_error",
                           headers={"Retry-After": str(retry)})
        from murmur.transcribe import Job
        try:
            job = await run_in_threadpool(Job, loaded, audio, form.options)
        except MurmurError as e:
            raise ApiError(400, str(e)) from None
        del audio
        lp = hub.loop_for(form.model, loaded, form.options)
        aio = asyncio.get_running_loop()
        queue: asyncio.Queue | None = asyncio.Queue() if form.stream else None
        entry = Entry(job, aio, aio.create_future(),
                      on_segments=(lambda segs: queue.put_nowait(segs)) if queue is not None else None)
        lp.scheduler.submit(entry)

        async def finish():
            t = await run_in_threadpool(job.finish)
            metrics.audio.inc(job.duration)
            hub.decoded(job.duration)
            metrics.latency.observe(time.monotonic() - t0)
            return t

        if form.stream:
            return StreamingResponse(_sse(entry, queue, lp, finish, request), media_type="text/event-stream")
        try:
            await _wait(entry, lp, request)
        except asyncio.TimeoutError:
            raise ApiError(504, f"request took over {config.request_timeout_s:g} s", code="timeout",
                           type_="server_error") from None
        if entry.done.cancelled():
            return Response(status_code=499)
        transcript = await finish()
        return render(transcript, form, task)

    async def _wait(entry: Entry, lp: EngineLoop, request: Request) -> None:
        """Wait for the decode; a client that goes away or a timeout cancels its windows at once."""
        deadline = time.monotonic() + config.request_timeout_s
        try:
            while not entry.done.done():
                await asyncio.wait({entry.done}, timeout=0.25)
                if entry.done.done():
                    break
                if await request.is_disconnected():
                    lp.scheduler.cancel(entry)
                    entry.done.cancel()
                    return
                if time.monotonic() > deadline:
                    lp.scheduler.cancel(entry)
                    raise asyncio.TimeoutError
        except asyncio.CancelledError:
            lp.scheduler.cancel(entry)
            raise
        entry.done.result()  # raises what failed the decode

    async def _sse(entry: Entry, queue: asyncio.Queue, lp: EngineLoop, finish, request: Request):
        def event(d: dict) -> str:
            return f"data: {json.dumps(d, ensure_ascii=False)}\n\n"

        first = True
        try:
            deadline = time.monotonic() + config.request_timeout_s
            while True:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, entry.done}, timeout=max(0.0, deadline - time.monotonic()),
                                   return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    text = "".join(s.text for s in getter.result())
                    if first:
                        text = text.lstrip()
                    if text:
                        first = False
                        yield event({"type": "transcript.text.delta", "delta": text})
                    continue
                getter.cancel()
                if entry.done.done() and queue.empty():
                    break
                if time.monotonic() > deadline:
                    lp.scheduler.cancel(entry)
                    yield event({"type": "error", "error": {"message": "request timed out",
                                                            "type": "server_error", "code": "timeout"}})
                    return
            try:
                entry.done.result()
            except Exception as e:
                yield event({"type": "error", "error": {"message": str(e), "type": "server_error"}})
                return
            t = await finish()
            yield event({"type": "transcript.text.done", "text": t.text})
        finally:
            if not entry.done.done():  # the client went away mid-stream
                lp.scheduler.cancel(entry)

    def _form_fields(model, language, prompt, temperature, response_format, timestamp_granularities,
                     stream, chunk_size, diarize, num_speakers, kv_policy):
        return dict(model=model, language=language, prompt=prompt, temperature=temperature,
                    response_format=response_format, granularities=timestamp_granularities, stream=stream,
                    chunk_size=chunk_size, diarize=diarize, num_speakers=num_speakers, kv_policy=kv_policy)

    @app.post("/v1/audio/transcriptions", summary="Transcribe audio (OpenAI-compatible)")
    async def transcriptions(
        request: Request,
        file: UploadFile = File(..., description="the audio file (any format FFmpeg reads)"),
        model: str | None = Form(None), language: str | None = Form(None), prompt: str | None = Form(None),
        temperature: str | None = Form(None), response_format: str | None = Form("json"),
        timestamp_granularities: list[str] | None = Form(None, alias="timestamp_granularities[]"),
        stream: str | None = Form(None), chunk_size: str | None = Form(None), diarize: str | None = Form(None),
        num_speakers: str | None = Form(None), kv_policy: str | None = Form(None),
    ):
        return await handle(request, "transcribe", file, **_form_fields(
            model, language, prompt, temperature, response_format, timestamp_granularities, stream,
            chunk_size, diarize, num_speakers, kv_policy))

    @app.post("/v1/audio/translations", summary="Translate audio into English (multilingual models)")
    async def translations(
        request: Request,
        file: UploadFile = File(...),
        model: str | None = Form(None), prompt: str | None = Form(None), temperature: str | None = Form(None),
        response_format: str | None = Form("json"), chunk_size: str | None = Form(None),
    ):
        return await handle(request, "translate", file, **_form_fields(
            model, None, prompt, temperature, response_format, None, None, chunk_size, None, None, None))

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "murmur", "created": 0}
                                           for m in hub.models]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(hub.models), "engines": len(hub.loops),
                "queued_audio_s": round(hub.queued_audio(), 3)}

    @app.get("/metrics")
    async def metrics_():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        metrics.queue.set(sum(len(lp.scheduler.pending()) for lp in hub.loops.values()))
        metrics.rows.set(sum(lp.busy_rows() for lp in hub.loops.values()))
        metrics.queued_audio.set(hub.queued_audio())
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(UploadLimit, max_bytes=int(config.max_upload_mb * (1 << 20)))
    return app
