"""Helpers shared by the test modules (fixtures are in ``conftest.py``): sample studies and the stack's answers,
fakes of Orthanc and of an encoder, the programs the tests drive (DCMTK, dicom3tools, the systemd units, a
browser). Test modules import from here, never from one another."""

from __future__ import annotations

import configparser
import csv
import io
import json
import logging
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, UltrasoundImageStorage, generate_uid

from lookalike.encoders.base import Embedding
from lookalike.encoders.lesion import LesionBox
from lookalike.lab.samples import wrap_image
from lookalike.index.catalogue import InstanceRecord
from lookalike.index.segments import Manifest
from lookalike.index.store import IndexStore
from lookalike.orthanc.client import OrthancNotFoundError, OrthancUnavailableError

if TYPE_CHECKING:
    from lookalike.ops.stack import Stack

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "deploy" / "samples"
#: The systemd units of ``deploy/systemd``.
UNITS = REPO / "deploy" / "systemd"
#: Flags that work headless on these machines (no GPU, no sandbox, nothing fetched in the background).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


# --- programs and waiting ---------------------------------------------------------------------------------------

def require_programs(*names: str) -> None:
    """Fail (not skip) where a program ``make install`` provides is missing."""
    missing = [n for n in names if shutil.which(n) is None and not Path(f"/usr/sbin/{n}").exists()]
    if missing:
        pytest.fail(f"missing programs {missing}: run `make install`")


def require_tool(name: str) -> str:
    """The path of an optional tool; skip where it is not installed."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def wait_for(probe, timeout: float = 60.0, interval: float = 0.25, what: str = "condition"):
    """Poll ``probe`` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# --- data sets on disk ------------------------------------------------------------------------------------------

def write_image_set(root: Path, rows, extra_columns: tuple[str, ...] = ()) -> Path:
    """Write a data set as ``lookalike train|evaluate|embed|lesions`` read it: image files and ``manifest.csv``.

    ``rows`` yields ``(relative path, PIL image, label, group, split)``, or that and a dict giving each of
    ``extra_columns`` a value: a string, or ``(relative path, PIL image)`` for a file to save (a lesion mask).
    Each image is saved under ``root`` in the format its suffix names. Returns ``root``.
    """

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


# --- DICOM instances --------------------------------------------------------------------------------------------

def dicom_bytes(ds: pydicom.Dataset) -> bytes:
    """``ds`` as a Part 10 file."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def random_us(seed: int) -> pydicom.Dataset:
    """A small US instance of random pixels, patient ``P{seed}``, in a study of its own."""
    pixels = np.random.default_rng(seed).integers(0, 255, (64, 80), dtype=np.uint8)
    return wrap_image(
        pixels, "US", patient_id=f"P{seed}", patient_name="T^T", patient_birth_date="19700101", patient_sex="F",
        study_instance_uid=pydicom.uid.generate_uid(), study_date="20250101", study_time="090000",
        accession_number="A1", study_description="test",
    )


def us_instance(study_uid: str, series_uid: str, *, patient_id: str = "QUERY-PATIENT-42",
                with_pixels: bool = True) -> Dataset:
    """A minimal Ultrasound Image Storage instance of the query patient (8x8 pixels), as documents' evidence."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    ds.SOPClassUID = UltrasoundImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Query^Patient"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19800214"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = "20240305"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC0001"
    ds.StudyID = "S1"
    ds.ReferringPhysicianName = "Referrer^Rita"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.Modality = "US"
    ds.Manufacturer = "Acme Ultrasound"
    ds.InstanceNumber = 1
    if with_pixels:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = 8
        ds.Columns = 8
        ds.BitsAllocated = 8
        ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.PixelData = np.arange(64, dtype=np.uint8).tobytes()
    return ds


def sample_pixels(modality: str, n: int) -> list[np.ndarray]:
    """The pixels of the first ``n`` sample files of ``modality`` (``deploy/samples``)."""
    out = []
    for f in sorted(SAMPLES.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        if ds.Modality == modality:
            out.append(ds.pixel_array)
        if len(out) == n:
            break
    assert len(out) == n, f"need {n} {modality} samples in {SAMPLES}"
    return out


def make_study(pixels: np.ndarray, modality: str, patient: str, tmp: Path, name: str,
               date: str = "20250301") -> tuple[Path, pydicom.Dataset]:
    """A one-instance study of ``pixels`` for ``patient``, saved as ``tmp/name.dcm``: the file and its dataset."""
    ds = wrap_image(
        pixels.astype(np.uint8), modality,
        patient_id=patient, patient_name=f"TEST^{patient}", patient_birth_date="19700101", patient_sex="F",
        study_instance_uid=pydicom.uid.generate_uid(), study_date=date, study_time="101500",
        accession_number=patient[-8:], study_description=f"test {modality}",
    )
    path = tmp / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, ds


def noisy(pixels: np.ndarray, seed: int) -> np.ndarray:
    """A near copy of ``pixels``: each pixel moved by at most 6 grey levels."""
    rng = np.random.default_rng(seed)
    return np.clip(pixels.astype(np.int16) + rng.integers(-6, 7, pixels.shape), 0, 255).astype(np.uint8)


# --- fakes ------------------------------------------------------------------------------------------------------

class FakeEncoder:
    """An US encoder of simple statistics; a "lesion" is the box of the pixels brighter than 0.99."""

    name = "us"
    model_version = "us-test-1"

    def __init__(self) -> None:
        self.calls = 0
        self.batches: list[list[np.ndarray]] = []

    def embed_with_boxes(self, images: list[np.ndarray]) -> Embedding:
        self.calls += 1
        self.batches.append(images)
        v = np.array([[img.mean(), img.std(), 1.0] for img in images], np.float32)
        boxes = []
        for img in images:
            ys, xs = np.nonzero(img > 0.99)
            boxes.append(LesionBox(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1, 0.9)
                         if xs.size else None)
        return Embedding(v / np.linalg.norm(v, axis=1, keepdims=True), boxes)


class FakeOrthanc:
    """Orthanc's REST API for indexing: instances by Orthanc id, each in its own series and study."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.down = False

    def add(self, instance_id: str, data: bytes) -> None:
        self.files[instance_id] = data

    def get_bytes(self, path: str) -> bytes:
        if self.down:
            raise OrthancUnavailableError("connection refused")
        parts = path.strip("/").split("/")
        if parts[0] == "instances" and len(parts) == 3 and parts[1] in self.files:
            if parts[2] == "file":
                return self.files[parts[1]]
            if parts[2] == "series":
                return json.dumps({"ID": f"se-{parts[1]}", "ParentStudy": f"st-{parts[1]}"}).encode()
        if parts[0] == "instances" and len(parts) == 2 and parts[1] in self.files:
            # Orthanc's main tags of a stored instance (it parsed the file when it stored it).
            try:
                uid = pydicom.dcmread(io.BytesIO(self.files[parts[1]]), stop_before_pixels=True).SOPInstanceUID
            except Exception:
                uid = ""
            return json.dumps({"MainDicomTags": {"SOPInstanceUID": uid}}).encode()
        raise OrthancNotFoundError(path)

    def post_bytes(self, path: str, body: bytes) -> bytes:
        raise AssertionError("indexing never writes to Orthanc")


# --- the running stack ------------------------------------------------------------------------------------------

def lookalike_status(stack: "Stack") -> dict:
    """``GET /lookalike/status`` through Orthanc."""
    return stack.http().get(f"{stack.config.orthanc_url}/lookalike/status", timeout=10).json()


def indexed_total(stack: "Stack") -> int:
    """How many instances the status page counts as indexed."""
    return sum(c["instances"] for c in lookalike_status(stack)["indexed"])


def orthanc_study_id(stack: "Stack", ds: pydicom.Dataset) -> str:
    """Orthanc's id of the study of ``ds``."""
    found = stack.http().post(
        f"{stack.config.orthanc_url}/tools/lookup", data=str(ds.StudyInstanceUID), timeout=10
    ).json()
    return next(x["ID"] for x in found if x["Type"] == "Study")


def live_rows(stack: "Stack") -> list[tuple[str, str, str, str]]:
    """(Orthanc study id, Orthanc instance id, encoder, model version) of every live catalogue row, read-only."""
    from lookalike.index.catalogue import CATALOGUE_FILE

    path = stack.config.state_dir / "index" / CATALOGUE_FILE
    if not path.exists():
        return []
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as conn:
        return conn.execute("SELECT orthanc_study_id, orthanc_instance_id, encoder, model_version FROM instances"
                            " WHERE vector IS NOT NULL").fetchall()


def store_studies(stack: "Stack", made: dict[str, tuple[Path, pydicom.Dataset]], what: str) -> dict:
    """Send ``made`` (name -> (file, dataset)) with storescu and wait until all are indexed: their datasets and
    Orthanc study ids by name."""
    from lookalike.ops.stack import storescu

    before = indexed_total(stack)
    result = storescu(stack.config, [path for path, _ in made.values()])
    assert result.returncode == 0, result.stderr
    wait_for(lambda: indexed_total(stack) >= before + len(made), timeout=180, what=f"indexing of {what}")
    ds = {name: d for name, (_, d) in made.items()}
    return {"ds": ds, "ids": {name: orthanc_study_id(stack, d) for name, d in ds.items()}}


def store_lookup_corpus(stack: "Stack", tmp: Path, prefix: str, images: tuple[int, int, int]) -> dict:
    """Four US studies: ``a`` (the query), ``b`` a noisy near copy of it from another patient, ``prior`` an earlier
    study of ``a``'s patient, ``other`` a third patient's. ``images`` are the sample images (indices among the US
    samples) of ``a``, ``prior`` and ``other``: ones the shipped model scores above its similarity floor against
    ``a``, so that every study is listed (what the floor leaves out is the floor corpus's business). They are
    mirrored, so that other modules' near copies of the same samples do not compete with ``b``."""
    pixels = sample_pixels("US", max(images) + 1)
    us = [np.ascontiguousarray(np.fliplr(pixels[i])) for i in images]
    patient_a, patient_b, patient_d = f"{prefix}A0001", f"{prefix}B0002", f"{prefix}D0004"
    made = {
        "a": make_study(us[0], "US", patient_a, tmp, f"{prefix}a", "20250301"),
        "b": make_study(noisy(us[0], 41), "US", patient_b, tmp, f"{prefix}b", "20240611"),
        "prior": make_study(us[1], "US", patient_a, tmp, f"{prefix}prior", "20230105"),
        "other": make_study(us[2], "US", patient_d, tmp, f"{prefix}other", "20241120"),
    }
    return store_studies(stack, made, "the corpus")


def store_floor_corpus(stack: "Stack", tmp: Path, prefix: str) -> dict:
    """Chest X-rays of two patients. Patient 1's study ``q`` (2025-06-01, normal), a near copy of it made later
    (``later``, 2025-11-17) and an earlier pneumonia study (``low``, 2024-01-01), which the shipped X-ray model
    scores far below its floor against ``q``. Patient 2's study ``r`` and an earlier, alike normal study
    ``r_prior``."""
    dx = sample_pixels("DX", 15)
    p1, p2 = f"{prefix}10001", f"{prefix}20002"
    made = {
        "q": make_study(dx[7], "DX", p1, tmp, f"{prefix}q", "20250601"),
        "later": make_study(noisy(dx[7], 61), "DX", p1, tmp, f"{prefix}later", "20251117"),
        "low": make_study(dx[14], "DX", p1, tmp, f"{prefix}low", "20240101"),
        "r": make_study(dx[8], "DX", p2, tmp, f"{prefix}r", "20250601"),
        "r_prior": make_study(noisy(dx[10], 62), "DX", p2, tmp, f"{prefix}r_prior", "20240301"),
    }
    return {**store_studies(stack, made, "the floor corpus"), "patients": (p1, p2)}


def identities(corpus: dict, *names: str) -> list[str]:
    """PatientID, PatientName and AccessionNumber of the named studies, as they were stored."""
    return [str(value) for name in names for value in (
        corpus["ds"][name].PatientID, corpus["ds"][name].PatientName, corpus["ds"][name].AccessionNumber)]


def findscu(stack: "Stack", out: Path, *keys: str, aet: str = "FINDSCU", model: str = "-S", log: str = "-v",
            port: int | None = None) -> tuple[subprocess.CompletedProcess, list[pydicom.Dataset]]:
    """A C-FIND as a workstation sends it; the responses as DCMTK extracted them (rsp0001.dcm, ...).

    ``log="-d"`` prints the DIMSE command of each response, with its Status and ErrorComment.
    """
    from lookalike.ops.stack import dcmtk_env

    out.mkdir(parents=True, exist_ok=True)
    argv = ["findscu", log, model, "-aet", aet, "-aec", "LOOKALIKE", "-X", "-od", str(out), "-k",
            "QueryRetrieveLevel=STUDY", *[arg for key in keys for arg in ("-k", key)], "127.0.0.1",
            str(port or stack.config.query_port)]
    result = subprocess.run(argv, env=dcmtk_env(), capture_output=True, text=True, timeout=60)
    assert "Bad override key" not in result.stderr, result.stderr  # findscu exits 0 even then
    return result, [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def dimse_failure(stderr: str) -> tuple[int, str]:
    """The Status and Error Comment of the last response DCMTK printed with ``-d`` (the comment "" where none)."""
    statuses = re.findall(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", stderr)
    comments = re.findall(r"\(0000,0902\) LO \[(.*?)\]", stderr)
    assert statuses, stderr
    return int(statuses[-1], 16), comments[-1] if comments else ""


# --- logs -------------------------------------------------------------------------------------------------------

#: A line of the services' own logs (``%(asctime)s %(levelname)s %(name)s: %(message)s``).
LOG_LINE = re.compile(r"^\S+ \S+ (?P<level>[A-Z]+) (?P<name>[\w.]+): (?P<message>.*)$")


def log_lines(text: str, level: str, *names: str) -> list[str]:
    """The messages of a service log's lines at ``level`` that name each of ``names``: what a log line must say
    (the identifiers an administrator acts on) without its wording."""
    found = (LOG_LINE.match(line) for line in text.splitlines())
    return [m["message"] for m in found if m and m["level"] == level and all(n in m["message"] for n in names)]


def log_records(records: list[logging.LogRecord], level: int, *names: str) -> list[str]:
    """As :func:`log_lines`, of the records pytest's ``caplog`` captured."""
    return [r.getMessage() for r in records if r.levelno == level and all(n in r.getMessage() for n in names)]


# --- dicom3tools --------------------------------------------------------------------------------------------------

def dciodvfy(path: Path, iod: str) -> tuple[list[str], list[str]]:
    """dicom3tools' verdict on a file: its Error and Warning lines, after checking that it recognised ``iod``
    (dciodvfy names the IOD it checked against on its first line) and so really checked the file."""
    result = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    assert lines and iod in lines[0], "\n".join(lines)
    return ([line for line in lines if line.startswith("Error")],
            [line for line in lines if line.startswith("Warning")])


def sr_warnings_unexpected(warnings: list[str]) -> list[str]:
    """Known, accepted warning: the private coding scheme designator (declared in the Coding Scheme Identification
    Sequence, which dciodvfy does not consult). Any other warning is unexpected."""
    from lookalike.dicom.sr import CODING_SCHEME_DESIGNATOR

    return [line for line in warnings if f"<{CODING_SCHEME_DESIGNATOR}>" not in line]


# --- the systemd units ------------------------------------------------------------------------------------------

def unit_section(unit: Path, name: str) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(unit)
    return parser[name]


def unit_command(unit: Path, state: Path, instance: str = "1") -> tuple[list[str], dict[str, str]]:
    """The unit's ExecStart and Environment with this machine's paths: state folder, venv, Orthanc; a template
    unit as ``instance``."""
    service = unit_section(unit, "Service")

    def local(text: str) -> str:
        text = text.replace("/var/lib/lookalike", str(state)).replace("%i", instance).replace("%%", "%")
        return text.replace("/opt/lookalike/.venv/bin/python", sys.executable).replace(
            "/usr/sbin/Orthanc", shutil.which("Orthanc") or "/usr/sbin/Orthanc")

    env = dict(os.environ)
    for line in service.get("Environment", "").splitlines():
        for assignment in shlex.split(local(line)):  # systemd: several KEY=VALUE on one line
            key, value = assignment.split("=", 1)
            env[key] = value
    return shlex.split(local(service["ExecStart"])), env


# --- Orthanc Explorer in a browser --------------------------------------------------------------------------------

class Explorer:
    """What a user does and sees on Orthanc Explorer's study page."""

    def __init__(self, page, stack: "Stack", corpus: dict) -> None:
        self.page, self.stack, self.corpus = page, stack, corpus
        self.url = f"{stack.config.orthanc_url}/app/explorer.html"

    def open(self, name: str) -> None:
        """Type the study's address, as from a bookmark or the address bar."""
        self.page.goto(f"{self.url}#study?uuid={self.corpus['ids'][name]}")
        self.wait_shown(name)

    def wait_shown(self, name: str) -> None:
        """Until Orthanc Explorer's study panel shows that study (its StudyInstanceUID)."""
        uid = str(self.corpus["ds"][name].StudyInstanceUID)
        self.page.wait_for_function("uid => $('#study-info').text().indexOf(uid) >= 0", arg=uid)

    def shown_study_uid(self) -> str:
        return self.page.evaluate("$('#study-info').text()")

    def look_up(self) -> list[str]:
        self.page.evaluate("$('#lookalike-results').removeAttr('data-answered')")
        self.page.click("#lookalike-find")
        self.page.wait_for_function("$('#lookalike-results').attr('data-answered')")
        return self.rows()

    def rows(self) -> list[str]:
        """The Orthanc ids of the studies listed, in rank order."""
        return self.page.eval_on_selector_all(".lookalike-result", "rows => rows.map(r => r.dataset.study)")

    def choose_scope(self, label: str) -> None:
        self.page.click(f"#lookalike-scopes label:has-text(\"{label}\")")

    def file_report(self) -> dict:
        """Click the SR button; the report's link as the page shows it."""
        self.page.click("#lookalike-report")
        link = self.page.wait_for_selector(".lookalike-report-link")
        return {"href": link.get_attribute("href"), "status": self.page.inner_text("#lookalike-status")}

    def lookalike_reports(self, name: str) -> list[pydicom.Dataset]:
        """The Lookalike SR documents Orthanc holds in a study."""
        http, url = self.stack.http(), self.stack.config.orthanc_url
        reports = []
        for instance in http.get(f"{url}/studies/{self.corpus['ids'][name]}/instances", timeout=10).json():
            data = http.get(f"{url}/instances/{instance['ID']}/file", timeout=10).content
            ds = pydicom.dcmread(io.BytesIO(data))
            if ds.Modality == "SR" and ds.Manufacturer == "Lookalike":
                reports.append(ds)
        return reports


# ---------------------------------------------------------------- index segments (test_segments, test_index_storage)


def record(i: int, study: int | None = None) -> InstanceRecord:
    study = i // 3 if study is None else study
    return InstanceRecord(
        sop_instance_uid=f"1.2.9.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.6.1",
        series_instance_uid=f"1.2.9.{study}.1", study_instance_uid=f"1.2.9.{study}", patient_id=f"P{study}",
        study_date="20240102", modality="US", orthanc_instance_id=f"inst-{i}", orthanc_series_id=f"series-{study}",
        orthanc_study_id=f"study-{study}", encoder="us", model_version="v1")


def clustered(n: int, dim: int, seed: int, clusters: int = 500, latent: int = 12) -> np.ndarray:
    """Unit vectors with the structure of real embeddings: clusters in a low-dimensional subspace, a little noise.

    ``clusters`` centres in a ``latent``-dimensional space, points scattered around them, mapped to ``dim``
    dimensions by a fixed random projection, plus isotropic noise; the same seed gives the same projection.
    """
    base = np.random.default_rng(1234)
    centres = base.standard_normal((clusters, latent))
    projection = base.standard_normal((latent, dim))
    rng = np.random.default_rng(seed)
    points = centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, latent))
    return unit(points @ projection + 0.1 * rng.standard_normal((n, dim)))


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def exact(reference: dict[int, np.ndarray], queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.array(sorted(reference), dtype=np.int64)
    matrix = np.stack([reference[i] for i in ids])
    scores = unit(queries) @ matrix.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), ids[order]


def manifest(store: IndexStore) -> Manifest:
    return Manifest.read(store.index_path("us", "v1"), ("us", "v1"))


def bulk_fill(store: IndexStore, sizes: list[int], vectors: np.ndarray) -> dict[int, np.ndarray]:
    """One saved segment per batch of ``sizes``, as a back-fill's batches leave them; returns id -> vector."""
    reference, start = {}, 0
    for size in sizes:
        rows = range(start, start + size)
        reference.update(zip(store.add_many([record(i) for i in rows], vectors[start:start + size]),
                             vectors[start:start + size]))
        store.flush()
        start += size
    return reference
