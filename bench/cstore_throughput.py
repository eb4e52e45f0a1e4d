"""C-STORE throughput into Orthanc with the Lookalike plugin against Orthanc alone, and where the CPU goes.

Three Orthancs run in this one process run, alternately (each round led by the next), on the same instances (fresh
UIDs each round): without the plugin; with the plugin and no worker (tasks wait in Redis: the cost of the Orthanc
side alone); with the plugin and its worker indexing while the instances arrive, on the same cores (it finishes its
backlog before the next round starts). The figures are ratios of instances/s to Orthanc without the plugin (goal:
>= 0.9). DCMTK's storescu sends, one association per round, ``TCP_NODELAY=1`` on both sides.

The split: CPU seconds each process of a stack used while storescu sent (``/proc/<pid>/stat``, all threads; the
worker with its pool processes; the relay, Orthanc's child that sends the plugin's tasks; storescu from the
children's rusage), per 100 instances, and how many instances the worker had indexed (or fetched, for those then
pending) by the time the last C-STORE was answered. Orthanc's CPU with the worker minus without it is what the
worker's fetches (and its catch-up) cost inside Orthanc, at Orthanc's own priority. Before each round every stack
is left to finish what the last round set off (its ``STABLE_STUDY`` events, the worker's reconciles and writes), so
that no stack's leftovers run in another's round.

    .venv/bin/python bench/cstore_throughput.py [--instances 1000] [--rounds 3] [--per-study 1] [--ingest-quiet-max S]

``--instances`` far above what the worker's deferral cap covers (``ingest_quiet_max`` seconds of sending, 20 by
default; ``--ingest-quiet-max`` sets it for the worker's stack) shows sustained ingest: the worker then indexes
one batch per cap while Orthanc receives.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus import make_instances  # noqa: E402

from lookalike.ops.demo import wait_indexed  # noqa: E402
from lookalike.ops.stack import Stack, StackConfig, child_pids, storescu  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")
PARTS = ("orthanc", "relay", "redis", "worker", "storescu")


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (a Celery worker's pool processes and their fetch helpers)."""
    return [pid] + [d for child in child_pids(pid) for d in _descendants(child)]


def _cpu(pid: int) -> float:
    """User + system CPU seconds of one process, all its threads."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def cpu_by_part(stack: Stack) -> dict[str, float]:
    """CPU seconds so far of Orthanc, the plugin's task relay (Orthanc's child), Redis, the worker (with its pool)
    and the storescu runs."""
    procs = stack.procs
    usage = {"orthanc": _cpu(procs["orthanc"].pid),
             "relay": sum(_cpu(p) for p in _descendants(procs["orthanc"].pid)[1:]),
             "redis": _cpu(procs["redis"].pid) if "redis" in procs else 0.0,
             "worker": sum(_cpu(p) for p in _descendants(procs["worker"].pid)) if "worker" in procs else 0.0}
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    usage["storescu"] = children.ru_utime + children.ru_stime
    return usage


def settle(stacks: list[Stack], idle_cpu: float = 0.05, timeout: float = 120.0) -> float:
    """Wait until every stack is idle: all its processes together used under ``idle_cpu`` CPU seconds in the last
    second. A round leaves work behind (Orthanc's ``STABLE_STUDY`` events ``StableAge`` seconds after each study,
    the reconcile tasks they queue, the worker's writes), which must not land on the next stack's round. Seconds
    waited."""
    start = time.monotonic()

    def used() -> float:
        return sum(_cpu(p) for stack in stacks for proc in stack.procs.values() for p in _descendants(proc.pid))

    before = used()
    while time.monotonic() - start < timeout:
        time.sleep(1.0)
        now = used()
        if now - before < idle_cpu:
            break
        before = now
    return time.monotonic() - start


def store_round(stack: Stack, files: list[Path]) -> tuple[float, dict[str, float], int]:
    """Instances/s of one storescu run, the CPU seconds each part used meanwhile, instances indexed by its end."""
    before = cpu_by_part(stack)
    start = time.perf_counter()
    result = storescu(stack.config, files, timeout=1800)
    elapsed = time.perf_counter() - start
    after = cpu_by_part(stack)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    indexed = 0
    if stack.with_worker:
        status = stack.http().get(f"{stack.config.orthanc_url}/lookalike/status", timeout=30).json()
        indexed = sum(c["instances"] for c in status["indexed"]) + len(status["problems"])
    return len(files) / elapsed, {k: after[k] - before[k] for k in PARTS}, indexed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-study", type=int, default=1,
                        help="instances per study, one series each (1: single-instance studies, the worst case for "
                             "the plugin's per-study events; hundreds: what the plugin's per-series costs do)")
    parser.add_argument("--ingest-quiet-max", type=float, default=None,
                        help="the worker's ingest_quiet_max (default: the settings' own)")
    args = parser.parse_args()
    worker_settings = {} if args.ingest_quiet_max is None else {"ingest_quiet_max": args.ingest_quiet_max}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        stacks = {
            "without plugin": Stack(StackConfig.create(tmp / "plain", with_plugin=False), worker=False),
            "plugin, no worker": Stack(StackConfig.create(tmp / "plugin"), worker=False),
            "plugin and worker": Stack(StackConfig.create(tmp / "full", extra_settings=worker_settings)),
        }
        rates: dict[str, list[float]] = {name: [] for name in stacks}
        cpu: dict[str, list[dict[str, float]]] = {name: [] for name in stacks}
        during: list[int] = []
        try:
            for stack in stacks.values():
                stack.start()
            names = list(stacks)
            for r in range(args.rounds):
                # each round starts with the next stack: a drift within a round (rates fell from the first to the
                # last of a round's runs) lands on every stack alike instead of always on the last
                for name in names[r % len(names):] + names[: r % len(names)]:
                    stack, i = stacks[name], names.index(name)
                    files = make_instances(tmp / f"{i}-{r}", args.instances, prefix=f"R{r}S{i}",
                                           per_study=args.per_study)
                    waited = settle(list(stacks.values()))
                    indexed_before = args.instances * r
                    rate, used, indexed = store_round(stack, files)
                    rates[name].append(rate)
                    cpu[name].append(used)
                    line = "  ".join(f"{k} {used[k] * 100 / args.instances:5.2f}" for k in PARTS)
                    extra = ""
                    if stack.with_worker:
                        during.append(indexed - indexed_before)
                        extra = f"  indexed while storing {during[-1]}/{args.instances}"
                    print(f"round {r + 1}: {name:18s} {rate:7.1f} instances/s  CPU s/100: {line}{extra}"
                          f"  (idle after {waited:.0f} s)", flush=True)
                    if stack.with_worker:  # let the worker finish, so that its backlog does not slow the next round
                        wait_indexed(stack, args.instances * (r + 1), timeout=1800)
                    for f in files:
                        f.unlink()
        finally:
            for stack in stacks.values():
                stack.stop()
    base = statistics.median(rates["without plugin"])
    print(f"\nC-STORE of {args.instances} US instances ({args.per_study} per study), {args.rounds} rounds, medians "
          "(goal: ratio >= 0.9):")
    for name, values in rates.items():
        rate = statistics.median(values)
        split = "  ".join(f"{k} {statistics.median(u[k] for u in cpu[name]) * 100 / args.instances:5.2f}"
                          for k in PARTS)
        print(f"  {name:18s} {rate:7.1f} instances/s  ratio {rate / base:.2f}   CPU s per 100 instances: {split}")
    print(f"  indexed by the worker while storescu sent (median): {statistics.median(during)}/{args.instances}")


if __name__ == "__main__":
    main()
