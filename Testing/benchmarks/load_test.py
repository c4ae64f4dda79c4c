"""Bounded load test of ``medsam3 serve`` on the loopback interface.

Starts a server (tiny random-weight model unless ``--model`` is given) on 127.0.0.1 with a small
queue, submits ``--jobs`` jobs from ``--threads`` client threads, and reports throughput and
latency percentiles. Every job must end explicitly — a result, or an error the client raised —
nothing lost; the exit code is 1 otherwise. It stops by itself (``--deadline`` seconds at most).

    python Testing/benchmarks/load_test.py --jobs 20 --threads 4
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "Testing"), str(REPO / "Testing" / "server")]

from harness import running_server  # noqa: E402
from phantoms import make_phantom  # noqa: E402

from MedicalSAM3Core.common.client import Client  # noqa: E402
from MedicalSAM3Core.common.options import SegmentOptions  # noqa: E402
from MedicalSAM3Core.common.volume import Volume  # noqa: E402


def run_jobs(url: str, jobs: int, threads: int, depth: int, deadline: float) -> dict:
    """Submit ``jobs`` jobs from ``threads`` threads; returns outcomes and timings."""
    options = SegmentOptions(mode="slices", score_threshold=0.2)
    stop_at = time.monotonic() + deadline
    outcomes: dict[int, tuple[str, float, str]] = {}
    lock = threading.Lock()

    def one(index: int) -> None:
        volume = Volume(make_phantom((depth, 40, 48), seed=index))
        started = time.monotonic()
        client = Client(url, poll_interval=0.05, busy_timeout=max(1.0, stop_at - time.monotonic()))
        try:
            result = client.segment(volume, ["liver", "spleen"], options)
            ok = result.shape == volume.shape
            outcome = ("ok" if ok else "wrong-shape", time.monotonic() - started, "")
        except Exception as error:  # an explicit failure is an outcome, recorded with its message
            outcome = ("error", time.monotonic() - started, f"{type(error).__name__}: {error}")
        with lock:
            outcomes[index] = outcome

    wall = time.monotonic()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [pool.submit(one, i) for i in range(jobs)]
        for future in as_completed(futures, timeout=deadline + 30):
            future.result()
    wall = time.monotonic() - wall
    latencies = np.array([t for state, t, _ in outcomes.values() if state == "ok"])
    return {"jobs": jobs, "threads": threads, "wall_s": wall, "outcomes": outcomes,
            "ok": int(sum(state == "ok" for state, _, _ in outcomes.values())),
            "lost": jobs - len(outcomes),
            "throughput_jobs_per_s": len(latencies) / wall if wall else 0.0,
            "latency_s": {p: float(np.percentile(latencies, p)) if latencies.size else float("nan")
                          for p in (50, 90, 99)}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--depth", type=int, default=6, help="slices per test volume (40x48 each)")
    parser.add_argument("--queue-size", type=int, default=4)
    parser.add_argument("--deadline", type=float, default=300.0, help="give up after this many seconds")
    parser.add_argument("--model", help="model folder (default: a tiny random-weight model)")
    parser.add_argument("--workers", type=int, default=1,
                        help="server workers, each with its own copy of the model (as 'medsam3 serve --devices')")
    args = parser.parse_args(argv)

    from MedicalSAM3Core.inference.models import load_model
    from MedicalSAM3Core.inference.tiny import build_tiny_model
    from MedicalSAM3Core.serving.app import ServerConfig
    from MedicalSAM3Core.serving.serve import engine_runner

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or str(build_tiny_model(Path(tmp) / "tiny", seed=0))
        models = [load_model(model_dir, device="auto") for _ in range(args.workers)]
        model = models[0]
        config = ServerConfig(queue_size=args.queue_size, retry_after=1)
        with running_server([engine_runner(m) for m in models], config) as (url, app):
            report = run_jobs(url, args.jobs, args.threads, args.depth, args.deadline)
            left = app.state.jobs.counts()
    errors = [message for state, _, message in report["outcomes"].values() if state != "ok"]
    latency = report["latency_s"]
    print(f"load test: {report['jobs']} jobs from {report['threads']} threads, {args.depth}x40x48 volumes, "
          f"queue size {args.queue_size}, {args.workers} worker(s) on {model.device}")
    print(f"  completed {report['ok']}, failed explicitly {len(errors)}, lost {report['lost']}")
    print(f"  wall {report['wall_s']:.2f} s, throughput {report['throughput_jobs_per_s']:.2f} jobs/s")
    print(f"  latency p50 {latency[50]:.2f} s, p90 {latency[90]:.2f} s, p99 {latency[99]:.2f} s")
    print(f"  server afterwards: {left}")
    for message in errors[:5]:
        print(f"  error: {message}")
    return 0 if report["lost"] == 0 and left["queued"] == 0 and left["running"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
