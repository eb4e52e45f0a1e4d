"""Train the shipped encoders from dataset folders holding ``manifest.csv`` (path,label,group,split).

Several folders train together (their ``train`` rows train, their ``val`` rows select). With a lesion finder
(``lesion_finder``, from ``lookalike train-lesions``) the ultrasound encoder takes two views of every image,
the whole image and the crop around the lesion the finder finds, made by the function serving uses
(:func:`lookalike.encoders.lesion.prepare_views`); the finder is stored in the checkpoint.

Ultrasound (``us``), four stages on a CPU budget:

A. AutoencoderKL self-supervised on train+val images (L1 reconstruction + small KL; labels unused).
B. DiffusionModelUNet trained to predict noise on the (frozen) VAE latents, timesteps in [0, 300).
C. Metric stage: VAE encoder fine-tuned with the projection head (UNet frozen, gradients pass through the
   refinement) on class-balanced batches, loss = batch-hard triplet + cross-entropy on a linear classifier
   over the embedding (triplet alone stayed at the floor in earlier probes).
D. Head refit: trunk frozen, fresh heads trained with the same loss on cached features of several augmented
   views per image (many more augmented samples than C affords); kept only if val P@5 improves.

X-ray (``xr``): ViT + head from scratch, two augmented views per image, supervised contrastive loss plus a
cross-entropy term (weight ``ce_weight``) on class-balanced batches.

Both select the epoch with the best validation P@5 (val queries vs train gallery).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lookalike.encoders.base import centre_vectors
from lookalike.encoders.preprocessing import IMAGE_SIZE, build_augment, build_preprocess, load_image, read_manifest


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


def _augment_batch(aug: Any, x: Any) -> Any:
    import torch

    return torch.stack([aug(img) for img in x])


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
) -> tuple[float, Any]:
    """Train a fresh projection head on fixed trunk features; return (best val P@5, that head in eval mode).

    ``train_views`` is (copies, n, d): the features of ``copies`` augmented views of every training image,
    computed once with the frozen trunk, so that many epochs of augmentation cost one forward pass each.
    The head is :func:`~lookalike.encoders.ultrasound.projection_head` and the loss the metric stage's
    (batch-hard triplet + cross-entropy). The epoch with the best val P@5 (``val`` queries against the
    un-augmented ``train`` gallery) is kept.
    """
    import torch
    import torch.nn.functional as F

    from lookalike.encoders.losses import batch_hard_triplet_loss
    from lookalike.encoders.metrics import retrieval_metrics
    from lookalike.encoders.ultrasound import projection_head

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
    val_t, train_t = torch.from_numpy(val), torch.from_numpy(train)
    best_val, best_state = -1.0, None
    for _ in range(epochs):
        head.train()
        for idx in balanced_batches(y, per_class, n_batches, rng):
            copy = torch.from_numpy(rng.integers(0, views.shape[0], size=len(idx)))
            e = head(views[copy, torch.from_numpy(idx)])
            loss = batch_hard_triplet_loss(F.normalize(e, dim=1), yt[idx], margin)
            loss = loss + ce_weight * F.cross_entropy(clf(e), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        head.eval()
        with torch.no_grad():
            q, g = F.normalize(head(val_t), dim=1).numpy(), F.normalize(head(train_t), dim=1).numpy()
        v = retrieval_metrics(q, y_val, g_val, g, y, g_train)["P@5"]
        if v > best_val:
            best_val = v
            best_state = {k: t.detach().clone() for k, t in head.state_dict().items()}
    head.load_state_dict(best_state)
    return best_val, head.eval()


def pretrain_us(
    arch: dict[str, Any],
    x_all: Any,
    pretrain_epochs: int,
    diffusion_epochs: int,
    lr: float,
    rng: np.random.Generator,
    device: Any,
    figures: dict[str, Any],
    log: Callable[[str], None],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Ultrasound stages A and B on images whose labels are not used; return the VAE's and UNet's ``state_dict``.

    A: :class:`AutoencoderKL`, L1 reconstruction + 1e-4 KL, horizontal flips. Then ``arch["latent_scale"]`` is
    set to 1 / std of the latents. B: :class:`DiffusionModelUNet` predicting the noise added to the scaled
    latents at timesteps in [0, 300). Last losses go into ``figures``.
    """
    import torch
    import torch.nn.functional as F

    from lookalike.encoders.ultrasound import build_scheduler, build_unet, build_vae

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


def frozen_features(net: Any, x: Any, device: Any, batch: int = 64) -> np.ndarray:
    """Fused trunk features (before the head) of preprocessed images, eval mode."""
    import torch

    net.eval()
    with torch.no_grad():
        parts = [net.features(x[i : i + batch].to(device)).float().cpu() for i in range(0, len(x), batch)]
    return torch.cat(parts).numpy()


@plain_tensors
def train(
    modality: str,
    data_dir: Path | Sequence[Path],
    out: Path,
    epochs: int,
    seed: int = 0,
    *,
    pretrain_epochs: int | None = None,
    diffusion_epochs: int | None = None,
    per_class: int | None = None,
    lr: float = 1e-3,
    margin: float = 0.2,
    temperature: float = 0.1,
    ce_weight: float | None = None,
    image_size: int | None = None,
    threads: int | None = None,
    max_train: int | None = None,
    val_gallery_max: int = 1500,
    head_refit_epochs: int | None = None,
    head_refit_copies: int = 8,
    head_refit_seeds: int = 3,
    init: Path | None = None,
    field_of_view_augment: bool = False,
    center: bool = False,
    scanner_augment: bool = False,
    lesion_finder: Path | None = None,
    lesion_margin: float = 0.5,
    command: str | None = None,
    log: Callable[[str], None] = lambda s: print(s, flush=True),
) -> dict[str, Any]:
    """Train one encoder and save a checkpoint that :func:`lookalike.encoders.load_encoder` reads.

    Parameters
    ----------
    modality : {"us", "xr"}
        Which encoder.
    data_dir : Path or sequence of Path
        Folder(s) with ``manifest.csv``; trains on the ``split == train`` rows of all of them together,
        selects on their ``split == val`` rows (groups are prefixed by set in the shipped manifests).
    out : Path
        Checkpoint path (``torch.save`` of ``{"arch", "state_dict", "meta"}``).
    epochs : int
        Epochs of the metric stage.
    seed : int
        Seed for everything.
    pretrain_epochs, diffusion_epochs : int, optional
        Ultrasound stages A and B (defaults 8 and 20).
    per_class : int, optional
        Images per class in a balanced batch (defaults: 16 for us, 32 for xr).
    threads : int, optional
        ``torch.set_num_threads`` on CPU.
    max_train : int, optional
        Use a stratified random subset of this many training images (CPU budget).
    head_refit_epochs, head_refit_copies, head_refit_seeds : int
        Ultrasound stage D (default 60 epochs, 0 skips it): with the trunk frozen, fresh heads are trained
        for ``head_refit_seeds`` seeds on cached features of ``head_refit_copies`` augmented views of every
        training image (:func:`fit_head`); the best by val P@5 replaces the stage-C head only if it beats it.
    scanner_augment : bool
        Add the scanner intensity variation (gain, depth-dependent gain, lateral gain field, speckle, blur,
        gamma: :func:`lookalike.encoders.augment.scanner_intensity_steps`).
    lesion_finder : Path, optional
        Ultrasound: a lesion finder checkpoint (``lookalike train-lesions``); the encoder then takes two views,
        the whole image and the crop around the lesion the finder finds (``lesion_margin`` of the box's size
        on each side as context), and the finder is stored in the checkpoint, so serving crops as training did.
    field_of_view_augment : bool
        Train with :func:`~lookalike.encoders.preprocessing.build_augment`'s scanner-variation augmentation
        (wide anisotropic zoom, blur, intensity curves) instead of the small affine.
    center : bool
        Store the mean L2-normalised embedding of the training images as ``arch["center"]``; the encoder
        subtracts it before the final normalisation, so that cosines spread over [-1, 1] instead of all lying
        near 1. Selection (best val P@5) is made before and does not depend on it.
    init : Path, optional
        Start from this checkpoint. Ultrasound: its VAE and UNet, stages A and B skipped (C runs for
        ``epochs``; 0 keeps the checkpoint's head and goes straight to D). X-ray: its ViT and head
        (``epochs`` 0 with ``center`` only adds the centre).

    Returns
    -------
    dict
        The checkpoint's ``meta``.
    """
    import torch
    import torch.nn.functional as F

    from lookalike.encoders.losses import batch_hard_triplet_loss, supervised_contrastive_loss
    from lookalike.encoders.metrics import retrieval_metrics

    if modality not in ("us", "xr"):
        raise ValueError(f"unknown modality {modality!r}")
    t_begin = time.time()
    device, amp = start_run(seed, threads)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    rng = np.random.default_rng(seed)

    dirs = [Path(data_dir)] if isinstance(data_dir, (str, Path)) else [Path(d) for d in data_dir]
    rows = [r for d in dirs for r in read_manifest(d)]
    classes = sorted({r["label"] for r in rows})
    train_rows = [r for r in rows if r["split"] == "train"]
    val_rows = [r for r in rows if r["split"] == "val"]
    if max_train and len(train_rows) > max_train:
        keep = rng.choice(len(train_rows), size=max_train, replace=False)
        train_rows = [train_rows[i] for i in sorted(keep)]
    size = image_size or IMAGE_SIZE[modality]
    start = None if init is None else torch.load(init, map_location="cpu", weights_only=True)
    if start is not None:  # the network's input size is the checkpoint's
        size = int(start["arch"]["image_size"])
        if image_size and image_size != size:
            raise ValueError(f"--image-size {image_size} does not match {init} ({size} px)")
    finder, finder_ckpt, input_views = None, None, ("whole",)
    if lesion_finder is not None:
        if modality != "us":
            raise ValueError("a lesion finder is for the us encoder only")
        from lookalike.encoders.lesion import finder_from_checkpoint

        finder_ckpt = torch.load(lesion_finder, map_location="cpu", weights_only=True)
        finder_ckpt = finder_ckpt.get("lesion", finder_ckpt)
        finder = finder_from_checkpoint(finder_ckpt)
        input_views = ("whole", "lesion")
    log(f"[{modality}] {len(train_rows)} train, {len(val_rows)} val images, classes {classes}, {size} px, "
        f"views {input_views}, {device}")
    x_tr = preprocess_all([r["path"] for r in train_rows], size, modality, input_views, finder, lesion_margin)
    x_va = preprocess_all([r["path"] for r in val_rows], size, modality, input_views, finder, lesion_margin)
    y_tr = np.array([classes.index(r["label"]) for r in train_rows])
    y_va = np.array([classes.index(r["label"]) for r in val_rows])
    g_tr = [r["group"] for r in train_rows]
    g_va = [r["group"] for r in val_rows]
    log(f"[{modality}] preprocessed in {time.time() - t_begin:.0f} s")
    aug = build_augment(size, field_of_view=field_of_view_augment, scanner=scanner_augment)
    aug.set_random_state(seed=seed)

    def autocast():
        return torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp)

    gal_idx = np.arange(len(x_tr))
    if len(gal_idx) > val_gallery_max:
        gal_idx = np.sort(rng.choice(len(x_tr), size=val_gallery_max, replace=False))

    def val_p5(net: Any) -> dict[str, float]:
        q = embed_tensor(net, x_va, device)
        g = embed_tensor(net, x_tr[gal_idx], device)
        return retrieval_metrics(q, y_va, g_va, g, y_tr[gal_idx], [g_tr[i] for i in gal_idx])

    figures: dict[str, Any] = {}
    if start is not None:
        figures["init"] = {"from": str(init), "model_meta_command": start["meta"].get("command")}
    if modality == "us":
        from lookalike.encoders.ultrasound import UltrasoundNet, default_arch

        arch = {**default_arch(image_size=size), "views": list(input_views), "lesion_margin": lesion_margin}
        pretrain_epochs = 8 if pretrain_epochs is None else pretrain_epochs
        diffusion_epochs = 20 if diffusion_epochs is None else diffusion_epochs
        per_class = per_class or 16
        ce_weight = 1.0 if ce_weight is None else ce_weight
        if start is None:  # labels unused in stages A and B
            vae_state, unet_state = pretrain_us(
                arch, torch.cat([x_tr, x_va]), pretrain_epochs, diffusion_epochs, lr, rng, device, figures, log
            )
            net = UltrasoundNet(arch).to(device)
            net.vae.load_state_dict(vae_state)
            net.unet.load_state_dict(unet_state)
        else:
            keep = ("features", "center", "views", "lesion_margin")
            arch = {**arch, **{k: v for k, v in start["arch"].items() if k not in keep}}
            pretrain_epochs = diffusion_epochs = 0
            log(f"[us] stages A and B skipped: VAE and UNet from {init} ({start['arch'].get('tag')})")
            net = UltrasoundNet(arch).to(device)
            own = net.state_dict()  # a head of another width (other views) starts fresh
            trunk = {k: v for k, v in start["state_dict"].items() if not k.startswith("head.") or own[k].shape == v.shape}
            missing = net.load_state_dict(trunk, strict=False).missing_keys
            missing = [k for k in missing if not k.startswith("head.")]
            if any(not k.startswith(("vae.decoder.", "vae.post_quant")) for k in missing):
                raise ValueError(f"{init} lacks trunk weights: {missing[:5]}")
        for p in net.unet.parameters():
            p.requires_grad_(False)
        for p in net.vae.decoder.parameters():
            p.requires_grad_(False)
        head_params = list(net.head.parameters())
        trunk_params = [p for n, p in net.vae.named_parameters() if p.requires_grad]
    else:
        from lookalike.encoders.xray import XrayNet, default_arch

        arch = default_arch(image_size=size)
        per_class = per_class or 32
        ce_weight = 0.5 if ce_weight is None else ce_weight
        if start is not None:
            arch = {k: v for k, v in start["arch"].items() if k != "center"}
        net = XrayNet(arch).to(device)
        if start is not None:
            net.load_state_dict(start["state_dict"])
            log(f"[xr] ViT and head from {init}")
        head_params = list(net.head.parameters())
        trunk_params = list(net.vit.parameters())

    n_classes = len(classes)
    clf = torch.nn.Linear(arch["dim"], n_classes).to(device)
    trunk_lr = lr * (0.3 if modality == "us" else 1.0)
    opt = torch.optim.AdamW(
        [
            {"params": trunk_params, "lr": trunk_lr},
            {"params": head_params + list(clf.parameters()), "lr": lr},
        ],
        weight_decay=0.05,
    )
    n_batches = max(1, len(x_tr) // (per_class * n_classes))
    sched_lr = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[trunk_lr, lr], total_steps=max(1, epochs * n_batches), pct_start=0.15
    )
    best = {"P@5": -1.0}
    best_state = None
    history = []
    if epochs == 0:
        best = {**val_p5(net), "epoch": 0}
        best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    for ep in range(epochs):
        net.train()
        if modality == "us":
            net.unet.eval()
        clf.train()
        t0 = time.time()
        tot = 0.0
        bar = tqdm(total=n_batches, desc=f"[{modality}] epoch {ep + 1}/{epochs}", leave=False, disable=None)
        for idx in balanced_batches(y_tr, per_class, n_batches, rng):
            yb = torch.from_numpy(y_tr[idx]).to(device)
            xb = x_tr[torch.from_numpy(idx)]
            with autocast():
                if modality == "us":
                    e = net(_augment_batch(aug, xb).to(device)).float()
                    en = F.normalize(e, dim=1)
                    loss = batch_hard_triplet_loss(en, yb, margin) + ce_weight * F.cross_entropy(clf(e), yb)
                else:
                    v = torch.cat([_augment_batch(aug, xb), _augment_batch(aug, xb)]).to(device)
                    y2 = torch.cat([yb, yb])
                    e = net(v).float()
                    en = F.normalize(e, dim=1)
                    loss = supervised_contrastive_loss(en, y2, temperature) + ce_weight * F.cross_entropy(clf(e), y2)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched_lr.step()
            tot += float(loss.detach())
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        bar.close()
        m = val_p5(net)
        history.append({"epoch": ep + 1, "loss": tot / n_batches, "val_P@5": m["P@5"], "val_macro-P@5": m["macro-P@5"]})
        log(
            f"[{modality}] epoch {ep + 1}/{epochs} loss {tot / n_batches:.4f} val P@5 {m['P@5']:.3f} "
            f"macro-P@5 {m['macro-P@5']:.3f} ({time.time() - t0:.0f} s)"
        )
        if m["P@5"] > best["P@5"]:
            best = {**m, "epoch": ep + 1}
            best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}

    net.load_state_dict(best_state)
    head_refit_epochs = (60 if modality == "us" else 0) if head_refit_epochs is None else head_refit_epochs
    if head_refit_epochs > 0:
        if modality != "us":
            raise ValueError("head refit (stage D) is implemented for the us encoder only")
        t0 = time.time()
        f_tr, f_va = frozen_features(net, x_tr, device), frozen_features(net, x_va, device)
        augmented = [frozen_features(net, _augment_batch(aug, x_tr), device) for _ in range(head_refit_copies)]
        views = np.stack([f_tr, *augmented])
        runs = [
            fit_head(views, y_tr, f_va, y_va, g_va, f_tr, g_tr, hidden=arch["head_hidden"], dim=arch["dim"],
                     epochs=head_refit_epochs, seed=seed + k, per_class=per_class, lr=lr, margin=margin, ce_weight=ce_weight)
            for k in range(head_refit_seeds)
        ]
        _, refit_head = max(runs, key=lambda r: r[0])
        # same gallery as stage C's selection, so the two are compared on equal terms
        old_head = {k: v.clone() for k, v in net.head.state_dict().items()}
        net.head.load_state_dict(refit_head.state_dict())
        m = val_p5(net)
        kept = m["P@5"] > best["P@5"]
        if not kept:
            net.head.load_state_dict(old_head)
        figures["head_refit"] = {
            "epochs": head_refit_epochs, "copies": head_refit_copies, "seeds": head_refit_seeds,
            "val_P@5_per_seed": [round(r[0], 4) for r in runs], "val": m, "kept": kept,
            "seconds": round(time.time() - t0, 1),
        }
        log(f"[us] D head refit: val P@5 per seed {[round(r[0], 3) for r in runs]}, best {m['P@5']:.3f} vs stage C "
            f"{best['P@5']:.3f}: {'kept' if kept else 'stage C head kept'} ({time.time() - t0:.0f} s)")
        if kept:
            best = {**m, "epoch": "D"}
    if center:
        c = embed_tensor(net, x_tr, device).mean(axis=0)
        arch["center"] = [float(v) for v in c]
        q, g = (centre_vectors(embed_tensor(net, x, device), c) for x in (x_va, x_tr[gal_idx]))
        m = retrieval_metrics(q, y_va, g_va, g, y_tr[gal_idx], [g_tr[i] for i in gal_idx])
        figures["center"] = {"val": m, "val_P@5_uncentred": best["P@5"]}
        log(f"[{modality}] centred on the training mean embedding: val P@5 {m['P@5']:.3f} (uncentred {best['P@5']:.3f})")
    figures.update({"val_best": best, "history": history, "train_seconds": round(time.time() - t_begin, 1)})
    meta = {
        "figures": figures,
        "data": {
            "dir": [str(d) for d in dirs],
            "classes": classes,
            "n_train": len(train_rows),
            "n_val": len(val_rows),
            "ssl_images": "train+val" if modality == "us" else None,
        },
        "seed": seed,
        "command": command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "hyper": {
            "epochs": epochs,
            "pretrain_epochs": pretrain_epochs,
            "diffusion_epochs": diffusion_epochs,
            "per_class": per_class,
            "lr": lr,
            "margin": margin,
            "temperature": temperature,
            "ce_weight": ce_weight,
            "max_train": max_train,
            "head_refit_epochs": head_refit_epochs,
            "head_refit_copies": head_refit_copies,
            "head_refit_seeds": head_refit_seeds,
            "field_of_view_augment": field_of_view_augment,
            "scanner_augment": scanner_augment,
            "views": list(input_views),
            "lesion_margin": lesion_margin,
            "lesion_finder": None if lesion_finder is None else str(lesion_finder),
            "center": center,
        },
        "torch": torch.__version__,
        "device": device.type,
    }
    state = {k: v.detach().cpu().float() if v.is_floating_point() else v.cpu() for k, v in net.state_dict().items()}
    if modality == "us":  # the decoder is not needed to embed; drop it to keep the file small
        state = {k: v for k, v in state.items() if not k.startswith("vae.decoder.") and not k.startswith("vae.post_quant")}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    ckpt = {"arch": arch, "state_dict": state, "meta": json.loads(json.dumps(meta))}
    if finder_ckpt is not None:
        ckpt["lesion"] = {"arch": finder_ckpt["arch"], "state_dict": finder_ckpt["state_dict"]}
    torch.save(ckpt, tmp)
    tmp.replace(out)
    log(f"[{modality}] saved {out} (best val P@5 {best['P@5']:.3f} at epoch {best['epoch']}, {figures['train_seconds']} s)")
    return meta


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m lookalike.encoders.training --modality us --data DIR --out FILE --epochs N``."""
    p = argparse.ArgumentParser(description="Train a lookalike encoder and write a checkpoint.")
    p.add_argument("--modality", choices=["us", "xr"], required=True)
    p.add_argument("--data", type=Path, nargs="+", required=True, help="folder(s) with manifest.csv, trained on together")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain-epochs", type=int, default=None, help="us: VAE epochs")
    p.add_argument("--diffusion-epochs", type=int, default=None, help="us: latent UNet epochs")
    p.add_argument("--per-class", type=int, default=None)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ce-weight", type=float, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--head-refit-epochs", type=int, default=None, help="us stage D epochs (default 60; 0 skips)")
    p.add_argument("--head-refit-copies", type=int, default=8, help="us stage D: augmented views per training image")
    p.add_argument("--head-refit-seeds", type=int, default=3, help="us stage D: heads trained, best by val P@5 kept")
    p.add_argument("--field-of-view-augment", action="store_true",
                   help="augment with wide anisotropic zoom, blur and intensity curves (scanner variation)")
    p.add_argument("--center", action="store_true",
                   help="store the training images' mean embedding; the encoder subtracts it (cosines spread out)")
    p.add_argument("--scanner-augment", action="store_true",
                   help="augment with gain, depth-dependent gain, lateral gain field, speckle, blur and gamma")
    p.add_argument("--lesion-finder", type=Path, default=None,
                   help="us: lesion finder checkpoint; the encoder takes the whole image and the lesion crop")
    p.add_argument("--lesion-margin", type=float, default=0.5, help="context around the lesion box, fraction of its size")
    p.add_argument("--init", type=Path, default=None, help="start from this checkpoint (us: its VAE and UNet, stages A and B skipped; xr: ViT and head)")
    a = p.parse_args(argv)
    train(
        a.modality,
        a.data,
        a.out,
        a.epochs,
        a.seed,
        pretrain_epochs=a.pretrain_epochs,
        diffusion_epochs=a.diffusion_epochs,
        per_class=a.per_class,
        lr=a.lr,
        ce_weight=a.ce_weight,
        image_size=a.image_size,
        threads=a.threads,
        max_train=a.max_train,
        head_refit_epochs=a.head_refit_epochs,
        head_refit_copies=a.head_refit_copies,
        head_refit_seeds=a.head_refit_seeds,
        init=a.init,
        field_of_view_augment=a.field_of_view_augment,
        center=a.center,
        scanner_augment=a.scanner_augment,
        lesion_finder=a.lesion_finder,
        lesion_margin=a.lesion_margin,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
