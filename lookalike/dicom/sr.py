"""The similar-cases report: a DICOM Comprehensive SR filed into the query study.

The radiologist reading a study sees, next to its images, a structured report
that lists the most similar other studies of the archive with their rank and
cosine similarity, and references the best-matching instance of each so that a
viewer can open it.  The report is filed under the *query* patient and study;
the similar studies may belong to other patients, so nothing that identifies
them is written except DICOM UIDs, the study date, the modality and the scores.

This module runs inside Orthanc's Python plugin, so it imports neither torch nor
FAISS: only pydicom and highdicom.
"""

from __future__ import annotations

import copy
import datetime
import math
import operator
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import highdicom
import highdicom.sr
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept, RelationshipTypeValues
from pydicom import Dataset
from pydicom.tag import Tag
from pydicom.uid import UID
from pydicom.valuerep import DS

__all__ = [
    "CODING_SCHEME_DESIGNATOR",
    "CODING_SCHEME_IDENTIFICATION",
    "CODES",
    "DEVICE_OBSERVER_UID",
    "MANUFACTURER",
    "SR_SERIES_DESCRIPTION",
    "SimilarCase",
    "build_similarity_report",
    "is_lookalike_document",
]

#: Manufacturer (0008,0070) of every Lookalike document; with Modality "SR" it is
#: how the plugin recognises its own output and avoids indexing it.
MANUFACTURER = "Lookalike"
#: Series Description (0008,103E) of the report series, as shown in viewers' series lists.
SR_SERIES_DESCRIPTION = "Lookalike similar cases"
#: Content Description (0070,0081): one line for worklists that show it.

#: Private coding scheme for concepts that neither DCM nor SCT defines
#: ("similar case", "similarity rank", ...).  "99" prefix marks it private (PS3.16 8.2).
CODING_SCHEME_DESIGNATOR = "99LOOKALIKE"
CODING_SCHEME_IDENTIFICATION = CodingSchemeIdentificationItem(
    designator=CODING_SCHEME_DESIGNATOR,
    name="Lookalike similar-case retrieval",
    version="1",
    responsible_organization=MANUFACTURER,
)

#: Device Observer UID (TID 1004) of the Lookalike software.  Fixed, so that all its
#: reports name the same observer; derived once with
#: ``pydicom.uid.generate_uid(prefix=None, entropy_srcs=["lookalike", "device-observer"])``.
DEVICE_OBSERVER_UID = "2.25.223175300891781715827483858718884993507"


def _private(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator=CODING_SCHEME_DESIGNATOR, meaning=meaning)


def _dcm(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator="DCM", meaning=meaning)


class CODES:
    """Every coded concept of the report, in one place.

    Standard codes are used where one means what is written (PS3.16 DCM and UCUM);
    the rest are private codes of :data:`CODING_SCHEME_DESIGNATOR`, declared in the
    document's Coding Scheme Identification Sequence.
    """

    # Private concepts.
    SIMILAR_CASES_REPORT = _private("SIMREPORT", "Similar cases report")
    SIMILAR_CASE = _private("SIMCASE", "Similar case")
    SIMILARITY_RANK = _private("SIMRANK", "Similarity rank")
    COSINE_SIMILARITY = _private("SIMSCORE", "Cosine similarity")
    BEST_MATCHING_INSTANCE = _private("BESTMATCH", "Best matching instance")
    MATCHED_QUERY_INSTANCE = _private("QUERYINST", "Matched query instance")
    MATCHED_QUERY_SOP_INSTANCE_UID = _private("QUERYSOPUID", "Matched query SOP Instance UID")
    ENCODER_MODEL_VERSION = _private("MODELVER", "Encoder model version")

    # DCM concepts (PS3.16 Annex D).
    STUDY_INSTANCE_UID = _dcm("110180", "Study Instance UID")
    SERIES_INSTANCE_UID = _dcm("112002", "Series Instance UID")
    STUDY_DATE = _dcm("111060", "Study Date")
    MODALITY = _dcm("121139", "Modality")
    SUMMARY = _dcm("121111", "Summary")

    # Units (UCUM).  "{rank}" is a UCUM annotation of the unity: a dimensionless ordinal.
    UNIT_RANK = CodedConcept(value="{rank}", scheme_designator="UCUM", meaning="rank")
    UNIT_ONE = CodedConcept(value="1", scheme_designator="UCUM", meaning="no units")


#: Cosine similarities of unit vectors lie in [-1, 1]; float32 inner products may
#: overshoot by rounding, so allow this much before calling a score wrong.
_SCORE_TOLERANCE = 1e-4

#: Type 2 Patient and General Study attributes that highdicom reads from the first
#: evidence instance; headers from Orthanc may lack them, which DICOM allows.
_TYPE2_QUERY_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)

#: PS3.5 9.1: dot-separated numeric components without leading zeros, at most 64 characters.
_UID_PATTERN = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")

_PIXEL_DATA_TAGS = frozenset(
    Tag(keyword) for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
)


@dataclass(frozen=True)
class SimilarCase:
    """What the report says of one similar study: plain values, and nothing that names its patient.

    The report module sits below the indexer and takes this rather than the indexer's result type, so that it
    can be built from any answer (REST JSON, a stored answer, a test) and cannot reach a field it must not write.
    """

    rank: int
    #: Cosine similarity of the study's best-matching image pair, in [-1, 1].
    score: float
    study_instance_uid: str
    #: DICOM DA (YYYYMMDD), or empty: Study Date is Type 2.
    study_date: str
    modality: str
    model_version: str
    #: The similar study's best-matching instance.
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    #: The query study's instance it matched; empty when unknown.
    query_sop_instance_uid: str = ""

    @classmethod
    def from_answer(cls, answer: Mapping[str, Any]) -> "SimilarCase":
        """From one entry of a lookup answer as the REST route serves it (a best match nested under
        ``best_match``); other keys, such as an identity a site chose to disclose, are ignored."""
        best = answer["best_match"]
        return cls(
            rank=answer["rank"],
            score=answer["score"],
            study_instance_uid=answer["study_instance_uid"],
            study_date=answer.get("study_date") or "",
            modality=answer.get("modality") or "",
            model_version=answer.get("model_version") or "",
            series_instance_uid=best["series_instance_uid"],
            sop_instance_uid=best["sop_instance_uid"],
            sop_class_uid=best["sop_class_uid"],
            query_sop_instance_uid=best.get("query_sop_instance_uid") or "",
        )


def build_similarity_report(
    evidence: Sequence[Dataset],
    matches: Sequence[SimilarCase],
    *,
    algorithm_name: str = "Lookalike",
    algorithm_version: str,
    model_version: str,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    series_number: int = 9901,
    instance_number: int = 1,
    institution_name: str | None = None,
    priors_only: bool = False,
    floors: Mapping[str, float | None] | None = None,
) -> highdicom.sr.ComprehensiveSR:
    """Build the Comprehensive SR that lists the studies most similar to the query study.

    The document inherits patient and study from ``evidence``, so that the PACS files
    it with the study being read, in a new series of its own.  Each similar study
    becomes one "Similar case" CONTAINER holding its rank, cosine similarity, Study
    Instance UID, study date, modality, encoder model version and a reference to its
    best-matching instance (IMAGE for image storage SOP classes, COMPOSITE otherwise;
    the instance is listed in the Pertinent Other Evidence Sequence, as PS3.3 C.17.2
    requires of every object referenced by the content tree).  No name or ID of
    another patient is written.

    Parameters
    ----------
    evidence : Sequence[pydicom.Dataset]
        One or more instances of the query study; headers suffice (pixel data is
        neither needed nor copied).  The first one supplies patient and study
        attributes.
    matches : Sequence[SimilarCase]
        Similar studies ranked 1..n (a lookup's answer, see :meth:`SimilarCase.from_answer`).  May be empty: the report
        then says that no similar study was found, which is itself an answer the
        radiologist should see rather than a missing report.
    algorithm_name : str
        Algorithm Name (DCM 111001) and Device Observer Name.
    algorithm_version : str
        Algorithm Version (DCM 111003): the package version; also Software Versions.
    model_version : str
        Version(s) of the encoder model(s) that produced the embeddings, recorded so
        that a report can be traced back to the index that answered it.
    series_instance_uid, sop_instance_uid : str, optional
        UIDs of the new series and instance; generated when not given.  A caller that derives them from the
        answer gets the same UIDs for the same answer, so that it can find a report it filed before.
    series_number : int
        Series Number of the report series; high so viewers list it after the images.
    instance_number : int
        Instance Number of the report.
    institution_name : str, optional
        Institution Name of the creating device.
    priors_only : bool
        The matches are the query patient's earlier studies only (a ``scope=patient`` lookup): the summary says so.
    floors : Mapping[str, float | None], optional
        The similarity floor each model's matches had to reach (model version -> floor, None: not calibrated):
        the summary states it, so that a short list or an empty one reads as "nothing similar enough", not as a
        missing answer.

    Returns
    -------
    highdicom.sr.ComprehensiveSR
        The report, ready to be written with ``save_as`` or sent to the PACS.

    Raises
    ------
    ValueError
        When ``evidence`` is empty or does not belong to a single study, when ranks
        are not 1..n in order, a score is not a finite cosine similarity, a match is
        the query study itself or appears twice, or a UID or study date is malformed.
        The message names the offending match so the caller's bug can be found.
    """
    query_headers = _query_headers(evidence)
    query_study_uid = str(query_headers[0].StudyInstanceUID)
    _validate_matches(matches, query_study_uid)
    for name, value in (("algorithm_version", algorithm_version), ("model_version", model_version)):
        if not str(value).strip():
            raise ValueError(f"{name} must be a non-empty string")

    query_instances = {str(ds.SOPInstanceUID): str(ds.SOPClassUID) for ds in query_headers}

    root = highdicom.sr.ContainerContentItem(
        name=CODES.SIMILAR_CASES_REPORT,
        is_content_continuous=False,
    )
    items: list[highdicom.sr.ContentItem] = []
    observer = highdicom.sr.ObserverContext(
        observer_type=highdicom.sr.CodedConcept(value="121007", scheme_designator="DCM", meaning="Device"),
        observer_identifying_attributes=highdicom.sr.DeviceObserverIdentifyingAttributes(
            uid=DEVICE_OBSERVER_UID,
            name=algorithm_name,
            manufacturer_name=MANUFACTURER,
        ),
    )
    items.extend(observer)
    items.extend(
        highdicom.sr.AlgorithmIdentification(
            name=algorithm_name,
            version=algorithm_version,
            manufacturer=MANUFACTURER,
        )
    )
    items.append(
        highdicom.sr.TextContentItem(
            name=CODES.ENCODER_MODEL_VERSION,
            value=model_version,
            relationship_type=RelationshipTypeValues.CONTAINS,
        )
    )
    items.append(
        highdicom.sr.TextContentItem(
            name=CODES.SUMMARY,
            value=_summary(len(matches), priors_only, floors or {}),
            relationship_type=RelationshipTypeValues.CONTAINS,
        )
    )

    match_evidence: list[Dataset] = []
    for match in matches:
        items.append(_similar_case_container(match, query_instances))
        match_evidence.append(_reference_stub(match))
    root.ContentSequence = items

    document = highdicom.sr.ComprehensiveSR(
        evidence=[*query_headers, *match_evidence],
        # The items share the module-level CODES concepts; a copy keeps an edit of one
        # document from reaching the constants and every later document.
        content=copy.deepcopy(root),
        series_instance_uid=series_instance_uid or highdicom.UID(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or highdicom.UID(),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,  # machine output, not a signed report
        is_verified=False,
        institution_name=institution_name,
        record_evidence=True,
        series_description=SR_SERIES_DESCRIPTION,
        manufacturer_model_name=algorithm_name,
        software_versions=str(algorithm_version),
        coding_schemes=[copy.deepcopy(CODING_SCHEME_IDENTIFICATION)],
    )
    # Series Date and Time are Type 3, but viewers group and sort series by them: without them a report series
    # lands under "no date". The series is made with its one document, so they are the document's.
    document.SeriesDate = document.ContentDate
    document.SeriesTime = document.ContentTime
    return document


def is_lookalike_document(ds_or_tags: Mapping[str, Any] | Dataset) -> bool:
    """Tell whether an instance is a report written by this module.

    The plugin indexes every stored instance; it must skip its own reports, both
    because they have no pixels to embed and so that a new report does not trigger
    another lookup.

    Parameters
    ----------
    ds_or_tags : Mapping or pydicom.Dataset
        A dataset, or Orthanc tags of an instance in either of its JSON forms:
        simplified (``{"Manufacturer": "Lookalike", ...}``) or full
        (``{"0008,0070": {"Value": "Lookalike", ...}, ...}``).

    Returns
    -------
    bool
        True when Manufacturer is "Lookalike" and Modality is "SR".
    """
    manufacturer = _tag_value(ds_or_tags, "Manufacturer", "0008,0070")
    modality = _tag_value(ds_or_tags, "Modality", "0008,0060")
    return manufacturer == MANUFACTURER and modality == "SR"


def _tag_value(ds_or_tags: Mapping[str, Any] | Dataset, keyword: str, group_element: str) -> str | None:
    if isinstance(ds_or_tags, Dataset):
        value = ds_or_tags.get(keyword)
    else:
        value = None
        for key in (keyword, group_element, group_element.upper(), group_element.replace(",", "")):
            if key in ds_or_tags:
                value = ds_or_tags[key]
                break
        if isinstance(value, Mapping):  # Orthanc "full" JSON: {"Name", "Type", "Value"}
            value = value.get("Value")
    if value is None:
        return None
    # DICOM pads odd-length values with a space; Orthanc and pydicom usually strip it.
    return str(value).strip()


def _query_headers(evidence: Sequence[Dataset]) -> list[Dataset]:
    """Header-only copies of the query instances, checked and completed.

    Pixel data is left out so that building a report never copies images, and the
    Type 2 attributes highdicom reads unconditionally are added empty when absent.
    """
    if isinstance(evidence, Dataset) or len(evidence) == 0:
        raise ValueError("evidence must be a non-empty sequence of instances of the query study")
    headers: list[Dataset] = []
    for position, ds in enumerate(evidence):
        missing = [
            keyword
            for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
            if not str(ds.get(keyword, "") or "").strip()
        ]
        if missing:
            raise ValueError(f"evidence[{position}] lacks {', '.join(missing)}")
        header = Dataset()
        for element in ds:
            if element.tag not in _PIXEL_DATA_TAGS:
                header.add(element)
        headers.append(header)

    study_uids = {str(ds.StudyInstanceUID) for ds in headers}
    if len(study_uids) != 1:
        raise ValueError(f"evidence must come from one study, got Study Instance UIDs {sorted(study_uids)}")
    patient_ids = {str(ds.get("PatientID", "") or "") for ds in headers}
    if len(patient_ids) != 1:
        raise ValueError(f"evidence must come from one patient, got Patient IDs {sorted(patient_ids)}")
    _check_uid(next(iter(study_uids)), "evidence Study Instance UID")

    first = headers[0]
    for keyword in _TYPE2_QUERY_ATTRIBUTES:
        if keyword not in first:
            setattr(first, keyword, "")
    return headers


def _validate_matches(matches: Sequence[SimilarCase], query_study_uid: str) -> None:
    seen: dict[str, int] = {}
    for position, match in enumerate(matches):
        expected_rank = position + 1
        try:
            rank = operator.index(match.rank)
        except TypeError:
            raise ValueError(f"matches[{position}]: rank {match.rank!r} is not an integer") from None
        if isinstance(match.rank, bool) or rank != expected_rank:
            raise ValueError(
                f"matches[{position}]: rank {match.rank!r}, expected {expected_rank}; "
                "matches must be ranked 1..n in order"
            )
        try:
            value = float(match.score)
        except (TypeError, ValueError):
            raise ValueError(f"rank {rank}: score {match.score!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"rank {rank}: score {match.score!r} is not finite")
        if abs(value) > 1.0 + _SCORE_TOLERANCE:
            raise ValueError(f"rank {rank}: score {value!r} is not a cosine similarity in [-1, 1]")
        study_uid = str(match.study_instance_uid)
        _check_uid(study_uid, f"rank {rank}: study_instance_uid")
        _check_uid(str(match.series_instance_uid), f"rank {rank}: series_instance_uid")
        _check_uid(str(match.sop_instance_uid), f"rank {rank}: sop_instance_uid")
        _check_uid(str(match.sop_class_uid), f"rank {rank}: sop_class_uid")
        if study_uid == query_study_uid:
            raise ValueError(f"rank {rank}: the similar study is the query study itself ({study_uid})")
        if study_uid in seen:
            raise ValueError(f"rank {rank}: study {study_uid} is already listed at rank {seen[study_uid]}")
        seen[study_uid] = rank
        _parse_study_date(match.study_date, rank)


def _check_uid(value: str, what: str) -> None:
    if len(value) > 64 or not _UID_PATTERN.fullmatch(value):
        raise ValueError(f"{what} {value!r} is not a valid DICOM UID")


def _parse_study_date(value: str | None, rank: int) -> datetime.date | None:
    """The study date, or None when the similar study has none (Study Date is Type 2)."""
    text = (value or "").strip()
    if not text:
        return None
    # DA is YYYYMMDD; ACR-NEMA era files may still carry YYYY.MM.DD.
    for fmt in ("%Y%m%d", "%Y.%m.%d"):
        try:
            return datetime.datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    raise ValueError(f"rank {rank}: study_date {value!r} is not a DICOM date (YYYYMMDD)")


def _summary(count: int, priors_only: bool = False, floors: Mapping[str, float | None] | None = None) -> str:
    """One sentence the reader sees first: how many studies, of whom, and the floor they had to reach."""
    kind = "earlier stud{} of this patient" if priors_only else "stud{}"
    if count == 0:
        text = f"No similar {kind.format('y')} was found."
    elif count == 1:
        text = f"1 similar {kind.format('y')} was found."
    else:
        text = f"{count} similar {kind.format('ies')} were found."
    floors = floors or {}
    applied = [f"{floor:.4f} ({version})" for version, floor in sorted(floors.items()) if floor is not None]
    if applied:
        text += (" Studies scoring below the model's similarity floor, " + ", ".join(applied) + ", are not listed:"
                 " below it a match shares the query's finding no more often than chance.")
    missing = sorted(version for version, floor in floors.items() if floor is None)
    if missing:
        text += " No similarity floor is known for " + ", ".join(missing) + ": every study is listed, however low."
    return text


def _is_image_sop_class(sop_class_uid: str) -> bool:
    """Whether an IMAGE (rather than COMPOSITE) reference fits the SOP class (PS3.3 C.17.3.2.4)."""
    name = UID(sop_class_uid).name
    return "Image Storage" in name or name.endswith("Volume Storage")


def _instance_reference(
    name: CodedConcept, sop_class_uid: str, sop_instance_uid: str
) -> highdicom.sr.ContentItem:
    item_class: type[highdicom.sr.ImageContentItem] | type[highdicom.sr.CompositeContentItem]
    if _is_image_sop_class(sop_class_uid):
        item_class = highdicom.sr.ImageContentItem
    else:
        item_class = highdicom.sr.CompositeContentItem
    return item_class(
        name=name,
        referenced_sop_class_uid=sop_class_uid,
        referenced_sop_instance_uid=sop_instance_uid,
        relationship_type=RelationshipTypeValues.CONTAINS,
    )


def _similar_case_container(
    match: SimilarCase, query_instances: Mapping[str, str]
) -> highdicom.sr.ContainerContentItem:
    contains = RelationshipTypeValues.CONTAINS
    container = highdicom.sr.ContainerContentItem(
        name=CODES.SIMILAR_CASE,
        is_content_continuous=False,
        relationship_type=contains,
    )
    rank = operator.index(match.rank)
    rank_item = highdicom.sr.NumContentItem(
        name=CODES.SIMILARITY_RANK, value=rank, unit=CODES.UNIT_RANK, relationship_type=contains
    )
    # highdicom's DS auto-format writes the integer 1 as "1.0"; a rank reads better as "1".
    rank_item.MeasuredValueSequence[0].NumericValue = DS(str(rank))
    items: list[highdicom.sr.ContentItem] = [
        rank_item,
        # Four decimals, as every other place shows a score: a viewer prints the value as written.
        highdicom.sr.NumContentItem(
            name=CODES.COSINE_SIMILARITY, value=round(float(match.score), 4), unit=CODES.UNIT_ONE,
            relationship_type=contains,
        ),
        highdicom.sr.UIDRefContentItem(
            name=CODES.STUDY_INSTANCE_UID, value=str(match.study_instance_uid), relationship_type=contains
        ),
    ]
    study_date = _parse_study_date(match.study_date, rank)
    if study_date is not None:
        items.append(highdicom.sr.DateContentItem(name=CODES.STUDY_DATE, value=study_date, relationship_type=contains))
    modality = (match.modality or "").strip()
    if modality:
        items.append(highdicom.sr.TextContentItem(name=CODES.MODALITY, value=modality, relationship_type=contains))
    if str(match.model_version or "").strip():
        items.append(
            highdicom.sr.TextContentItem(
                name=CODES.ENCODER_MODEL_VERSION, value=str(match.model_version), relationship_type=contains
            )
        )
    items.append(
        highdicom.sr.UIDRefContentItem(
            name=CODES.SERIES_INSTANCE_UID, value=str(match.series_instance_uid), relationship_type=contains
        )
    )
    items.append(_instance_reference(CODES.BEST_MATCHING_INSTANCE, str(match.sop_class_uid),
                                     str(match.sop_instance_uid)))
    query_uid = str(match.query_sop_instance_uid or "").strip()
    if query_uid in query_instances:
        items.append(_instance_reference(CODES.MATCHED_QUERY_INSTANCE, query_instances[query_uid], query_uid))
    elif query_uid and len(query_uid) <= 64 and _UID_PATTERN.fullmatch(query_uid):
        # Not among the evidence, so its SOP class is unknown and it cannot be
        # referenced as an object; its UID still tells which query image matched.
        items.append(
            highdicom.sr.UIDRefContentItem(
                name=CODES.MATCHED_QUERY_SOP_INSTANCE_UID, value=query_uid, relationship_type=contains
            )
        )
    container.ContentSequence = items
    return container


def _reference_stub(match: SimilarCase) -> Dataset:
    """The four UIDs of a best-matching instance, as evidence for highdicom.

    highdicom refuses content that references an instance missing from the evidence;
    the stub carries only what the Pertinent Other Evidence Sequence records, so no
    attribute of the other patient can leak into the report.
    """
    stub = Dataset()
    stub.StudyInstanceUID = str(match.study_instance_uid)
    stub.SeriesInstanceUID = str(match.series_instance_uid)
    stub.SOPInstanceUID = str(match.sop_instance_uid)
    stub.SOPClassUID = str(match.sop_class_uid)
    return stub
