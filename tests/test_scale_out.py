"""Scale-out: Orthanc's index in PostgreSQL and two workers sharing one Redis index a batch sent with DCMTK's
storescu, every instance once, and both workers take part.

The stack is its own (not the session's): Orthanc on PostgreSQL, started and stopped by this module.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest

from lookalike.dicom_io.samples import wrap_image
from lookalike.indexer.catalogue import CATALOGUE_FILE
from lookalike.stack import ORTHANC_DB, Stack, StackConfig, as_postgres_account, postgres_program, storescu
from tests.conftest import SAMPLES, require_programs, wait_for
from tests.test_service_units import UNITS, _command

pytestmark = pytest.mark.stack

#: The two workers, as on two hosts: each its own Celery node and log.
WORKERS = ("embed-a", "embed-b")
#: Studies x instances per study of the batch.
STUDIES, PER_STUDY = 8, 4


@pytest.fixture(scope="module")
def scaled() -> Stack:
    """Redis, Orthanc on its PostgreSQL index, the query service and two named workers."""
    require_programs("Orthanc", "redis-server", "storescu")
    # Not under pytest's folder (owner-only all the way up): PostgreSQL runs as its own user and must reach it.
    state = Path(tempfile.mkdtemp(prefix="lookalike-scale-out-"))
    config = StackConfig.create(state, orthanc_index="postgresql")
    stack = Stack(config, worker=False)
    try:
        stack.start()
        for name in WORKERS:
            stack.start_worker(name)
        for name in WORKERS:
            wait_for(lambda: stack.worker_ready(name), timeout=120, what=f"worker {name}")
        yield stack
    finally:
        stack.stop()
        shutil.rmtree(state, ignore_errors=True)


def _batch(folder: Path) -> list[Path]:
    """STUDIES studies of PER_STUDY instances: flipped and rotated copies of the sample images (no lookup test
    ranks them), each with its own UIDs, half ultrasound, half radiographs."""
    samples = sorted(SAMPLES.glob("us_*.dcm"))[-(STUDIES // 2):] + sorted(SAMPLES.glob("xr_*.dcm"))[-(STUDIES // 2):]
    files = []
    for s, sample in enumerate(samples):
        image, modality = pydicom.dcmread(sample).pixel_array, pydicom.dcmread(sample).Modality
        study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
        for i in range(PER_STUDY):
            variant = np.rot90(np.fliplr(image), k=i)
            ds = wrap_image(
                np.ascontiguousarray(variant).astype(np.uint8), modality, patient_id=f"PSCALE{s:04d}",
                patient_name=f"SCALE^{s}", patient_birth_date="19700101", patient_sex="F", study_instance_uid=study,
                series_instance_uid=series, instance_number=i + 1, study_date="20250401", study_time="090000",
                accession_number=f"SC{s:06d}", study_description=f"scale-out {modality}",
            )
            path = folder / f"s{s}_{i}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    return files


def _indexed_total(stack: Stack) -> int:
    status = stack.http().get(f"{stack.config.orthanc_url}/lookalike/status", timeout=10).json()
    return sum(c["instances"] for c in status["indexed"])


def _catalogue_uids(stack: Stack) -> list[str]:
    path = stack.config.state_dir / "index" / CATALOGUE_FILE
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as conn:
        return [uid for (uid,) in conn.execute("SELECT sop_instance_uid FROM instances WHERE vector IS NOT NULL")]


def _worker_indexed(stack: Stack, name: str) -> set[str]:
    """Orthanc ids of the instances this worker's own log says it embedded and indexed."""
    log = (stack.config.logs / f"{name}.log").read_text(errors="replace")
    return set(re.findall(r"instance ([0-9a-f-]{44}) indexed ", log))


def _orthanc_sql(cfg: StackConfig, sql: str, tmp_path: Path) -> str:
    """``sql`` run in Orthanc's database as Orthanc's role; the password from an owner-only file (PGPASSFILE)."""
    pgpass = tmp_path / "pgpass"
    pgpass.touch(mode=0o600)
    pgpass.write_text(f"127.0.0.1:{cfg.postgres_port}:{ORTHANC_DB}:{ORTHANC_DB}:{cfg.postgres_password}\n")
    done = subprocess.run([postgres_program("psql"), "-h", "127.0.0.1", "-p", str(cfg.postgres_port), "-U", ORTHANC_DB,
                           "-d", ORTHANC_DB, "-w", "-tA", "-v", "ON_ERROR_STOP=1", "-c", sql],
                          env={**os.environ, "PGPASSFILE": str(pgpass)}, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_two_workers_index_a_batch_once_each_with_orthanc_on_postgresql(scaled: Stack, tmp_path: Path) -> None:
    cfg = scaled.config
    http = scaled.http()
    # Orthanc keeps its index in PostgreSQL, not in its own SQLite file.
    assert "postgresql-index" in http.get(f"{cfg.orthanc_url}/plugins", timeout=10).json()
    assert http.get(f"{cfg.orthanc_url}/system", timeout=10).json()["DatabaseBackendPlugin"]
    assert not (cfg.state_dir / "orthanc-storage" / "index").exists()

    files = _batch(tmp_path)
    sent = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert len(sent) == len(files) == STUDIES * PER_STUDY
    result = storescu(cfg, files)
    assert result.returncode == 0, result.stderr
    wait_for(lambda: _indexed_total(scaled) >= len(files), timeout=300, what="indexing of the batch")

    # Orthanc, its database, the status page and the catalogue agree: every instance once, none lost, none extra.
    stats = http.get(f"{cfg.orthanc_url}/statistics", timeout=10).json()
    assert stats["CountInstances"] == len(files)
    assert int(_orthanc_sql(cfg, "SELECT count(*) FROM resources WHERE resourcetype = 3", tmp_path)) == len(files)
    assert _indexed_total(scaled) == len(files)
    counted = Counter(_catalogue_uids(scaled))
    assert set(counted) == sent
    assert max(counted.values()) == 1

    # Both workers embedded some of the batch, and between them all of it.
    orthanc_ids = set(http.get(f"{cfg.orthanc_url}/instances", timeout=10).json())
    done = {name: _worker_indexed(scaled, name) for name in WORKERS}
    assert all(done.values()), {name: len(ids) for name, ids in done.items()}
    assert set().union(*done.values()) == orthanc_ids
    assert not scaled.crashed()


def test_configure_makes_the_cluster_the_postgres_unit_starts(tmp_path: Path) -> None:
    """``lookalike configure`` with ``orthanc_index`` "postgresql" creates the cluster; the unit's own command line
    (as the cluster's user, as ``User=`` would) serves it on loopback, to Orthanc's role and its password alone."""
    state = Path(tempfile.mkdtemp(prefix="lookalike-configure-pg-"))
    stack_json = tmp_path / "stack.json"
    StackConfig.create(state, orthanc_index="postgresql").save(stack_json)
    proc = None
    try:
        run = subprocess.run([sys.executable, "-m", "lookalike.cli", "configure", "--state", str(state),
                              "--stack-config", str(stack_json)], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        config = StackConfig.load_or_create(stack_json, state)
        assert json.loads((state / "orthanc.json").read_text())["PostgreSQL"]["Port"] == config.postgres_port
        argv, env = _command(UNITS / "lookalike-postgres.service", state)
        proc = subprocess.Popen(as_postgres_account(argv), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True, umask=0o077)
        wait_for(lambda: subprocess.run([postgres_program("pg_isready"), "-q", "-h", "127.0.0.1", "-p",
                                         str(config.postgres_port)]).returncode == 0, timeout=60, what="PostgreSQL")
        assert _orthanc_sql(config, "SELECT current_user || ' ' || current_database()", tmp_path) == "orthanc orthanc"
        wrong = StackConfig(**{**config.__dict__, "postgres_password": "not-the-password"})
        with pytest.raises(AssertionError, match="password authentication failed"):
            _orthanc_sql(wrong, "SELECT 1", tmp_path)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
        shutil.rmtree(state, ignore_errors=True)
