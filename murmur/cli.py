"""The `murmur` command: transcribe, eval, bench, analyze, serve."""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from .errors import MurmurError

CHUNK_CHOICES = ("30", "60", "120", "300", "600", "full")
DEFAULT_CHUNK = "full"


def _add_decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny.en", help="tiny.en (default), base, or a local model path")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--beam-size", type=int, default=1, help="1 = greedy (default)")
    p.add_argument("--language", default=None, help="language code; default: en, or detected for multilingual")
    p.add_argument("--chunk-size", default=DEFAULT_CHUNK, choices=CHUNK_CHOICES,
                   help="seconds per chunk cut at silences, or 'full' for sequential mode")
    p.add_argument("--batch-size", type=int, default=8, help="decoder rows decoded together")
    p.add_argument("--initial-prompt", default=None, help="text to condition the first window on")
    p.add_argument("--no-condition-on-previous-text", action="store_true",
                   help="do not carry each window's text as the next window's prompt")
    p.add_argument("--temperature", type=float, default=None, help="single temperature (disables fallback)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")


def _decode_kwargs(args) -> dict:
    kw = dict(model=args.model, device=args.device, beam_size=args.beam_size, language=args.language,
              chunk_size=args.chunk_size, batch_size=args.batch_size, initial_prompt=args.initial_prompt,
              condition_on_previous_text=not args.no_condition_on_previous_text)
    if args.temperature is not None:
        kw["temperature"] = (args.temperature,)
    return kw


def cmd_transcribe(args) -> int:
    import os

    from . import writers
    from .transcribe import get_model, transcribe

    if args.threads:
        os.environ["MURMUR_THREADS"] = str(args.threads)
    files = [Path(f) for f in args.files]
    out = args.output
    if out not in (None, "-") and len(files) > 1 and not Path(out).is_dir():
        Path(out).mkdir(parents=True, exist_ok=True)
    loaded = get_model(args.model, args.device)
    kw = _decode_kwargs(args)
    kw["model"] = loaded
    failures = 0
    for f in files:
        try:
            result = transcribe(f, progress=not args.quiet, **kw)
        except MurmurError as e:
            print(f"error: {e}", file=sys.stderr)  # the message names the file
            failures += 1
            continue
        if out is None or out == "-":
            dest = "-"
        elif Path(out).is_dir():
            dest = str(Path(out) / f"{f.stem}.{args.format}")
        else:
            dest = out
        writers.write_file(result, args.format, dest)
        s = result.stats
        if not args.quiet:
            print(f"{f.name}: {result.duration:.1f} s audio in {s['wall_s']:.1f} s wall, "
                  f"RTFx {s['rtfx']}, {s['windows']} windows, {len(result.segments)} segments",
                  file=sys.stderr)
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(prog="murmur", description="Long-form speech recognition, offline.")
    parser.add_argument("--version", action="version", version=f"murmur {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("transcribe", help="transcribe audio or video files")
    p.add_argument("files", nargs="+", help="audio/video files (wav, flac, mp3, m4a, ogg, mp4, ...)")
    _add_decode_args(p)
    from .writers import FORMATS
    p.add_argument("--format", "-f", default="txt", choices=FORMATS)
    p.add_argument("--output", "-o", default="-", help="file, folder, or - for stdout (default)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=cmd_transcribe)

    from .bench.run import add_parser as add_bench
    from .cli_eval import add_parser as add_eval
    add_eval(sub)
    add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.filterwarnings("default", module="murmur")
    try:
        return int(args.func(args) or 0)
    except MurmurError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
