"""One engine for many live streams (and file jobs): a background thread runs `Engine.run` over a
`PriorityScheduler`, so every stream's pending update is a request and all of them decode as rows
of one batch.

The priority hook is `PriorityScheduler.submit(req, priority=...)` / `add_source(scheduler,
priority=...)`: ready requests are handed to free rows lowest priority value first (LIVE before
FILE, then in arrival order), and while live streams are active `reserve_live` rows are kept from
file work, so a live update never waits for a long file window to finish.
"""
from __future__ import annotations

import heapq
import itertools
import threading
import time
from dataclasses import dataclass, field

from murmur.engine.decoding import DecodingOptions
from murmur.engine.runner import Engine, Request
from murmur.spec.speculator import parse_speculative

LIVE = 0
FILE = 10
LIVE_RECENT_S = 5.0  # a live request this recent counts the live side as active (row reserve)


@dataclass(order=True)
class _Item:
    priority: int
    seq: int
    req: Request = field(compare=False)


class _Pending:
    """A submitted request's completion, waited on by the submitter's thread."""

    def __init__(self):
        self.event = threading.Event()
        self.error: BaseException | None = None


class PriorityScheduler:
    """The Scheduler protocol of murmur.engine, fed from many threads."""

    def __init__(self, reserve_live: int = 2):
        self.reserve_live = reserve_live
        self._lock = threading.Condition()
        self._heap: list[_Item] = []
        self._sources: list[tuple[int, int, object, threading.Event]] = []  # (priority, seq, scheduler, done)
        self._pending: dict[int, _Pending] = {}  # id(req) of submitted requests
        self._owner: dict[int, object] = {}  # id(req) -> the source scheduler that issued it
        self._seq = itertools.count()
        self._stopped = False
        self._last_live = -1e9
        self.busy = lambda: False  # set by the engine thread: are rows decoding?

    # --- submitters ----------------------------------------------------------------------------
    def submit(self, req: Request, priority: int = LIVE) -> _Pending:
        with self._lock:
            if self._stopped:
                raise RuntimeError("engine is stopped")
            p = _Pending()
            self._pending[id(req)] = p
            heapq.heappush(self._heap, _Item(priority, next(self._seq), req))
            if priority <= LIVE:
                self._last_live = time.monotonic()
            self._lock.notify_all()
            return p

    def add_source(self, scheduler, priority: int = FILE) -> threading.Event:
        """A whole scheduler (e.g. a file's murmur.scheduler.StreamScheduler); the event is set
        once it has finished."""
        done = threading.Event()
        with self._lock:
            self._sources.append((priority, next(self._seq), scheduler, done))
            self._sources.sort(key=lambda s: s[:2])
            self._lock.notify_all()
        return done

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify_all()

    # --- the engine's side ---------------------------------------------------------------------
    def pop_ready(self, n: int) -> list[Request]:
        with self._lock:
            while True:
                out = self._take(n)
                if out or self._stopped or self.busy():
                    return out
                self._lock.wait(0.5)  # idle engine: sleep until something is submitted

    def _take(self, n: int) -> list[Request]:
        out: list[Request] = []
        live_active = time.monotonic() - self._last_live < LIVE_RECENT_S
        while len(out) < n and (self._heap or self._sources):
            src = self._sources[0] if self._sources else None
            if self._heap and (src is None or self._heap[0].priority <= src[0]):
                out.append(heapq.heappop(self._heap).req)
                continue
            prio, _, sched, done = src
            room = n - len(out) - (self.reserve_live if live_active and prio > LIVE else 0)
            got = sched.pop_ready(room) if room > 0 else []
            for r in got:
                self._owner[id(r)] = sched
            out += got
            self._retire_finished()
            if not got:
                break  # the source has nothing ready now (its windows are in flight)
        return out

    def _retire_finished(self) -> None:
        keep = []
        for s in self._sources:
            if s[2].finished():
                s[3].set()
            else:
                keep.append(s)
        self._sources = keep

    def focus(self):
        """The engine's focus hook: while file windows decode, live updates step alone
        (murmur.engine.runner.Engine._focus), so a long file's rows do not slow every live token."""
        with self._lock:
            if not self._owner or not self._pending:
                return None
            live = set(self._pending)
        return lambda req: id(req) in live

    def complete(self, req: Request) -> None:
        with self._lock:
            sched = self._owner.pop(id(req), None)
            if sched is not None:
                sched.complete(req)
                self._retire_finished()
                self._lock.notify_all()
                return
            p = self._pending.pop(id(req), None)
        if p is not None:
            p.event.set()

    def finished(self) -> bool:
        with self._lock:
            return self._stopped

    def fail_all(self, error: BaseException) -> None:
        """The engine broke: every waiter gets the error instead of hanging."""
        with self._lock:
            for p in self._pending.values():
                p.error = error
                p.event.set()
            self._pending.clear()
            self._heap.clear()
            for s in self._sources:
                s[3].set()
            self._sources = []
            self._owner.clear()


def live_engine(loaded, options: DecodingOptions, batch_size: int, recycle: bool = True) -> Engine:
    """An engine for live updates; `recycle`: each update verifies the stream's previous hypothesis as
    its draft (murmur.spec.recycle: the same tokens, fewer forwards)."""
    return Engine(loaded, options, batch_size=batch_size, speculative=parse_speculative("recycle" if recycle else None))


class SharedEngine:
    """A decoder shared by streams (murmur.stream.transcriber.Decoder): `decode(req)` blocks the
    calling stream's thread while the engine thread batches it with everyone else's."""

    def __init__(self, loaded, batch_size: int = 16, options: DecodingOptions | None = None,
                 reserve_live: int = 2, recycle: bool = True):
        self.loaded = loaded
        self.recycle = recycle  # verify each update's draft, the stream's previous hypothesis
        self.options = options or DecodingOptions()
        self.batch_size = batch_size
        self.scheduler = PriorityScheduler(reserve_live)
        self.errors = 0
        self._thread = threading.Thread(target=self._loop, name="murmur-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self.scheduler.finished():
            engine = live_engine(self.loaded, self.options, self.batch_size, self.recycle)
            self.scheduler.busy = lambda: any(o is not None for o in engine.owner_of)
            try:
                engine.run(self.scheduler)
            except Exception as e:  # noqa: BLE001 - a broken batch must not leave streams hanging
                self.errors += 1
                self.scheduler.fail_all(e)

    def decode(self, req: Request, priority: int = LIVE) -> Request:
        p = self.scheduler.submit(req, priority)
        p.event.wait()
        if p.error is not None:
            raise RuntimeError(f"decoding failed: {p.error}") from p.error
        return req

    def run_source(self, scheduler, priority: int = FILE) -> None:
        """Decode a whole scheduler's requests (a file job) at `priority`; blocks until done."""
        self.scheduler.add_source(scheduler, priority).wait()

    def close(self) -> None:
        self.scheduler.stop()
        self._thread.join(timeout=10)
