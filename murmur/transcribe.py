"""The pipeline: audio → VAD/chunker → scheduler → engine → stitcher → Transcript."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from murmur.audio.decode import N_FRAMES, N_SAMPLES, SAMPLE_RATE, load_audio, log_mel_spectrogram
from murmur.engine.decoding import DecodingOptions
from murmur.engine.kv.cache import KVCache
from murmur.engine.longform import ChunkStream, TimeMap
from murmur.engine.runner import Engine
from murmur.engine.scheduler import StreamScheduler
from murmur.errors import MurmurError, OptionsError
from murmur.models.common import LoadedModel
from murmur.models.loading import get_model
from murmur.options import TranscribeOptions
from murmur.types import Transcript


def set_threads(n: int | None = None) -> None:
    """torch threads for a run: `n`, else $MURMUR_THREADS, else the cores that other programs leave
    idle (threads.idle_cores). With one of 2 cores busy elsewhere, 2 threads ran the stitched set in 21 s
    and 1 thread in 12 s; idle, 2 threads take 7.7 s (the tokens are the same either way)."""
    from murmur.threads import idle_cores

    n = n or int(os.environ.get("MURMUR_THREADS", 0)) or idle_cores()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@dataclass
class ChunkPlan:
    """One chunk: its speech regions as views of the recording (spliced only while the chunk is
    decoded, so planning copies nothing) and the map back to recording time."""
    pieces: list[np.ndarray]
    time_map: TimeMap

    @property
    def n_samples(self) -> int:
        return sum(len(p) for p in self.pieces)


@torch.inference_mode()
def detect_language(loaded: LoadedModel, audio: np.ndarray) -> tuple[str, dict[str, float]]:
    """Whisper's language detection on the first 30 s: one decoder step after <|startoftranscript|>."""
    from murmur.models.tokenizer import LANGUAGES
    tok, model = loaded.tokenizer, loaded.model
    if not tok.multilingual:
        return "en", {"en": 1.0}
    mel = log_mel_spectrogram(audio[:N_SAMPLES], padding=N_SAMPLES)[:, :N_FRAMES]
    feats = model.encoder(mel[None].to(model.device, model.dtype))
    d = model.dims
    cache = KVCache(d.n_text_layer, 1, d.n_text_head, d.n_text_state // d.n_text_head, d.n_text_ctx,
                    feats.shape[1], dtype=model.dtype, device=model.device)
    cache.load_cross(0, 1, model.decoder.cross_kv(feats))
    logits = model.decoder(torch.tensor([[tok.sot]], device=model.device), cache)[0, -1]
    ids = tok.language_tokens
    probs = torch.softmax(logits[ids], -1).tolist()
    table = {LANGUAGES[i]: p for i, p in enumerate(probs)}
    return max(table, key=table.get), table


def plan_chunks(audio: np.ndarray, chunk_size: float | None, vad_options=None) -> tuple[list[ChunkPlan], float]:
    """Full mode is the whole recording as one chunk (sequential mode); otherwise VAD + chunker."""
    if chunk_size is None:
        return [ChunkPlan([audio], TimeMap.identity(0.0))], 0.0
    from murmur.audio.chunker import make_chunks
    from murmur.audio.vad import meeting_options, speech_regions
    t0 = time.perf_counter()
    vad_options = vad_options or meeting_options()  # the diarizer's too
    regions = speech_regions(audio, SAMPLE_RATE, vad_options)
    chunks = make_chunks(regions, chunk_size, audio=audio, sr=SAMPLE_RATE)
    plans = []
    for ch in chunks:
        # splice the chunk's speech regions: non-speech never reaches the encoder
        pieces, src, dst, t = [], [], [], 0.0
        for a, b in ch.regions:
            i, j = int(a * SAMPLE_RATE), int(b * SAMPLE_RATE)
            if j <= i:
                continue
            pieces.append(audio[i:j])
            src.append(t)
            dst.append(i / SAMPLE_RATE)
            t += (j - i) / SAMPLE_RATE
        if pieces:
            plans.append(ChunkPlan(pieces, TimeMap(np.array(src), np.array(dst))))
    return plans, time.perf_counter() - t0


def _speech_regions(plans: list[ChunkPlan]) -> list[tuple[float, float]]:
    """The VAD regions the chunks hold (diarize joins the touching ones again), so diarization
    skips a second VAD pass (~1 s on 15 min)."""
    return [(float(t), float(t) + len(piece) / SAMPLE_RATE)
            for p in plans for piece, t in zip(p.pieces, p.time_map.dst)]


# --- the pipeline's parts, shared by Job and murmur.distributed (plan, decode and finish there
# run in different processes): rules -> chunk streams -> stitch + diarize ----------------------

def check_language(loaded: LoadedModel, language: str | None) -> None:
    """A clear error for a language the model cannot transcribe: English-only, or not one it knows."""
    if not language:
        return
    try:
        loaded.tokenizer.language_token(language)
    except ValueError:
        if not loaded.tokenizer.multilingual:
            raise OptionsError(f"language {language!r}: model {loaded.name} is English-only") from None
        raise OptionsError(f"unknown language {language!r} for model {loaded.name}") from None


def decoding_options(loaded: LoadedModel, audio: np.ndarray, o: TranscribeOptions):
    """(DecodingOptions, tokenizer, language) of a recording: the language detected on multilingual
    models from the first 30 s (so `audio` may be just those)."""
    opts = o.decoding_options()
    tok = loaded.tokenizer
    if tok.multilingual and opts.language is None and len(audio):
        opts = opts.with_(language=detect_language(loaded, audio)[0])
    lang = opts.language or "en"
    check_language(loaded, lang)
    if not tok.multilingual and opts.task == "translate":
        raise MurmurError(f"model {loaded.name} is English-only; it cannot translate")
    # each job its own tokenizer: language and task belong to the request, so concurrent
    # jobs never see each other's (the copy shares the BPE)
    return opts, replace(tok, language=lang, task=opts.task), lang


def chunk_streams(loaded: LoadedModel, plans: list[ChunkPlan], opts, tokenizer, language: str,
                  word_timestamps: bool = False) -> list[ChunkStream]:
    """One stream per chunk; chunks are independent, so any engine may decode any of them."""
    return [ChunkStream(p.pieces, tokenizer, opts, p.time_map, index=i, n_text_ctx=loaded.model.dims.n_text_ctx,
                        language=language, word_timestamps=word_timestamps, model=loaded)
            for i, p in enumerate(plans)]


def finish(per_chunk: list[list], audio: np.ndarray | None, plans: list[ChunkPlan] | None, o: TranscribeOptions,
           regions: list[tuple[float, float]] | None = None):
    """Stitch the chunks' segments (in chunk order); diarize when `o.diarize`, once over the whole
    recording, so speaker labels are global. `plans` None: sequential mode (the diarizer runs its own
    VAD); `regions` stands in for the plans' speech regions where the plans are elsewhere.
    Returns (segments, turns, stitch_s, diarize_s)."""
    from murmur.output.stitcher import stitch
    t0 = time.perf_counter()
    segments = stitch(per_chunk)
    stitch_s = time.perf_counter() - t0
    turns, diarize_s = [], 0.0
    if o.diarize:
        from murmur.speakers.diarize import assign_speakers
        from murmur.speakers.diarize import diarize as run_diarization
        t_d = time.perf_counter()
        if regions is None and plans is not None:
            regions = _speech_regions(plans)
        turns = run_diarization(audio, num_speakers=o.num_speakers, min_speakers=o.min_speakers,
                                max_speakers=o.max_speakers, options=o.diarize_options, regions=regions)
        segments = assign_speakers(segments, turns)
        diarize_s = time.perf_counter() - t_d
    return segments, turns, stitch_s, diarize_s


class Job:
    """One recording through the pipeline, whatever scheduler feeds its chunk streams to an engine:
    plan chunks -> ChunkStreams -> (engine) -> stitch -> diarize -> Transcript. `transcribe()` runs one
    job on a StreamScheduler; the server (murmur.serve) runs many jobs' streams in one engine."""

    def __init__(self, loaded: LoadedModel, audio: np.ndarray, o: TranscribeOptions, source: str | None = None):
        self.t_start = time.perf_counter()
        self.loaded, self.source, self.o = loaded, source, o
        self.audio = audio
        self.duration = len(audio) / SAMPLE_RATE
        self.options, self.tokenizer, lang = decoding_options(loaded, audio, o)
        self.language = lang
        self.plans, self.vad_s = plan_chunks(audio, o.chunk_size, o.vad_options)
        self.streams = chunk_streams(loaded, self.plans, self.options, self.tokenizer, lang,
                                     o.word_timestamps or o.diarize)
        self.speech_seconds = sum(p.n_samples for p in self.plans) / SAMPLE_RATE
        self._emitted = 0

    def remaining_seconds(self) -> float:
        return sum(s.duration - s.seconds_done for s in self.streams if not s.done)

    def take_finished_segments(self) -> list:
        """The segments of the streams that finished, in recording order, not yet taken: chunks are
        disjoint and in order, so these are final once every earlier chunk is done."""
        out = []
        while self._emitted < len(self.streams) and self.streams[self._emitted].done:
            out += self.streams[self._emitted].segments
            self._emitted += 1
        return out

    def finish(self, stats: dict | None = None) -> Transcript:
        """Stitch the streams' segments, diarize if asked, and close the job."""
        o = self.o
        segments, turns, stitch_s, diarize_s = finish([s.segments for s in self.streams], self.audio,
                                                      None if o.chunk_size is None else self.plans, o)
        self.audio = None
        wall = time.perf_counter() - self.t_start
        streams = self.streams
        stats = {
            "wall_s": round(wall, 3),
            "rtfx": round(self.duration / wall, 2) if wall > 0 else None,
            "audio_s": round(self.duration, 3),
            "chunks": len(self.plans),
            "windows": sum(s.windows for s in streams),
            "fallbacks": sum(s.fallbacks for s in streams),
            "echo_retries": sum(s.echo_retries for s in streams),
            "skipped_no_speech": sum(s.skipped_no_speech for s in streams),
            "dropped_repetitive": sum(s.dropped_repetitive for s in streams),
            "vad_s": round(self.vad_s, 3),
            **(stats or {}),
            "stitch_s": round(stitch_s, 4),
            "diarize_s": round(diarize_s, 3),
            "speakers": len({t.speaker for t in turns}),
            "chunk_size": "full" if o.chunk_size is None else o.chunk_size,
            "peak_rss_mb": _peak_rss_mb(),
        }
        text = "".join(s.text for s in segments).strip()
        return Transcript(text=text, duration=self.duration, model=self.loaded.name, segments=segments,
                          language=self.language, stats=stats, source=self.source, turns=turns)


def engine_plugins(loaded: LoadedModel, o) -> dict:
    """The KV policy, encoder hooks and speculator that `o` (TranscribeOptions) asks for, built for
    `loaded`, as Engine keywords: every engine, local, served or on Ray, plugs in the same ones."""
    kv_policy = o.kv_policy
    if isinstance(kv_policy, str):
        from murmur.engine.kv.policies import parse_kv_policy
        kv_policy = parse_kv_policy(kv_policy, o.kv_opts, loaded)
    hooks = list(o.encoder_hooks)
    if o.encoder_sparsity:
        from murmur.engine.sparsify import parse_encoder_sparsity
        hooks += parse_encoder_sparsity(o.encoder_sparsity, loaded)
    speculative = o.speculative
    if isinstance(speculative, str):
        from murmur.spec.speculator import parse_speculative
        speculative = parse_speculative(speculative, o.spec_opts, loaded)
    return {"kv_policy": kv_policy, "encoder_hooks": hooks, "speculative": speculative}


def plugins_key(o) -> tuple:
    """What identifies the plug-ins of `o`: engines whose options give the same key can share rows."""
    def spec(x):  # 'none', '' and None are the same plug-in: none; so are padded spellings
        if isinstance(x, str):
            x = x.strip()
            return None if x.lower() in ("", "none", "off") else x
        return x

    def opts(d):
        return tuple(sorted((d or {}).items()))

    return (repr(spec(o.kv_policy)), opts(o.kv_opts), spec(o.encoder_sparsity), o.encoder_hooks,
            repr(spec(o.speculative)), opts(o.spec_opts))


def transcribe(
    audio: str | os.PathLike | np.ndarray | bytes,
    model: str | LoadedModel = "tiny.en",
    options: TranscribeOptions | DecodingOptions | None = None,
    **kw,
) -> Transcript:
    """Transcribe one recording with `options` (murmur.options.TranscribeOptions, which documents
    every setting), or with its fields as keyword arguments: `transcribe(audio, model,
    chunk_size=30, diarize=True)`. Keywords also change the fields of a given `options`, and
    DecodingOptions fields (logprob_threshold, ...) are accepted as keywords too. A DecodingOptions
    as `options` is taken as the decoding rules, as before TranscribeOptions."""
    if isinstance(options, DecodingOptions):
        kw = {"decoding": options, **kw}
        options = None
    o = (options or TranscribeOptions()).with_(**kw) if kw or options is None else options
    set_threads(o.threads)
    t_start = time.perf_counter()
    loaded = get_model(model, o.device, o.compute_type)
    source = None
    if not isinstance(audio, np.ndarray):
        source = str(audio) if not isinstance(audio, (bytes, bytearray)) else None
        audio = load_audio(audio)
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise MurmurError(f"audio must be mono 1-D samples at 16 kHz, got shape {audio.shape}")
    job = Job(loaded, audio, o, source=source)
    job.t_start = t_start
    engine = Engine(loaded, job.options, batch_size=o.batch_size, seed=o.seed, max_streams=len(job.streams),
                    **engine_plugins(loaded, o))
    bar = _progress(o.progress, job.duration, job.speech_seconds, source)
    scheduler = StreamScheduler(job.streams, max_open=o.queue_limit or 2 * engine.batch_size,
                                on_progress=bar.advance if bar else None)
    try:
        engine.run(scheduler)
    finally:
        if bar:
            bar.close()
    es = engine.stats
    return job.finish({
        "encode_s": round(es["encode_s"], 3),
        "decode_s": round(es["decode_s"], 3),
        "prefill_s": round(es["prefill_s"], 3),
        "forward_s": round(es["forward_s"], 3),
        "tokens": es["tokens"],
        **_spec_stats(es),
        "tokens_per_s": round(es["tokens"] / max(es["decode_s"], 1e-9), 1),
        "batch_size": engine.batch_size,
        "batch_occupancy": round(es["row_steps"] / max(es["slot_steps"], 1), 3),
        "mean_active_rows": round(es["row_steps"] / max(es["steps"], 1), 2),
        **engine.cache.stats})


def _spec_stats(st: dict) -> dict:
    """target_forwards counts decoder calls (prefills included); tokens_per_forward is per row and call."""
    return {"target_forwards": st["target_forwards"], "draft_tokens": st["draft_tokens"],
            "accepted_tokens": st["accepted_tokens"], "draft_s": round(st["draft_s"], 3),
            "row_forwards": st["prefills"] + st["row_steps"],
            "tokens_per_forward": round(st["tokens"] / max(st["prefills"] + st["row_steps"], 1), 3)}


def _peak_rss_mb() -> float:
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class _Bar:
    """Progress in recording seconds: decoded speech seconds scaled by recording / speech, so the
    bar ends at the recording's duration although the VAD's non-speech is never decoded."""

    def __init__(self, total: float, label: str, callback=None, scale: float = 1.0):
        self.total, self.done, self.callback, self.scale = total, 0.0, callback, scale
        self.progress = None
        if callback is None:
            from rich.console import Console
            from rich.progress import (BarColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                     TextColumn("{task.completed:.0f}/{task.total:.0f} s audio"),
                                     TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                     console=Console(stderr=True), transient=False)
            self.task = self.progress.add_task(label, total=max(total, 1e-6))
            self.progress.start()

    def advance(self, seconds: float) -> None:
        self.done += seconds * self.scale
        if self.callback:
            self.callback(self.done, self.total)
        else:
            self.progress.update(self.task, completed=min(self.done, self.total))

    def close(self) -> None:
        if self.progress:
            self.progress.update(self.task, completed=self.total)
            self.progress.stop()


def _progress(progress, duration: float, speech: float, source: str | None):
    if not progress:
        return None
    label = Path(source).name if source else "audio"
    return _Bar(duration, label, progress if callable(progress) else None,
                scale=duration / speech if speech > 0 else 1.0)
