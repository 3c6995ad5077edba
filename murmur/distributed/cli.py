"""`murmur batch INPUTS... --out DIR`: the command line of a batch job."""
from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub, add_decode_args, make_options) -> None:
    """`add_decode_args(parser)` and `make_options(args, **kw)` are murmur.cli's, passed in so this
    module never imports murmur.cli (which imports it)."""
    from murmur.output.writers import FORMATS
    p = sub.add_parser("batch", help="transcribe many recordings into a folder, locally or on a Ray cluster",
                       description="Inputs are audio files, folders (searched for audio) or JSONL manifests "
                                   "({\"audio\": PATH, \"id\": ..., other transcribe options}). Writes "
                                   "DIR/<id>.<ext> per format and DIR/summary.jsonl; a rerun skips what is complete.")
    p.add_argument("inputs", nargs="+", help="audio files, folders, or .jsonl manifests")
    p.add_argument("--out", "-o", required=True, help="output folder")
    p.add_argument("--format", "-f", action="append", default=None,
                   help=f"output format, repeatable or comma-separated: {', '.join(FORMATS)} (default txt)")
    add_decode_args(p)
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on the Ray cluster at ADDRESS (default: $RAY_ADDRESS, else a local Ray instance); "
                        "needs the ray extra")
    p.add_argument("--actors", type=int, default=None, help="transcription actors (default: cluster CPUs / --actor-cpus)")
    p.add_argument("--actor-cpus", type=float, default=1.0, help="CPUs (and torch threads) per actor")
    p.add_argument("--chunks-per-task", type=int, default=4, help="chunks per actor call: smaller spreads a long "
                                                                   "recording over more actors")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_batch, make_options=make_options)


def cmd_batch(args) -> int:
    from murmur.distributed.inputs import expand
    from murmur.distributed.job import OutputDir, run_local
    from murmur.errors import MurmurError
    from murmur.output.writers import FORMATS

    formats = list(dict.fromkeys(f.strip() for fs in (args.format or ["txt"]) for f in fs.split(",") if f.strip()))
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise MurmurError(f"unknown output format {', '.join(bad)}; choose from {', '.join(FORMATS)}")
    diarize = args.diarize if args.diarize is not None else bool({"seglst", "rttm", "stm"} & set(formats))
    options = args.make_options(args, diarize=diarize)
    items = expand(args.inputs)
    out = OutputDir(args.out, formats)
    if args.ray is None:
        counts = run_local(items, out, args.model, options, progress=not args.quiet)
    else:
        try:
            from murmur.distributed.ray_job import run_ray
        except ImportError as e:
            raise MurmurError(f"--ray needs Ray: pip install 'murmur-asr[ray]' ({e})") from None
        counts = run_ray(items, out, args.model, options, address=args.ray or None, progress=not args.quiet,
                         actors=args.actors, actor_cpus=args.actor_cpus, chunks_per_task=args.chunks_per_task)
    print(json.dumps({**counts, "summary": str(out.summary)}), file=sys.stderr)
    return 1 if counts["error"] else 0
