"""X-ray recipe: a MONAI ViT + head from scratch, supervised contrastive loss on two augmented views.

Each class-balanced batch is augmented twice (:func:`lookalike.lab.training.build_augment`); the loss
is the supervised contrastive loss over both views plus ``ce_weight`` x cross-entropy of a linear classifier on
the embedding (dropped after training). The epoch with the best val P@5 is kept (:func:`~lookalike.encoders.
training.metric_stage`). ``tta_flip`` stores test-time flip averaging in the checkpoint
(:class:`lookalike.encoders.xray.XrayNet`); the centre and every val figure after training are computed with it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lookalike.encoders.xray import XrayNet, default_arch
from lookalike.lab.losses import supervised_contrastive_loss
from lookalike.lab.training import (
    IMAGE_SIZE,
    build_augment,
    Log,
    Validation,
    add_centre,
    augment_batch,
    load_labelled,
    metric_stage,
    plain_tensors,
    print_log,
    run_command,
    save_checkpoint,
    start_run,
    starting_point,
)


@plain_tensors
def train_xr(
    data_dir: Path | Sequence[Path],
    out: Path,
    epochs: int,
    seed: int = 0,
    *,
    per_class: int | None = None,
    lr: float = 1e-3,
    temperature: float = 0.1,
    ce_weight: float | None = None,
    image_size: int | None = None,
    threads: int | None = None,
    max_train: int | None = None,
    val_gallery_max: int = 1500,
    init: Path | None = None,
    field_of_view_augment: bool = False,
    scanner_augment: bool = False,
    center: bool = False,
    tta_flip: bool = False,
    command: str | None = None,
    log: Log = print_log,
) -> dict[str, Any]:
    """Train the X-ray encoder and save a checkpoint that :func:`lookalike.encoders.load_encoder` reads.

    Parameters
    ----------
    data_dir : Path or sequence of Path
        Folder(s) with ``manifest.csv``: their ``train`` rows train, their ``val`` rows select.
    out : Path
        Checkpoint path.
    epochs : int
        Training epochs; 0 with ``init`` keeps the checkpoint's weights (to add the centre or flip averaging).
    per_class : int, optional
        Images per class in a batch (default 32).
    ce_weight : float, optional
        Weight of the cross-entropy term (default 0.5).
    image_size : int, optional
        Input side (default :data:`~lookalike.lab.training.IMAGE_SIZE`; ``init``'s when given).
    max_train : int, optional
        A random subset of this many training images (CPU budget, tests).
    init : Path, optional
        Start from this checkpoint's ViT and head (its centre is recomputed when ``center`` is set).
    center : bool
        Store the training images' mean unit embedding (:func:`~lookalike.lab.training.add_centre`).
    tta_flip : bool
        The encoder averages the embeddings of an image and its left-right mirror image at inference.

    Returns
    -------
    dict
        The checkpoint's ``meta``.
    """
    t_begin = time.time()
    device, amp = start_run(seed, threads)
    rng = np.random.default_rng(seed)
    start, size = starting_point(init, image_size, IMAGE_SIZE["xr"])
    data = load_labelled(data_dir, size, "xr", rng, max_train=max_train, device=device, log=log)
    aug = build_augment(size, field_of_view=field_of_view_augment, scanner=scanner_augment)
    aug.set_random_state(seed=seed)
    validation = Validation(data, device, rng, val_gallery_max)
    per_class = per_class or 32
    ce_weight = 0.5 if ce_weight is None else ce_weight

    arch = default_arch(image_size=size)
    figures: dict[str, Any] = {}
    if start is not None:
        arch = {k: v for k, v in start["arch"].items() if k != "center"}
        figures["init"] = {"from": str(init), "model_meta_command": start["meta"].get("command")}
    arch["tta_flip"] = tta_flip
    net = XrayNet(arch).to(device)
    if start is not None:
        net.load_state_dict(start["state_dict"])
        log(f"[xr] ViT and head from {init}")
    clf = torch.nn.Linear(arch["dim"], len(data.classes)).to(device)

    def batch_loss(x: Any, y: Any) -> Any:
        views = torch.cat([augment_batch(aug, x), augment_batch(aug, x)]).to(device)
        y2 = torch.cat([y, y])
        e = net(views).float()
        return supervised_contrastive_loss(F.normalize(e, dim=1), y2, temperature) + ce_weight * F.cross_entropy(clf(e), y2)

    best, history = metric_stage(
        net, clf, [(list(net.vit.parameters()), lr), (list(net.head.parameters()), lr)], batch_loss, data, validation,
        epochs=epochs, per_class=per_class, rng=rng, device=device, amp=amp, tag="xr", log=log,
    )
    if center:
        figures["center"] = add_centre(net, arch, data, validation, best, device, "xr", log)
    figures.update({"val_best": best, "history": history, "train_seconds": round(time.time() - t_begin, 1)})
    meta = {
        "figures": figures,
        "data": {**data.describe(), "ssl_images": None},
        "seed": seed,
        "command": run_command(command),
        "hyper": {
            "epochs": epochs, "per_class": per_class, "lr": lr, "temperature": temperature, "ce_weight": ce_weight,
            "max_train": max_train, "field_of_view_augment": field_of_view_augment, "scanner_augment": scanner_augment,
            "center": center, "tta_flip": tta_flip,
        },
        "torch": torch.__version__,
        "device": device.type,
    }
    save_checkpoint(out, arch, net.state_dict(), meta)
    log(f"[xr] saved {out} (best val P@5 {best['P@5']:.3f} at epoch {best['epoch']}, {figures['train_seconds']} s)")
    return meta
