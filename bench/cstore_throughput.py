"""C-STORE throughput into Orthanc with the Lookalike plugin (and its worker running) against Orthanc alone.

Both run in this one process run, alternately, on the same instances (fresh UIDs each round); the figure is the
ratio of instances/s with the plugin to without it (goal: >= 0.9). DCMTK's storescu sends, one association
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

from lookalike.stack import Stack, StackConfig, storescu  # noqa: E402


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
        plain = Stack(StackConfig.create(tmp / "plain", with_plugin=False), worker=False).start()
        full = Stack(StackConfig.create(tmp / "full")).start()
        try:
            rates: dict[str, list[float]] = {"without plugin": [], "with plugin": []}
            for r in range(args.rounds):
                for name, stack in (("without plugin", plain), ("with plugin", full)):
                    files = make_instances(tmp / f"{name[:4]}{r}", args.instances, prefix=f"R{r}{name[:1]}")
                    rates[name].append(store_rate(stack, files))
                    print(f"round {r + 1}: {name:15s} {rates[name][-1]:7.1f} instances/s", flush=True)
        finally:
            plain.stop()
            full.stop()
    without, with_ = statistics.median(rates["without plugin"]), statistics.median(rates["with plugin"])
    print(f"\nC-STORE of {args.instances} US instances ({args.rounds} rounds, median):")
    print(f"  without plugin {without:.1f}/s, with plugin and worker {with_:.1f}/s, ratio {with_ / without:.2f} (goal >= 0.9)")


if __name__ == "__main__":
    main()
