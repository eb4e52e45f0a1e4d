"""Sealed segments: immutable FAISS files that, with a small in-memory tail, make one (encoder, model_version) index.

Why segments: a single FAISS file must be rewritten whole to save a few changes, and an ``IndexIDMap2`` removes an id
by scanning every entry, so both costs grow with the archive. Here a change costs the same at any size:

- new and replaced vectors go to the *tail*, an exact in-memory index that holds only what changed since the last
  save; a save writes the tail as a new sealed segment (a few hundred vectors) and never touches older files;
- a deleted or replaced vector of a sealed segment becomes a *tombstone*: its position is cleared in the segment's
  live bitmap and searches skip it (a FAISS ``IDSelectorBitmap``); a save writes only the deletion lists that changed;
- *compaction* (:func:`plan_merge`, run by :class:`~lookalike.index.store.IndexStore` in a background thread)
  merges segments of similar size into one and drops their tombstones, so that a search visits few segments.

A segment of at least ``graph_min`` vectors carries an HNSW graph (``IndexHNSWFlat``): the graph proposes the
candidates and the segment's stored float32 vectors score them, so every score returned is the exact cosine. Smaller
segments are flat (exact). With ``IndexParams.storage="fp16"`` (``Settings.index_storage``) new segments store
half-precision vectors (``IndexHNSWSQ``/``IndexScalarQuantizer`` with ``QT_fp16``): the vectors take half the memory
and disk, and scores are the cosines of the rounded vectors (within about 1e-3). Each segment file records its own
storage (its FAISS type), so an index written in one storage stays readable after the setting changes: old segments
are searched as they are, new segments and merges are written in the new storage, and ``lookalike compact``
(:func:`plan_shapes` with ``convert``) rewrites what is left. Segment files are opened memory-mapped
(``IO_FLAG_MMAP_IFC``: zero-copy for flat and HNSW indexes in faiss 1.15), so a reader that starts loads nothing but
the file headers.

Files in the key's folder (``<index_dir>/<encoder>-<model_version>/``), all written once under a fresh name and never
changed:

``manifest.json``
    The segments (and deletion lists) that make the index, and the catalogue ``seq`` it includes. Replaced
    atomically after the files it names are on disk.
``<segment>.faiss``, ``<segment>.ids.npy``
    The FAISS index (labels are positions) and the catalogue id of each position, ascending.
``<segment>.del-<generation>.npy``
    The positions deleted since the segment was written.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from lookalike.config import INDEX_STORAGES
from lookalike.files import atomic_write

from .catalogue import utc_now
from .vector_index import VectorIndex, normalise

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
_FORMAT = 1

#: Searches of fewer queries than this run on the calling thread alone (see :meth:`SegmentedIndex.search`).
_PARALLEL_QUERIES = 16


@dataclass(frozen=True)
class IndexParams:
    """How a key's index is shaped; see :class:`~lookalike.index.store.IndexStore`."""

    #: Searches use the HNSW graphs once the index holds at least this many live vectors; exact below (None: always).
    ann_above: int | None = 100_000
    #: A segment of at least this many vectors is written with an HNSW graph.
    graph_min: int = 16_384
    #: HNSW neighbours per node, and the breadth of the graph search while building and searching.
    hnsw_m: int = 32
    ef_construction: int = 64
    ef_search: int = 192
    #: Compaction merges ``merge_factor`` segments of the same size class (sizes within a factor of it) into one.
    merge_factor: int = 4
    #: Compaction rewrites a segment alone once this share of its vectors are tombstones.
    purge_share: float = 0.2
    #: How segments written from now on store their vectors: "fp32" (exact scores) or "fp16" (half the bytes); those
    #: already written keep theirs until a merge or a conversion (:func:`plan_shapes`) rewrites them.
    storage: str = "fp32"
    #: A writer with no change for this many seconds *settles* its indexes (see :func:`plan_merge`), as it does
    #: when it closes: a reader that opens the index later finds a few segments with graphs, not a burst's many.
    settle_idle_s: float = 5.0

    def __post_init__(self) -> None:
        if self.storage not in INDEX_STORAGES:  # refused here, not at the first save, minutes into a back-fill
            raise ValueError(f"index storage {self.storage!r} is none of {', '.join(map(repr, INDEX_STORAGES))}")


#: The FAISS index types a segment file may hold: flat or HNSW, over float32 or half-precision vectors.
_SEGMENT_TYPES = (faiss.IndexFlatIP, faiss.IndexHNSWFlat, faiss.IndexScalarQuantizer, faiss.IndexHNSWSQ)


class SegmentError(ValueError):
    """A segment or manifest file is missing, unreadable or inconsistent: the index is rebuilt from the catalogue."""


@dataclass(eq=False)
class Segment:
    """One sealed segment, read-only: a FAISS index whose label ``i`` is the catalogue id ``ids[i]``."""

    name: str
    index: faiss.Index
    #: Catalogue ids by position, ascending (so that :meth:`positions` is a binary search).
    ids: np.ndarray

    @property
    def count(self) -> int:
        return int(self.ids.shape[0])

    @property
    def graph(self) -> bool:
        return isinstance(self.index, faiss.IndexHNSW)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def storage(self) -> str:
        """How this segment's file stores its vectors ("fp32" or "fp16"), whatever the settings say now."""
        return "fp32" if isinstance(self._exact(), faiss.IndexFlat) else "fp16"

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Positions of those of ``ids`` this segment holds."""
        if self.count == 0 or ids.size == 0:
            return np.empty(0, dtype=np.int64)
        pos = np.searchsorted(self.ids, ids).clip(0, self.count - 1)
        return pos[self.ids[pos] == ids].astype(np.int64)

    def vectors(self, positions: np.ndarray) -> np.ndarray:
        """The stored (unit) vectors at ``positions``, as float32."""
        storage = self._exact()
        if not isinstance(storage, faiss.IndexFlat):  # half precision: decoded
            return storage.reconstruct_batch(np.ascontiguousarray(positions, dtype=np.int64))
        stored = faiss.rev_swig_ptr(storage.get_xb(), self.count * self.dim).reshape(self.count, self.dim)
        return stored[positions]  # a copy: fancy indexing

    def _exact(self) -> faiss.Index:
        """The flat index of the stored vectors (the HNSW graph's storage): exact search, no graph."""
        return faiss.downcast_index(self.index.storage) if self.graph else self.index

    def search(self, unit: np.ndarray, k: int, live: Tombstones, use_graph: bool,
               ef_search: int) -> tuple[np.ndarray, np.ndarray]:
        """Best ``k`` live positions per query (scores exact cosine); ``-1`` where fewer were found."""
        selector = live.selector()
        if use_graph and self.graph:
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(ef_search, k)
            if selector is not None:
                params.sel = selector
            scores, positions = self.index.search(unit, k, params=params)
            if not (positions < 0).any():
                return scores, positions
            # The graph could not reach k live vectors past the tombstones: this segment is searched exactly.
        params = faiss.SearchParameters()
        if selector is not None:
            params.sel = selector
        return self._exact().search(unit, k, params=params)

    @classmethod
    def write(cls, folder: Path, ids: np.ndarray, vectors: np.ndarray, params: IndexParams, *,
              graph: bool) -> Segment:
        """Write a new segment of unit ``vectors`` under ``ids`` (each file atomically); returns it memory-mapped.

        ``graph``: build an HNSW graph (seconds per 10k vectors: compaction's job, never a save's).
        """
        order = np.argsort(ids, kind="stable")
        ids = np.ascontiguousarray(ids[order], dtype=np.int64)
        if ids.size and (np.diff(ids) <= 0).any():
            raise ValueError("a segment's ids must be distinct")
        vectors = np.ascontiguousarray(vectors[order], dtype=np.float32)
        dim = vectors.shape[1]
        half = params.storage == "fp16"
        if graph:
            index = (faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_fp16, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
                     if half else faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT))
            index.hnsw.efConstruction = params.ef_construction
        else:
            index = (faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
                     if half else faiss.IndexFlatIP(dim))
        index.add(vectors)
        name = f"seg-{secrets.token_hex(6)}"
        atomic_write(folder / f"{name}.faiss", lambda temp: faiss.write_index(index, temp))
        atomic_write(folder / f"{name}.ids.npy", lambda temp: _save_array(temp, ids))
        return cls.open(folder, name, ids.size)

    @classmethod
    def open(cls, folder: Path, name: str, count: int) -> Segment:
        """Open a segment memory-mapped, checking that its two files agree with each other and the manifest."""
        try:
            index = faiss.read_index(str(folder / f"{name}.faiss"), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
            ids = np.load(folder / f"{name}.ids.npy", mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise
        except (RuntimeError, ValueError, OSError) as error:
            raise SegmentError(f"segment {name} unreadable: {error}") from error
        if not isinstance(index, _SEGMENT_TYPES) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise SegmentError(f"segment {name} holds a {type(index).__name__}")
        if ids.dtype != np.int64 or ids.ndim != 1 or ids.shape[0] != index.ntotal or index.ntotal != count:
            raise SegmentError(f"segment {name}: {ids.shape} ids for {index.ntotal} vectors, manifest says {count}")
        return cls(name, index, ids)


def read_into_page_cache(folder: Path, names: list[str]) -> int:
    """Read the files of segments ``names`` front to back, so that the page cache holds them; returns bytes read.

    A search touches pages all over a segment's file: a reader started after the cache lost the files (a reboot,
    memory pressure) would otherwise fault them in one random read at a time during its first lookups (100 ms a
    lookup at 1M vectors, against 3 ms warm). A sequential read takes seconds for a million vectors, and the memory
    mapping then finds every page in the cache. (``posix_fadvise(WILLNEED)`` would say the same, but some file
    systems ignore it.) Files replaced meanwhile are skipped.
    """
    done = 0
    buffer = bytearray(4 << 20)
    for name in names:
        for suffix in (".faiss", ".ids.npy"):
            try:
                with open(folder / f"{name}{suffix}", "rb", buffering=0) as handle:
                    while (read := handle.readinto(buffer)):
                        done += read
            except FileNotFoundError:
                continue
    return done


def _save_array(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as handle:  # a file object: np.save would append ".npy" to a temporary name
        np.save(handle, array, allow_pickle=False)


@dataclass(eq=False)
class Tombstones:
    """Which positions of one segment are still live: a bitmap FAISS can filter on, and the file it came from."""

    count: int
    bits: np.ndarray
    deleted: int = 0
    #: The deletion list on disk this state started from (None: none), and whether memory has more.
    file: str | None = None
    dirty: bool = False
    _selector: object = field(default=None, repr=False)

    @classmethod
    def from_positions(cls, count: int, positions: np.ndarray, file: str | None) -> Tombstones:
        live = np.ones(count, dtype=bool)
        live[positions] = False
        return cls(count, np.packbits(live, bitorder="little"), int(count - live.sum()), file)

    @property
    def live(self) -> int:
        return self.count - self.deleted

    def delete(self, positions: np.ndarray) -> int:
        """Clear ``positions``; returns how many were live."""
        if positions.size == 0:
            return 0
        live = self.is_live(positions)
        fresh = np.unique(positions[live])
        if fresh.size:
            np.bitwise_and.at(self.bits, fresh >> 3, ~(np.uint8(1) << (fresh & 7).astype(np.uint8)))
            self.deleted += int(fresh.size)
            self.dirty = True
            self._selector = None
        return int(fresh.size)

    def is_live(self, positions: np.ndarray) -> np.ndarray:
        return (self.bits[positions >> 3] >> (positions & 7).astype(np.uint8) & 1).astype(bool)

    def deleted_positions(self) -> np.ndarray:
        live = np.unpackbits(self.bits, count=self.count, bitorder="little").astype(bool)
        return np.flatnonzero(~live).astype(np.int64)

    def live_positions(self) -> np.ndarray:
        return np.flatnonzero(np.unpackbits(self.bits, count=self.count, bitorder="little")).astype(np.int64)

    def selector(self) -> faiss.IDSelector | None:
        """A FAISS filter passing the live positions (None when nothing is deleted); it reads ``bits`` in place."""
        if self.deleted == 0:
            return None
        if self._selector is None:
            self._selector = faiss.IDSelectorBitmap(self.bits.size, faiss.swig_ptr(self.bits))
        return self._selector

    def copy(self) -> Tombstones:
        return Tombstones(self.count, self.bits.copy(), self.deleted, self.file, self.dirty)


@dataclass(eq=False)
class Part:
    """A segment as one index uses it: the immutable files plus this process's view of its tombstones."""

    segment: Segment
    tombstones: Tombstones


class SegmentedIndex:
    """The in-memory view of one key's index: sealed segments with tombstones, plus the tail of recent changes.

    Each catalogue id is live in at most one place (a segment or the tail): :meth:`apply` tombstones every older
    copy before the tail takes the new vector. Not thread-safe: the store serialises access.
    """

    def __init__(self, dim: int, parts: list[Part] | None = None) -> None:
        self.dim = dim
        self.parts: list[Part] = parts or []
        self.tail = VectorIndex(dim)

    def __len__(self) -> int:
        return sum(p.tombstones.live for p in self.parts) + len(self.tail)

    def apply(self, ids: list[int], vectors: list[np.ndarray | None]) -> None:
        """Bring ``ids`` to their current state: drop every copy, then add the vectors that are not None."""
        id_array = np.asarray(ids, dtype=np.int64)
        for part in self.parts:
            part.tombstones.delete(part.segment.positions(id_array))
        self.tail.remove(id_array)
        live = [(i, v) for i, v in zip(ids, vectors) if v is not None]
        if live:
            self.tail.add_or_replace([i for i, _ in live], np.stack([v for _, v in live]))

    def search(self, vectors: np.ndarray, k: int, use_graph: bool,
               ef_search: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest live ids by cosine for each query, best first, over every segment and the tail."""
        unit = normalise(vectors, self.dim)
        if unit.shape[0] >= _PARALLEL_QUERIES:
            return self._search(unit, k, use_graph, ef_search)
        # A lookup's few queries gain nothing from OpenMP's threads, and on a busy host their spin-waits cost up to
        # ten times the search itself (19 ms against 2.5 ms per HNSW call, measured on 2 loaded cores). The setting
        # belongs to the calling thread only, so a merge building a graph in another thread keeps its threads.
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            return self._search(unit, k, use_graph, ef_search)
        finally:
            faiss.omp_set_num_threads(threads)

    def _search(self, unit: np.ndarray, k: int, use_graph: bool,
                ef_search: int) -> tuple[np.ndarray, np.ndarray]:
        n = unit.shape[0]
        k = min(int(k), len(self))
        if k <= 0:
            return np.empty((n, 0), dtype=np.float32), np.empty((n, 0), dtype=np.int64)
        all_scores, all_ids = [], []
        for part in self.parts:
            kk = min(k, part.tombstones.live)
            if kk == 0:
                continue
            scores, positions = part.segment.search(unit, kk, part.tombstones, use_graph, ef_search)
            found = positions >= 0
            all_ids.append(np.where(found, part.segment.ids[positions.clip(0)], -1))
            all_scores.append(np.where(found, scores, -np.inf).astype(np.float32))
        if len(self.tail):
            scores, ids = self.tail.search(unit, k)
            all_scores.append(scores)
            all_ids.append(ids)
        scores, ids = np.concatenate(all_scores, axis=1), np.concatenate(all_ids, axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)

    def live_items(self) -> tuple[np.ndarray, np.ndarray]:
        """Every live (id, unit vector), in no particular order: what a full rewrite saves."""
        ids, vectors = [self.tail.ids()], [self.tail.vectors()]
        for part in self.parts:
            positions = part.tombstones.live_positions()
            ids.append(np.asarray(part.segment.ids)[positions])
            vectors.append(part.segment.vectors(positions).reshape(-1, self.dim))
        return np.concatenate(ids), np.concatenate(vectors).astype(np.float32, copy=False)


# -- manifest -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentEntry:
    name: str
    count: int
    deleted_file: str | None


@dataclass(frozen=True)
class Manifest:
    """What a saved index is made of (see the module's notes)."""

    encoder: str
    model_version: str
    dim: int
    seq: int
    generation: int
    segments: tuple[SegmentEntry, ...]

    def write(self, folder: Path) -> None:
        data = {"format": _FORMAT, "encoder": self.encoder, "model_version": self.model_version, "dim": self.dim,
                "seq": self.seq, "generation": self.generation, "saved_at": utc_now(),
                "count": sum(e.count for e in self.segments),
                "segments": [{"name": e.name, "count": e.count, "deleted_file": e.deleted_file}
                             for e in self.segments]}
        atomic_write(folder / MANIFEST_FILE, lambda temp: Path(temp).write_text(json.dumps(data, indent=1)))

    @classmethod
    def read(cls, folder: Path, key: tuple[str, str]) -> Manifest | None:
        """The manifest in ``folder``; None when there is none; SegmentError when it is unusable."""
        try:
            data = json.loads((folder / MANIFEST_FILE).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            raise SegmentError(f"manifest in {folder} unreadable: {error}") from error
        try:
            if data["format"] != _FORMAT or (data["encoder"], data["model_version"]) != key:
                raise SegmentError(f"manifest in {folder} does not describe {key[0]}-{key[1]}")
            entries = tuple(SegmentEntry(str(e["name"]), int(e["count"]), e["deleted_file"])
                            for e in data["segments"])
            return cls(key[0], key[1], int(data["dim"]), int(data["seq"]), int(data["generation"]), entries)
        except (KeyError, TypeError, ValueError) as error:
            raise SegmentError(f"manifest in {folder} malformed: {error}") from error


def read_deleted(folder: Path, file: str | None, count: int) -> Tombstones:
    """The tombstones of a segment of ``count`` vectors from its deletion list ``file`` (None: none deleted)."""
    if file is None:
        return Tombstones.from_positions(count, np.empty(0, dtype=np.int64), None)
    try:
        positions = np.load(folder / file, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as error:
        raise SegmentError(f"deletion list {file} unreadable: {error}") from error
    if positions.dtype != np.int64 or positions.ndim != 1 or (positions.size and (
            positions.min() < 0 or positions.max() >= count)):
        raise SegmentError(f"deletion list {file} does not fit a segment of {count}")
    return Tombstones.from_positions(count, positions, file)


def write_deleted(folder: Path, segment: Segment, tombstones: Tombstones, generation: int) -> str:
    """Write a segment's deletion list under a new name; returns the name."""
    name = f"{segment.name}.del-{generation}.npy"
    atomic_write(folder / name, lambda temp: _save_array(temp, tombstones.deleted_positions()))
    return name


# -- compaction -----------------------------------------------------------------------------------------------


def size_class(live: int, factor: int) -> int:
    """Segments whose live sizes lie within one power of ``factor`` share a class and are merged together."""
    return int(math.log(max(live, 1), factor))


@dataclass(frozen=True)
class SegmentShape:
    """What the merge policy looks at in a segment: its size, its tombstones, whether it has a graph, its storage."""

    count: int
    deleted: int
    graph: bool
    storage: str = "fp32"

    @property
    def live(self) -> int:
        return self.count - self.deleted

    @classmethod
    def of(cls, part: Part) -> SegmentShape:
        return cls(part.tombstones.count, part.tombstones.deleted, part.segment.graph, part.segment.storage)


def plan_merge(parts: list[Part], params: IndexParams, settle: bool = False, convert: bool = False) -> list[Part]:
    """The segments the next compaction step should merge into one (empty: nothing to do); see :func:`plan_shapes`."""
    return [parts[i] for i in plan_shapes([SegmentShape.of(p) for p in parts], params, settle, convert)]


def plan_shapes(shapes: list[SegmentShape], params: IndexParams, settle: bool = False,
                convert: bool = False) -> list[int]:
    """Positions in ``shapes`` of the segments the next compaction step should merge into one (empty: none).

    In order: a segment whose tombstones reached ``purge_share`` (rewritten alone, without them); else
    ``merge_factor`` segments of one size class, smallest class first; else a segment of at least ``graph_min``
    without a graph, alone in its class (given one). Merging like sizes writes each vector about ``log(n) / log(merge_factor)`` times
    in all and keeps at most ``merge_factor - 1`` segments per class, so a search visits a few dozen at most.

    ``settle`` (a writer gone idle or closing, ``lookalike compact``): then every segment without a graph is merged
    into one, as soon as there are two. The small segments a trickle of saves leaves, and the large flat ones a
    bulk fill leaves short of ``merge_factor`` in their class, are each searched exactly; merged, the index is a
    few graph segments and at most one small flat one, whichever reader opens it next.

    ``convert`` (``lookalike compact``): last, a segment whose storage is not ``params.storage`` is rewritten alone,
    so that a site that changed ``index_storage`` ends with every vector in the new storage. Never while a writer
    settles by itself: rewriting a large index's graphs is a maintenance step (minutes per million vectors), and
    a writer closing would otherwise wait for it; merges convert what they rewrite anyway.
    """
    for i, shape in enumerate(shapes):
        if shape.deleted and shape.deleted >= params.purge_share * shape.count:
            return [i]
    classes: dict[int, list[int]] = {}
    for i, shape in enumerate(shapes):
        classes.setdefault(size_class(shape.live, params.merge_factor), []).append(i)
    for _, members in sorted(classes.items()):
        if len(members) >= params.merge_factor:
            return sorted(members, key=lambda i: shapes[i].live)[: params.merge_factor]
    for members in classes.values():
        # Alone in its class: no merge will give it a graph soon (a bulk import's batches wait for their merge).
        if len(members) == 1 and not shapes[members[0]].graph and shapes[members[0]].live >= params.graph_min:
            return members
    if settle:
        flat = [i for i, shape in enumerate(shapes) if not shape.graph]
        if len(flat) >= 2:
            return flat
    if convert:
        for i, shape in enumerate(shapes):
            if shape.storage != params.storage and shape.live:
                return [i]
    return []


def pending_merges(shapes: list[SegmentShape], params: IndexParams, settle: bool = True,
                   convert: bool = False) -> int:
    """How many merges compaction would run on ``shapes`` before it stops (what ``lookalike status`` shows)."""
    shapes = list(shapes)
    merges = 0
    while merges <= 4 * len(shapes) + 4:  # each merge removes a segment, a graph-less one or tombstones: it ends
        chosen = plan_shapes(shapes, params, settle, convert)
        if not chosen:
            return merges
        live = sum(shapes[i].live for i in chosen)
        shapes = [s for i, s in enumerate(shapes) if i not in chosen]
        if live:
            shapes.append(SegmentShape(live, 0, live >= params.graph_min, params.storage))
        merges += 1
    return merges
