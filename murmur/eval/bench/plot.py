"""Accuracy/latency figure, Pareto front, and CSV/JSON dumps of benchmark rows."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path


def pareto_front(points) -> list[int]:
    """Indices of points (wall, wer) not dominated when minimising both, sorted by wall.

    A point is dominated if another is <= in both and < in one. Duplicates all stay.
    """
    pts = [(float(w), float(e)) for w, e in points]
    front = []
    for i, (w, e) in enumerate(pts):
        if any(math.isnan(v) for v in (w, e)):
            continue
        dominated = any(
            (w2 <= w and e2 <= e) and (w2 < w or e2 < e)
            for j, (w2, e2) in enumerate(pts) if j != i and not math.isnan(w2 + e2))
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (pts[i][0], pts[i][1]))


def _is_peer(row) -> bool:
    return str(row.get("kind", "")).lower() in ("peer", "baseline", "faster-whisper")


def _label(name: str) -> str:
    """A point's label: the marker already says murmur or peer, so keep what differs."""
    for a, b in (("murmur ", ""), (" beam1", ""), ("faster-whisper", "fw"), ("chunk=", "chunk "),
                 ("batch=", "b"), ("sparsity=", "sparsity "), ("kv=", "")):
        name = name.replace(a, b)
    return name


def plot_accuracy_latency(rows: list[dict], path, title: str | None = None):
    """WER (%) against wall time (s); ``rows`` have name, wer (percent, as bench rows), wall_s, kind.

    Rows with kind "peer" get their own marker/colour; the Pareto front over all
    rows is drawn as a step line.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless; must precede pyplot import
    import matplotlib.pyplot as plt

    xs = [float(r["wall_s"]) for r in rows]
    ys = [float(r["wer"]) for r in rows]
    fig, ax = plt.subplots(figsize=(10, 6.5), dpi=120)
    ours = [i for i, r in enumerate(rows) if not _is_peer(r)]
    peers = [i for i, r in enumerate(rows) if _is_peer(r)]
    if ours:
        ax.scatter([xs[i] for i in ours], [ys[i] for i in ours], marker="o",
                   color="tab:blue", label="murmur", zorder=3)
    if peers:
        ax.scatter([xs[i] for i in peers], [ys[i] for i in peers], marker="s",
                   color="tab:orange", label="peer", zorder=3)
    for x, y, r in zip(xs, ys, rows):
        ax.annotate(_label(str(r["name"])), (x, y), textcoords="offset points", xytext=(5, 4),
                    fontsize=7)
    front = pareto_front(list(zip(xs, ys)))
    if len(front) > 1:
        ax.step([xs[i] for i in front], [ys[i] for i in front], where="post",
                color="tab:green", linestyle="--", linewidth=1, label="Pareto front", zorder=2)
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("WER (%)")
    ax.set_title(title or "accuracy vs latency (lower-left is better)")
    ax.grid(True, alpha=0.3)
    if rows:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _scalar(v):
    if getattr(v, "ndim", None) == 0 and hasattr(v, "item"):  # numpy scalar
        v = v.item()
    return v


def _flat(rows):
    # CSV keeps scalar columns only (drops nested fields such as segment lists).
    out = []
    for r in rows:
        r = {k: _scalar(v) for k, v in r.items()}
        out.append({k: v for k, v in r.items()
                    if v is None or isinstance(v, (str, int, float, bool))})
    return out


def write_csv(rows: list[dict], path):
    rows = _flat(rows)
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return path


def write_json(rows: list[dict], path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unlike CSV, JSON keeps nested fields (segments); numpy scalars become numbers.
    def conv(o):
        return o.item() if hasattr(o, "item") else str(o)

    path.write_text(json.dumps(rows, indent=2, default=conv), encoding="utf-8")
    return path
