"""A batch job's bookkeeping, shared by the local and the Ray runner: which recordings are done,
atomic outputs, DIR/summary.jsonl, and one progress bar for the whole job.

A recording is complete when summary.jsonl has an "ok" line for its id and every requested
DIR/<id>.<ext> exists. Outputs are written under a temporary name and renamed, then the summary line
is appended, so a run killed at any point leaves either a complete recording or one a rerun redoes.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from murmur.distributed.inputs import Item
from murmur.errors import MurmurError

SUMMARY = "summary.jsonl"


class OutputDir:
    def __init__(self, path: str | Path, formats: list[str]):
        self.path = Path(path)
        self.formats = list(formats)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MurmurError(f"cannot create output folder {self.path}: {e.strerror or e}") from None
        self.summary = self.path / SUMMARY
        self._lines: dict[str, dict] = {}  # complete recordings' lines, until the skips are written
        self._done = self._read_done()

    def _read_done(self) -> set[str]:
        done = set()
        if self.summary.exists():
            for line in self.summary.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash: that recording is simply redone
                if rec.get("status") in ("ok", "skipped") and set(self.formats) <= set(rec.get("formats", [])):
                    self._lines[rec["id"]] = rec
                    done.add(rec["id"])
        return done

    def complete(self, item: Item) -> bool:
        return item.id in self._done and all(self.file(item.id, f).is_file() for f in self.formats)

    def file(self, id_: str, fmt: str) -> Path:
        return self.path / f"{id_}.{fmt}"

    def write_outputs(self, item: Item, transcript) -> None:
        from murmur.output import writers
        # session ids come from the source's stem: make it the item's id (a manifest may rename)
        transcript.source = str(Path(item.audio).with_name(item.id + (Path(item.audio).suffix or ".wav")))
        texts = {f: writers.render(transcript, f) for f in self.formats}  # render all before writing any
        for fmt, text in texts.items():
            dest = self.file(item.id, fmt)
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
            with open(tmp, "w", encoding="utf-8", newline="\n") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)  # atomic: a reader sees the old file or the whole new one

    def record(self, line: dict) -> None:
        with open(self.summary, "a", encoding="utf-8") as f:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if line["status"] == "ok":
            self._done.add(line["id"])

    def skip_line(self, item: Item) -> dict:
        return {**self._lines.pop(item.id), "status": "skipped", "audio": item.audio}

    def compact(self, items: list[Item]) -> None:
        """Rewrite the summary as one line per recording, this job's in input order (each its latest
        line), then the lines of recordings this job did not name; atomically, like the outputs."""
        last: dict[str, dict] = {}
        for line in self.summary.read_text(encoding="utf-8").splitlines() if self.summary.exists() else []:
            try:
                rec = json.loads(line)
                last[rec["id"]] = rec
            except (ValueError, KeyError, TypeError):
                continue
        order = list(dict.fromkeys([it.id for it in items] + list(last)))
        tmp = self.summary.with_name(f".{SUMMARY}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for id_ in order:
                if id_ in last:
                    f.write(json.dumps(last[id_], ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.summary)


def summary_line(item: Item, status: str, formats: list[str], transcript=None, wall: float = 0.0,
                 error: str | None = None) -> dict:
    line = {"id": item.id, "audio": item.audio, "status": status}
    if transcript is not None:
        line.update(duration=round(transcript.duration, 3), wall=round(wall, 3),
                    words=len(transcript.text.split()),
                    speakers=len({t.speaker for t in transcript.turns}), formats=formats)
    if error:
        line["error"] = error
    return line


class Progress:
    """One bar for the job: recordings done of total, audio hours, throughput (audio s per wall s), ETA."""

    def __init__(self, total: int, enabled: bool = True, label: str = "batch"):
        self.total, self.done, self.errors, self.audio_s = total, 0, 0, 0.0
        self.t0 = time.perf_counter()
        self.bar = None
        if enabled and total:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[hours]:.2f} h audio, {task.fields[rtfx]:.1f}x real time"
                                           "{task.fields[errs]}"),
                                TextColumn("ETA"), TimeRemainingColumn(),
                                console=Console(stderr=True), transient=False)
            self.task = self.bar.add_task(label, total=total, hours=0.0, rtfx=0.0, errs="")
            self.bar.start()

    def advance(self, line: dict) -> None:
        self.done += 1
        self.errors += line["status"] == "error"
        self.audio_s += line.get("duration", 0.0) if line["status"] == "ok" else 0.0
        if self.bar:
            wall = max(time.perf_counter() - self.t0, 1e-9)
            self.bar.update(self.task, completed=self.done, hours=self.audio_s / 3600, rtfx=self.audio_s / wall,
                            errs=f", {self.errors} failed" if self.errors else "")

    def close(self) -> None:
        if self.bar:
            self.bar.stop()


def plan_job(items: list[Item], out: OutputDir) -> tuple[list[Item], list[Item], list[Item]]:
    """(to run, already complete, bad) — bad items are reported without running. The largest files
    run first (bytes stand in for duration): the job then ends on short clips, which leave the rows
    quickly, not on a long recording that keeps one engine busy while the others' rows empty."""
    todo, skip, bad = [], [], []
    for it in items:
        (bad if it.error else skip if out.complete(it) else todo).append(it)
    todo.sort(key=lambda it: -_size(it.audio))
    return todo, skip, bad


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:  # gone since it was listed: its plan reports the error
        return 0


def run_local(items: list[Item], out: OutputDir, model, options, progress: bool = True, on_event=None) -> dict:
    """The job in this process, with the Ray runner's continuous batching: one thread plans the next
    recordings (decode, VAD, chunks) while one engine decodes the chunks of many recordings in its
    rows, so a folder of short clips fills the rows as one long recording does. `model` is a name or
    a LoadedModel; `options` a TranscribeOptions, each item's manifest options over it. `on_event`, as
    for run_ray, gets the engine's counters at the end ("actor_stats")."""
    from murmur.models.loading import get_model
    from murmur.transcribe import set_threads
    todo, skip, bad = plan_job(items, out)
    counts = {"ok": 0, "error": 0, "skipped": len(skip)}
    bar = Progress(len(todo) + len(bad), progress)
    try:
        start_job(out, bar, counts, skip, bad)
        if todo:
            set_threads(options.threads)
            _LocalRun(get_model(model, options.device, options.compute_type), out, options, bar, counts,
                      on_event).run(todo)
    finally:
        bar.close()
        out.compact(items)
    return counts


class _LocalRun:
    """Recordings in flight hold at most twice the engine's rows in chunks (one always goes, however
    long), and the next is planned only below that, so audio is decoded as fast as chunks are."""

    def __init__(self, loaded, out: OutputDir, options, bar: "Progress", counts: dict, on_event=None):
        from murmur.distributed.workers import Transcriber
        self.out, self.options, self.bar, self.counts = out, options.with_(progress=False), bar, counts
        self.on_event = on_event
        self.worker = Transcriber(loaded)
        self.budget = 2 * options.batch_size

    def run(self, todo: list[Item]) -> None:
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor
        queue = deque(todo)
        try:
            with ThreadPoolExecutor(1, "murmur-plan") as planner, \
                    ThreadPoolExecutor(self.budget + 1, "murmur-batch") as pool:
                try:
                    self._loop(queue, planner, pool)
                    if self.on_event:
                        self.on_event("actor_stats", self.worker.engine_stats())
                except BaseException as e:  # Ctrl-C or a bug: the threads waiting on chunks return at once
                    pool.shutdown(wait=False, cancel_futures=True)
                    self.worker.abort(e)
                    raise
        finally:
            self.worker.close()

    def _loop(self, queue, planner, pool) -> None:
        from concurrent.futures import FIRST_COMPLETED, wait

        from murmur.distributed.inputs import item_options
        from murmur.distributed.workers import plan_recording
        decoding, held = {}, 0
        planning = None  # (future, item, options, start)
        while queue or planning or decoding:
            if planning is None and queue and held < self.budget:
                it = queue.popleft()
                o = item_options(self.options, it.options)
                planning = (planner.submit(plan_recording, it.audio, o, 1 << 30, o.diarize), it, o,
                            time.perf_counter())
            done, _ = wait([f for f in [planning and planning[0], *decoding] if f],
                           return_when=FIRST_COMPLETED)
            if planning and planning[0] in done:
                f, it, o, t0 = planning
                planning = None
                try:
                    meta, data, regions = f.result()
                except (MurmurError, OSError, ValueError) as e:
                    meta = {"error": _message(e)}
                if meta.get("error"):
                    _report(self.out, self.bar, self.counts,
                            summary_line(it, "error", self.out.formats, error=meta["error"]))
                else:
                    held += meta["chunks"]
                    decoding[pool.submit(self._decode, it, o, meta, data, regions, t0)] = meta["chunks"]
            for f in [f for f in done if f in decoding]:
                held -= decoding.pop(f)
                _report(self.out, self.bar, self.counts, f.result())

    def _decode(self, it: Item, o, meta: dict, data: dict, regions, t0: float) -> dict:
        """Its chunks through the shared engine, then stitch (and diarize), write: its summary line."""
        from murmur.distributed.workers import transcript_of
        from murmur.transcribe import finish
        try:
            per_chunk, stats, lang = [], {}, None
            if meta["groups"]:
                per_chunk, stats, _, lang = self.worker.transcribe(data, 0, o)
            segments, turns, _, _ = finish(per_chunk, data.pop("audio", None), None,
                                           o if meta["chunks"] else o.with_(diarize=False), regions=regions)
            wall = time.perf_counter() - t0
            t = transcript_of(meta, segments, turns, stats, self.worker.loaded.name, lang, o, wall, "local")
            self.out.write_outputs(it, t)
            return summary_line(it, "ok", self.out.formats, t, wall)
        except (MurmurError, OSError, ValueError) as e:  # the recording's own fault: report, go on
            return summary_line(it, "error", self.out.formats, error=_message(e))


def start_job(out: OutputDir, bar: "Progress", counts: dict, skip: list[Item], bad: list[Item]) -> None:
    for it in skip:
        out.record(out.skip_line(it))
    for it in bad:
        _report(out, bar, counts, summary_line(it, "error", out.formats, error=it.error))


def _message(e: BaseException) -> str:
    return str(e) if isinstance(e, MurmurError) else f"{type(e).__name__}: {e}"


def _report(out: OutputDir, bar: Progress, counts: dict, line: dict) -> None:
    out.record(line)
    counts[line["status"]] += 1
    bar.advance(line)
    if line["status"] == "error" and not bar.bar:
        print(f"error: {line['id']}: {line['error']}", file=sys.stderr)
