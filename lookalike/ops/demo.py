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


def show_example(stack: Stack, labels: dict[str, str] | None = None) -> None:
    """One lookup over REST, as a PACS viewer would make it, printed with the command that makes it.

    ``labels`` (the samples' ground truth) are printed beside each answer so that the ranking can be judged.
    """
    labels = labels or {}
    http = stack.http()
    url = stack.config.orthanc_url
    studies = http.get(f"{url}/studies?expand", timeout=10).json()
    query = sorted(studies, key=lambda s: s["MainDicomTags"].get("StudyInstanceUID", ""))[0]
    for s in studies:
        series = http.get(f"{url}/studies/{s['ID']}/series", timeout=10).json()
        if any(x["MainDicomTags"].get("Modality") == "US" for x in series):
            query = s
            break
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
