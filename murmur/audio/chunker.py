"""Group VAD speech regions into decoding chunks of bounded length.

Chunks are cut in the silences between speech regions. A single region longer
than the limit has to be cut inside speech; the cut goes at the quietest point
(lowest short-time RMS energy) near the end of the allowed span, so it tends to
fall in a breath or a short pause the VAD did not count as silence.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

SAMPLE_RATE = 16000
CHUNK_SIZES = ("30", "60", "120", "300", "600", "full")

_EPS = 1e-9  # float slack when comparing spans with the limit
_RMS_WIN_S = 0.02  # 20 ms energy window: shorter than a breath or a stop closure
_RMS_HOP_S = 0.005

__all__ = ["CHUNK_SIZES", "Chunk", "make_chunks", "merge_regions", "parse_chunk_size"]


@dataclass
class Chunk:
    """A span of audio decoded as one unit; ``regions`` are the speech in it."""

    start: float
    end: float
    regions: list[tuple[float, float]] = field(default_factory=list)

    @property
    def duration(self) -> float:
        return self.end - self.start


def parse_chunk_size(value: str | int | float | None) -> float | None:
    """``"30"|"60"|"120"|"300"|"600"`` -> seconds as float; ``"full"`` -> None."""
    text = str(value).strip().lower()
    if text.endswith(".0"):  # allow 30.0 as well as "30"
        text = text[:-2]
    if text not in CHUNK_SIZES:
        raise ValueError(
            f"invalid chunk size {value!r}: choose one of {', '.join(CHUNK_SIZES)} "
            "(seconds, or 'full' for the whole file)"
        )
    return None if text == "full" else float(text)


def merge_regions(regions) -> list[tuple[float, float]]:
    """Sort regions and merge any that overlap or touch; drop empty ones."""
    clean = []
    for r in regions:
        s, e = float(r[0]), float(r[1])
        if not (math.isfinite(s) and math.isfinite(e)):
            raise ValueError(f"region {r!r} is not finite")
        s = max(s, 0.0)  # audio starts at 0
        if e > s:
            clean.append((s, e))
    merged: list[list[float]] = []
    for s, e in sorted(clean):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)  # nested regions must not shorten it
        else:
            merged.append([s, e])
    return [(s, e) for s, e in merged]


def _quietest_point(audio: np.ndarray, sr: int, lo: float, hi: float) -> float | None:
    """Centre of the lowest-RMS window in ``[lo, hi]`` seconds, or None if it can't tell."""
    win = max(1, int(round(_RMS_WIN_S * sr)))
    hop = max(1, int(round(_RMS_HOP_S * sr)))
    a, b = int(math.ceil(lo * sr)), int(math.floor(hi * sr))
    if a < 0 or b > len(audio) or b - a < win:
        return None  # band outside the audio or narrower than one window
    x = np.asarray(audio[a:b], dtype=np.float64)
    csum = np.concatenate(([0.0], np.cumsum(x * x)))
    starts = np.arange(0, len(x) - win + 1, hop)
    energy = csum[starts + win] - csum[starts]
    best = int(np.argmin(energy))
    # A flat quiet stretch (e.g. a pause) spans several windows: cut in its middle,
    # not at its left edge.
    quiet = energy <= energy[best] * 1.05 + 1e-12
    left = best
    while left > 0 and quiet[left - 1]:
        left -= 1
    right = best
    while right + 1 < len(quiet) and quiet[right + 1]:
        right += 1
    centre = (starts[left] + starts[right] + win) / 2.0
    return float((a + centre) / sr)


def _split_region(
    start: float, end: float, limit: float, audio, sr: int, search: float
) -> list[tuple[float, float]]:
    """Cut one over-long region into pieces of at most ``limit`` seconds."""
    pieces = []
    s = start
    while end - s > limit + _EPS:
        cut = None
        if audio is not None:
            # Search only the last ``search`` fraction of the span: pieces stay long.
            cut = _quietest_point(audio, sr, s + (1.0 - search) * limit, s + limit)
        if cut is None or not (s < cut <= s + limit):
            cut = s + limit
        pieces.append((s, cut))
        s = cut
    pieces.append((s, end))
    return pieces


def make_chunks(
    regions,
    chunk_size: float | None,
    audio: np.ndarray | None = None,
    sr: int = SAMPLE_RATE,
    search: float = 0.2,
) -> list[Chunk]:
    """Pack speech ``regions`` (seconds) into ordered, non-overlapping chunks.

    ``chunk_size`` None ("full"): one chunk from the first region's start to the
    last region's end. Otherwise every chunk spans at most ``chunk_size`` seconds:

    * Regions are sorted and overlapping/nested ones merged first, so a chunk's
      end is the max of its members' ends.
    * Consecutive regions are packed greedily; when the next region does not
      fit, the chunk is closed at the longest silence among the gaps whose cut
      keeps the chunk at least ``(1 - search) * chunk_size`` long (else at the
      last gap that fits).
    * A region longer than ``chunk_size`` is cut inside speech at the quietest
      point (lowest 20 ms RMS energy of ``audio``) in the last ``search``
      fraction of each allowed span. If ``audio`` is None, or the span lies
      outside ``audio``, it is cut exactly at the limit instead (blind cut,
      possibly mid-word).

    Every chunk is at most ``chunk_size`` long: cuts are never placed past the
    limit, so no case forces a longer chunk. Silence between chunks belongs to
    no chunk. Chunks cover every (merged) region exactly once.
    """
    merged = merge_regions(regions)
    if not merged:
        return []
    if chunk_size is None:
        return [Chunk(merged[0][0], max(e for _, e in merged), merged)]
    limit = float(chunk_size)
    if not (limit > 0 and math.isfinite(limit)):
        raise ValueError(f"chunk_size must be a positive number of seconds or None, got {chunk_size!r}")
    if not 0.0 < search <= 1.0:
        raise ValueError(f"search must be in (0, 1], got {search}")
    if audio is not None:
        audio = np.asarray(audio).reshape(-1)

    pieces: list[tuple[float, float]] = []
    for s, e in merged:
        if e - s > limit + _EPS:
            pieces.extend(_split_region(s, e, limit, audio, sr, search))
        else:
            pieces.append((s, e))

    chunks: list[Chunk] = []
    i, n = 0, len(pieces)
    while i < n:
        cs = pieces[i][0]
        j = i  # furthest piece that still fits; each piece alone fits
        while j + 1 < n and pieces[j + 1][1] - cs <= limit + _EPS:
            j += 1
        k = j
        if j + 1 < n:
            # Close at the longest pause near the end rather than blindly at the last one.
            floor = cs + (1.0 - search) * limit
            best_gap = pieces[j + 1][0] - pieces[j][1]
            for m in range(j - 1, i - 1, -1):
                if pieces[m][1] < floor - _EPS:
                    break
                gap = pieces[m + 1][0] - pieces[m][1]
                if gap > best_gap + _EPS:
                    k, best_gap = m, gap
        members: list[tuple[float, float]] = []
        for s, e in pieces[i : k + 1]:
            if members and s <= members[-1][1]:  # rejoin pieces of one split region
                members[-1] = (members[-1][0], max(members[-1][1], e))
            else:
                members.append((s, e))
        chunks.append(Chunk(cs, members[-1][1], members))
        i = k + 1
    return chunks
