"""What ``make run`` shows: the sample studies stored as a modality would, then one lookup and its answer."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

from lookalike.ops.stack import Stack, storescu


def wait_indexed(stack: Stack, expected: int, timeout: float = 300.0) -> dict:
    """Poll ``/lookalike/status`` until ``expected`` instances are indexed or recorded as problems."""
    http = stack.http()
    deadline = time.monotonic() + timeout
    status: dict = {}
    while time.monotonic() < deadline:
        status = http.get(f"{stack.config.orthanc_url}/lookalike/status", timeout=10).json()
        done = sum(c["instances"] for c in status["indexed"]) + len(status["problems"])
        if done >= expected:
            return status
        time.sleep(0.5)
    raise TimeoutError(f"only part of {expected} instances indexed after {timeout:.0f} s: {status}")


def store_samples(stack: Stack, files: list[Path]) -> None:
    print(f"lookalike: storing {len(files)} sample instances with storescu")
    result = storescu(stack.config, files)
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed: {result.stderr[-2000:]}")
    start = time.monotonic()
    status = wait_indexed(stack, len(files))
    counts = ", ".join(f"{c['modality']} {c['instances']} ({c['model_version']})" for c in status["indexed"])
    print(f"lookalike: indexed in {time.monotonic() - start:.1f} s: {counts}")


def sample_labels(index_csv: Path) -> dict[str, str]:
    """Study Instance UID -> the source image's label, kept beside the samples (never inside the DICOM)."""
    if not index_csv.exists():
        return {}
    with index_csv.open(newline="") as f:
        return {row["study_instance_uid"]: row["label"] for row in csv.DictReader(f)}


def label_agreement(answers: dict[str, list[str]], labels: dict[str, str],
                    modality_of: dict[str, str]) -> dict[str, dict[str, float]]:
    """Per modality, how often the studies a lookup answered share the query study's label, beside chance.

    ``answers`` maps a query study (Study Instance UID) to the studies its lookup answered, ``labels`` and
    ``modality_of`` give each sample study's label and modality. ``agreement`` is the share of the answers shown
    (of known label) that share the query's label; ``chance`` the mean, over queries, of the share of the other
    sample studies of the query's modality that do. One lookup can be lucky or not: this is the sample's figure.
    """
    out: dict[str, dict[str, float]] = {}
    for query, answered in answers.items():
        label, modality = labels.get(query), modality_of.get(query)
        if label is None or modality is None:
            continue
        shown = [labels[a] for a in answered if a in labels]
        others = [labels[u] for u in labels if u != query and modality_of.get(u) == modality]
        m = out.setdefault(modality, {"queries": 0, "answers": 0, "same": 0, "chance_sum": 0.0})
        m["queries"] += 1
        m["answers"] += len(shown)
        m["same"] += sum(x == label for x in shown)
        m["chance_sum"] += sum(x == label for x in others) / len(others) if others else 0.0
    return {mod: {"queries": m["queries"], "answers": m["answers"],
                  "agreement": m["same"] / m["answers"] if m["answers"] else float("nan"),
                  "chance": m["chance_sum"] / m["queries"]} for mod, m in sorted(out.items())}


def show_example(stack: Stack, labels: dict[str, str] | None = None) -> None:
    """One lookup over REST, as a PACS viewer would make it, printed with the command that makes it.

    ``labels`` (the samples' ground truth) are printed beside each answer so that the ranking can be judged.
    """
    labels = labels or {}
    http = stack.http()
    url = stack.config.orthanc_url
    studies = http.get(f"{url}/studies?expand", timeout=10).json()
    modalities: dict[str, set[str]] = {s["ID"]: set() for s in studies}
    for series in http.get(f"{url}/series?expand", timeout=30).json():  # one request, not one per study
        modalities.setdefault(series["ParentStudy"], set()).add(series["MainDicomTags"].get("Modality", ""))
    query = next((s for s in studies if "US" in modalities[s["ID"]]),
                 min(studies, key=lambda s: s["MainDicomTags"].get("StudyInstanceUID", "")))
    answer = http.get(f"{url}/lookalike/studies/{query['ID']}/similar?limit=5", timeout=30).json()
    print("\nExample lookup (a US study):")
    print(f"  curl -u admin:PASSWORD {url}/lookalike/studies/{query['ID']}/similar?limit=5")
    tags = query["MainDicomTags"]
    label = labels.get(tags.get("StudyInstanceUID", ""), "?")
    print(f"  query: patient {query['PatientMainDicomTags'].get('PatientID')}, study date {tags.get('StudyDate')}, label {label}")
    for s in answer.get("similar", []):
        print(
            f"  #{s['rank']}  score {s['score']:.4f}  {s['modality']}  {s['study_date']}"
            f"  {'this patient' if s['same_patient'] else 'another patient'}"
            f"  label {labels.get(s['study_instance_uid'], '?'):9s}  study {s['orthanc_study_id']}"
        )
    if "similar" not in answer:
        print("  " + json.dumps(answer))
    if labels:
        show_agreement(stack, studies, modalities, labels)


def show_agreement(stack: Stack, studies: list[dict], modalities: dict[str, set[str]], labels: dict[str, str]) -> None:
    """Every sample study looked up as above, summed up per modality (:func:`label_agreement`); ``modalities``: each
    study's series' modalities by Orthanc id (a sample study holds one)."""
    http, url = stack.http(), stack.config.orthanc_url
    answers: dict[str, list[str]] = {}
    modality_of: dict[str, str] = {}
    for s in studies:
        uid = s["MainDicomTags"].get("StudyInstanceUID", "")
        modality_of[uid] = min(modalities[s["ID"]], default="")
        found = http.get(f"{url}/lookalike/studies/{s['ID']}/similar?limit=5", timeout=30).json()
        answers[uid] = [a["study_instance_uid"] for a in found.get("similar", [])]
    print("\nEvery sample study looked up the same way (top 5; labels from deploy/samples/index.csv):")
    for modality, m in label_agreement(answers, labels, modality_of).items():
        print(f"  {modality}: {m['queries']} queries, {m['answers']} answers shown, {m['agreement']:.2f} of them share "
              f"the query's label (chance {m['chance']:.2f})")
