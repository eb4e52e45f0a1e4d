"""Study-level similarity: what a radiologist asks for, built from instance-level FAISS hits."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, NamedTuple

import numpy as np

from lookalike.dicom.study_order import is_prior, study_date_key
from lookalike.encoders.floors import SimilarityFloors

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
    #: Orthanc id of the query study's instance, so that a viewer can show the two images side by side.
    query_orthanc_instance_id: str = ""
    #: The lesion each vector was made from, ``(x0, y0, x1, y1, confidence)`` in that image's stored pixels;
    #: None when the whole image was used (an X-ray, or no lesion found).
    lesion_box: tuple[int, int, int, int, float] | None = None
    query_lesion_box: tuple[int, int, int, int, float] | None = None


#: Where a lookup searches: every patient's studies ("archive"), or the query patient's other studies ("patient",
#: the priors a radiologist compares with).
SCOPES: tuple[str, ...] = ("archive", "patient")

#: Fields of :class:`SimilarStudy` that identify a patient. An answer shown to the reader of one patient's study
#: leaves them out unless the site's policy discloses other patients (``Settings.disclose_other_patients``).
IDENTITY_FIELDS: tuple[str, ...] = ("patient_id",)


@dataclass(frozen=True)
class SimilarStudy:
    """One ranked answer to "which other studies look like this one".

    ``patient_id`` is here for the server's own checks; what leaves the server goes through :meth:`as_public_dict`.
    """

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
    #: The study belongs to the query study's patient (a prior): the reader may know that without any identity.
    same_patient: bool = False

    def as_public_dict(self, disclose_identity: bool) -> dict[str, Any]:
        """This answer as JSON-ready data, without the patient's identity unless ``disclose_identity``.

        The one place that decides what an answer (REST, Explorer, DICOM query) may say about another patient:
        by default nothing that names them (:data:`IDENTITY_FIELDS`), only the study, its date, modality and score.
        """
        data = asdict(self)
        if not disclose_identity:
            for name in IDENTITY_FIELDS:
                del data[name]
        return data


class SimilarStudies(list):
    """A lookup's answer: the :class:`SimilarStudy` values best first, and the similarity floor applied per model.

    A list, so that every caller reads it as before; ``floors`` maps each model version the query study was
    searched with to its floor (matches scoring below it were dropped), or to None where the model carries no
    calibration (nothing dropped), so that an answer with few or no rows can say why.
    """

    def __init__(self, matches: Iterable[SimilarStudy] = (), floors: dict[str, float | None] | None = None) -> None:
        super().__init__(matches)
        self.floors: dict[str, float | None] = dict(floors or {})


class StudyNotIndexedError(LookupError):
    """The query study has no live indexed instance (not received yet, not indexable, or deleted)."""

    def __init__(self, orthanc_study_id: str) -> None:
        super().__init__(f"study {orthanc_study_id} has no indexed instance")
        self.orthanc_study_id = orthanc_study_id


def similar_studies(store: IndexStore, orthanc_study_id: str, limit: int = 10, scope: str = "archive",
                    floors: SimilarityFloors | None = None,
                    accept: Callable[[list[CatalogueRow]], set[str]] | None = None) -> SimilarStudies:
    """The studies most similar to ``orthanc_study_id``, best first, at most ``limit``, none below the model's floor.

    Every live instance of the query study searches the index of its (encoder, model_version) for its
    ``k = 4 * limit + n`` nearest instances (``n`` query instances of that index, whose own hits take up to ``n``
    places; the factor 4 leaves room for studies that contribute several instances), capped at the index size.
    Hits from the query study itself, and with ``scope="patient"`` hits from other patients, are dropped and the
    rest grouped by study. When fewer than ``limit`` studies are certain to be the best (a study not among the hits
    can score at most the k-th hit's score), ``k`` grows fourfold and the search runs again, so a narrow scope
    still gets its best studies and not merely those that happened to fall in the first ``k``.

    A study's score is the **maximum** over (query instance, gallery instance) pairs, and its ``best_match`` is
    that pair: a radiologist compares one image of the current case with the most similar image of a prior case,
    so one strong pair matters more than many mediocre ones, and a mean would penalise studies with extra views.
    Ties rank by ``study_instance_uid``, so the order is stable.

    A pair scoring below its model's similarity floor (:class:`~lookalike.encoders.floors.SimilarityFloors`:
    below it a match shares the query's label no more often than chance) is no match: the answer then holds fewer
    than ``limit`` studies, or none. A model without a calibration keeps every pair.

    Parameters
    ----------
    scope
        ``"archive"``: every other study. ``"patient"``: the query patient's **priors**, the studies with the query
        study's PatientID made earlier (:func:`is_prior`: StudyDate, then StudyTime on the same day; none when that
        PatientID is empty, since an empty ID identifies no one). A study without a valid StudyDate, or of the
        query study's own date where either StudyTime is unknown, cannot be shown to be earlier and is left out,
        and a query study without a date has no prior.
    floors
        Where the floors are read; default the calibration files of the shipped weights and of the catalogue's
        active models.
    accept
        A further filter of studies (the DICOM endpoint's matching keys): given one hit row of each candidate study
        not judged yet, the Orthanc ids of those to keep. The search widens until ``limit`` accepted studies are
        certain, so a narrowed lookup widens here, once, and not again around this function. Each study is judged
        once per lookup.

    Raises
    ------
    StudyNotIndexedError
        The study has no live instance in the catalogue.
    ValueError
        ``limit`` is below 1, or ``scope`` is not one of :data:`SCOPES`.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    query_rows = _active_rows(store, store.catalogue.rows_for_study(orthanc_study_id, with_vectors=True,
                                                                    live_only=True))
    if not query_rows:
        raise StudyNotIndexedError(orthanc_study_id)
    patient_id = query_rows[0].patient_id  # an Orthanc study belongs to one patient
    query_date, query_time = study_date_key(query_rows[0].study_date), query_rows[0].study_time
    groups: dict[tuple[str, str], list[CatalogueRow]] = {}
    for row in query_rows:
        groups.setdefault((row.encoder, row.model_version), []).append(row)
    floors = floors if floors is not None else SimilarityFloors(catalogue=store.catalogue)
    applied = {version: floors.floor(version) for _, version in groups}
    if scope == "patient" and (not patient_id or query_date is None):
        return SimilarStudies([], applied)

    judged: dict[str, bool] = {}  # by orthanc_study_id: what ``accept`` said

    def in_scope(hit: CatalogueRow) -> bool:
        return (hit.live and hit.orthanc_study_id != orthanc_study_id
                and (scope == "archive"
                     or (hit.patient_id == patient_id
                         and is_prior(hit.study_date, query_date, hit.study_time, query_time))))

    def eligible(hit: CatalogueRow) -> bool:
        return in_scope(hit) and judged.get(hit.orthanc_study_id, True)

    def judge(hits: list[CatalogueRow]) -> None:
        """Ask ``accept`` about the studies of ``hits`` it has not judged yet."""
        if accept is None:
            return
        new = {}
        for hit in hits:
            if hit.orthanc_study_id not in judged and in_scope(hit):
                new.setdefault(hit.orthanc_study_id, hit)
        if new:
            kept = accept(list(new.values()))
            judged.update({study: study in kept for study in new})

    best: dict[str, _Pair] = {}  # by orthanc_study_id
    for (encoder, model_version), rows in sorted(groups.items()):
        for study, pair in _best_pairs(store, encoder, model_version, rows, limit, eligible,
                                       applied[model_version], judge).items():
            current = best.get(study)
            if current is None or pair.beats(current):
                best[study] = pair

    ranked = sorted(best.values(), key=lambda pair: (-pair.score, pair.hit.study_instance_uid,
                                                     pair.hit.orthanc_study_id))[:limit]
    return SimilarStudies((
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
                query_orthanc_instance_id=query_row.orthanc_instance_id,
                lesion_box=hit.lesion_box,
                query_lesion_box=query_row.lesion_box,
            ),
            same_patient=bool(patient_id) and hit.patient_id == patient_id,
        )
        for rank, (score, hit, query_row) in enumerate(ranked, start=1)
    ), applied)


def _best_pairs(store: IndexStore, encoder: str, model_version: str, rows: list[CatalogueRow], limit: int,
                eligible: Callable[[CatalogueRow], bool], floor: float | None,
                judge: Callable[[list[CatalogueRow]], None]) -> dict[str, _Pair]:
    """Per eligible study, its best pair with ``rows`` (the query instances of one index) scoring at least
    ``floor``, searching deep enough.

    Stops once ``limit`` studies score strictly above the k-th hit of every query instance (no study left unseen
    can overtake or tie them), once that k-th hit is below the floor (no study left unseen can pass it), or once
    the whole index was returned.
    """
    vectors = np.stack([row.vector for row in rows])
    k = limit * 4 + len(rows)
    gallery: dict[int, CatalogueRow] = {}
    while True:
        scores, ids = store.search(encoder, model_version, vectors, k)
        gallery.update(store.catalogue.rows({int(i) for i in ids.ravel() if i >= 0 and int(i) not in gallery}))
        judge(list(gallery.values()))
        best: dict[str, _Pair] = {}
        for query_row, row_scores, row_ids in zip(rows, scores, ids):
            for score, hit_id in zip(row_scores.tolist(), row_ids.tolist()):
                hit = gallery.get(hit_id)
                if hit is None or not eligible(hit):
                    continue  # deleted since the search, the query study itself, or outside the scope
                pair = _Pair(min(1.0, max(-1.0, score)), hit, query_row)  # float32 can step just past ±1
                if floor is not None and pair.score < floor:
                    continue  # no more alike than chance: not a match
                current = best.get(hit.orthanc_study_id)
                if current is None or pair.beats(current):
                    best[hit.orthanc_study_id] = pair
        if ids.shape[1] < k:
            return best  # the whole index was searched
        bound = float(scores[:, -1].max())
        if sum(pair.score > bound for pair in best.values()) >= limit or (floor is not None and bound < floor):
            return best
        k *= 4


def _active_rows(store: IndexStore, rows: list[CatalogueRow]) -> list[CatalogueRow]:
    """The rows of each encoder's active model: while ``lookalike reindex`` builds a new model's vectors beside
    them, lookups keep to the old model until the switch."""
    active = {encoder: store.catalogue.active_model(encoder) for encoder in {row.encoder for row in rows}}
    return [row for row in rows if active[row.encoder] is None or row.model_version == active[row.encoder][0]]


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
