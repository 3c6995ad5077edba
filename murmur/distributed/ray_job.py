"""`murmur batch --ray`: the job on a Ray cluster, with Ray Core actors that plan and transcribe.

Why Ray Core and not Ray Data: a recording fans out into chunks that must come back together, in
order, for one stitch and one diarization over the whole recording, and each output is written
once per recording as soon as its last chunk is done. Ray Data streams rows through fixed-size
`map_batches` calls and would need an all-to-all groupby (a barrier) to regroup chunks; an actor's
engine also wants chunks to join its rows the moment rows free up (continuous batching), not in
batches the data layer cuts. With Core, the driver is a small loop over object refs, and every call
goes to a transcription actor (`Transcriber`, one per `actor_cpus` CPUs, the model loaded once):

- plan (`Transcriber.plan`, on each node in turn): decode, VAD, chunk; returns a small meta object
  (the driver reads it), the chunk groups (never fetched by the driver; they stay in the planning
  node's object store) and the speech regions. Planning runs in the actor's own process, in a thread
  beside its engine, as the local runner does: a separate planner process per node started a second
  Ray worker beside the actor, which the raylet boots one at a time on a 1-CPU node (the actor was
  ready 2 s later) and which cost 3-4 s of CPU a node besides;
- transcribe (`Transcriber.transcribe`): chunk groups of any recording join one continuously batched
  engine (murmur.distributed.feed), and each chunk's segments come back; the groups of a long
  recording go to whichever actors have room;
- finish: stitch (and diarize once, over the whole recording, on an actor when asked), then the driver
  writes DIR/<id>.<ext> atomically and appends the summary line.

Backpressure: each actor holds at most its rows and one group more in chunks (counted in chunks,
not groups: a short clip is a group of one chunk; more only lengthens the job's tail, where one actor
still decodes what it holds while the others idle), recordings are planned only while fewer chunks than
the actors have rows wait for one, and at most `max_recordings` are planned or in flight, so audio is
decoded only as fast as actors consume it.

Retries, set deliberately: an actor process that dies is restarted by Ray (ACTOR_RESTARTS), but its
calls are not retried by Ray (max_task_retries=0), since an actor on a dead node cannot restart until
a node has room and Ray's retry would wait on it. The driver sends them again instead, to any live
actor: a lost group goes back in the queue, a lost plan or diarization is sent again, and a
recording whose planned chunks were lost with their node (ObjectLostError) is planned again. A
recording loses work at most LOST_LIMIT times, then fails with the error.
"""
from __future__ import annotations

import math
import os
import time
from collections import deque

import ray
from ray.exceptions import ObjectLostError, RayActorError, RayError, RayTaskError

from murmur.distributed import workers
from murmur.distributed.inputs import item_options
from murmur.distributed.job import OutputDir, Progress, _message, _report, plan_job, start_job, summary_line
from murmur.distributed.workers import plan_recording, transcript_of
from murmur.errors import MurmurError

ACTOR_RESTARTS = 3
LOST_LIMIT = 4  # times a recording may lose work to a dead actor or node before it fails
WARMUP_S = 120.0  # at most this long, ready actors take only their share while others load the model
STALL_S = 900.0  # no live actor this long: the rest of the job fails with a clear error


class Transcriber(workers.Transcriber):
    """A transcription actor: the model loaded once, torch threads = the CPUs Ray gave it; it also
    plans recordings and diarizes them, in threads beside its engine."""

    @ray.method(num_returns=3)
    def plan(self, audio: str, o, chunks_per_task: int):
        return plan_recording(audio, o, chunks_per_task)

    def diarize(self, audio: str, per_chunk: list, regions, o):
        """Stitch and diarize over the whole recording (speaker labels stay global), as locally."""
        from murmur.audio.decode import load_audio
        from murmur.transcribe import finish
        segments, turns, _, _ = finish(per_chunk, load_audio(audio), None, o, regions=regions)
        return segments, turns

    def ready(self) -> dict:
        """Where it runs, and when (epoch s) its process began to load and had the model."""
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), "started": self.started,
                "loaded": self.loaded_at}

    def engine_stats(self) -> dict:
        return {**self.ready(), **super().engine_stats()}


_REMOTE: dict = {}


def _remote(cls):
    """The Ray actor class of `cls`, made once (ray.remote at import would need Ray up)."""
    if cls not in _REMOTE:
        _REMOTE[cls] = ray.remote(cls)
    return _REMOTE[cls]


class _Rec:
    """What the driver holds for a recording in flight: refs and the finished chunks' segments."""
    __slots__ = ("item", "o", "t0", "meta", "data", "regions", "results", "left", "stats", "name", "lang",
                 "lost")

    def __init__(self, item, o):
        self.item, self.o, self.t0 = item, o, time.perf_counter()
        self.meta = self.data = self.regions = None
        self.results: list | None = None
        self.left = 0
        self.stats: dict = {}
        self.name = self.lang = None
        self.lost = 0  # times a dead actor or node lost its plan, chunks or diarization


class _Actor:
    __slots__ = ("handle", "chunks", "ready", "probe", "info")

    def __init__(self, handle):
        self.handle, self.chunks, self.ready, self.probe, self.info = handle, 0, False, None, None


def _lost_object(e: BaseException) -> bool:
    """An argument gone with its node, whether Ray says so or the call's own get of it does."""
    return isinstance(e, ObjectLostError) or isinstance(getattr(e, "cause", None), ObjectLostError)


def _system_error(e: BaseException) -> bool:
    """A lost worker, actor, node or object: retry elsewhere. Another RayTaskError is the code's own."""
    return isinstance(e, RayError) and (isinstance(e, RayActorError) or not isinstance(e, RayTaskError)
                                        or _lost_object(e))


def _cause(e: BaseException) -> str:
    cause = getattr(e, "cause", None) if isinstance(e, RayTaskError) else e
    return _message(cause) if cause is not None else str(e).splitlines()[0]


def run_ray(items, out: OutputDir, model: str, options, address: str | None = None, progress: bool = True,
            actors: int | None = None, actor_cpus: float = 1.0, chunks_per_task: int = 4,
            max_recordings: int | None = None, on_event=None) -> dict:
    """Run the job on the Ray cluster at `address` (None: $RAY_ADDRESS, else a local Ray instance):
    `model` by name (each actor loads it), `options` a TranscribeOptions, items' manifest options over it.
    `on_event(name, info)` is called on actor ready/dead, group done/lost, work lost (a plan, chunks or
    a diarization), each recording written and, at the end, each live actor's engine counters
    ("actor_stats"; tests and scripts/ray_scaling.py use it)."""
    started = False
    if not ray.is_initialized():
        kw = {} if (address or os.environ.get("RAY_ADDRESS")) else {"include_dashboard": False}
        ray.init(address=address, logging_level="WARNING", log_to_driver=False, **kw)
        started = True
    try:
        return _Driver(items, out, model, options, actors, actor_cpus, chunks_per_task, max_recordings, progress,
                       on_event).run()
    finally:
        if started:
            ray.shutdown()


class _Driver:
    def __init__(self, items, out, model, options, actors, actor_cpus, chunks_per_task, max_recordings, progress, on_event):
        self.items, self.out, self.on_event = items, out, on_event or (lambda *a: None)
        self.want_stats = on_event is not None  # the actors' engine counters at the end, as "actor_stats"
        self.options = options.with_(progress=False)
        self.model = (str(model), options.device, options.compute_type)
        cpus = ray.cluster_resources().get("CPU", 1)
        self.n_actors = actors or max(1, int(cpus // actor_cpus))
        self.actor_cpus = actor_cpus
        self.threads = max(1, round(actor_cpus))
        self.chunks_per_task = max(1, chunks_per_task)
        self.rows = options.batch_size  # an actor's engine rows
        self.cap = self.rows + self.chunks_per_task  # chunks an actor holds: its rows and one group more
        self.max_recordings = max_recordings or 2 * self.n_actors * self.cap
        self.progress = progress
        self.replacements = 0

    def _size(self, rec: _Rec, gi: int) -> int:
        """Chunks in group gi of a planned recording (groups of chunks_per_task, the last one shorter)."""
        return min(self.chunks_per_task, rec.meta["chunks"] - gi * self.chunks_per_task)

    def _new_actor(self) -> _Actor:
        # threads: one per group it holds (a chunk or more), plus plans, diarizations and probes
        cls = _remote(Transcriber).options(
            num_cpus=self.actor_cpus, max_restarts=ACTOR_RESTARTS, max_task_retries=0,
            max_concurrency=self.cap + 2 * self.n_actors + 4)
        a = _Actor(cls.remote(*self.model, self.threads))
        a.probe = a.handle.ready.remote()
        return a

    def run(self) -> dict:
        todo, skip, bad = plan_job(self.items, self.out)
        counts = {"ok": 0, "error": 0, "skipped": len(skip)}
        bar = Progress(len(todo) + len(bad), self.progress, label="batch (ray)")
        try:
            start_job(self.out, bar, counts, skip, bad)
            if todo:
                self._loop(deque(todo), bar, counts)
        finally:
            bar.close()
            self.out.compact(self.items)
        return counts

    def _loop(self, queue: deque, bar: Progress, counts: dict) -> None:
        pool = [self._new_actor() for _ in range(self.n_actors)]
        turn = 0  # actors take plans and diarizations in turn
        plans: dict = {}  # meta ref -> (rec, actor)
        calls: dict = {}  # call ref -> (rec, group index, actor)
        finishing: dict = {}  # diarize ref -> (rec, per-chunk segments, actor)
        groups: deque = deque()  # (rec, group index) waiting for an actor
        diarize_queue: deque = deque()  # (rec, per-chunk segments) waiting for an actor
        active = 0
        last_live = time.monotonic()
        warmup = last_live + WARMUP_S

        def next_actor(live: list) -> _Actor:
            """The next ready actor in turn for a plan or a diarization: not one still loading or
            restarting, which may wait long for a node (an autoscaler's, or more actors than CPUs)."""
            nonlocal turn
            turn += 1
            return live[turn % len(live)]

        def suspect(a: _Actor) -> None:
            """A call on it was lost: wait for Ray to restart it (or give up on it) before it takes more."""
            if a.ready and a.probe is None:
                a.ready = False
                a.probe = a.handle.ready.remote()

        def done(rec: _Rec, line: dict) -> None:
            nonlocal active
            active -= 1
            _report(self.out, bar, counts, line)
            self.on_event("recording", line)

        def drop(rec: _Rec) -> None:
            """Forget the recording's groups, waiting or in flight: their answers are moot now."""
            if rec.results is not None:
                rec.results = None
                for k in [k for k, v in calls.items() if v[0] is rec]:
                    _, gi, a = calls.pop(k)
                    a.chunks -= self._size(rec, gi)
            for i, g in reversed(list(enumerate(groups))):
                if g[0] is rec:
                    del groups[i]

        def fail(rec: _Rec, msg: str) -> None:
            drop(rec)
            done(rec, summary_line(rec.item, "error", self.out.formats, error=msg))

        def lost(rec: _Rec, e: BaseException, what: str) -> bool:
            """Count a loss to a dead actor or node; False (and the recording failed) past LOST_LIMIT."""
            rec.lost += 1
            self.on_event("work_lost", {"id": rec.item.id, "what": what, "error": type(e).__name__})
            if rec.lost >= LOST_LIMIT:
                fail(rec, f"{what} lost {rec.lost} times: {_cause(e)}")
                return False
            return True

        def replan(rec: _Rec) -> None:
            """Plan it again from its file: its planned chunks went with their node."""
            nonlocal active
            drop(rec)
            rec.meta = rec.data = rec.regions = None
            rec.stats, active = {}, active - 1
            queue.appendleft(rec)

        def write(rec: _Rec, segments, turns) -> None:
            wall = time.perf_counter() - rec.t0
            t = transcript_of(rec.meta, segments, turns, rec.stats, rec.name or self.model[0], rec.lang,
                              rec.o, wall, "ray")
            try:
                self.out.write_outputs(rec.item, t)
            except (OSError, MurmurError) as e:
                return done(rec, summary_line(rec.item, "error", self.out.formats, error=_message(e)))
            done(rec, summary_line(rec.item, "ok", self.out.formats, t, wall))

        def all_groups_done(rec: _Rec) -> None:
            per_chunk = [segs for part in rec.results for segs in part]
            rec.results = None
            if rec.o.diarize and rec.meta["chunks"]:
                diarize_queue.append((rec, per_chunk))
                return
            from murmur.transcribe import finish
            segments, turns, _, _ = finish(per_chunk, None, None, rec.o.with_(diarize=False))
            write(rec, segments, turns)

        while queue or active:
            live = [a for a in pool if a.ready]
            # the plans in flight are bounded here: planning takes CPU from the actors' engines
            waiting_chunks = sum(self._size(g[0], g[1]) for g in groups)
            while (queue and active < self.max_recordings and len(plans) < self.n_actors + 1
                   and waiting_chunks < self.n_actors * self.rows and live):
                it = queue.popleft()
                rec = it if isinstance(it, _Rec) else _Rec(it, item_options(self.options, it.options))
                a = next_actor(live)
                rec.meta, rec.data, rec.regions = a.handle.plan.remote(rec.item.audio, rec.o, self.chunks_per_task)
                plans[rec.meta] = (rec, a)
                active += 1
            cap = self.cap
            if len(live) < len(pool) and time.monotonic() < warmup:
                # while others still load the model, a ready actor takes only its share of the
                # chunks there are: it starts at once, and a long recording still spreads over all
                cap = min(cap, math.ceil((waiting_chunks + sum(a.chunks for a in live)) / len(pool)))
            if live:
                last_live = time.monotonic()
            elif time.monotonic() - last_live > STALL_S:
                raise MurmurError(f"no transcription actor alive for {STALL_S:.0f} s; rerun to finish the job")
            while groups:
                room = [a for a in live if a.chunks < cap]
                if not room:
                    break
                a = min(room, key=lambda a: a.chunks)
                rec, gi = groups.popleft()
                ref = a.handle.transcribe.remote(rec.data, gi, rec.o)
                calls[ref] = (rec, gi, a)
                a.chunks += self._size(rec, gi)
            while diarize_queue and len(finishing) < self.n_actors and live:
                rec, per_chunk = diarize_queue.popleft()
                a = next_actor(live)
                ref = a.handle.diarize.remote(rec.item.audio, per_chunk, rec.regions, rec.o)
                finishing[ref] = (rec, per_chunk, a)
            probes = {a.probe: a for a in pool if a.probe is not None}
            waiting = [*plans, *calls, *finishing, *probes]
            if not waiting:
                time.sleep(0.05)
                continue
            ready, _ = ray.wait(waiting, num_returns=1, timeout=1.0)
            if ready:
                ready, _ = ray.wait(waiting, num_returns=len(waiting), timeout=0)
            for ref in ready:
                if ref in probes:
                    a = probes[ref]
                    a.probe = None
                    try:
                        a.info = ray.get(ref)
                        a.ready = True
                        self.on_event("actor_ready", a.info)
                    except RayError as e:  # restarts used up: replace it, within bounds
                        pool.remove(a)
                        self.on_event("actor_dead", str(e).splitlines()[0])
                        if self.replacements < 2 * self.n_actors:
                            self.replacements += 1
                            pool.append(self._new_actor())
                elif ref in plans:
                    rec, a = plans.pop(ref)
                    try:
                        meta = ray.get(ref)
                    except RayError as e:
                        if not _system_error(e):
                            fail(rec, f"planning failed: {_cause(e)}")
                        elif lost(rec, e, "planning"):
                            suspect(a)
                            replan(rec)
                        continue
                    if meta.get("error"):
                        rec.meta = None
                        fail(rec, meta["error"])
                        continue
                    rec.meta = meta
                    rec.results, rec.left = [None] * meta["groups"], meta["groups"]
                    if not meta["groups"]:  # no speech: nothing to decode, still one output per format
                        rec.results = []
                        all_groups_done(rec)
                    groups.extend((rec, gi) for gi in range(meta["groups"]))
                elif ref in calls:
                    rec, gi, a = calls.pop(ref)
                    a.chunks -= self._size(rec, gi)
                    try:
                        segs, stats, rec.name, rec.lang = ray.get(ref)
                    except RayError as e:
                        if not _system_error(e):
                            fail(rec, _cause(e))
                            continue
                        self.on_event("group_lost", {"id": rec.item.id, "group": gi, "error": type(e).__name__})
                        if _lost_object(e):  # its chunks went with the node that planned them
                            if lost(rec, e, "planned chunks"):
                                replan(rec)
                            continue
                        suspect(a)
                        if lost(rec, e, f"chunk group {gi}"):
                            groups.appendleft((rec, gi))
                        continue
                    if rec.results is None or rec.results[gi] is not None:
                        continue  # the recording failed meanwhile, or a duplicate answer
                    rec.results[gi] = segs
                    self.on_event("group_done", {"id": rec.item.id, "group": gi, **(a.info or {})})
                    for k, v in stats.items():
                        rec.stats[k] = rec.stats.get(k, 0) + v
                    rec.left -= 1
                    if rec.left == 0:
                        rec.data = None  # drop the ref: the chunks' audio can leave the object store
                        all_groups_done(rec)
                elif ref in finishing:
                    rec, per_chunk, a = finishing.pop(ref)
                    try:
                        segments, turns = ray.get(ref)
                    except RayError as e:
                        if not _system_error(e):
                            fail(rec, f"diarization failed: {_cause(e)}")
                        elif lost(rec, e, "diarization"):
                            suspect(a)
                            diarize_queue.appendleft((rec, per_chunk))
                        continue
                    write(rec, segments, turns)
        if self.want_stats:
            for a in pool:
                if a.ready:
                    try:
                        self.on_event("actor_stats", ray.get(a.handle.engine_stats.remote(), timeout=10))
                    except RayError:
                        pass
