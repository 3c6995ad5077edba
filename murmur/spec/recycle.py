"""Draft recycling: a window's `Request.draft` (tokens it is expected to repeat) drafts its decode.

Where the drafts come from (murmur.longform fills them; a live stream sets its own):
  * a temperature-fallback re-decode: the rejected decode of the same window;
  * a window's start: the unfinished tail of the previous window after its last complete
    timestamp, stamps shifted to the new window's clock;
  * a live stream's update: its previous hypothesis.
After a mismatch the rest of the draft is realigned on the row's last tokens (the longest of the
last `ngram` tokens found in the draft, nearest to where the row was expected to be), not dropped.
"""
from __future__ import annotations

from murmur.spec.base import Draft, DraftSource


class Recycle(DraftSource):
    name = "recycle"

    def __init__(self, ngram: int = 3):
        self.ngram = max(1, ngram)
        self.at: dict[int, tuple[int, int]] = {}  # row -> (draft position, row length) when last aligned

    def admit(self, engine, act) -> None:
        for r in act.rows:
            self.at[r] = (0, 0)

    def propose(self, engine, act, j, row, k):
        hint = act.req.draft
        seq = act.seqs[j]
        if not hint or not seq:
            return None
        p0, n0 = self.at.get(row, (0, 0))
        p = align(hint, seq, p0 + len(seq) - n0, self.ngram)
        if p is None or p >= len(hint):
            return None
        self.at[row] = (p, len(seq))
        return Draft(list(hint[p:p + k]))


def align(hint: list[int], seq: list[int], expected: int, ngram: int = 3) -> int | None:
    """Position in `hint` right after the end of `seq`: where the longest suffix of `seq` (at most
    `ngram` tokens) occurs in `hint`, the occurrence nearest `expected`; None if no token matches."""
    if 0 < expected <= len(hint) and hint[expected - 1] == seq[-1] and (
            expected < 2 or len(seq) < 2 or hint[expected - 2] == seq[-2]):
        return expected  # still in step: no search
    for m in range(min(ngram, len(seq)), 0, -1):
        suf = seq[-m:]
        first = suf[0]
        cands = [i + m for i in range(len(hint) - m + 1) if hint[i] == first and hint[i:i + m] == suf]
        if cands:
            return min(cands, key=lambda c: abs(c - expected))
    return None
