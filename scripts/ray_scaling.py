"""murmur batch on Ray: two-node vs one-node throughput, Ray-one-node vs local wall time, and the
driver's memory per recording over many short synthetic recordings.

    PYTHONPATH=$PWD python scripts/ray_scaling.py [--set lj|libri|both|all] [--repeat N] [--limit N]
        [--nodes 0,1,2,2,1,0] [--synthetic 2000] [--no-pin]

Sets: `lj` the 32 LJSpeech clips (3.7 min), `libri` the 100 LibriSpeech test-other utterances of
librispeech_other_noref (12.8 min), `both` (the default, 16.5 min), `all` every recording of the
shared data (152, 30 min). Nodes are real raylets on this
machine (ray.cluster_utils.Cluster, loopback only), one CPU each; each actor uses one torch thread, as
does the local run. Walls include the actors starting and loading the model, as a job would;
`startup_s` is when the last actor was ready (`actors_ready_s`: each, and on which node), and `steady`
divides the audio by the wall after it (an upper figure: ready actors start before the last one is).
On a machine shared with other work the figures are noisy: say so when quoting them.

With `--pin` (the default where the machine has two CPUs or more) each node is a 1-CPU node in fact,
not only in Ray's accounting: node i's processes (raylet, workers) run on CPU i alone, the driver and
the GCS beside the head on CPU 0, and the local run on CPU 0. Unpinned, the one-node run borrows the
idle second core for Ray's own processes and the driver, which the two-node run does not have to lend,
so its ratio understates what a second machine adds. Each run prints its engines' figures (steps,
busy rows a step, the engine thread's and the process's CPU s) and Ray's CPU s by process.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import wave
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray picks 127.0.0.1 for every server
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MURMUR_THREADS", "1")
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])


def _pin(cpu: int | None) -> None:
    """This process, and what it starts from now on, on `cpu` alone (None: leave as is)."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def _cluster(nodes: int, tmp: Path, pin: bool = False):
    from ray.cluster_utils import Cluster
    Path("/tmp/ray").mkdir(exist_ok=True)
    _pin(0 if pin else None)  # the head's processes inherit the driver's CPU
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                     "object_store_memory": 200_000_000, "temp_dir": str(tmp)})
    for i in range(1, nodes):
        _pin(i if pin else None)
        c.add_node(num_cpus=1, object_store_memory=200_000_000)
    _pin(0 if pin else None)
    c.wait_for_nodes()
    return c


def _ray_run(nodes: int, items, out: Path, tmp: Path, pin: bool = False, **kw) -> tuple:
    """(wall, counts, driver RSS growth, actors ready, last group by node, idle CPU s per core, CPU s by
    process, engine counters by node) of one job on a fresh `nodes`-node cluster."""
    import psutil
    import ray

    from murmur.distributed.job import OutputDir
    from murmur.distributed.ray_job import run_ray
    from murmur.options import TranscribeOptions
    c = _cluster(nodes, tmp, pin)
    ray.init(address=c.address, logging_level="WARNING", log_to_driver=False)
    try:
        rss0 = psutil.Process().memory_info().rss
        cpu0 = psutil.cpu_times(percpu=True)
        t0, e0, c0 = time.perf_counter(), time.time(), time.process_time()
        ready, last, engines = [], {}, {}
        head = ray.get_runtime_context().get_node_id()

        def on_event(ev, info):
            side = "head" if info.get("node") == head else "worker"
            if ev == "actor_ready":  # when ready, on which node, when its process began and had the model
                ready.append((round(time.perf_counter() - t0, 2), side,
                              round(info["started"] - e0, 2), round(info["loaded"] - e0, 2)))
            elif ev == "actor_stats":
                engines[side] = _engine_figures(info)
            elif ev == "group_done" and "node" in info:  # when each node's actor finished its last group
                last[side] = round(time.perf_counter() - t0, 2)

        counts = run_ray(items, OutputDir(out, ["txt"]), "tiny.en", TranscribeOptions(), progress=False,
                         on_event=on_event, **kw)
        wall = time.perf_counter() - t0
        idle = [round(b.idle - a.idle, 1) for a, b in zip(cpu0, psutil.cpu_times(percpu=True))]
        cpu = {"driver": round(time.process_time() - c0, 1), **_cpu_by_process()}
        rss = psutil.Process().memory_info().rss - rss0
    finally:
        ray.shutdown()
        c.shutdown()
    return wall, counts, rss, ready, last, idle, cpu, engines


def _engine_figures(info: dict) -> dict:
    """An engine's steps, row-steps, encode/decode wall and its thread's and process's CPU s."""
    out = {k: round(info[k], 1) for k in ("steps", "row_steps", "encode_s", "decode_s", "engine_cpu_s",
                                          "process_cpu_s") if k in info}
    if info.get("steps"):
        out["rows_a_step"] = round(info["row_steps"] / info["steps"], 2)
    return out


def _cpu_by_process() -> dict:
    """CPU seconds (user + system) of Ray's processes, by name (ray::Transcriber, raylet...)."""
    import psutil
    out: dict = {}
    for p in psutil.process_iter(["name", "cpu_times"]):
        t = p.info["cpu_times"]
        ray_own = p.info["name"].startswith("ray::") or p.info["name"] in ("raylet", "gcs_server")
        if ray_own and t is not None and t.user + t.system > 0.1:
            out[p.info["name"]] = round(out.get(p.info["name"], 0) + t.user + t.system, 1)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _synthetic(folder: Path, n: int, seed: int = 0) -> list[str]:
    """n one-second recordings: quiet noise with a tone burst (no words to decode)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    t = np.arange(16000) / 16000
    for i in range(n):
        x = 0.01 * rng.standard_normal(16000) + 0.2 * np.sin(2 * np.pi * (200 + i % 300) * t) * (t > 0.5)
        with wave.open(str(folder / f"syn{i:05d}.wav"), "wb") as w:
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
            w.writeframes((x * 32767).astype(np.int16).tobytes())
    return [str(folder)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--set", choices=["lj", "libri", "both", "all"], default="both", help="the throughput batch")
    ap.add_argument("--limit", type=int, default=0, help="only the first N recordings of the set (0: all)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="the set this many times over (ids suffixed ~2, ~3, ...): a batch long enough that the "
                         "actors' start-up (a fixed 4-6 s here) weighs as little as in a real archive")
    ap.add_argument("--nodes", default="1,2", help="cluster sizes to run, in this order, 0 for the local runner; "
                    "1,2,2,1 or 0,1,1,0 cancels a host whose speed drifts (the ratios use each size's mean wall)")
    ap.add_argument("--local", action=argparse.BooleanOptionalAction, default=True,
                    help="a local run first when --nodes has no 0")
    ap.add_argument("--synthetic", type=int, default=2000, help="synthetic recordings for driver memory (0: skip)")
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=len(os.sched_getaffinity(0)) >= 2,
                    help="node i on CPU i alone, the local run on CPU 0 (default: where there are 2 CPUs)")
    args = ap.parse_args()
    every = set(os.sched_getaffinity(0))

    from murmur.distributed.inputs import expand
    from murmur.distributed.job import OutputDir, run_local
    from murmur.options import TranscribeOptions
    data = Path(args.data)
    clips = []
    if args.set in ("lj", "both"):
        clips += sorted((data / "ljspeech").glob("LJ*.flac"))
    if args.set in ("libri", "both"):
        clips += sorted((data / "librispeech_other_noref").rglob("*.flac"))
    if args.set == "all":  # every recording of the shared data: LJSpeech, LibriSpeech, AMI, TED, ...
        clips = sorted(p for p in data.rglob("*") if p.suffix in (".flac", ".mp3"))
    clips = clips[:args.limit or None]
    items = expand([str(c) for c in clips])
    items += [replace(it, id=f"{it.id}~{k}") for k in range(2, args.repeat + 1) for it in items[:len(clips)]]
    res = {}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        _pin(0 if args.pin else None)
        sizes = [int(x) for x in args.nodes.split(",")]
        if args.local and 0 not in sizes:
            sizes.insert(0, 0)
        res["pinned"] = args.pin
        from murmur.cpu import cpu_info
        info = cpu_info()
        res["cpu"], res["family"] = info.model, info.family
        res["recordings"], res["set"] = len(items), f"{args.set} x{args.repeat}"
        audio_s = None
        for run, nodes in enumerate(sizes):
            if nodes == 0:  # the local runner, on CPU 0 with one torch thread
                t0, c0, stats = time.perf_counter(), time.process_time(), {}
                run_local(items, OutputDir(d / f"local{run}", ["txt"]), "tiny.en", TranscribeOptions(),
                          progress=False, on_event=lambda ev, info: stats.update(info))
                res.setdefault("runs", []).append([0, round(time.perf_counter() - t0, 2)])
                stats["process_cpu_s"] -= c0  # this job's, not the script's before it
                print(json.dumps({"local_wall_s": res["runs"][-1][1], "engine": _engine_figures(stats)}), flush=True)
                continue
            wall, counts, _, ready, last, idle, cpu, engines = _ray_run(nodes, items, d / f"ray{run}",
                                                                        d / f"t{run}", pin=args.pin)
            assert counts["ok"] == len(items), counts
            res.setdefault("runs", []).append([nodes, round(wall, 2)])
            res[f"ray_{nodes}node_wall_s"] = round(wall, 2)
            summary = (d / f"ray{run}" / "summary.jsonl").read_text().splitlines()
            audio_s = sum(json.loads(x)["duration"] for x in summary)
            res[f"ray_{nodes}node_startup_s"] = max((r[0] for r in ready), default=0.0)
            res[f"ray_{nodes}node_actors_ready_s"] = ready
            res[f"ray_{nodes}node_last_group_s"] = last
            res[f"ray_{nodes}node_idle_cpu_s"] = idle  # per CPU: what the job left unused
            res[f"ray_{nodes}node_cpu_s"] = cpu  # the driver's over the job; Ray's by process name, its start included
            res[f"ray_{nodes}node_engines"] = engines
            print(json.dumps({f"ray_{nodes}node_wall_s": round(wall, 2), "startup_s": res[f"ray_{nodes}node_startup_s"],
                              "cpu_s": cpu, "engines": engines}), flush=True)
        if audio_s is not None:
            res["audio_s"] = round(audio_s, 1)
        for n in {k for k, _ in res["runs"]}:  # the mean wall of each size when it ran more than once
            walls = [w for k, w in res["runs"] if k == n]
            res["local_wall_s" if n == 0 else f"ray_{n}node_wall_s"] = round(sum(walls) / len(walls), 2)
        if {"ray_1node_wall_s", "ray_2node_wall_s"} <= res.keys():
            res["throughput_2node_over_1node"] = round(res["ray_1node_wall_s"] / res["ray_2node_wall_s"], 2)
            res["steady_2node_over_1node"] = round((res["ray_1node_wall_s"] - res["ray_1node_startup_s"])
                                                   / (res["ray_2node_wall_s"] - res["ray_2node_startup_s"]), 2)
        if "local_wall_s" in res and "ray_1node_wall_s" in res:
            res["ray_1node_over_local_wall"] = round(res["ray_1node_wall_s"] / res["local_wall_s"], 2)
        print(json.dumps(res), flush=True)
        os.sched_setaffinity(0, every)
        if args.synthetic:
            mem = {}
            for n in (args.synthetic // 10, args.synthetic):
                syn = expand(_synthetic(d / f"syn{n}", n))
                wall, counts, rss, *_ = _ray_run(1, syn, d / f"synout{n}", d / f"ts{n}")
                mem[n] = rss
                print(json.dumps({"recordings": n, "wall_s": round(wall, 1), **counts,
                                  "driver_rss_growth_mb": round(rss / 2**20, 1)}), flush=True)
            a, b = sorted(mem)
            print(json.dumps({"driver_bytes_per_recording": round((mem[b] - mem[a]) / (b - a)),
                              "from": f"RSS growth over {a} vs {b} recordings"}))


if __name__ == "__main__":
    main()
