"""Train and choose the fused chest X-ray encoder (:class:`lookalike.encoders.fused.FusedXrayNet`) on cached blocks.

Both branches are frozen (the shipped ViT and EfficientNet-Lite0), so ``cache`` computes every image's blocks once,
by the served network's own :meth:`~lookalike.encoders.fused.FusedXrayNet.blocks` at each side S; ``select`` trains
the heads (the ultrasound recipe of :mod:`lookalike.lab.training_fused`: batch-hard triplet + cross-entropy) and
prints every candidate's figures and the decision of the rule written in ``XR_MODEL_CARD.md`` before the runs;
``fit`` writes a candidate as a checkpoint ``load_encoder`` serves.

    python -m lookalike.lab.training_fused_xr cache --data ../shared/data/kermany_cxr --cache /tmp/xr_fused_cache
    python -m lookalike.lab.training_fused_xr select --cache /tmp/xr_fused_cache --out-json xr_select.json
    python -m lookalike.lab.training_fused_xr fit --cache /tmp/xr_fused_cache --candidate NAME --out xr.pt
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lookalike.encoders.base import WEIGHTS_DIR, file_sha256
from lookalike.encoders.fused import FusedXrayNet, base_checkpoint, fused_xray_arch
from lookalike.encoders.preprocessing import build_preprocess
from lookalike.lab.augment import noisy_copy
from lookalike.lab.images import load_image, read_manifest
from lookalike.lab.training import run_command, save_checkpoint
from lookalike.lab.training_fused import (HEAD, INSTANCE, apply, augmented_of, epochs_of, head_input, instance_of, joined,
                                          labels, noisy_blocks, p_at_5, rows_of, side_of, train_head)

LABELS = {"normal": 0, "pneumonia": 1}
SIDES = (128, 160, 224)

#: Candidate -> (blocks in head order, whether a head is trained). ``vec96`` is the shipped ViT exactly as it serves;
#: ``vecS`` the same ViT on the S px view resized to its side (what the fused network feeds it); ``wholeS`` the
#: ImageNet trunk on the whole image at S.
CANDIDATES: dict[str, tuple[tuple[str, ...], bool]] = {"shipped_served": (("vec96",), False)}
for _s in SIDES:
    CANDIDATES[f"imnet_whole{_s}"] = ((f"whole{_s}",), False)
    CANDIDATES[f"concat_vec{_s}_whole{_s}"] = ((f"vec{_s}", f"whole{_s}"), False)
    CANDIDATES[f"head_whole{_s}_e30"] = ((f"whole{_s}",), True)
    for _e in (10, 30):
        CANDIDATES[f"baseline_vec{_s}_e{_e}"] = ((f"vec{_s}",), True)
        CANDIDATES[f"head_vec{_s}_whole{_s}_e{_e}"] = ((f"vec{_s}", f"whole{_s}"), True)

#: Round 2 (its rule in ``XR_MODEL_CARD.md``, written before its runs): round 1's head at 128 px trained on the
#: near copies' blocks too, with the instance term (``_aug_inst``); round 1's winner and a baseline as yardsticks.
ROUND2: dict[str, tuple[tuple[str, ...], bool]] = {
    "shipped_served": (("vec96",), False),
    "baseline_vec128_e10": (("vec128",), True),
    "head_vec128_whole128_e10": (("vec128", "whole128"), True),
    "head_vec128_whole128_aug_inst_e10": (("vec128", "whole128"), True),
    "head_vec128_whole128_aug_inst_e30": (("vec128", "whole128"), True),
    # ablation, added after the decision and choosing nothing: the ImageNet block alone, same recipe (what the ViT adds)
    "head_whole128_aug_inst_e10": (("whole128",), True),
}
ALL_CANDIDATES = {**CANDIDATES, **ROUND2}

#: The rule's margin over the shipped encoder's val P@5 (590 queries: smaller gains are noise).
MARGIN = 0.01


def load_net(base_path: Path, side: int, hidden: int = 0) -> tuple[FusedXrayNet, dict[str, Any]]:
    """A fused network over the ViT of ``base_path`` (a ViT checkpoint, or a fused one's ViT branch) at ``side``
    (head untrained, or none), and the ViT's checkpoint."""
    ckpt = base_checkpoint(torch.load(base_path, map_location="cpu", weights_only=True))
    net = FusedXrayNet(fused_xray_arch(ckpt["arch"], side, side, HEAD["dim"], hidden))
    net.base.load_state_dict(ckpt["state_dict"])
    return net.eval(), ckpt


def cache_set(data: Path, base_path: Path, out: Path, sides: tuple[int, ...] = SIDES, chunk: int = 64,
              noisy_seed: int | None = None) -> Path:
    """Every block of every image of ``data`` (module ``CANDIDATES``), as the served network computes it.

    ``noisy_seed`` adds ``noisy_<block>`` for every block: the same computation on a near copy of each image
    (:func:`lookalike.lab.augment.noisy_copy`), drawn from that seed and the set's name (round 2).
    """
    nets = {s: load_net(base_path, s)[0] for s in sides}
    vit = nets[sides[0]].base
    served = int(vit.arch["image_size"])
    centre = nets[sides[0]].base_center
    pres = {s: build_preprocess(s) for s in (served, *sides)}
    rng = np.random.default_rng([noisy_seed, zlib.crc32(data.name.encode())]) if noisy_seed is not None else None

    def blocks_of(images: list[np.ndarray]) -> dict[str, torch.Tensor]:
        x = torch.stack([pres[served](im) for im in images])
        v = torch.nn.functional.normalize(vit(x), dim=1)
        got = {f"vec{served}": torch.nn.functional.normalize(v - centre, dim=1)}
        for s in sides:
            vec, whole = nets[s].blocks(torch.stack([pres[s](im) for im in images]))
            got[f"vec{s}"], got[f"whole{s}"] = vec, whole
        return got

    rows = read_manifest(data)
    parts: dict[str, list[np.ndarray]] = {}
    t0 = time.time()
    with torch.no_grad():
        for i in range(0, len(rows), chunk):
            images = [load_image(r["path"], "xr") for r in rows[i : i + chunk]]
            got = blocks_of(images)
            if rng is not None:
                got.update({f"noisy_{k}": v for k, v in blocks_of([noisy_copy(im, rng) for im in images]).items()})
            for k, t in got.items():
                parts.setdefault(k, []).append(t.float().numpy())
            print(f"[cache-xr] {data.name} {min(i + chunk, len(rows))}/{len(rows)} ({time.time() - t0:.0f} s)", flush=True)
    meta = {c: np.array([r.get(c, "") for r in rows]) for c in ("path", "label", "group", "split")}
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **{k: np.concatenate(v) for k, v in parts.items()}, **meta)
    return out


def candidate(cache: dict[str, Any], blocks: tuple[str, ...], trained: bool, seed: int,
              epochs: int, augmented: bool = False, instance: bool = False) -> dict[str, Any]:
    """One candidate: its head on the train rows (fixed epochs, the last kept), val and test figures as served.

    ``augmented``: the head trains on the near copies' blocks too, ``instance`` with the instance term
    (:func:`lookalike.lab.training_fused.train_head`). With near copies in the cache, ``near_copies`` is the share of
    val images whose copy is their top match among the val copies and the train images (round 2's screen).
    """
    x = joined(cache, blocks)
    tr, va, te = rows_of(cache, ("train",)), rows_of(cache, ("val",)), rows_of(cache, ("test",))
    ga = rows_of(cache, ("train", "val"))
    lab, grp = cache["label"], cache["group"]
    head, center = None, None
    if trained:
        xs = head_input(cache, blocks, augmented)
        y = labels(cache, tr, LABELS)
        _, head = train_head(xs[:, tr], y, list(grp[tr]), seed, epochs,
                             (x[va], labels(cache, va, LABELS), list(grp[va])), (x[tr], y, list(grp[tr])), instance)
        center = apply(head, x[tr]).mean(axis=0).astype(np.float32)
    v = apply(head, x, center)
    out = {"head": head, "center": center,
           "val": p_at_5(v[va], lab[va], grp[va], v[tr], lab[tr], grp[tr]),
           "test": p_at_5(v[te], lab[te], grp[te], v[ga], lab[ga], grp[ga])}
    if all(f"noisy_{b}" in cache for b in blocks):
        n = apply(head, joined(noisy_blocks(cache), blocks), center)
        scores = v[va] @ np.concatenate([n[va], v[tr]]).T
        out["near_copies"] = round(float((scores.argmax(axis=1) == np.arange(len(va))).mean()), 4)
    return out


def select(cache_path: Path, seed: int = 0, only: list[str] | None = None,
           candidates: dict[str, tuple[tuple[str, ...], bool]] = CANDIDATES) -> dict[str, Any]:
    """Every candidate's val and test figures, then the rule's test 1 (val P@5 >= shipped + ``MARGIN``)."""
    cache = dict(np.load(cache_path))
    report: dict[str, Any] = {}
    for name, (blocks, trained) in candidates.items():
        if only and name not in only and name != "shipped_served":
            continue
        t0 = time.time()
        torch.manual_seed(seed)
        r = candidate(cache, blocks, trained, seed, epochs_of(name), augmented_of(name), instance_of(name))
        report[name] = {"blocks": list(blocks), "trained": trained, "val": r["val"], "test": r["test"],
                        "near_copies": r.get("near_copies")}
        print(f"[select-xr] {name:26s} val P@5 {r['val']['P@5']:.3f} macro {r['val']['macro-P@5']:.3f}  test P@5 "
              f"{r['test']['P@5']:.3f} macro {r['test']['macro-P@5']:.3f}  near copies {r.get('near_copies')}"
              f"  ({time.time() - t0:.0f} s)", flush=True)
    shipped = report["shipped_served"]["val"]["P@5"]
    for name, r in report.items():
        if name.startswith(("head_vec", "concat_")):
            r["passes_1"] = r["val"]["P@5"] >= shipped + MARGIN
            print(f"[rule-xr] {name:26s} val {r['val']['P@5']:.3f} vs shipped {shipped:.3f} + {MARGIN}: "
                  f"{'pass' if r['passes_1'] else 'refused'} (before cost)", flush=True)
    return report


def fit(cache_path: Path, name: str, base_path: Path, out: Path, seed: int = 0) -> Path:
    """Write candidate ``name`` (a fused one: the ViT's vector and the ImageNet block) as a servable checkpoint."""
    blocks, trained = ALL_CANDIDATES[name]
    if len(blocks) != 2:
        raise ValueError(f"{name} is not a fused candidate (blocks {blocks})")
    side = side_of(blocks[1])
    cache = dict(np.load(cache_path))
    torch.manual_seed(seed)
    aug, inst = augmented_of(name), instance_of(name)
    r = candidate(cache, blocks, trained, seed, epochs_of(name), aug, inst)
    net, ckpt = load_net(base_path, side, HEAD["hidden"] if trained else 0)
    net.arch["center"] = [float(v) for v in r["center"]] if trained else None
    if trained:
        net.head.load_state_dict(r["head"].state_dict())
    meta = {"candidate": name, "blocks": list(blocks), "augmented": aug,
            "head": {**HEAD, "epochs": epochs_of(name), **(INSTANCE if inst else {})} if trained else None,
            "seed": seed, "base": f"{base_path.name} sha256 {file_sha256(base_path)[:8]}", "command": run_command(None), "torch": torch.__version__,
            "figures": {"val": r["val"], "test": r["test"]}}
    return save_checkpoint(out, net.arch, net.state_dict(), meta)


def main(argv: list[str] | None = None) -> int:
    """CLI: ``cache``, ``select``, ``fit`` (module docstring)."""
    p = argparse.ArgumentParser(prog="python -m lookalike.lab.training_fused_xr", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cache")
    c.add_argument("--data", type=Path, required=True)
    c.add_argument("--sides", type=int, nargs="+", default=list(SIDES), help="the ImageNet sides S to cache")
    c.add_argument("--noisy-seed", type=int, help="also every block of a near copy of each image (round 2)")
    s = sub.add_parser("select")
    s.add_argument("--round2", action="store_true", help="round 2's candidates (heads with the instance term)")
    s.add_argument("--only", nargs="*")
    s.add_argument("--out-json", type=Path)
    f = sub.add_parser("fit")
    f.add_argument("--candidate", required=True, choices=sorted(k for k, (b, _) in ALL_CANDIDATES.items() if len(b) == 2))
    f.add_argument("--out", type=Path, required=True)
    for q in (c, s, f):
        q.add_argument("--cache", type=Path, required=True, help="folder of the cached blocks")
        q.add_argument("--base", type=Path, default=WEIGHTS_DIR / "xr.pt", help="the ViT checkpoint")
        q.add_argument("--threads", type=int, default=2)
        q.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    path = a.cache / "kermany_cxr.npz"
    if a.cmd == "cache":
        cache_set(a.data, a.base, path, tuple(a.sides), noisy_seed=a.noisy_seed)
    elif a.cmd == "select":
        report = select(path, a.seed, a.only, ROUND2 if a.round2 else CANDIDATES)
        if a.out_json:
            a.out_json.write_text(json.dumps(report, indent=1))
    else:
        print(fit(path, a.candidate, a.base, a.out, a.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
