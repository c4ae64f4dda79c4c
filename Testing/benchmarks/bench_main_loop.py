"""How a run from the Slicer panel fares when Slicer's main thread keeps Python's GIL (issue #25).

Compares, on the same local engine (``medsam3 serve`` with a tiny random-weight model) and the same
512 x 512 x 100 volume, the round trip (voxels out, engine, result back) of

* ``process``: what the module does, the job's client work in a child process
  (:class:`MedicalSAM3Lib.backends.ProcessTask`), the GUI thread only polling small files;
* ``thread``: what the module did before, the same client work in a Python worker thread,

each with an idle main thread (sleeping between the 200 ms timer ticks, GIL released) and with a
main thread that keeps the GIL between ticks as Slicer's does (``Testing/slicer_main_loop.py``).
Prints seconds and the busy/idle ratio of each. Usage::

    python Testing/benchmarks/bench_main_loop.py [--repeats 3] [--python-share 0.05]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parents[1] / "MedicalSAM3Slicer")]

from slicer_main_loop import MainLoop, starvation  # noqa: E402

from MedicalSAM3Core.common.options import SegmentOptions  # noqa: E402
from MedicalSAM3Core.common.volume import Geometry, Volume  # noqa: E402
from MedicalSAM3Core.inference.tiny import build_tiny_model  # noqa: E402
from MedicalSAM3Lib.backends import LocalServer, start_job  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--python-share", type=float, default=0.05,
                        help="share of each tick the busy main thread spends running Python")
    args = parser.parse_args()

    print(f"harness: a worker thread gets {starvation():.3f} of its idle progress while the main thread holds the GIL")
    model = build_tiny_model(Path(tempfile.mkdtemp(prefix="medsam3-bench-")) / "tiny", seed=0)
    server = LocalServer(model=str(model), device="cpu", python=sys.executable, startup_timeout=300)
    server.client()
    array = np.random.default_rng(0).normal(40, 200, (100, 512, 512)).astype(np.int16)
    volume = Volume(array, Geometry(spacing=(0.7, 0.7, 2.0)))
    options = SegmentOptions(mode="slices", score_threshold=0.2)
    prompts = ["liver", "spleen"]

    def process(busy: bool) -> float:
        started = time.perf_counter()
        task = start_job(server, "segment", volume, prompts, options)
        MainLoop(busy=busy, python_share=args.python_share).run_until(lambda: task.finished, lambda: task.progress)
        assert task.error is None, task.error
        return time.perf_counter() - started

    def thread(busy: bool) -> float:
        started = time.perf_counter()
        box = {}
        worker = threading.Thread(target=lambda: box.update(r=server.client().segment(volume, prompts, options)),
                                  daemon=True)
        worker.start()
        MainLoop(busy=busy, python_share=args.python_share).run_until(lambda: not worker.is_alive(), lambda: None,
                                                                      timeout=3600)
        assert "r" in box
        return time.perf_counter() - started

    process(False)  # warm-up: the engine loads the model lazily
    try:
        for design in (process, thread):
            idle = statistics.median(design(False) for _ in range(args.repeats))
            busy = statistics.median(design(True) for _ in range(args.repeats))
            print(f"{design.__name__:8s} idle main thread {idle:6.2f} s   GIL-holding main thread {busy:6.2f} s   "
                  f"ratio {busy / idle:.2f}x", flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
