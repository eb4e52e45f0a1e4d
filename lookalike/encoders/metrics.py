"""Retrieval metrics as defined in ``shared/eval/PROTOCOL.md`` (beside the checkout), and the raw-pixel floor.

numpy only, so that evaluation can run without torch once embeddings exist.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _l2n(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def _roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties counted as one half."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # average rank (1-based) for each run of tied scores
    starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]
    ends = np.r_[starts[1:], s.size]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def chance_precision(query_labels: Sequence, gallery_labels: Sequence) -> float:
    """Chance P@k: sum over labels of (share among queries) x (share in the gallery)."""
    q = np.asarray(query_labels)
    g = np.asarray(gallery_labels)
    return float(sum((q == lab).mean() * (g == lab).mean() for lab in np.unique(q)))


def retrieval_metrics(
    query_emb: np.ndarray,
    query_labels: Sequence,
    query_groups: Sequence,
    gallery_emb: np.ndarray,
    gallery_labels: Sequence,
    gallery_groups: Sequence,
    k: int = 5,
    exclude_self: bool = False,
) -> dict[str, float]:
    """Rank the gallery by cosine for every query and score the ranking.

    Gallery items of the query's own group never count (removed from the ranking). Ties in similarity are
    broken by gallery order (stable sort).

    Parameters
    ----------
    query_emb, gallery_emb : numpy.ndarray
        (nq, d) and (ng, d) embeddings; rows are L2-normalised here.
    query_labels, gallery_labels : sequence
        Class label per row.
    query_groups, gallery_groups : sequence
        Group id per row (near-duplicates / same patient).
    k : int
        Cut-off for the @k metrics.
    exclude_self : bool
        Also drop gallery item i for query i (leave-one-out with query set == gallery set).

    Returns
    -------
    dict
        ``P@k, R@k, mAP@k, MAR@k, mAP, AUC, macro-P@k, chance-P@k, n_queries, n_gallery``.
    """
    q = _l2n(query_emb)
    g = _l2n(gallery_emb)
    ql = np.asarray(query_labels)
    gl = np.asarray(gallery_labels)
    qg = np.asarray(query_groups)
    gg = np.asarray(gallery_groups)
    sim = q @ g.T
    excluded = qg[:, None] == gg[None, :]
    if exclude_self:
        if len(q) != len(g):
            raise ValueError("exclude_self needs the query set to be the gallery set")
        excluded |= np.eye(len(q), dtype=bool)
    rel_all = ql[:, None] == gl[None, :]
    ranked = np.where(excluded, np.inf, -sim)  # excluded items sort last
    order = np.argsort(ranked, axis=1, kind="stable")
    rel = np.take_along_axis(rel_all & ~excluded, order, axis=1)
    n_valid = (~excluded).sum(axis=1)
    n_rel = rel.sum(axis=1)

    topk = rel[:, :k].astype(np.float64)
    cum = np.cumsum(topk, axis=1)
    pos = np.arange(1, topk.shape[1] + 1)
    p_at_k = cum[:, -1] / k
    r_at_k = (cum[:, -1] > 0).astype(np.float64)
    ap_k = np.where(n_rel > 0, ((cum / pos) * topk).sum(axis=1) / np.maximum(np.minimum(k, n_rel), 1), 0.0)
    mar_k = (cum > 0).sum(axis=1) / k

    cum_all = np.cumsum(rel, axis=1)
    pos_all = np.arange(1, rel.shape[1] + 1)
    ap = np.where(n_rel > 0, ((cum_all / pos_all) * rel).sum(axis=1) / np.maximum(n_rel, 1), 0.0)

    keep = ~excluded
    auc = _roc_auc(sim[keep], rel_all[keep])
    macro = float(np.mean([p_at_k[ql == lab].mean() for lab in np.unique(ql)]))
    return {
        f"P@{k}": float(p_at_k.mean()),
        f"R@{k}": float(r_at_k.mean()),
        f"mAP@{k}": float(ap_k.mean()),
        f"MAR@{k}": float(mar_k.mean()),
        "mAP": float(ap.mean()),
        "AUC": auc,
        f"macro-P@{k}": macro,
        f"chance-P@{k}": chance_precision(ql, gl),
        "n_queries": int(len(q)),
        "n_gallery": int(len(g)),
    }


def raw_pixel_embeddings(images: Sequence[np.ndarray], size: int = 32) -> np.ndarray:
    """Raw-pixel floor: resize to size x size grayscale (PIL bilinear), subtract the image mean, L2-normalise."""
    from PIL import Image

    rows = []
    for im in images:
        arr = np.asarray(im, dtype=np.float32)
        small = np.asarray(Image.fromarray(arr, mode="F").resize((size, size), Image.BILINEAR), dtype=np.float64)
        v = small.ravel() - small.mean()
        rows.append(v)
    return _l2n(np.stack(rows)).astype(np.float32)


def _read_set(data_dir: str, labels: Sequence[str] | None = None) -> list[dict[str, str]]:
    import csv
    from pathlib import Path

    with open(Path(data_dir) / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["path"] = str(Path(data_dir) / r["path"])
    return [r for r in rows if labels is None or r["label"] in labels]


def evaluate(
    name: str, data_dir: str, weights: str | None = None, cross_domain_dir: str | None = None
) -> dict[str, dict[str, float]]:
    """Score an encoder and the raw-pixel floor under PROTOCOL.md.

    Archive setting on ``data_dir`` (test queries vs train+val gallery) and, when given, leave-one-out on
    ``cross_domain_dir`` restricted to benign/malignant. Images go through the same path as in serving:
    PNG/JPEG -> 2-D float32 in [0, 1] -> ``Encoder.embed``.
    """
    from lookalike.encoders import load_encoder
    from lookalike.encoders.preprocessing import load_image

    enc = load_encoder(name, weights)
    out: dict[str, dict[str, float]] = {"model_version": {"value": enc.model_version}}  # type: ignore[dict-item]
    rows = _read_set(data_dir)
    q = [r for r in rows if r["split"] == "test"]
    g = [r for r in rows if r["split"] in ("train", "val")]

    def cols(rs: list[dict[str, str]]) -> tuple[list[np.ndarray], list[str], list[str]]:
        return [load_image(r["path"]) for r in rs], [r["label"] for r in rs], [r["group"] for r in rs]

    qi, ql, qg = cols(q)
    gi, gl, gg = cols(g)
    out["archive"] = retrieval_metrics(enc.embed(qi), ql, qg, enc.embed(gi), gl, gg)
    out["archive_raw_pixels"] = retrieval_metrics(raw_pixel_embeddings(qi), ql, qg, raw_pixel_embeddings(gi), gl, gg)
    if cross_domain_dir:
        cd = _read_set(cross_domain_dir, labels=("benign", "malignant"))
        ci, cl, cg = cols(cd)
        out["cross_domain"] = retrieval_metrics(enc.embed(ci), cl, cg, enc.embed(ci), cl, cg, exclude_self=True)
        raw = raw_pixel_embeddings(ci)
        out["cross_domain_raw_pixels"] = retrieval_metrics(raw, cl, cg, raw, cl, cg, exclude_self=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m lookalike.encoders.metrics --modality us --data DIR [--weights F] [--cross-domain DIR]``."""
    import argparse
    import json

    p = argparse.ArgumentParser(description="Retrieval figures of an encoder beside the raw-pixel floor.")
    p.add_argument("--modality", choices=["us", "xr"], required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--weights", default=None)
    p.add_argument("--cross-domain", default=None)
    a = p.parse_args(argv)
    res = evaluate(a.modality, a.data, a.weights, a.cross_domain)
    print(json.dumps(res, indent=1))
    for key, val in res.items():
        if key != "model_version":
            print(f"{key:26s} P@5 {val['P@5']:.3f}  macro-P@5 {val['macro-P@5']:.3f}  mAP@5 {val['mAP@5']:.3f}  "
                  f"R@5 {val['R@5']:.3f}  mAP {val['mAP']:.3f}  AUC {val['AUC']:.3f}  chance {val['chance-P@5']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
