"""Train the shipped encoders from dataset folders holding ``manifest.csv`` (path,label,group,split).

One recipe per encoder, built from the shared stages of this module:

* ultrasound (``us``): :func:`lookalike.encoders.training_us.train_us`, VAE and latent diffusion
  pre-training, metric stage, head refit;
* X-ray (``xr``): :func:`lookalike.encoders.training_xr.train_xr`, ViT + head from scratch with a
  supervised contrastive loss on two augmented views;
* the lesion finder has its own command, :mod:`lookalike.encoders.lesion_training`.

Shared here: seeding and device (:func:`start_run`), reading the sets (:func:`load_labelled`: several
folders train together, their ``train`` rows train and their ``val`` rows select), the validation score
(:class:`Validation`: val queries against a fixed sample of the training images), the metric stage's
epoch loop with selection on val P@5 (:func:`metric_stage`), the centre (:func:`add_centre`) and the
checkpoint file (:func:`save_checkpoint`). :func:`train` and :func:`main` (``lookalike train``) pick the
recipe by modality.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lookalike.encoders.base import centre_vectors
from lookalike.encoders.preprocessing import build_preprocess, load_image, read_manifest

Log = Callable[[str], None]


def print_log(line: str) -> None:
    """Default progress log: one flushed line per event."""
    print(line, flush=True)


def seed_everything(seed: int) -> None:
    """Seed python, numpy, torch (and MONAI's global determinism)."""
    import torch
    from monai.utils import set_determinism

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    set_determinism(seed=seed)


def start_run(seed: int, threads: int | None):
    """What every training recipe does first: seed everything, cap CPU threads, pick the device.

    Returns ``(device, amp)``: CUDA with mixed precision when there is a GPU, else the CPU in float32.
    """
    import torch

    seed_everything(seed)
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device, device.type == "cuda"


def plain_tensors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` with MONAI's metadata tracking off: augmenting plain tensors is about three times faster."""
    import functools

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        from monai.data import get_track_meta, set_track_meta

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
    import torch

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
    import torch

    from lookalike.encoders.lesion import prepare_views

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
    import torch
    import torch.nn.functional as F

    net.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            outs.append(F.normalize(net(x[i : i + batch].to(device)).float(), dim=1).cpu())
    return torch.cat(outs).numpy()


def augment_batch(aug: Any, x: Any) -> Any:
    """One independent draw of ``aug`` per image of the batch."""
    import torch

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
        """Metrics of ``net`` (optionally centred on ``center``) as :func:`~lookalike.encoders.metrics.retrieval_metrics` gives them."""
        from lookalike.encoders.metrics import retrieval_metrics

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
    import torch

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
    import torch

    state = {k: v.detach().cpu().float() if v.is_floating_point() else v.cpu() for k, v in state_dict.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save({"arch": arch, "state_dict": state, "meta": json.loads(json.dumps(meta)), **extra}, tmp)
    tmp.replace(out)
    return out


def train(modality: str, data_dir: Path | Sequence[Path], out: Path, epochs: int, seed: int = 0,
          **options: Any) -> dict[str, Any]:
    """Train the ``modality`` encoder with its recipe; return the checkpoint's ``meta``.

    ``options`` are the recipe's keyword arguments: :func:`lookalike.encoders.training_us.train_us` or
    :func:`lookalike.encoders.training_xr.train_xr` (an option the recipe does not take is a ``TypeError``).
    """
    if modality == "us":
        from lookalike.encoders.training_us import train_us as recipe
    elif modality == "xr":
        from lookalike.encoders.training_xr import train_xr as recipe
    else:
        raise ValueError(f"unknown modality {modality!r}")
    return recipe(data_dir, out, epochs, seed, **options)


#: ``lookalike train`` options that only the ultrasound recipe takes (attribute name -> flag).
_US_ONLY = {
    "pretrain_epochs": "--pretrain-epochs",
    "diffusion_epochs": "--diffusion-epochs",
    "head_refit_epochs": "--head-refit-epochs",
    "head_refit_copies": "--head-refit-copies",
    "head_refit_seeds": "--head-refit-seeds",
    "lesion_finder": "--lesion-finder",
    "lesion_margin": "--lesion-margin",
    "refine_steps": "--refine-steps",
}
#: Options that only the X-ray recipe takes.
_XR_ONLY = {"tta_flip": "--tta-flip"}


def main(argv: list[str] | None = None) -> int:
    """Command line: ``lookalike train --modality us|xr --data DIR [DIR ...] --out FILE --epochs N``."""
    p = argparse.ArgumentParser(prog="lookalike train", description="Train a lookalike encoder and write a checkpoint.")
    p.add_argument("--modality", choices=["us", "xr"], required=True)
    p.add_argument("--data", type=Path, nargs="+", required=True, help="folder(s) with manifest.csv, trained on together")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-class", type=int, default=None, help="images per class in a batch (us 16, xr 32)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ce-weight", type=float, default=None, help="cross-entropy term's weight (us 1.0, xr 0.5)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--field-of-view-augment", action="store_true",
                   help="augment with wide anisotropic zoom, blur and intensity curves (scanner variation)")
    p.add_argument("--scanner-augment", action="store_true",
                   help="augment with gain, depth-dependent gain, lateral gain field, speckle, blur and gamma")
    p.add_argument("--center", action="store_true",
                   help="store the training images' mean embedding; the encoder subtracts it (cosines spread out)")
    p.add_argument("--init", type=Path, default=None,
                   help="start from this checkpoint (us: its VAE and UNet, stages A and B skipped; xr: ViT and head)")
    us = p.add_argument_group("ultrasound only")
    us.add_argument("--pretrain-epochs", type=int, default=None, help="VAE epochs (default 8)")
    us.add_argument("--diffusion-epochs", type=int, default=None, help="latent UNet epochs (default 20)")
    us.add_argument("--head-refit-epochs", type=int, default=None, help="stage D epochs (default 60; 0 skips)")
    us.add_argument("--head-refit-copies", type=int, default=None, help="stage D: augmented views per training image (8)")
    us.add_argument("--head-refit-seeds", type=int, default=None, help="stage D: heads trained, best by val P@5 kept (3)")
    us.add_argument("--lesion-finder", type=Path, default=None,
                    help="lesion finder checkpoint; the encoder takes the whole image and the lesion crop")
    us.add_argument("--lesion-margin", type=float, default=None,
                    help="context around the lesion box, fraction of its size (0.5)")
    us.add_argument("--refine-steps", type=int, default=None,
                    help="DDIM steps of the latent refinement (2; with --init the checkpoint's unless given)")
    xr = p.add_argument_group("X-ray only")
    xr.add_argument("--tta-flip", action="store_true", default=None,
                    help="the encoder averages the embeddings of the image and its mirror image (test-time flips)")
    a = p.parse_args(argv)
    # recipe-specific options default to None: only those given are passed, so the recipe's defaults apply
    other = _XR_ONLY if a.modality == "us" else _US_ONLY
    given = [flag for name, flag in other.items() if getattr(a, name) is not None]
    if given:
        p.error(f"{', '.join(given)}: not an option of the {a.modality} encoder")
    own = _US_ONLY if a.modality == "us" else _XR_ONLY
    options = {name: getattr(a, name) for name in own if getattr(a, name) is not None}
    train(a.modality, a.data, a.out, a.epochs, a.seed, per_class=a.per_class, lr=a.lr, ce_weight=a.ce_weight,
          image_size=a.image_size, threads=a.threads, max_train=a.max_train,
          field_of_view_augment=a.field_of_view_augment, scanner_augment=a.scanner_augment, center=a.center,
          init=a.init, **options)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
