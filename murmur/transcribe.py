"""The pipeline: audio → VAD/chunker → scheduler → engine → stitcher → Transcript."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from murmur.audio.decode import N_FRAMES, N_SAMPLES, SAMPLE_RATE, load_audio, log_mel_spectrogram
from murmur.engine.decoding import DecodingOptions
from murmur.engine.kv.cache import KVCache
from murmur.engine.longform import ChunkStream, TimeMap
from murmur.engine.runner import Engine
from murmur.engine.scheduler import StreamScheduler
from murmur.errors import MurmurError
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
    duration = len(audio) / SAMPLE_RATE
    chunk_size = o.chunk_size
    opts = o.decoding_options()
    tok = loaded.tokenizer
    if tok.multilingual and opts.language is None and len(audio):
        opts = opts.with_(language=detect_language(loaded, audio)[0])
    lang = opts.language or "en"
    tok.language = lang
    if not tok.multilingual and lang != "en":
        raise MurmurError(f"model {loaded.name} is English-only; language {lang!r} is not supported")
    kv_policy = o.kv_policy
    if isinstance(kv_policy, str):
        from murmur.engine.kv.policies import parse_kv_policy
        kv_policy = parse_kv_policy(kv_policy, o.kv_opts, loaded)
    hooks = list(o.encoder_hooks)
    if o.encoder_sparsity:
        from murmur.engine.sparsify import parse_encoder_sparsity
        hooks += parse_encoder_sparsity(o.encoder_sparsity, loaded)
    diarize = o.diarize
    word_timestamps = o.word_timestamps or diarize
    plans, vad_s = plan_chunks(audio, chunk_size, o.vad_options)
    streams = [ChunkStream(p.pieces, tok, opts, p.time_map, index=i, n_text_ctx=loaded.model.dims.n_text_ctx,
                           language=lang, word_timestamps=word_timestamps, model=loaded)
               for i, p in enumerate(plans)]
    engine = Engine(loaded, opts, batch_size=o.batch_size, kv_policy=kv_policy, encoder_hooks=hooks,
                    seed=o.seed, max_streams=len(streams))
    speech_total = sum(p.n_samples for p in plans) / SAMPLE_RATE
    bar = _progress(o.progress, duration, speech_total, source)
    scheduler = StreamScheduler(streams, max_open=o.queue_limit or 2 * engine.batch_size,
                                on_progress=bar.advance if bar else None)
    try:
        engine.run(scheduler)
    finally:
        if bar:
            bar.close()
    t_stitch = time.perf_counter()
    from murmur.output.stitcher import stitch
    segments = stitch([s.segments for s in streams])
    stitch_s = time.perf_counter() - t_stitch
    turns, diarize_s = [], 0.0
    if diarize:
        from murmur.speakers.diarize import assign_speakers
        from murmur.speakers.diarize import diarize as run_diarization
        t_d = time.perf_counter()
        turns = run_diarization(audio, num_speakers=o.num_speakers, min_speakers=o.min_speakers,
                                max_speakers=o.max_speakers, options=o.diarize_options,
                                regions=None if chunk_size is None else _speech_regions(plans))
        segments = assign_speakers(segments, turns)
        diarize_s = time.perf_counter() - t_d
    wall = time.perf_counter() - t_start
    stats = {
        "wall_s": round(wall, 3),
        "rtfx": round(duration / wall, 2) if wall > 0 else None,
        "audio_s": round(duration, 3),
        "chunks": len(plans),
        "windows": engine.stats["windows"],
        "fallbacks": sum(s.fallbacks for s in streams),
        "skipped_no_speech": sum(s.skipped_no_speech for s in streams),
        "dropped_repetitive": sum(s.dropped_repetitive for s in streams),
        "vad_s": round(vad_s, 3),
        "encode_s": round(engine.stats["encode_s"], 3),
        "decode_s": round(engine.stats["decode_s"], 3),
        "prefill_s": round(engine.stats["prefill_s"], 3),
        "forward_s": round(engine.stats["forward_s"], 3),
        "stitch_s": round(stitch_s, 4),
        "diarize_s": round(diarize_s, 3),
        "speakers": len({t.speaker for t in turns}),
        "tokens": engine.stats["tokens"],
        "tokens_per_s": round(engine.stats["tokens"] / max(engine.stats["decode_s"], 1e-9), 1),
        "batch_size": engine.batch_size,
        "batch_occupancy": round(engine.stats["row_steps"] / max(engine.stats["slot_steps"], 1), 3),
        "mean_active_rows": round(engine.stats["row_steps"] / max(engine.stats["steps"], 1), 2),
        "chunk_size": "full" if chunk_size is None else chunk_size,
        "peak_rss_mb": _peak_rss_mb(),
        **engine.cache.stats,
    }
    text = "".join(s.text for s in segments).strip()
    return Transcript(text=text, duration=duration, model=loaded.name, segments=segments, language=lang,
                      stats=stats, source=source, turns=turns)


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
