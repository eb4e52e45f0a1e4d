"""Store-to-searchable latency of a one-instance US study, as a radiologist would see it.

For each of N studies: storescu sends the instance; the clock stops at the first 200 answer of
``GET /lookalike/studies/{id}/similar`` (polled every 20 ms). Indexing runs on ``NEW_INSTANCE``, so StableAge
is not part of the path. Prints median and 95th percentile (goal on this machine: p95 under 2 s).

    .venv/bin/python bench/store_to_searchable.py [--studies 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pydicom  # noqa: E402
from corpus import make_instances  # noqa: E402

from lookalike.ops.stack import Stack, StackConfig, storescu  # noqa: E402


def latency(stack: Stack, path: Path) -> float:
    http, url = stack.http(), stack.config.orthanc_url
    uid = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
    start = time.perf_counter()
    if storescu(stack.config, [path]).returncode != 0:
        raise RuntimeError(f"storescu failed for {path}")
    study = next(x["ID"] for x in http.post(f"{url}/tools/lookup", data=uid).json() if x["Type"] == "Study")
    while http.get(f"{url}/lookalike/studies/{study}/similar?limit=1").status_code != 200:
        if time.perf_counter() - start > 60:
            raise TimeoutError(f"{path} not searchable after 60 s")
        time.sleep(0.02)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = make_instances(tmp / "in", args.studies + 1, prefix="L")
        with Stack(StackConfig.create(tmp / "stack")) as stack:
            latency(stack, files[0])  # the worker loads its encoder on the first task: not what a reader waits for
            times = [latency(stack, f) for f in files[1:]]
    times.sort()
    p95 = times[min(len(times) - 1, round(0.95 * len(times)) - 1)]
    print(f"store-to-searchable over {len(times)} one-instance US studies (indexed on NEW_INSTANCE):")
    print(f"  median {statistics.median(times) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, max {times[-1] * 1000:.0f} ms (goal p95 < 2000 ms)")


if __name__ == "__main__":
    main()
