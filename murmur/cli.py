"""The `murmur` command: transcribe, eval, bench, analyze, serve."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

from murmur.errors import MurmurError

CHUNK_CHOICES = ("30", "60", "120", "300", "600", "full")
# murmur.models.loading.COMPUTE_TYPES, kept here so `murmur --help` does not import torch (a test checks)
COMPUTE_TYPES = ("auto", "int8", "int8_bfloat16", "float32", "float16", "bfloat16")
DEFAULT_CHUNK = "30"  # best WER in the stitched-set sweep (README, docs/bench.png)


def _add_decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny.en", help="tiny.en (default), base, or a local model path")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--compute-type", default="auto", choices=COMPUTE_TYPES,
                   help="auto: on CPU int8_bfloat16 where bf16 is native (bf16 encoder, int8 decoder), "
                        "else int8 (row-wise, batch-invariant); float16 on CUDA")
    p.add_argument("--beam-size", type=int, default=1, help="1 = greedy (default)")
    p.add_argument("--language", default=None, help="language code; default: en, or detected for multilingual")
    p.add_argument("--chunk-size", default=DEFAULT_CHUNK, choices=CHUNK_CHOICES,
                   help="seconds per chunk cut at silences, or 'full' for sequential mode")
    p.add_argument("--batch-size", type=int, default=16, help="decoder rows decoded together")
    p.add_argument("--initial-prompt", default=None, help="text to condition the first window on")
    p.add_argument("--no-condition-on-previous-text", action="store_true",
                   help="do not carry each window's text as the next window's prompt")
    p.add_argument("--temperature", type=float, default=None, help="single temperature (disables fallback)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--kv-policy", default="none",
                   help="none|output-window|speech-window|speech-follow|duo; combine with +")
    p.add_argument("--kv-opt", action="append", default=[], metavar="KEY=VALUE", help="policy parameter")
    p.add_argument("--speculative", default="none",
                   help="none, recycle, mtp or draft:MODEL (e.g. draft:tiny.en for base), combined with +: "
                        "draft sources verified in one forward")
    p.add_argument("--spec-opt", action="append", default=[], metavar="KEY=VALUE", help="speculative parameter")
    p.add_argument("--encoder-sparsity", default="off", help="LAYER:FRACTION of encoder frames to drop, or off")
    p.add_argument("--word-timestamps", action="store_true", help="add words with start, end, probability")
    p.add_argument("--diarize", action=argparse.BooleanOptionalAction, default=None,
                   help="label speakers (default: on for seglst/rttm/stm, off otherwise)")
    p.add_argument("--num-speakers", type=int, default=None)
    p.add_argument("--min-speakers", type=int, default=1)
    p.add_argument("--max-speakers", type=int, default=None)


def _options(args, **kw):
    """The TranscribeOptions the decode flags give (kw: the settings a command adds)."""
    from murmur.options import TranscribeOptions

    return TranscribeOptions(
        chunk_size=args.chunk_size, batch_size=args.batch_size, language=args.language, beam_size=args.beam_size,
        temperature=args.temperature, initial_prompt=args.initial_prompt,
        condition_on_previous_text=not args.no_condition_on_previous_text, device=args.device,
        compute_type=args.compute_type, threads=args.threads, kv_policy=args.kv_policy, kv_opts=args.kv_opt,
        speculative=args.speculative, spec_opts=args.spec_opt,
        encoder_sparsity=args.encoder_sparsity, word_timestamps=args.word_timestamps,
        num_speakers=args.num_speakers, min_speakers=args.min_speakers, max_speakers=args.max_speakers, **kw)


def cmd_transcribe(args) -> int:
    from murmur.models.loading import get_model
    from murmur.output import writers
    from murmur.transcribe import transcribe

    options = _options(args, progress=not args.quiet,
                       diarize=args.diarize if args.diarize is not None else args.format in ("seglst", "rttm", "stm"))
    files = [Path(f) for f in args.files]
    out = args.output
    if out not in (None, "-") and len(files) > 1 and not Path(out).is_dir():
        Path(out).mkdir(parents=True, exist_ok=True)
    t_load = time.perf_counter()
    loaded = get_model(args.model, args.device, args.compute_type)
    if not args.quiet:
        print(_startup_line(time.perf_counter() - t_load, loaded), file=sys.stderr)
    failures = 0
    for f in files:
        try:
            result = transcribe(f, loaded, options)
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


def _startup_line(load_s: float, loaded) -> str:
    """Time to the first file: the interpreter and imports (torch most of it), then the model."""
    since_start = _since_process_start()
    return (f"start-up {since_start:.1f} s: python and imports {since_start - load_s:.1f} s, "
            f"model {load_s:.1f} s ({loaded.name}, {loaded.compute_type})")


def _since_process_start() -> float:
    try:  # Linux: both clocks count from boot, in ticks (psutil's start time rounds boot to 1 s)
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return float(Path("/proc/uptime").read_text().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        import psutil
        return time.time() - psutil.Process().create_time()


def cmd_analyze(args) -> int:
    from murmur.eval.analyze import analyze_attention
    res = analyze_attention(args.audio, model=args.model, out_dir=args.out, max_windows=args.max_windows)
    print(res["table"])
    print(f"wrote {res.get('png')}, {res.get('json')}", file=sys.stderr)
    return 0


def cmd_calibrate_duo(args) -> int:
    from murmur.eval.duo_calibration import calibrate_duo
    res = calibrate_duo(args.model, args.audio or None, args.out, method=args.method, steps=args.steps)
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, list)}, indent=2, default=str))
    return 0


def cmd_train_mtp(args) -> int:
    from murmur.eval.mtp_training import train_mtp
    res = train_mtp(args.model, args.audio or None, args.out, heldout_paths=args.heldout or None, k=args.heads,
                    epochs=args.epochs, speeds=tuple(float(x) for x in args.speeds.split(",")))
    print(json.dumps(res, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from murmur import __version__
    parser = argparse.ArgumentParser(prog="murmur", description="Long-form speech recognition, offline.")
    parser.add_argument("--version", action="version", version=f"murmur {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("transcribe", help="transcribe audio or video files")
    p.add_argument("files", nargs="+", help="audio/video files (wav, flac, mp3, m4a, ogg, mp4, ...)")
    _add_decode_args(p)
    from murmur.output.writers import FORMATS
    p.add_argument("--format", "-f", default="txt", choices=FORMATS)
    p.add_argument("--output", "-o", default="-", help="file, folder, or - for stdout (default)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=cmd_transcribe)

    p = sub.add_parser("analyze", help="evidence behind the KV policies")
    asub = p.add_subparsers(dest="what", required=True)
    a = asub.add_parser("attention", help="how local each layer's and head's attention is: table + heat-map PNG")
    a.add_argument("audio")
    a.add_argument("--model", default="tiny.en")
    a.add_argument("--out", default="attention-out", help="folder for attention.txt/.json/.png")
    a.add_argument("--max-windows", type=int, default=4)
    a.set_defaults(func=cmd_analyze)

    p = sub.add_parser("calibrate-duo", help="re-score DuoAttention retrieval/streaming heads on unlabelled audio")
    p.add_argument("audio", nargs="*", help="audio files (default: ../shared/data/librispeech_other_noref)")
    p.add_argument("--model", default="tiny.en")
    p.add_argument("--out", default=None, help="head-map JSON (default: the user cache, used by --kv-policy duo)")
    p.add_argument("--method", choices=["gates", "mass"], default="gates",
                   help="gates: train DuoAttention's gates (float32, ~1 min); mass: attention outside the budget")
    p.add_argument("--steps", type=int, default=200, help="gate training steps")
    p.set_defaults(func=cmd_calibrate_duo)

    p = sub.add_parser("train-mtp", help="train multi-token-prediction heads (--speculative mtp) by self-distillation")
    p.add_argument("audio", nargs="*", help="audio files (default: ../shared/data/librispeech_other_noref)")
    p.add_argument("--model", default="tiny.en")
    p.add_argument("--out", default=None, help="heads file (default: the user cache, used by --speculative mtp)")
    p.add_argument("--heldout", nargs="*", default=None,
                   help="files to measure the heads on, never trained on (default: a tenth of the audio)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--speeds", default="1.0,0.9,1.1", help="the audio also played at these speeds")
    p.set_defaults(func=cmd_train_mtp)

    from murmur.eval.bench.run import add_parser as add_bench
    from murmur.eval.cli import add_parser as add_eval
    from murmur.models.kernels import add_parser as add_info
    add_eval(sub)
    add_bench(sub)
    add_info(sub)
    from murmur.serve.cli import add_parser as add_serve
    add_serve(sub)
    from .distributed.cli import add_parser as add_batch
    add_batch(sub, _add_decode_args, _options)
    from murmur.stream.cli import add_parser as add_stream
    add_stream(sub)
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


def run() -> None:
    """The `murmur` console script. After `transcribe` it leaves without the interpreter's teardown
    of torch and the VAD session: 0.4 s of a 2.7-s run on an 11-s file (outputs are closed by then)."""
    rc = main()
    if sys.argv[1:2] == ["transcribe"]:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":
    run()
