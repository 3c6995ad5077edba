"""murmur batch on Ray: two-node vs one-node throughput, Ray-one-node vs local wall time, and the
driver's memory per recording over many short synthetic recordings.

    PYTHONPATH=$PWD python scripts/ray_scaling.py [--set lj|libri|both] [--limit N] [--synthetic 2000]

Sets: `lj` the 32 LJSpeech clips (3.7 min), `libri` the 100 LibriSpeech test-other utterances of
librispeech_other_noref (12.8 min), `both` (the default, 16.5 min). Nodes are real raylets on this
machine (ray.cluster_utils.Cluster, loopback only), one CPU each; each actor uses one torch thread, as
does the local run. Walls include the actors starting and loading the model, as a job would;
`startup_s` is when the last actor was ready, and `steady` divides the audio by the wall after it.
On a machine shared with other work the figures are noisy: say so when quoting them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray picks 127.0.0.1 for every server
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MURMUR_THREADS", "1")
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])


def _cluster(nodes: int, tmp: Path):
    from ray.cluster_utils import Cluster
    Path("/tmp/ray").mkdir(exist_ok=True)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                     "object_store_memory": 200_000_000, "temp_dir": str(tmp)})
    for _ in range(nodes - 1):
        c.add_node(num_cpus=1, object_store_memory=200_000_000)
    c.wait_for_nodes()
    return c


def _ray_run(nodes: int, items, out: Path, tmp: Path, **kw) -> tuple[float, dict, float, float]:
    import psutil
    import ray

    from murmur.distributed.job import OutputDir
    from murmur.distributed.ray_job import run_ray
    from murmur.options import TranscribeOptions
    c = _cluster(nodes, tmp)
    ray.init(address=c.address, logging_level="WARNING", log_to_driver=False)
    try:
        rss0 = psutil.Process().memory_info().rss
        t0 = time.perf_counter()
        ready = []
        counts = run_ray(items, OutputDir(out, ["txt"]), "tiny.en", TranscribeOptions(), progress=False,
                         on_event=lambda ev, _: ev == "actor_ready" and ready.append(time.perf_counter() - t0),
                         **kw)
        wall = time.perf_counter() - t0
        rss = psutil.Process().memory_info().rss - rss0
    finally:
        ray.shutdown()
        c.shutdown()
    return wall, counts, rss, max(ready, default=0.0)


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
    ap.add_argument("--set", choices=["lj", "libri", "both"], default="both", help="the throughput batch")
    ap.add_argument("--limit", type=int, default=0, help="only the first N recordings of the set (0: all)")
    ap.add_argument("--synthetic", type=int, default=2000, help="synthetic recordings for driver memory (0: skip)")
    args = ap.parse_args()

    from murmur.distributed.inputs import expand
    from murmur.distributed.job import OutputDir, run_local
    from murmur.options import TranscribeOptions
    data = Path(args.data)
    clips = []
    if args.set in ("lj", "both"):
        clips += sorted((data / "ljspeech").glob("LJ*.flac"))
    if args.set in ("libri", "both"):
        clips += sorted((data / "librispeech_other_noref").rglob("*.flac"))
    clips = clips[:args.limit or None]
    items = expand([str(c) for c in clips])
    res = {}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        t0 = time.perf_counter()
        run_local(items, OutputDir(d / "local", ["txt"]), "tiny.en", TranscribeOptions(), progress=False)
        res["local_wall_s"] = round(time.perf_counter() - t0, 2)
        audio_s = sum(json.loads(x)["duration"] for x in (d / "local" / "summary.jsonl").read_text().splitlines())
        from murmur.cpu import cpu_info
        info = cpu_info()
        res["cpu"], res["family"] = info.model, info.family
        res["recordings"], res["audio_s"] = len(items), round(audio_s, 1)
        for nodes in (1, 2):
            wall, counts, _, ready = _ray_run(nodes, items, d / f"ray{nodes}", d / f"t{nodes}")
            assert counts["ok"] == len(items), counts
            res[f"ray_{nodes}node_wall_s"] = round(wall, 2)
            res[f"ray_{nodes}node_startup_s"] = round(ready, 2)
        res["throughput_2node_over_1node"] = round(res["ray_1node_wall_s"] / res["ray_2node_wall_s"], 2)
        res["steady_2node_over_1node"] = round((res["ray_1node_wall_s"] - res["ray_1node_startup_s"])
                                               / (res["ray_2node_wall_s"] - res["ray_2node_startup_s"]), 2)
        res["ray_1node_over_local_wall"] = round(res["ray_1node_wall_s"] / res["local_wall_s"], 2)
        print(json.dumps(res), flush=True)
        if args.synthetic:
            mem = {}
            for n in (args.synthetic // 10, args.synthetic):
                syn = expand(_synthetic(d / f"syn{n}", n))
                wall, counts, rss, _ = _ray_run(1, syn, d / f"synout{n}", d / f"ts{n}")
                mem[n] = rss
                print(json.dumps({"recordings": n, "wall_s": round(wall, 1), **counts,
                                  "driver_rss_growth_mb": round(rss / 2**20, 1)}), flush=True)
            a, b = sorted(mem)
            print(json.dumps({"driver_bytes_per_recording": round((mem[b] - mem[a]) / (b - a)),
                              "from": f"RSS growth over {a} vs {b} recordings"}))


if __name__ == "__main__":
    main()
