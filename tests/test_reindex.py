"""``lookalike reindex`` on a running stack: lookups keep the old model until the switch, then move at once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lookalike.encoders.base import WEIGHTS_DIR
from lookalike.ops.stack import Stack, StackConfig, storescu
from tests.support import SAMPLES, live_rows, require_programs, wait_for

pytestmark = pytest.mark.stack


@pytest.fixture
def running(tmp_path: Path):
    require_programs("Orthanc", "redis-server", "storescu")
    with Stack(StackConfig.create(tmp_path / "stack")) as stack:
        yield stack


def _rows(stack: Stack) -> list[tuple[str, str, str]]:
    """(encoder, model version, Orthanc instance id) of every live row."""
    return [(encoder, version, instance) for _, instance, encoder, version in live_rows(stack)]


def _new_checkpoint(path: Path) -> Path:
    """The shipped ultrasound checkpoint with one weight nudged: another model version, the same architecture."""
    checkpoint = torch.load(WEIGHTS_DIR / "us.pt", map_location="cpu", weights_only=False)
    name, tensor = next((k, v) for k, v in checkpoint["state_dict"].items() if v.is_floating_point())
    checkpoint["state_dict"][name] = tensor + 1e-3
    torch.save(checkpoint, path)
    return path


def test_reindex_switches_lookups_at_once_and_removes_the_old_model(running: Stack, tmp_path: Path) -> None:
    us = sorted(SAMPLES.glob("us_*.dcm"))[:8]
    xr = sorted(SAMPLES.glob("xr_*.dcm"))[:2]
    assert storescu(running.config, [*us, *xr]).returncode == 0
    wait_for(lambda: len(_rows(running)) == 10, timeout=180, what="indexing")
    old_us = {v for e, v, _ in _rows(running) if e == "us"}
    xr_before = sorted(r for r in _rows(running) if r[0] == "xr")
    http, url = running.http(), running.config.orthanc_url
    study = http.get(f"{url}/instances/{_rows(running)[0][2]}/study", timeout=10).json()["ID"]

    def answered_versions() -> set[str]:
        answer = http.get(f"{url}/lookalike/studies/{study}/similar", timeout=10).json()
        return {s["model_version"] for s in answer["similar"]}

    assert answered_versions() == old_us
    argv = [sys.executable, "-m", "lookalike.cli", "--config", str(running.config.state_dir / "lookalike.json"),
            "reindex", "--encoder", "us", "--model", str(_new_checkpoint(tmp_path / "us-new.pt")),
            "--rate", "1", "--batch", "2"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len({v for e, v, _ in _rows(running) if e == "us"}) == 2 or proc.poll() is not None,
             timeout=120, what="the first new vectors")
    answers = []  # the model versions of each answer while the new model is built, in order
    while proc.poll() is None:
        answers.append(answered_versions())
    out, err = proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    report = json.loads(out)
    assert answers and answers[0] == old_us, "lookups left the old model before the new one was complete"
    assert all(len(a) == 1 for a in answers), "an answer mixed two models"
    switch = next((i for i, a in enumerate(answers) if a != old_us), len(answers))
    assert all(a == {report["new_model"]} for a in answers[switch:]), "lookups went back to the old model"

    new_us = {v for e, v, _ in _rows(running) if e == "us"}
    assert report["switched"] and new_us == {report["new_model"]} and not new_us & old_us
    assert sorted(i for e, _, i in _rows(running) if e == "us") == sorted(
        i for e, v, i in _rows(running) if e == "us" and v == report["new_model"])
    assert len([r for r in _rows(running) if r[0] == "us"]) == 8 and report["retired_vectors"] == 8
    assert sorted(r for r in _rows(running) if r[0] == "xr") == xr_before
    assert answered_versions() == new_us
    index_files = {p.name for p in (running.config.state_dir / "index").iterdir()}
    assert not [f for f in index_files for v in old_us if v in f], "the old model's FAISS files are still there"

    # New instances now go to the new model.
    extra = sorted(SAMPLES.glob("us_*.dcm"))[8]
    assert storescu(running.config, [extra]).returncode == 0
    wait_for(lambda: len([r for r in _rows(running) if r[0] == "us"]) == 9, timeout=120, what="the next instance")
    assert {v for e, v, _ in _rows(running) if e == "us"} == new_us


def test_reindex_to_the_active_model_is_refused_and_changes_nothing(running: Stack, tmp_path: Path) -> None:
    """The shipped checkpoint, copied elsewhere: another path, the same model version as the one in use."""
    import shutil

    us = sorted(SAMPLES.glob("us_*.dcm"))[:2]
    assert storescu(running.config, us).returncode == 0
    wait_for(lambda: len(_rows(running)) == 2, timeout=180, what="indexing")
    before = sorted(_rows(running))
    same = shutil.copy(WEIGHTS_DIR / "us.pt", tmp_path / "us-copy.pt")
    argv = [sys.executable, "-m", "lookalike.cli", "--config", str(running.config.state_dir / "lookalike.json"),
            "reindex", "--encoder", "us", "--model", str(same)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode not in (0, 1), "a re-index to the active model was run (0: switched, 1: not switched)"
    assert done.stdout.strip() == "", "a report was printed for a re-index that was refused"
    assert before[0][1] in done.stderr, "the refusal does not say which model is already active"
    assert sorted(_rows(running)) == before
