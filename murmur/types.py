"""The data that flows out of the pipeline: words, segments, transcripts."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Word:
    start: float
    end: float
    word: str  # with its leading space, as the tokenizer decodes it
    probability: float = 1.0
    speaker: str | None = None


@dataclass
class Segment:
    start: float  # seconds from the start of the recording
    end: float
    text: str
    speaker: str | None = None
    words: list[Word] = field(default_factory=list)
    # decoding details, kept for fallback rules and debugging
    tokens: list[int] = field(default_factory=list)  # timestamp tokens included
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0
    temperature: float = 0.0


@dataclass
class Turn:
    """A diarization turn: who spoke from start to end."""
    start: float
    end: float
    speaker: str


@dataclass
class Transcript:
    text: str
    duration: float
    model: str
    segments: list[Segment]
    language: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    turns: list[Turn] = field(default_factory=list)
    source: str | None = None  # file path or session id

    def to_dict(self) -> dict[str, Any]:
        def seg(s: Segment) -> dict[str, Any]:
            d = {"start": round(s.start, 3), "end": round(s.end, 3), "text": s.text}
            if s.speaker is not None:
                d["speaker"] = s.speaker
            if s.words:
                d["words"] = [
                    {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(w).items()
                     if v is not None}
                    for w in s.words
                ]
            return d

        out = {
            "text": self.text,
            "duration": round(self.duration, 3),
            "model": self.model,
            "language": self.language,
            "segments": [seg(s) for s in self.segments],
            "stats": self.stats,
        }
        if self.turns:
            out["turns"] = [asdict(t) for t in self.turns]
        return out
