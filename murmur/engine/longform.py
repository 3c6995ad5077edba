"""Long-form rules inside one chunk: OpenAI's sequential algorithm as a resumable stream.

A `ChunkStream` walks its audio in windows of at most 30 s: it submits a window, and when the result
comes back it applies the temperature fallback, the no-speech rule, cuts segments at timestamp pairs,
seeks to the last complete timestamp and carries the text as the next prompt; a window that copies
its prompt (a loop carried across windows) is decoded again without it. Context flows within a chunk
and never across chunks. Many streams interleave in one engine (see murmur.engine.scheduler).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch

from murmur.audio.decode import HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE, log_mel_spectrogram
from murmur.engine.decoding import DecodingOptions, compression_ratio
from murmur.engine.runner import Request
from murmur.models.tokenizer import Tokenizer
from murmur.types import Segment

FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100 mel frames per second
INPUT_STRIDE = 2  # mel frames per encoder frame
TIME_PRECISION = 0.02  # seconds per timestamp token
ECHO_MIN_WORDS = 4  # shorter repeats ("okay, okay") are real speech often enough
ECHO_SHARE = 0.6  # share of a window's word trigrams found in its prompt that marks it a copy
SILENCE_RMS = 1e-4  # -80 dBFS: below any recorded room tone, so only true silence is skipped


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


@dataclass
class TimeMap:
    """Maps time inside a chunk's (possibly spliced) audio back to the recording's clock."""
    src: np.ndarray  # chunk-local start of each piece
    dst: np.ndarray  # absolute start of each piece

    @classmethod
    def identity(cls, offset: float = 0.0) -> "TimeMap":
        return cls(np.array([0.0]), np.array([offset]))

    def __call__(self, t: float) -> float:
        i = max(int(np.searchsorted(self.src, t, side="right")) - 1, 0)
        return float(self.dst[i] + (t - self.src[i]))


@dataclass(eq=False)  # streams are compared by identity
class ChunkStream:
    audio: np.ndarray | list[np.ndarray]  # samples, or pieces spliced together only while open
    tokenizer: Tokenizer
    options: DecodingOptions
    time_map: TimeMap = field(default_factory=TimeMap.identity)
    index: int = 0
    n_text_ctx: int = 448
    language: str | None = None
    # progress
    seek: int = 0
    segments: list[Segment] = field(default_factory=list)
    waiting: bool = False
    done: bool = False
    windows: int = 0
    fallbacks: int = 0
    echo_retries: int = 0
    skipped_no_speech: int = 0
    dropped_repetitive: int = 0
    # opt-in word timestamps (murmur.speakers.timing), aligned per window from its encoder output
    word_timestamps: bool = False
    model: object = None  # the LoadedModel that decodes; word timing runs it once more per window

    def __post_init__(self):
        self.mel: torch.Tensor | None = None
        self._pieces = self.audio if isinstance(self.audio, list) else [self.audio]
        self.audio = None  # the spliced samples, held while open
        self.n_samples = sum(len(p) for p in self._pieces)
        self.content_frames = int(round(self.n_samples / HOP_LENGTH))
        self.all_tokens: list[int] = []
        self.prompt_reset_since = 0
        if self.options.initial_prompt:
            self.all_tokens = self.tokenizer.encode(" " + self.options.initial_prompt.strip())
        self.done = self.content_frames == 0
        self.seconds_done = 0.0
        self.last_speech = 0.0  # end of the last word, for timing's pause heuristics
        self.tail_draft: list[int] | None = None  # the last window's unfinished tail: the next one's draft

    @property
    def duration(self) -> float:
        return self.n_samples / SAMPLE_RATE

    def open(self) -> None:
        if self.mel is None:
            p = self._pieces
            self.audio = p[0] if len(p) == 1 else np.concatenate(p)
            # padded like openai-whisper so the last window sees the same silence floor
            self.mel = log_mel_spectrogram(self.audio, padding=N_SAMPLES)

    def close(self) -> None:
        self.mel = self.audio = None
        self._pieces = []

    # --- the window protocol -----------------------------------------------------------------
    def next_request(self) -> Request | None:
        if self.done or self.waiting:
            return None
        self.open()
        size = min(N_FRAMES, self.content_frames - self.seek)
        while self._is_silent(size):
            # digital silence makes Whisper hallucinate ("you you you"): never decode it
            self.skipped_no_speech += 1
            self._move(size)
            if self.done:
                return None
            size = min(N_FRAMES, self.content_frames - self.seek)
        seg = self.mel[:, self.seek:self.seek + N_FRAMES]
        if seg.shape[-1] < N_FRAMES:
            seg = torch.nn.functional.pad(seg, (0, N_FRAMES - seg.shape[-1]))
        self.waiting = True
        self.windows += 1
        req = self._request(seg, self.options.temperature[0], size)
        req.draft, self.tail_draft = self.tail_draft, None
        return req

    def _is_silent(self, size: int) -> bool:
        a = self.audio[self.seek * HOP_LENGTH:(self.seek + size) * HOP_LENGTH]
        return a.size == 0 or float(np.sqrt(np.mean(a.astype(np.float64) ** 2))) < SILENCE_RMS

    def _request(self, mel, temperature: float, size: int, features=None, prompted: bool = True) -> Request:
        tok = self.tokenizer
        prompt = []
        context = self.all_tokens[self.prompt_reset_since:] if prompted else []
        if context:
            prompt = [tok.sot_prev] + context[-(self.n_text_ctx // 2 - 1):]
        prompt += tok.sot_sequence(self.language, timestamps=not self.options.without_timestamps)
        sample_len = self.options.sample_len or self.n_text_ctx // 2
        sample_len = min(sample_len, self.n_text_ctx - len(prompt))
        o = self.options
        t_index = o.temperature.index(temperature)
        stoppable = (o.stop_loops_early and o.compression_ratio_threshold is not None
                     and t_index + 1 < len(o.temperature))
        stop = self._over_compression if stoppable else None
        return Request(mel=mel, prompt=prompt, temperature=temperature, sample_len=sample_len, owner=self,
                       tag={"size": size, "t_index": t_index, "prompted": bool(context)}, features=features, stop_check=stop,
                       key=(self._window_start_cs(), t_index))

    def _window_start_cs(self) -> int:
        """Where the window starts in the recording, in centiseconds: what it is, whatever the batch."""
        return int(round(self.time_map(self.seek * HOP_LENGTH / SAMPLE_RATE) * 100))

    def _text(self, tokens: list[int]) -> str:
        """The text of `tokens`, timestamps, specials and eot left out."""
        eot = self.tokenizer.eot
        return self.tokenizer.decode([t for t in tokens if t < eot])

    def _ratio(self, tokens: list[int]) -> float:
        return compression_ratio(self._text(tokens))

    def _over_compression(self, tokens: list[int]) -> bool:
        return self._ratio(tokens) > self.options.compression_ratio_threshold

    def _echoes_prompt(self, req: Request, text: str) -> bool:
        """True when most of the window's word trigrams (at least ECHO_MIN_WORDS words of `text`, its
        decoded tokens) are in its prompt."""
        words = _words(text)
        if len(words) < ECHO_MIN_WORDS:
            return False
        context = _words(self._text(req.prompt))
        seen = set(zip(context, context[1:], context[2:]))
        grams = list(zip(words, words[1:], words[2:]))
        return sum(g in seen for g in grams) >= ECHO_SHARE * len(grams)

    def on_result(self, req: Request) -> Request | None:
        """Apply the fallback and seek rules; returns a retry request when the window must be redone."""
        o = self.options
        text = self._text(req.tokens)
        ratio = compression_ratio(text)
        too_repetitive = req.stopped or (o.compression_ratio_threshold is not None
                                         and ratio > o.compression_ratio_threshold)
        too_unsure = o.logprob_threshold is not None and req.avg_logprob < o.logprob_threshold
        silent = o.no_speech_threshold is not None and req.no_speech_prob > o.no_speech_threshold
        needs_fallback = (too_repetitive or too_unsure) and not (silent and too_unsure)
        t_index = req.tag["t_index"]
        prompted = req.tag["prompted"]
        if prompted and not needs_fallback and self._echoes_prompt(req, text):
            # the window copied its prompt (a loop carried across windows): decode it afresh
            self.echo_retries += 1
            return self._request(req.mel, o.temperature[t_index], req.tag["size"], req.features, prompted=False)
        if needs_fallback and t_index + 1 < len(o.temperature):
            self.fallbacks += 1
            retry = self._request(req.mel, o.temperature[t_index + 1], req.tag["size"], req.features,
                                  prompted=prompted)
            retry.draft = req.tokens  # the rejected decode drafts the re-decode
            return retry
        self.waiting = False
        if not prompted:
            self.prompt_reset_since = len(self.all_tokens)  # what follows never sees the dropped context
        self._advance(req, ratio, drop=needs_fallback and too_repetitive)
        return None

    def _advance(self, req: Request, ratio: float, drop: bool) -> None:
        o, tok = self.options, self.tokenizer
        size = req.tag["size"]
        offset = self.seek * HOP_LENGTH / SAMPLE_RATE
        tokens = req.tokens
        skip = False
        if o.no_speech_threshold is not None and req.no_speech_prob > o.no_speech_threshold:
            skip = o.logprob_threshold is None or req.avg_logprob <= o.logprob_threshold
        if skip or drop:
            # silence, or a repetition loop that survived every temperature: emit nothing
            self.skipped_no_speech += skip
            self.dropped_repetitive += drop and not skip
            self._move(size)
            return
        tsb = tok.timestamp_begin
        is_ts = [t >= tsb for t in tokens]
        single_ending = is_ts[-2:] == [False, True]
        consecutive = [i + 1 for i in range(len(tokens) - 1) if is_ts[i] and is_ts[i + 1]]
        new: list[Segment] = []
        temp = o.temperature[req.tag["t_index"]]

        def add(start: float, end: float, toks: list[int]) -> None:
            text = tok.decode(toks)
            if end <= start or not text.strip():
                return  # instantaneous or empty: whisper drops these too
            new.append(Segment(start=self.time_map(start), end=self.time_map(end), text=text,
                               tokens=list(toks), avg_logprob=req.avg_logprob,
                               compression_ratio=ratio, no_speech_prob=req.no_speech_prob, temperature=temp))

        if consecutive:
            slices = consecutive + ([len(tokens)] if single_ending else [])
            last = 0
            for cur in slices:
                piece = tokens[last:cur]
                add(offset + (piece[0] - tsb) * TIME_PRECISION, offset + (piece[-1] - tsb) * TIME_PRECISION, piece)
                last = cur
            if single_ending:
                advance = size
            else:
                advance = (tokens[last - 1] - tsb) * INPUT_STRIDE
                # the next window starts at that stamp and transcribes the unfinished tail again
                shift = tokens[last - 1] - tsb
                tail = [max(t - shift, tsb) if t >= tsb else t for t in tokens[last:]]
                self.tail_draft = tail if any(t < tsb for t in tail) else None  # often only the stamp
        else:
            duration = size * HOP_LENGTH / SAMPLE_RATE
            stamps = [t for t in tokens if t >= tsb]
            if stamps and stamps[-1] != tsb:
                duration = (stamps[-1] - tsb) * TIME_PRECISION
            add(offset, offset + duration, tokens)
            advance = size
        if self.word_timestamps and new:
            self._add_words(req, new, offset, size)
        self.segments.extend(new)
        for s in new:
            self.all_tokens.extend(s.tokens)  # with timestamps, as openai-whisper prompts
        if not o.condition_on_previous_text or temp > o.prompt_reset_on_temperature:
            self.prompt_reset_since = len(self.all_tokens)
        self._move(advance if advance > 0 else size)  # always move forward: no loops

    def _add_words(self, req: Request, new: list[Segment], offset: float, size: int) -> None:
        from murmur.speakers.timing import add_word_timestamps
        model = self.model.model
        feats = req.features
        if feats is None or feats.shape[1] != model.dims.n_audio_ctx:
            # a frame-dropping encoder hook ran: frame indices no longer map to time, so re-encode
            with torch.inference_mode():
                feats = model.encoder(req.mel[None].to(model.device, model.dtype))
        self.last_speech = add_word_timestamps(
            self.model, new, feats, tokenizer=self.tokenizer, time_offset=offset, num_frames=size,
            time_map=self.time_map, last_speech_timestamp=self.last_speech,
            floor=self.segments[-1].end if self.segments else None)

    def _move(self, frames: int) -> None:
        self.seek = min(self.seek + frames, self.content_frames)
        self.seconds_done = self.seek / FRAMES_PER_SECOND
        if self.seek >= self.content_frames:
            self.done = True
            self.close()
