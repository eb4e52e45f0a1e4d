"""The similar priors as Key Object Selection documents: the same patient's earlier studies, by their key images.

Viewers that hide SR text (Weasis, dcm4chee's) show a Key Object Selection (KOS) as a list of key images one click
away. This one selects the query study's matched image(s) and, in rank order, the best-matching image of each of the
same patient's most similar prior studies; its Key Object Description says rank, date, modality and score.

What PS3.3 allows, and why several documents come out:

- The Key Object Document Module (C.17.6.2) lists *every* referenced instance, whatever its study, in the
  Current Requested Procedure Evidence Sequence (Type 1); a KOS has no Pertinent Other Evidence Sequence.
- A KOS that references instances of more than one study "shall be duplicated into each of those other Studies"
  (C.17.6.2.1), each duplicate with its own Study/Series/SOP Instance UID and all of them listing the others in
  the Identical Documents Sequence (C.17.2.2).

So the selection is one document in the query study and an identical copy in each prior study. That is only
possible within one patient (a study belongs to one patient), which is also the privacy rule: every referenced
instance must carry the query study's Patient ID, or nothing is built. highdicom's ``KeyObjectSelectionDocument``
constructor refuses evidence from more than one other study, so the documents are assembled from highdicom's parts
(:class:`highdicom.ko.KeyObjectSelection` for the TID 2010 content, :func:`highdicom.sr.utils.collect_evidence` for
the evidence, :class:`highdicom.base.SOPClass` for the header) and read back through
``KeyObjectSelectionDocument.from_dataset``.

Like :mod:`lookalike.dicom.sr`, this runs inside Orthanc's Python plugin and takes plain data.
"""

from __future__ import annotations

import copy
import datetime
from collections.abc import Mapping, Sequence

import highdicom
from highdicom.base import SOPClass
from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
from highdicom.sr import CodedConcept, DeviceObserverIdentifyingAttributes, ObserverContext
from highdicom.sr.utils import collect_evidence
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, KeyObjectSelectionDocumentStorage

from lookalike.dicom.study_order import is_prior
from lookalike.dicom.sr import (
    DEVICE_OBSERVER_UID,
    MANUFACTURER,
    SimilarCase,
    _parse_study_date,
    _query_headers,
    _validate_matches,
)

__all__ = ["DOCUMENT_TITLE", "KOS_SERIES_DESCRIPTION", "build_prior_selection"]

#: Series Description (0008,103E) of the KOS series, in the query study and in each prior study.
KOS_SERIES_DESCRIPTION = "Lookalike similar priors"
#: Document title from CID 7010 (Key Object Selection Document Title): the images are selected as of interest for
#: reading the query study; no other title of that list fits a comparison with priors better.
DOCUMENT_TITLE = CodedConcept(value="113000", scheme_designator="DCM", meaning="Of Interest")
_DEVICE = CodedConcept(value="121007", scheme_designator="DCM", meaning="Device")


def build_prior_selection(
    query_evidence: Sequence[Dataset],
    priors: Sequence[SimilarCase],
    prior_evidence: Sequence[Dataset],
    *,
    algorithm_name: str = "Lookalike",
    algorithm_version: str,
    document_uids: Mapping[str, tuple[str, str]] | None = None,
    series_number: int = 9902,
    instance_number: int = 1,
    institution_name: str | None = None,
) -> list[KeyObjectSelectionDocument]:
    """Build the KOS of the query study's most similar priors and its identical copies in the prior studies.

    Parameters
    ----------
    query_evidence : Sequence[pydicom.Dataset]
        Headers of instances of the query study (pixel data is neither needed nor copied); the first supplies the
        patient and study of the query study's document. Those a prior matched are referenced, before the priors.
    priors : Sequence[SimilarCase]
        The same patient's similar studies, ranked 1..n (a ``scope=patient`` answer). At least one.
    prior_evidence : Sequence[pydicom.Dataset]
        The header of each prior's best-matching instance, as stored: it proves the instance is the query
        patient's and gives its study's attributes to the copy filed there.
    algorithm_name : str
        Device Observer Name and Manufacturer's Model Name.
    algorithm_version : str
        Software Versions and the version named in the description.
    document_uids : Mapping[str, tuple[str, str]], optional
        Series and SOP Instance UID of the document of each study, by Study Instance UID; generated where not
        given. A caller that derives them from the answer finds the documents it filed before.
    series_number, instance_number : int
        Of each document; the series number differs from the SR's so that the two series sort apart.
    institution_name : str, optional
        Institution Name of the creating device.

    Returns
    -------
    list[highdicom.ko.KeyObjectSelectionDocument]
        The query study's document first, then one copy per prior study in rank order; identical content and
        evidence, each with its own study, series and SOP Instance UID and the others in its Identical Documents
        Sequence.

    Raises
    ------
    ValueError
        When there is no prior, the priors are not ranked 1..n or name the query study, a prior's best-matching
        instance is missing from ``prior_evidence`` or disagrees with it, any instance belongs to another
        patient than the query study's (or the query study has no Patient ID to tell), or a prior is not dated
        before the query study (StudyDate, then StudyTime).
    """
    query_headers = _query_headers(query_evidence)
    query = query_headers[0]
    query_study_uid = str(query.StudyInstanceUID)
    if not priors:
        raise ValueError("a Key Object Selection needs at least one prior study to select")
    _validate_matches(priors, query_study_uid)
    if not str(algorithm_version).strip():
        raise ValueError("algorithm_version must be a non-empty string")
    patient = _patient_key(query)
    if not patient[0]:
        raise ValueError("the query study has no Patient ID, so no prior can be shown to be the same patient's")

    by_uid = {str(ds.SOPInstanceUID): ds for ds in prior_evidence}
    prior_headers: dict[str, list[Dataset]] = {}
    for prior in priors:
        ds = by_uid.get(str(prior.sop_instance_uid))
        if ds is None:
            raise ValueError(f"rank {prior.rank}: no evidence for best-matching instance {prior.sop_instance_uid}")
        for keyword, expected in (("StudyInstanceUID", prior.study_instance_uid),
                                  ("SeriesInstanceUID", prior.series_instance_uid),
                                  ("SOPClassUID", prior.sop_class_uid)):
            if str(ds.get(keyword, "")) != str(expected):
                raise ValueError(f"rank {prior.rank}: the evidence's {keyword} {ds.get(keyword)!r} is not the "
                                 f"match's {expected!r}")
        if _patient_key(ds) != patient:
            raise ValueError(f"rank {prior.rank}: study {prior.study_instance_uid} is another patient's; a Key "
                             "Object Selection lists the query patient's own priors only")
        if not _earlier(ds, query):
            raise ValueError(f"rank {prior.rank}: study {prior.study_instance_uid} is not dated before the query "
                             "study; a prior is an earlier study")
        prior_headers.setdefault(str(prior.study_instance_uid), []).extend(_query_headers([ds]))

    query_by_uid = {str(ds.SOPInstanceUID): ds for ds in query_headers}
    selected_query = list({uid: query_by_uid[uid] for uid in (str(p.query_sop_instance_uid) for p in priors)
                           if uid in query_by_uid}.values())
    selected = [*selected_query, *(prior_headers[str(p.study_instance_uid)][0] for p in priors)]

    content = KeyObjectSelection(
        document_title=DOCUMENT_TITLE,
        referenced_objects=selected,
        observer_device_context=ObserverContext(
            observer_type=_DEVICE,
            observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
                uid=DEVICE_OBSERVER_UID, name=algorithm_name, manufacturer_name=MANUFACTURER),
        ),
        description=_description(query, priors, algorithm_name, algorithm_version),
    )
    # highdicom splits the evidence into this study's and other studies'; a KOS lists both in one sequence.
    same_study, other_studies = collect_evidence(selected, content[0], study_instance_uid=query_study_uid)
    current_evidence = same_study + other_studies

    study_headers = {query_study_uid: query, **{uid: headers[0] for uid, headers in prior_headers.items()}}
    uids = {study: (document_uids or {}).get(study) or (highdicom.UID(), highdicom.UID()) for study in study_headers}
    now = datetime.datetime.now()
    documents = []
    for study_uid, header in study_headers.items():
        series_uid, sop_uid = uids[study_uid]
        document = SOPClass(
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=sop_uid,
            sop_class_uid=KeyObjectSelectionDocumentStorage,
            instance_number=instance_number,
            modality="KO",
            manufacturer=MANUFACTURER,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            patient_id=header.PatientID,
            patient_name=header.PatientName,
            patient_birth_date=header.PatientBirthDate,
            patient_sex=header.PatientSex,
            accession_number=header.AccessionNumber,
            study_id=header.StudyID,
            study_date=header.StudyDate,
            study_time=header.StudyTime,
            referring_physician_name=header.ReferringPhysicianName,
            series_description=KOS_SERIES_DESCRIPTION,
            manufacturer_model_name=algorithm_name,
            software_versions=str(algorithm_version),
            institution_name=institution_name,
            # One creation time for all copies: they are the same document.
            content_date=now.date(),
            content_time=now.time(),
            series_date=now.date(),
            series_time=now.time(),
            specific_character_set=header.get("SpecificCharacterSet"),
        )
        for element in copy.deepcopy(content[0]):
            document.add(element)
        document.CurrentRequestedProcedureEvidenceSequence = copy.deepcopy(current_evidence)
        document.IdenticalDocumentsSequence = [_reference(other, *uids[other])
                                               for other in study_headers if other != study_uid]
        # Key Object Document Series Module: Type 2, empty as no Performed Procedure Step is known.
        document.ReferencedPerformedProcedureStepSequence = []
        documents.append(KeyObjectSelectionDocument.from_dataset(document))
    return documents


def _earlier(prior: Dataset, query: Dataset) -> bool:
    """Whether ``prior``'s study was made before ``query``'s, by the lookup's own rule (:func:`is_prior`)."""
    def when(ds: Dataset) -> tuple[str, str]:
        return str(ds.get("StudyDate", "") or ""), str(ds.get("StudyTime", "") or "")

    (date, time), (query_date, query_time) = when(prior), when(query)
    return is_prior(date, query_date, time, query_time)


def _patient_key(ds: Dataset) -> tuple[str, str]:
    """Patient ID and its issuer: two studies are the same patient's when both agree."""
    return str(ds.get("PatientID", "") or "").strip(), str(ds.get("IssuerOfPatientID", "") or "").strip()


def _description(query: Dataset, priors: Sequence[SimilarCase], algorithm_name: str, version: str) -> str:
    """Key Object Description: what was selected and why, the same text in every study it is filed in."""
    query_date = _format_date(str(query.get("StudyDate", "") or ""))
    count = "The earlier study" if len(priors) == 1 else f"The {len(priors)} earlier studies"
    lines = [f"{count} of this patient (dated before the current study) most similar to the study of "
             f"{query_date or 'unknown date'}, selected by {algorithm_name} {version}: the current study's matched "
             "image first, then each earlier study's best-matching image. Score: cosine similarity of the "
             "best-matching image pair."]
    for prior in priors:
        date = _format_date(prior.study_date)
        lines.append(f"#{prior.rank}: study of {date or 'unknown date'}, {prior.modality or 'modality unknown'}, "
                     f"score {float(prior.score):.4f}")
    return "\n".join(lines)


def _format_date(value: str) -> str:
    """A DA as YYYY-MM-DD for the reader; a value that is no date is shown as it is rather than refused."""
    try:
        parsed = _parse_study_date(value, 0)
    except ValueError:
        return value.strip()
    return parsed.isoformat() if parsed else ""


def _reference(study_uid: str, series_uid: str, sop_uid: str) -> Dataset:
    """One item of the Identical Documents Sequence (Hierarchical SOP Instance Reference Macro)."""
    instance = Dataset()
    instance.ReferencedSOPClassUID = KeyObjectSelectionDocumentStorage
    instance.ReferencedSOPInstanceUID = sop_uid
    series = Dataset()
    series.SeriesInstanceUID = series_uid
    series.ReferencedSOPSequence = [instance]
    item = Dataset()
    item.StudyInstanceUID = study_uid
    item.ReferencedSeriesSequence = [series]
    return item
