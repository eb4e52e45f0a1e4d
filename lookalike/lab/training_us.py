"""Ultrasound recipe: four stages on a CPU budget.

A. AutoencoderKL self-supervised on train+val images (L1 reconstruction + small KL; labels unused).
B. DiffusionModelUNet trained to predict noise on the (frozen) VAE latents, timesteps in [0, 300).
C. Metric stage: VAE encoder fine-tuned with the projection head (UNet frozen, gradients pass through the
   refinement) on class-balanced batches, loss = batch-hard triplet + cross-entropy on a linear classifier
   over the embedding (triplet alone stayed at the floor in earlier probes).
D. Head refit: trunk frozen, fresh heads trained with the same loss on cached features of several augmented
   views per image (many more augmented samples than C affords); kept only if val P@5 improves.

With a lesion finder (``lesion_finder``, from ``lookalike train-lesions``) the encoder takes two views of every
image, the whole image and the crop around the lesion the finder finds, made by the function serving uses
(:func:`lookalike.encoders.lesion.prepare_views`); the finder is stored in the checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import ContrastiveLoss

from lookalike.encoders.lesion import finder_from_checkpoint
from lookalike.encoders.ultrasound import (UltrasoundNet, build_scheduler, build_unet, build_vae, default_arch,
                                           projection_head)
from lookalike.lab.losses import batch_hard_triplet_loss
from lookalike.lab.metrics import retrieval_metrics
from lookalike.lab.training import (
    IMAGE_SIZE,
    build_augment,
    Log,
    TrainingData,
    Validation,
    add_centre,
    augment_batch,
    balanced_batches,
    load_labelled,
    metric_stage,
    plain_tensors,
    print_log,
    run_command,
    save_checkpoint,
    start_run,
    starting_point,
)


def pretrain(
    arch: dict[str, Any],
    x_all: Any,
    pretrain_epochs: int,
    diffusion_epochs: int,
    lr: float,
    rng: np.random.Generator,
    device: Any,
    figures: dict[str, Any],
    log: Log,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Stages A and B on images whose labels are not used; return the VAE's and UNet's ``state_dict``.

    A: :class:`AutoencoderKL`, L1 reconstruction + 1e-4 KL, horizontal flips. Then ``arch["latent_scale"]`` is
    set to 1 / std of the latents. B: :class:`DiffusionModelUNet` predicting the noise added to the scaled
    latents at timesteps in [0, 300). Last losses go into ``figures``.
    """
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def step(opt: Any, loss: Any) -> None:
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    x_all = x_all.reshape(-1, 1, *x_all.shape[-2:])  # every view is an image to the VAE
    vae = build_vae(arch).to(device)
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    for ep in range(pretrain_epochs):
        vae.train()
        perm = torch.from_numpy(rng.permutation(len(x_all)))
        tot, t0 = 0.0, time.time()
        for i in range(0, len(perm), 32):
            xb = x_all[perm[i : i + 32]].to(device)
            flip = torch.rand(len(xb), device=device) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
                rec, mu, sigma = vae(xb)
                kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-8) - 1).mean()
                loss = F.l1_loss(rec.float(), xb) + 1e-4 * kl
            step(opt, loss)
            tot += float(loss.detach()) * len(xb)
        log(f"[us] A vae epoch {ep + 1}/{pretrain_epochs} loss {tot / len(x_all):.4f} ({time.time() - t0:.0f} s)")
        figures["vae_l1_last"] = tot / len(x_all)
    vae.eval()
    with torch.no_grad():
        lat = torch.cat([vae.encode(x_all[i : i + 128].to(device))[0] for i in range(0, len(x_all), 128)])
    arch["latent_scale"] = float(1.0 / lat.std().clamp_min(1e-6))
    lat = lat * arch["latent_scale"]

    unet = build_unet(arch).to(device)
    sched = build_scheduler(arch)
    opt = torch.optim.Adam(unet.parameters(), lr=lr)
    for ep in range(diffusion_epochs):
        unet.train()
        perm = torch.from_numpy(rng.permutation(len(lat)))
        tot, t0 = 0.0, time.time()
        for i in range(0, len(perm), 64):
            zb = lat[perm[i : i + 64]]
            noise = torch.randn_like(zb)
            t = torch.randint(0, 300, (len(zb),), device=device)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
                pred = unet(sched.add_noise(zb, noise, t), timesteps=t)
                loss = F.mse_loss(pred.float(), noise)
            step(opt, loss)
            tot += float(loss.detach()) * len(zb)
        log(f"[us] B diffusion epoch {ep + 1}/{diffusion_epochs} loss {tot / len(lat):.4f} ({time.time() - t0:.0f} s)")
        figures["diffusion_mse_last"] = tot / len(lat)
    return vae.state_dict(), unet.state_dict()


def trunk_from(
    arch: dict[str, Any], start: dict[str, Any], device: Any, decided: Sequence[str] = ()
) -> tuple[dict[str, Any], Any]:
    """The network with ``start``'s VAE and UNet (stages A and B skipped); a head of another width starts fresh.

    The checkpoint's arch is kept except what this run decides (feature blocks, centre, views, margin, and
    the keys named in ``decided``).
    """
    keep = ("features", "center", "views", "lesion_margin", *decided)
    arch = {**arch, **{k: v for k, v in start["arch"].items() if k not in keep}}
    net = UltrasoundNet(arch).to(device)
    own = net.state_dict()
    trunk = {k: v for k, v in start["state_dict"].items() if not k.startswith("head.") or own[k].shape == v.shape}
    missing = [k for k in net.load_state_dict(trunk, strict=False).missing_keys if not k.startswith("head.")]
    if any(not k.startswith(("vae.decoder.", "vae.post_quant")) for k in missing):
        raise ValueError(f"the checkpoint lacks trunk weights: {missing[:5]}")
    return arch, net


def frozen_features(net: Any, x: Any, device: Any, batch: int = 64) -> np.ndarray:
    """Fused trunk features (before the head) of preprocessed images, eval mode."""
    net.eval()
    with torch.no_grad():
        parts = [net.features(x[i : i + batch].to(device)).float().cpu() for i in range(0, len(x), batch)]
    return torch.cat(parts).numpy()


def fit_head(
    train_views: np.ndarray,
    y: np.ndarray,
    val: np.ndarray,
    y_val: np.ndarray,
    g_val: list[str],
    train: np.ndarray,
    g_train: list[str],
    *,
    hidden: int,
    dim: int,
    epochs: int,
    seed: int,
    per_class: int = 16,
    lr: float = 1e-3,
    margin: float = 0.2,
    ce_weight: float = 1.0,
    gallery: tuple[np.ndarray, np.ndarray, list[str]] | None = None,
    keep_best: bool = True,
    instance_weight: float = 0.0,
    instance_temperature: float = 0.1,
) -> tuple[float, Any]:
    """Train a fresh projection head on fixed trunk features; return (best val P@5, that head in eval mode).

    ``train_views`` is (copies, n, d): the features of ``copies`` augmented views of every training image,
    computed once with the frozen trunk, so that many epochs of augmentation cost one forward pass each.
    The head is :func:`~lookalike.encoders.ultrasound.projection_head` and the loss the metric stage's
    (batch-hard triplet + cross-entropy). The epoch with the best val P@5 (``val`` queries against the
    un-augmented ``train`` gallery) is kept. ``gallery`` (features, labels, groups) replaces that gallery, e.g.
    another hospital's images when val is that hospital's; ``keep_best=False`` keeps the last epoch instead
    (val then chooses nothing) and returns its val P@5.

    ``instance_weight`` > 0 adds MONAI's ``ContrastiveLoss`` (NT-Xent at ``instance_temperature``) between the
    head's output on each image's first copy and on another of its copies, the other images of the step as
    negatives: class losses alone pull a class together until an image's own near copy no longer outranks its
    classmates. It needs at least two copies.
    """
    if instance_weight > 0 and train_views.shape[0] < 2:
        raise ValueError("the instance term needs each image's copies: train_views has one")
    instance = ContrastiveLoss(temperature=instance_temperature) if instance_weight > 0 else None
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n_classes = int(y.max()) + 1
    head = projection_head(train_views.shape[-1], hidden, dim)
    clf = torch.nn.Linear(dim, n_classes)
    opt = torch.optim.AdamW(list(head.parameters()) + list(clf.parameters()), lr=lr, weight_decay=0.05)
    n_batches = max(1, len(y) // (per_class * n_classes))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * n_batches, pct_start=0.15)
    views = torch.from_numpy(train_views)
    yt = torch.from_numpy(y)
    gal, y_gal, g_gal = gallery if gallery is not None else (train, y, g_train)
    val_t, gal_t = torch.from_numpy(val), torch.from_numpy(gal)
    best_val, best_state = -1.0, None
    for _ in range(epochs):
        head.train()
        for idx in balanced_batches(y, per_class, n_batches, rng):
            copy = torch.from_numpy(rng.integers(0, views.shape[0], size=len(idx)))
            e = head(views[copy, torch.from_numpy(idx)])
            loss = batch_hard_triplet_loss(F.normalize(e, dim=1), yt[idx], margin)
            loss = loss + ce_weight * F.cross_entropy(clf(e), yt[idx])
            if instance is not None:
                other = torch.from_numpy(rng.integers(1, views.shape[0], size=len(idx)))
                rows = torch.from_numpy(idx)
                loss = loss + instance_weight * instance(head(views[0, rows]), head(views[other, rows]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        head.eval()
        with torch.no_grad():
            q, g = F.normalize(head(val_t), dim=1).numpy(), F.normalize(head(gal_t), dim=1).numpy()
        v = retrieval_metrics(q, y_val, g_val, g, y_gal, g_gal)["P@5"]
        if v > best_val or not keep_best:
            best_val = v
            best_state = {k: t.detach().clone() for k, t in head.state_dict().items()}
    head.load_state_dict(best_state)
    return best_val, head.eval()


def refit_head(
    net: Any, arch: dict[str, Any], data: TrainingData, validation: Validation, aug: Any, best: dict[str, Any],
    *, epochs: int, copies: int, seeds: int, seed: int, per_class: int, lr: float, margin: float, ce_weight: float,
    device: Any, log: Log,
) -> dict[str, Any]:
    """Stage D: fresh heads on cached trunk features (:func:`fit_head`), one per seed; the best replaces the
    stage-C head only if it beats it on the same val gallery. Returns the stage's figures."""
    t0 = time.time()
    tr, va = data.train, data.val
    f_tr, f_va = frozen_features(net, tr.x, device), frozen_features(net, va.x, device)
    augmented = [frozen_features(net, augment_batch(aug, tr.x), device) for _ in range(copies)]
    views = np.stack([f_tr, *augmented])
    runs = [
        fit_head(views, tr.y, f_va, va.y, va.groups, f_tr, tr.groups, hidden=arch["head_hidden"], dim=arch["dim"],
                 epochs=epochs, seed=seed + k, per_class=per_class, lr=lr, margin=margin, ce_weight=ce_weight)
        for k in range(seeds)
    ]
    old_head = {k: v.clone() for k, v in net.head.state_dict().items()}
    net.head.load_state_dict(max(runs, key=lambda r: r[0])[1].state_dict())
    m = validation.score(net)
    kept = m["P@5"] > best["P@5"]
    if not kept:
        net.head.load_state_dict(old_head)
    log(f"[us] D head refit: val P@5 per seed {[round(r[0], 3) for r in runs]}, best {m['P@5']:.3f} vs stage C "
        f"{best['P@5']:.3f}: {'kept' if kept else 'stage C head kept'} ({time.time() - t0:.0f} s)")
    return {"epochs": epochs, "copies": copies, "seeds": seeds, "val_P@5_per_seed": [round(r[0], 4) for r in runs],
            "val": m, "kept": kept, "seconds": round(time.time() - t0, 1)}


@plain_tensors
def train_us(
    data_dir: Path | Sequence[Path],
    out: Path,
    epochs: int,
    seed: int = 0,
    *,
    pretrain_epochs: int = 8,
    diffusion_epochs: int = 20,
    per_class: int | None = None,
    lr: float = 1e-3,
    margin: float = 0.2,
    ce_weight: float | None = None,
    image_size: int | None = None,
    threads: int | None = None,
    max_train: int | None = None,
    val_gallery_max: int = 1500,
    head_refit_epochs: int = 60,
    head_refit_copies: int = 8,
    head_refit_seeds: int = 3,
    init: Path | None = None,
    field_of_view_augment: bool = False,
    scanner_augment: bool = False,
    center: bool = False,
    lesion_finder: Path | None = None,
    lesion_margin: float = 0.5,
    refine_steps: int | None = None,
    command: str | None = None,
    log: Log = print_log,
) -> dict[str, Any]:
    """Train the ultrasound encoder (stages A-D) and save a checkpoint :func:`lookalike.encoders.load_encoder` reads.

    Parameters
    ----------
    data_dir : Path or sequence of Path
        Folder(s) with ``manifest.csv``; trains on the ``train`` rows of all of them together, selects on
        their ``val`` rows (groups are prefixed by set in the shipped manifests).
    out : Path
        Checkpoint path (the VAE decoder, not needed to embed, is left out).
    epochs : int
        Epochs of the metric stage C.
    pretrain_epochs, diffusion_epochs : int
        Stages A and B.
    per_class : int, optional
        Images per class in a balanced batch (default 16).
    ce_weight : float, optional
        Weight of the cross-entropy term (default 1.0).
    max_train : int, optional
        A random subset of this many training images (CPU budget, tests).
    head_refit_epochs, head_refit_copies, head_refit_seeds : int
        Stage D (0 epochs skips it): :func:`refit_head`.
    init : Path, optional
        Start from this checkpoint's VAE and UNet, stages A and B skipped (C runs for ``epochs``; 0 keeps
        the checkpoint's head and goes straight to D).
    field_of_view_augment, scanner_augment : bool
        :func:`~lookalike.lab.training.build_augment`'s scanner-variation augmentations.
    center : bool
        Store the training images' mean unit embedding (:func:`~lookalike.lab.training.add_centre`).
    lesion_finder : Path, optional
        A lesion finder checkpoint: the encoder then takes two views, the whole image and the crop around the
        lesion the finder finds (``lesion_margin`` of the box's size on each side as context), and the finder
        is stored in the checkpoint, so that serving crops as training did.
    refine_steps : int, optional
        DDIM steps from ``t_start`` to 0 in the refinement (default 2, or the ``init`` checkpoint's). The UNet
        is trained for every timestep, so the step count can change without retraining it.

    Returns
    -------
    dict
        The checkpoint's ``meta``.
    """
    t_begin = time.time()
    device, amp = start_run(seed, threads)
    rng = np.random.default_rng(seed)
    start, size = starting_point(init, image_size, IMAGE_SIZE["us"])
    finder, finder_ckpt, views = None, None, ("whole",)
    if lesion_finder is not None:
        finder_ckpt = torch.load(lesion_finder, map_location="cpu", weights_only=True)
        finder_ckpt = finder_ckpt.get("lesion", finder_ckpt)
        finder = finder_from_checkpoint(finder_ckpt)
        views = ("whole", "lesion")
    data = load_labelled(data_dir, size, "us", rng, max_train=max_train, views=views, finder=finder,
                         margin=lesion_margin, device=device, log=log)
    aug = build_augment(size, field_of_view=field_of_view_augment, scanner=scanner_augment)
    aug.set_random_state(seed=seed)
    validation = Validation(data, device, rng, val_gallery_max)
    per_class = per_class or 16
    ce_weight = 1.0 if ce_weight is None else ce_weight

    arch = {**default_arch(image_size=size), "views": list(views), "lesion_margin": lesion_margin}
    if refine_steps is not None:
        arch["refine_steps"] = refine_steps
    figures: dict[str, Any] = {}
    if start is None:  # labels unused in stages A and B
        vae_state, unet_state = pretrain(arch, torch.cat([data.train.x, data.val.x]), pretrain_epochs,
                                         diffusion_epochs, lr, rng, device, figures, log)
        net = UltrasoundNet(arch).to(device)
        net.vae.load_state_dict(vae_state)
        net.unet.load_state_dict(unet_state)
    else:
        figures["init"] = {"from": str(init), "model_meta_command": start["meta"].get("command")}
        pretrain_epochs = diffusion_epochs = 0
        arch, net = trunk_from(arch, start, device, decided=() if refine_steps is None else ("refine_steps",))
        log(f"[us] stages A and B skipped: VAE and UNet from {init} ({start['arch'].get('tag')})")
    for p in [*net.unet.parameters(), *net.vae.decoder.parameters()]:
        p.requires_grad_(False)
    clf = torch.nn.Linear(arch["dim"], len(data.classes)).to(device)

    def batch_loss(x: Any, y: Any) -> Any:
        e = net(augment_batch(aug, x).to(device)).float()
        return batch_hard_triplet_loss(F.normalize(e, dim=1), y, margin) + ce_weight * F.cross_entropy(clf(e), y)

    trunk = [p for p in net.vae.parameters() if p.requires_grad]
    best, history = metric_stage(
        net, clf, [(trunk, 0.3 * lr), (list(net.head.parameters()), lr)], batch_loss, data, validation,
        epochs=epochs, per_class=per_class, rng=rng, device=device, amp=amp, frozen=[net.unet], tag="us", log=log,
    )
    if head_refit_epochs > 0:
        figures["head_refit"] = refit_head(
            net, arch, data, validation, aug, best, epochs=head_refit_epochs, copies=head_refit_copies,
            seeds=head_refit_seeds, seed=seed, per_class=per_class, lr=lr, margin=margin, ce_weight=ce_weight,
            device=device, log=log,
        )
        if figures["head_refit"]["kept"]:
            best = {**figures["head_refit"]["val"], "epoch": "D"}
    if center:
        figures["center"] = add_centre(net, arch, data, validation, best, device, "us", log)
    figures.update({"val_best": best, "history": history, "train_seconds": round(time.time() - t_begin, 1)})
    meta = {
        "figures": figures,
        "data": {**data.describe(), "ssl_images": "train+val"},
        "seed": seed,
        "command": run_command(command),
        "hyper": {
            "epochs": epochs, "pretrain_epochs": pretrain_epochs, "diffusion_epochs": diffusion_epochs,
            "per_class": per_class, "lr": lr, "margin": margin, "ce_weight": ce_weight, "max_train": max_train,
            "head_refit_epochs": head_refit_epochs, "head_refit_copies": head_refit_copies,
            "head_refit_seeds": head_refit_seeds, "field_of_view_augment": field_of_view_augment,
            "scanner_augment": scanner_augment, "views": list(views), "lesion_margin": lesion_margin,
            "lesion_finder": None if lesion_finder is None else str(lesion_finder), "center": center,
            "refine_steps": arch["refine_steps"],
        },
        "torch": torch.__version__,
        "device": device.type,
    }
    # the decoder is not needed to embed; leaving it out keeps the file small
    state = {k: v for k, v in net.state_dict().items() if not k.startswith(("vae.decoder.", "vae.post_quant"))}
    extra = {} if finder_ckpt is None else {"lesion": {"arch": finder_ckpt["arch"], "state_dict": finder_ckpt["state_dict"]}}
    save_checkpoint(out, arch, state, meta, **extra)
    log(f"[us] saved {out} (best val P@5 {best['P@5']:.3f} at epoch {best['epoch']}, {figures['train_seconds']} s)")
    return meta
