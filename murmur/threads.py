"""How many torch threads a stage runs on: what other programs leave idle, and scoped changes."""
from __future__ import annotations

import contextlib
import time

_IDLE: tuple[float, int] = (-1e9, 0)  # (when, result) of the last look


def idle_cores(busy: float = 30.0, every: float = 10.0) -> int:
    """Cores less than `busy` % loaded over 50 ms (at least 1), looked at again only after `every`
    seconds. Call it while this process waits: the load is then other programs'."""
    global _IDLE
    now = time.monotonic()
    if now - _IDLE[0] >= every:
        import psutil

        load = psutil.cpu_percent(interval=0.05, percpu=True)
        _IDLE = (now, max(1, sum(x < busy for x in load)))
    return _IDLE[1]


@contextlib.contextmanager
def torch_threads(n: int | None = None):
    """Inside, torch runs `n` intra-op threads (None: as it was); after, as it was, whatever the
    body did (importing silero_vad, for one, sets 1)."""
    import torch

    old = torch.get_num_threads()
    if n and n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)
