"""The batch job's two kinds of work, with or without Ray: plan a recording, and transcribe chunks of
many recordings in one continuously batched engine."""
from __future__ import annotations

import os
import threading
import time

from murmur.errors import MurmurError


def plan_recording(audio: str, o, chunks_per_task: int, keep_audio: bool = False):
    """Decode + VAD + chunk one recording: (meta, data, speech regions). A bad file is a result
    (meta["error"]), not an exception. data holds the first 30 s (language detection) and the chunk
    groups, and the samples when `keep_audio` (diarization in the same process)."""
    from murmur.audio.decode import N_SAMPLES, SAMPLE_RATE, load_audio
    from murmur.transcribe import _speech_regions, plan_chunks
    try:
        samples = load_audio(audio)
        plans, vad_s = plan_chunks(samples, o.chunk_size, o.vad_options)
    except MurmurError as e:
        return {"error": str(e)}, None, None
    groups = [plans[i:i + chunks_per_task] for i in range(0, len(plans), chunks_per_task)]
    meta = {"duration": len(samples) / SAMPLE_RATE, "groups": len(groups), "chunks": len(plans),
            "vad_s": round(vad_s, 3)}
    regions = None if o.chunk_size is None else _speech_regions(plans)
    # key: the recording, for the language its groups share (detected once per process, not per group)
    data = {"head": samples[:N_SAMPLES].copy(), "groups": groups, "key": f"{audio}#{len(samples)}"}
    if keep_audio:
        data["audio"] = samples
    return meta, data, regions


def transcript_of(meta: dict, segments, turns, stats: dict, name: str, lang: str | None, o, wall: float,
                  runner: str):
    """The Transcript of a recording whose chunks were decoded as groups, as `murmur transcribe` gives it."""
    from murmur.types import Transcript
    text = "".join(s.text for s in segments).strip()
    stats = {"wall_s": round(wall, 3), "audio_s": round(meta["duration"], 3), "chunks": meta["chunks"],
             "vad_s": meta["vad_s"], **stats, "speakers": len({t.speaker for t in turns}), "runner": runner}
    return Transcript(text=text, duration=meta["duration"], model=name, segments=segments,
                      language=lang or o.language or "en", stats=stats, turns=turns)


class _Line:
    """One engine for one set of decoding options, run by its own thread."""

    def __init__(self, loaded, opts, o):
        from murmur.distributed.feed import FeedScheduler
        from murmur.engine.runner import Engine
        from murmur.transcribe import engine_plugins
        self.engine = Engine(loaded, opts, batch_size=o.batch_size, seed=o.seed, **engine_plugins(loaded, o))
        self.scheduler = FeedScheduler(o.queue_limit or 2 * self.engine.batch_size)
        self.thread = threading.Thread(target=self._run, name="murmur-engine", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.engine.run(self.scheduler)
        except BaseException as e:  # noqa: BLE001 - handed to every waiting caller
            self.scheduler.stop(e)


class Transcriber:
    """The model loaded once; `transcribe` may be called from many threads at once, and their chunks
    share one engine's rows (one engine per set of decoding rules)."""

    def __init__(self, model, device: str | None = None, compute_type: str = "auto", threads: int | None = None):
        self.started = time.time()
        import torch

        from murmur.models.loading import get_model
        if threads is not None:
            os.environ["MURMUR_THREADS"] = str(threads)
            torch.set_num_threads(threads)
        self.loaded = get_model(model, device, compute_type)
        self.lines: dict[tuple, _Line] = {}
        self.lock = threading.Lock()
        self.error: BaseException | None = None  # set by abort: no more groups are taken
        self.languages: dict[str, list] = {}  # recording key -> [lock, language], the latest 256
        self.loaded_at = time.time()

    def transcribe(self, data: dict, gi: int, o):
        """Decode chunk group gi of a planned recording: (segments per chunk, stats, model name, language)."""
        import numpy as np

        from murmur.transcribe import ChunkPlan, chunk_streams, decoding_options, plugins_key
        lang = self._language(data, o)  # None: there is none to detect, or o gives it
        opts, tok, lang = decoding_options(self.loaded, data["head"], o.with_(language=lang) if lang else o)
        # one engine per set of rules: recordings with the same options share its rows
        key = (opts, lang, o.batch_size, plugins_key(o), o.seed, o.queue_limit)
        with self.lock:
            if self.error is not None:
                raise MurmurError(f"the job was stopped ({type(self.error).__name__})")
            line = self.lines.get(key)
            if line is None or line.scheduler.stopped:
                line = self.lines[key] = _Line(self.loaded, opts, o)
        # writable copies of what Ray's object store hands out read-only, held only while the group decodes
        plans = [ChunkPlan([p if p.flags.writeable else np.array(p) for p in c.pieces], c.time_map)
                 for c in data["groups"][gi]]
        streams = chunk_streams(self.loaded, plans, opts, tok, lang, o.word_timestamps or o.diarize)
        group = line.scheduler.add(streams)
        group.event.wait()
        if group.error is not None:
            raise group.error
        stats = {k: sum(getattr(s, k) for s in streams)
                 for k in ("windows", "fallbacks", "echo_retries", "skipped_no_speech", "dropped_repetitive")}
        return [s.segments for s in streams], stats, self.loaded.name, lang

    def _language(self, data: dict, o) -> str | None:
        """A multilingual model's language for the recording, detected on its first 30 s once in this
        process: its other groups wait for it instead of each running the encoder on the same audio."""
        key = data.get("key")
        if o.language or key is None or not self.loaded.tokenizer.multilingual:
            return None
        from murmur.transcribe import detect_language
        with self.lock:
            slot = self.languages.get(key)
            if slot is None:
                slot = self.languages[key] = [threading.Lock(), None]
                while len(self.languages) > 256:
                    self.languages.pop(next(iter(self.languages)))
        with slot[0]:
            if slot[1] is None:
                slot[1] = detect_language(self.loaded, data["head"])[0]
        return slot[1]

    def engine_stats(self) -> dict:
        """Its engines' counters summed (steps, row_steps, encode_s, ...), the CPU s of their threads and of the process."""
        out: dict = {"process_cpu_s": time.process_time(), "engine_cpu_s": 0.0}
        with self.lock:
            for line in self.lines.values():
                for k, v in line.engine.stats.items():
                    if isinstance(v, (int, float)):
                        out[k] = out.get(k, 0) + v
                if line.thread.is_alive():  # CPU its engine thread used, beside the process's other threads
                    out["engine_cpu_s"] += time.clock_gettime(time.pthread_getcpuclockid(line.thread.ident))
        return out

    def abort(self, error: BaseException) -> None:
        """Fail every group waiting or to come: its callers return at once."""
        with self.lock:
            self.error = error
            lines = list(self.lines.values())
        for line in lines:
            line.scheduler.stop(error)

    def close(self) -> None:
        """Stop the engines' threads once they are idle."""
        with self.lock:
            lines, self.lines = list(self.lines.values()), {}
        for line in lines:
            line.scheduler.stop()
            line.thread.join(5.0)
