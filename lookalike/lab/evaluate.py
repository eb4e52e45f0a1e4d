"""``lookalike evaluate``: retrieval figures of an encoder under ``shared/eval/PROTOCOL.md``, beside their floors.

Two settings, as the protocol defines them:

- **archive** (default): queries are ``split == test``, the gallery is ``split in {train, val}``;
- **cross-domain** (``--cross-domain``): a set the model never trained on, benign/malignant rows only, each
  image querying all the others (leave-one-out).

An archive set whose manifest has a ``device`` column also gets P@k per scanner (``report["per_device"]``).

In both, gallery items of the query's own ``group`` never count. Every encoder figure is printed beside the
chance P@k and the raw-pixel baseline computed on the same queries and gallery, so that it always has its
floor next to it. Images are read by the same function as training and ``lookalike embed``
(:func:`lookalike.lab.images.load_image`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.encoders import load_encoder
from lookalike.lab.embed import ImageReadError, embed_paths, set_torch_threads
from lookalike.lab.metrics import rank_gallery, raw_pixel_embeddings, retrieval_metrics
from lookalike.lab.images import load_image, read_manifest

#: Labels of the cross-domain protocol (the set's few ``normal`` images are left out).
CROSS_DOMAIN_LABELS: tuple[str, ...] = ("benign", "malignant")

#: Metrics printed, in the protocol's order (``{k}`` is the cut-off).
COLUMNS: tuple[str, ...] = ("P@{k}", "R@{k}", "mAP@{k}", "MAR@{k}", "mAP", "AUC", "macro-P@{k}")


@dataclass
class Evaluation:
    """What one evaluation produced: the JSON report and the ranking the figure is drawn from."""

    report: dict[str, Any]
    queries: list[dict[str, str]]
    gallery: list[dict[str, str]]
    sim: np.ndarray
    excluded: np.ndarray
    order: np.ndarray


def protocol_sets(
    rows: list[dict[str, str]], cross_domain: bool
) -> tuple[list[int], list[int], bool]:
    """Indices of the query and gallery rows and whether the query itself must be excluded.

    Raises
    ------
    ValueError
        Missing ``label``/``group``/``split`` columns, or an empty query set or gallery.
    """
    need = ("label", "group") if cross_domain else ("label", "group", "split")
    missing = [c for c in need if rows and c not in rows[0]]
    if missing:
        raise ValueError(f"manifest lacks column(s) {missing} needed by the protocol")
    if cross_domain:
        q = [i for i, r in enumerate(rows) if r["label"] in CROSS_DOMAIN_LABELS]
        g, loo = q, True
    else:
        q = [i for i, r in enumerate(rows) if r["split"] == "test"]
        g, loo = [i for i, r in enumerate(rows) if r["split"] in ("train", "val")], False
    if not q or not g:
        what = f"labels {CROSS_DOMAIN_LABELS}" if cross_domain else "split == test and split in {train, val}"
        raise ValueError(f"no queries or no gallery ({len(q)} and {len(g)} rows with {what})")
    return q, g, loo


def evaluate(
    modality: str, data: str | Path, model: str | Path | None = None, cross_domain: bool = False, k: int = 5
) -> Evaluation:
    """Embed a data set once, rank under the protocol and score the encoder and the raw-pixel floor.

    Parameters
    ----------
    modality : {"us", "xr"}
        Encoder name.
    data : str or Path
        Folder with ``manifest.csv`` (``path,label,group,split``), or the CSV itself.
    model : str or Path, optional
        Checkpoint; default the shipped encoder of ``modality``.
    cross_domain : bool
        Leave-one-out on benign/malignant rows instead of test vs train+val.
    k : int
        Cut-off of the @k metrics.
    """
    enc = load_encoder(modality, model)
    rows = read_manifest(data)
    qi, gi, loo = protocol_sets(rows, cross_domain)
    needed = sorted(set(qi) | set(gi))  # each image read and embedded once, in manifest order
    paths = [rows[i]["path"] for i in needed]
    emb = embed_paths(enc, paths)
    # The protocol's floor is raw pixels of the images as the data set gives them (no crop), read in chunks.
    raw = np.concatenate([
        raw_pixel_embeddings([load_image(p) for p in paths[start : start + 256]]) for start in range(0, len(paths), 256)
    ])
    pos = {row: j for j, row in enumerate(needed)}
    qp = [pos[i] for i in qi]
    gp = [pos[i] for i in gi]
    queries = [rows[i] for i in qi]
    gallery = [rows[i] for i in gi]
    ql, qg = [r["label"] for r in queries], [r["group"] for r in queries]
    gl, gg = [r["label"] for r in gallery], [r["group"] for r in gallery]
    enc_m = retrieval_metrics(emb[qp], ql, qg, emb[gp], gl, gg, k=k, exclude_self=loo)
    raw_m = retrieval_metrics(raw[qp], ql, qg, raw[gp], gl, gg, k=k, exclude_self=loo)
    sim, excluded, order = rank_gallery(emb[qp], qg, emb[gp], gg, exclude_self=loo)
    per_device = None
    if not loo and any(r.get("device") for r in queries):  # archive sets only: query i is gallery i in leave-one-out
        per_device = per_device_table(queries, lambda sel: retrieval_metrics(
            emb[qp][sel], [ql[i] for i in sel], [qg[i] for i in sel], emb[gp], gl, gg, k=k
        ), k)
    report: dict[str, Any] = {
        "modality": modality,
        "model": str(Path(model).resolve()) if model else "shipped",
        "model_version": enc.model_version,
        "data": str(Path(data).resolve()),
        "protocol": "cross-domain leave-one-out, benign/malignant" if cross_domain else "archive: test vs train+val",
        "k": k,
        "n_queries": len(queries),
        "n_gallery": len(gallery),
        "labels": sorted(set(ql) | set(gl)),
        "encoder": enc_m,
        "raw_pixels": raw_m,
        f"chance-P@{k}": enc_m[f"chance-P@{k}"],
    }
    if per_device is not None:
        report["per_device"] = per_device
    return Evaluation(report, queries, gallery, sim, excluded, order)


def per_device_table(queries: list[dict[str, str]], score: Any, k: int = 5) -> list[dict[str, Any]]:
    """P@k and macro-P@k of the queries of each scanner (manifest column ``device``), against the whole gallery.

    One row per device among the queries, in order of first appearance; queries without a device are one row
    named ``""``. One scanner carrying the average is not generalisation: this table shows it.

    Parameters
    ----------
    queries : list of dict
        The query rows, in the order ``score`` indexes them.
    score : callable
        ``score(indices)`` -> :func:`~lookalike.lab.metrics.retrieval_metrics` of those queries.
    """
    by_device: dict[str, list[int]] = {}
    for i, r in enumerate(queries):
        by_device.setdefault(r.get("device", ""), []).append(i)
    rows = []
    for device, sel in by_device.items():
        m = score(sel)
        rows.append({"device": device, "n_queries": len(sel), f"P@{k}": m[f"P@{k}"], f"macro-P@{k}": m[f"macro-P@{k}"]})
    return rows


def figure_queries(labels: list[str], n: int) -> list[int]:
    """A handful of query indices spread over the labels (round-robin by label, evenly spaced within one)."""
    by_label: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        by_label.setdefault(lab, []).append(i)
    per = {lab: idx for lab, idx in sorted(by_label.items())}
    quota = {lab: 0 for lab in per}
    left = min(n, len(labels))
    while left:
        for lab in per:
            if left and quota[lab] < len(per[lab]):
                quota[lab] += 1
                left -= 1
    picks: list[int] = []
    for lab, idx in per.items():
        if quota[lab]:
            picks += [idx[int(j)] for j in np.linspace(0, len(idx) - 1, quota[lab]).round().astype(int)]
    return picks


def save_figure(ev: Evaluation, path: str | Path, n_rows: int = 6) -> Path:
    """Draw a handful of queries, each with its top k (label and cosine; green = same label), as PNG.

    The neighbours are exactly those scored (same ranking, same exclusions).
    """
    import matplotlib  # matplotlib only for --out-png: evaluations without a figure stay light

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = ev.report["k"]
    picks = figure_queries([r["label"] for r in ev.queries], n_rows)
    fig, axes = plt.subplots(len(picks), k + 1, figsize=(1.9 * (k + 1), 2.05 * len(picks)), squeeze=False)
    for row, qi in enumerate(picks):
        q = ev.queries[qi]
        cells = [(q, f"query\n{q['label']}", "black")]
        for j in ev.order[qi, :k]:
            if ev.excluded[qi, j]:
                break
            g = ev.gallery[j]
            colour = "tab:green" if g["label"] == q["label"] else "tab:red"
            cells.append((g, f"{g['label']}\n{ev.sim[qi, j]:.4f}", colour))
        for col, ax in enumerate(axes[row]):
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(cells):
                ax.axis("off")
                continue
            item, title, colour = cells[col]
            ax.imshow(load_image(item["path"], ev.report["modality"]), cmap="gray", vmin=0.0, vmax=1.0, aspect="auto")
            ax.set_title(title, fontsize=8, color=colour)
            for side in ax.spines.values():
                side.set_edgecolor(colour)
                side.set_linewidth(2.5 if col else 1.0)
    r = ev.report
    fig.suptitle(
        f"{r['model_version']} — {r['protocol']} — P@{k} {r['encoder'][f'P@{k}']:.3f} "
        f"(raw pixels {r['raw_pixels'][f'P@{k}']:.3f}, chance {r[f'chance-P@{k}']:.3f})",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, format="png")
    plt.close(fig)
    return path


def format_table(report: dict[str, Any]) -> str:
    """The report as a small text table: encoder, raw pixels, chance."""
    k = report["k"]
    cols = [c.format(k=k) for c in COLUMNS]
    lines = [
        f"{report['model_version']}  {report['protocol']}  {report['n_queries']} queries x {report['n_gallery']} gallery",
        f"{'':12s}" + "".join(f"{c:>12s}" for c in cols),
    ]
    for name in ("encoder", "raw_pixels"):
        lines.append(f"{name:12s}" + "".join(f"{report[name][c]:12.3f}" for c in cols))
    lines.append(f"{'chance':12s}{report[f'chance-P@{k}']:12.3f}")
    if report.get("per_device"):
        lines.append(f"{'device':32s}{'queries':>10s}{f'P@{k}':>12s}{f'macro-P@{k}':>12s}")
        for row in report["per_device"]:
            lines.append(f"{row['device'][:32]:32s}{row['n_queries']:10d}{row[f'P@{k}']:12.3f}{row[f'macro-P@{k}']:12.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``lookalike evaluate --modality us|xr [--model FILE] --data DIR [--cross-domain] [--out-json F] [--out-png F]``.

    Exit status 0 on success, 1 when the data, the model or an image cannot be read, 2 on bad arguments.
    """
    p = argparse.ArgumentParser(
        prog="lookalike evaluate",
        description="Retrieval figures of an encoder under shared/eval/PROTOCOL.md, beside chance and raw pixels.",
    )
    p.add_argument("--modality", choices=["us", "xr"], required=True)
    p.add_argument("--model", type=Path, default=None, help="checkpoint (default: the shipped encoder)")
    p.add_argument("--data", type=Path, required=True, help="folder with manifest.csv (path,label,group,split)")
    p.add_argument("--cross-domain", action="store_true", help="leave-one-out on benign/malignant rows")
    p.add_argument("--k", type=int, default=5, help="cut-off of the @k metrics (protocol: 5)")
    p.add_argument("--out-json", type=Path, default=None, help="write the report here")
    p.add_argument("--out-png", type=Path, default=None, help="write a figure of queries and their top k here")
    p.add_argument("--rows", type=int, default=6, help="queries in the figure")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    a = p.parse_args(argv)
    if a.k < 1 or a.rows < 1:
        p.error("--k and --rows must be >= 1")
    try:
        set_torch_threads(a.threads)
        ev = evaluate(a.modality, a.data, a.model, a.cross_domain, a.k)
        ev.report["command"] = " ".join(["lookalike evaluate", *(argv if argv is not None else sys.argv[1:])])
        if a.out_png:
            ev.report["figure"] = str(save_figure(ev, a.out_png, a.rows))
    except (OSError, ValueError, ImageReadError) as exc:
        print(f"lookalike evaluate: {exc}", file=sys.stderr)
        return 1
    print(format_table(ev.report))
    if a.out_json:
        a.out_json.parent.mkdir(parents=True, exist_ok=True)
        a.out_json.write_text(json.dumps(ev.report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
