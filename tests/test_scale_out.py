"""Scale-out as deploy/SCALE_OUT.md lays it out, on one machine: the index host (Redis, Orthanc on its PostgreSQL
index, the query service, the index's one writer) and two embedding workers as on two other hosts. Each embedding
worker runs its systemd unit's own command line in a folder of its own, with a settings file that names Orthanc
and Redis by another address of this machine (127.0.0.2, which Orthanc counts as remote); it shares nothing
else with the index host. A batch sent with DCMTK's storescu is indexed with no instance lost or doubled, and
both embedding workers take part.

The stack is this module's own (not the session's), started and stopped here.
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
import redis

from lookalike.config import QUEUE, WRITE_QUEUE, Settings
from lookalike.lab.samples import wrap_image
from lookalike.index.catalogue import CATALOGUE_FILE
from lookalike.ops.stack import ORTHANC_DB, Stack, StackConfig, as_postgres_account, postgres_program, storescu
from tests.support import SAMPLES, UNITS, indexed_total, require_programs, unit_command, wait_for

pytestmark = pytest.mark.stack

#: The embedding hosts' address of the index host: another loopback address, so that Orthanc treats the workers'
#: calls as remote ones and Redis must listen there, as on a network.
INDEX_HOST = "127.0.0.2"
#: The two embedding workers (instance names of lookalike-embed@.service).
EMBEDDERS = ("1", "2")
#: Studies x instances per study of the batch.
STUDIES, PER_STUDY = 8, 4
#: Instances per embedding batch: small enough that neither worker can hold the whole batch (a worker prefetches
#: two batches' messages), so that both must take part.
BATCH = 4


def _embedding_host(config: StackConfig, folder: Path, instance: str) -> subprocess.Popen:
    """An embedding worker as on its own host: ``folder`` stands for its /var/lib/lookalike, holding only its
    settings (what deploy/SCALE_OUT.md says such a host needs) and its logs."""
    (folder / "logs").mkdir(mode=0o700)
    settings = Settings(
        orthanc_url=f"http://{INDEX_HOST}:{config.http_port}", orthanc_user="lookalike",
        orthanc_password=config.service_password,
        redis_url=f"redis://:{config.redis_password}@{INDEX_HOST}:{config.redis_port}/0",
        index_dir=str(folder / "index"), weights=dict(config.weights), remote_embedding=True, batch_size=BATCH,
        device="cpu",
    )
    path = folder / "lookalike.json"
    path.touch(mode=0o600)
    path.write_text(json.dumps(settings.to_dict(), indent=2))
    argv, env = unit_command(UNITS / "lookalike-embed@.service", folder, instance)
    return subprocess.Popen(argv, env=env, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            umask=0o077, start_new_session=True)


def _ready(log: Path) -> bool:
    return log.exists() and "ready." in log.read_text(errors="replace")


@pytest.fixture(scope="module")
def scaled(tmp_path_factory) -> tuple[Stack, dict[str, Path]]:
    """The index host's stack (Orthanc on PostgreSQL, Redis also on INDEX_HOST, the writer) and two embedding
    workers; the embedding hosts' folders by instance name."""
    require_programs("Orthanc", "redis-server", "storescu")
    # Not under pytest's folder (owner-only all the way up): PostgreSQL runs as its own user and must reach it.
    state = Path(tempfile.mkdtemp(prefix="lookalike-scale-out-"))
    config = StackConfig.create(state, orthanc_index="postgresql", redis_bind=["127.0.0.1", INDEX_HOST],
                                extra_orthanc={"RemoteAccessAllowed": True},
                                extra_settings={"remote_embedding": True, "batch_size": BATCH})
    stack = Stack(config, worker=False)
    hosts = {name: tmp_path_factory.mktemp(f"embedding-host-{name}") for name in EMBEDDERS}
    workers: list[subprocess.Popen] = []
    try:
        stack.start()
        stack.start_worker("writer", (QUEUE, WRITE_QUEUE))
        workers += [_embedding_host(config, folder, name) for name, folder in hosts.items()]
        wait_for(lambda: stack.worker_ready("writer"), timeout=120, what="the writer")
        for name, folder in hosts.items():
            wait_for(lambda: _ready(folder / "logs" / f"embed-{name}.log"), timeout=120, what=f"embedding worker {name}")
        yield stack, hosts
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.terminate()  # warm shutdown, as systemd's KillSignal
        for proc in workers:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        stack.stop()
        shutil.rmtree(state, ignore_errors=True)


def _batch(folder: Path) -> list[Path]:
    """STUDIES studies of PER_STUDY instances: flipped and rotated copies of the sample images (no lookup test
    ranks them), each with its own UIDs, half ultrasound, half radiographs."""
    samples = sorted(SAMPLES.glob("us_*.dcm"))[-(STUDIES // 2):] + sorted(SAMPLES.glob("xr_*.dcm"))[-(STUDIES // 2):]
    files = []
    for s, sample in enumerate(samples):
        source = pydicom.dcmread(sample)
        image, modality = source.pixel_array, source.Modality
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


def _catalogue_uids(stack: Stack) -> list[str]:
    path = stack.config.state_dir / "index" / CATALOGUE_FILE
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as conn:
        return [uid for (uid,) in conn.execute("SELECT sop_instance_uid FROM instances WHERE vector IS NOT NULL")]


def _embedded(log: Path) -> int:
    """Instances a worker's own log says it embedded, batch by batch."""
    return sum(int(n) for n in re.findall(r"embedding a batch of (\d+) instance", log.read_text(errors="replace")))


def _models_loaded(log: Path) -> list[str]:
    return re.findall(r"encoder (\S+) on (\S+) in process", log.read_text(errors="replace"))


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


def test_two_embedding_hosts_index_a_batch_once_with_orthanc_on_postgresql(scaled, tmp_path: Path) -> None:
    stack, hosts = scaled
    cfg = stack.config
    http = stack.http()
    # Orthanc keeps its index in PostgreSQL, not in its own SQLite file.
    assert "postgresql-index" in http.get(f"{cfg.orthanc_url}/plugins", timeout=10).json()
    assert "PostgreSQL" in http.get(f"{cfg.orthanc_url}/system", timeout=10).json()["DatabaseBackendPlugin"]
    assert not (cfg.state_dir / "orthanc-storage" / "index").exists()
    # Redis, reachable from the other hosts, answers nobody without its password.
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host=INDEX_HOST, port=cfg.redis_port, socket_timeout=5).ping()

    files = _batch(tmp_path)
    sent = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert len(sent) == len(files) == STUDIES * PER_STUDY
    result = storescu(cfg, files)
    assert result.returncode == 0, result.stderr
    wait_for(lambda: indexed_total(stack) >= len(files), timeout=300, what="indexing of the batch")

    # Orthanc, its database, the status page and the catalogue agree: every instance once, none lost, none extra.
    stats = http.get(f"{cfg.orthanc_url}/statistics", timeout=10).json()
    assert stats["CountInstances"] == len(files)
    assert int(_orthanc_sql(cfg, "SELECT count(*) FROM resources WHERE resourcetype = 3", tmp_path)) == len(files)
    assert indexed_total(stack) == len(files)
    counted = Counter(_catalogue_uids(stack))
    assert set(counted) == sent
    assert max(counted.values()) == 1

    # The embedding hosts did the embedding, both of them, and between them all of it; they hold no index. The
    # index host's writer loaded no model.
    logs = {name: folder / "logs" / f"embed-{name}.log" for name, folder in hosts.items()}
    embedded = {name: _embedded(log) for name, log in logs.items()}
    assert all(embedded.values()), embedded
    assert sum(embedded.values()) >= len(files)
    assert all(_models_loaded(log) for log in logs.values())
    assert not any((folder / "index").exists() for folder in hosts.values())
    assert not _models_loaded(cfg.logs / "writer.log")
    assert not stack.crashed()


def test_configure_makes_the_cluster_the_postgres_unit_starts(tmp_path: Path) -> None:
    """As deploy/SCALE_OUT.md says: ``"orthanc_index": "postgresql"`` added to a site's stack.json, then ``lookalike
    configure`` again, creates the cluster; the unit's own command line (as the cluster's user, as ``User=`` would)
    serves it on loopback, to Orthanc's role and its password alone."""
    state = Path(tempfile.mkdtemp(prefix="lookalike-configure-pg-"))
    stack_json = tmp_path / "stack.json"
    configure = [sys.executable, "-m", "lookalike.cli", "configure", "--state", str(state), "--stack-config",
                 str(stack_json)]
    proc = None
    try:
        run = subprocess.run(configure, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        assert "PostgreSQL" not in json.loads((state / "orthanc.json").read_text())  # SQLite unless asked
        stack_json.write_text(json.dumps({**json.loads(stack_json.read_text()), "orthanc_index": "postgresql"}))
        run = subprocess.run(configure, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        config = StackConfig.load_or_create(stack_json, state)
        assert config.postgres_port
        assert json.loads((state / "orthanc.json").read_text())["PostgreSQL"]["Port"] == config.postgres_port
        argv, env = unit_command(UNITS / "lookalike-postgres.service", state)
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
