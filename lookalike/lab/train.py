"""``lookalike train``: train the ``us`` or ``xr`` encoder with its recipe and write a checkpoint.

The recipes (:mod:`lookalike.lab.training_us`, :mod:`lookalike.lab.training_xr`) are built from the shared
stages of :mod:`lookalike.lab.training`; this module only picks one by modality and parses the command line, so
that the recipes and their stages import each other in one direction only.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lookalike.lab.training_us import train_us
from lookalike.lab.training_xr import train_xr


def train(modality: str, data_dir: Path | Sequence[Path], out: Path, epochs: int, seed: int = 0,
          **options: Any) -> dict[str, Any]:
    """Train the ``modality`` encoder with its recipe; return the checkpoint's ``meta``.

    ``options`` are the recipe's keyword arguments: :func:`lookalike.lab.training_us.train_us` or
    :func:`lookalike.lab.training_xr.train_xr` (an option the recipe does not take is a ``TypeError``).
    """
    recipes = {"us": train_us, "xr": train_xr}
    if modality not in recipes:
        raise ValueError(f"unknown modality {modality!r}")
    recipe = recipes[modality]
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
