"""`murmur serve` and `murmur bench-serve`."""
from __future__ import annotations

import argparse
import os


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server; concurrent requests share one engine")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", action="append", default=None,
                   help="a model to keep loaded (repeatable; the first is the default); default tiny.en")
    p.add_argument("--batch-size", type=int, default=16, help="decoder rows shared by all requests")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default $MURMUR_API_KEY)")
    p.add_argument("--max-upload-mb", type=float, default=100.0)
    p.add_argument("--max-queued-audio-s", type=float, default=4 * 3600.0,
                   help="audio seconds waiting to decode above which requests get 429")
    p.add_argument("--request-timeout-s", type=float, default=600.0)
    p.add_argument("--admission", choices=("round-robin", "shortest-first"), default="round-robin",
                   help="which request's window takes a free decoder row")
    p.add_argument("--device", default=None)
    p.add_argument("--compute-type", default="auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: idle cores)")
    p.set_defaults(func=cmd_serve)

    b = sub.add_parser("bench-serve", help="load-test `murmur serve` on loopback: concurrent vs one at a time")
    b.add_argument("--clients", type=int, default=32, help="concurrent clients")
    b.add_argument("--requests", type=int, default=None, help="bound on requests (default: the whole mix once)")
    b.add_argument("--max-time-s", type=float, default=900.0, help="bound on each phase's wall time")
    b.add_argument("--quick", action="store_true", help="a smaller mix (~1-3 min on 2 cores)")
    b.add_argument("--model", default="tiny.en")
    b.add_argument("--batch-size", type=int, default=16)
    b.add_argument("--admission", choices=("round-robin", "shortest-first"), default="round-robin")
    b.add_argument("--threads", type=int, default=None, help="server CPU threads (default: 2)")
    b.add_argument("--latency-probes", type=int, default=8,
                   help="11-s requests sent one after another, idle and with the long recording in flight")
    b.add_argument("--out", default=None, help="write the figures as JSON here")
    b.set_defaults(func=cmd_bench_serve)


def server_config(args):
    from murmur.serve.app import ServerConfig
    return ServerConfig(models=args.model or ["tiny.en"], batch_size=args.batch_size,
                        api_key=args.api_key or os.environ.get("MURMUR_API_KEY") or None,
                        max_upload_mb=args.max_upload_mb, max_queued_audio_s=args.max_queued_audio_s,
                        request_timeout_s=args.request_timeout_s, admission=args.admission,
                        device=args.device, compute_type=args.compute_type)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from murmur.serve.app import create_app
    from murmur.transcribe import set_threads
    if args.threads:
        os.environ["MURMUR_THREADS"] = str(args.threads)
    set_threads()
    app = create_app(server_config(args))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from murmur.serve.bench import run_bench
    run_bench(args)
    return 0
