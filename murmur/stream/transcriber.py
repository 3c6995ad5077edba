"""A streaming transcriber: feed audio as it arrives, get committed and tentative words back.

Per stream the state is explicit and small:
- `buffer`: the audio since the last trim (a committed sentence end, or a turn's end);
- the committed tokens trimmed out of the buffer, carried as the decoder's prompt;
- the committed words still inside the buffer (the next hypothesis repeats them; they are matched
  and skipped, never emitted twice);
- the last hypotheses (what the commit policy compares);
- the VAD's recurrent state (murmur.stream.vad).

Every `step_s` of new audio while a turn is open, the buffer is decoded as one window, padded with
silence to 30 s or by `encoder_pad_s` (a `Request` for the engine: many streams' updates decode as
rows of one batch), words get times from the alignment heads + DTW (murmur.timing), and a commit
policy decides which words are settled:
- `local-agreement` (LocalAgreement-n, whisper_streaming): the prefix the last n updates agree on,
  and past it the words whose audio ended `max_wait_s` before the audio heard;
- `align-att` (AlignAtt, SimulStreaming): the prefix whose tokens' cross-attention peaks more than
  `frame_threshold` encoder frames before the end of the audio heard so far.
A turn ends after `min_silence_s` of VAD silence: its words are all committed and the buffer
emptied. Updates happen at fixed audio positions (multiples of `step_s`, turn ends), so how the
audio is cut into pieces never changes what is committed.
"""
from __future__ import annotations

import difflib
import itertools
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from murmur.audio.decode import HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE, log_mel_spectrogram
from murmur.engine.decoding import DecodingOptions, compression_ratio
from murmur.engine.runner import Request
from murmur.errors import MurmurError
from murmur.stream.scheduler import live_engine
from murmur.stream.vad import StreamingVad
from murmur.speakers.timing import cross_attention, merge_punctuations, split_words, timings_from_path, token_frames
from murmur.types import Word

POLICIES = ("local-agreement", "align-att")
SENTENCE_END = ".?!。！？"
ENCODER_FPS = SAMPLE_RATE / HOP_LENGTH / 2  # 50 encoder frames a second
PAD_BLOCK = 200  # mel frames (2 s) the encoder's input is rounded up to
# and at least this long: below 600 encoder frames oneDNN's bf16 GEMMs (AMX Xeon) split their sums
# by the thread count (1 and 2 threads gave other bits), so a stream's words would depend on the load
MIN_INPUT = 1200
_ids = itertools.count()


@dataclass
class StreamOptions:
    policy: str = "local-agreement"
    agreement: int = 2  # n of LocalAgreement-n
    frame_threshold: int = 25  # align-att: encoder frames (20 ms) before the end of audio heard
    # local-agreement: a word whose audio ended this long before the audio heard is committed from the
    # latest hypothesis, agreed or not (in crosstalk updates may not agree until the turn ends); None: never
    max_wait_s: float | None = 2.0
    step_s: float = 0.5  # an update every step_s of audio while a turn is open
    max_backlog_s: float = 0.0  # a feed that brings updates further apart than this runs only its latest
    trim_s: float = 10.0  # past this the buffer is cut at its last committed sentence end
    max_buffer_s: float = 20.0  # past this at its last committed word
    # seconds: the encoder sees the buffer and this much silence (rounded up to 2 s), not the whole
    # 30-s window; a 5-s buffer then encodes in a third of the time, but the words shift more
    # (docs/benchmarks.md, live transcription). None: the whole window, as Whisper was trained
    encoder_pad_s: float | None = None
    vad: bool = True  # turn detection; off: one turn until flush(), every step decoded
    vad_threshold: float = 0.5
    min_silence_s: float = 0.5  # silence that ends a turn
    prefix_padding_s: float = 0.3  # audio kept before detected speech
    language: str | None = None  # None: detected on a multilingual model, until its first committed word
    prompt: str | None = None  # text the first update is conditioned on
    prompt_tokens: int = 128  # committed tokens carried as the prompt (0: none)
    no_speech_threshold: float = 0.6
    logprob_threshold: float = -1.0
    compression_ratio_threshold: float = 2.4

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise MurmurError(f"unknown commit policy {self.policy!r}; choose from {', '.join(POLICIES)}")
        if self.agreement < 2:
            raise MurmurError(f"LocalAgreement-n needs n >= 2, got {self.agreement}")
        if not 0.05 <= self.step_s <= 10:
            raise MurmurError(f"step_s must be within [0.05, 10] s, got {self.step_s}")
        if not 0 < self.trim_s <= self.max_buffer_s <= 25:
            raise MurmurError(f"need 0 < trim_s <= max_buffer_s <= 25, got {self.trim_s}, {self.max_buffer_s}")
        if not 0 <= self.prompt_tokens <= 223:  # half the decoder's 448 positions, as Whisper's prompts
            raise MurmurError(f"prompt_tokens must be within [0, 223], got {self.prompt_tokens}")
        if self.max_wait_s is not None and not 0 <= self.max_wait_s <= 30:
            raise MurmurError(f"max_wait_s must be within [0, 30] s or None, got {self.max_wait_s}")
        if self.encoder_pad_s is not None and not 0 <= self.encoder_pad_s <= 30:
            raise MurmurError(f"encoder_pad_s must be within [0, 30] s or None, got {self.encoder_pad_s}")


@dataclass
class StreamEvent:
    kind: str  # speech_started | speech_stopped | turn_completed
    time: float  # stream seconds
    text: str = ""  # turn_completed: the turn's committed text
    after: int = 0  # how many of the result's committed words came before it


@dataclass
class StreamResult:
    committed: list[Word] = field(default_factory=list)  # newly committed by this call, in order
    tentative: list[Word] = field(default_factory=list)  # the current hypothesis past the committed words
    events: list[StreamEvent] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(w.word for w in self.committed)

    @property
    def tentative_text(self) -> str:
        return "".join(w.word for w in self.tentative)

    def add(self, ev: StreamEvent) -> None:
        ev.after = len(self.committed)
        self.events.append(ev)

    def extend(self, other: "StreamResult") -> None:
        for ev in other.events:
            ev.after += len(self.committed)
        self.committed += other.committed
        self.tentative = other.tentative
        self.events += other.events


class Decoder(Protocol):
    """Runs one request to completion (blocking) and returns it with tokens and features."""
    def decode(self, req: Request) -> Request: ...


class _Once:
    """A scheduler of one request, for decoding without a shared engine."""

    def __init__(self, req: Request):
        self.todo, self.done = [req], False

    def pop_ready(self, n: int) -> list[Request]:
        out, self.todo = self.todo, []
        return out

    def complete(self, req: Request) -> None:
        self.done = True

    def finished(self) -> bool:
        return self.done


class LocalDecoder:
    """A private one-row engine: one stream, decoded in the caller's thread."""

    def __init__(self, loaded, recycle: bool = True):
        self.engine = live_engine(loaded, DecodingOptions(), 1, recycle)

    def decode(self, req: Request) -> Request:
        self.engine.run(_Once(req))
        return req


@dataclass
class _W:
    """A hypothesis word: text with its tokens, stream times, and the latest encoder frame its
    tokens attend most (align-att)."""
    word: str
    tokens: list[int]
    start: float
    end: float
    probability: float
    peak: int = 0

    @property
    def norm(self) -> str:
        return re.sub(r"[^\w']", "", self.word.lower())

    def public(self) -> Word:
        return Word(round(self.start, 3), round(self.end, 3), self.word, round(self.probability, 4))


class StreamingTranscriber:
    """One live stream. `feed(pcm)` as audio arrives, `flush()` at the end of input (or to force a
    turn end), `close()` to release it. Each returns a StreamResult."""

    def __init__(self, model="tiny.en", options: StreamOptions | None = None, *, decoder: Decoder | None = None,
                 **kw):
        from murmur.models.common import LoadedModel
        if not isinstance(model, LoadedModel):
            from murmur.models.loading import get_model
            model = get_model(model)
        self.loaded = model
        self.tok = model.tokenizer
        self.opts = options or StreamOptions(**kw)
        from murmur.transcribe import check_language
        check_language(model, self.opts.language)
        self.decoder = decoder or LocalDecoder(model)
        self.id = next(_ids)
        self.closed = False
        o = self.opts
        self.vad = StreamingVad(threshold=o.vad_threshold, min_silence_s=o.min_silence_s,
                                prefix_padding_s=o.prefix_padding_s) if o.vad else None
        self.buffer = np.zeros(0, np.float32)
        self.buffer_start = 0  # sample index of buffer[0]
        self.received = 0  # samples fed so far
        self.next_update = self._n(o.step_s)
        self.turn_open = not o.vad
        self.language = o.language
        self.detecting = self.tok.multilingual and not o.language  # the language is not settled yet
        self.context: list[int] = []
        self._carry(self.tok.encode(" " + o.prompt.strip()) if o.prompt else [])
        self.in_buffer: list[_W] = []  # committed words inside the buffer
        self.history: deque[list[_W]] = deque(maxlen=o.agreement - 1)  # past hypotheses, committed part removed
        self.last_end = 0.0  # end of the last committed word
        self.last_update = -1  # sample position of the last update inside a turn
        self.turn_text: list[str] = []
        self.updates = 0
        self.last_tokens: list[int] = []  # the last update's decode
        self.stats = {"updates": 0, "decode_s": 0.0, "align_s": 0.0, "trims": 0, "turns": 0, "detections": 0}

    # --- public ------------------------------------------------------------------------------
    def feed(self, pcm) -> StreamResult:
        """Append audio: float samples in [-1, 1] or int16 PCM (array or s16le bytes), 16 kHz mono."""
        self._check_open()
        a = as_samples(pcm)
        res = StreamResult()
        if a.size == 0:
            return res
        self.received += a.size
        self.buffer = np.concatenate([self.buffer, a]) if self.buffer.size else a.copy()
        plan: list[tuple[int, int, object]] = []  # (sample position, order, what)
        if self.vad is not None:
            for ev in self.vad.feed(a):
                plan.append((self._n(ev.at), 0, ev))
        o = self.opts
        updates = []
        while self.next_update <= self.received:
            updates.append(self.next_update)
            self.next_update += self._n(o.step_s)
        if updates and updates[-1] - updates[0] > self._n(o.max_backlog_s):
            updates = updates[-1:]  # far behind real time: decode only the newest audio
        plan += [(p, 1, None) for p in updates]
        for pos, _, ev in sorted(plan, key=lambda x: (x[0], x[1])):
            if ev is None:
                if self.turn_open:
                    res.extend(self._update(pos, final=False))
            elif ev.kind == "speech_started":
                res.add(StreamEvent(ev.kind, ev.time))
                if not self.turn_open:
                    self.turn_open = True
                    self._drop_until(self._n(ev.time))
            else:
                res.add(StreamEvent(ev.kind, ev.time))
                if self.turn_open:
                    res.extend(self._end_turn(pos, speech_end=self._n(ev.time)))
        if not self.turn_open:
            # between turns keep only what a starting turn may need (its prefix padding)
            self._drop_until(self.received - self._n(o.prefix_padding_s + 0.2))
        return res

    def flush(self) -> StreamResult:
        """Decode what is buffered and commit all of it, ending the turn (the stream stays open)."""
        self._check_open()
        if self.vad is not None and not self.turn_open:
            return StreamResult()
        res = self._end_turn(self.received)
        if self.vad is None:
            self.turn_open = True
        return res

    def clear(self) -> None:
        """Drop the audio and words not yet committed (the committed context and VAD state stay)."""
        self._check_open()
        self._carry([t for w in self.in_buffer for t in w.tokens])
        self.in_buffer, self.turn_text = [], []
        self.history.clear()
        self._drop_until(self.received)
        self.turn_open = self.vad is None

    def close(self) -> StreamResult:
        if self.closed:
            return StreamResult()
        res = self.flush()
        self.closed = True
        self.buffer = np.zeros(0, np.float32)
        self.history.clear()
        self.in_buffer = []
        return res

    @property
    def time(self) -> float:
        return self.received / SAMPLE_RATE

    def memory_bytes(self) -> int:
        """Bytes this stream holds (audio buffer, tokens, hypotheses): bounded while idle."""
        words = len(self.in_buffer) + sum(len(h) for h in self.history)
        return int(self.buffer.nbytes + 8 * len(self.context) + 200 * words
                   + sum(len(t) for t in self.turn_text) + 2 * 128 * 4 + 64 * 4)

    # --- one update ----------------------------------------------------------------------------
    def _update(self, pos: int, final: bool) -> StreamResult:
        audio = self.buffer[: pos - self.buffer_start]
        res = StreamResult()
        if audio.size < self._n(0.1):
            return res
        hyp = self._hypothesis(audio)
        self.last_update = pos
        new = self._unseen(hyp)
        o = self.opts
        if final:
            settled = new
        elif o.policy == "local-agreement":
            settled = new if len(self.history) == o.agreement - 1 else []
            for past in self.history:
                settled = _common_prefix(settled, past)
            if o.max_wait_s is not None:
                heard = (self.buffer_start + audio.size) / SAMPLE_RATE
                settled = settled + list(itertools.takewhile(lambda w: w.end < heard - o.max_wait_s, new[len(settled):]))
        else:
            end_frame = audio.size / HOP_LENGTH / 2
            settled = list(itertools.takewhile(lambda w: w.peak < end_frame - o.frame_threshold, new))
        committed = self._commit(settled)
        rest = new[len(settled):]
        # past hypotheses lose the words just committed (they agreed on them)
        self.history = deque((h[len(settled):] for h in self.history), maxlen=o.agreement - 1)
        self.history.appendleft(rest)
        res.committed = committed
        res.tentative = [w.public() for w in rest]
        if not final:
            self._trim(pos)
        return res

    def _end_turn(self, pos: int, speech_end: int | None = None) -> StreamResult:
        """Commit the rest of the turn. When no speech came after the last update (`speech_end`,
        the VAD's), its tentative words are the rest: decoding again would hear only the silence
        of the turn's end, where Whisper says "Thank you." (1.6 % WER offline, 8.6 % live on
        LJSpeech before this rule)."""
        if not self.turn_open:
            res = StreamResult()
        elif speech_end is not None and speech_end <= self.last_update:
            res = StreamResult(committed=self._commit(self.history[0] if self.history else []))
        else:
            res = self._update(pos, final=True)
        text = "".join(self.turn_text).strip()
        res.add(StreamEvent("turn_completed", pos / SAMPLE_RATE, text))
        res.tentative = []
        self.turn_text = []
        self.stats["turns"] += 1
        self._carry([t for w in self.in_buffer for t in w.tokens])
        self.in_buffer = []
        self.history.clear()
        self.turn_open = False
        self._drop_until(pos)
        return res

    def _request(self, audio: np.ndarray) -> Request:
        tok, o = self.tok, self.opts
        frames = N_FRAMES
        if o.encoder_pad_s is not None:  # whole 2-s blocks: few distinct shapes for the kernels' caches
            need = audio.size / HOP_LENGTH + o.encoder_pad_s * SAMPLE_RATE / HOP_LENGTH
            frames = min(N_FRAMES, max(MIN_INPUT, int(np.ceil(need / PAD_BLOCK)) * PAD_BLOCK))
        mel = log_mel_spectrogram(audio, n_mels=self.loaded.model.dims.n_mels, padding=N_SAMPLES)[:, :frames]
        prompt = [tok.sot_prev] + self.context if self.context else []
        prompt += tok.sot_sequence(self.language, timestamps=True)
        seconds = audio.size / SAMPLE_RATE
        sample_len = min(224, int(8 * seconds) + 16)  # ~3 tokens/s of speech; a loop stops here

        def looping(tokens: list[int]) -> bool:
            return self._ratio(tokens) > o.compression_ratio_threshold

        # the last update's tokens on the same buffer start draft this one: the engine verifies them
        # in a few forwards and decodes one by one only past where they diverge (murmur.spec.recycle)
        return Request(mel=mel, prompt=prompt, temperature=0.0, sample_len=sample_len, owner=self,
                       draft=list(self.last_tokens) or None, stop_check=looping, key=(self.id, self.updates))

    def _ratio(self, tokens: list[int]) -> float:
        return compression_ratio(self.tok.decode([t for t in tokens if t < self.tok.eot]))

    def _hypothesis(self, audio: np.ndarray) -> list[_W]:
        o, tok = self.opts, self.tok
        self.updates += 1
        self.stats["updates"] += 1
        t0 = time.perf_counter()
        if self.detecting:  # Whisper's detection on the buffer, as a file's on its first 30 s
            from murmur.transcribe import detect_language
            self.language = detect_language(self.loaded, audio)[0]
            self.stats["detections"] += 1
        req = self.decoder.decode(self._request(audio))
        self.stats["decode_s"] += time.perf_counter() - t0
        self.last_tokens = list(req.tokens)
        text = [t for t in req.tokens if t < tok.eot]
        if not text or req.stopped or self._ratio(text) > o.compression_ratio_threshold:
            return []
        if req.no_speech_prob > o.no_speech_threshold and req.avg_logprob < o.logprob_threshold:
            return []
        t0 = time.perf_counter()
        words = self._align(req.features, text, audio.size)
        self.stats["align_s"] += time.perf_counter() - t0
        return words

    def _align(self, features: torch.Tensor, text: list[int], n_samples: int) -> list[_W]:
        tok = self.tok
        frames = max(2, int(round(n_samples / HOP_LENGTH)))  # mel frames of real audio
        weights, probs, row0 = cross_attention(self.loaded, features, text, tok, language=self.language)
        ti, fi = token_frames(weights, row0, len(text), frames)
        words, groups = split_words(tok, text)
        timing = timings_from_path(words, groups, probs, ti, fi)
        merge_punctuations(timing)
        # align-att: the frame each token's alignment heads attend most, over the real frames
        n = max(1, min(frames // 2, weights.shape[-1]))
        att = weights[:, row0:row0 + len(text), :n].mean(0)
        peaks = att.argmax(-1).tolist()
        offset = self.buffer_start / SAMPLE_RATE
        out, k = [], 0
        for t in timing:
            if not t.word:
                continue
            m = len(t.tokens)
            out.append(_W(t.word, list(t.tokens), offset + t.start, offset + t.end, t.probability,
                          max(peaks[k:k + m]) if m else 0))
            k += m
        return out

    # --- commits -------------------------------------------------------------------------------
    def _unseen(self, hyp: list[_W]) -> list[_W]:
        """The hypothesis past the committed words still in the buffer. They are matched as a word
        sequence at its start; where the decoder rewrote them, by time, then by overlap."""
        done = self.in_buffer
        if not done:
            return hyp
        a, b = [w.norm for w in done], [w.norm for w in hyp]
        k = len(a)
        if b[:k] == a:
            return hyp[k:]
        sm = difflib.SequenceMatcher(None, a, b[: k + 3], autojunk=False)
        blocks = [m for m in sm.get_matching_blocks() if m.size]
        if blocks and blocks[-1].a + blocks[-1].size == k and sum(m.size for m in blocks) * 2 >= k:
            return hyp[blocks[-1].b + blocks[-1].size:]
        # whisper_streaming's rule: words that start before the last commit ended are old, and an
        # n-gram at the head that repeats the committed tail is dropped
        rest = [w for w in hyp if w.start >= self.last_end - 0.1]
        for n in range(min(5, len(rest), len(a)), 0, -1):
            if [w.norm for w in rest[:n]] == a[-n:]:
                return rest[n:]
        return rest

    def _commit(self, words: list[_W]) -> list[Word]:
        self.detecting = self.detecting and not words  # words in a language settle it
        out = []
        for w in words:
            w.start = max(w.start, self.last_end)  # times never go back
            w.end = max(w.end, w.start)
            self.last_end = w.end
            self.in_buffer.append(w)
            self.turn_text.append(w.word)
            out.append(w.public())
        return out

    def _trim(self, pos: int) -> None:
        """Cut the buffer at its last committed sentence end once it is longer than trim_s, or at
        its last committed word past max_buffer_s; the cut words become prompt."""
        o = self.opts
        length = (pos - self.buffer_start) / SAMPLE_RATE
        if length <= o.trim_s or not self.in_buffer:
            if length > 25.0:  # nothing settles (noise, one endless word): keep the window bounded
                self._drop_until(pos - self._n(o.max_buffer_s))
            return
        cut = None
        for i in range(len(self.in_buffer) - 1, -1, -1):
            if self.in_buffer[i].word.rstrip().endswith(tuple(SENTENCE_END)):
                cut = i
                break
        if cut is None and length > o.max_buffer_s:
            cut = len(self.in_buffer) - 1
        if cut is None:
            return
        gone, self.in_buffer = self.in_buffer[:cut + 1], self.in_buffer[cut + 1:]
        self._carry([t for w in gone for t in w.tokens])
        self.stats["trims"] += 1
        self._drop_until(self._n(gone[-1].end))

    def _carry(self, tokens: list[int]) -> None:
        """Committed tokens leave the buffer for the prompt, which keeps its last prompt_tokens."""
        n = self.opts.prompt_tokens
        self.context = (self.context + tokens)[-n:] if n else []

    def _drop_until(self, sample: int) -> None:
        sample = min(max(sample, self.buffer_start), self.received)
        if sample > self.buffer_start:
            self.last_tokens = []  # its timestamps were on the old buffer's clock
            self.buffer = self.buffer[sample - self.buffer_start:].copy()
            self.buffer_start = sample

    def _check_open(self) -> None:
        if self.closed:
            raise MurmurError("stream is closed")

    @staticmethod
    def _n(seconds: float) -> int:
        return int(round(seconds * SAMPLE_RATE))


def _common_prefix(a: list[_W], b: list[_W]) -> list[_W]:
    out = []
    for x, y in zip(a, b):
        if x.norm != y.norm or not x.norm:
            break
        out.append(x)
    return out


def as_samples(pcm) -> np.ndarray:
    """float32 mono samples from float samples, int16 PCM, or s16le bytes."""
    if isinstance(pcm, (bytes, bytearray, memoryview)):
        b = bytes(pcm)
        if len(b) % 2:
            raise MurmurError(f"s16le PCM needs an even number of bytes, got {len(b)}")
        return np.frombuffer(b, dtype="<i2").astype(np.float32) / 32768.0
    a = np.asarray(pcm)
    if a.ndim != 1:
        raise MurmurError(f"expected mono samples (1-D), got shape {a.shape}")
    if np.issubdtype(a.dtype, np.integer):
        return a.astype(np.float32) / float(np.iinfo(a.dtype).max + 1)
    a = a.astype(np.float32, copy=False)
    if a.size and not np.isfinite(a).all():
        raise MurmurError("audio contains NaN or infinite samples")
    return a
