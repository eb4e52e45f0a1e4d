"""Does the latent-diffusion refinement earn its cost? Ablation of the ``us`` encoder's fused features on BUSI.

The shipped trunk (VAE encoder + latent UNet) is frozen. Its 320 fused features (see
``lookalike/encoders/ultrasound.py``) are split into blocks:

- VAE: mean- and max-pooled encoder map ``h`` (128) + 4x4-pooled latent ``z`` (64) — no refinement needed;
- refinement: UNet middle-block features ``m`` (64) + 4x4-pooled refined latent ``z_r`` (64);
- ``z`` alone vs ``z_r`` alone (64 each): the same latent before and after the 2 DDIM steps.

For each subset a fresh projection head of the shipped shape (LayerNorm, Linear 256, GELU, Linear 128) is
trained with the shipped recipe (batch-hard triplet + cross-entropy, class-balanced batches 3 x 16, AdamW
1e-3, MONAI augmentation through cached augmented copies), selected on val P@5, then scored under
``shared/eval/PROTOCOL.md``: busi test vs train+val and breast_lesions_usg leave-one-out. Several seeds;
mean and spread printed. Also printed: the shipped head and each subset's z-scored features with no head.

Caveat: the VAE encoder was fine-tuned end to end with the fused head, so this measures what the refinement
adds on top of that trunk, not a VAE trained without diffusion from the start.

    .venv/bin/python bench/us_ablation.py [--copies 8] [--epochs 60] [--seeds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BUSI = ROOT.parent / "shared" / "data" / "busi"
CROSS = ROOT.parent / "shared" / "data" / "breast_lesions_usg"

#: Column ranges of the fused feature vector (order of ``UltrasoundNet.features``).
BLOCKS = {"h": (0, 128), "z": (128, 192), "m": (192, 256), "zr": (256, 320)}
SUBSETS = {
    "VAE (h, z)": ("h", "z"),
    "refinement (m, z_r)": ("m", "zr"),
    "fused (shipped layout)": ("h", "z", "m", "zr"),
    "z alone": ("z",),
    "z_r alone": ("zr",),
}


def columns(blocks: tuple[str, ...]) -> np.ndarray:
    return np.concatenate([np.arange(*BLOCKS[b]) for b in blocks])


def score(emb: dict[str, np.ndarray], sets: dict[str, Any]) -> dict[str, float]:
    """Protocol figures of embeddings for busi test (vs train+val) and cross-domain leave-one-out."""
    from lookalike.encoders.metrics import retrieval_metrics

    s = sets
    gal = np.concatenate([emb["train"], emb["val"]])
    m = retrieval_metrics(emb["test"], s["test"][0], s["test"][1], gal, s["trval"][0], s["trval"][1])
    c = retrieval_metrics(emb["cross"], *s["cross"], emb["cross"], *s["cross"], exclude_self=True)
    v = retrieval_metrics(emb["val"], s["val"][0], s["val"][1], emb["train"], s["train"][0], s["train"][1])
    return {"val P@5": v["P@5"], "busi P@5": m["P@5"], "busi macro-P@5": m["macro-P@5"], "cross P@5": c["P@5"], "cross macro-P@5": c["macro-P@5"]}


def train_head(
    feats: dict[str, np.ndarray],
    aug_train: np.ndarray,
    y: dict[str, np.ndarray],
    sets: dict[str, Any],
    epochs: int,
    seed: int,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Fresh head on fixed features with training's stage D (:func:`lookalike.encoders.training.fit_head`).

    Returns the protocol figures of the head with the best val P@5 and its ``state_dict``.
    """
    import torch
    import torch.nn.functional as F

    from lookalike.encoders.training import fit_head

    _, head = fit_head(aug_train, y["train"], feats["val"], y["val"], sets["val"][1], feats["train"], sets["train"][1],
                       hidden=256, dim=128, epochs=epochs, seed=seed)
    with torch.no_grad():
        emb = {k: F.normalize(head(torch.from_numpy(v)), dim=1).numpy() for k, v in feats.items()}
    return score(emb, sets), head.state_dict()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Ablation of the us encoder's VAE and refinement features on BUSI.")
    p.add_argument("--copies", type=int, default=8, help="augmented copies of each training image")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save-vae-head", type=Path, default=None,
                   help="write a us checkpoint: shipped trunk, VAE blocks only (no refinement), seed-0 head")
    a = p.parse_args(argv)

    import torch

    from lookalike.encoders import load_encoder
    from lookalike.encoders.base import WEIGHTS_DIR
    from lookalike.encoders.evaluate import CROSS_DOMAIN_LABELS
    from lookalike.encoders.preprocessing import build_augment, read_manifest
    from lookalike.encoders.training import frozen_features, preprocess_all

    torch.set_num_threads(a.threads)
    t0 = time.time()
    enc = load_encoder("us")
    net, size = enc.net, enc.image_size
    rows = read_manifest(BUSI)
    cross = [r for r in read_manifest(CROSS) if r["label"] in CROSS_DOMAIN_LABELS]
    split = {s: [r for r in rows if r["split"] == s] for s in ("train", "val", "test")}
    classes = sorted({r["label"] for r in rows})
    sets = {s: ([r["label"] for r in rs], [r["group"] for r in rs]) for s, rs in split.items()}
    sets["trval"] = (sets["train"][0] + sets["val"][0], sets["train"][1] + sets["val"][1])
    sets["cross"] = ([r["label"] for r in cross], [r["group"] for r in cross])
    x = {s: preprocess_all([r["path"] for r in rs], size, "us") for s, rs in split.items()}
    x["cross"] = preprocess_all([r["path"] for r in cross], size, "us")
    device = torch.device("cpu")
    feats = {k: frozen_features(net, v, device) for k, v in x.items()}
    shipped_ckpt = torch.load(WEIGHTS_DIR / "us.pt", map_location="cpu", weights_only=True)
    hyper = shipped_ckpt["meta"].get("hyper", {})
    aug = build_augment(size, field_of_view=bool(hyper.get("field_of_view_augment")))  # as the weights were trained
    aug.set_random_state(seed=0)
    aug_train = np.stack(
        [feats["train"]]
        + [frozen_features(net, torch.stack([aug(im) for im in x["train"]]), device) for _ in range(a.copies)]
    )
    y = {s: np.array([classes.index(lab) for lab in sets[s][0]]) for s in ("train", "val")}
    print(f"features of {sum(len(v) for v in x.values())} images + {a.copies} augmented copies of {len(y['train'])} "
          f"in {time.time() - t0:.0f} s ({a.threads} thread(s))")

    # cost of what each subset needs, batch 32, per image
    xb = x["test"][:32]
    with torch.no_grad():
        _, z = net.encode(xb)
        reps = 5
        t1 = time.perf_counter()
        for _ in range(reps):
            net.encode(xb)
        t_vae = (time.perf_counter() - t1) / reps / 32
        t1 = time.perf_counter()
        for _ in range(reps):
            net.refine(z)
        t_ref = (time.perf_counter() - t1) / reps / 32
    print(f"network cost per image at batch 32: VAE encoder {1000 * t_vae:.2f} ms, DDIM refinement {1000 * t_ref:.2f} ms\n")

    with torch.no_grad():
        shipped = score({k: _norm(net.head(torch.from_numpy(v)).numpy()) for k, v in feats.items()}, sets)
    keys = ["val P@5", "busi P@5", "busi macro-P@5", "cross P@5", "cross macro-P@5"]
    head_line = f"{'features':24s} {'dim':>4s} {'ms/img':>6s} | " + " | ".join(f"{k:>15s}" for k in keys)
    print(head_line + " | no-head busi P@5 | no-head cross P@5")
    print("-" * len(head_line) + "-" * 40)
    print(f"{'shipped head (fused)':24s} {320:4d} {1000 * (t_vae + t_ref):6.2f} | " + " | ".join(f"{shipped[k]:15.3f}" for k in keys))
    for name, blocks in SUBSETS.items():
        cols = columns(blocks)
        sub = {k: v[:, cols] for k, v in feats.items()}
        trained = [train_head(sub, aug_train[:, :, cols], y, sets, a.epochs, seed) for seed in range(a.seeds)]
        runs = [r for r, _ in trained]
        if a.save_vae_head and blocks == ("h", "z"):
            command = " ".join(["bench/us_ablation.py", *sys.argv[1:]])
            save_checkpoint(a.save_vae_head, shipped_ckpt, blocks, trained[0][1], runs[0], command)
        mean = {k: np.mean([r[k] for r in runs]) for k in keys}
        sd = {k: np.std([r[k] for r in runs]) for k in keys}
        mu, sdv = sub["train"].mean(0), sub["train"].std(0) + 1e-6
        nohead = score({k: _norm((v - mu) / sdv) for k, v in sub.items()}, sets)
        cost = t_vae + (t_ref if set(blocks) & {"m", "zr"} else 0.0)
        print(f"{name:24s} {len(cols):4d} {1000 * cost:6.2f} | "
              + " | ".join(f"{mean[k]:8.3f} ±{sd[k]:.3f}" for k in keys)
              + f" | {nohead['busi P@5']:16.3f} | {nohead['cross P@5']:17.3f}")
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
