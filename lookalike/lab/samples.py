"""Wrap plain 8-bit images as standard DICOM instances, and build the bundled sample studies.

Two uses:

* :func:`wrap_image` makes a valid Ultrasound Image or Digital X-Ray (For Presentation) instance out of a 2-D
  ``uint8`` array. Tests call it to make near-copies of an image under another patient and study, which is
  what end-to-end retrieval tests need.
* :func:`make_sample_studies` (also ``python -m lookalike.lab.samples``) turns a few test-split images of
  the public BUSI (breast ultrasound) and Kermany (paediatric chest X-ray) datasets into studies of synthetic
  patients, so that a fresh Orthanc has something to search. The image labels go to a side file
  ``index.csv`` and never into the DICOM, where they would give the retrieval away.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    UltrasoundImageStorage,
    generate_uid,
)

__all__ = ["INDEX_COLUMNS", "SOP_CLASS_FOR_MODALITY", "wrap_image", "make_sample_studies", "main"]

#: The storage SOP Class each supported modality is written as.
SOP_CLASS_FOR_MODALITY: dict[str, str] = {
    "US": UltrasoundImageStorage,
    "DX": DigitalXRayImageStorageForPresentation,
}

#: Columns of ``index.csv``: the label and source of every sample file, kept out of the DICOM.
INDEX_COLUMNS: list[str] = ["file", "modality", "label", "source_image", "patient_id", "study_instance_uid", "study_date"]

_MANUFACTURER = "Lookalike"
_SOFTWARE_VERSION = "lookalike-samples 1"
_IMPLEMENTATION_VERSION_NAME = "LOOKALIKE_1"


def _uid(explicit: str | None, entropy: Sequence[str] | None, role: str) -> str:
    """Return `explicit`, else a UID derived from `entropy` (reproducible), else a random one."""
    if explicit:
        return explicit
    if entropy is not None:
        return generate_uid(entropy_srcs=[*entropy, role])
    return generate_uid()


def wrap_image(
    pixels: np.ndarray,
    modality: str,
    *,
    patient_id: str,
    patient_name: str,
    patient_birth_date: str,
    patient_sex: str,
    study_instance_uid: str,
    study_date: str,
    study_time: str,
    accession_number: str,
    study_description: str,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    series_number: int = 1,
    instance_number: int = 1,
    institution_name: str = "Lookalike Sample Hospital",
    body_part_examined: str | None = None,
    patient_orientation: Sequence[str] = ("L", "F"),
    imager_pixel_spacing: float | None = None,
    uid_entropy: Sequence[str] | None = None,
) -> FileDataset:
    """Make a standard DICOM instance (US or DX) holding `pixels` as 8-bit MONOCHROME2.

    The result passes the dicom3tools validator ``dciodvfy`` without errors, so Orthanc and viewers accept
    it like an instance from a modality.

    Parameters
    ----------
    pixels
        2-D ``uint8`` array, rows x columns.
    modality
        "US" gives Ultrasound Image Storage; "DX" gives Digital X-Ray Image Storage - For Presentation
        (Presentation Intent Type FOR PRESENTATION, identity window over 0..255).
    patient_id, patient_name, patient_birth_date, patient_sex
        Patient module; dates as DICOM DA (``YYYYMMDD``), sex "F", "M" or "O".
    study_instance_uid, study_date, study_time, accession_number, study_description
        General Study module; the study date and time also become the series, acquisition and content
        date and time.
    series_instance_uid, sop_instance_uid
        Generated when not given: reproducibly from `uid_entropy` if that is given, else at random.
    series_number, instance_number, institution_name
        As in the General Series, General Image and General Equipment modules.
    body_part_examined
        Defaults to "BREAST" for US and "CHEST" for DX.
    patient_orientation
        DX only: directions of the row and column axes; the default ("L", "F") is a chest radiograph
        displayed as usual (patient's left on the viewer's right, feet down).
    imager_pixel_spacing
        DX only, in mm (type 1 in the DX Detector module). The sources were resized and their spacing is
        unknown, so the default assumes a 360 mm field across the longer side.
    uid_entropy
        Strings that make the generated UIDs reproducible (e.g. the source image's name): the same
        entropy always gives the same Series and SOP Instance UIDs.

    Returns
    -------
    pydicom.dataset.FileDataset
        With file meta information (Explicit VR Little Endian) and preamble; ``dcmwrite`` or ``save_as``
        writes it as a Part 10 file.

    Raises
    ------
    TypeError
        If `pixels` is not a 2-D ``uint8`` array.
    ValueError
        If `modality` is not "US" or "DX".
    """
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 2:
        shape = getattr(pixels, "shape", None)
        dtype = getattr(pixels, "dtype", type(pixels).__name__)
        raise TypeError(f"pixels must be a 2-D uint8 array, not {dtype} of shape {shape}")
    modality = modality.upper()
    if modality not in SOP_CLASS_FOR_MODALITY:
        raise ValueError(f"modality must be one of {sorted(SOP_CLASS_FOR_MODALITY)}, not {modality!r}")
    if pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise TypeError(f"pixels must not be empty, got shape {pixels.shape}")

    sop_class_uid = SOP_CLASS_FOR_MODALITY[modality]
    series_instance_uid = _uid(series_instance_uid, uid_entropy, "series")
    sop_instance_uid = _uid(sop_instance_uid, uid_entropy, "instance")

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = _IMPLEMENTATION_VERSION_NAME

    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)

    # SOP Common
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceCreationDate = study_date
    ds.InstanceCreationTime = study_time

    # Patient
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = patient_birth_date
    ds.PatientSex = patient_sex

    # General Study
    ds.StudyInstanceUID = study_instance_uid
    ds.StudyDate = study_date
    ds.StudyTime = study_time
    ds.ReferringPhysicianName = ""
    ds.StudyID = accession_number[-16:]
    ds.AccessionNumber = accession_number
    ds.StudyDescription = study_description

    # General Series (+ DX Series)
    ds.Modality = modality
    ds.SeriesInstanceUID = series_instance_uid
    ds.SeriesNumber = series_number
    ds.SeriesDate = study_date
    ds.SeriesTime = study_time
    ds.BodyPartExamined = body_part_examined or ("BREAST" if modality == "US" else "CHEST")

    # General Equipment
    ds.Manufacturer = _MANUFACTURER
    ds.InstitutionName = institution_name
    ds.SoftwareVersions = _SOFTWARE_VERSION

    # General Image / General Acquisition
    ds.InstanceNumber = instance_number
    ds.ContentDate = study_date
    ds.ContentTime = study_time
    ds.AcquisitionDate = study_date
    ds.AcquisitionTime = study_time
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.DerivationDescription = "8-bit grayscale image of a public dataset, wrapped as DICOM"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"

    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = (int(n) for n in pixels.shape)
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds["PixelData"].VR = "OB"

    if modality == "US":
        _add_us_modules(ds)
    else:
        spacing = imager_pixel_spacing or 360.0 / max(pixels.shape)
        _add_dx_modules(ds, patient_orientation, spacing)
    return ds


def _anatomic_region(body_part: str) -> list[pydicom.Dataset]:
    """Anatomic Region Sequence for the body parts the samples use (SNOMED CT codes of PS3.16 CID 4031)."""
    code = _SNOMED_REGION.get(body_part)
    if code is None:
        return []  # type 2: present and empty when the region has no code here
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code[0], "SCT", code[1]
    return [item]


_SNOMED_REGION: dict[str, tuple[str, str]] = {
    "BREAST": ("76752008", "Breast"),
    "CHEST": ("51185008", "Chest"),
    "ABDOMEN": ("818983003", "Abdomen"),
}

#: US Image Type value 3 (PS3.3 C.8.5.6.1.1) for the body parts that have a defined term.
_US_IMAGE_TYPE_3: dict[str, str] = {"BREAST": "BREAST", "ABDOMEN": "ABDOMINAL", "CHEST": "CHEST"}


def _add_us_modules(ds: pydicom.Dataset) -> None:
    """Attributes of the US Image module (PS3.3 C.8.5.6) beyond the Image Pixel module."""
    body_part = str(ds.BodyPartExamined)
    # Value 4 0001 = 2D imaging (C.8.5.6.1.1).
    ds.ImageType = ["DERIVED", "PRIMARY", _US_IMAGE_TYPE_3.get(body_part, ""), "0001"]
    ds.PatientOrientation = ""
    ds.AnatomicRegionSequence = _anatomic_region(body_part)
    ds.Laterality = ""  # type 2C for a paired body part; which breast is unknown for these images


def _add_dx_modules(ds: pydicom.Dataset, patient_orientation: Sequence[str], imager_pixel_spacing: float) -> None:
    """Attributes of the DX Series, DX Anatomy Imaged, DX Image and DX Detector modules (PS3.3 C.8.11)."""
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["DERIVED", "PRIMARY", ""]
    ds.PatientOrientation = list(patient_orientation)
    ds.ImageLaterality = "U"
    ds.AnatomicRegionSequence = _anatomic_region(str(ds.BodyPartExamined))
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY"
    ds.WindowCenter = 128  # LINEAR window 128/256: the stored values 0..255 as they are
    ds.WindowWidth = 256
    ds.DetectorType = ""
    ds.ImagerPixelSpacing = [round(imager_pixel_spacing, 4)] * 2
    ds.AcquisitionContextSequence = []


# ---------------------------------------------------------------------------------------- sample studies


@dataclass(frozen=True)
class _Source:
    """One test-split image chosen for a sample study."""

    dataset: str  # folder under the data root
    path: str  # as in manifest.csv
    label: str
    patient: str  # the source's own patient grouping (Kermany) or "" when the source has none


def _read_manifest(folder: Path) -> list[dict[str, str]]:
    with open(folder / "manifest.csv", newline="") as fp:
        return list(csv.DictReader(fp))


def _pick_busi(root: Path, n: int, rng: np.random.Generator) -> list[_Source]:
    """`n` test images spread evenly over benign, malignant and normal."""
    rows = [r for r in _read_manifest(root / "busi") if r["split"] == "test"]
    labels = sorted({r["label"] for r in rows})
    picked: list[_Source] = []
    for i, label in enumerate(labels):
        pool = sorted((r for r in rows if r["label"] == label), key=lambda r: r["path"])
        count = n // len(labels) + (1 if i < n % len(labels) else 0)
        for j in rng.choice(len(pool), size=min(count, len(pool)), replace=False):
            picked.append(_Source("busi", pool[j]["path"], label, ""))
    return picked


def _pick_kermany(root: Path, n: int, rng: np.random.Generator, n_follow_up: int) -> list[_Source]:
    """`n` test images, half normal and half pneumonia; `n_follow_up` patients contribute two images."""
    rows = [r for r in _read_manifest(root / "kermany_cxr") if r["split"] == "test"]
    by_patient: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_patient.setdefault(r.get("patient") or r["path"], []).append(r)
    picked: list[_Source] = []
    used: set[str] = set()
    repeat = sorted(p for p, rs in by_patient.items() if len(rs) >= 2)
    for k in rng.choice(len(repeat), size=min(n_follow_up, len(repeat), n // 2), replace=False):
        patient = repeat[k]
        pair = sorted(by_patient[patient], key=lambda r: r["path"])[:2]
        picked += [_Source("kermany_cxr", r["path"], r["label"], patient) for r in pair]
        used.add(patient)
    for label in ("normal", "pneumonia"):
        want = (n + (1 if label == "normal" else 0)) // 2 - sum(s.label == label for s in picked)
        pool = sorted((p for p, rs in by_patient.items() if p not in used and rs[0]["label"] == label))
        for k in rng.choice(len(pool), size=max(0, min(want, len(pool))), replace=False):
            r = sorted(by_patient[pool[k]], key=lambda r: r["path"])[0]
            picked.append(_Source("kermany_cxr", r["path"], r["label"], pool[k]))
            used.add(pool[k])
    return picked[:n]


def _load_gray(path: Path) -> np.ndarray:
    """The source image as a 2-D uint8 array (the datasets are already grayscale)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("L"), dtype=np.uint8)


def _study_time(rng: np.random.Generator) -> str:
    seconds = int(rng.integers(7 * 3600, 18 * 3600))
    return f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"


def make_sample_studies(data_root: Path, out_dir: Path, n_us: int = 18, n_xr: int = 18, seed: int = 0) -> list[Path]:
    """Write one single-image study per chosen test image, and ``index.csv`` with the labels.

    Every run with the same arguments writes byte-identical files (UIDs come from
    ``generate_uid(entropy_srcs=...)``; patients, dates and choices from ``seed``).

    Parameters
    ----------
    data_root
        Folder holding ``busi/`` and ``kermany_cxr/``, each with its ``manifest.csv`` (``path,label,group,
        split[,patient]``).
    out_dir
        Where ``us_NNN.dcm``, ``xr_NNN.dcm`` and ``index.csv`` go (created if needed).
    n_us, n_xr
        Number of ultrasound (BUSI) and chest X-ray (Kermany) studies.
    seed
        Seeds the choice of images and the synthetic patients.

    Returns
    -------
    list[pathlib.Path]
        The DICOM files written, ultrasound first.
    """
    data_root, out_dir = Path(data_root), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written: list[Path] = []
    index_rows: list[dict[str, str]] = []

    plans = [
        ("US", "us", _pick_busi(data_root, n_us, rng), "US BREAST", "F", (25, 75)),
        ("DX", "xr", _pick_kermany(data_root, n_xr, rng, n_follow_up=max(1, n_xr // 6)), "XR CHEST 1 VIEW", "", (1, 5)),
    ]
    start, span_days = dt.date(2024, 1, 8), (dt.date(2026, 6, 30) - dt.date(2024, 1, 8)).days
    for modality, stem, sources, description, sex, age_years in plans:
        # Patients: Kermany keeps its own grouping; BUSI has none, so every sixth image is a follow-up
        # study of the previous patient.
        patient_keys: list[str] = []
        for i, source in enumerate(sources):
            if source.patient:
                patient_keys.append(source.patient)
            elif i % 6 == 5:
                patient_keys.append(patient_keys[-1])
            else:
                patient_keys.append(f"{stem}-{i}")
        order = list(dict.fromkeys(patient_keys))
        patients = {}
        for number, key in enumerate(order, start=1):
            first_date = start + dt.timedelta(days=int(rng.integers(0, span_days - 300)))
            age_days = int(rng.integers(age_years[0] * 365, age_years[1] * 365))
            patients[key] = {
                "id": f"LKS-{modality}-{number:03d}",
                "name": f"SAMPLE^{modality}{number:03d}",
                "birth": (first_date - dt.timedelta(days=age_days)).strftime("%Y%m%d"),
                "sex": sex or str(rng.choice(["F", "M"])),
                "next_date": first_date,
                "studies": 0,
            }
        for i, (source, key) in enumerate(zip(sources, patient_keys), start=1):
            patient = patients[key]
            study_date = patient["next_date"]
            patient["next_date"] = study_date + dt.timedelta(days=int(rng.integers(90, 300)))
            patient["studies"] += 1
            entropy = ["lookalike-samples", str(seed), source.dataset, source.path]
            pixels = _load_gray(data_root / source.dataset / source.path)
            ds = wrap_image(
                pixels,
                modality,
                patient_id=patient["id"],
                patient_name=patient["name"],
                patient_birth_date=patient["birth"],
                patient_sex=patient["sex"],
                study_instance_uid=generate_uid(entropy_srcs=[*entropy, "study"]),
                study_date=study_date.strftime("%Y%m%d"),
                study_time=_study_time(rng),
                accession_number=f"LKS{modality}{i:04d}",
                study_description=description,
                uid_entropy=entropy,
            )
            path = out_dir / f"{stem}_{i:03d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            written.append(path)
            index_rows.append(
                {
                    "file": path.name,
                    "modality": modality,
                    "label": source.label,
                    "source_image": f"{source.dataset}/{source.path}",
                    "patient_id": patient["id"],
                    "study_instance_uid": ds.StudyInstanceUID,
                    "study_date": ds.StudyDate,
                }
            )

    with open(out_dir / "index.csv", "w", newline="") as fp:
        writer = csv.DictWriter(fp, fieldnames=INDEX_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(index_rows)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m lookalike.lab.samples --data ../shared/data --out deploy/samples``."""
    parser = argparse.ArgumentParser(description=make_sample_studies.__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with busi/ and kermany_cxr/")
    parser.add_argument("--out", type=Path, required=True, help="output folder, e.g. deploy/samples")
    parser.add_argument("--n-us", type=int, default=18)
    parser.add_argument("--n-xr", type=int, default=18)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    written = make_sample_studies(args.data, args.out, n_us=args.n_us, n_xr=args.n_xr, seed=args.seed)
    total = sum(p.stat().st_size for p in written)
    print(f"wrote {len(written)} instances ({total / 1e6:.1f} MB) and index.csv to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
