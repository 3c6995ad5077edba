"""`murmur bench-serve`: a loopback load generator for `murmur serve`.

It starts the server as a subprocess on a free 127.0.0.1 port, transcribes every file of the mix
in-process first (what `murmur transcribe` gives), then sends the mix by N concurrent clients, the
same requests one at a time, and an 11-s request repeatedly on an idle server and with the 15-min
recording in flight. Per length class: throughput, latency percentiles, errors, lost requests, and
the server's peak RSS.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CLASSES = (("<15 s", 15), ("15-60 s", 60), ("1-5 min", 300), ("15 min", float("inf")))


@dataclass
class Item:
    name: str
    path: Path
    duration: float
    reference: str = ""

    @property
    def cls(self) -> str:
        return next(n for n, hi in CLASSES if self.duration < hi)


def _write_wav(path: Path, audio: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())


def build_mix(tmp: Path, quick: bool) -> tuple[list[Item], Item, Item]:
    """The shared clips plus one stitched ~15-min recording; returns (mix, long one, 11-s probe)."""
    from murmur.audio.decode import load_audio
    from murmur.eval.bench import dataset
    d = dataset.data_dir()
    files = [d / "jfk" / "jfk.flac", d / "ted" / "bill_gates-TED.mp3"]
    ami = sorted((d / "ami").glob("*.flac"))
    lj = sorted((d / "ljspeech").glob("*.flac"))
    files += ami[:4] + lj[:8] if quick else ami + lj
    items = [Item(p.stem, p, len(load_audio(p)) / 16000) for p in files]
    long_audio = dataset.stitched().audio
    long_path = tmp / "stitched15.wav"
    _write_wav(long_path, long_audio)
    long = Item("stitched15", long_path, len(long_audio) / 16000)
    return items + [long], long, items[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RssWatch:
    def __init__(self, pid: int):
        import psutil
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def now(self) -> int:
        return self.proc.memory_info().rss

    def _run(self):
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.now())
            except Exception:
                return
            time.sleep(0.05)

    def reset(self):
        self.peak = self.now()

    def stop(self):
        self._stop.set()


def _pct(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)), 3) if xs else None


async def _send(client, url: str, item: Item, model: str) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    with open(item.path, "rb") as f:
        body = f.read()
    r = await client.post(url, files={"file": (item.path.name, body)}, data={"model": model})
    dt = time.perf_counter() - t0
    return r.status_code, (r.json().get("text", "") if r.status_code == 200 else r.text), dt


async def run_phase(url: str, items: list[Item], clients: int, max_time: float, model: str) -> dict:
    """`clients` workers pull the requests in order; what has not answered by `max_time` is lost."""
    import httpx
    queue: asyncio.Queue = asyncio.Queue()
    for i, it in enumerate(items):
        queue.put_nowait((i, it))
    results: dict[int, tuple] = {}
    limits = httpx.Limits(max_connections=clients + 4)

    async def worker(client):
        while True:
            try:
                i, it = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            try:
                results[i] = await _send(client, url, it, model)
            except Exception as e:  # a transport error is an error, not a lost request
                results[i] = (0, repr(e), float("nan"))

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=httpx.Timeout(max_time), limits=limits) as client:
        tasks = [asyncio.create_task(worker(client)) for _ in range(clients)]
        done, pending = await asyncio.wait(tasks, timeout=max_time)
        for t in pending:
            t.cancel()
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "results": results}


def summarize(items: list[Item], phase: dict) -> dict:
    res, wall = phase["results"], phase["wall_s"]
    out = {}
    for cls, _ in CLASSES + (("all", 0),):
        idx = [i for i, it in enumerate(items) if cls in ("all", it.cls)]
        if not idx:
            continue
        ok = [i for i in idx if i in res and res[i][0] == 200]
        lat = [res[i][2] for i in ok]
        out[cls] = {
            "requests": len(idx),
            "audio_s": round(sum(items[i].duration for i in idx), 1),
            "throughput_x": round(sum(items[i].duration for i in ok) / wall, 2) if wall else None,
            "p50_s": _pct(lat, 50), "p95_s": _pct(lat, 95), "p99_s": _pct(lat, 99),
            "errors": sum(1 for i in idx if i in res and res[i][0] != 200),
            "lost": sum(1 for i in idx if i not in res),
            "text_mismatch": sum(1 for i in ok if res[i][1] != items[i].reference),
        }
    return out


async def latency_probe(url: str, probe: Item, long: Item, n: int, model: str) -> dict:
    """The 11-s request's latency one at a time: idle, then while the long recording decodes."""
    import httpx
    async with httpx.AsyncClient(timeout=600) as client:
        idle = [(await _send(client, url, probe, model))[2] for _ in range(n)]
        long_task = asyncio.create_task(_send(client, url, long, model))
        await asyncio.sleep(1.0)  # let it upload and start decoding
        busy = []
        while len(busy) < n and not long_task.done():
            st, _, dt = await _send(client, url, probe, model)
            if not long_task.done() and st == 200:
                busy.append(dt)
        await long_task
    return {"idle_p50_s": _pct(idle, 50), "idle_p95_s": _pct(idle, 95), "busy_p50_s": _pct(busy, 50),
            "busy_p95_s": _pct(busy, 95), "busy_samples": len(busy),
            "p95_ratio": round(_pct(busy, 95) / _pct(idle, 95), 2) if busy and idle else None,
            "idle_s": [round(x, 3) for x in idle], "busy_s": [round(x, 3) for x in busy]}


def _table(title: str, s: dict) -> str:
    cols = ("requests", "audio_s", "throughput_x", "p50_s", "p95_s", "p99_s", "errors", "lost", "text_mismatch")
    lines = [title, f"{'class':<9}" + "".join(f"{c:>14}" for c in cols)]
    for cls, row in s.items():
        lines.append(f"{cls:<9}" + "".join(f"{str(row[c]):>14}" for c in cols))
    return "\n".join(lines)


def run_bench(args) -> dict:
    import httpx

    from murmur.models.loading import get_model
    from murmur.transcribe import transcribe
    threads = str(args.threads or 2)
    os.environ.setdefault("MURMUR_THREADS", threads)
    tmp = Path(tempfile.mkdtemp(prefix="murmur-bench-serve-"))
    items, long, probe = build_mix(tmp, args.quick)
    t0 = time.perf_counter()
    loaded = get_model(args.model)
    for it in items:  # what `murmur transcribe FILE` prints, the text every answer must match
        it.reference = transcribe(it.path, model=loaded, batch_size=args.batch_size).text
    print(f"references: {len(items)} files, {sum(i.duration for i in items):.0f} s audio, "
          f"{time.perf_counter() - t0:.1f} s in-process", file=sys.stderr)
    reqs = items if args.requests is None else [items[i % len(items)] for i in range(args.requests)]

    port = _free_port()
    env = dict(os.environ, MURMUR_THREADS=threads)
    cmd = [sys.executable, "-m", "murmur.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--model", args.model, "--batch-size", str(args.batch_size), "--admission", args.admission,
           "--max-upload-mb", "500", "--max-queued-audio-s", "1e9", "--request-timeout-s", str(args.max_time_s)]
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}/v1/audio/transcriptions"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("server did not start")
            time.sleep(0.2)
        rss = RssWatch(proc.pid)
        asyncio.run(run_phase(url, [probe], 1, 120, args.model))  # warm-up
        idle_rss = rss.now()
        rss.reset()
        conc = asyncio.run(run_phase(url, reqs, args.clients, args.max_time_s, args.model))
        peak_conc = rss.peak
        rss.reset()
        seq = asyncio.run(run_phase(url, reqs, 1, args.max_time_s, args.model))
        peak_seq = rss.peak
        probe_res = asyncio.run(latency_probe(url, probe, long, args.latency_probes, args.model))
        rss.stop()
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()
    s_conc, s_seq = summarize(reqs, conc), summarize(reqs, seq)
    held_mb = sum(it.duration for it in reqs) * 16000 * 4 / 2**20  # every request's float32 audio at once
    out = {
        "clients": args.clients, "admission": args.admission, "batch_size": args.batch_size, "quick": args.quick,
        "threads": threads, "requests": len(reqs), "concurrent": s_conc, "one_at_a_time": s_seq,
        "wall_concurrent_s": round(conc["wall_s"], 2), "wall_one_at_a_time_s": round(seq["wall_s"], 2),
        "throughput_ratio": round(seq["wall_s"] / conc["wall_s"], 2),
        "idle_rss_mb": round(idle_rss / 2**20, 1), "peak_rss_concurrent_mb": round(peak_conc / 2**20, 1),
        "peak_rss_one_at_a_time_mb": round(peak_seq / 2**20, 1), "audio_held_upper_bound_mb": round(held_mb, 1),
        "rss_bound_mb": round(1.5 * idle_rss / 2**20 + held_mb, 1), "latency_11s": probe_res,
    }
    print(_table(f"concurrent ({args.clients} clients, {args.admission}), wall {out['wall_concurrent_s']} s", s_conc))
    print(_table(f"one at a time, wall {out['wall_one_at_a_time_s']} s", s_seq))
    print(f"throughput ratio (concurrent / one at a time): {out['throughput_ratio']}x")
    print(f"server RSS: idle {out['idle_rss_mb']} MB, peak concurrent {out['peak_rss_concurrent_mb']} MB, "
          f"peak one-at-a-time {out['peak_rss_one_at_a_time_mb']} MB; bound 1.5 x idle + audio held "
          f"({out['audio_held_upper_bound_mb']} MB) = {out['rss_bound_mb']} MB")
    p = probe_res
    print(f"11-s request: idle p50 {p['idle_p50_s']} s p95 {p['idle_p95_s']} s; with the 15-min recording in "
          f"flight p50 {p['busy_p50_s']} s p95 {p['busy_p95_s']} s ({p['busy_samples']} samples): "
          f"ratio {p['p95_ratio']}x")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))
    return out
