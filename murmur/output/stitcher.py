"""Join the segments of all chunks into one timeline on the recording's clock."""
from __future__ import annotations

from murmur.types import Segment


def stitch(per_chunk: list[list[Segment]]) -> list[Segment]:
    """Chunks cover disjoint spans, so stitching is a stable sort by start; within a chunk the stream
    already emits segments in order. Overlaps from rounding are clipped so times never go backwards."""
    segments = sorted((s for chunk in per_chunk for s in chunk), key=lambda s: (s.start, s.end))
    out: list[Segment] = []
    for s in segments:
        if out and s.start < out[-1].end:
            s.start = min(out[-1].end, s.end)
        out.append(s)
    return out
