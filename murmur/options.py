"""TranscribeOptions: every setting of one transcription, its default and its check in one place.

The Python API (`murmur.transcribe(audio, model, chunk_size=30, ...)` builds one from its keywords),
the CLI, and text sources such as HTTP form fields or a JSONL batch manifest
(`TranscribeOptions.from_mapping`, which parses strings) all build this one object.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Mapping

from murmur.audio.chunker import parse_chunk_size
from murmur.engine.decoding import DecodingOptions
from murmur.engine.kv.policies import check_kv_policy
from murmur.engine.sparsify import sparsity_spec
from murmur.errors import MurmurError, OptionsError
from murmur.models.loading import COMPUTE_TYPES
from murmur.models.tokenizer import LANGUAGES

TASKS = ("transcribe", "translate")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_NONE = ("", "none", "null")
# settings that are Python objects: a mapping of strings cannot give them
_OBJECTS = ("decoding", "vad_options", "encoder_hooks", "diarize_options")
_ALIASES = {"prompt": "initial_prompt", "kv_opt": "kv_opts"}


@dataclass(frozen=True)
class TranscribeOptions:
    """How to transcribe one recording. None means "the default" where a field allows it.

    Decoding rules beyond the fields here (thresholds, suppression, ...) go in `decoding`, a
    DecodingOptions; the fields here override it where set."""
    # chunking: seconds cut at silences (30, the best measured; see docs/benchmarks.md), or
    # None / "full" for sequential mode over the whole recording
    chunk_size: float | str | None = 30
    batch_size: int = 16  # decoder rows decoded together
    # decoding
    language: str | None = None  # None: English for .en models, detected for multilingual ones
    task: str | None = None  # transcribe | translate
    temperature: float | tuple[float, ...] | None = None  # one value disables fallback
    beam_size: int = 1  # 1 = greedy
    best_of: int | None = None  # candidates when sampling at temperature > 0
    initial_prompt: str | None = None  # text to condition the first window on
    condition_on_previous_text: bool | None = None
    decoding: DecodingOptions | None = None
    # the model, when given by name
    device: str | None = None  # cpu | cuda; None: cuda when available
    compute_type: str = "auto"
    threads: int | None = None  # torch threads; None: $MURMUR_THREADS, else the idle cores
    # inside a chunk
    vad_options: Any = None  # murmur.audio.vad.VadOptions; None: vad.meeting_options()
    kv_policy: Any = None  # a policy object or a spec such as 'output-window+speech-follow'
    kv_opts: dict[str, str] | None = None  # the policy's KEY=VALUE parameters
    encoder_sparsity: str | None = None  # 'LAYER:FRACTION[:STRIDE]' or 'off'
    speculative: Any = None  # a murmur.spec Speculator or a spec such as 'recycle'; None/'none': off
    spec_opts: dict[str, str] | None = None  # its KEY=VALUE parameters
    encoder_hooks: tuple = ()
    # speakers: one speaker map for the whole recording (diarize turns word timestamps on)
    word_timestamps: bool = False
    diarize: bool = False
    num_speakers: int | None = None
    min_speakers: int = 1
    max_speakers: int | None = None
    diarize_options: Any = None  # murmur.speakers.diarize.DiarizeOptions, e.g. overlap=False
    # running
    queue_limit: int | None = None  # chunks holding their features at once; None: 2 x batch size
    seed: int = 0  # seeds the sampling of temperature fallbacks, so a run is reproducible
    progress: bool | Callable[[float, float], None] = False  # a bar on stderr, or f(done_s, total_s)

    def __post_init__(self):
        fix = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        if isinstance(self.chunk_size, str):
            try:
                fix("chunk_size", parse_chunk_size(self.chunk_size))
            except ValueError as e:
                raise OptionsError(str(e)) from None
        elif self.chunk_size is not None:
            _number("chunk_size", self.chunk_size, positive=True)
        _integer("batch_size", self.batch_size, 1)
        _integer("beam_size", self.beam_size, 1)
        _integer("best_of", self.best_of, 1, optional=True)
        _integer("threads", self.threads, 1, optional=True)
        _integer("num_speakers", self.num_speakers, 1, optional=True)
        _integer("min_speakers", self.min_speakers, 1)
        _integer("max_speakers", self.max_speakers, self.min_speakers, optional=True)
        _integer("queue_limit", self.queue_limit, 1, optional=True)
        _integer("seed", self.seed, None)
        if self.language is not None and self.language not in LANGUAGES:
            raise OptionsError(f"language {self.language!r}: expected a Whisper language code such as en, de, fr")
        if self.task is not None and self.task not in TASKS:
            raise OptionsError(f"task {self.task!r}: expected {' or '.join(TASKS)}")
        if self.compute_type not in COMPUTE_TYPES:
            raise OptionsError(f"compute type {self.compute_type!r}: choose one of {', '.join(COMPUTE_TYPES)}")
        if self.temperature is not None:
            temps = (self.temperature,) if isinstance(self.temperature, (int, float)) else tuple(self.temperature)
            if not temps:
                raise OptionsError("temperature: give at least one value")
            for t in temps:
                _number("temperature", t, positive=False)
            fix("temperature", tuple(float(t) for t in temps))
        for name in ("word_timestamps", "diarize", "condition_on_previous_text"):
            v = getattr(self, name)
            if not (isinstance(v, bool) or v is None and name == "condition_on_previous_text"):
                raise OptionsError(f"{name}: expected true or false, got {v!r}")
        if self.decoding is not None and not isinstance(self.decoding, DecodingOptions):
            raise OptionsError(f"decoding: expected DecodingOptions, got {type(self.decoding).__name__}")
        fix("kv_opts", _kv_opts(self.kv_opts))
        fix("spec_opts", _kv_opts(self.spec_opts, "--spec-opt"))
        fix("encoder_hooks", tuple(self.encoder_hooks))
        try:  # checks what needs no model; the layer and the duo map are checked against it later
            if isinstance(self.kv_policy, str):
                check_kv_policy(self.kv_policy, self.kv_opts)
            if self.encoder_sparsity is not None:
                sparsity_spec(self.encoder_sparsity)
        except OptionsError:
            raise
        except MurmurError as e:
            raise OptionsError(str(e)) from None

    def with_(self, **kw) -> "TranscribeOptions":
        """A copy with `kw` changed; DecodingOptions fields not named here go into `decoding`."""
        own = {f.name for f in fields(self)}
        dec = {f.name for f in fields(DecodingOptions)}
        unknown = sorted(set(kw) - own - dec)
        if unknown:
            raise TypeError(f"unknown transcription option {unknown[0]!r}")
        extra = {k: kw.pop(k) for k in list(kw) if k not in own}
        if extra:
            kw["decoding"] = (kw.get("decoding") or self.decoding or DecodingOptions()).with_(**extra)
        return replace(self, **kw)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "TranscribeOptions":
        """From text fields (an HTTP form, a JSONL manifest line, a config file): keys may be
        written with - or _ ('chunk-size'), values may be strings ('full', '30', 'true', '0,0.2',
        'none'), and DecodingOptions fields (logprob_threshold, ...) are accepted too."""
        own = {f.name: f for f in fields(cls)}
        dec = {f.name: f for f in fields(DecodingOptions)}
        kw = {}
        for key, value in data.items():
            name = str(key).strip().replace("-", "_")
            name = _ALIASES.get(name, name)
            f = own.get(name) or dec.get(name)
            if f is None:
                raise OptionsError(f"unknown option {key!r}; known: {', '.join(sorted(own))} and the "
                                   "DecodingOptions fields")
            if name in kw:
                raise OptionsError(f"option {name!r} given twice")
            kw[name] = _from_text(name, str(f.type), value) if isinstance(value, str) else value
        try:
            return cls().with_(**kw)
        except TypeError as e:
            raise OptionsError(str(e)) from None

    def decoding_options(self) -> DecodingOptions:
        """The decoding rules: `decoding` (or the defaults) with this object's fields over them."""
        base = self.decoding or DecodingOptions()
        over = {"beam_size": self.beam_size, "language": self.language or base.language}
        for name in ("task", "temperature", "best_of", "initial_prompt", "condition_on_previous_text"):
            if getattr(self, name) is not None:
                over[name] = getattr(self, name)
        return base.with_(**over)


def _integer(name: str, value, least: int | None, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionsError(f"{name}: expected an integer, got {value!r}")
    if least is not None and value < least:
        raise OptionsError(f"{name} {value}: must be at least {least}")


def _number(name: str, value, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise OptionsError(f"{name}: expected a number, got {value!r}")
    if value < 0 or positive and value == 0:
        raise OptionsError(f"{name} {value}: must be {'above' if positive else 'at least'} 0")


def _kv_opts(value, flag: str = "--kv-opt") -> dict[str, str] | None:
    """A dict, 'k=v,k=v', or ['k=v', ...] (the CLI's repeated --kv-opt) -> {k: v} of strings."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return {str(k).strip(): str(v).strip() for k, v in value.items()}
    items = value.split(",") if isinstance(value, str) else list(value)
    out = {}
    for o in items:
        if not isinstance(o, str) or "=" not in o:
            raise OptionsError(f"{flag} {o!r}: expected KEY=VALUE")
        k, v = o.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _from_text(name: str, kind: str, text: str):
    """One field's value from its text, by the field's annotation ('int | None', 'bool', ...)."""
    t = text.strip()
    if name in ("chunk_size", "kv_opts", "kv_policy", "suppress_tokens", "speculative", "spec_opts"):
        return t  # parsed by the field's own check
    if name in _OBJECTS:
        raise OptionsError(f"option {name!r} cannot be given as text")
    if "None" in kind and t.lower() in _NONE:
        return None
    if name == "temperature":
        try:
            values = tuple(float(x) for x in t.split(","))
        except ValueError:
            raise OptionsError(f"temperature {text!r}: expected a number or a comma list such as 0,0.2,0.4") from None
        return values[0] if len(values) == 1 else values
    first = kind.split("|")[0].strip()
    if first.startswith("bool"):
        if t.lower() in _TRUE:
            return True
        if t.lower() in _FALSE:
            return False
        raise OptionsError(f"{name} {text!r}: expected true or false")
    if first in ("int", "float"):
        try:
            return int(t) if first == "int" else float(t)
        except ValueError:
            raise OptionsError(f"{name} {text!r}: expected {'an integer' if first == 'int' else 'a number'}") from None
    return text
