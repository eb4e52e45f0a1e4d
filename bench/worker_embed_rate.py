"""The worker's embedding rate against the bare model's forward at the same batch size, in one run.

N single-frame ultrasound instances (the bundled samples' pixels under fresh UIDs) are stored in an Orthanc without
the plugin. The worker (one pool process, the settings' torch threads, normal CPU priority so that nothing else on
the machine starves the measurement) is sent N ``index_instance`` tasks at once, after a warm-up batch, and timed
until the catalogue holds all N: Redis, fetch from Orthanc, decode, embed in batches, one ``add_many`` per batch.
The bare rate is ``Encoder.embed`` on the same instances' decoded images, in batches of the worker's batch size
(the lesion finder and both views included, as in the worker), on one half before the worker's run and on the
other after it; the ratio is to their mean. Goal: ratio >= 0.8.

    .venv/bin/python bench/worker_embed_rate.py [--instances 512] [--device cpu]

``--device`` is the worker's setting (``cpu``, ``cuda``, ``cuda:N``, ``auto``), used by both sides.
"""

from __future__ import annotations

import argparse
import re
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus import make_instances  # noqa: E402

from lookalike.config import QUEUE, TASK_INDEX_INSTANCE  # noqa: E402
from lookalike.index.catalogue import CATALOGUE_FILE  # noqa: E402
from lookalike.ops.stack import Stack, StackConfig, storescu  # noqa: E402

WARM_UP = 32


def bare_rate(files: list[Path], batch: int, threads: int, device: str) -> float:
    """Images/s of ``Encoder.embed`` on the decoded images, ``batch`` per call (after one warm-up call)."""
    import torch

    from lookalike.dicom import decode_image, read_dataset
    from lookalike.encoders import load_encoder
    from lookalike.encoders.base import resolve_device

    torch.set_num_threads(threads)
    encoder = load_encoder("us", device=resolve_device(device))
    encoder.batch_size = batch
    images = [decode_image(read_dataset(f.read_bytes())).pixels for f in files]
    encoder.embed(images[:batch])
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        encoder.embed(images[i:i + batch])
    return len(images) / (time.perf_counter() - start)


def indexed(stack: Stack) -> int:
    path = stack.config.state_dir / "index" / CATALOGUE_FILE
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as conn:
        return conn.execute("SELECT COUNT(*) FROM instances WHERE vector IS NOT NULL").fetchone()[0]


def send_all(stack: Stack, app, ids: list[tuple[str, str, str]]) -> None:
    for instance_id, series_id, study_id in ids:
        app.send_task(TASK_INDEX_INSTANCE, args=[instance_id, series_id, study_id], queue=QUEUE)


def wait_for(stack: Stack, count: int, timeout: float = 1800.0) -> None:
    deadline = time.monotonic() + timeout
    while indexed(stack) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{indexed(stack)} of {count} indexed")
        time.sleep(0.02)


def orthanc_ids(stack: Stack) -> dict[str, tuple[str, str, str]]:
    """SOP Instance UID -> (instance, series, study) Orthanc ids."""
    http, url = stack.http(), stack.config.orthanc_url
    out = {}
    for series in http.get(f"{url}/series?expand", timeout=60).json():
        for instance_id in series["Instances"]:
            uid = http.get(f"{url}/instances/{instance_id}", timeout=30).json()["MainDicomTags"]["SOPInstanceUID"]
            out[uid] = (instance_id, series["ID"], series["ParentStudy"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    import pydicom

    from lookalike.worker.celery_app import make_app

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        warm = make_instances(tmp / "warm", WARM_UP, prefix="W")
        files = make_instances(tmp / "timed", args.instances, prefix="T")
        config = StackConfig.create(tmp / "stack", with_plugin=False, extra_settings={
            "catch_up_interval": 0, "worker_idle_priority": False, "worker_nice": 0, "device": args.device})
        settings = config.settings()
        bare = [bare_rate(files[: len(files) // 2], settings.batch_size, settings.torch_threads, args.device)]
        with Stack(config) as stack:
            assert storescu(config, warm + files, timeout=1800).returncode == 0
            ids = orthanc_ids(stack)
            app = make_app(settings)
            send_all(stack, app, [ids[pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID] for f in warm])
            wait_for(stack, WARM_UP)
            timed = [ids[pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID] for f in files]
            before = len((config.logs / "worker.log").read_text())
            start = time.perf_counter()
            send_all(stack, app, timed)
            wait_for(stack, WARM_UP + len(timed))
            elapsed = time.perf_counter() - start
            log = (config.logs / "worker.log").read_text()[before:]
        bare.append(bare_rate(files[len(files) // 2:], settings.batch_size, settings.torch_threads, args.device))
        shape = pydicom.dcmread(files[0]).pixel_array.shape
    worker = len(timed) / elapsed
    sizes = [int(n) for n in re.findall(r"embedding a batch of (\d+)", log)]
    # Each batch's log line: fetched and decoded in A s (K ahead), N embedded in B s.
    stages = [(float(a), int(k), int(n), float(b)) for a, k, n, b in
              re.findall(r"fetched and decoded in ([\d.]+) s \((\d+) ahead\), (\d+) embedded in ([\d.]+) s", log)]
    model, fetching = sum(s[3] for s in stages), sum(s[0] for s in stages)
    embedded, ahead = sum(s[2] for s in stages), sum(s[1] for s in stages)
    print(f"{args.instances} US instances {shape} px, device {args.device}, torch threads "
          f"{settings.torch_threads}, batch size {settings.batch_size} (worker's batches: median "
          f"{statistics.median(sizes):.0f}, max {max(sizes)})")
    mean = statistics.mean(bare)
    print(f"bare encoder forward, batch {settings.batch_size}: {mean:7.1f} images/s (before the worker "
          f"{bare[0]:.1f}, after {bare[1]:.1f}: the machine's other load moves it)")
    print(f"worker, Redis to catalogue:      {worker:7.1f} instances/s  ratio {worker / mean:.2f} (goal >= 0.8)")
    print(f"  of the worker's {elapsed:.1f} s: {model:.1f} s in the encoder ({embedded / max(model, 1e-9):.1f} images/s "
          f"there), {fetching:.1f} s fetching and decoding ({ahead} of {len(timed)} instances were decoded ahead)")


if __name__ == "__main__":
    main()
