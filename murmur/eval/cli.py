"""`murmur eval HYP REF`: score a transcript file against a reference file."""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="score a hypothesis against a reference (WER, cpWER, tcpWER, DER)",
        description="Score HYP against REF. Either may be plain text, SegLST or murmur JSON, STM or RTTM; "
                    "the format is taken from the extension, else from the content.")
    p.add_argument("hyp", help="hypothesis file")
    p.add_argument("ref", help="reference file")
    p.add_argument("--json", action="store_true", help="print the full results as JSON")
    p.add_argument("--collar", type=float, default=5.0, help="tcpWER collar in seconds (default 5)")
    p.add_argument("--der-collar", type=float, default=0.25,
                   help="DER no-score collar in seconds on each side of a reference boundary, as md-eval -c "
                        "(default 0.25)")
    p.add_argument("--partial", action="store_true",
                   help="score only the sessions the hypothesis has (default: a missing session counts as deleted)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from murmur.eval import scoring  # meeteval and pyannote load only when scoring is asked for

    results = scoring.evaluate(args.hyp, args.ref, collar=args.collar, der_collar=args.der_collar,
                               partial=args.partial)
    print(scoring.to_json(results) if args.json else scoring.format_table(results).rstrip("\n"))
    return 0
