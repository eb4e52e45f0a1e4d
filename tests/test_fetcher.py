"""Fetching ahead in a process of its own gives what fetching in the worker's process gives: the same decoded
instance, the same problem (class, message, code), the same Orthanc errors; a helper that died is replaced."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lookalike.dicom.errors import LookalikeDicomError
from lookalike.orthanc.client import OrthancNotFoundError
from lookalike.worker.fetcher import FetchProcess, FetchProcessDied, fetch_instance
from lookalike.worker.pipeline import Embedder, Job
from tests.support import FakeEncoder, FakeOrthanc, dicom_bytes, random_us


@pytest.fixture
def api() -> FakeOrthanc:
    api = FakeOrthanc()
    api.add("good", dicom_bytes(random_us(1)))
    report = random_us(2)
    report.SOPClassUID = report.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    api.add("report", dicom_bytes(report))
    api.add("large", dicom_bytes(random_us(3)))
    good = dicom_bytes(random_us(4))
    api.add("truncated", good[: len(good) - 100])
    return api


@pytest.fixture
def helper(api: FakeOrthanc):
    process = FetchProcess(api, 64 * 80 - 1)  # "large" and every other instance: more pixels than this
    yield process
    process.close()


def test_a_decoded_instance_is_the_one_decoded_here(api: FakeOrthanc) -> None:
    process = FetchProcess(api, 10_000_000)
    try:
        there, series, study = process.fetch("good", None, "st-given")
    finally:
        process.close()
    here, *ids = fetch_instance(api, "good", None, "st-given", 10_000_000)
    assert [series, study] == ids == ["se-good", "st-good"]  # looked up, as here
    assert there.encoder == here.encoder and there.dataset == here.dataset
    assert np.array_equal(there.image.pixels, here.image.pixels) and there.image.region == here.image.region


@pytest.mark.parametrize("instance", ["report", "large", "truncated"])
def test_a_problem_is_the_one_found_here(api: FakeOrthanc, helper: FetchProcess, instance: str) -> None:
    there, series, study = helper.fetch(instance, "se", "st")
    here, _, _ = fetch_instance(api, instance, "se", "st", helper.max_pixels)
    assert isinstance(there, LookalikeDicomError) and (series, study) == ("se", "st")
    assert (type(there), str(there), there.code, vars(there)) == (type(here), str(here), here.code, vars(here))


def test_orthanc_errors_are_raised_and_a_dead_helper_is_replaced(helper: FetchProcess) -> None:
    with pytest.raises(OrthancNotFoundError):
        helper.fetch("missing", "se", "st")
    os.kill(helper.process.pid, signal.SIGKILL)
    with pytest.raises(FetchProcessDied):
        helper.fetch("good", "se", "st")
    assert isinstance(helper.fetch("report", "se", "st")[0], LookalikeDicomError)  # a new helper answers


def test_an_embedder_fetching_ahead_in_the_helper_gives_the_same_results(api: FakeOrthanc) -> None:
    for k in range(4):
        api.add(f"n{k}", dicom_bytes(random_us(10 + k)))
    jobs = [Job(f"n{k}", None, None) for k in range(4)] + [Job("report", None, None), Job("truncated", None, None)]
    process = FetchProcess(api, 10_000_000)
    try:
        embedder = Embedder(api, lambda name, weights=None: FakeEncoder(), 10_000_000, fetch_ahead=process.fetch)
        embedder.run([], ahead=jobs)
        embedder._ahead_thread.join()  # noqa: SLF001
        assert sorted(embedder._ahead) == sorted(job.instance_id for job in jobs)  # noqa: SLF001 (all ahead)
        ahead = embedder.run(jobs)
    finally:
        process.close()
    here = Embedder(api, lambda name, weights=None: FakeEncoder(), 10_000_000).run(jobs)
    assert [r.outcome for r in ahead] == [r.outcome for r in here]
    for a, b in zip(ahead, here):
        assert a.record == b.record and (a.vector is None) == (b.vector is None)
        assert a.vector is None or np.array_equal(a.vector, b.vector)


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_helper_ends_when_the_process_it_serves_is_killed() -> None:
    """A pool process killed outright (out of memory, kill -9) says nothing to its helper: the helper goes too."""
    script = ("import os, sys; sys.path[:0] = sys.argv[1:2]; from tests.support import FakeOrthanc;"
              "from lookalike.worker.fetcher import FetchProcess; p = FetchProcess(FakeOrthanc(), 1000)\n"
              "try: p.fetch('missing', 'se', 'st')\nexcept Exception: pass\n"
              "print(p.process.pid, flush=True); import time; time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", script, os.getcwd()], stdout=subprocess.PIPE, text=True)
    helper = int(parent.stdout.readline())
    assert _running(helper)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _running(helper):
        time.sleep(0.2)
    assert not _running(helper)


def test_an_error_that_does_not_pickle_arrives_in_words(api: FakeOrthanc, monkeypatch) -> None:
    class Unpicklable(Exception):
        def __reduce__(self):
            raise TypeError("no")

    def fail(*_args, **_kwargs):
        raise Unpicklable("Orthanc said something odd")

    from lookalike.worker import fetcher

    assert pickle.loads(fetcher._answer(api, 1000, ("good", "se", "st")))[0] == "ok"  # noqa: SLF001
    monkeypatch.setattr(fetcher, "fetch_instance", fail)
    kind, error = pickle.loads(fetcher._answer(api, 1000, ("good", "se", "st")))  # noqa: SLF001
    assert kind == "raise" and isinstance(error, RuntimeError) and "Orthanc said something odd" in str(error)
