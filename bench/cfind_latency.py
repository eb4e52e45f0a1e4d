"""The DICOM query endpoint as a workstation meets it: C-FIND round trip at 10k indexed instances, and C-MOVE of a
20-instance study to a second Orthanc.

The stack runs as ``lookalike run`` starts it, without the worker: the index is filled straight through the
project's :class:`IndexStore` with synthetic vectors (no model runs). Real one-instance studies stored in Orthanc
with storescu form clusters of 12 whose vectors are close (cosine about 0.9), so that every answer's ten studies
exist in Orthanc; synthetic instances (4 per study, random directions, cosine about 0 with everything) fill the
index up to ``--instances``.

C-FIND: DCMTK's findscu as the workstation, one process and association per query, the usual return keys,
round-robin over the real studies; the first query (the endpoint loads the FAISS snapshot) is left out. The same
findscu against Orthanc's own C-FIND of the same studies, in the same run, shows what process start and
association cost on this machine at the time. C-MOVE: movescu moves the 20-instance study to a second plain
Orthanc, where it is checked and deleted between runs.

    .venv/bin/python bench/cfind_latency.py [--instances 10000] [--queries 200] [--moves 5]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from corpus import make_instances  # noqa: E402

from lookalike.lab.samples import wrap_image  # noqa: E402
from lookalike.index.catalogue import InstanceRecord  # noqa: E402
from lookalike.index.store import IndexStore  # noqa: E402
from lookalike.ops.stack import ORTHANC_AET, Stack, StackConfig, dcmtk_env, storescu  # noqa: E402

DIM = 512
CLUSTER = 12
MODEL = "bench-1"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _study_of_20(out: Path) -> tuple[str, list[Path]]:
    pixels = pydicom.dcmread(make_instances(out / "src", 1, prefix="M")[0]).pixel_array
    uid = pydicom.uid.generate_uid()
    paths = []
    for i in range(20):
        ds = wrap_image(pixels, "US", patient_id="MOVE00001", patient_name="BENCH^MOVE", patient_birth_date="19700101",
                        patient_sex="F", study_instance_uid=uid, study_date="20250101", study_time="080000",
                        accession_number="MOVE00001", study_description="move benchmark", instance_number=i + 1)
        paths.append(out / f"move{i:02d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return uid, paths


def _index(stack: Stack, real: list[Path], total: int, rng: np.random.Generator) -> list[str]:
    """Catalogue rows for the real studies (clustered vectors) and synthetic filler; the real StudyInstanceUIDs."""
    http, url = stack.http(), stack.config.orthanc_url
    centres = _unit(rng.standard_normal((len(real) // CLUSTER + 1, DIM)))
    uids = []
    with IndexStore(stack.config.settings().index_dir, snapshot_every=total + 1) as store:
        for i, path in enumerate(real):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            study = next(x["ID"] for x in http.post(f"{url}/tools/lookup", data=str(ds.StudyInstanceUID)).json()
                         if x["Type"] == "Study")
            [instance] = http.get(f"{url}/studies/{study}/instances").json()
            record = InstanceRecord(
                sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
                series_instance_uid=str(ds.SeriesInstanceUID), study_instance_uid=str(ds.StudyInstanceUID),
                patient_id=str(ds.PatientID), study_date=str(ds.StudyDate), modality="US",
                orthanc_instance_id=instance["ID"], orthanc_series_id=instance["ParentSeries"],
                orthanc_study_id=study, encoder="us", model_version=MODEL,
            )
            store.add(record, _unit(centres[i // CLUSTER] + 0.35 * _unit(rng.standard_normal(DIM))))
            uids.append(str(ds.StudyInstanceUID))
        for j in range(total - len(real)):
            study = f"synthetic-study-{j // 4:05d}"
            record = InstanceRecord(
                sop_instance_uid=f"2.25.{j}", sop_class_uid="1.2.840.10008.5.1.4.1.1.6.1",
                series_instance_uid=f"2.25.9{j // 4}", study_instance_uid=f"2.25.8{j // 4}",
                patient_id=f"S{j // 4:05d}", study_date="20240101", modality="US",
                orthanc_instance_id=f"synthetic-instance-{j:05d}", orthanc_series_id=f"synthetic-series-{j // 4:05d}",
                orthanc_study_id=study, encoder="us", model_version=MODEL,
            )
            store.add(record, _unit(rng.standard_normal(DIM)))
        store.flush()
    return uids


RETURN_KEYS = ("StudyDate", "StudyTime", "ModalitiesInStudy", "NumberOfStudyRelatedInstances", "StudyDescription",
               "PatientID", "PatientName", "AccessionNumber")


def findscu_times(aet: str, port: int, uids: list[str], queries: int) -> tuple[list[float], int]:
    """Wall times of DCMTK's findscu (process, association, C-FIND, release) and the answers of the last one."""
    times, answers = [], 0
    for i in range(queries + 1):
        argv = ["findscu", "-v", "-S", "-aet", "FINDSCU", "-aec", aet, "-k", "QueryRetrieveLevel=STUDY",
                "-k", f"StudyInstanceUID={uids[i % len(uids)]}", *[a for k in RETURN_KEYS for a in ("-k", k)],
                "127.0.0.1", str(port)]
        start = time.perf_counter()
        result = subprocess.run(argv, env=dcmtk_env(), capture_output=True, text=True, timeout=60)
        elapsed = time.perf_counter() - start
        if result.returncode != 0 or "Failed" in result.stderr:
            raise RuntimeError(f"findscu to {aet} failed: {result.stderr[-500:]}")
        answers = result.stderr.count("Find Response: ")
        if i:  # the first query loads the index: not what a radiologist waits for afterwards
            times.append(elapsed)
    return times, answers


def cmove_times(stack: Stack, workstation: Stack, uid: str, moves: int) -> list[float]:
    """Wall times of DCMTK's movescu asking LOOKALIKE to send the study to WORKSTATION (20 instances checked)."""
    ws_http, ws_url = workstation.http(), workstation.config.orthanc_url
    argv = ["movescu", "-S", "-aet", "MOVESCU", "-aec", "LOOKALIKE", "-aem", "WORKSTATION",
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={uid}", "127.0.0.1", str(stack.config.query_port)]
    times = []
    for _ in range(moves):
        start = time.perf_counter()
        result = subprocess.run(argv, env=dcmtk_env(), capture_output=True, text=True, timeout=120)
        times.append(time.perf_counter() - start)
        if result.returncode != 0:
            raise RuntimeError(f"movescu failed: {result.stderr[-500:]}")
        [found] = [x["ID"] for x in ws_http.post(f"{ws_url}/tools/lookup", data=uid).json() if x["Type"] == "Study"]
        held = len(ws_http.get(f"{ws_url}/studies/{found}/instances").json())
        if held != 20:
            raise RuntimeError(f"the workstation holds {held} instances of 20")
        ws_http.delete(f"{ws_url}/studies/{found}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--moves", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        real = make_instances(tmp / "real", 4 * CLUSTER, prefix="Q")
        move_uid, move_files = _study_of_20(tmp / "move")
        with Stack(StackConfig.create(tmp / "stack"), worker=False) as stack:
            if storescu(stack.config, real + move_files).returncode != 0:
                raise RuntimeError("storescu failed")
            start = time.perf_counter()
            uids = _index(stack, real, args.instances, rng)
            print(f"indexed {args.instances} instances ({len(real)} real studies, the rest synthetic) in "
                  f"{time.perf_counter() - start:.0f} s")
            print(f"C-FIND round trip with DCMTK findscu (process start, association, C-FIND, release), "
                  f"{args.queries} queries, the usual return keys:")
            for aet, port, what in (("LOOKALIKE", stack.config.query_port, f"similar studies at {args.instances} "
                                     "indexed instances"),
                                    (ORTHANC_AET, stack.config.dicom_port, "Orthanc's own study C-FIND, same UIDs")):
                times, answers = findscu_times(aet, port, uids, args.queries)
                print(f"  {aet:9s} ({what}, {answers} answer(s)): p50 {statistics.median(times) * 1000:.0f} ms, "
                      f"p95 {_percentile(times, 0.95) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms")
            found = [float(ms) for ms in re.findall(r"found in (\d+) ms", (stack.config.logs / "query-scp.log").read_text())]
            print(f"  of which the endpoint's own work (index search, Orthanc's database, audit line; its log): "
                  f"p50 {statistics.median(found):.0f} ms, p95 {_percentile(found, 0.95):.0f} ms")
            print("  goal: LOOKALIKE p95 < 100 ms")
            ws_config = StackConfig.create(
                tmp / "workstation", with_plugin=False,
                extra_orthanc={"DicomAet": "WORKSTATION",
                               "DicomModalities": {"archive": [ORTHANC_AET, "127.0.0.1", stack.config.dicom_port]}},
            )
            with Stack(ws_config, worker=False) as workstation:
                stack.http().put(f"{stack.config.orthanc_url}/modalities/workstation",
                                 json={"AET": "WORKSTATION", "Host": "127.0.0.1", "Port": ws_config.dicom_port})
                times = cmove_times(stack, workstation, move_uid, args.moves)
            print(f"C-MOVE with DCMTK movescu of a 20-instance study to a second Orthanc, {len(times)} runs: median "
                  f"{statistics.median(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
