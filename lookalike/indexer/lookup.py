"""Study-level similarity: what a radiologist asks for, built from instance-level FAISS hits."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MatchedInstance:
    """The instance of a similar study that best matched one instance of the query study."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    orthanc_instance_id: str
    #: The query study's instance it matched.
    query_sop_instance_uid: str
    score: float


@dataclass(frozen=True)
class SimilarStudy:
    """One ranked answer to "which other studies look like this one"."""

    rank: int
    study_instance_uid: str
    orthanc_study_id: str
    patient_id: str
    study_date: str
    modality: str
    #: Cosine similarity in [-1, 1]; the study's score is its best instance pair (see :func:`similar_studies`).
    score: float
    model_version: str
    best_match: MatchedInstance
