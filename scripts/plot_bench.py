"""Merge several `murmur bench` JSON files into one accuracy-latency plot (the README's figure, docs/bench.png).

    python scripts/plot_bench.py OUT.png RUN1/bench.json RUN2/bench.json ... [--title T]

Rows keep their names; a row that appears in several files (same name) is plotted once, from the
first file, so runs that share a baseline do not stack duplicate points.
"""
from __future__ import annotations

import argparse
import json

from murmur.eval.bench.plot import plot_accuracy_latency


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("runs", nargs="+")
    p.add_argument("--title", default=None)
    a = p.parse_args()
    rows, seen = [], set()
    for f in a.runs:
        for r in json.load(open(f)):
            if r["name"] not in seen and r.get("wer") is not None:
                seen.add(r["name"])
                rows.append(r)
    plot_accuracy_latency(rows, a.out, title=a.title)
    print(f"wrote {a.out} ({len(rows)} points)")


if __name__ == "__main__":
    main()
