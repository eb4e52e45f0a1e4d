"""Train the shipped encoders from dataset folders holding ``manifest.csv`` (path,label,group,split).

One recipe per encoder, built from the shared stages of this module:

* ultrasound (``us``): :func:`lookalike.lab.training_us.train_us`, VAE and latent diffusion
  pre-training, metric stage, head refit;
* X-ray (``xr``): :func:`lookalike.lab.training_xr.train_xr`, ViT + head from scratch with a
  supervised contrastive loss on two augmented views;
* the lesion finder has its own command, :mod:`lookalike.lab.lesion_training`.

Shared here: seeding and device (:func:`start_run`), reading the sets (:func:`load_labelled`: several
folders train together, their ``train`` rows train and their ``val`` rows select), the validation score
(:class:`Validation`: val queries against a fixed sample of the training images), the metric stage's
epoch loop with selection on val P@5 (:func:`metric_stage`), the centre (:func:`add_centre`) and the
checkpoint file (:func:`save_checkpoint`). The command (``lookalike train``, :mod:`lookalike.lab.train`) picks
the recipe by modality; the recipes import this module, never the other way round.
"""

from __future__ import annotations

import functools
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import get_track_meta, set_track_meta
from monai.transforms import (
    Compose,
    EnsureType,
    RandAdjustContrast,
    RandAffine,
    RandFlip,
    RandGaussianNoise,
    RandGaussianSmooth,
    RandHistogramShift,
    ScaleIntensityRange,
)
from monai.utils import set_determinism
from tqdm import tqdm

from lookalike.encoders.base import centre_vectors
from lookalike.encoders.lesion import prepare_views
from lookalike.encoders.preprocessing import build_preprocess
from lookalike.lab.augment import scanner_intensity_steps
from lookalike.lab.images import load_image, read_manifest
from lookalike.lab.metrics import retrieval_metrics

#: Square input side per encoder, chosen for CPU cost (see ``shared/notes/ml.md`` beside the checkout).
IMAGE_SIZE: dict[str, int] = {"us": 64, "xr": 96}

Log = Callable[[str], None]


def print_log(line: str) -> None:
    """Default progress log: one flushed line per event."""
    print(line, flush=True)


def seed_everything(seed: int) -> None:
    """Seed python, numpy, torch (and MONAI's global determinism)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    set_determinism(seed=seed)


def start_run(seed: int, threads: int | None):
    """What every training recipe does first: seed everything, cap CPU threads, pick the device.

    Returns ``(device, amp)``: CUDA with mixed precision when there is a GPU, else the CPU in float32.
    """
    seed_everything(seed)
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device, device.type == "cuda"


def plain_tensors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` with MONAI's metadata tracking off: augmenting plain tensors is about three times faster."""
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        tracked = get_track_meta()
        set_track_meta(False)
        try:
            return fn(*args, **kwargs)
        finally:
            set_track_meta(tracked)

    return run


def run_command(command: str | None) -> str:
    """The command line recorded in a checkpoint: ``command`` or this process's own."""
    return command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])


Rows = list[dict[str, str]]


def starting_point(init: Path | None, image_size: int | None, default_size: int) -> tuple[dict[str, Any] | None, int]:
    """The checkpoint a run starts from (None: from scratch) and the input size: the checkpoint's when there is one.

    Raises
    ------
    ValueError
        ``image_size`` is given and differs from the checkpoint's.
    """
    if init is None:
        return None, image_size or default_size
    start = torch.load(init, map_location="cpu", weights_only=True)
    size = int(start["arch"]["image_size"])
    if image_size and image_size != size:
        raise ValueError(f"--image-size {image_size} does not match {init} ({size} px)")
    return start, size


def split_rows(
    data: Path | Sequence[Path], max_train: int | None, rng: np.random.Generator
) -> tuple[list[Path], Rows, Rows, Rows]:
    """The folders, all their rows, the ``train`` rows (at most ``max_train``, a random subset in file order)
    and the ``val`` rows. Several folders train together."""
    dirs = [Path(data)] if isinstance(data, (str, Path)) else [Path(d) for d in data]
    rows = [r for d in dirs for r in read_manifest(d)]
    train_rows = [r for r in rows if r.get("split") == "train"]
    val_rows = [r for r in rows if r.get("split") == "val"]
    if max_train and len(train_rows) > max_train:
        keep = rng.choice(len(train_rows), size=max_train, replace=False)
        train_rows = [train_rows[i] for i in sorted(keep)]
    return dirs, rows, train_rows, val_rows


def preprocess_all(
    paths: list[str],
    size: int,
    modality: str,
    views: Sequence[str] = ("whole",),
    finder: Any = None,
    margin: float = 0.5,
    chunk: int = 256,
) -> Any:
    """Load and preprocess every image once with the serving pipeline -> (n, len(views), size, size) tensor.

    The views (whole image, lesion crop) are made by :func:`lookalike.encoders.lesion.prepare_views`, the
    function :meth:`lookalike.encoders.base.Encoder.embed_with_boxes` calls, with the same finder.
    """
    pre = build_preprocess(size)
    parts = [
        prepare_views([load_image(p, modality) for p in paths[i : i + chunk]], pre, views, finder, margin)[0]
        for i in range(0, len(paths), chunk)
    ]
    return torch.cat(parts)


@dataclass
class Labelled:
    """Preprocessed images with their class indices and groups (patients: never matched to themselves)."""

    x: Any
    y: np.ndarray
    groups: list[str]


@dataclass
class TrainingData:
    """What a recipe trains and selects on."""

    dirs: list[Path]
    classes: list[str]
    train: Labelled
    val: Labelled

    def describe(self) -> dict[str, Any]:
        """The ``data`` entry of a checkpoint's ``meta``."""
        return {"dir": [str(d) for d in self.dirs], "classes": self.classes,
                "n_train": len(self.train.y), "n_val": len(self.val.y)}


def load_labelled(
    data: Path | Sequence[Path],
    size: int,
    modality: str,
    rng: np.random.Generator,
    *,
    max_train: int | None = None,
    views: Sequence[str] = ("whole",),
    finder: Any = None,
    margin: float = 0.5,
    device: Any = None,
    log: Log = print_log,
) -> TrainingData:
    """Read and preprocess the ``train`` and ``val`` rows of the sets (:func:`split_rows`, :func:`preprocess_all`)."""
    t0 = time.time()
    dirs, rows, train_rows, val_rows = split_rows(data, max_train, rng)
    classes = sorted({r["label"] for r in rows})
    log(f"[{modality}] {len(train_rows)} train, {len(val_rows)} val images, classes {classes}, {size} px, "
        f"views {tuple(views)}, {device}")

    def labelled(part: Rows) -> Labelled:
        x = preprocess_all([r["path"] for r in part], size, modality, views, finder, margin)
        return Labelled(x, np.array([classes.index(r["label"]) for r in part]), [r["group"] for r in part])

    out = TrainingData(dirs, classes, labelled(train_rows), labelled(val_rows))
    log(f"[{modality}] preprocessed in {time.time() - t0:.0f} s")
    return out


def balanced_batches(labels: np.ndarray, per_class: int, n_batches: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Class-balanced batches: ``per_class`` indices of every class, cycling through shuffled class lists."""
    pools = {c: rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)}
    cursor = {c: 0 for c in pools}
    out = []
    for _ in range(n_batches):
        idx = []
        for c, pool in pools.items():
            if cursor[c] + per_class > len(pool):
                pools[c] = pool = rng.permutation(pool)
                cursor[c] = 0
            idx.append(pool[cursor[c] : cursor[c] + per_class])
            cursor[c] += per_class
        out.append(np.concatenate(idx))
    return out


def embed_tensor(net: Any, x: Any, device: Any, batch: int = 128) -> np.ndarray:
    """Eval-mode L2-normalised embeddings of preprocessed images."""
    net.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            outs.append(F.normalize(net(x[i : i + batch].to(device)).float(), dim=1).cpu())
    return torch.cat(outs).numpy()


def augment_batch(aug: Any, x: Any) -> Any:
    """One independent draw of ``aug`` per image of the batch."""
    return torch.stack([aug(img) for img in x])


class Validation:
    """Val P@5 and the other protocol metrics: val queries against a fixed random sample of training images.

    The sample (``gallery_max`` images at most, drawn once) keeps the per-epoch score cheap; every stage of a
    run (epochs, head refit, centre) is scored against the same gallery, so their figures compare.
    """

    def __init__(self, data: TrainingData, device: Any, rng: np.random.Generator, gallery_max: int = 1500) -> None:
        self.data, self.device = data, device
        n = len(data.train.y)
        self.gallery = np.arange(n) if n <= gallery_max else np.sort(rng.choice(n, size=gallery_max, replace=False))

    def score(self, net: Any, center: np.ndarray | None = None) -> dict[str, float]:
        """Metrics of ``net`` (optionally centred on ``center``) as :func:`~lookalike.lab.metrics.retrieval_metrics` gives them."""
        tr, va, gal = self.data.train, self.data.val, self.gallery
        q, g = embed_tensor(net, va.x, self.device), embed_tensor(net, tr.x[gal], self.device)
        if center is not None:
            q, g = centre_vectors(q, center), centre_vectors(g, center)
        return retrieval_metrics(q, va.y, va.groups, g, tr.y[gal], [tr.groups[i] for i in gal])


def metric_stage(
    net: Any,
    clf: Any,
    groups: Sequence[tuple[list[Any], float]],
    batch_loss: Callable[[Any, Any], Any],
    data: TrainingData,
    validation: Validation,
    *,
    epochs: int,
    per_class: int,
    rng: np.random.Generator,
    device: Any,
    amp: bool,
    frozen: Sequence[Any] = (),
    tag: str = "",
    log: Log = print_log,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The epoch loop both encoders share; leaves ``net`` holding its epoch with the best val P@5.

    AdamW (weight decay 0.05) over ``groups`` (parameters, peak learning rate) and the linear classifier
    ``clf`` (with the last group's rate), one-cycle schedule, class-balanced batches of ``per_class`` images
    per class, mixed precision on CUDA. ``batch_loss(x, y)`` gets the batch's preprocessed images (on the CPU,
    to augment) and labels (on ``device``) and returns the recipe's loss. ``frozen`` modules stay in eval
    mode. With ``epochs == 0`` the network is only scored.

    Returns
    -------
    tuple
        The best epoch's val metrics (with ``"epoch"``) and the per-epoch history.
    """
    groups = [(list(params), lr) for params, lr in groups]
    groups[-1] = (groups[-1][0] + list(clf.parameters()), groups[-1][1])
    opt = torch.optim.AdamW([{"params": p, "lr": lr} for p, lr in groups], weight_decay=0.05)
    n_batches = max(1, len(data.train.y) // (per_class * len(data.classes)))
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[lr for _, lr in groups], total_steps=max(1, epochs * n_batches), pct_start=0.15
    )
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    best: dict[str, Any] = {"P@5": -1.0}
    best_state = None
    history = []
    if epochs == 0:
        best = {**validation.score(net), "epoch": 0}
    for ep in range(epochs):
        net.train()
        for module in frozen:
            module.eval()
        clf.train()
        t0, tot = time.time(), 0.0
        bar = tqdm(total=n_batches, desc=f"[{tag}] epoch {ep + 1}/{epochs}", leave=False, disable=None)
        for idx in balanced_batches(data.train.y, per_class, n_batches, rng):
            yb = torch.from_numpy(data.train.y[idx]).to(device)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
                loss = batch_loss(data.train.x[torch.from_numpy(idx)], yb)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            tot += float(loss.detach())
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        bar.close()
        m = validation.score(net)
        history.append({"epoch": ep + 1, "loss": tot / n_batches, "val_P@5": m["P@5"], "val_macro-P@5": m["macro-P@5"]})
        log(f"[{tag}] epoch {ep + 1}/{epochs} loss {tot / n_batches:.4f} val P@5 {m['P@5']:.3f} "
            f"macro-P@5 {m['macro-P@5']:.3f} ({time.time() - t0:.0f} s)")
        if m["P@5"] > best["P@5"]:
            best = {**m, "epoch": ep + 1}
            best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    if best_state is not None:
        net.load_state_dict(best_state)
    return best, history


def add_centre(
    net: Any, arch: dict[str, Any], data: TrainingData, validation: Validation, best: dict[str, Any],
    device: Any, tag: str, log: Log = print_log,
) -> dict[str, Any]:
    """Store the training images' mean unit embedding as ``arch["center"]``; return the centred val figures.

    The encoder subtracts it before the final normalisation, so that cosines spread over [-1, 1] instead of
    all lying near 1. Selection was made before and does not depend on it.
    """
    c = embed_tensor(net, data.train.x, device).mean(axis=0)
    arch["center"] = [float(v) for v in c]
    m = validation.score(net, c)
    log(f"[{tag}] centred on the training mean embedding: val P@5 {m['P@5']:.3f} (uncentred {best['P@5']:.3f})")
    return {"val": m, "val_P@5_uncentred": best["P@5"]}


def save_checkpoint(out: Path, arch: dict[str, Any], state_dict: dict[str, Any], meta: dict[str, Any],
                    **extra: Any) -> Path:
    """Write ``{"arch", "state_dict", "meta", **extra}`` atomically (a temporary file, then a rename).

    Floating tensors are stored as float32 on the CPU whatever the device and precision of training.
    """
    state = {k: v.detach().cpu().float() if v.is_floating_point() else v.cpu() for k, v in state_dict.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save({"arch": arch, "state_dict": state, "meta": json.loads(json.dumps(meta)), **extra}, tmp)
    tmp.replace(out)
    return out


def build_augment(size: int, flip: bool = True, field_of_view: bool = False, scanner: bool = False) -> Any:
    """Training-only MONAI augmentation applied to a preprocessed (1, size, size) tensor.

    Flips, a small affine (rotation, scale, shift), gamma contrast and mild noise; output clipped to [0, 1].

    Parameters
    ----------
    size : int
        Side of the preprocessed image, to scale the shift range.
    flip : bool
        Whether to include horizontal flips.
    field_of_view : bool
        Scanner-to-scanner variation instead of the small affine: zoom independently per axis (0.8x to 1.5x
        of the sampling grid, mostly zooming out: other scanners frame a lesion smaller or larger, and
        squashing images of other aspect ratios to a square stretches them), blur (other probes and
        resolutions) and a random monotone intensity curve (other gain and dynamic-range settings). BUSI's
        images are framed tightly on the lesion; breast ultrasound from elsewhere is not.
    scanner : bool
        Add :func:`lookalike.lab.augment.scanner_intensity_steps` (gain, depth-dependent gain, lateral gain field, speckle, blur,
        gamma) in place of the plain gamma and noise; works on multi-channel views too (one draw for all).
    """
    steps: list[Any] = []
    if flip:
        steps.append(RandFlip(prob=0.5, spatial_axis=1))
    if field_of_view:
        steps += [
            RandAffine(
                prob=0.9,
                rotate_range=(0.26,),
                scale_range=((-0.2, 0.5), (-0.2, 0.5)),
                translate_range=(0.1 * size, 0.1 * size),
                padding_mode="zeros",
            ),
            RandGaussianSmooth(prob=0.3, sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0)),
            RandHistogramShift(prob=0.3, num_control_points=(5, 10)),
        ]
    else:
        steps.append(
            RandAffine(
                prob=0.8,
                rotate_range=(0.26,),
                scale_range=(0.15, 0.15),
                translate_range=(0.08 * size, 0.08 * size),
                padding_mode="zeros",
            )
        )
    steps += (
        scanner_intensity_steps() if scanner
        else [RandAdjustContrast(prob=0.5, gamma=(0.7, 1.5)), RandGaussianNoise(prob=0.3, std=0.03)]
    )
    steps += [
        ScaleIntensityRange(a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True),
        EnsureType(data_type="tensor", track_meta=False),
    ]
    return Compose(steps)
