"""Near-copy retrieval: is the same image, slightly re-encoded, still the top match? One run, several checkpoints.

Each query image of a set (its ``--split`` rows) gets a noisy copy: every pixel moved by a uniform integer in
[-6, 6] grey levels of 8 bits (what lossy re-encoding or a second export does), clipped, seed 0. The copies join the
gallery (the set's ``train`` rows, or ``train`` + ``val`` for ``--split test``); the figure is the share of queries
whose own copy is the top match, beside the median and lowest cosine of query and copy.

    .venv/bin/python bench/near_copy.py --modality us --data ../shared/data/busi ../shared/data/bus_bra --split val \\
        --weights lookalike/encoders/weights/us.pt candidate.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lookalike.lab.augment import noisy_copy  # noqa: E402
from lookalike.lab.embed import set_torch_threads  # noqa: E402
from lookalike.lab.images import load_image, read_manifest  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modality", choices=("us", "xr"), required=True)
    p.add_argument("--data", type=Path, nargs="+", required=True)
    p.add_argument("--split", choices=("val", "test"), default="val")
    p.add_argument("--weights", nargs="+", required=True, help="checkpoints ('shipped' for the shipped one)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    set_torch_threads(a.threads)
    from lookalike.encoders import load_encoder

    sets = []
    for data in a.data:
        rows = read_manifest(data)
        gallery_splits = ("train",) if a.split == "val" else ("train", "val")
        queries = [load_image(r["path"], a.modality) for r in rows if r["split"] == a.split]
        rng = np.random.default_rng(0)
        copies = [noisy_copy(im, rng) for im in queries]
        gallery = [load_image(r["path"], a.modality) for r in rows if r["split"] in gallery_splits]
        sets.append((data.name, queries, copies, gallery))
    for weights in a.weights:
        enc = load_encoder(a.modality, weights=None if weights == "shipped" else weights)
        for name, queries, copies, gallery in sets:
            vq, vc, vg = enc.embed(queries), enc.embed(copies), enc.embed(gallery)
            scores = vq @ np.concatenate([vc, vg]).T
            own = np.arange(len(queries))
            self_scores = scores[own, own]
            top = float((scores.argmax(axis=1) == own).mean())
            print(f"{enc.model_version:32s} {name:20s} {a.split} queries {len(queries):4d}  copy is the top match "
                  f"{top:.3f}  copy cosine median {np.median(self_scores):.3f} min {self_scores.min():.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
