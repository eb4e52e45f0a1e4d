"""Train the shipped encoders from a dataset folder holding ``manifest.csv`` (path,label,group,split).

Ultrasound (``us``), three stages on a CPU budget:

A. AutoencoderKL self-supervised on train+val images (L1 reconstruction + small KL; labels unused).
B. DiffusionModelUNet trained to predict noise on the (frozen) VAE latents, timesteps in [0, 300).
C. Metric stage: VAE encoder fine-tuned with the projection head (UNet frozen, gradients pass through the
   refinement) on class-balanced batches, loss = batch-hard triplet + cross-entropy on a linear classifier
   over the embedding (triplet alone stayed at the floor in earlier probes).

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.encoders.preprocessing import IMAGE_SIZE, build_augment, build_preprocess, load_image, read_manifest


def seed_everything(seed: int) -> None:
    """Seed python, numpy, torch (and MONAI's global determinism)."""
    import torch
    from monai.utils import set_determinism

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    set_determinism(seed=seed)


def preprocess_all(paths: list[str], size: int, modality: str) -> Any:
    """Load and preprocess every image once with the serving pipeline -> (n, 1, size, size) tensor."""
    import torch

    pre = build_preprocess(size)
    return torch.stack([pre(load_image(p, modality)) for p in paths])


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


def train(
    modality: str,
    data_dir: Path,
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
    command: str | None = None,
    log: Callable[[str], None] = lambda s: print(s, flush=True),
) -> dict[str, Any]:
    """Train one encoder and save a checkpoint that :func:`lookalike.encoders.load_encoder` reads.

    Parameters
    ----------
    modality : {"us", "xr"}
        Which encoder.
    data_dir : Path
        Folder with ``manifest.csv``; trains on ``split == train``, selects on ``split == val``.
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
    seed_everything(seed)
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    rng = np.random.default_rng(seed)

    rows = read_manifest(Path(data_dir))
    classes = sorted({r["label"] for r in rows})
    train_rows = [r for r in rows if r["split"] == "train"]
    val_rows = [r for r in rows if r["split"] == "val"]
    if max_train and len(train_rows) > max_train:
        keep = rng.choice(len(train_rows), size=max_train, replace=False)
        train_rows = [train_rows[i] for i in sorted(keep)]
    size = image_size or IMAGE_SIZE[modality]
    log(f"[{modality}] {len(train_rows)} train, {len(val_rows)} val images, classes {classes}, {size} px, {device}")
    x_tr = preprocess_all([r["path"] for r in train_rows], size, modality)
    x_va = preprocess_all([r["path"] for r in val_rows], size, modality)
    y_tr = np.array([classes.index(r["label"]) for r in train_rows])
    y_va = np.array([classes.index(r["label"]) for r in val_rows])
    g_tr = [r["group"] for r in train_rows]
    g_va = [r["group"] for r in val_rows]
    log(f"[{modality}] preprocessed in {time.time() - t_begin:.0f} s")
    aug = build_augment(size)
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
    if modality == "us":
        from lookalike.encoders.ultrasound import UltrasoundNet, build_scheduler, build_unet, build_vae, default_arch

        arch = default_arch(image_size=size)
        pretrain_epochs = 8 if pretrain_epochs is None else pretrain_epochs
        diffusion_epochs = 20 if diffusion_epochs is None else diffusion_epochs
        per_class = per_class or 16
        ce_weight = 1.0 if ce_weight is None else ce_weight
        x_all = torch.cat([x_tr, x_va])  # labels unused in stages A and B

        # Stage A: VAE
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
                with autocast():
                    rec, mu, sigma = vae(xb)
                    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-8) - 1).mean()
                    loss = F.l1_loss(rec.float(), xb) + 1e-4 * kl
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                tot += float(loss.detach()) * len(xb)
            log(f"[us] A vae epoch {ep + 1}/{pretrain_epochs} loss {tot / len(x_all):.4f} ({time.time() - t0:.0f} s)")
        vae.eval()
        with torch.no_grad():
            lat = torch.cat([vae.encode(x_all[i : i + 128].to(device))[0] for i in range(0, len(x_all), 128)])
        arch["latent_scale"] = float(1.0 / lat.std().clamp_min(1e-6))
        lat = lat * arch["latent_scale"]
        figures["vae_l1_last"] = tot / len(x_all)

        # Stage B: latent diffusion UNet
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
                with autocast():
                    pred = unet(sched.add_noise(zb, noise, t), timesteps=t)
                    loss = F.mse_loss(pred.float(), noise)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                tot += float(loss.detach()) * len(zb)
            log(f"[us] B diffusion epoch {ep + 1}/{diffusion_epochs} loss {tot / len(lat):.4f} ({time.time() - t0:.0f} s)")
        figures["diffusion_mse_last"] = tot / len(lat)

        net = UltrasoundNet(arch).to(device)
        net.vae.load_state_dict(vae.state_dict())
        net.unet.load_state_dict(unet.state_dict())
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
        net = XrayNet(arch).to(device)
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
    for ep in range(epochs):
        net.train()
        if modality == "us":
            net.unet.eval()
        clf.train()
        t0 = time.time()
        tot = 0.0
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
    figures.update({"val_best": best, "history": history, "train_seconds": round(time.time() - t_begin, 1)})
    meta = {
        "figures": figures,
        "data": {
            "dir": str(data_dir),
            "classes": classes,
            "n_train": len(train_rows),
            "n_val": len(val_rows),
            "ssl_images": "train+val" if modality == "us" else None,
        },
        "seed": seed,
        "command": command or " ".join([Path(sys.executable).name, "-m", "lookalike.encoders.training", *sys.argv[1:]]),
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
    torch.save({"arch": arch, "state_dict": state, "meta": json.loads(json.dumps(meta))}, tmp)
    tmp.replace(out)
    log(f"[{modality}] saved {out} (best val P@5 {best['P@5']:.3f} at epoch {best['epoch']}, {figures['train_seconds']} s)")
    return meta


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m lookalike.encoders.training --modality us --data DIR --out FILE --epochs N``."""
    p = argparse.ArgumentParser(description="Train a lookalike encoder and write a checkpoint.")
    p.add_argument("--modality", choices=["us", "xr"], required=True)
    p.add_argument("--data", type=Path, required=True, help="folder with manifest.csv")
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
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
