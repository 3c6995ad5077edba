"""What a draft source is: it proposes tokens a row is expected to produce next."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Draft:
    tokens: list[int]


class DraftSource:
    """One source. `propose` returns up to `k` tokens expected to follow the row's tokens so far
    (act.seqs[j]; its last one is the row's pending token, fed next)."""
    name = "source"

    def admit(self, engine, act) -> None:
        pass

    def prepare(self, engine, acts, k) -> None:
        """Before a step's proposals: `acts` are the requests in flight, `k(row)` a row's draft length
        (a source that drafts all rows in one batch does it here)."""

    def propose(self, engine, act, j: int, row: int, k: int) -> Draft | None:
        return None

    def after_forward(self, engine, hi: int, index) -> None:
        """After a verify forward: `index[r]` is the position of row r whose logits chose its pending token."""

    def describe(self) -> str:
        return self.name
