"""Inference cost per image of the shipped encoders on this CPU, at batch 1 and batch 32, in one run.

What is timed is ``Encoder.embed`` on images already decoded to 2-D float32 in [0, 1] (what the worker hands
it after DICOM decoding), at the data sets' sizes and at a typical clinical frame size: MONAI preprocessing + network, the ultrasound DDIM refinement included. File and
DICOM decoding are not part of it; for ``us`` the lesion finder and both views (whole image, lesion crop)
are. For ``us`` the time at batch 32 is also split into its stages (lesion finder, crops and preprocessing,
VAE encoder over every view, refinement, head). Goal: >= 20 US images/s at batch 32, lesion finder included.

    .venv/bin/python bench/encoder_throughput.py [--threads 1] [--images 96] [--repeats 3] [--device cpu]
        [--us-weights us.pt candidate.pt ...]   # several ultrasound checkpoints timed in one run
        [--xr-weights xr.pt candidate.pt ...]   # several X-ray checkpoints timed in one run
        [--batch32-only]                        # only the goal's figure; prints each one's ratio to the first

``--device`` is the worker's setting (``cpu``, ``cuda``, ``cuda:N``, ``auto``); on a GPU the forward runs under
autocast (float16) as in the worker, and the per-stage split (CPU only) is left out.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
#: A typical clinical frame size per modality (rows, columns): the data sets' images are already small.
CLINICAL = {"us": (600, 800), "xr": (2048, 2048)}
DATA = {"us": ROOT.parent / "shared" / "data" / "busi", "xr": ROOT.parent / "shared" / "data" / "kermany_cxr"}


def sample_images(modality: str, n: int) -> tuple[list[np.ndarray], str]:
    """``n`` real images of the modality's data set (test split), read by the shared reader; random if absent."""
    from lookalike.lab.images import load_image, read_manifest

    try:
        rows = [r for r in read_manifest(DATA[modality]) if r["split"] == "test"][:n]
        images = [load_image(r["path"]) for r in rows]
        if len(images) == n:
            shapes = np.array([im.shape for im in images])
            return images, f"{DATA[modality].name} test, median {int(np.median(shapes[:, 0]))}x{int(np.median(shapes[:, 1]))} px"
    except FileNotFoundError:
        pass
    rng = np.random.default_rng(0)
    return [rng.random((480, 560), dtype=np.float32) for _ in range(n)], "random 480x560"


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``repeats`` calls after one warm-up (the machine is shared: median, not mean)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class _Fixed:
    """A stand-in finder that returns boxes already found, to time the crops apart from the finder."""

    def __init__(self, boxes: list[Any]) -> None:
        self.boxes = boxes

    def find(self, images: list[np.ndarray]) -> list[Any]:
        return self.boxes[: len(images)]


def time_fused(net: Any, enc: Any, batch: list[np.ndarray], x: Any, split: dict[str, float], repeats: int) -> None:
    """Per-stage time of a fused ultrasound encoder (:mod:`lookalike.encoders.fused`) on one batch."""
    import torch

    from lookalike.encoders.lesion import prepare_views

    boxes = enc.finder.find(batch)
    split["lesion finder"] = best_of(lambda: enc.finder.find(batch), repeats)
    split["views (crop, preprocess)"] = best_of(
        lambda: prepare_views(batch, enc._preprocess, enc.views, _Fixed(boxes), enc.lesion_margin), repeats)
    with torch.no_grad():
        if net.base_input != "none":
            split["VAE-diffusion branch"] = best_of(lambda: net.base_block(x), repeats)
        if net.im_views:
            split[f"ImageNet branch {net.im_size} px"] = best_of(lambda: net.imagenet_blocks(x), repeats)
        feats = net.features(x)
        split["head"] = best_of(lambda: net.head(feats), repeats)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (the worker uses 1)")
    p.add_argument("--images", type=int, default=96, help="images per timed pass (a multiple of 32)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (the worker's setting)")
    p.add_argument("--us-weights", type=Path, nargs="+", default=[None],
                   help="ultrasound checkpoints to time in this one run (default: the shipped one)")
    p.add_argument("--xr-weights", type=Path, nargs="+", default=[None],
                   help="X-ray checkpoints to time in this one run (default: the shipped one)")
    p.add_argument("--no-xr", action="store_true", help="time the ultrasound checkpoints only")
    p.add_argument("--no-us", action="store_true", help="time the X-ray checkpoints only")
    p.add_argument("--batch32-only", action="store_true",
                   help="only batch 32 on the data set's images (the cost goal's figure): no batch 1, no large frames, "
                        "no stages; for comparing checkpoints on a loaded machine")
    a = p.parse_args(argv)

    import torch

    from lookalike.encoders import load_encoder
    from lookalike.encoders.base import resolve_device

    torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {device}, {a.images} images per "
          f"pass, median of {a.repeats}")
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{'encoder':24s} {'batch':>5s} {'ms/image':>9s} {'images/s':>9s}  images")
    stages: dict[str, dict[str, float]] = {}
    rates: dict[str, dict[str, float]] = {"us": {}, "xr": {}}  # images/s at batch 32 on the data set's images
    for name, weights in [*(("us", w) for w in a.us_weights if not a.no_us),
                          *(("xr", w) for w in a.xr_weights if not a.no_xr)]:
        enc = load_encoder(name, weights=weights, device=device)
        images, what = sample_images(name, a.images)
        for batch in ((32,) if a.batch32_only else (1, 32)):
            enc.batch_size = batch
            n = a.images if batch > 1 else min(a.images, 32)
            t = best_of(lambda: enc.embed(images[:n]), a.repeats)
            print(f"{enc.model_version:24s} {batch:5d} {1000 * t / n:9.2f} {n / t:9.1f}  {what}")
            if batch == 32:
                rates[name][f"{enc.model_version} ({weights or 'shipped'})"] = n / t
        if a.batch32_only:
            continue
        from PIL import Image

        rows, cols = CLINICAL[name]
        big = [np.asarray(Image.fromarray(im, mode="F").resize((cols, rows), Image.BILINEAR)) for im in images[:32]]
        enc.batch_size = 32
        t = best_of(lambda: enc.embed(big), a.repeats)
        print(f"{enc.model_version:24s} {32:5d} {1000 * t / 32:9.2f} {32 / t:9.1f}  the same, upsampled to {rows}x{cols} px")
        enc.batch_size = 64
        if name == "us" and device == "cpu":
            from lookalike.encoders.lesion import prepare_views

            net = enc.net
            batch = images[:32]
            stages[enc.model_version] = split = {}
            x, _ = prepare_views(batch, enc._preprocess, enc.views, enc.finder, enc.lesion_margin)
            if hasattr(net, "base"):  # fused with the ImageNet trunk: time its branches
                time_fused(net, enc, batch, x, split, a.repeats)
                continue
            flat = x.reshape(-1, 1, *x.shape[2:])  # every view goes through the trunk
            with torch.no_grad():
                h, z = net.encode(flat)
                feats = net.features(x)
                if enc.finder is not None:
                    split["lesion finder"] = best_of(lambda: enc.finder.find(batch), a.repeats)
                    boxes = enc.finder.find(batch)
                    split["views (crop, preprocess)"] = best_of(
                        lambda: prepare_views(batch, enc._preprocess, enc.views, None if "lesion" not in enc.views
                                              else _Fixed(boxes), enc.lesion_margin), a.repeats)
                else:
                    split["preprocess"] = best_of(lambda: [enc._preprocess(im) for im in batch], a.repeats)
                split[f"VAE encoder x{len(enc.views)} views"] = best_of(lambda: net.encode(flat), a.repeats)
                if set(net.blocks) & {"m", "zr"}:
                    split["DDIM refinement"] = best_of(lambda: net.refine(z), a.repeats)
                split["head"] = best_of(lambda: net.head(feats), a.repeats)
    for name, by_version in rates.items():  # the machine is shared: compare encoders by their ratio in this run
        if len(by_version) < 2:
            continue
        first, base = next(iter(by_version.items()))
        print(f"\nbatch 32, images/s relative to the first {name} encoder ({first}):")
        for version, r in by_version.items():
            print(f"  {version:60s} {r:7.1f} images/s  ratio {r / base:5.2f}")
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    for version, split in stages.items():
        total = sum(split.values())
        print(f"\n{version} at batch 32, per image, by stage:")
        for stage, t in split.items():
            print(f"  {stage:16s} {1000 * t / 32:7.2f} ms  {100 * t / total:5.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
