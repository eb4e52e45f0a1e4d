"""Train and choose the fused ultrasound encoder (:mod:`lookalike.encoders.fused`) on cached frozen features.

Both trunks are frozen, so every image's branch blocks are computed once (``cache``) by the same functions the
served network calls (:func:`lookalike.encoders.lesion.prepare_views`, ``FusedUltrasoundNet.base_outputs`` and
``imagenet_blocks``); only the projection head is trained, with the metric stage's loss (batch-hard triplet +
cross-entropy, :func:`lookalike.lab.training_us.fit_head`).

``select`` scores every candidate (which blocks feed the head, or plain cosine over them without a head) by the
rule of the ultrasound model card, fixed before the runs: **leave one hospital out** between busi and bus_bra
(train the head on one hospital's ``train`` rows, score P@5 of the other hospital's ``val`` rows against that
hospital's ``train`` rows; the mean of the two directions). It also trains each candidate's final head on both
hospitals' ``train`` rows and prints its val and test figures, which choose nothing. ``fit`` writes the chosen
candidate as a checkpoint ``load_encoder`` serves. breast_lesions_usg is only ever scored.

    python -m lookalike.lab.training_fused cache --data ../shared/data/busi ../shared/data/bus_bra \\
        ../shared/data/breast_lesions_usg --cache /tmp/us_fused_cache
    python -m lookalike.lab.training_fused select --cache /tmp/us_fused_cache --out-json select.json
    python -m lookalike.lab.training_fused fit --cache /tmp/us_fused_cache --candidate NAME --out us.pt
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.layers import GaussianFilter

from lookalike.encoders.base import WEIGHTS_DIR, file_sha256, centre_vectors
from lookalike.encoders.fused import (FusedUltrasoundNet, base_checkpoint, beside_base, fused_arch, join_blocks,
                                      rescale)
from lookalike.encoders.lesion import finder_from_checkpoint, prepare_views
from lookalike.encoders.preprocessing import build_preprocess
from lookalike.encoders.pretrained import build_trunk
from lookalike.lab.augment import noisy_copy
from lookalike.lab.evaluate import CROSS_DOMAIN_LABELS
from lookalike.lab.images import load_image, read_manifest
from lookalike.lab.metrics import retrieval_metrics
from lookalike.lab.training import run_command, save_checkpoint
from lookalike.lab.training_us import fit_head

#: Side the views are prepared at; the base branch is resized down from it, the ImageNet branch to its own side.
VIEW_SIZE = 224
LABELS = {"benign": 0, "malignant": 1, "normal": 2}
TRAIN_SETS = ("busi", "bus_bra")
CROSS_SET = "breast_lesions_usg"

#: Candidate -> (blocks in head order, whether a head is trained). Blocks: ``vec`` the base encoder's served
#: vector, ``feat`` its trunk features (all blocks), ``vae`` its VAE blocks only (no refinement), ``crop224`` /
#: ``crop160`` / ``whole160`` the ImageNet trunk on the lesion crop or the whole image at that side.
CANDIDATES: dict[str, tuple[tuple[str, ...], bool]] = {
    "shipped": (("vec",), False),
    "imnet_crop224": (("crop224",), False),
    "imnet_crop160": (("crop160",), False),
    "imnet_whole160": (("whole160",), False),
    "concat_vec_crop224": (("vec", "crop224"), False),
    "concat_vec_crop160": (("vec", "crop160"), False),
    "head_feat": (("feat",), True),
    "head_vae": (("vae",), True),
    "head_crop160": (("crop160",), True),
    "head_crop160_whole160": (("crop160", "whole160"), True),
    "head_vec_crop160": (("vec", "crop160"), True),
    "head_vec_crop224": (("vec", "crop224"), True),
    "head_feat_crop160": (("feat", "crop160"), True),
    "head_vae_crop160": (("vae", "crop160"), True),
    "head_vae_crop160_whole160": (("vae", "crop160", "whole160"), True),
    "head_vec_crop160_whole160": (("vec", "crop160", "whole160"), True),
}
#: Second round (added after the first round's figures, same rule): heads stopped early, which the first round's
#: leave-one-hospital-out scores suggested (trained heads specialise to the hospital they were trained on).
CANDIDATES.update({
    "head_vec_crop160_e5": (("vec", "crop160"), True),
    "head_vec_crop224_e5": (("vec", "crop224"), True),
    "head_vec_crop160_e10": (("vec", "crop160"), True),
    "head_vec_crop224_e10": (("vec", "crop224"), True),
})

#: Round 3 (rule of the model card written before its runs): views made once at side S (128 or 160) from one finder
#: box, the VAE-diffusion branch on them resized S -> 64, the ImageNet branch on the crop at S. Blocks carry
#: their S: ``vecS``, ``featS``, ``vaeS``, ``cropS``; ``vec64`` is the shipped encoder as it serves (views at 64).
#: ``baselines`` are heads on the shipped encoder's own blocks, the rule's same-split yardsticks.
ROUND3_SIDES = (128, 160)
ROUND3: dict[str, tuple[tuple[str, ...], bool]] = {"shipped_served": (("vec64",), False)}
for _s in ROUND3_SIDES:
    ROUND3[f"concat_vec{_s}_crop{_s}"] = ((f"vec{_s}", f"crop{_s}"), False)
    ROUND3[f"imnet_crop{_s}"] = ((f"crop{_s}",), False)
    for _e in (10, 30):
        for _b in ("vec", "feat", "vae"):
            ROUND3[f"baseline_{_b}{_s}_e{_e}"] = ((f"{_b}{_s}",), True)
        for _b in ("vec", "vae"):
            ROUND3[f"head_{_b}{_s}_crop{_s}_e{_e}"] = ((f"{_b}{_s}", f"crop{_s}"), True)

#: Round 6 (rule of the model card written before its runs): the round-3 views; ``blurS`` is the lesion crop at S
#: smoothed by a Gaussian (``cache --blur``) before the ImageNet trunk; ``_aug`` heads train on each image's clean
#: blocks and on its near copy's (``cache --noisy-seed``), one of the two drawn per image and step. 30 epochs.
ROUND6: dict[str, tuple[tuple[str, ...], bool]] = {"shipped_served": (("vec64",), False)}
for _s in ROUND3_SIDES:
    ROUND6[f"concat_vec{_s}_blur{_s}"] = ((f"vec{_s}", f"blur{_s}"), False)
    for _b in ("vec", "feat", "vae"):
        ROUND6[f"baseline_{_b}{_s}_e30"] = ((f"{_b}{_s}",), True)
    ROUND6[f"head_vec{_s}_blur{_s}_e30"] = ((f"vec{_s}", f"blur{_s}"), True)
    ROUND6[f"head_vec{_s}_blur{_s}_aug_e30"] = ((f"vec{_s}", f"blur{_s}"), True)
    ROUND6[f"head_vec{_s}_crop{_s}_aug_e30"] = ((f"vec{_s}", f"crop{_s}"), True)

def heads_beside_base(shares: tuple[int, ...]) -> dict[str, tuple[tuple[str, ...], bool]]:
    """Round 6's heads that passed its tests 1-2, each served beside the shipped vector it was given at each share
    (``_baseB``: a cosine is (100 - B)% the head's + B% the vector's), and round 6's yardsticks again (the same
    computation, so the same figures) for the rule's tests 1 and 2."""
    out = {k: v for k, v in ROUND6.items() if k.startswith(("shipped", "baseline"))}
    for name in ("head_vec128_crop128_aug_e30", "head_vec160_blur160_e30", "head_vec160_blur160_aug_e30",
                 "head_vec160_crop160_aug_e30"):
        for share in shares:
            out[name.replace("_e30", f"_base{share}_e30")] = ROUND6[name]
    return out


#: Rounds 7 and 8 (their rules in the model card, each written before its runs): the base vector's share 25% and
#: 50%, then 65% and 75%.
ROUND7 = heads_beside_base((25, 50))
ROUND8 = heads_beside_base((65, 75))
#: Round 9 (its rule in the model card, written before its runs): round 7's heads (three: its two blur160 heads are
#: one once trained on near copies) with the instance term (``_inst``, :data:`INSTANCE`), served alone and beside
#: the vector at 50% and 65%.
ROUND9: dict[str, tuple[tuple[str, ...], bool]] = {k: v for k, v in ROUND6.items() if k.startswith(("shipped", "baseline"))}
for _s, _im in ((128, "crop"), (160, "blur"), (160, "crop")):
    for _share in ("", "_base50", "_base65"):
        ROUND9[f"head_vec{_s}_{_im}{_s}_aug_inst{_share}_e30"] = ((f"vec{_s}", f"{_im}{_s}"), True)
#: Round 10 (issue 18): round 9's candidates again, on blocks made with a retrained lesion finder (``cache
#: --finder``); the shipped encoder to beat is round 9's winner, read from round 9's report (``--against``).
ROUND10 = {k: v for k, v in ROUND9.items() if k != "shipped_served"}
#: Round 11 (issue 18): round 10's heads that passed its tests 1-2 and the shipped head's form, on blocks made with a
#: finder trained for steadiness, each judged by its mean over :data:`ROUND11_SEEDS` against fixed yardsticks.
ROUND11 = {k: ROUND10[k] for k in ("head_vec128_crop128_aug_inst_base50_e30", "head_vec128_crop128_aug_inst_base65_e30",
                                   "head_vec160_blur160_aug_inst_base50_e30", "head_vec160_blur160_aug_inst_base65_e30")}
ROUND11_SEEDS = (0, 1, 2)
#: The shipped encoder's LOHO and pooled val, each the mean of seeds 0-2 on its own finder's blocks (the US card's
#: seed table): round 11's tests 1 and 2.
ROUND11_YARDSTICK = {"loho": 0.743, "pooled_val": 0.820}
#: Every candidate of every round, by name (``fit`` takes any trained one).
ALL_CANDIDATES = {**CANDIDATES, **ROUND3, **ROUND6, **ROUND7, **ROUND8, **ROUND9}

HEAD = {"hidden": 256, "dim": 128, "epochs": 30, "lr": 1e-3, "per_class": 16, "margin": 0.2, "ce_weight": 1.0}
#: The instance term of ``_inst`` heads (round 9): weight and temperature of the NT-Xent between an image and its
#: near copy (:func:`lookalike.lab.training_us.fit_head`).
INSTANCE = {"instance_weight": 1.0, "instance_temperature": 0.1}


def cache_net(base_path: Path) -> tuple[Any, Any, Any]:
    """(fused net over the base checkpoint with the 224 px ImageNet branch, a 160 px trunk, the lesion finder)."""
    ckpt = base_checkpoint(torch.load(base_path, map_location="cpu", weights_only=True))
    net = FusedUltrasoundNet(fused_arch(ckpt["arch"], "vector", ("lesion",), VIEW_SIZE, VIEW_SIZE))
    load_base(net, ckpt)
    return net.eval(), build_trunk(160), finder_from_checkpoint(ckpt)


def load_base(net: Any, ckpt: dict[str, Any]) -> None:
    """The base checkpoint's weights into ``net.base`` (its VAE decoder is not shipped and not needed)."""
    missing, unexpected = net.base.load_state_dict(ckpt["state_dict"], strict=False)
    bad = [k for k in missing if not k.startswith(("vae.decoder.", "vae.post_quant"))]
    if bad or unexpected:
        raise ValueError(f"base checkpoint does not match its arch: {bad[:3]} {unexpected[:3]}")


def cache_set(data: Path, base_path: Path, out: Path, chunk: int = 32) -> Path:
    """Every block of every image of one data set, as the served network computes it, into ``out`` (.npz)."""
    net, trunk160, finder = cache_net(base_path)
    rows = read_manifest(data)
    pre = build_preprocess(VIEW_SIZE)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("vec", "feat", "crop224", "crop160", "whole160")}
    t0 = time.time()
    with torch.no_grad():
        for i in range(0, len(rows), chunk):
            images = [load_image(r["path"], "us") for r in rows[i : i + chunk]]
            x, _ = prepare_views(images, pre, net.views, finder, net.arch["lesion_margin"])
            feat, vec = net.base_outputs(x)
            got = {"vec": vec, "feat": feat, "crop224": net.imagenet_blocks(x)[0],
                   "crop160": trunk160(rescale(x[:, [1]], 160)), "whole160": trunk160(rescale(x[:, [0]], 160))}
            for k, v in got.items():
                parts[k].append(v.float().numpy())
            print(f"[cache] {data.name} {min(i + chunk, len(rows))}/{len(rows)} ({time.time() - t0:.0f} s)", flush=True)
    meta = {c: np.array([r.get(c, "") for r in rows]) for c in ("path", "label", "group", "split", "device")}
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **{k: np.concatenate(v) for k, v in parts.items()}, **meta)
    return out


class FixedBoxes:
    """A finder that hands back boxes already found: one finder pass makes the views at every side."""

    def __init__(self, boxes: list[Any]) -> None:
        self.boxes = boxes

    def find(self, images: list[Any]) -> list[Any]:
        return self.boxes[: len(images)]


def cache_set_sides(data: Path, base_path: Path, out: Path, sides: tuple[int, ...] = ROUND3_SIDES,
                    chunk: int = 32, blur: float = 0.0, noisy_seed: int | None = None,
                    finder_path: Path | None = None) -> Path:
    """Round 3's blocks of every image (module ``ROUND3``), each computed as the served network at that side would.

    The finder runs once per image; its boxes make the views at 64 (the shipped encoder's own input: ``vec64``)
    and at each side S, where the base branch sees the views resized S -> 64 and the ImageNet trunk the crop at S.
    ``blur`` > 0 adds ``blurS``, the crop smoothed as a checkpoint with that ``smooth_sigma`` serves it (round 6).
    ``noisy_seed`` adds ``noisy_<block>`` for every block: the same computation on a near copy of each image
    (:func:`lookalike.lab.augment.noisy_copy`, its own finder pass), drawn from that seed and the set's name.
    ``finder_path`` (round 10): the lesion finder of that checkpoint instead of the base checkpoint's; the cache
    records the sha256 of the finder it was made with (``finder_sha256``), which ``fit`` checks.
    """
    ckpt = base_checkpoint(torch.load(base_path, map_location="cpu", weights_only=True))
    net = FusedUltrasoundNet(fused_arch(ckpt["arch"], "vector", (), 64, 64))
    load_base(net, ckpt)
    net.eval()
    lesion = finder_entry(ckpt, finder_path)
    finder = finder_from_checkpoint(lesion)
    trunks = {s: build_trunk(s) for s in sides}
    smooth = GaussianFilter(2, blur) if blur > 0 else None
    pres = {s: build_preprocess(s) for s in (64, *sides)}
    li = net.views.index("lesion")
    rng = np.random.default_rng([noisy_seed, zlib.crc32(data.name.encode())]) if noisy_seed is not None else None

    def blocks_of(images: list[np.ndarray]) -> dict[str, torch.Tensor]:
        boxes = finder.find(images)
        got = {}
        for s, pre in pres.items():
            x, _ = prepare_views(images, pre, net.views, FixedBoxes(boxes), net.arch["lesion_margin"])
            feat, vec = net.base_outputs(x)
            got[f"vec{s}"] = vec
            if s != 64:
                got[f"feat{s}"] = feat
                crop = rescale(x[:, [li]], s)
                got[f"crop{s}"] = trunks[s](crop)
                if smooth is not None:
                    got[f"blur{s}"] = trunks[s](rescale(smooth(crop), s))
        return got

    rows = read_manifest(data)
    parts: dict[str, list[np.ndarray]] = {}
    t0 = time.time()
    with torch.no_grad():
        for i in range(0, len(rows), chunk):
            images = [load_image(r["path"], "us") for r in rows[i : i + chunk]]
            got = blocks_of(images)
            if rng is not None:
                got.update({f"noisy_{k}": v for k, v in blocks_of([noisy_copy(im, rng) for im in images]).items()})
            for k, v in got.items():
                parts.setdefault(k, []).append(v.float().numpy())
            done = min(i + chunk, len(rows))
            print(f"[cache3] {data.name} {done}/{len(rows)} ({time.time() - t0:.0f} s)", flush=True)
    meta = {c: np.array([r.get(c, "") for r in rows]) for c in ("path", "label", "group", "split", "device")}
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **{k: np.concatenate(v) for k, v in parts.items()}, **meta, blur_sigma=np.array(blur),
             finder_sha256=np.array(state_sha256(lesion)))
    return out


def finder_entry(base_ckpt: dict[str, Any], finder_path: Path | None) -> dict[str, Any]:
    """The ``lesion`` entry a fitted checkpoint carries: ``{"arch", "state_dict"}`` of the finder in
    ``finder_path`` (a ``lookalike train-lesions`` checkpoint), or the base checkpoint's own finder."""
    if finder_path is None:
        return base_ckpt["lesion"]
    ckpt = torch.load(finder_path, map_location="cpu", weights_only=True)
    if ckpt.get("arch", {}).get("name") != "lesion":
        raise ValueError(f"{finder_path}: not a lesion finder checkpoint")
    return {"arch": ckpt["arch"], "state_dict": ckpt["state_dict"]}


def state_sha256(entry: dict[str, Any]) -> str:
    """A finder's identity: sha256 over its arch and weights, so a cache and a fit can be checked to match."""
    h = hashlib.sha256(json.dumps(entry["arch"], sort_keys=True).encode())
    for k in sorted(entry["state_dict"]):
        h.update(k.encode())
        h.update(entry["state_dict"][k].detach().cpu().float().numpy().tobytes())
    return h.hexdigest()


def side_of(name: str) -> int:
    """The side a block was computed at: ``crop160`` -> 160."""
    return int(name.lstrip("abcdefghijklmnopqrstuvwxyz"))


def block(cache: dict[str, Any], name: str) -> np.ndarray:
    """One cached block; ``vae[S]`` is the VAE part (h and z, 192 of each view's 320) of ``feat[S]``."""
    if name.startswith("vae"):
        f = cache["feat" + name[3:]]
        per = f.shape[1] // 2
        return np.concatenate([f[:, :192], f[:, per : per + 192]], axis=1)
    return cache[name]


def joined(cache: dict[str, Any], blocks: tuple[str, ...]) -> np.ndarray:
    """The head's input for cached blocks: :func:`lookalike.encoders.fused.join_blocks`."""
    return join_blocks([torch.from_numpy(block(cache, b)) for b in blocks]).numpy()


def rows_of(cache: dict[str, Any], splits: tuple[str, ...]) -> np.ndarray:
    """Indices of the rows in ``splits``."""
    return np.flatnonzero(np.isin(cache["split"], splits))


def epochs_of(candidate: str) -> int:
    """Head epochs of a candidate: ``_eN`` at the end of its name, else the recipe's."""
    tail = candidate.rsplit("_e", 1)
    return int(tail[1]) if len(tail) == 2 and tail[1].isdigit() else HEAD["epochs"]


def train_head(x: np.ndarray, y: np.ndarray, groups: list[str], seed: int, epochs: int,
               val: tuple[np.ndarray, np.ndarray, list[str]], gallery: tuple[np.ndarray, np.ndarray, list[str]],
               instance: bool = False) -> tuple[float, Any]:
    """A fresh head on ``x`` for a fixed number of epochs (the last is kept: val chooses nothing here).

    ``x`` is (n, d), or (copies, n, d) with the clean blocks first: each step draws one copy per image.
    ``instance``: with the instance term (:data:`INSTANCE`) between each image's clean blocks and its copy's.
    """
    h = HEAD
    views = x if x.ndim == 3 else x[None]
    return fit_head(views, y, val[0], val[1], val[2], views[0], groups, hidden=h["hidden"], dim=h["dim"], epochs=epochs,
                    seed=seed, per_class=h["per_class"], lr=h["lr"], margin=h["margin"], ce_weight=h["ce_weight"],
                    gallery=gallery, keep_best=False, **(INSTANCE if instance else {}))


def apply(head: Any, x: np.ndarray, center: np.ndarray | None = None) -> np.ndarray:
    """L2-normalised (and centred, when a centre is given) vectors of a head on joined blocks."""
    if head is None:
        v = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    else:
        with torch.no_grad():
            v = F.normalize(head(torch.from_numpy(x)), dim=1).numpy()
    return v if center is None else centre_vectors(v, center)


def p_at_5(q: np.ndarray, yq: np.ndarray, gq: np.ndarray, g: np.ndarray, yg: np.ndarray, gg: np.ndarray,
           loo: bool = False) -> dict[str, float]:
    """P@5 and macro-P@5 under the protocol (own group excluded; leave-one-out when ``loo``)."""
    m = retrieval_metrics(q, list(yq), list(gq), g, list(yg), list(gg), k=5, exclude_self=loo)
    return {"P@5": round(m["P@5"], 4), "macro-P@5": round(m["macro-P@5"], 4)}


def labels(cache: dict[str, Any], idx: np.ndarray, names: dict[str, int] = LABELS) -> np.ndarray:
    """Integer labels of rows ``idx`` (``names``: label -> integer; the ultrasound labels unless given)."""
    return np.array([names[v] for v in cache["label"][idx]], dtype=np.int64)


def noisy_blocks(cache: dict[str, Any]) -> dict[str, Any]:
    """The cache as its near copies' blocks (``noisy_<block>``, ``cache --noisy-seed``) under the blocks' names."""
    return {**cache, **{k[len("noisy_"):]: v for k, v in cache.items() if k.startswith("noisy_")}}


def head_input(cache: dict[str, Any], blocks: tuple[str, ...], augmented: bool) -> np.ndarray:
    """(copies, n, d) training input: the joined blocks, and the near copies' too when ``augmented``."""
    return np.stack([joined(cache, blocks)] + ([joined(noisy_blocks(cache), blocks)] if augmented else []))


def augmented_of(candidate: str) -> bool:
    """Whether a candidate's head trains on near copies too: ``_aug`` in its name."""
    return "aug" in candidate.split("_")


def instance_of(candidate: str) -> bool:
    """Whether a candidate's head trains with the instance term: ``_inst`` in its name (round 9)."""
    return "inst" in candidate.split("_")


def share_of(candidate: str) -> float:
    """The base vector's share of a candidate's cosine: ``_baseB`` in its name -> B / 100, else 0."""
    tokens = [t for t in candidate.split("_") if t.startswith("base") and t[4:].isdigit()]
    return int(tokens[0][4:]) / 100.0 if tokens else 0.0


def served(cache: dict[str, Any], blocks: tuple[str, ...], head: Any, center: np.ndarray | None,
           share: float = 0.0) -> np.ndarray:
    """Every row's vector as the fitted checkpoint serves it: the head on the joined blocks, centred; with
    ``share`` > 0 beside the base vector (the first block) by :func:`lookalike.encoders.fused.beside_base`."""
    x = joined(cache, blocks)
    if not share:
        return apply(head, x, center)
    h, base = torch.from_numpy(apply(head, x)), torch.from_numpy(block(cache, blocks[0]))
    return beside_base(h, base, torch.from_numpy(center), share).numpy()


def leave_one_hospital_out(caches: dict[str, dict[str, Any]], blocks: tuple[str, ...], trained: bool, seed: int,
                           epochs: int = HEAD["epochs"], only_labels: tuple[str, ...] = (),
                           augmented: bool = False, share: float = 0.0, instance: bool = False) -> dict[str, float]:
    """The selection rule: head trained on one hospital's train rows, P@5 of the other's val rows vs its train rows.

    ``only_labels`` keeps only rows of those labels everywhere (a diagnostic; the rule uses every row).
    ``augmented``: the head trains on the near copies' blocks too (:func:`head_input`). ``share`` > 0: served
    beside the base vector (:func:`served`), the head's output centred on its training hospital's train rows.
    ``instance``: the head trains with the instance term (:func:`train_head`).
    """
    def rows(c: dict[str, Any], split: str) -> np.ndarray:
        idx = rows_of(c, (split,))
        return idx[np.isin(c["label"][idx], only_labels)] if only_labels else idx

    out = {}
    for src, dst in (("busi", "bus_bra"), ("bus_bra", "busi")):
        s, d = caches[src], caches[dst]
        xs = head_input(s, blocks, augmented and trained)
        tr = rows(s, "train")
        dv, dt = rows(d, "val"), rows(d, "train")
        xd = joined(d, blocks)
        head = None
        if trained:
            gal = (xd[dt], labels(d, dt), list(d["group"][dt]))
            _, head = train_head(xs[:, tr], labels(s, tr), list(s["group"][tr]), seed, epochs,
                                 (xd[dv], labels(d, dv), list(d["group"][dv])), gal, instance)
        if share:
            v = served(d, blocks, head, apply(head, xs[0, tr]).mean(axis=0), share)
            q, g = v[dv], v[dt]
        else:
            q, g = apply(head, xd[dv]), apply(head, xd[dt])
        out[f"{src}->{dst}"] = p_at_5(q, d["label"][dv], d["group"][dv], g, d["label"][dt], d["group"][dt])["P@5"]
    out["score"] = round(float(np.mean(list(out.values()))), 4)
    return out


def final_head(caches: dict[str, dict[str, Any]], blocks: tuple[str, ...], seed: int,
               epochs: int = HEAD["epochs"], augmented: bool = False, instance: bool = False) -> tuple[Any, np.ndarray]:
    """The head trained on both hospitals' train rows (fixed epochs) and the training images' mean embedding."""
    xs, ys, gs, vs, yv, gv = [], [], [], [], [], []
    for name in TRAIN_SETS:
        c = caches[name]
        x = head_input(c, blocks, augmented)
        tr, va = rows_of(c, ("train",)), rows_of(c, ("val",))
        xs.append(x[:, tr])
        ys.append(labels(c, tr))
        gs += list(c["group"][tr])
        vs.append(x[0, va])
        yv.append(labels(c, va))
        gv += list(c["group"][va])
    x, y = np.concatenate(xs, axis=1), np.concatenate(ys)
    _, head = train_head(x, y, gs, seed, epochs, (np.concatenate(vs), np.concatenate(yv), gv), (x[0], y, gs), instance)
    return head, apply(head, x[0]).mean(axis=0).astype(np.float32)


def near_copies(caches: dict[str, dict[str, Any]], blocks: tuple[str, ...], head: Any,
                center: np.ndarray | None, share: float = 0.0) -> dict[str, float]:
    """Share of each training hospital's ``val`` images whose near copy is their top match (round 6's screen).

    Gallery: the copies of the val images and the hospital's ``train`` images, as ``bench/near_copy.py --split
    val`` has it (its copies are drawn anew; the bench on the served checkpoint decides).
    """
    out = {}
    for name in TRAIN_SETS:
        c = caches[name]
        va, tr = rows_of(c, ("val",)), rows_of(c, ("train",))
        v, n = served(c, blocks, head, center, share), served(noisy_blocks(c), blocks, head, center, share)
        scores = v[va] @ np.concatenate([n[va], v[tr]]).T
        out[name] = round(float((scores.argmax(axis=1) == np.arange(len(va))).mean()), 4)
    return out


def figures(caches: dict[str, dict[str, Any]], blocks: tuple[str, ...], head: Any, center: np.ndarray | None,
            share: float = 0.0) -> dict[str, Any]:
    """Val (val vs train) and test (protocol) figures of one candidate on every cached set, per bus_bra scanner too."""
    out: dict[str, Any] = {"pooled_val": pooled_val(caches, blocks, head, center, share)}
    for name, c in caches.items():
        v = served(c, blocks, head, center, share)
        lab, grp = c["label"], c["group"]
        if name == CROSS_SET:
            q = np.flatnonzero(np.isin(lab, CROSS_DOMAIN_LABELS))
            out[name] = p_at_5(v[q], lab[q], grp[q], v[q], lab[q], grp[q], loo=True)
            continue
        va, tr, te, ga = rows_of(c, ("val",)), rows_of(c, ("train",)), rows_of(c, ("test",)), rows_of(c, ("train", "val"))
        out[f"{name}_val"] = p_at_5(v[va], lab[va], grp[va], v[tr], lab[tr], grp[tr])
        out[name] = p_at_5(v[te], lab[te], grp[te], v[ga], lab[ga], grp[ga])
        for dev in sorted(set(c["device"][te]) - {""}):
            sel = te[c["device"][te] == dev]
            out[f"{name}:{dev}"] = p_at_5(v[sel], lab[sel], grp[sel], v[ga], lab[ga], grp[ga])
    return out


def pooled_val(caches: dict[str, dict[str, Any]], blocks: tuple[str, ...], head: Any,
               center: np.ndarray | None, share: float = 0.0) -> dict[str, float]:
    """P@5 of busi + bus_bra ``val`` rows against busi + bus_bra ``train`` rows (the rule's second test)."""
    vs, ls, gs, sp = [], [], [], []
    for name in TRAIN_SETS:
        c = caches[name]
        vs.append(served(c, blocks, head, center, share))
        ls += list(c["label"])
        gs += [f"{name}/{g}" for g in c["group"]]  # group ids of two hospitals must not collide
        sp += list(c["split"])
    v, lab, grp, split = np.concatenate(vs), np.array(ls), np.array(gs), np.array(sp)
    va, tr = np.flatnonzero(split == "val"), np.flatnonzero(split == "train")
    return p_at_5(v[va], lab[va], grp[va], v[tr], lab[tr], grp[tr])


def round3_decision(report: dict[str, Any], above_shipped: bool = False) -> dict[str, Any]:
    """The rule's tests 1 (LOHO >= best same-split baseline) and 2 (pooled val >= shipped as served) per candidate.

    Test 3 (cost) is the bench's; a candidate that fails 1 or 2 is refused whatever its cost. Round 6 prints its
    near-copy screen beside them (test 4, decided by ``bench/near_copy.py`` on the served checkpoint).
    ``above_shipped`` (round 8): test 1 also asks LOHO >= the shipped encoder's as served, since a candidate that is
    mostly the shipped vector must beat it, not only the baselines.
    """
    shipped = report["shipped_served"]["figures"]["pooled_val"]["P@5"]
    shipped_loho = report["shipped_served"]["loho"]["score"]
    out = {}
    for name, r in report.items():
        if not name.startswith("head_"):
            continue
        side, epochs = side_of(r["blocks"][-1]), epochs_of(name)
        base = {b: report[f"baseline_{b}{side}_e{epochs}"]["loho"]["score"] for b in ("vec", "feat", "vae")
                if f"baseline_{b}{side}_e{epochs}" in report}
        best = max(base.values()) if base else float("nan")
        if above_shipped:
            best = max(best, shipped_loho)
        pv = r["figures"]["pooled_val"]["P@5"]
        out[name] = {"loho": r["loho"]["score"], "best_baseline": best, "pooled_val": pv, "shipped_pooled_val": shipped,
                     "passes_1": bool(base) and r["loho"]["score"] >= best, "passes_2": pv >= shipped}
        out[name]["near_copies"] = r.get("near_copies")
        print(f"[rule] {name:28s} LOHO {r['loho']['score']:.3f} vs baselines {best:.3f}  pooled val {pv:.3f} vs "
              f"shipped {shipped:.3f}  -> {'pass' if out[name]['passes_1'] and out[name]['passes_2'] else 'refused'}"
              f" (before cost; near-copy screen {r.get('near_copies')})", flush=True)
    return out


def seed_mean_decision(reports: dict[int, dict[str, Any]], yardstick: dict[str, float]) -> dict[str, Any]:
    """Round 11's tests 1-2: each candidate's LOHO and pooled val, averaged over the seeds' reports, against the
    shipped encoder's seed means; a one-seed difference under 0.03 says nothing (the US card's seed table)."""
    out = {}
    for name in next(iter(reports.values())):
        loho = [reports[s][name]["loho"]["score"] for s in reports]
        pooled = [reports[s][name]["figures"]["pooled_val"]["P@5"] for s in reports]
        row = {"loho": float(np.mean(loho)), "pooled_val": float(np.mean(pooled)), "loho_by_seed": loho,
               "pooled_val_by_seed": pooled}
        row["passes_1"] = row["loho"] >= yardstick["loho"]
        row["passes_2"] = row["pooled_val"] >= yardstick["pooled_val"]
        out[name] = row
        print(f"[rule] {name:40s} LOHO {row['loho']:.3f} ({' '.join(f'{v:.3f}' for v in loho)}) vs "
              f"{yardstick['loho']:.3f}  pooled val {row['pooled_val']:.3f} vs {yardstick['pooled_val']:.3f}  -> "
              f"{'pass' if row['passes_1'] and row['passes_2'] else 'refused'} (before near copies and cost)", flush=True)
    return out


def load_caches(cache_dir: Path) -> dict[str, dict[str, Any]]:
    """The cached sets, by data set name."""
    return {p.stem: dict(np.load(p)) for p in sorted(cache_dir.glob("*.npz"))}


def select(cache_dir: Path, seed: int = 0, only: list[str] | None = None, loho_labels: tuple[str, ...] = (),
           candidates: dict[str, tuple[tuple[str, ...], bool]] = CANDIDATES) -> dict[str, Any]:
    """Every candidate: selection score (leave one hospital out), final head's val and test figures."""
    caches = load_caches(cache_dir)
    report = {}
    for name, (blocks, trained) in candidates.items():
        if only and name not in only:
            continue
        t0 = time.time()
        aug, share, inst = augmented_of(name), share_of(name), instance_of(name)
        loho = leave_one_hospital_out(caches, blocks, trained, seed, epochs_of(name), loho_labels, aug, share, inst)
        head, center = final_head(caches, blocks, seed, epochs_of(name), aug, inst) if trained else (None, None)
        report[name] = {"blocks": list(blocks), "trained": trained, "augmented": aug, "base_share": share, "instance": inst,
                        "loho": loho, "figures": figures(caches, blocks, head, center, share)}
        if all(f"noisy_{b.replace('vae', 'feat')}" in caches[t] for b in blocks for t in TRAIN_SETS):
            report[name]["near_copies"] = near_copies(caches, blocks, head, center, share)
        f = report[name]["figures"]
        print(f"[select] {name:28s} LOHO {loho['score']:.3f} ({loho['busi->bus_bra']:.3f}/{loho['bus_bra->busi']:.3f})"
              f"  val busi {f['busi_val']['P@5']:.3f} bus_bra {f['bus_bra_val']['P@5']:.3f}  test busi "
              f"{f['busi']['P@5']:.3f} bus_bra {f['bus_bra']['P@5']:.3f} cross {f[CROSS_SET]['P@5']:.3f}"
              f"  pooled val {f['pooled_val']['P@5']:.3f}  near copies {report[name].get('near_copies')}"
              f"  ({time.time() - t0:.0f} s)", flush=True)
    return report


def fit(cache_dir: Path, candidate: str, base_path: Path, out: Path, seed: int = 0,
        finder_path: Path | None = None) -> Path:
    """Write ``candidate`` (a trained one) as a servable ultrasound checkpoint over the base checkpoint.

    The checkpoint carries the finder the cache was made with (``finder_path``, or the base checkpoint's); a
    cache made with another finder is refused, since the head was trained on that finder's crops.
    """
    blocks, trained = ALL_CANDIDATES[candidate]
    if not trained:
        raise ValueError(f"{candidate} has no head to ship")
    caches = load_caches(cache_dir)
    ckpt = base_checkpoint(torch.load(base_path, map_location="cpu", weights_only=True))
    lesion = finder_entry(ckpt, finder_path)
    made_with = {str(c["finder_sha256"]) for c in caches.values() if "finder_sha256" in c}
    if made_with and made_with != {state_sha256(lesion)}:
        raise ValueError(f"{cache_dir} was made with another lesion finder than {finder_path or base_path}")
    aug, share, inst = augmented_of(candidate), share_of(candidate), instance_of(candidate)
    head, center = final_head(caches, blocks, seed, epochs_of(candidate), aug, inst)
    kinds = {b.rstrip("0123456789") for b in blocks}
    base_input = "vector" if "vec" in kinds else ("features" if {"feat", "vae"} & kinds else "none")
    im = [b for b in blocks if b.startswith(("crop", "blur", "whole"))]
    sizes = {side_of(b) for b in im}
    sigma = float(caches[TRAIN_SETS[0]]["blur_sigma"]) if "blur" in kinds else 0.0
    # round 3 on: views made at the blocks' side S (round 1 made them at VIEW_SIZE whatever the ImageNet side)
    view_size = side_of(blocks[0]) if candidate not in CANDIDATES else VIEW_SIZE
    if len(sizes) > 1:
        raise ValueError("one ImageNet side per encoder")
    base_arch = dict(ckpt["arch"])
    if "vae" in kinds:
        base_arch["features"] = ["h", "z"]
    views = tuple("lesion" if b.startswith(("crop", "blur")) else "whole" for b in im)
    arch = fused_arch(base_arch, base_input, views, sizes.pop() if sizes else view_size, view_size,
                      HEAD["dim"], HEAD["hidden"], sigma)
    if share:  # the head's centre is applied inside, before the base vector joins it; nothing centres after
        arch.update(dim=HEAD["dim"] + int(base_arch["dim"]), head_dim=HEAD["dim"], base_share=share,
                    head_center=[float(v) for v in center], center=None)
    else:
        arch["center"] = [float(v) for v in center]
    net = FusedUltrasoundNet(arch)
    if "vae" in kinds:  # the base head is not used (features only): keep the trunk's weights
        state = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("head.")}
        net.base.load_state_dict(state, strict=False)
    else:
        load_base(net, ckpt)
    net.head.load_state_dict(head.state_dict())
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("base.vae.decoder.")}
    meta = {"candidate": candidate, "blocks": list(blocks),
            "head": {**HEAD, "epochs": epochs_of(candidate), **(INSTANCE if inst else {})},
            "augmented": aug, "base_share": share, "seed": seed, "base": f"{base_path.name} sha256 {file_sha256(base_path)[:8]}",
            "command": run_command(None), "torch": torch.__version__,
            "figures": figures(caches, blocks, head, center, share)}
    return save_checkpoint(out, arch, state, meta, lesion=lesion)


def main(argv: list[str] | None = None) -> int:
    """CLI: ``cache``, ``select``, ``fit`` (module docstring)."""
    p = argparse.ArgumentParser(prog="python -m lookalike.lab.training_fused", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cache")
    c.add_argument("--data", nargs="+", type=Path, required=True)
    c.add_argument("--cache", type=Path, required=True)
    c.add_argument("--round3", action="store_true", help="round 3's blocks: views at 128 and 160 px, one finder pass")
    c.add_argument("--blur", type=float, default=0.0, help="with --round3: also the crop smoothed by this sigma (px)")
    c.add_argument("--noisy-seed", type=int, help="with --round3: also every block of a near copy of each image")
    c.add_argument("--finder", type=Path, help="with --round3: this lesion finder (train-lesions) instead of --base's")
    s = sub.add_parser("select")
    s.add_argument("--round3", action="store_true", help="round 3's candidates and the rule's tests 1-2")
    s.add_argument("--round6", action="store_true", help="round 6's candidates, tests 1-2 and the near-copy screen")
    s.add_argument("--round7", action="store_true", help="round 7's candidates (round 6's heads beside the vector)")
    s.add_argument("--round8", action="store_true", help="round 8's candidates (the vector's share 65% and 75%)")
    s.add_argument("--round9", action="store_true", help="round 9's candidates (heads with the instance term)")
    s.add_argument("--round10", action="store_true", help="round 9's candidates on a retrained finder's blocks")
    s.add_argument("--round11", action="store_true",
                   help="round 10's passing heads on a steady finder's blocks, each over seeds 0-2 (--seed is ignored)")
    s.add_argument("--against", nargs=2, metavar=("REPORT", "CANDIDATE"),
                   help="the shipped encoder's row in an earlier select report: the LOHO and pooled val to beat")
    s.add_argument("--cache", type=Path, required=True)
    s.add_argument("--only", nargs="*")
    s.add_argument("--out-json", type=Path)
    s.add_argument("--loho-labels", nargs="*", default=[], help="diagnostic: LOHO on rows of these labels only")
    f = sub.add_parser("fit")
    f.add_argument("--cache", type=Path, required=True)
    f.add_argument("--candidate", required=True, choices=sorted(k for k, v in ALL_CANDIDATES.items() if v[1]))
    f.add_argument("--out", type=Path, required=True)
    f.add_argument("--finder", type=Path, help="the lesion finder the cache was made with, when not --base's")
    for q in (c, f):
        q.add_argument("--base", type=Path, default=WEIGHTS_DIR / "us.pt", help="the VAE-diffusion checkpoint")
    for q in (c, s, f):
        q.add_argument("--threads", type=int, default=2)
        q.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.cmd == "select" and a.round10 and not a.against:
        p.error("--round10 needs --against: the shipped encoder's figures come from the report that chose it")
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    if a.cmd == "cache":
        for d in a.data:
            out = a.cache / f"{d.resolve().name}.npz"
            if a.round3:
                cache_set_sides(d, a.base, out, blur=a.blur, noisy_seed=a.noisy_seed, finder_path=a.finder)
            else:
                cache_set(d, a.base, out)
    elif a.cmd == "select" and a.round11:
        reports = {seed: select(a.cache, seed, a.only, tuple(a.loho_labels), ROUND11) for seed in ROUND11_SEEDS}
        rule = seed_mean_decision(reports, ROUND11_YARDSTICK)
        if a.out_json:
            a.out_json.write_text(json.dumps({"seeds": reports, "yardstick": ROUND11_YARDSTICK, "rule": rule}, indent=1))
    elif a.cmd == "select":
        rounds = {"round3": ROUND3, "round6": ROUND6, "round7": ROUND7, "round8": ROUND8, "round9": ROUND9,
                  "round10": ROUND10}
        chosen = [r for r in rounds if getattr(a, r)]  # the latest round named wins
        report = select(a.cache, a.seed, a.only, tuple(a.loho_labels), rounds[chosen[-1]] if chosen else CANDIDATES)
        if a.against:
            report["shipped_served"] = json.loads(Path(a.against[0]).read_text())[a.against[1]]
        if chosen and "shipped_served" in report:
            report["rule"] = round3_decision(report, above_shipped=chosen[-1] in ("round8", "round9", "round10"))
        if a.out_json:
            a.out_json.write_text(json.dumps(report, indent=1))
    else:
        print(fit(a.cache, a.candidate, a.base, a.out, a.seed, a.finder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
