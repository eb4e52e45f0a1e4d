"""Retrieval metrics as defined in ``shared/eval/PROTOCOL.md`` (beside the checkout), and the raw-pixel floor.

numpy (and PIL, for the raw-pixel floor) only, so that scoring can run without torch once embeddings exist;
the command that embeds a data set and scores it is ``lookalike evaluate`` (:mod:`lookalike.lab.evaluate`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image


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


def rank_gallery(
    query_emb: np.ndarray,
    query_groups: Sequence,
    gallery_emb: np.ndarray,
    gallery_groups: Sequence,
    exclude_self: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank the gallery for every query by cosine, the protocol's exclusions sorted last.

    One ranking shared by the metrics and the figures of ``lookalike evaluate``, so that a figure shows
    exactly the neighbours that were scored.

    Returns
    -------
    sim : numpy.ndarray
        (nq, ng) cosine similarities.
    excluded : numpy.ndarray
        (nq, ng) bool: gallery items of the query's group (and the query itself with ``exclude_self``).
    order : numpy.ndarray
        (nq, ng) gallery indices, most similar first; ties by gallery order; excluded items last.
    """
    q = _l2n(query_emb)
    g = _l2n(gallery_emb)
    qg = np.asarray(query_groups)
    gg = np.asarray(gallery_groups)
    sim = q @ g.T
    excluded = qg[:, None] == gg[None, :]
    if exclude_self:
        if len(q) != len(g):
            raise ValueError("exclude_self needs the query set to be the gallery set")
        excluded |= np.eye(len(q), dtype=bool)
    ranked = np.where(excluded, np.inf, -sim)  # excluded items sort last
    order = np.argsort(ranked, axis=1, kind="stable")
    return sim, excluded, order


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
    ql = np.asarray(query_labels)
    gl = np.asarray(gallery_labels)
    sim, excluded, order = rank_gallery(query_emb, query_groups, gallery_emb, gallery_groups, exclude_self)
    rel_all = ql[:, None] == gl[None, :]
    rel = np.take_along_axis(rel_all & ~excluded, order, axis=1)
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
        "n_queries": int(sim.shape[0]),
        "n_gallery": int(sim.shape[1]),
    }


def raw_pixel_embeddings(images: Sequence[np.ndarray], size: int = 32) -> np.ndarray:
    """Raw-pixel floor: resize to size x size grayscale (PIL bilinear), subtract the image mean, L2-normalise."""
    rows = []
    for im in images:
        arr = np.asarray(im, dtype=np.float32)
        small = np.asarray(Image.fromarray(arr, mode="F").resize((size, size), Image.BILINEAR), dtype=np.float64)
        v = small.ravel() - small.mean()
        rows.append(v)
    return _l2n(np.stack(rows)).astype(np.float32)
