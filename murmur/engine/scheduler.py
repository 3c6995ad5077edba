"""Feeds the engine windows from many chunk streams at once.

Each stream has at most one window in flight (its next window depends on where the last one ended),
so parallelism comes from running many chunks as the rows of one batch. Streams are opened in order
and at most `max_open` hold their mel at a time, which bounds memory whatever the recording's length.
"""
from __future__ import annotations

from collections import deque
from typing import Callable

from murmur.engine.longform import ChunkStream
from murmur.engine.runner import Request


class StreamScheduler:
    def __init__(self, streams: list[ChunkStream], max_open: int,
                 on_progress: Callable[[float], None] | None = None):
        self.pending = deque(s for s in streams if not s.done)
        self.open: list[ChunkStream] = []
        self.retries: deque[Request] = deque()
        self.max_open = max(1, max_open)
        self.on_progress = on_progress
        self.streams = streams

    def pop_ready(self, n: int) -> list[Request]:
        out: list[Request] = []
        while self.retries and len(out) < n:
            out.append(self.retries.popleft())
        # oldest streams first: they finish and release memory soonest
        while len(out) < n:
            while self.pending and len(self.open) < self.max_open:
                self.open.append(self.pending.popleft())
            ready = [s for s in self.open if not s.waiting and not s.done]
            if not ready:
                break
            for s in ready[: n - len(out)]:
                before = s.seconds_done
                req = s.next_request()  # may skip silent windows, or finish the stream outright
                self._progress(s, before)
                if req is not None:
                    out.append(req)
            self.open = [s for s in self.open if not s.done]
        return out

    def _progress(self, stream: ChunkStream, before: float) -> None:
        if self.on_progress is not None and stream.seconds_done > before:
            self.on_progress(stream.seconds_done - before)

    def complete(self, req: Request) -> None:
        stream: ChunkStream = req.owner
        before = stream.seconds_done
        retry = stream.on_result(req)
        if retry is not None:
            self.retries.append(retry)
        if stream.done:  # by identity: ChunkStream's dataclass == compares its audio arrays
            self.open = [s for s in self.open if s is not stream]
        self._progress(stream, before)

    def finished(self) -> bool:
        return not self.pending and not self.open and not self.retries
