"""One long-lived engine loop per engine configuration, fed by the chunk streams of every request.

A request is a `Job` (murmur.transcribe): its chunk streams join the `ServerScheduler` of the engine
its options need. The loop runs `Engine.run` on its own thread; every step decodes a token for every
busy row, whichever request owns it. Admission picks which request's window takes a free row.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from murmur.engine.decoding import DecodingOptions
from murmur.engine.runner import Engine, Request
from murmur.engine.scheduler import StreamScheduler

log = logging.getLogger("murmur.serve")

POLICIES = ("round-robin", "shortest-first")
ADMIT_PER_STEP = 2  # new windows between two engine steps (see ServerScheduler)
SHORT_S = 30.0  # audio left that makes a request short: its windows go first (see ServerScheduler)


@dataclass(eq=False)
class Entry:
    """A request in flight: its job, where its results go (an asyncio loop), and its state."""
    job: Any  # murmur.transcribe.Job
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future  # result None when decoded; an exception when decoding failed
    on_segments: Callable[[list], None] | None = None  # called on the event loop, in order
    submitted: float = field(default_factory=time.monotonic)
    sched: StreamScheduler | None = None
    in_flight: int = 0  # its windows the engine holds

    def _call(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: nobody waits for this request any more
            pass

    def resolve(self, error: BaseException | None = None) -> None:
        def set_():
            if not self.done.done():
                self.done.set_exception(error) if error else self.done.set_result(None)
        self._call(set_)


class ServerScheduler:
    """The engine's scheduler for many requests at once (thread-safe; the engine calls it on its
    thread, handlers submit and cancel on theirs). Each request keeps its own StreamScheduler (its
    streams in order, at most `max_open` holding mel); admission chooses between requests:

    - round-robin: each free row goes to the next request in turn, so a request that arrives while
      a long one decodes takes the next free rows whatever that one has left;
    - shortest-first: free rows go to the request with the least audio left.

    No request holds more than `max_windows` windows at once (the engine's rows less one): a row is
    always free for the next request to start at once, not when a long one's window ends. And at
    most ADMIT_PER_STEP windows start between two steps: each costs every running row an encoder
    pass (~0.1 s), and a long request's first 15 windows held them all 1.5 s.
    """

    def __init__(self, max_open: int, policy: str = "round-robin", max_windows: int | None = None):
        if policy not in POLICIES:
            raise ValueError(f"unknown admission policy {policy!r}: choose from {', '.join(POLICIES)}")
        self.max_open, self.policy, self.max_windows = max_open, policy, max_windows
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._entries: list[Entry] = []
        self._owner: dict[int, Entry] = {}  # id(stream) -> its request
        self._dead: set[int] = set()  # ids of cancelled requests' streams, for the engine to drop
        self._turn = 0
        self.closed = False

    # --- handlers' side --------------------------------------------------------------------
    def submit(self, entry: Entry) -> None:
        entry.sched = StreamScheduler(entry.job.streams, max_open=self.max_open)
        with self._lock:
            for s in entry.job.streams:
                self._owner[id(s)] = entry
            self._entries.append(entry)
            if entry.sched.finished():  # no speech at all: nothing to decode
                self._retire(entry)
        self._wake.set()

    def cancel(self, entry: Entry) -> None:
        with self._lock:
            if entry in self._entries:
                self._dead |= {id(s) for s in entry.job.streams}
                self._retire(entry)
        self._wake.set()

    def close(self) -> None:
        self.closed = True
        with self._lock:
            for e in list(self._entries):
                self._retire(e, RuntimeError("server shutting down"))
        self._wake.set()

    def pending(self) -> list[Entry]:
        with self._lock:
            return list(self._entries)

    # --- engine's side ---------------------------------------------------------------------
    def take_cancelled(self) -> Callable[[Request], bool] | None:
        with self._lock:
            if not self._dead:
                return None
            dead, self._dead = self._dead, set()
        return lambda req: id(req.owner) in dead

    def wait_for_work(self) -> None:
        self._wake.wait(0.5)
        self._wake.clear()

    def pop_ready(self, n: int) -> list[Request]:
        n = min(n, ADMIT_PER_STEP)
        out: list[Request] = []
        with self._lock:
            entries = self._admissible()
            if self.policy == "shortest-first":
                for e in sorted(entries, key=lambda e: e.job.remaining_seconds()):
                    out += self._pop(e, n - len(out))
                    if len(out) >= n:
                        break
                return out
            progress = True
            while len(out) < n and progress:
                progress = False
                order = entries
                k = self._turn % len(order) if order else 0
                self._turn += 1  # a different request goes first each pass
                for e in order[k:] + order[:k]:
                    if len(out) >= n:
                        break
                    got = self._pop(e, 1)
                    out += got
                    progress = progress or bool(got)
        return out

    def _admissible(self) -> list[Entry]:
        """While a short request (one window of audio at most) decodes, longer ones start no new
        windows: each would stall its steps for an encoder pass, and their rows drain meanwhile.
        Only while short ones hold under half the rows, so a flood of them never starves the rest."""
        short = [e for e in self._entries if e.job.remaining_seconds() <= SHORT_S]
        held = sum(e.in_flight for e in short)
        if held and (self.max_windows is None or 2 * held < self.max_windows):
            return short
        return list(self._entries)

    def focus(self) -> Callable[[Request], bool] | None:
        """The engine's focus hook: while a short request decodes beside longer ones, its rows step
        alone (murmur.engine.runner.Engine._focus): a 16-row step costs ~4x a one-row step, which
        a short request would otherwise pay for each of its tokens."""
        with self._lock:
            short = [e for e in self._entries if e.job.remaining_seconds() <= SHORT_S]
            if not short or len(short) == len(self._entries):
                return None
            ids = {id(s) for e in short for s in e.job.streams}
        return lambda req: id(req.owner) in ids

    def _pop(self, e: Entry, n: int) -> list[Request]:
        if self.max_windows is not None:
            n = min(n, self.max_windows - e.in_flight)
            if n <= 0:
                return []
        try:
            got = e.sched.pop_ready(n)
        except Exception as ex:  # one request's failure must not stop the others
            log.exception("request failed while planning a window")
            self._retire(e, ex)
            return []
        e.in_flight += len(got)
        if e.sched.finished():  # its last windows were silent
            self._retire(e)
        return got

    def complete(self, req: Request) -> None:
        with self._lock:
            e = self._owner.get(id(req.owner))
            if e is None or e not in self._entries:
                return  # cancelled while its window decoded
            e.in_flight -= 1
            try:
                e.sched.complete(req)
                segs = e.job.take_finished_segments()
            except Exception as ex:
                log.exception("request failed on a window's result")
                self._retire(e, ex)
                return
            if segs and e.on_segments is not None:
                e._call(e.on_segments, segs)
            if e.sched.finished():
                self._retire(e)

    def _retire(self, e: Entry, error: BaseException | None = None) -> None:
        """Take a request off the scheduler (lock held) and tell its handler."""
        if e in self._entries:
            self._entries.remove(e)
        for s in e.job.streams:
            self._owner.pop(id(s), None)
            if error is not None or not s.done:
                s.close()  # free its mel at once
        if error is None and e.on_segments is not None:
            segs = e.job.take_finished_segments()
            if segs:
                e._call(e.on_segments, segs)
        e.resolve(error)

    def finished(self) -> bool:
        return self.closed and not self._entries

    def fail_all(self, error: BaseException) -> None:
        with self._lock:
            for e in list(self._entries):
                self._retire(e, error)


class EngineLoop:
    """An engine and its scheduler, decoding on a daemon thread for as long as the server runs."""

    def __init__(self, engine: Engine, policy: str = "round-robin", max_open: int | None = None):
        self.engine = engine
        self.scheduler = ServerScheduler(max_open or 2 * engine.batch_size, policy,
                                         max_windows=max(1, engine.batch_size - 1))
        self.thread = threading.Thread(target=self._run, name="murmur-engine", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.scheduler.closed:
            try:
                self.engine.run(self.scheduler)
            except Exception as e:  # fail what was in flight, keep serving
                log.exception("engine loop failed")
                self.scheduler.fail_all(e)
                self.engine.owner_of = [None] * self.engine.batch_size

    def busy_rows(self) -> int:
        return sum(o is not None for o in self.engine.owner_of)

    def close(self, timeout: float = 5.0) -> None:
        self.scheduler.close()
        self.thread.join(timeout)


def engine_options(opts: DecodingOptions) -> DecodingOptions:
    """What of the decoding options the engine itself uses (beam search, best_of, the logit rules):
    requests that differ only elsewhere (language, prompt, temperatures, thresholds) share an engine."""
    d = DecodingOptions()
    return d.with_(beam_size=opts.beam_size, best_of=opts.best_of, patience=opts.patience,
                   length_penalty=opts.length_penalty, suppress_tokens=opts.suppress_tokens,
                   suppress_blank=opts.suppress_blank, without_timestamps=opts.without_timestamps,
                   max_initial_timestamp=opts.max_initial_timestamp)
