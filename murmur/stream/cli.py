"""`murmur stream FILE|-` (and the `bench-stream` parser): live transcription from the command line.

A file plays at real time (`--speed` to go faster, 0 for as fast as possible); `-` reads raw
16-kHz s16le mono PCM from stdin (e.g. `arecord -f S16_LE -r 16000 -c 1 | murmur stream -`).
Committed text goes to stdout as it lands, a line per turn; in a terminal the tentative words
follow it, dimmed, on the current line. `--format jsonl` prints one event per line.
"""
from __future__ import annotations

import json
import shutil
import sys
import time

SAMPLE_RATE = 16000
PIECE_S = 0.1


def _pieces_from_file(path: str, speed: float):
    from murmur.audio.decode import load_audio
    audio = load_audio(path)
    piece = int(PIECE_S * SAMPLE_RATE)
    start = time.monotonic()
    fed = 0
    while fed < len(audio):
        if speed > 0:
            due = min(len(audio), int((time.monotonic() - start) * speed * SAMPLE_RATE) // piece * piece)
            if due <= fed:
                time.sleep(max(0.001, ((fed + piece) / SAMPLE_RATE) / speed - (time.monotonic() - start)))
                continue
        else:
            due = min(len(audio), fed + piece)
        yield audio[fed:due]
        fed = due


def _pieces_from_stdin():
    read = sys.stdin.buffer.read1 if hasattr(sys.stdin.buffer, "read1") else sys.stdin.buffer.read
    carry = b""
    while True:
        b = read(int(PIECE_S * SAMPLE_RATE) * 2)
        if not b:
            return
        b = carry + b
        cut = len(b) - len(b) % 2  # an odd byte waits for its partner
        carry = b[cut:]
        if cut:
            yield b[:cut]


class _Printer:
    def __init__(self, fmt: str, out=sys.stdout):
        self.fmt, self.out = fmt, out
        self.tty = fmt == "text" and out.isatty()
        self.line = ""  # committed text on the current line (terminal mode)

    def show(self, res, t: float) -> None:
        if self.fmt == "jsonl":
            for w in res.committed:
                self._json(type="committed", word=w.word, start=w.start, end=w.end, emitted=round(t, 3))
            if res.committed or res.tentative:
                self._json(type="tentative", text=res.tentative_text, emitted=round(t, 3))
            for e in res.events:
                self._json(type=e.kind, time=round(e.time, 3), **({"text": e.text} if e.kind == "turn_completed" else {}))
            return
        ended = any(e.kind == "turn_completed" for e in res.events)
        if not self.tty:
            if res.text:
                self.out.write(res.text)
            if ended and (res.text or self.line):
                self.out.write("\n")
            self.line = "" if ended else self.line + res.text
            self.out.flush()
            return
        self.line += res.text
        width = shutil.get_terminal_size((80, 20)).columns
        while len(self.line) > width - 1:  # settled text that fills a line scrolls up
            cut = self.line.rfind(" ", 0, width - 1)
            cut = cut if cut > 0 else width - 1
            self.out.write("\r\x1b[K" + self.line[:cut] + "\n")
            self.line = self.line[cut:]
        if ended:
            self.out.write("\r\x1b[K" + self.line + ("\n" if self.line.strip() else ""))
            self.line = ""
        else:
            room = max(0, width - 1 - len(self.line))
            tent = res.tentative_text[:room]
            self.out.write("\r\x1b[K" + self.line + (f"\x1b[2m{tent}\x1b[0m" if tent else ""))
        self.out.flush()

    def _json(self, **kw) -> None:
        self.out.write(json.dumps(kw) + "\n")
        self.out.flush()


def cmd_stream(args) -> int:
    from murmur.models.loading import get_model
    from murmur.stream.transcriber import StreamingTranscriber, StreamOptions
    from murmur.transcribe import set_threads

    set_threads(args.threads)
    opts = StreamOptions(policy=args.policy, agreement=args.agreement, frame_threshold=args.frame_threshold,
                         max_wait_s=args.max_wait, step_s=args.step, encoder_pad_s=args.encoder_pad, vad=not args.no_vad,
                         language=args.language, prompt=args.prompt)
    st = StreamingTranscriber(get_model(args.model, args.device, args.compute_type), opts)
    printer = _Printer(args.format)
    pieces = _pieces_from_stdin() if args.input == "-" else _pieces_from_file(args.input, args.speed)
    start = time.monotonic()
    try:
        for piece in pieces:
            printer.show(st.feed(piece), time.monotonic() - start)
        printer.show(st.close(), time.monotonic() - start)
    except BrokenPipeError:  # the reader went away (| head): a clean end
        sys.stderr.close()
    return 0


def add_parser(sub) -> None:
    from murmur.stream.bench import pad_seconds, wait_seconds
    p = sub.add_parser("stream", help="live transcription of a file played in real time, or of PCM on stdin")
    p.add_argument("input", help="audio file, or - for raw 16-kHz s16le mono PCM on stdin")
    p.add_argument("--speed", type=float, default=1.0, help="playback speed of a file (0: as fast as possible)")
    p.add_argument("--format", "-f", default="text", choices=["text", "jsonl"])
    p.add_argument("--policy", default="local-agreement", choices=["local-agreement", "align-att"])
    p.add_argument("--agreement", type=int, default=2, help="n of LocalAgreement-n")
    p.add_argument("--frame-threshold", type=int, default=25, help="align-att: encoder frames (20 ms) kept back")
    p.add_argument("--max-wait", type=wait_seconds, default=2.0,
                   help="local-agreement: commit a word this many seconds after its audio ended, agreed or not "
                        "('off': only when agreed)")
    p.add_argument("--step", type=float, default=0.5, help="seconds of audio between updates")
    p.add_argument("--encoder-pad", type=pad_seconds, default=None,
                   help="seconds of silence the encoder sees after the buffer, to encode less than the whole "
                        "30-s window (default: full)")
    p.add_argument("--no-vad", action="store_true", help="no turn detection: decode every step until the end")
    p.add_argument("--language", default=None)
    p.add_argument("--prompt", default=None, help="text to condition the first update on")
    p.add_argument("--model", default="tiny.en")
    p.add_argument("--device", default=None)
    p.add_argument("--compute-type", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_stream)

    from murmur.stream.bench import add_parser as add_bench
    add_bench(sub)
