"""Study-level similarity: what a radiologist asks for, built from instance-level FAISS hits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:  # the store pulls in FAISS; the result types above are useful without it
    from .catalogue import CatalogueRow
    from .store import IndexStore


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


class StudyNotIndexedError(LookupError):
    """The query study has no live indexed instance (not received yet, not indexable, or deleted)."""

    def __init__(self, orthanc_study_id: str) -> None:
        super().__init__(f"study {orthanc_study_id} has no indexed instance")
        self.orthanc_study_id = orthanc_study_id


def similar_studies(store: IndexStore, orthanc_study_id: str, limit: int = 10) -> list[SimilarStudy]:
    """The studies most similar to ``orthanc_study_id``, best first, at most ``limit``.

    Every live instance of the query study searches the index of its (encoder, model_version) for its
    ``k = 4 * limit + n`` nearest instances (``n`` query instances of that index, whose own hits take up to ``n``
    places; the factor 4 leaves room for studies that contribute several instances), capped at the index size.
    Hits from the query study itself are dropped and the rest grouped by study.

    A study's score is the **maximum** over (query instance, gallery instance) pairs, and its ``best_match`` is
    that pair: a radiologist compares one image of the current case with the most similar image of a prior case,
    so one strong pair matters more than many mediocre ones, and a mean would penalise studies with extra views.
    Ties rank by ``study_instance_uid``, so the order is stable.

    Raises
    ------
    StudyNotIndexedError
        The study has no live instance in the catalogue.
    ValueError
        ``limit`` is below 1.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    query_rows = store.catalogue.rows_for_study(orthanc_study_id, with_vectors=True, live_only=True)
    if not query_rows:
        raise StudyNotIndexedError(orthanc_study_id)

    groups: dict[tuple[str, str], list[CatalogueRow]] = {}
    for row in query_rows:
        groups.setdefault((row.encoder, row.model_version), []).append(row)

    best: dict[str, _Pair] = {}  # by orthanc_study_id
    for (encoder, model_version), rows in sorted(groups.items()):
        vectors = np.stack([row.vector for row in rows])
        scores, ids = store.search(encoder, model_version, vectors, limit * 4 + len(rows))
        gallery = store.catalogue.rows({int(i) for i in ids.ravel() if i >= 0})
        for query_row, row_scores, row_ids in zip(rows, scores, ids):
            for score, hit_id in zip(row_scores.tolist(), row_ids.tolist()):
                hit = gallery.get(hit_id)
                if hit is None or not hit.live or hit.orthanc_study_id == orthanc_study_id:
                    continue  # deleted since the search, or the query study itself
                pair = _Pair(min(1.0, max(-1.0, score)), hit, query_row)  # float32 can step just past ±1
                current = best.get(hit.orthanc_study_id)
                if current is None or pair.beats(current):
                    best[hit.orthanc_study_id] = pair

    ranked = sorted(best.values(), key=lambda pair: (-pair.score, pair.hit.study_instance_uid,
                                                     pair.hit.orthanc_study_id))[:limit]
    return [
        SimilarStudy(
            rank=rank,
            study_instance_uid=hit.study_instance_uid,
            orthanc_study_id=hit.orthanc_study_id,
            patient_id=hit.patient_id,
            study_date=hit.study_date,
            modality=hit.modality,
            score=score,
            model_version=hit.model_version,
            best_match=MatchedInstance(
                sop_instance_uid=hit.sop_instance_uid,
                sop_class_uid=hit.sop_class_uid,
                series_instance_uid=hit.series_instance_uid,
                orthanc_instance_id=hit.orthanc_instance_id,
                query_sop_instance_uid=query_row.sop_instance_uid,
                score=score,
            ),
        )
        for rank, (score, hit, query_row) in enumerate(ranked, start=1)
    ]


class _Pair(NamedTuple):
    """A (query instance, gallery instance) pair and its cosine score."""

    score: float
    hit: "CatalogueRow"
    query: "CatalogueRow"

    def beats(self, other: "_Pair") -> bool:
        """Higher score wins; equal scores go to the smaller UIDs so that the answer does not hang on FAISS order."""
        if self.score != other.score:
            return self.score > other.score
        return ((self.query.sop_instance_uid, self.hit.sop_instance_uid)
                < (other.query.sop_instance_uid, other.hit.sop_instance_uid))
