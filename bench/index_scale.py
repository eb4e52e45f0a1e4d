"""The index at archive scale, through the product's own path: :class:`IndexStore` writes, ``similar_studies`` reads.

For each size: a fresh index folder is filled with synthetic vectors (``--dim``; by default the shipped
ultrasound encoder's, read from its checkpoint: 256 now; the X-ray encoder's is 128), 3 instances per study, in batches of
50,000 through ``IndexStore.add_many`` (a bulk import), and the writer closes (which settles the index: what a
reader finds after a back-fill). Then, at that size:

- add: ``store.add`` of single new instances as the worker writes them (``snapshot_every=200``, the worker's
  setting, so saves fall among them), p50 and max per instance; delete likewise;
- index bytes written per change during those adds and deletes (every file the saves and merges wrote);
- lookup: ``similar_studies(limit=10)`` of random 3-instance studies in a reader (``readonly=True``), p50/p95/p99;
- recall@10: the ten studies found against those of the same lookup with exact search (``ann_above=None``), and
  instance-level recall@10 of ``store.search`` against exact;
- memory: index and catalogue bytes on disk per vector, the reader's resident memory (the query service's) and
  its growth per vector, and all of it projected to 10 million vectors;
- cold start: a fresh reader process opening the index and answering its first lookup (and its imports apart);
  a fresh writer process's first add. The files were just written, so they are in the page cache.

Data: study centres drawn around 2,000 cluster centres in a 16-d latent space, mapped to ``--dim`` by a fixed random
projection plus isotropic noise (low intrinsic dimension, as real embeddings); a study's 3 instances scatter
around its centre.

    .venv/bin/python bench/index_scale.py [--sizes 10000,100000,1000000] [--queries 200] [--storage fp16] [--dim 128]

``--storage fp16``: segments store half-precision vectors (``IndexParams.storage``); recall@10 is still measured
against exact float32 search, so the table shows what half precision costs.

Runs for minutes at 1M on 2 cores (most of it the HNSW graphs of the compaction); run it at idle priority.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lookalike.index import segments
from lookalike.index.catalogue import InstanceRecord
from lookalike.index.search import similar_studies
from lookalike.index.segments import IndexParams, Manifest, Segment
from lookalike.index.store import IndexStore

PER_STUDY = 3
SNAPSHOT_EVERY = 200  # lookalike.worker.tasks.SNAPSHOT_EVERY, the worker's
FILL_BATCH = 50_000
GOALS = {"add_p50_ms": 2.0, "lookup_p95_ms": 20.0, "recall10": 0.95, "cold_start_s": 1.0}
PROJECTED = 10_000_000  # issue 20: the archive one machine should hold


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def record(i: int) -> InstanceRecord:
    study = i // PER_STUDY
    return InstanceRecord(
        sop_instance_uid=f"2.25.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.6.1",
        series_instance_uid=f"2.25.{study}.1", study_instance_uid=f"2.25.{study}", patient_id=f"P{study % 50_000}",
        study_date="20240101", modality="US", orthanc_instance_id=f"i{i}", orthanc_series_id=f"se{study}",
        orthanc_study_id=f"st{study}", encoder="us", model_version="bench")


class Data:
    """Clustered study vectors, made in chunks so that 1M of them never sit in memory twice."""

    def __init__(self, dim: int, seed: int = 0, clusters: int = 2000, latent: int = 16) -> None:
        rng = np.random.default_rng(seed)
        self.dim = dim
        self.centres = rng.standard_normal((clusters, latent)).astype(np.float32)
        self.projection = rng.standard_normal((latent, dim)).astype(np.float32) / np.sqrt(latent)
        self.seed = seed

    def vectors(self, start: int, stop: int) -> np.ndarray:
        """Instances ``start..stop`` (a multiple of 3 apart from study boundaries), the same for the same range."""
        first, last = start // PER_STUDY, (stop - 1) // PER_STUDY + 1
        rng = np.random.default_rng([self.seed, first, last])
        n_studies = last - first
        cluster = rng.integers(0, len(self.centres), n_studies)
        study_latent = self.centres[cluster] + 0.45 * rng.standard_normal((n_studies, self.centres.shape[1]))
        study_vec = study_latent @ self.projection
        inst = np.repeat(study_vec, PER_STUDY, axis=0) + 0.25 * rng.standard_normal((n_studies * PER_STUDY, self.dim))
        inst += 0.15 * rng.standard_normal(inst.shape)
        out = inst[start - first * PER_STUDY: stop - first * PER_STUDY].astype(np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


class WriteCounter:
    """Counts the bytes of every index file the store writes (segments, deletion lists, manifests)."""

    def __init__(self) -> None:
        self.bytes = 0
        original = segments.atomic_write

        def counting(path, write):
            original(path, write)
            self.bytes += Path(path).stat().st_size

        segments.atomic_write = counting


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def layout(store: IndexStore) -> str:
    folder = store.index_path("us", "bench")
    manifest = Manifest.read(folder, ("us", "bench"))
    parts = [Segment.open(folder, e.name, e.count) for e in manifest.segments]
    graphs = sorted((s.count for s in parts if s.graph), reverse=True)
    flat = [s.count for s in parts if not s.graph]
    files = sum(1 for p in folder.iterdir() if p.is_file())
    return f"{len(parts)} segments ({files} files): HNSW {graphs}, flat {len(flat)} holding {sum(flat)}"


def catalogue_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("catalogue.sqlite*"))


COLD = """
import sys, time, json
t0 = time.perf_counter()
from lookalike.index.store import IndexStore
from lookalike.index.search import similar_studies
t1 = time.perf_counter()
store = IndexStore(sys.argv[1], readonly=True)
answer = similar_studies(store, sys.argv[2], limit=10)
t2 = time.perf_counter()
print(json.dumps({"imports_s": t1 - t0, "open_and_first_lookup_s": t2 - t1, "answers": len(answer)}))
"""

WRITER = """
import sys
sys.path.insert(0, sys.argv[4])
from index_scale import Data, record
from lookalike.index.store import IndexStore
first, count = int(sys.argv[2]), int(sys.argv[3])
vectors = Data(int(sys.argv[5]), seed=7).vectors(first, first + count)
with IndexStore(sys.argv[1], snapshot_every=200) as store:
    for j in range(count):
        store.add(record(first + j), vectors[j])
"""

COLD_WRITER = """
import sys, time, json
import numpy as np
from lookalike.index.catalogue import InstanceRecord
from lookalike.index.store import IndexStore
r = InstanceRecord(*(["2.25.cold"] + ["x"] * 9 + ["us", "bench"]))
t1 = time.perf_counter()
store = IndexStore(sys.argv[1], snapshot_every=200, background_compaction=False)
store.add(r, np.ones(int(sys.argv[2]), dtype=np.float32))
t2 = time.perf_counter()
store.delete_instance("x")
store.close()
print(json.dumps({"open_and_first_add_s": t2 - t1}))
"""


def progress(n: int, text: str) -> None:
    """One line per finished phase on stderr: at 10M a phase takes many minutes, and a stopped run still tells."""
    print(f"[{n:,}] {text} ({time.strftime('%H:%M:%S')}, RSS {rss_bytes() / 1024 ** 3:.1f} GiB)", file=sys.stderr,
          flush=True)


def run_size(n: int, dim: int, queries: int, base: Path, counter: WriteCounter, params: IndexParams) -> dict:
    folder = base / f"n{n}"
    data = Data(dim)
    result: dict = {"n": n}
    store = IndexStore(folder, snapshot_every=SNAPSHOT_EVERY, params=params)
    t = time.perf_counter()
    for start in range(0, n, FILL_BATCH):
        stop = min(n, start + FILL_BATCH)
        store.add_many([record(i) for i in range(start, stop)], data.vectors(start, stop))
    result["fill_s"] = time.perf_counter() - t
    progress(n, f"filled in {result['fill_s']:.0f} s")
    t = time.perf_counter()
    store.close()  # as a back-fill's writer stops: it settles the index before it returns
    result["compaction_s"] = time.perf_counter() - t
    result["layout_after_fill"] = layout(store)
    progress(n, f"settled in {result['compaction_s']:.0f} s: {result['layout_after_fill']}")
    store = IndexStore(folder, snapshot_every=SNAPSHOT_EVERY, params=params)
    result["merges_left"] = store.compact(settle=True)  # what `lookalike compact` would still find: 0

    # Adds and deletes as the worker makes them, one instance at a time.
    written_before = counter.bytes
    extra = data.vectors(n, n + 300)
    add_ms = []
    for j in range(300):
        t = time.perf_counter()
        store.add(record(n + j), extra[j])
        add_ms.append((time.perf_counter() - t) * 1000)
    batch_ms = []  # per instance, in batches of 32: the batched worker's write
    extra = data.vectors(n + 300, n + 300 + 32 * 20)
    for b in range(20):
        rows = range(n + 300 + 32 * b, n + 300 + 32 * (b + 1))
        t = time.perf_counter()
        store.add_many([record(i) for i in rows], extra[32 * b: 32 * (b + 1)])
        batch_ms.append((time.perf_counter() - t) * 1000 / 32)
    rng = np.random.default_rng(1)
    delete_ms = []
    for i in rng.choice(n, 100, replace=False):
        t = time.perf_counter()
        store.delete_instance(f"i{i}")
        delete_ms.append((time.perf_counter() - t) * 1000)
    store.flush()
    result["add_ms"] = (statistics.median(add_ms), max(add_ms))
    result["delete_ms"] = (statistics.median(delete_ms), max(delete_ms))
    result["batch_ms"] = (statistics.median(batch_ms), max(batch_ms))
    result["bytes_per_change"] = (counter.bytes - written_before) / (400 + 32 * 20)
    fsync_ms = []
    with open(folder / "fsync-probe", "wb") as probe:  # what one durable catalogue commit costs at least, here
        for _ in range(20):
            probe.write(b"x" * 4096)
            t = time.perf_counter()
            os.fsync(probe.fileno())
            fsync_ms.append((time.perf_counter() - t) * 1000)
    result["fsync_ms"] = statistics.median(fsync_ms)
    progress(n, f"single adds p50 {result['add_ms'][0]:.2f} ms, add_many of 32 per instance p50 "
                f"{result['batch_ms'][0]:.2f} ms, deletes p50 {result['delete_ms'][0]:.2f} ms")
    store.close()  # settles the adds' small segments
    result["layout_for_lookups"] = layout(store)

    # Lookups in a reader, as the query service makes them.
    rss0 = rss_bytes()
    reader = IndexStore(folder, readonly=True, params=params)
    studies = [f"st{s}" for s in rng.choice(n // PER_STUDY, queries, replace=False)]
    similar_studies(reader, studies[0], limit=10)
    searches = []
    search = reader.search

    def counted(*args, **kwargs):  # how many index searches a lookup needed (it deepens k when unsure)
        searches.append(1)
        return search(*args, **kwargs)

    reader.search = counted
    lookup_ms, cpu_ms, answers = [], [], {}
    load_before = os.getloadavg()[0]
    for study in studies:
        t, c = time.perf_counter(), time.thread_time()
        answers[study] = [s.orthanc_study_id for s in similar_studies(reader, study, limit=10)]
        lookup_ms.append((time.perf_counter() - t) * 1000)
        cpu_ms.append((time.thread_time() - c) * 1000)
    result["lookup_ms"] = (statistics.median(lookup_ms), percentile(lookup_ms, 0.95), percentile(lookup_ms, 0.99))
    result["lookup_cpu_ms"] = (statistics.median(cpu_ms), percentile(cpu_ms, 0.95), percentile(cpu_ms, 0.99))
    result["searches_per_lookup"] = len(searches) / len(studies)
    warm_ms, warm_cpu_ms = [], []  # the same studies again: what a long-running reader sees once its pages are warm
    for study in studies:
        t, c = time.perf_counter(), time.thread_time()
        similar_studies(reader, study, limit=10)
        warm_ms.append((time.perf_counter() - t) * 1000)
        warm_cpu_ms.append((time.thread_time() - c) * 1000)
    result["warm_ms"] = (percentile(warm_ms, 0.5), percentile(warm_ms, 0.95), percentile(warm_cpu_ms, 0.5),
                         percentile(warm_cpu_ms, 0.95))
    result["load"] = (load_before, os.getloadavg()[0])
    reader.search = search
    result["reader_rss_per_vector"] = (rss_bytes() - rss0) / n
    result["reader_rss"] = rss_bytes()
    result["disk_per_vector"] = folder_bytes(store.index_path("us", "bench")) / n
    result["catalogue_per_vector"] = catalogue_bytes(folder) / n
    progress(n, f"lookups of a fresh reader p50/p95 {result['lookup_ms'][0]:.1f}/{result['lookup_ms'][1]:.1f} ms, warm "
                f"p95 {result['warm_ms'][1]:.1f} ms; reader RSS {result['reader_rss'] / 1024 ** 3:.2f} GiB")

    exact = IndexStore(folder, readonly=True, params=IndexParams(ann_above=None))
    checked = studies[: min(100, queries)]
    result["recall10_studies"] = float(np.mean([
        len(set(answers[s]) & {x.orthanc_study_id for x in similar_studies(exact, s, limit=10)}) / 10
        for s in checked]))
    instance_queries = data.vectors(0, 3 * len(checked))[::3] + 0.0
    _, ann_ids = reader.search("us", "bench", instance_queries, 10)
    _, exact_ids = exact.search("us", "bench", instance_queries, 10)
    result["recall10_instances"] = float(np.mean([len(set(a) & set(e)) / 10
                                                  for a, e in zip(ann_ids.tolist(), exact_ids.tolist())]))
    exact.close()
    progress(n, f"recall@10 studies {result['recall10_studies']:.3f}, instances {result['recall10_instances']:.3f}")

    # Lookups while a worker process adds instances one at a time (saves every 200, merges in the background).
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(folder), str(n + 10_000), "1500",
                               str(Path(__file__).resolve().parent), str(dim)])
    busy_ms = []
    while writer.poll() is None and len(busy_ms) < 5 * queries:
        study = studies[len(busy_ms) % len(studies)]
        t = time.perf_counter()
        similar_studies(reader, study, limit=10)
        busy_ms.append((time.perf_counter() - t) * 1000)
    writer.wait()
    result["busy_lookup_ms"] = (statistics.median(busy_ms), percentile(busy_ms, 0.95), len(busy_ms))
    reader.close()

    cold = subprocess.run([sys.executable, "-c", COLD, str(folder), studies[1]], capture_output=True, text=True,
                          check=True)
    result["cold"] = json.loads(cold.stdout)
    cold = subprocess.run([sys.executable, "-c", COLD_WRITER, str(folder), str(dim)], capture_output=True, text=True,
                          check=True)
    result["cold_writer"] = json.loads(cold.stdout)
    return result


def shipped_dim(encoder: str = "us") -> int:
    """The shipped encoder's vector size, from its checkpoint, read in a child process: torch stays out of this one,
    whose resident memory is the reader's figure."""
    code = ("import sys, torch; from lookalike.encoders.shipped import shipped_path; "
            "print(torch.load(shipped_path(sys.argv[1]), map_location='cpu', weights_only=True)['arch']['dim'])")
    return int(subprocess.run([sys.executable, "-c", code, encoder], capture_output=True, text=True,
                              check=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--dir", default=None, help="folder for the indexes (default: a temporary one)")
    parser.add_argument("--storage", default="fp32", choices=("fp32", "fp16"), help="how segments store vectors")
    parser.add_argument("--dim", type=int, default=None, help="vector dimension (default: the shipped US encoder's)")
    args = parser.parse_args()
    dim = args.dim or shipped_dim()
    params = IndexParams(storage=args.storage)
    counter = WriteCounter()
    sizes = [int(s) for s in args.sizes.split(",")]
    results = []
    with tempfile.TemporaryDirectory(dir=args.dir) as base:
        for n in sizes:
            r = run_size(n, dim, args.queries, Path(base), counter, params)
            results.append(r)
            print(f"n={n}: filled in {r['fill_s']:.0f} s, the writer's close (settling) {r['compaction_s']:.0f} s: "
                  f"{r['layout_after_fill']}; merges `lookalike compact` found left: {r['merges_left']}; "
                  f"layout the lookups read: {r['layout_for_lookups']}", flush=True)
    print(f"\nIndexStore + similar_studies, {dim}-d, {PER_STUDY} instances per study, exact below "
          f"{params.ann_above} vectors, HNSW M={params.hnsw_m} efSearch={params.ef_search} above, {params.storage} vectors; "
          f"{os.cpu_count()} CPUs")
    print("| vectors | add p50 / max ms (fsync alone) | add_many of 32, per instance p50 / max ms | delete p50 / "
          "max ms | index bytes written per change | lookup p50 / p95 / p99 ms, wall | same, CPU time | index "
          "searches per lookup | load average | same studies again, p50 / p95 ms wall, CPU | lookup while a worker "
          "adds p50 / p95 ms (n) | recall@10 studies / instances | disk B per vector | reader RSS B per vector | "
          "cold reader: imports + open & first lookup s | cold writer: open & first add s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['n']:,} | {r['add_ms'][0]:.2f} / {r['add_ms'][1]:.0f} ({r['fsync_ms']:.2f}) | "
              f"{r['batch_ms'][0]:.2f} / {r['batch_ms'][1]:.2f} | {r['delete_ms'][0]:.2f} / "
              f"{r['delete_ms'][1]:.0f} | {r['bytes_per_change']:.0f} | "
              f"{' / '.join(f'{x:.1f}' for x in r['lookup_ms'])} | "
              f"{' / '.join(f'{x:.1f}' for x in r['lookup_cpu_ms'])} | {r['searches_per_lookup']:.2f} | "
              f"{r['load'][0]:.1f} - {r['load'][1]:.1f} | {r['warm_ms'][0]:.1f} / {r['warm_ms'][1]:.1f}, "
              f"{r['warm_ms'][2]:.1f} / {r['warm_ms'][3]:.1f} | {r['busy_lookup_ms'][0]:.1f} / "
              f"{r['busy_lookup_ms'][1]:.1f} ({r['busy_lookup_ms'][2]}) | {r['recall10_studies']:.3f} / "
              f"{r['recall10_instances']:.3f} | {r['disk_per_vector']:.0f} | {r['reader_rss_per_vector']:.0f} | "
              f"{r['cold']['imports_s']:.2f} + {r['cold']['open_and_first_lookup_s']:.2f} | "
              f"{r['cold_writer']['open_and_first_add_s']:.2f} |")
    largest, smallest = results[-1], results[0]
    print(f"\nGoals at {largest['n']:,} vectors (measured / goal; <= 1 meets an upper bound, >= 1 a lower one):")
    print(f"  add p50 {largest['add_ms'][0]:.2f} ms / {GOALS['add_p50_ms']} ms = "
          f"{largest['add_ms'][0] / GOALS['add_p50_ms']:.2f} (one durable catalogue commit each: an fsync "
          f"{largest['fsync_ms']:.2f} ms here)")
    print(f"  add_many of 32, per instance p50 {largest['batch_ms'][0]:.2f} ms / {GOALS['add_p50_ms']} ms = "
          f"{largest['batch_ms'][0] / GOALS['add_p50_ms']:.2f}")
    print(f"  lookup p95 {largest['lookup_ms'][1]:.1f} ms / {GOALS['lookup_p95_ms']} ms = "
          f"{largest['lookup_ms'][1] / GOALS['lookup_p95_ms']:.2f} (wall time, with {largest['load'][0]:.1f} - "
          f"{largest['load'][1]:.1f} runnable tasks on {os.cpu_count()} CPUs)")
    print(f"  lookup p95 in CPU time {largest['lookup_cpu_ms'][1]:.1f} ms / {GOALS['lookup_p95_ms']} ms = "
          f"{largest['lookup_cpu_ms'][1] / GOALS['lookup_p95_ms']:.2f}")
    print(f"  lookup p95, the same studies again (warm reader): wall {largest['warm_ms'][1]:.1f} ms, CPU "
          f"{largest['warm_ms'][3]:.1f} ms / {GOALS['lookup_p95_ms']} ms = "
          f"{largest['warm_ms'][1] / GOALS['lookup_p95_ms']:.2f}, {largest['warm_ms'][3] / GOALS['lookup_p95_ms']:.2f}")
    print(f"  recall@10 (studies) {largest['recall10_studies']:.3f} / {GOALS['recall10']} = "
          f"{largest['recall10_studies'] / GOALS['recall10']:.3f}")
    print(f"  lookup p95, first pass of a fresh reader / warm: {largest['lookup_ms'][1]:.1f} / "
          f"{largest['warm_ms'][1]:.1f} ms = {largest['lookup_ms'][1] / largest['warm_ms'][1]:.2f} (about 1: no cold "
          f"penalty)")
    gib = 1024 ** 3
    print(f"  memory at {largest['n']:,}: reader (query service) RSS {largest['reader_rss'] / gib:.2f} GiB, of which "
          f"{largest['reader_rss_per_vector']:.0f} B per vector; on disk: index {largest['disk_per_vector']:.0f} B and "
          f"catalogue {largest['catalogue_per_vector']:.0f} B per vector")
    print(f"  projected to {PROJECTED:,} vectors: reader {largest['reader_rss_per_vector'] * PROJECTED / gib:.1f} GiB "
          f"resident (the index files' pages, shared with the page cache), index {largest['disk_per_vector'] * PROJECTED / gib:.1f} GiB "
          f"and catalogue {largest['catalogue_per_vector'] * PROJECTED / gib:.1f} GiB on disk")
    print(f"  cold reader, open & first lookup {largest['cold']['open_and_first_lookup_s']:.2f} s / "
          f"{GOALS['cold_start_s']} s = {largest['cold']['open_and_first_lookup_s'] / GOALS['cold_start_s']:.2f}")
    if len(results) > 1:
        print(f"  add p50 at {largest['n']:,} / at {smallest['n']:,}: "
              f"{largest['add_ms'][0] / smallest['add_ms'][0]:.2f} (flat cost: about 1)")


if __name__ == "__main__":
    main()
