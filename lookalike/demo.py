"""What ``make run`` shows: the sample studies stored as a modality would, then one lookup and its answer."""

from __future__ import annotations

import json
import time
from pathlib import Path

from lookalike.stack import Stack, storescu


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


def show_example(stack: Stack) -> None:
    """One lookup over REST, as a PACS viewer would make it, printed with the command that makes it."""
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
    print(f"  query: patient {query['PatientMainDicomTags'].get('PatientID')}, study date {query['MainDicomTags'].get('StudyDate')}")
    for s in answer.get("similar", []):
        print(f"  #{s['rank']}  score {s['score']:.3f}  {s['modality']}  {s['study_date']}  patient {s['patient_id']}  study {s['orthanc_study_id']}")
    if "similar" not in answer:
        print("  " + json.dumps(answer))
