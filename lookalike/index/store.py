"""The index store: the catalogue plus segmented FAISS indexes, shared by the worker (writer) and readers.

Files in ``index_dir``:

``catalogue.sqlite``
    The truth (see :mod:`lookalike.index.catalogue`).
``<encoder>-<model_version>/``
    The saved FAISS index of one key, a cache of the catalogue's live vectors: immutable segments, their deletion
    lists and a ``manifest.json`` naming them and the catalogue ``seq`` they include (see
    :mod:`lookalike.index.segments`).
``write.lock``
    Held (``flock``) by the one process writing at a time.
``compact.lock``
    Held by the one thread merging segments at a time (see :meth:`IndexStore.compact`).

Why this is safe without coordination between processes: the catalogue commits first, and a reader brings its
in-memory index up to date by replaying every catalogue change after the manifest's ``seq``. Replay applies the
*current* state of each changed row, so it is idempotent. Segment files are written under fresh names and never
changed; the manifest is replaced atomically after the files it names are on disk, so a crash leaves the old
manifest or the new one, each naming complete files (a file no manifest names is removed by the next compaction).
A missing or unreadable manifest or segment is rebuilt from the catalogue vectors.

What a change costs: the catalogue commit, then the in-memory *tail* (the vectors changed since the last save) and
a bit cleared in the live bitmap of the segment holding the old vector, both independent of the index size. A save
(every ``snapshot_every`` changes) writes the tail as a new small segment, the deletion lists that changed and the
manifest: bytes proportional to the changes, never the whole index. Merging segments and building HNSW graphs run
in a background thread of the writing process (:meth:`IndexStore.compact`), at idle CPU priority.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.config import INDEX_STORAGES, Settings

from .catalogue import CATALOGUE_FILE, Catalogue, InstanceRecord
from .segments import (
    MANIFEST_FILE,
    IndexParams,
    Manifest,
    Part,
    Segment,
    SegmentedIndex,
    SegmentEntry,
    SegmentError,
    SegmentShape,
    Tombstones,
    pending_merges,
    plan_merge,
    read_deleted,
    read_into_page_cache,
    write_deleted,
)
from .vector_index import normalise

log = logging.getLogger(__name__)

#: Name of the lock file that serialises writers across processes.
WRITE_LOCK_FILE = "write.lock"
#: Name of the lock file held by the one compaction running at a time, across processes.
COMPACT_LOCK_FILE = "compact.lock"

#: Rows fetched per catalogue query while replaying, to bound memory on a full rebuild.
_REPLAY_BATCH = 10_000

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")

Key = tuple[str, str]


def _check_key(encoder: str, model_version: str) -> Key:
    """Both parts end up in a file name: refuse anything that could leave the folder or clash."""
    for label, value in (("encoder", encoder), ("model_version", model_version)):
        if not isinstance(value, str) or not _NAME.match(value):
            raise ValueError(f"{label} {value!r} must be letters, digits and . _ + - (it names a file)")
    return encoder, model_version


FileSignature = tuple[int, int, int]


def _signature(path: Path) -> FileSignature | None:
    """What tells that a manifest was replaced: inode, size, modification time."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _storage_layout(shapes: list[SegmentShape], params: IndexParams) -> dict[str, Any]:
    """What :meth:`IndexStore.layout` says of an index's storage (see there)."""
    counts = {storage: sum(s.storage == storage for s in shapes) for storage in INDEX_STORAGES}
    held = "+".join(storage for storage, n in counts.items() if n) or params.storage
    return {"storage": held, "configured_storage": params.storage, "segments_by_storage": counts,
            "convert_pending": sum(s.storage != params.storage and s.live > 0 for s in shapes)}


def _entry_files(entries: tuple[SegmentEntry, ...]) -> set[str]:
    names = set()
    for entry in entries:
        names.update({f"{entry.name}.faiss", f"{entry.name}.ids.npy"})
        if entry.deleted_file:
            names.add(entry.deleted_file)
    return names


@dataclass
class _Loaded:
    """In-memory state of one (encoder, model_version) index."""

    #: None until the key has a vector (the dimension is unknown before).
    index: SegmentedIndex | None = None
    #: The catalogue seq this in-memory index includes.
    seq: int = 0
    #: Signature of the manifest last loaded, written or seen (None: none).
    file_signature: FileSignature | None = None
    #: The manifest this state started from: its generation, seq and segments (what a save supersedes).
    generation: int = 0
    manifest_seq: int | None = None
    entries: tuple[SegmentEntry, ...] = field(default_factory=tuple)
    #: The saved index was unusable or inconsistent: a writer replaces it at the next flush.
    snapshot_bad: bool = False

    def unsaved(self) -> bool:
        index = self.index
        return index is not None and (self.snapshot_bad or self.manifest_seq is None or self.seq > self.manifest_seq
                                      or len(index.tail) > 0 or any(p.tombstones.dirty for p in index.parts))


class IndexStore:
    """Catalogue and segmented FAISS indexes under one folder.

    Parameters
    ----------
    index_dir
        The folder (``Settings.index_dir``); created by a writer.
    readonly
        For readers (the query service, the plugin): never writes a file, opens the catalogue read-only, and follows
        the writer through :meth:`refresh` (which :meth:`search` calls).
    snapshot_every
        A writer saves the changes (a new small segment, see the module's notes) after this many of them, and on
        :meth:`flush`/:meth:`close`. The catalogue is committed at every change and readers replay what the saved
        index lacks, so a larger value loses nothing; it spares a file and an fsync per instance.
    params
        The shape of the indexes: exact below ``ann_above`` live vectors, HNSW graphs on large segments above.
    background_compaction
        A writer merges segments in a background thread after a save that leaves work for it, settles its indexes
        once no change came for ``params.settle_idle_s`` seconds, and settles them when it closes (see
        :meth:`close`); False leaves all of it to explicit :meth:`compact` calls (a maintenance step).
    prefetch
        A reader reads each segment it opens into the page cache in a background thread, so that its first lookups
        are as fast as warm ones; False for a reader that only reports (``lookalike status``): it would start
        threads reading the whole index for nothing.

    The programs open it with :meth:`from_settings`, so that the worker (the writer), the query service and the
    command line shape the index alike.

    Notes
    -----
    Thread-safe: a lock guards the in-memory indexes, held during a search too. Writers take ``write.lock`` before
    that lock, so a thread waiting for another process's write never blocks this process's searches; a merge
    builds its segment holding neither.
    """

    def __init__(self, index_dir: str | os.PathLike, readonly: bool = False, snapshot_every: int = 1,
                 params: IndexParams | None = None, background_compaction: bool = True,
                 prefetch: bool = True) -> None:
        if snapshot_every < 1:
            raise ValueError("snapshot_every must be at least 1")
        self.index_dir = Path(index_dir)
        self.readonly = readonly
        self.snapshot_every = snapshot_every
        self.params = params or IndexParams()
        self.background_compaction = background_compaction and not readonly
        self.prefetch = prefetch
        self._unsaved = 0
        if not readonly:
            self.index_dir.mkdir(parents=True, exist_ok=True)
        self.catalogue = Catalogue(self.index_dir / CATALOGUE_FILE, readonly=readonly)
        self._lock = threading.RLock()
        self._loaded: dict[Key, _Loaded] = {}
        self._writer = threading.local()
        self._closing = False
        self._compactor: threading.Thread | None = None
        self._compaction_wanted = threading.Event()
        self._stop_background = threading.Event()
        #: When this writer last changed an index, and whether it saved anything (what its close settles).
        self._last_change = time.monotonic()
        self._saved = False

    @classmethod
    def from_settings(cls, settings: Settings, **options: Any) -> IndexStore:
        """The store of ``settings.index_dir``, its indexes shaped by the settings (``index_storage``); ``options``
        are the other parameters (``readonly``, ``snapshot_every``, ...)."""
        return cls(settings.index_dir, params=IndexParams(storage=settings.index_storage), **options)

    def close(self) -> None:
        """Save what the saved indexes lack (a writer), settle the indexes it changed, close the catalogue.

        Settling (:meth:`compact` with ``settle``) merges what the background thread had not yet merged, so that
        the next reader opens a few segments with graphs rather than a bulk fill's dozens; the background thread
        stops after its current merge and this thread finishes the work. A process killed meanwhile loses nothing
        (see :meth:`compact`): the next writer's background thread, or ``lookalike compact``, finishes it.
        """
        if not self.readonly and not self._closing and any(s.unsaved() for s in self._loaded.values()):
            self.flush()
        self._stop_background.set()
        self._compaction_wanted.set()  # wakes the background thread from its idle wait
        if self.background_compaction and self._saved and not self._closing:
            try:
                self.compact(settle=True)
            except Exception:  # the saved index is intact; the next writer or `lookalike compact` merges
                log.exception("index compaction on close failed")
        with self._lock:
            self._closing = True
        compactor = self._compactor
        if compactor is not None:
            compactor.join()  # it stops after its current merge, and settling waited for that merge already
        with self._lock:
            self.catalogue.close()

    def __enter__(self) -> IndexStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- paths and locks --------------------------------------------------------------------------------------

    def index_path(self, encoder: str, model_version: str) -> Path:
        """The folder holding the saved index of one key (its manifest and segments)."""
        encoder, model_version = _check_key(encoder, model_version)
        return self.index_dir / f"{encoder}-{model_version}"

    @contextlib.contextmanager
    def _flock(self, name: str, blocking: bool = True) -> Iterator[bool]:
        """Hold the lock file ``name``; yields False at once instead of waiting when not ``blocking``."""
        handle = open(self.index_dir / name, "a+b")
        try:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        finally:
            handle.close()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold ``write.lock`` (re-entrant within a thread), then the in-memory lock."""
        if self.readonly:
            raise PermissionError(f"index store {self.index_dir} is open read-only")
        depth = getattr(self._writer, "depth", 0)
        if depth == 0:
            # flock belongs to the open file: a second open() in this thread would wait for itself, hence depth.
            handle = open(self.index_dir / WRITE_LOCK_FILE, "a+b")
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            except BaseException:
                handle.close()
                raise
            self._writer.handle = handle
        self._writer.depth = depth + 1
        try:
            with self._lock:
                yield
        finally:
            self._writer.depth = depth
            if depth == 0:
                handle = self._writer.handle
                self._writer.handle = None
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
                handle.close()

    # -- reading ----------------------------------------------------------------------------------------------

    def refresh(self, encoder: str | None = None, model_version: str | None = None) -> None:
        """Bring the in-memory indexes (all, or one) up to date with the saved indexes and the catalogue.

        Opens the segments a new manifest names (those already open are kept), then replays the catalogue changes
        after the in-memory ``seq``.
        """
        with self._lock:
            if encoder is None and model_version is None:
                keys = self.catalogue.index_keys()
            elif encoder is not None and model_version is not None:
                keys = [(encoder, model_version)]
            else:
                raise ValueError("give both encoder and model_version, or neither")
            for key in keys:
                self._refresh_key(_check_key(*key))

    def _refresh_key(self, key: Key) -> _Loaded:
        state = self._loaded.setdefault(key, _Loaded())
        latest = self.catalogue.max_seq()
        if state.seq > latest:
            # Memory is ahead of the catalogue: the catalogue was replaced or restored. Start again from it.
            log.warning("index %s-%s is at seq %d but the catalogue at %d: rebuilding", *key, state.seq, latest)
            state = self._loaded[key] = _Loaded(snapshot_bad=True, generation=state.generation,
                                                entries=state.entries)
        signature = _signature(self.index_path(*key) / MANIFEST_FILE)
        if signature is not None and signature != state.file_signature:
            self._load_manifest(key, state)
        self._replay(key, state)
        return state

    def _load_manifest(self, key: Key, state: _Loaded) -> None:
        folder = self.index_path(*key)
        for _ in range(5):
            signature = _signature(folder / MANIFEST_FILE)
            try:
                manifest = Manifest.read(folder, key)
                if manifest is None:
                    state.file_signature = None
                    return
                # Read after the manifest: a save racing this read is not "the future".
                latest = self.catalogue.max_seq()
                if manifest.seq > latest:
                    raise SegmentError(f"manifest claims seq {manifest.seq}, past the catalogue's {latest}")
                if state.index is not None and not state.snapshot_bad and manifest.generation == state.generation:
                    state.file_signature = signature
                    return
                open_segments = {p.segment.name: p.segment for p in state.index.parts} if state.index else {}
                parts, opened = [], []
                for entry in manifest.segments:
                    segment = open_segments.get(entry.name)
                    if segment is None:
                        segment = Segment.open(folder, entry.name, entry.count)
                        opened.append(entry.name)
                    if segment.dim != manifest.dim:
                        raise SegmentError(f"segment {entry.name} has dim {segment.dim}, manifest {manifest.dim}")
                    parts.append(Part(segment, read_deleted(folder, entry.deleted_file, entry.count)))
            except FileNotFoundError:
                continue  # a compaction replaced a file after the manifest was read: read the new manifest
            except SegmentError as error:
                log.warning("saved index %s unusable (%s): rebuilding from the catalogue", folder, error)
                state.file_signature, state.snapshot_bad = signature, True
                if state.index is None:
                    state.seq = 0
                return
            state.index = SegmentedIndex(manifest.dim, parts)
            if self.readonly and self.prefetch and opened:
                self._prefetch(folder, opened)
            state.seq, state.file_signature, state.snapshot_bad = manifest.seq, signature, False
            state.generation, state.manifest_seq, state.entries = manifest.generation, manifest.seq, manifest.segments
            return
        log.warning("saved index %s kept changing while read: rebuilding from the catalogue", folder)
        state.snapshot_bad = True

    def _prefetch(self, folder: Path, names: list[str]) -> None:
        """Read newly opened segments into the page cache in a background thread (see
        :func:`~lookalike.index.segments.read_into_page_cache`); lookups go on meanwhile."""
        def read() -> None:
            try:
                read_into_page_cache(folder, names)
            except OSError as error:  # the lookups read the pages themselves
                log.warning("could not read the segments of %s ahead: %s", folder, error)

        threading.Thread(target=read, name="index-prefetch", daemon=True).start()

    def _replay(self, key: Key, state: _Loaded) -> int:
        """Apply catalogue changes after ``state.seq``: drop each changed id, re-add it if live and ours."""
        encoder, model_version = key
        applied = 0
        while True:
            changes = self.catalogue.changes_since(state.seq, model_version, limit=_REPLAY_BATCH)
            if not changes:
                return applied
            vectors: list[np.ndarray | None] = []
            for change in changes:
                vector = change.vector if change.encoder == encoder else None
                if vector is not None and state.index is None:
                    state.index = SegmentedIndex(vector.shape[0])
                if vector is not None and vector.shape[0] != state.index.dim:
                    log.error("catalogue id %d has dim %d, index %s-%s has %d: left out", change.id,
                              vector.shape[0], *key, state.index.dim)
                    vector = None
                vectors.append(vector)
            if state.index is not None:
                state.index.apply([c.id for c in changes], vectors)
            state.seq = changes[-1].seq
            applied += len(changes)

    def rebuild(self, encoder: str, model_version: str) -> int:
        """Rebuild one index from the catalogue vectors alone (and save it, for a writer); returns its size.

        Used when a saved index is missing or corrupt, and by operators who suspect one.
        """
        key = _check_key(encoder, model_version)
        context = self._lock if self.readonly else self._writing()
        with context:
            old = self._loaded.get(key, _Loaded())
            # Whatever is on disk is not trusted: do not load it, and replace it.
            state = self._loaded[key] = _Loaded(
                file_signature=_signature(self.index_path(*key) / MANIFEST_FILE), snapshot_bad=True,
                generation=old.generation, entries=old.entries)
            self._replay(key, state)
            if not self.readonly:
                self._save(key, state)
            return len(state.index) if state.index is not None else 0

    def size(self, encoder: str, model_version: str) -> int:
        """Number of live vectors in one index, after a refresh."""
        with self._lock:
            state = self._refresh_key(_check_key(encoder, model_version))
            return len(state.index) if state.index is not None else 0

    def layout(self) -> list[dict]:
        """Per index, after a refresh: its segments (with an HNSW graph or not), vectors, tombstones, the vectors
        only the catalogue holds yet (replayed into memory), and the merges compaction would still run when
        settling; what ``lookalike status`` shows. 0 pending merges: settled, as fast as it gets to read.

        ``storage``: how its segments store their vectors, "fp32", "fp16", or "fp32+fp16" (written before and after
        a change of ``index_storage``); ``configured_storage``: what new segments and merges are written in;
        ``segments_by_storage`` counts the segments, and ``convert_pending`` those not in the configured storage
        (``lookalike compact`` rewrites them)."""
        with self._lock:
            described = []
            for key in sorted(self.catalogue.index_keys()):
                state = self._refresh_key(_check_key(*key))
                parts = state.index.parts if state.index is not None else []
                shapes = [SegmentShape.of(p) for p in parts]
                described.append({
                    "encoder": key[0], "model_version": key[1], "segments": len(shapes),
                    "graph_segments": sum(s.graph for s in shapes),
                    "vectors": len(state.index) if state.index is not None else 0,
                    "tombstones": sum(s.deleted for s in shapes),
                    "unsaved": len(state.index.tail) if state.index is not None else 0,
                    "pending_merges": pending_merges(shapes, self.params),
                    **_storage_layout(shapes, self.params)})
            return described

    def search(self, encoder: str, model_version: str, vectors: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray]:
        """Refresh one index and return its ``k`` nearest ids (cosine, best first) for each query vector.

        Exact while the index holds fewer than ``params.ann_above`` live vectors; above, segments with an HNSW
        graph are searched through it (their stored vectors still score every candidate exactly). Returns
        ``(scores, ids)``, each ``(n_queries, min(k, index size))``; empty columns if the index has nothing.
        """
        key = _check_key(encoder, model_version)
        with self._lock:
            state = self._refresh_key(key)
            if state.index is None:
                n = normalise(vectors).shape[0]
                return np.empty((n, 0), dtype=np.float32), np.empty((n, 0), dtype=np.int64)
            ann = self.params.ann_above is not None and len(state.index) >= self.params.ann_above
            return state.index.search(vectors, k, ann, self.params.ef_search)

    # -- writing ----------------------------------------------------------------------------------------------

    def add(self, record: InstanceRecord, vector: np.ndarray) -> int:
        """Index one instance and return its catalogue id; indexing it again replaces its vector."""
        return self.add_many([record], np.atleast_2d(vector))[0]

    def add_many(self, records: list[InstanceRecord], vectors: np.ndarray) -> list[int]:
        """Index a batch of instances (one vector per record, in order) and return their catalogue ids.

        Every vector is checked and normalised before anything is written; then the whole batch is committed to
        the catalogue (the truth) in one transaction and applied to the in-memory indexes in one update. Indexing
        an instance again replaces its vector (same id).
        """
        units = normalise(vectors)
        if units.shape[0] != len(records):
            raise ValueError(f"{len(records)} records for {units.shape[0]} vectors")
        if not records:
            return []
        keys = sorted({_check_key(r.encoder, r.model_version) for r in records})
        with self._writing():
            for key in keys:
                state = self._refresh_key(key)
                if state.index is not None and state.index.dim != units.shape[1]:
                    raise ValueError(f"vectors have dimension {units.shape[1]}, index {key[0]}-{key[1]} has "
                                     f"{state.index.dim}")
            ids = self.catalogue.upsert_many(records, units)
            for key in keys:
                self._replay(key, self._loaded[key])
            self._changed(len(records))
            return ids

    def delete_instance(self, orthanc_instance_id: str) -> int:
        """Forget one instance Orthanc deleted; returns how many catalogue rows were tombstoned."""
        return self._delete(orthanc_instance_id=orthanc_instance_id)

    def delete_series(self, orthanc_series_id: str) -> int:
        """Forget every instance of a series Orthanc deleted; returns how many catalogue rows were tombstoned."""
        return self._delete(orthanc_series_id=orthanc_series_id)

    def delete_study(self, orthanc_study_id: str) -> int:
        """Forget every instance of a study Orthanc deleted; returns how many catalogue rows were tombstoned."""
        return self._delete(orthanc_study_id=orthanc_study_id)

    def retire_model(self, encoder: str, model_version: str) -> int:
        """Drop every vector of a model that is no longer active, and its saved index; returns rows tombstoned."""
        key = _check_key(encoder, model_version)
        with self._writing():
            count = self._delete(model_version=model_version)
            self._loaded.pop(key, None)
            shutil.rmtree(self.index_path(*key), ignore_errors=True)
            return count

    def _delete(self, **which: str) -> int:
        with self._writing():
            rows = self.catalogue.mark_deleted(**which)
            for key in sorted({(row.encoder, row.model_version) for row in rows}):
                self._refresh_key(key)
            self._changed(len(rows))
            return len(rows)

    def _changed(self, n: int) -> None:
        """Count changes not yet saved; save once there are ``snapshot_every`` of them."""
        self._unsaved += n
        self._last_change = time.monotonic()
        if self._unsaved >= self.snapshot_every:
            self.flush()

    def flush(self) -> None:
        """Save every in-memory index that is ahead of its saved index on disk, then wake the compaction.

        :meth:`add` and the deletions call this every ``snapshot_every`` changes; :meth:`close` calls it too. A
        save writes the changes only (see the module's notes).
        """
        self._unsaved = 0
        merge_due = False
        with self._writing():
            for key in sorted(self._loaded):
                state = self._refresh_key(key)
                if state.unsaved():
                    self._save(key, state)
                merge_due |= state.index is not None and bool(plan_merge(state.index.parts, self.params,
                                                                         settle=True))
        if merge_due:
            self._wake_compactor()

    def _save(self, key: Key, state: _Loaded, parts: list[Part] | None = None) -> None:
        """Write the tail as a segment and the changed deletion lists, then the manifest; caller holds write.lock.

        ``parts``: the segments to save instead of the in-memory ones (a merge's result). A state marked bad is
        written whole, as one segment, so that nothing of the unusable files is kept. The in-memory state changes
        only once the manifest is written: a save that fails half-way leaves it as it was, and its files are
        leftovers for the next compaction to remove.
        """
        index = state.index
        if index is None:
            return
        folder = self.index_path(*key)
        folder.mkdir(exist_ok=True)
        generation = state.generation + 1
        empty = np.empty(0, dtype=np.int64)
        if state.snapshot_bad:
            ids, vectors = index.live_items()
            parts = [Part(Segment.write(folder, ids, vectors, self.params, graph=False),
                          Tombstones.from_positions(ids.size, empty, None))] if ids.size else []
        else:
            parts = [p for p in (index.parts if parts is None else parts) if p.tombstones.live > 0]
            if len(index.tail):
                segment = Segment.write(folder, index.tail.ids(), index.tail.vectors(), self.params, graph=False)
                parts.append(Part(segment, Tombstones.from_positions(segment.count, empty, None)))
        deletion_files = {id(p): write_deleted(folder, p.segment, p.tombstones, generation)
                          for p in parts if p.tombstones.dirty}
        entries = tuple(SegmentEntry(p.segment.name, p.segment.count, deletion_files.get(id(p), p.tombstones.file))
                        for p in parts)
        Manifest(key[0], key[1], index.dim, state.seq, generation, entries).write(folder)
        for part, entry in zip(parts, entries):
            part.tombstones.file, part.tombstones.dirty = entry.deleted_file, False
        superseded = _entry_files(state.entries) - _entry_files(entries)
        state.index = SegmentedIndex(index.dim, parts)
        state.file_signature = _signature(folder / MANIFEST_FILE)
        state.generation, state.manifest_seq, state.entries, state.snapshot_bad = generation, state.seq, entries, False
        for name in superseded:  # a reader that maps one keeps it; one about to open it reads the manifest again
            (folder / name).unlink(missing_ok=True)
        for legacy in (self.index_dir / f"{folder.name}.faiss", self.index_dir / f"{folder.name}.faiss.json"):
            legacy.unlink(missing_ok=True)  # the single-file snapshot of earlier versions
        self._saved = True

    # -- compaction -------------------------------------------------------------------------------------------

    def compact(self, encoder: str | None = None, model_version: str | None = None, *,
                blocking: bool = True, settle: bool = False, convert: bool = False) -> int:
        """Merge segments until the merge policy is satisfied (see :func:`~lookalike.index.segments.plan_merge`).

        ``settle``: merge further, into the shape a reader searches fastest (what a writer does when it goes idle
        or closes, and ``lookalike compact``). ``convert`` (``lookalike compact``): then rewrite, one at a time,
        the segments whose storage is not ``params.storage`` (written before ``index_storage`` changed). Runs in the
        background thread after saves, on close, and as a maintenance step. Each merge builds its segment
        (with an HNSW graph once large) holding no lock, so adds and searches go on; it then takes ``write.lock``
        briefly to swap the segment in, carrying over the deletions made meanwhile. A crash at any point loses
        nothing: the old manifest still names complete files, and the catalogue holds every vector anyway. Also
        removes files no manifest names (left by a crash). Returns the number of merges; 0 at once when another
        thread or process is compacting and ``blocking`` is False.
        """
        return self._compact(encoder, model_version, blocking=blocking, settle=settle, convert=convert)

    def _compact(self, encoder: str | None = None, model_version: str | None = None, *, blocking: bool,
                 settle: bool, convert: bool = False, stop: threading.Event | None = None) -> int:
        """:meth:`compact`; ``stop``: the background thread's signal to end after the merge under way."""
        if self.readonly:
            raise PermissionError(f"index store {self.index_dir} is open read-only")
        with self._flock(COMPACT_LOCK_FILE, blocking) as held:
            if not held or self._closing:
                return 0
            if encoder is None and model_version is None:
                keys = self.catalogue.index_keys()
            else:
                keys = [(encoder, model_version)]
            merges = 0
            for key in keys:
                key = _check_key(*key)
                self._collect_garbage(key)
                while not self._closing and not (stop and stop.is_set()) and self._merge_once(key, settle, convert):
                    merges += 1
            return merges

    def _merge_once(self, key: Key, settle: bool = False, convert: bool = False) -> bool:
        """Plan one merge, build its segment without locks, swap it in; False when there was nothing to do."""
        with self._writing():
            if self._closing:
                return False
            state = self._refresh_key(key)
            if state.unsaved():
                self._save(key, state)
            if state.index is None:
                return False
            inputs = plan_merge(state.index.parts, self.params, settle, convert)
            if not inputs:
                return False
            planned = {p.segment.name: (p.segment, p.tombstones.copy()) for p in inputs}
            folder = self.index_path(*key)
        ids = np.concatenate([np.asarray(seg.ids)[t.live_positions()] for seg, t in planned.values()])
        vectors = np.concatenate([seg.vectors(t.live_positions()) for seg, t in planned.values()])
        merged = (Segment.write(folder, ids, vectors, self.params, graph=ids.size >= self.params.graph_min)
                  if ids.size else None)
        del vectors
        with self._writing():
            state = None if self._closing else self._refresh_key(key)
            current = {p.segment.name: p for p in state.index.parts} if state and state.index is not None else {}
            if state is None or state.snapshot_bad or not set(planned) <= set(current):
                if merged is not None:  # closing, or replaced meanwhile (a rebuild): this merge is moot
                    for suffix in (".faiss", ".ids.npy"):
                        (folder / f"{merged.name}{suffix}").unlink(missing_ok=True)
                return False
            parts = [p for p in state.index.parts if p.segment.name not in planned]
            if merged is not None:
                # Deleted while the merge ran: live in the planned copy, not now.
                gone = [np.asarray(seg.ids)[np.setdiff1d(t.live_positions(),
                                                         current[name].tombstones.live_positions())]
                        for name, (seg, t) in planned.items()]
                tombstones = Tombstones.from_positions(merged.count, np.empty(0, dtype=np.int64), None)
                tombstones.delete(merged.positions(np.concatenate(gone)))
                parts.append(Part(merged, tombstones))
            self._save(key, state, parts)
            log.info("index %s-%s: merged %d segments into %d %s vectors%s", *key, len(planned),
                     merged.count if merged else 0, self.params.storage,
                     " with a graph" if merged is not None and merged.graph else "")
            return True

    def _collect_garbage(self, key: Key) -> None:
        """Remove files of the key's folder that its manifest does not name (a crash's leftovers).

        Called with ``compact.lock`` held, so that no merge is writing a segment not yet named.
        """
        with self._writing():
            state = self._refresh_key(key)
            folder = self.index_path(*key)
            if state.snapshot_bad or not folder.is_dir() or state.file_signature is None:
                return
            keep = _entry_files(state.entries) | {MANIFEST_FILE}
            for path in folder.iterdir():
                if path.name not in keep:
                    log.info("removing %s: no manifest names it", path)
                    path.unlink(missing_ok=True)

    def _wake_compactor(self) -> None:
        """Start the background merge thread, or tell the running one that there is more to do."""
        if not self.background_compaction:
            return
        with self._lock:
            if self._closing or self._stop_background.is_set():
                return
            self._compaction_wanted.set()
            if self._compactor is None or not self._compactor.is_alive():
                self._compactor = threading.Thread(target=self._compact_in_background, name="index-compaction",
                                                   daemon=True)
                self._compactor.start()

    def _compact_in_background(self) -> None:
        """Merge after each save that leaves work; once no change came for ``settle_idle_s``, settle, then end.

        A burst or a back-fill is thus merged while the writer is idle, before any reader needs it; the thread
        ends when all is settled and the next save that leaves work starts another.
        """
        if hasattr(os, "SCHED_IDLE"):  # this thread only (and the OpenMP threads it starts): lookups come first
            with contextlib.suppress(OSError):
                os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
        stop = self._stop_background
        settled = False
        while not stop.is_set():
            idle = time.monotonic() - self._last_change
            if self._compaction_wanted.wait(max(0.0, self.params.settle_idle_s - idle)):
                self._compaction_wanted.clear()
                settle = settled = False
            elif time.monotonic() - self._last_change < self.params.settle_idle_s:
                continue  # a change came while waiting: wait until it is as old as the idle time
            elif settled:
                with self._lock:  # under the lock _wake_compactor takes: a wake now starts a new thread
                    if not self._compaction_wanted.is_set():
                        self._compactor = None
                        return
                continue
            else:
                settle = True
            if stop.is_set():
                return
            try:
                self._compact(blocking=False, settle=settle, stop=stop)
            except Exception:
                log.exception("index compaction failed")
                return
            settled = settle
