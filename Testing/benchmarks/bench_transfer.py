"""How long does a 512x512x300 int16 CT take to travel to ``medsam3 serve`` and back?

Builds the volume from the real 512x512 DICOM CT series of the sample data (its 20 slices
repeated: gzip's 32 KB window never spans slices, so this compresses like a real 300-slice
scan), then times, on this machine:

* encode (gzip level 1) and decode of the request, and the bytes on the wire;
* a real HTTP submit to a loopback server (upload + decode + queueing, engine stubbed out);
* encode/decode of a result (uint8 label map + 3 bit-packed masks) and its download;

and compares the upload with the time a GPU needs to segment the volume. That GPU time is a
LOWER bound computed from the full-size model's FLOPs (Testing/benchmarks/RESULTS.md: 5613 GFLOP
per slice for the vision encoder alone) at the GPU's peak dense bf16 rate, so the real ratio
is more favourable than the printed one. Network time is extrapolated for 1 and 10 Gbit/s.

    python Testing/benchmarks/bench_transfer.py
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "Testing" / "server")]

from harness import running_server  # noqa: E402

from MedicalSAM3Core.common.result import LabelInfo, SegmentationResult, pack_mask  # noqa: E402
from MedicalSAM3Core.common.volume import Volume  # noqa: E402
from MedicalSAM3Core.common.wire import (MEDIA_TYPE, available_compressions, decode_request,  # noqa: E402
                                         decode_result, encode_request, encode_result)
from MedicalSAM3Core.serving.app import ServerConfig  # noqa: E402

VISION_GFLOP_PER_SLICE = 5613.0  # full-size SAM3 ViT at 1008 px (RESULTS.md)
GPU_PEAK_TFLOPS = {"H100 SXM (989 TFLOPS bf16 dense)": 989.0, "A100 (312 TFLOPS bf16 dense)": 312.0}


def best_of(fn, repeats=3):
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return min(times), value


def realistic_ct(depth: int = 300) -> Volume:
    from MedicalSAM3Core.imaging.io import read_volume

    data = Path(subprocess.run([sys.executable, str(REPO / "Resources" / "fetch_sample_data.py"), "--print-dir"],
                               check=True, capture_output=True, text=True).stdout.strip())
    subprocess.run([sys.executable, str(REPO / "Resources" / "fetch_sample_data.py")], check=True,
                   stdout=subprocess.DEVNULL)
    series = read_volume(data / "example_ct_dicom")
    array = series.array.astype(np.int16)
    stacked = np.concatenate([array] * (depth // array.shape[0] + 1))[:depth]
    return Volume(np.ascontiguousarray(stacked), series.geometry, modality="CT")


def main() -> int:
    volume = realistic_ct()
    raw_mb = volume.array.nbytes / 1e6
    print(f"volume {volume.shape} {volume.array.dtype}: {raw_mb:.1f} MB raw")
    for compression in available_compressions()[:-1]:
        t_enc, body = best_of(lambda: encode_request(volume, ["liver", "spleen", "aorta"], compression=compression))
        t_dec, _ = best_of(lambda: decode_request(body))
        print(f"request, {compression}: {len(body) / 1e6:.1f} MB on the wire ({len(body) / volume.array.nbytes:.0%} "
              f"of raw), encode {t_enc:.2f} s, decode {t_dec:.2f} s")
    # the rest uses the default (best available) compression, as the client does
    t_enc, body = best_of(lambda: encode_request(volume, ["liver", "spleen", "aorta"]))

    label_map = np.zeros(volume.shape, np.uint8)
    z, y, x = np.ogrid[:volume.shape[0], :volume.shape[1], :volume.shape[2]]
    for value, (cy, cx, r) in enumerate([(250, 180, 90), (230, 380, 45), (300, 260, 15)], start=1):
        label_map[:, ((y - cy) ** 2 + (x - cx) ** 2 < r * r)[0]] = value
    labels = [LabelInfo(v, n, n, n, (255, 0, 0), True) for v, n in [(1, "liver"), (2, "spleen"), (3, "aorta")]]
    result = SegmentationResult(label_map, volume.geometry, labels, [pack_mask(label_map == v) for v in (1, 2, 3)])
    t_renc, result_body = best_of(lambda: encode_result(result))
    t_rdec, _ = best_of(lambda: decode_result(result_body))
    print(f"result: {len(result_body) / 1e6:.2f} MB on the wire, encode {t_renc:.2f} s, decode {t_rdec:.2f} s")

    import requests

    def run(request, progress, cancel):
        return result

    with running_server(run, ServerConfig(queue_size=16, max_body_bytes=1 << 30)) as (url, _):
        session = requests.Session()

        def round_trip():
            job = session.post(url + "/v1/jobs", data=body, headers={"Content-Type": MEDIA_TYPE}, timeout=120).json()
            while session.get(f"{url}/v1/jobs/{job['job_id']}", timeout=60).json()["state"] != "done":
                time.sleep(0.01)
            content = session.get(f"{url}/v1/jobs/{job['job_id']}/result", timeout=120).content
            session.delete(f"{url}/v1/jobs/{job['job_id']}", timeout=60)
            return content

        t_http, content = best_of(round_trip)
        assert content == result_body
    client_side = t_enc + t_rdec
    print(f"loopback HTTP submit + server decode + result download: {t_http:.2f} s "
          f"(+ client encode/decode {client_side:.2f} s = {t_http + client_side:.2f} s end to end, no engine)")
    for gbit in (1.0, 10.0):
        net = (len(body) + len(result_body)) * 8 / (gbit * 1e9)
        print(f"  over {gbit:g} Gbit/s: + {net:.2f} s network -> {t_http + client_side + net:.2f} s")
    total_tflop = VISION_GFLOP_PER_SLICE * volume.shape[0] / 1e3
    for name, tflops in GPU_PEAK_TFLOPS.items():
        bound = total_tflop / tflops
        transfer = t_http + client_side + (len(body) + len(result_body)) * 8 / 1e9
        print(f"GPU lower bound, {name}: {bound:.2f} s for {volume.shape[0]} slices (vision encoder at peak) -> "
              f"transfer/segment ratio at 1 Gbit/s <= {transfer / bound:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
