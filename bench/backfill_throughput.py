"""Back-indexing throughput: ``lookalike backfill`` over N stored instances with 1 and 2 workers, in one run.

Prints instances/s for each worker count and its ratio to the bare ultrasound encoder's rate at the worker's
batch size (``batch_size``, 32: the worker embeds a batch in one forward) on the same decoded images, measured in
the same run; the rate at batch 1 is printed beside it. The stack has no plugin and no catch-up, so backfill is
the only thing that indexes; each timed run follows an untimed back-fill of other studies, in which each worker
loads its model. Workers run at normal priority here (not SCHED_IDLE), so that other load on the
machine does not starve the measurement.

    .venv/bin/python bench/backfill_throughput.py [--instances 2000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lookalike.dicom import decode_image, read_dataset  # noqa: E402
from lookalike.lab.samples import wrap_image  # noqa: E402
from lookalike.ops.stack import Stack, StackConfig, storescu  # noqa: E402


#: Instances back-filled before each timed run, enough for both workers' first batches (a worker prefetches 96).
WARM_UP = 256


def make_instances(out: Path, n: int, study_date: str = "20250101", prefix: str = "b") -> list[Path]:
    base = [pydicom.dcmread(f).pixel_array for f in sorted((ROOT / "deploy" / "samples").glob("us_*.dcm"))]
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        if i % 10 == 0:
            study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
        pixels = base[i % len(base)].astype(np.int16) + rng.integers(-8, 9, base[i % len(base)].shape[:2])
        ds = wrap_image(np.clip(pixels, 0, 255).astype(np.uint8), "US", patient_id=f"P{prefix}{i // 10:05d}",
                        patient_name="BENCH^B", patient_birth_date="19700101", patient_sex="F",
                        study_instance_uid=study, study_date=study_date, study_time="080000",
                        accession_number=f"{prefix}{i // 10:06d}", study_description="backfill bench",
                        series_instance_uid=series, instance_number=i % 10 + 1)
        path = out / f"{prefix}{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def bare_encoder_rate(files: list[Path], threads: int, batch: int) -> float:
    """Images/s of the shipped ultrasound encoder alone at ``batch``, on the instances' decoded images."""
    import torch

    from lookalike.encoders import load_encoder

    torch.set_num_threads(threads)
    encoder = load_encoder("us")
    images = [decode_image(read_dataset(f.read_bytes())).pixels for f in files[:max(200, 4 * batch)]]
    encoder.embed(images[:batch])  # warm-up
    start = time.perf_counter()
    for first in range(0, len(images), batch):
        encoder.embed(images[first:first + batch])
    return len(images) / (time.perf_counter() - start)


def backfill_rate(stack: Stack, n: int, *dates: str) -> tuple[float, dict]:
    settings = stack.config.state_dir / "lookalike.json"
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "lookalike.cli", "--config", str(settings), "backfill",
                          "--rate", "100000", "--batch", "256", *dates], capture_output=True, text=True, check=True)
    elapsed = time.perf_counter() - start
    report = json.loads(run.stdout)
    assert report["indexed"] == n, report
    return n / elapsed, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=2000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lookalike-backfill-bench-"))
    try:
        files = make_instances(tmp, args.instances)
        # Studies of an earlier year, back-filled (untimed) before each timed run: each worker loads its model on
        # its first batch (about 4 s), a one-off the bare encoder's rate leaves out too.
        warm = make_instances(tmp, WARM_UP, study_date="20240101", prefix="w")
        config = StackConfig.create(tmp / "stack", with_plugin=False,
                                    extra_settings={"catch_up_interval": 0, "worker_idle_priority": False,
                                                    "worker_nice": 0})
        results = {}
        with Stack(config) as stack:
            assert storescu(config, files + warm, timeout=1200).returncode == 0
            threads, batch = stack.config.settings().torch_threads, stack.config.settings().batch_size
            bare_one = bare_encoder_rate(files, threads, 1)
            bare = bare_encoder_rate(files, threads, batch)
            for workers in (1, 2):
                if workers == 2:
                    stack.stop_worker()
                    shutil.rmtree(config.state_dir / "index")
                    (config.state_dir / "index").mkdir(mode=0o700)
                    for name in ("worker", "worker2"):
                        stack.start_worker(name)
                    for name in ("worker", "worker2"):
                        while not stack.worker_ready(name):
                            time.sleep(0.2)
                backfill_rate(stack, WARM_UP, "--to", "20241231")
                rate, _ = backfill_rate(stack, args.instances, "--from", "20250101")
                results[workers] = rate
        print(f"instances: {args.instances} US, {files and pydicom.dcmread(files[0]).pixel_array.shape} px; "
              f"torch threads per worker: {threads}")
        print(f"bare US encoder: batch {batch} {bare:.1f} images/s (batch 1: {bare_one:.1f})")
        for workers, rate in results.items():
            print(f"backfill, {workers} worker(s): {rate:.1f} instances/s, ratio to the bare encoder at batch {batch}"
                  f" {rate / bare:.2f} (goal >= 0.9; to batch 1: {rate / bare_one:.2f})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
