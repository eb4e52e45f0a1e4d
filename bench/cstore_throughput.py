"""C-STORE throughput into Orthanc with the Lookalike plugin against Orthanc alone.

Three Orthancs run in this one process run, alternately, on the same instances (fresh UIDs each round): without
the plugin; with the plugin and no worker (tasks wait in Redis: the cost of the Orthanc side alone); with the
plugin and its worker indexing while the instances arrive, on the same cores (it finishes its backlog before the
next round starts). The figures are ratios of instances/s to Orthanc without the plugin (goal: >= 0.9). DCMTK's storescu sends, one association
per round, ``TCP_NODELAY=1`` on both sides.

    .venv/bin/python bench/cstore_throughput.py [--instances 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus import make_instances  # noqa: E402

from lookalike.ops.demo import wait_indexed  # noqa: E402
from lookalike.ops.stack import Stack, StackConfig, storescu  # noqa: E402


def store_rate(stack: Stack, files: list[Path]) -> float:
    start = time.perf_counter()
    result = storescu(stack.config, files, timeout=600)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return len(files) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        stacks = {
            "without plugin": Stack(StackConfig.create(tmp / "plain", with_plugin=False), worker=False),
            "plugin, no worker": Stack(StackConfig.create(tmp / "plugin"), worker=False),
            "plugin and worker": Stack(StackConfig.create(tmp / "full")),
        }
        try:
            for stack in stacks.values():
                stack.start()
            rates: dict[str, list[float]] = {name: [] for name in stacks}
            for r in range(args.rounds):
                for i, (name, stack) in enumerate(stacks.items()):
                    files = make_instances(tmp / f"{i}-{r}", args.instances, prefix=f"R{r}S{i}")
                    rates[name].append(store_rate(stack, files))
                    print(f"round {r + 1}: {name:18s} {rates[name][-1]:7.1f} instances/s", flush=True)
                    if stack.with_worker:  # let the worker finish, so that its backlog does not slow the next round
                        wait_indexed(stack, args.instances * (r + 1), timeout=600)
        finally:
            for stack in stacks.values():
                stack.stop()
    base = statistics.median(rates["without plugin"])
    print(f"\nC-STORE of {args.instances} US instances, {args.rounds} rounds, medians (goal: ratio >= 0.9):")
    for name, values in rates.items():
        rate = statistics.median(values)
        print(f"  {name:18s} {rate:7.1f} instances/s  ratio {rate / base:.2f}")


if __name__ == "__main__":
    main()
