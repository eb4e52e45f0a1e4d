"""Which parts of the ``us`` encoder earn their cost? Lesion crop vs whole image, refinement on vs off.

The shipped trunk (VAE encoder + latent UNet, shared by both views) and its lesion finder are frozen. The
fused features (see ``lookalike/encoders/ultrasound.py``) are, per view (whole image, lesion crop), 320
values in blocks:

- VAE: mean- and max-pooled encoder map ``h`` (128) + 4x4-pooled latent ``z`` (64) — no refinement needed;
- refinement: UNet middle-block features ``m`` (64) + 4x4-pooled refined latent ``z_r`` (64).

For each subset (one view or both; all blocks, or the VAE or refinement blocks only) a fresh projection head
of the shipped shape is trained with the shipped recipe (``training_us.fit_head``: batch-hard triplet +
cross-entropy, class-balanced batches, cached augmented copies with the training augmentation), selected on
the val rows of busi + bus_bra, then scored under ``shared/eval/PROTOCOL.md``: busi and bus_bra test vs their
train+val, breast_lesions_usg leave-one-out. Several seeds; mean and spread printed, and each subset's
z-scored features with no head.

Caveat: the trunk was trained end to end through the fused two-view head, so this measures what each part
adds on top of that trunk, not models trained without it from the start.

    .venv/bin/python bench/us_ablation.py [--copies 4] [--epochs 40] [--seeds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
ARCHIVES = ("busi", "bus_bra")
CROSS = "breast_lesions_usg"

#: Column ranges of one view's fused features (order of ``UltrasoundNet.view_features``).
BLOCKS = {"h": (0, 128), "z": (128, 192), "m": (192, 256), "zr": (256, 320)}
WIDTH = 320


def subsets(views: tuple[str, ...]) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """Named (views, blocks) subsets of a checkpoint with these views."""
    every = ("h", "z", "m", "zr")
    out = {f"{v} only, all blocks": ((v,), every) for v in views}
    if len(views) > 1:
        out["both views, all blocks (shipped layout)"] = (views, every)
        out["both views, VAE blocks (no refinement)"] = (views, ("h", "z"))
        out["both views, refinement blocks"] = (views, ("m", "zr"))
    else:
        out[f"{views[0]}, VAE blocks (no refinement)"] = (views, ("h", "z"))
    return out


def columns(all_views: tuple[str, ...], views: tuple[str, ...], blocks: tuple[str, ...]) -> np.ndarray:
    return np.concatenate([
        np.arange(*BLOCKS[b]) + WIDTH * all_views.index(v) for v in views for b in blocks
    ])


def score(emb: dict[str, np.ndarray], sets: dict[str, Any]) -> dict[str, float]:
    """Protocol figures: each archive's test vs its train+val, cross-domain leave-one-out, val vs train."""
    from lookalike.lab.metrics import retrieval_metrics

    out = {}
    v = retrieval_metrics(emb["val"], *sets["val"], emb["train"], *sets["train"])
    out["val P@5"] = v["P@5"]
    for name in ARCHIVES:
        q, g = sets[f"{name}:test"], sets[f"{name}:trval"]
        gal = emb["all"][g[2]]
        m = retrieval_metrics(emb["all"][q[2]], q[0], q[1], gal, g[0], g[1])
        out[f"{name} P@5"] = m["P@5"]
        out[f"{name} macro"] = m["macro-P@5"]
    c = retrieval_metrics(emb["cross"], *sets["cross"], emb["cross"], *sets["cross"], exclude_self=True)
    out["cross P@5"] = c["P@5"]
    return out


def train_head(
    feats: dict[str, np.ndarray],
    aug_train: np.ndarray,
    y: dict[str, np.ndarray],
    sets: dict[str, Any],
    epochs: int,
    seed: int,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Fresh head on fixed features with training's stage D (:func:`lookalike.lab.training_us.fit_head`).

    Returns the protocol figures of the head with the best val P@5 and its ``state_dict``.
    """
    import torch
    import torch.nn.functional as F

    from lookalike.lab.training_us import fit_head

    _, head = fit_head(aug_train, y["train"], feats["val"], y["val"], sets["val"][1], feats["train"], sets["train"][1],
                       hidden=256, dim=128, epochs=epochs, seed=seed)
    with torch.no_grad():
        emb = {k: F.normalize(head(torch.from_numpy(v)), dim=1).numpy() for k, v in feats.items()}
    return score(emb, sets), head.state_dict()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Ablation of the us encoder: lesion crop vs whole image, refinement on vs off.")
    p.add_argument("--model", type=Path, default=None, help="us checkpoint (default: the shipped one)")
    p.add_argument("--copies", type=int, default=4, help="augmented copies of each training image")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save-vae-head", type=Path, default=None,
                   help="write a us checkpoint: the trunk, VAE blocks only (no refinement), seed-0 head")
    a = p.parse_args(argv)

    import torch

    from lookalike.encoders import load_encoder
    from lookalike.encoders.base import WEIGHTS_DIR
    from lookalike.lab.evaluate import CROSS_DOMAIN_LABELS
    from lookalike.lab.images import read_manifest
    from lookalike.lab.training import build_augment, plain_tensors, preprocess_all
    from lookalike.lab.training_us import frozen_features

    torch.set_num_threads(a.threads)
    t0 = time.time()
    model = a.model or WEIGHTS_DIR / "us.pt"
    enc = load_encoder("us", model)
    net, size, views = enc.net, enc.image_size, enc.views
    ckpt = torch.load(model, map_location="cpu", weights_only=True)
    hyper = ckpt["meta"].get("hyper", {})
    rows = [{**r, "set": name} for name in ARCHIVES for r in read_manifest(DATA / name)]
    cross = [r for r in read_manifest(DATA / CROSS) if r["label"] in CROSS_DOMAIN_LABELS]
    classes = sorted({r["label"] for r in rows})
    lab = lambda rs: ([r["label"] for r in rs], [r["group"] for r in rs])  # noqa: E731
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    sets: dict[str, Any] = {"train": lab(train), "val": lab(val), "cross": lab(cross)}
    for name in ARCHIVES:
        test = [i for i, r in enumerate(rows) if r["set"] == name and r["split"] == "test"]
        trval = [i for i, r in enumerate(rows) if r["set"] == name and r["split"] != "test"]
        sets[f"{name}:test"] = (*lab([rows[i] for i in test]), test)
        sets[f"{name}:trval"] = (*lab([rows[i] for i in trval]), trval)

    def prep(rs: list[dict[str, str]]) -> Any:
        return preprocess_all([r["path"] for r in rs], size, "us", views, enc.finder, enc.lesion_margin)

    x = {"all": prep(rows), "cross": prep(cross)}
    device = torch.device("cpu")
    feats = {k: frozen_features(net, v, device) for k, v in x.items()}
    at = {s: [i for i, r in enumerate(rows) if r["split"] == s] for s in ("train", "val")}
    x["train"] = x["all"][at["train"]]
    feats.update({s: feats["all"][idx] for s, idx in at.items()})
    aug = build_augment(size, field_of_view=bool(hyper.get("field_of_view_augment")),
                        scanner=bool(hyper.get("scanner_augment")))  # as the weights were trained
    aug.set_random_state(seed=0)
    augmented = plain_tensors(lambda: [
        frozen_features(net, torch.stack([aug(im) for im in x["train"]]), device) for _ in range(a.copies)
    ])()
    aug_train = np.stack([feats["train"], *augmented])
    y = {s: np.array([classes.index(label) for label in sets[s][0]]) for s in ("train", "val")}
    print(f"features of {len(rows) + len(cross)} images ({views}) + {a.copies} augmented copies of {len(train)} "
          f"in {time.time() - t0:.0f} s ({a.threads} thread(s))")

    # cost of what each subset needs, batch 32, per image (both views: 64 trunk passes)
    xb = x["cross"][:32]
    flat = xb.reshape(-1, 1, size, size)
    with torch.no_grad():
        _, z = net.encode(flat)
        reps = 3
        t1 = time.perf_counter()
        for _ in range(reps):
            net.encode(flat)
        t_vae = (time.perf_counter() - t1) / reps / 32 / len(views)
        t1 = time.perf_counter()
        for _ in range(reps):
            net.refine(z)
        t_ref = (time.perf_counter() - t1) / reps / 32 / len(views)
    print(f"network cost per image and view at batch 32: VAE encoder {1000 * t_vae:.2f} ms, "
          f"DDIM refinement {1000 * t_ref:.2f} ms\n")

    with torch.no_grad():
        shipped = score({k: _norm(net.head(torch.from_numpy(v)).numpy()) for k, v in feats.items()}, sets)
    keys = list(shipped)
    head_line = f"{'features':42s} {'dim':>4s} {'ms/img':>6s} | " + " | ".join(f"{k:>14s}" for k in keys)
    print(head_line + " | no-head cross P@5")
    print("-" * len(head_line) + "-" * 20)
    print(f"{'checkpoint head (not centred)':42s} {feats['train'].shape[1]:4d} "
          f"{1000 * len(views) * (t_vae + t_ref):6.2f} | " + " | ".join(f"{shipped[k]:14.3f}" for k in keys))
    for name, (vs, blocks) in subsets(views).items():
        cols = columns(views, vs, blocks)
        sub = {k: v[:, cols] for k, v in feats.items()}
        trained = [train_head(sub, aug_train[:, :, cols], y, sets, a.epochs, seed) for seed in range(a.seeds)]
        runs = [r for r, _ in trained]
        if a.save_vae_head and vs == views and blocks == ("h", "z"):
            command = " ".join(["bench/us_ablation.py", *sys.argv[1:]])
            save_checkpoint(a.save_vae_head, ckpt, blocks, trained[0][1], runs[0], command)
        mean = {k: np.mean([r[k] for r in runs]) for k in keys}
        sd = {k: np.std([r[k] for r in runs]) for k in keys}
        mu, sdv = sub["train"].mean(0), sub["train"].std(0) + 1e-6
        nohead = score({k: _norm((v - mu) / sdv) for k, v in sub.items()}, sets)
        cost = len(vs) * (t_vae + (t_ref if set(blocks) & {"m", "zr"} else 0.0))
        print(f"{name:42s} {len(cols):4d} {1000 * cost:6.2f} | "
              + " | ".join(f"{mean[k]:7.3f} ±{sd[k]:.3f}" for k in keys)
              + f" | {nohead['cross P@5']:17.3f}", flush=True)
    print(f"\n{a.seeds} seeds per row (mean ± sd), {a.epochs} epochs, {a.copies} augmented copies; total {time.time() - t0:.0f} s")
    return 0


def save_checkpoint(
    path: Path,
    ckpt: dict[str, Any],
    blocks: tuple[str, ...],
    head_state: dict[str, Any],
    figures: dict[str, float],
    command: str,
) -> None:
    """A loadable ``us`` checkpoint: the trunk of ``ckpt`` (the shipped one), ``arch['features'] = blocks``, the head."""
    import torch

    arch = {k: v for k, v in ckpt["arch"].items() if k != "center"}  # the centre belongs to the shipped head
    arch = {**arch, "features": list(blocks), "tag": "vae-1" if not set(blocks) & {"m", "zr"} else ckpt["arch"]["tag"]}
    state = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("head.")}
    state.update({f"head.{k}": v.float() for k, v in head_state.items()})
    meta = {**ckpt["meta"], "head_retrained": {"command": command, "features": list(blocks), "figures": figures,
                                              "from": "shipped us.pt trunk, frozen"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"arch": arch, "state_dict": state, "meta": meta}, path)
    print(f"wrote {path} ({', '.join(f'{k} {v:.3f}' for k, v in figures.items())})")


def _norm(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


if __name__ == "__main__":
    sys.exit(main())
