"""Orthanc's memory and the first lookup after a restart, with lookups answered by the query service.

A real stack as ``lookalike run`` starts it, without the worker: Redis, Orthanc with the plugin, the query
service. Twelve one-instance US studies are stored in Orthanc with storescu and indexed with synthetic vectors
(each with its real Orthanc ids, so that the REST route finds it); synthetic instances (3 per study, random 128-d
directions) fill the index up to ``--vectors``, written through the project's :class:`IndexStore` (``add_many``
in batches, as a bulk import; then a settled index, as the background merges leave it). The query service is
restarted so that it loads that index as after any restart.

Then, over REST (``GET /lookalike/studies/{id}/similar?limit=10``, round-robin over the real studies):

- Orthanc's resident memory (VmRSS, ``/proc/<pid>/status``) before any lookup, after the first and after 100;
- whether FAISS is mapped in Orthanc's process (``/proc/<pid>/maps``);
- the query service's resident memory, where the index now lives;
- a restart of the query service alone (``Stack.restart``): seconds until it answers again (it loads the index
  before it listens), then the first lookup's round trip, and the median of the next 20.

Goals (issue 12, at 1M vectors): Orthanc grows by < 100 MB; first lookup after a restart < 1 s.

    .venv/bin/python bench/orthanc_memory.py [--vectors 200000]

Writing the index takes minutes (at 1M, more) on 2 cores: the bench writes it at idle priority (SCHED_IDLE for
that step) and measures with the stack at the normal priority it has in production.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from corpus import make_instances  # noqa: E402

from lookalike.index.catalogue import InstanceRecord  # noqa: E402
from lookalike.index.store import IndexStore  # noqa: E402
from lookalike.ops.stack import Stack, StackConfig, storescu  # noqa: E402

DIM = 128
MODEL = "bench-1"
REAL_STUDIES = 12
PER_STUDY = 3
BATCH = 50_000
GOAL_GROWTH_MB = 100.0
GOAL_FIRST_LOOKUP_S = 1.0


def rss_mb(pid: int) -> float:
    """Resident memory of a process (VmRSS), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def faiss_mapped(pid: int) -> bool:
    return "faiss" in Path(f"/proc/{pid}/maps").read_text().lower()


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def fill_index(stack: Stack, real: list[Path], total: int, rng: np.random.Generator) -> list[str]:
    """Catalogue rows for the real studies and synthetic filler up to ``total`` vectors; the real Orthanc study ids."""
    http, url = stack.http(), stack.config.orthanc_url
    records, studies = [], []
    for path in real:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        study = next(x["ID"] for x in http.post(f"{url}/tools/lookup", data=str(ds.StudyInstanceUID)).json()
                     if x["Type"] == "Study")
        [instance] = http.get(f"{url}/studies/{study}/instances").json()
        records.append(InstanceRecord(
            sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
            series_instance_uid=str(ds.SeriesInstanceUID), study_instance_uid=str(ds.StudyInstanceUID),
            patient_id=str(ds.PatientID), study_date=str(ds.StudyDate), modality="US",
            orthanc_instance_id=instance["ID"], orthanc_series_id=instance["ParentSeries"], orthanc_study_id=study,
            encoder="us", model_version=MODEL))
        studies.append(study)
    with IndexStore(stack.config.settings().index_dir, snapshot_every=total + 1) as store:
        store.add_many(records, _unit(rng.standard_normal((len(records), DIM))))
        for start in range(0, total - len(records), BATCH):
            n = min(BATCH, total - len(records) - start)
            batch = [InstanceRecord(
                sop_instance_uid=f"2.25.{j}", sop_class_uid="1.2.840.10008.5.1.4.1.1.6.1",
                series_instance_uid=f"2.25.9{j // PER_STUDY}", study_instance_uid=f"2.25.8{j // PER_STUDY}",
                patient_id=f"S{j // PER_STUDY:07d}", study_date="20240101", modality="US",
                orthanc_instance_id=f"synthetic-instance-{j:07d}",
                orthanc_series_id=f"synthetic-series-{j // PER_STUDY:07d}",
                orthanc_study_id=f"synthetic-study-{j // PER_STUDY:07d}", encoder="us", model_version=MODEL)
                for j in range(start, start + n)]
            store.add_many(batch, _unit(rng.standard_normal((n, DIM))))
            print(f"  {len(records) + start + n} vectors written", flush=True)
        store.flush()
        compact = getattr(store, "compact", None)  # a segmented store merges in the background: settle it
        if compact is not None:
            compact()
    return studies


def lookup(stack: Stack, study: str) -> float:
    """One REST lookup's round trip in seconds (it must answer 200)."""
    started = time.perf_counter()
    r = stack.http().get(f"{stack.config.orthanc_url}/lookalike/studies/{study}/similar?limit=10", timeout=120)
    elapsed = time.perf_counter() - started
    if r.status_code != 200 or len(r.json()["similar"]) != 10:
        raise RuntimeError(f"lookup of {study} answered {r.status_code}: {r.text[:300]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=200_000)
    parser.add_argument("--lookups", type=int, default=100)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        real = make_instances(tmp / "real", REAL_STUDIES, prefix="M")
        with Stack(StackConfig.create(tmp / "stack"), worker=False) as stack:
            if storescu(stack.config, real).returncode != 0:
                raise RuntimeError("storescu failed")
            started = time.perf_counter()
            # The bulk write at idle priority (this thread, and the merge threads it starts); the stack's processes,
            # the query service restarted below included, run at the normal priority they have in production.
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            studies = fill_index(stack, real, args.vectors, rng)
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            print(f"index of {args.vectors} vectors ({DIM}-d) written with IndexStore in "
                  f"{time.perf_counter() - started:.0f} s")
            stack.restart("query-scp", timeout=600)  # loads the index written meanwhile, as after any restart
            orthanc, service = stack.procs["orthanc"].pid, stack.procs["query-scp"].pid
            log = stack.config.logs / "query-scp.log"
            before = rss_mb(orthanc)
            first = lookup(stack, studies[0])
            after_first = rss_mb(orthanc)
            times = [lookup(stack, studies[i % len(studies)]) for i in range(1, args.lookups)]
            after_all = rss_mb(orthanc)
            print(f"Orthanc VmRSS: {before:.0f} MB before any lookup, {after_first:.0f} MB after the first "
                  f"({after_first - before:+.1f} MB), {after_all:.0f} MB after {args.lookups} "
                  f"({after_all - before:+.1f} MB); FAISS mapped in Orthanc: {faiss_mapped(orthanc)}")
            print(f"query service VmRSS (the index lives here): {rss_mb(service):.0f} MB; "
                  f"FAISS mapped there: {faiss_mapped(service)}")
            own = [float(ms) for ms in re.findall(r"REST lookup by .* found in (\d+) ms", log.read_text())]
            print(f"REST lookups (limit 10): first {first * 1000:.0f} ms, then p50 "
                  f"{statistics.median(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms; the query service's own"
                  f" time (search and audit line, its log): first {own[0]:.0f} ms, p50 {statistics.median(own):.0f} ms")
            started = time.perf_counter()
            stack.restart("query-scp", timeout=600)
            ready = time.perf_counter() - started
            first_after = lookup(stack, studies[1])
            next_times = [lookup(stack, studies[i % len(studies)]) for i in range(2, 22)]
            loads = re.findall(r"loaded in ([\d.]+) s", log.read_text())
            print(f"query service restart: answering again after {ready:.1f} s, of which loading the index "
                  f"{loads[-1]} s (its log; loaded before it listens); "
                  f"first REST lookup after it {first_after * 1000:.0f} ms, next 20 p50 "
                  f"{statistics.median(next_times) * 1000:.0f} ms")
            growth = after_all - before
            print(f"goals at {args.vectors} vectors: Orthanc growth {growth:+.1f} MB (< {GOAL_GROWTH_MB:.0f} MB: "
                  f"{'met' if growth < GOAL_GROWTH_MB else 'MISSED'}); first lookup after restart "
                  f"{first_after:.3f} s (< {GOAL_FIRST_LOOKUP_S:.0f} s: "
                  f"{'met' if first_after < GOAL_FIRST_LOOKUP_S else 'MISSED'}); ratios "
                  f"{growth / GOAL_GROWTH_MB:.2f} and {first_after / GOAL_FIRST_LOOKUP_S:.2f} of the goal")


if __name__ == "__main__":
    main()
