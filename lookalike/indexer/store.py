"""The index store: catalogue plus FAISS snapshots, shared by the worker (writer) and the plugin (reader).

Files in ``index_dir``:

``catalogue.sqlite``
    The truth (see :mod:`lookalike.indexer.catalogue`).
``<encoder>-<model_version>.faiss``
    A snapshot of one FAISS index, a cache of the catalogue's live vectors for that key.
``<encoder>-<model_version>.faiss.json``
    The catalogue ``seq`` the snapshot includes, written after the snapshot.
``write.lock``
    Held (``flock``) by the one process writing at a time.

Why this is safe without coordination between processes: the catalogue commits first, and a reader brings its
in-memory index up to date by replaying every catalogue change after the snapshot's ``seq``. Replay applies the
*current* state of each changed row, so it is idempotent: a snapshot that is older than its sidecar claims cannot
happen (the sidecar is written after the index and read before it), and one that is newer just gets changes
re-applied. A missing or unreadable snapshot is rebuilt from the catalogue vectors.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .catalogue import CATALOGUE_FILE, Catalogue, InstanceRecord, utc_now
from .vector_index import VectorIndex, atomic_write, normalise

log = logging.getLogger(__name__)

#: Name of the lock file that serialises writers across processes.
WRITE_LOCK_FILE = "write.lock"

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
    """What tells that a snapshot file was replaced: inode, size, modification time."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


@dataclass
class _Loaded:
    """In-memory state of one (encoder, model_version) index."""

    #: None until the key has a vector (the dimension is unknown before).
    index: VectorIndex | None = None
    #: The catalogue seq this in-memory index includes.
    seq: int = 0
    #: Signature of the snapshot file last loaded, written or seen (None: none).
    file_signature: FileSignature | None = None
    #: The snapshot on disk was unusable or inconsistent: a writer replaces it at the next flush.
    snapshot_bad: bool = False


class IndexStore:
    """Catalogue and FAISS indexes under one folder.

    Parameters
    ----------
    index_dir
        The folder (``Settings.index_dir``); created by a writer.
    readonly
        For the plugin: never writes a file, opens the catalogue read-only, and follows the writer through
        :meth:`refresh` (which :meth:`search` calls).
    snapshot_every
        A writer saves the FAISS snapshots after this many changes (and on :meth:`flush`/:meth:`close`). The
        catalogue is committed at every change and readers replay what a snapshot lacks, so a larger value loses
        nothing; it spares rewriting and fsyncing the whole index file for every instance.

    Notes
    -----
    Thread-safe: a lock guards the in-memory indexes, held during a search too (FAISS forbids searching an index
    while another thread changes it). Writers take ``write.lock`` before that lock, so a thread waiting for another
    process's write never blocks this process's searches.
    """

    def __init__(self, index_dir: str | os.PathLike, readonly: bool = False, snapshot_every: int = 1) -> None:
        if snapshot_every < 1:
            raise ValueError("snapshot_every must be at least 1")
        self.index_dir = Path(index_dir)
        self.readonly = readonly
        self.snapshot_every = snapshot_every
        self._unsaved = 0
        if not readonly:
            self.index_dir.mkdir(parents=True, exist_ok=True)
        self.catalogue = Catalogue(self.index_dir / CATALOGUE_FILE, readonly=readonly)
        self._lock = threading.RLock()
        self._loaded: dict[Key, _Loaded] = {}
        self._writer = threading.local()

    def close(self) -> None:
        """Save what the snapshots lack (a writer), then close the catalogue."""
        if not self.readonly and self._unsaved:
            self.flush()
        self.catalogue.close()

    def __enter__(self) -> "IndexStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- paths and locks --------------------------------------------------------------------------------------

    def index_path(self, encoder: str, model_version: str) -> Path:
        """The snapshot file of one index; its sidecar is this path plus ``.json``."""
        encoder, model_version = _check_key(encoder, model_version)
        return self.index_dir / f"{encoder}-{model_version}.faiss"

    @staticmethod
    def _sidecar_path(index_path: Path) -> Path:
        return index_path.with_name(index_path.name + ".json")

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
        """Bring the in-memory indexes (all, or one) up to date with the snapshots and the catalogue.

        Loads a snapshot only if its file changed since last seen and it is ahead of memory, then replays the
        catalogue changes after the in-memory ``seq``.
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
            state = self._loaded[key] = _Loaded()
        path = self.index_path(*key)
        signature = _signature(path)
        if signature is not None and signature != state.file_signature:
            self._load_snapshot(key, state, path)
        self._replay(key, state)
        return state

    def _load_snapshot(self, key: Key, state: _Loaded, path: Path) -> None:
        # Sidecar before index: the writer writes them the other way round, so the index read here includes at
        # least the seq read here.
        signature = _signature(path)
        meta = self._read_sidecar(path, key)
        snapshot_seq = meta["seq"] if meta else 0
        if state.index is not None and snapshot_seq <= state.seq:
            # Nothing in the file that replaying the catalogue would not give more cheaply: skip the read.
            state.file_signature = signature
            return
        latest = self.catalogue.max_seq()  # read after the sidecar: a save racing this read is not "the future"
        if snapshot_seq > latest:
            log.warning("snapshot %s claims seq %d, past the catalogue's %d: ignoring it", path, snapshot_seq,
                        latest)
            state.file_signature, state.snapshot_bad = signature, True
            return
        try:
            index = VectorIndex.load(path)
            if meta and meta.get("dim") not in (None, index.dim):
                raise ValueError(f"sidecar says dim {meta['dim']}, index has {index.dim}")
        except (FileNotFoundError, ValueError) as error:
            log.warning("snapshot %s unusable (%s): rebuilding from the catalogue", path, error)
            state.file_signature, state.snapshot_bad = signature, True
            if state.index is None:
                state.seq = 0
            return
        state.index, state.seq, state.file_signature = index, snapshot_seq, signature
        state.snapshot_bad = False

    @staticmethod
    def _read_sidecar(path: Path, key: Key) -> dict | None:
        try:
            meta = json.loads(IndexStore._sidecar_path(path).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            log.warning("sidecar of %s unreadable (%s): replaying the whole catalogue", path, error)
            return None
        if (not isinstance(meta, dict) or not isinstance(meta.get("seq"), int)
                or (meta.get("encoder"), meta.get("model_version")) != key):
            log.warning("sidecar of %s does not describe %s-%s: replaying the whole catalogue", path, *key)
            return None
        return meta

    def _replay(self, key: Key, state: _Loaded) -> int:
        """Apply catalogue changes after ``state.seq``: drop each changed id, re-add it if live and ours."""
        encoder, model_version = key
        applied = 0
        while True:
            changes = self.catalogue.changes_since(state.seq, model_version, limit=_REPLAY_BATCH)
            if not changes:
                return applied
            if state.index is not None:
                state.index.remove([c.id for c in changes])
            live = [c for c in changes if c.vector is not None and c.encoder == encoder]
            if live and state.index is None:
                state.index = VectorIndex(live[0].vector.shape[0])
            good = [c for c in live if c.vector.shape[0] == state.index.dim]
            for bad in (c for c in live if c.vector.shape[0] != state.index.dim):
                log.error("catalogue id %d has dim %d, index %s-%s has %d: left out", bad.id,
                          bad.vector.shape[0], *key, state.index.dim)
            if good:
                state.index.add_or_replace([c.id for c in good], np.stack([c.vector for c in good]))
            state.seq = changes[-1].seq
            applied += len(changes)

    def rebuild(self, encoder: str, model_version: str) -> int:
        """Rebuild one index from the catalogue vectors alone (and save it, for a writer); returns its size.

        Used when a snapshot is missing or corrupt, and by operators who suspect one.
        """
        key = _check_key(encoder, model_version)
        context = self._lock if self.readonly else self._writing()
        with context:
            path = self.index_path(*key)
            # Whatever is on disk is not trusted: do not load it, and replace it.
            state = self._loaded[key] = _Loaded(file_signature=_signature(path), snapshot_bad=True)
            self._replay(key, state)
            if not self.readonly:
                self._save(key, state)
            return len(state.index) if state.index is not None else 0

    def size(self, encoder: str, model_version: str) -> int:
        """Number of vectors in one index, after a refresh."""
        with self._lock:
            state = self._refresh_key(_check_key(encoder, model_version))
            return len(state.index) if state.index is not None else 0

    def search(self, encoder: str, model_version: str, vectors: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray]:
        """Refresh one index and return its ``k`` nearest ids (cosine, best first) for each query vector.

        Returns ``(scores, ids)``, each ``(n_queries, min(k, index size))``; empty columns if the index has nothing.
        """
        key = _check_key(encoder, model_version)
        with self._lock:
            state = self._refresh_key(key)
            if state.index is None:
                n = normalise(vectors).shape[0]
                return np.empty((n, 0), dtype=np.float32), np.empty((n, 0), dtype=np.int64)
            return state.index.search(vectors, k)

    # -- writing ----------------------------------------------------------------------------------------------

    def add(self, record: InstanceRecord, vector: np.ndarray) -> int:
        """Index one instance and return its catalogue id; indexing it again replaces its vector."""
        units = normalise(vector)
        if units.shape[0] != 1:
            raise ValueError(f"add takes one vector, got {units.shape[0]}")
        return self.add_many([record], units)[0]

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
                dims = {units.shape[1]}
                if state.index is not None and state.index.dim not in dims:
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
        """Drop every vector of a model that is no longer active, and its FAISS files; returns rows tombstoned."""
        key = _check_key(encoder, model_version)
        with self._writing():
            count = self._delete(model_version=model_version)
            self._loaded.pop(key, None)
            path = self.index_path(*key)
            for file in (path, self._sidecar_path(path)):
                file.unlink(missing_ok=True)
            return count

    def _delete(self, **which: str) -> int:
        with self._writing():
            rows = self.catalogue.mark_deleted(**which)
            for key in sorted({(row.encoder, row.model_version) for row in rows}):
                self._refresh_key(key)
            self._changed(len(rows))
            return len(rows)

    def _changed(self, n: int) -> None:
        """Count changes not yet in a snapshot; save the snapshots once there are ``snapshot_every`` of them."""
        self._unsaved += n
        if self._unsaved >= self.snapshot_every:
            self.flush()

    def flush(self) -> None:
        """Save every in-memory index that is ahead of its snapshot on disk.

        :meth:`add` and the deletions call this every ``snapshot_every`` changes; :meth:`close` calls it too.
        """
        self._unsaved = 0
        with self._writing():
            for key in sorted(self._loaded):
                state = self._refresh_key(key)
                on_disk = self._read_sidecar(self.index_path(*key), key)
                if state.snapshot_bad or on_disk is None or state.seq > on_disk["seq"]:
                    self._save(key, state)

    def _save(self, key: Key, state: _Loaded) -> None:
        """Write the snapshot, then its sidecar (both atomically); caller holds the write lock."""
        if state.index is None:
            return
        path = self.index_path(*key)
        state.index.save(path)
        meta = {"encoder": key[0], "model_version": key[1], "seq": state.seq, "dim": state.index.dim,
                "count": len(state.index), "saved_at": utc_now()}
        atomic_write(self._sidecar_path(path), lambda temp: Path(temp).write_text(json.dumps(meta, indent=1)))
        state.file_signature = _signature(path)
        state.snapshot_bad = False
