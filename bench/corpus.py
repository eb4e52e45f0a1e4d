"""Instances for the benchmarks: the bundled samples' pixels under fresh UIDs, one study each."""

from __future__ import annotations

from pathlib import Path

import pydicom

from lookalike.lab.samples import wrap_image

SAMPLES = Path(__file__).resolve().parent.parent / "deploy" / "samples"


def make_instances(out: Path, n: int, modality: str = "US", prefix: str = "B", per_study: int = 1) -> list[Path]:
    """``n`` instances of ``modality`` made from the sample pixels, written to ``out``: studies of ``per_study``
    instances, in one series each (single-instance studies by default)."""
    pixels = [ds.pixel_array for ds in map(pydicom.dcmread, sorted(SAMPLES.glob("*.dcm"))) if ds.Modality == modality]
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        if i % per_study == 0:
            study, series, first = pydicom.uid.generate_uid(), pydicom.uid.generate_uid(), i
        ds = wrap_image(
            pixels[i % len(pixels)], modality,
            patient_id=f"{prefix}{first:05d}", patient_name=f"BENCH^{prefix}{first:05d}",
            patient_birth_date="19700101", patient_sex="F", study_instance_uid=study, series_instance_uid=series,
            instance_number=i - first + 1, study_date="20250101", study_time="080000",
            accession_number=f"{prefix}{first:05d}", study_description="benchmark",
        )
        path = out / f"{prefix}{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
