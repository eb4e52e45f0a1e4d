"""Metric-learning losses (MONAI ships none of these)."""

from __future__ import annotations

import torch


def pairwise_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """Euclidean distance matrix, with a floor under the square root so gradients stay finite at zero."""
    sq = (embeddings * embeddings).sum(dim=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * embeddings @ embeddings.T
    return torch.sqrt(d2.clamp_min(1e-12))


def batch_hard_triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al. 2017).

    For each anchor, the farthest same-label item and the nearest other-label item in the batch form the
    triplet; loss = mean over anchors of ``relu(d(a, p_hard) - d(a, n_hard) + margin)``. Anchors without a
    positive or a negative in the batch are left out, which is why batches should be class-balanced.

    Parameters
    ----------
    embeddings : torch.Tensor
        (n, d) embeddings (pass L2-normalised rows to work on the sphere).
    labels : torch.Tensor
        (n,) integer labels.
    margin : float
        Required gap between the hardest negative and the hardest positive distance.

    Returns
    -------
    torch.Tensor
        Scalar loss (zero when no anchor has both a positive and a negative).
    """
    dist = pairwise_distances(embeddings)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    pos = same & ~eye
    neg = ~same
    hardest_pos = torch.where(pos, dist, torch.zeros_like(dist)).max(dim=1).values
    hardest_neg = torch.where(neg, dist, torch.full_like(dist, float("inf"))).min(dim=1).values
    valid = pos.any(dim=1) & neg.any(dim=1)
    if not bool(valid.any()):
        return embeddings.sum() * 0.0
    losses = torch.relu(hardest_pos - hardest_neg + margin)
    return losses[valid].mean()


def supervised_contrastive_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, the "L_out" form).

    For anchor i with positives P(i) (same label, not i):
    ``l_i = -1/|P(i)| * sum_{p in P(i)} log(exp(s_ip / T) / sum_{a != i} exp(s_ia / T))`` with s the dot
    product; the loss is the mean over anchors that have at least one positive. Two augmented views of each
    image are passed as separate rows with the same label.

    Parameters
    ----------
    embeddings : torch.Tensor
        (n, d) L2-normalised embeddings (dot product = cosine).
    labels : torch.Tensor
        (n,) integer labels.
    temperature : float
        Softmax temperature T.

    Returns
    -------
    torch.Tensor
        Scalar loss (zero when no anchor has a positive).
    """
    n = embeddings.shape[0]
    logits = embeddings @ embeddings.T / temperature
    eye = torch.eye(n, dtype=torch.bool, device=embeddings.device)
    logits = logits.masked_fill(eye, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    n_pos = pos.sum(dim=1)
    valid = n_pos > 0
    if not bool(valid.any()):
        return embeddings.sum() * 0.0
    sum_pos = torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    return -(sum_pos[valid] / n_pos[valid]).mean()
