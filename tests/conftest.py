"""Shared fixtures: a real stack (Redis, Orthanc with the plugin, a Celery worker) on free loopback ports."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from lookalike.ops.stack import Stack, StackConfig

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "deploy" / "samples"


def require_programs(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None and not Path(f"/usr/sbin/{n}").exists()]
    if missing:
        pytest.fail(f"missing programs {missing}: run `make install`")


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Stack:
    """The whole stack, started once for the session's end-to-end tests, stopped after them."""
    require_programs("Orthanc", "redis-server", "storescu", "findscu", "dsrdump")
    weights = {n: os.environ[f"LOOKALIKE_TEST_WEIGHTS_{n.upper()}"] for n in ("us", "xr") if f"LOOKALIKE_TEST_WEIGHTS_{n.upper()}" in os.environ}
    config = StackConfig.create(tmp_path_factory.mktemp("stack"), weights=weights)
    with Stack(config) as running:
        yield running


def wait_for(probe, timeout: float = 60.0, interval: float = 0.25, what: str = "condition"):
    """Poll ``probe`` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def write_image_set(root: Path, rows, extra_columns: tuple[str, ...] = ()) -> Path:
    """Write a data set as ``lookalike train|evaluate|embed|lesions`` read it: image files and ``manifest.csv``.

    ``rows`` yields ``(relative path, PIL image, label, group, split)``, or that and a dict giving each of
    ``extra_columns`` a value: a string, or ``(relative path, PIL image)`` for a file to save (a lesion mask).
    Each image is saved under ``root`` in the format its suffix names. Returns ``root``.
    """
    import csv

    def save(name: str, image) -> str:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / name, quality=95) if name.endswith(".jpg") else image.save(root / name)
        return name

    (root / "images").mkdir(parents=True, exist_ok=True)
    with open(root / "manifest.csv", "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["path", "label", "group", "split", *extra_columns])
        for name, image, label, group, split, *extra in rows:
            values = extra[0] if extra else {}
            cells = [v if isinstance(v, str) else save(*v) for v in (values.get(c, "") for c in extra_columns)]
            out.writerow([save(name, image), label, group, split, *cells])
    return root


def live_rows(stack) -> list[tuple[str, str, str, str]]:
    """(Orthanc study id, Orthanc instance id, encoder, model version) of every live catalogue row, read-only."""
    import sqlite3

    from lookalike.index.catalogue import CATALOGUE_FILE

    path = stack.config.state_dir / "index" / CATALOGUE_FILE
    if not path.exists():
        return []
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as conn:
        return conn.execute("SELECT orthanc_study_id, orthanc_instance_id, encoder, model_version FROM instances"
                            " WHERE vector IS NOT NULL").fetchall()
