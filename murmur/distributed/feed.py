"""A scheduler fed while the engine runs: an actor's engine decodes chunks from many recordings at once.

Callers add groups of chunk streams from any thread and wait for them; the engine thread takes new
streams whenever rows free up (the same continuous batching as one recording locally) and blocks only
when it has nothing at all to do.
"""
from __future__ import annotations

import threading
from collections import deque

from murmur.engine.longform import ChunkStream
from murmur.engine.scheduler import StreamScheduler


class _Group:
    def __init__(self, streams: list[ChunkStream]):
        self.streams = streams
        self.event = threading.Event()
        self.error: BaseException | None = None


class FeedScheduler(StreamScheduler):
    def __init__(self, max_open: int):
        super().__init__([], max_open)
        self.cv = threading.Condition()
        self.inbox: deque[ChunkStream] = deque()
        self.groups: list[_Group] = []
        self.stopped = False

    def add(self, streams: list[ChunkStream]) -> _Group:
        g = _Group(streams)
        with self.cv:
            self.groups.append(g)
            self.inbox.extend(streams)
            self.cv.notify()
        return g

    def stop(self, error: BaseException | None = None) -> None:
        with self.cv:
            self.stopped = True
            if error is not None:  # the engine failed: every waiting caller learns why
                for g in self.groups:
                    g.error = error
                    g.event.set()
                self.groups = []
            self.cv.notify()

    def _idle(self) -> bool:
        return not (self.inbox or self.pending or self.open or self.retries)

    def pop_ready(self, n: int):
        while True:
            with self.cv:
                # nothing of ours is in the engine when all our queues are empty: wait for work
                while self._idle() and not self.stopped:
                    self.cv.wait()
                self.pending.extend(s for s in self.inbox if not s.done)
                self.inbox.clear()
            out = super().pop_ready(n)
            self._release()
            # streams that ended without a window (silence) leave nothing to decode: wait again,
            # since the engine takes an empty answer from an idle scheduler as a stall
            if out or not self._idle() or self.stopped:
                return out

    def complete(self, req) -> None:
        super().complete(req)
        if req.owner.done:
            self._release()

    def _release(self) -> None:
        with self.cv:
            done = [g for g in self.groups if all(s.done for s in g.streams)]
            if done:
                self.groups = [g for g in self.groups if g not in done]
        for g in done:
            g.event.set()

    def finished(self) -> bool:
        with self.cv:
            return self.stopped and self._idle()
