"""Shared fixtures: a real stack (Redis, Orthanc with the plugin, a Celery worker) on free loopback ports."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from lookalike.stack import Stack, StackConfig

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
