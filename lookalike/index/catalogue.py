"""The catalogue: the SQLite record of every indexed instance, the source of truth for the FAISS files.

The FAISS snapshots are a cache that can always be rebuilt from here: each row keeps its (normalised) vector,
and a global change number ``seq``, bumped on every insert, update and deletion, lets a reader replay whatever
a snapshot is missing. Deleting an instance leaves a *tombstone* (``vector`` NULL, new ``seq``) rather than
removing the row, so that replay can tell readers to drop the vector and so that ids are never reused.

The worker writes and the Orthanc plugin reads, in different processes at the same time: the database runs in
WAL mode (readers never block the writer) with a busy timeout, and readers may open it read-only.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable
from urllib.request import pathname2url

import numpy as np

#: File name of the catalogue inside the index folder.
CATALOGUE_FILE = "catalogue.sqlite"
#: The cursor that holds the last Orthanc change the worker's catch-up handled (read by ``/lookalike/status``).
CHANGES_CURSOR = "orthanc-changes"

#: 3: ``study_time`` (rows of an older catalogue keep it NULL, read as unknown); 2: ``lesion_box``.
_SCHEMA_VERSION = 3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    sop_instance_uid    TEXT NOT NULL,
    sop_class_uid       TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    study_instance_uid  TEXT NOT NULL,
    patient_id          TEXT NOT NULL,
    study_date          TEXT NOT NULL,
    modality            TEXT NOT NULL,
    orthanc_instance_id TEXT NOT NULL,
    orthanc_series_id   TEXT NOT NULL,
    orthanc_study_id    TEXT NOT NULL,
    encoder             TEXT NOT NULL,
    model_version       TEXT NOT NULL,
    vector              BLOB,
    dim                 INTEGER NOT NULL,
    indexed_at          TEXT NOT NULL,
    seq                 INTEGER NOT NULL,
    lesion_box          TEXT,
    study_time          TEXT,
    UNIQUE (sop_instance_uid, model_version)
);
CREATE INDEX IF NOT EXISTS instances_by_study ON instances (orthanc_study_id);
CREATE INDEX IF NOT EXISTS instances_by_instance ON instances (orthanc_instance_id);
CREATE INDEX IF NOT EXISTS instances_by_change ON instances (model_version, seq);
CREATE TABLE IF NOT EXISTS problems (
    orthanc_instance_id TEXT PRIMARY KEY,
    sop_instance_uid    TEXT,
    orthanc_study_id    TEXT,
    code                TEXT NOT NULL,
    message             TEXT NOT NULL,
    at                  TEXT NOT NULL,
    attempts            INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS active_models (
    encoder       TEXT PRIMARY KEY,
    model_version TEXT NOT NULL,
    weights       TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('seq', 0);
"""

_VECTOR_DTYPE = np.dtype("<f4")


def utc_now() -> str:
    """ISO 8601 UTC time with microseconds, so that rows written in one second still sort by time."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class InstanceRecord:
    """What the catalogue knows about an instance besides its vector: enough to answer a lookup without Orthanc."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    patient_id: str
    study_date: str
    modality: str
    orthanc_instance_id: str
    orthanc_series_id: str
    orthanc_study_id: str
    #: "us" or "xr": which encoder made the vector (see ``config.ENCODER_FOR_MODALITY``).
    encoder: str
    model_version: str
    #: The lesion the vector was made from, ``(x0, y0, x1, y1, confidence)`` in the stored pixels of the full frame
    #: (``x1``, ``y1`` exclusive), so that a viewer can draw it on the image Orthanc serves; None: the whole image.
    lesion_box: tuple[int, int, int, int, float] | None = None
    #: StudyTime as the instance has it (DICOM TM); "" when it has none or the row predates schema 3: what orders
    #: two studies of one day (:func:`lookalike.dicom.study_order.is_prior`).
    study_time: str = ""


_RECORD_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(InstanceRecord))


@dataclass(frozen=True, kw_only=True)
class CatalogueRow(InstanceRecord):
    """One catalogue row: the record plus its FAISS id and bookkeeping.

    ``vector`` is None for a tombstone, and also when the query asked for rows without vectors; ``live`` tells the
    two apart.
    """

    id: int
    vector: np.ndarray | None
    dim: int
    indexed_at: str
    seq: int
    live: bool

    @property
    def record(self) -> InstanceRecord:
        return InstanceRecord(**{name: getattr(self, name) for name in _RECORD_FIELDS})


@dataclass(frozen=True)
class Change:
    """The current state of a row changed after some ``seq``: what a FAISS reader must apply to catch up."""

    id: int
    seq: int
    encoder: str
    #: None: the instance was deleted, drop the id.
    vector: np.ndarray | None


@dataclass(frozen=True)
class Problem:
    """Why an instance is not indexed, kept so that the plugin can tell a user instead of silently missing it."""

    orthanc_instance_id: str
    sop_instance_uid: str | None
    orthanc_study_id: str | None
    #: Short machine-readable reason: "invalid-dicom", "not-indexable", "transient", ...
    code: str
    message: str
    at: str
    attempts: int


def _vector_bytes(vector: np.ndarray) -> tuple[bytes, int]:
    array = np.asarray(vector, dtype=_VECTOR_DTYPE)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"a catalogue vector must be 1-D and non-empty, got shape {array.shape}")
    return array.tobytes(), int(array.size)


def _vector_from(blob: bytes | None, dim: int) -> np.ndarray | None:
    if blob is None:
        return None
    array = np.frombuffer(blob, dtype=_VECTOR_DTYPE)
    if array.size != dim:
        raise ValueError(f"catalogue vector holds {array.size} values, row says dim={dim}")
    return array.astype(np.float32)  # a writable, native-endian copy


_BOX_FIELD = _RECORD_FIELDS.index("lesion_box")
_TIME_FIELD = _RECORD_FIELDS.index("study_time")


def _box_text(box: tuple | None) -> str | None:
    if box is None:
        return None
    x0, y0, x1, y1, confidence = box
    if not (0 <= x0 < x1 and 0 <= y0 < y1):
        raise ValueError(f"a lesion box needs 0 <= x0 < x1 and 0 <= y0 < y1, got {box}")
    return json.dumps([int(x0), int(y0), int(x1), int(y1), round(float(confidence), 4)])


def _box_from(text: str | None) -> tuple[int, int, int, int, float] | None:
    if text is None:
        return None
    x0, y0, x1, y1, confidence = json.loads(text)
    return int(x0), int(y0), int(x1), int(y1), float(confidence)


_ROW_COLUMN_NAMES = ("id", *_RECORD_FIELDS, "dim", "indexed_at", "seq", "vector IS NOT NULL AS live")
_ROW_COLUMNS = ", ".join(_ROW_COLUMN_NAMES)
_DIM_COLUMN = _ROW_COLUMN_NAMES.index("dim")


class Catalogue:
    """The SQLite catalogue at ``path``.

    Parameters
    ----------
    path
        The database file, normally ``<index_dir>/catalogue.sqlite``.
    readonly
        Open without write access (the plugin). A read-only catalogue whose file does not exist yet (no instance
        was ever indexed) reads as empty and opens the file once it appears.
    timeout
        Seconds to wait for a lock held by another process before giving up, so that reader and writer can work
        at the same time.

    Notes
    -----
    One connection serves all threads, guarded by a lock: Orthanc calls the plugin's REST handlers from several
    threads, and each call here is short.
    """

    def __init__(self, path: str | Path, *, readonly: bool = False, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.timeout = timeout
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        if not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._connection()

    # -- connection -------------------------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection | None:
        """The open connection, opened on first use; None for a read-only catalogue whose file is not there yet."""
        if self._conn is not None:
            return self._conn
        if self.readonly:
            if not self.path.exists():
                return None
            uri = f"file:{pathname2url(str(self.path.resolve()))}?mode=ro"
            conn = sqlite3.connect(uri, uri=True, timeout=self.timeout, isolation_level=None,
                                   check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
            if conn.execute("PRAGMA user_version").fetchone()[0] != _SCHEMA_VERSION:
                # The writer has created the file but not yet committed its schema: empty, for now.
                conn.close()
                return None
        else:
            conn = sqlite3.connect(str(self.path), timeout=self.timeout, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit survives power loss, so a FAISS snapshot never holds a change the catalogue forgot.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(instances)")}
            if "lesion_box" not in columns:  # a catalogue of schema 1: the boxes came in schema 2
                conn.execute("ALTER TABLE instances ADD COLUMN lesion_box TEXT")
            if "study_time" not in columns:  # before schema 3: its rows' StudyTime stays unknown (NULL)
                conn.execute("ALTER TABLE instances ADD COLUMN study_time TEXT")
            conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            conn.execute("COMMIT")
        conn.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
        self._conn = conn
        return conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> "Catalogue":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self) -> "_Transaction":
        if self.readonly:
            raise PermissionError(f"catalogue {self.path} is open read-only")
        return _Transaction(self, immediate=True)

    def _read(self) -> "_Transaction":
        return _Transaction(self, immediate=False)

    @staticmethod
    def _next_seq(conn: sqlite3.Connection) -> int:
        conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'seq'")
        return int(conn.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0])

    @staticmethod
    def _row(values: tuple, vector: np.ndarray | None) -> CatalogueRow:
        id_, *rest = values
        record_values = rest[: len(_RECORD_FIELDS)]
        record_values[_BOX_FIELD] = _box_from(record_values[_BOX_FIELD])
        record_values[_TIME_FIELD] = record_values[_TIME_FIELD] or ""
        dim, indexed_at, seq, live = rest[len(_RECORD_FIELDS):]
        return CatalogueRow(*record_values, id=int(id_), vector=vector, dim=int(dim), indexed_at=indexed_at,
                            seq=int(seq), live=bool(live))

    def _select(self, where: str, params: Iterable, *, with_vectors: bool) -> list[CatalogueRow]:
        columns = _ROW_COLUMNS + (", vector" if with_vectors else "")
        with self._read() as conn:
            if conn is None:
                return []
            result = conn.execute(f"SELECT {columns} FROM instances WHERE {where} ORDER BY id", tuple(params))
            rows = result.fetchall()
        n = len(_ROW_COLUMN_NAMES)
        return [self._row(r[:n], _vector_from(r[n], int(r[_DIM_COLUMN])) if with_vectors else None) for r in rows]

    # -- instances --------------------------------------------------------------------------------------------

    def upsert(self, record: InstanceRecord, vector: np.ndarray) -> int:
        """Store ``record`` with ``vector`` and return its id (the FAISS id); see :meth:`upsert_many`."""
        return self.upsert_many([record], [vector])[0]

    def upsert_many(self, records: list[InstanceRecord], vectors: Iterable[np.ndarray]) -> list[int]:
        """Store each record with its vector, in one transaction, and return their ids (the FAISS ids).

        Indexing the same SOP instance again with the same model updates the row in place: same id, new ``seq``,
        so that the index keeps one entry for it. It also revives a tombstone, and clears any problem recorded for
        the instance, since it has now been indexed. One transaction (one fsync) for a batch is what lets a worker
        that embeds in batches write at the rate it embeds.
        """
        blobs = [_vector_bytes(vector) for vector in vectors]
        if len(blobs) != len(records):
            raise ValueError(f"{len(records)} records for {len(blobs)} vectors")
        columns = (*_RECORD_FIELDS, "vector", "dim", "indexed_at", "seq")
        insert = f"INSERT INTO instances ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        update = f"UPDATE instances SET {', '.join(f'{name} = ?' for name in columns)} WHERE id = ?"
        ids: list[int] = []
        with self._write() as conn:
            now = utc_now()
            for record, (blob, dim) in zip(records, blobs):
                values = {name: getattr(record, name) for name in _RECORD_FIELDS}
                values["lesion_box"] = _box_text(record.lesion_box)
                seq = self._next_seq(conn)
                found = conn.execute("SELECT id FROM instances WHERE sop_instance_uid = ? AND model_version = ?",
                                     (record.sop_instance_uid, record.model_version)).fetchone()
                if found is None:
                    row_id = int(conn.execute(insert, (*values.values(), blob, dim, now, seq)).lastrowid)
                else:
                    row_id = int(found[0])
                    conn.execute(update, (*values.values(), blob, dim, now, seq, row_id))
                conn.execute("DELETE FROM problems WHERE orthanc_instance_id = ?", (record.orthanc_instance_id,))
                ids.append(row_id)
        return ids

    def mark_deleted(self, **which: str) -> list[CatalogueRow]:
        """Tombstone the live rows of one instance, series or study (Orthanc deleted them).

        Give exactly one of ``orthanc_instance_id``, ``orthanc_series_id`` and ``orthanc_study_id``. Each
        tombstone gets a new ``seq`` so that readers drop its vector; the problems recorded for those instances
        go too, as there is nothing left to fix. Returns the rows as they were before deletion (without
        vectors), so that the caller knows which FAISS indexes to update.
        """
        allowed = {"orthanc_instance_id", "orthanc_series_id", "orthanc_study_id", "model_version"}
        if len(which) != 1 or not set(which) <= allowed:
            raise ValueError(f"give exactly one of {sorted(allowed)}")
        [(column, value)] = which.items()
        with self._write() as conn:
            found = conn.execute(f"SELECT {_ROW_COLUMNS} FROM instances WHERE {column} = ? AND vector IS NOT NULL"
                                 " ORDER BY id", (value,)).fetchall()
            for values in found:
                conn.execute("UPDATE instances SET vector = NULL, seq = ? WHERE id = ?",
                             (self._next_seq(conn), values[0]))
            if column == "model_version":  # a retired model: the instances themselves are still there
                pass
            elif column == "orthanc_series_id":  # problems know no series: drop those of the instances found
                conn.executemany("DELETE FROM problems WHERE orthanc_instance_id = ?",
                                 [(self._row(values, None).orthanc_instance_id,) for values in found])
            else:
                conn.execute(f"DELETE FROM problems WHERE {column} = ?", (value,))
        return [self._row(values, None) for values in found]

    def rows_for_study(self, orthanc_study_id: str, *, with_vectors: bool = True,
                       live_only: bool = True) -> list[CatalogueRow]:
        """The rows of one Orthanc study, by id; tombstones only when ``live_only`` is False."""
        where = "orthanc_study_id = ?" + (" AND vector IS NOT NULL" if live_only else "")
        return self._select(where, (orthanc_study_id,), with_vectors=with_vectors)

    def rows(self, ids: Iterable[int], *, with_vectors: bool = False) -> dict[int, CatalogueRow]:
        """Rows by id (tombstones included, see ``live``), to turn FAISS hits back into instances and studies."""
        wanted = sorted({int(i) for i in ids})
        found: dict[int, CatalogueRow] = {}
        for start in range(0, len(wanted), 500):  # stay well under SQLite's bound-parameter limit
            chunk = wanted[start:start + 500]
            where = f"id IN ({', '.join('?' * len(chunk))})"
            found.update((row.id, row) for row in self._select(where, chunk, with_vectors=with_vectors))
        return found

    def live_studies_by_patient(self) -> dict[str, list[str]]:
        """PatientID -> Orthanc study ids with a live row: what a patient-level deletion has to find."""
        with self._read() as conn:
            if conn is None:
                return {}
            found = conn.execute("SELECT DISTINCT patient_id, orthanc_study_id FROM instances"
                                 " WHERE vector IS NOT NULL ORDER BY patient_id, orthanc_study_id").fetchall()
        studies: dict[str, list[str]] = {}
        for patient_id, study_id in found:
            studies.setdefault(patient_id, []).append(study_id)
        return studies

    def is_indexed(self, orthanc_instance_id: str, model_version: str | None = None) -> bool:
        """Whether the instance has a live vector (with ``model_version``, if given): lets the worker skip work."""
        sql = "SELECT 1 FROM instances WHERE orthanc_instance_id = ? AND vector IS NOT NULL"
        params: tuple = (orthanc_instance_id,)
        if model_version is not None:
            sql += " AND model_version = ?"
            params += (model_version,)
        with self._read() as conn:
            return conn is not None and conn.execute(sql + " LIMIT 1", params).fetchone() is not None

    def changes_since(self, after_seq: int, model_version: str, *, limit: int | None = None) -> list[Change]:
        """Current state of the rows of ``model_version`` changed after ``after_seq``, in ``seq`` order.

        A reader that applies them (drop the id, then add the vector if there is one and the encoder is its own)
        catches up from any older snapshot; applying them twice does no harm. ``limit`` bounds memory on a full
        rebuild: call again from the last ``seq`` returned.
        """
        sql = ("SELECT id, seq, encoder, vector, dim FROM instances WHERE model_version = ? AND seq > ?"
               " ORDER BY seq")
        params: tuple = (model_version, int(after_seq))
        if limit is not None:
            sql += " LIMIT ?"
            params += (int(limit),)
        with self._read() as conn:
            if conn is None:
                return []
            found = conn.execute(sql, params).fetchall()
        return [Change(int(i), int(s), enc, _vector_from(blob, int(dim))) for i, s, enc, blob, dim in found]

    def max_seq(self) -> int:
        """The last change number handed out (0 for an empty catalogue)."""
        with self._read() as conn:
            if conn is None:
                return 0
            return int(conn.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0])

    def index_keys(self) -> list[tuple[str, str]]:
        """Every (encoder, model_version) with a row, live or not: the FAISS indexes a reader must keep current."""
        with self._read() as conn:
            if conn is None:
                return []
            found = conn.execute("SELECT DISTINCT encoder, model_version FROM instances"
                                 " ORDER BY encoder, model_version").fetchall()
        return [(enc, mv) for enc, mv in found]

    # -- models -----------------------------------------------------------------------------------------------

    def active_model(self, encoder: str) -> tuple[str, str] | None:
        """(model version, checkpoint path; "" for the shipped weights) that lookups and new instances use."""
        with self._read() as conn:
            if conn is None:
                return None
            found = conn.execute("SELECT model_version, weights FROM active_models WHERE encoder = ?",
                                 (encoder,)).fetchone()
        return (found[0], found[1]) if found else None

    def set_active_model(self, encoder: str, model_version: str, weights: str) -> None:
        """Switch lookups and indexing of ``encoder`` to another model, in one transaction."""
        with self._write() as conn:
            conn.execute("INSERT OR REPLACE INTO active_models (encoder, model_version, weights) VALUES (?, ?, ?)",
                         (encoder, model_version, weights))

    def replace_active_model(self, encoder: str, expected: tuple[str, str] | None, model_version: str,
                             weights: str) -> bool:
        """:meth:`set_active_model` only while the recorded model is still ``expected`` (None: none recorded).

        Read and written in one transaction, under SQLite's write lock: a decision taken on what was read (the
        worker keeping an updated site on its archive's model) never overwrites a switch another process made
        meanwhile (``lookalike reindex``). Returns whether it wrote.
        """
        with self._write() as conn:
            found = conn.execute("SELECT model_version, weights FROM active_models WHERE encoder = ?",
                                 (encoder,)).fetchone()
            if (None if found is None else (found[0], found[1])) != (None if expected is None else tuple(expected)):
                return False
            conn.execute("INSERT OR REPLACE INTO active_models (encoder, model_version, weights) VALUES (?, ?, ?)",
                         (encoder, model_version, weights))
        return True

    def live_versions(self, encoder: str) -> dict[str, int]:
        """Model version -> live instances, for one encoder."""
        with self._read() as conn:
            if conn is None:
                return {}
            found = conn.execute("SELECT model_version, COUNT(*) FROM instances WHERE encoder = ? AND vector IS NOT"
                                 " NULL GROUP BY model_version ORDER BY model_version", (encoder,)).fetchall()
        return {version: int(n) for version, n in found}

    def lacking(self, encoder: str, model_version: str) -> list[tuple[str, str, str]]:
        """(instance, series, study) Orthanc ids live under another model of ``encoder`` but not ``model_version``."""
        with self._read() as conn:
            if conn is None:
                return []
            found = conn.execute(
                "SELECT DISTINCT orthanc_instance_id, orthanc_series_id, orthanc_study_id FROM instances AS old"
                " WHERE encoder = ? AND model_version != ? AND vector IS NOT NULL AND NOT EXISTS (SELECT 1 FROM"
                " instances AS new WHERE new.orthanc_instance_id = old.orthanc_instance_id AND new.model_version = ?"
                " AND new.vector IS NOT NULL) ORDER BY orthanc_study_id, orthanc_instance_id",
                (encoder, model_version, model_version)).fetchall()
        return [tuple(row) for row in found]

    def cursor(self, name: str) -> int:
        """A named position kept with the index (e.g. the last Orthanc change read); 0 when never set."""
        with self._read() as conn:
            if conn is None:
                return 0
            found = conn.execute("SELECT value FROM meta WHERE key = ?", (f"cursor:{name}",)).fetchone()
        return int(found[0]) if found else 0

    def set_cursor(self, name: str, value: int, anchor: str | None = None) -> None:
        """Move a named position; kept in the same database as the rows it describes, so both survive together.

        ``anchor`` (optional) says what the position points at in the log it reads (e.g. the last Orthanc change
        read, by number, type, resource and date), written in the same transaction: a reader can then tell the
        log it left from another one that reuses its numbers (a replaced Orthanc database).
        """
        with self._write() as conn:
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (f"cursor:{name}", int(value)))
            if anchor is not None:
                # meta.value is declared INTEGER; SQLite keeps a text that is not a number as text.
                conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (f"anchor:{name}", anchor))

    def cursor_anchor(self, name: str) -> str:
        """What the named position pointed at when it was last moved with an anchor; "" when never."""
        with self._read() as conn:
            if conn is None:
                return ""
            found = conn.execute("SELECT value FROM meta WHERE key = ?", (f"anchor:{name}",)).fetchone()
        return str(found[0]) if found else ""

    def counts(self) -> list[tuple[str, str, str, int]]:
        """(modality, encoder, model_version, number of live instances), for status pages and metrics."""
        with self._read() as conn:
            if conn is None:
                return []
            found = conn.execute("SELECT modality, encoder, model_version, COUNT(*) FROM instances"
                                 " WHERE vector IS NOT NULL GROUP BY modality, encoder, model_version"
                                 " ORDER BY modality, encoder, model_version").fetchall()
        return [(m, e, v, int(n)) for m, e, v, n in found]

    # -- problems ---------------------------------------------------------------------------------------------

    def record_problem(self, orthanc_instance_id: str, code: str, message: str, *,
                       sop_instance_uid: str | None = None, orthanc_study_id: str | None = None) -> Problem:
        """Remember why ``orthanc_instance_id`` could not be indexed; a repeat replaces it and counts the attempt."""
        with self._write() as conn:
            previous = conn.execute("SELECT attempts FROM problems WHERE orthanc_instance_id = ?",
                                    (orthanc_instance_id,)).fetchone()
            attempts = (int(previous[0]) if previous else 0) + 1
            problem = Problem(orthanc_instance_id, sop_instance_uid, orthanc_study_id, code, message, utc_now(),
                              attempts)
            # REPLACE gives the row a new rowid: the tie-break for "newest first" within one microsecond.
            conn.execute("INSERT OR REPLACE INTO problems (orthanc_instance_id, sop_instance_uid, orthanc_study_id,"
                         " code, message, at, attempts) VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (problem.orthanc_instance_id, problem.sop_instance_uid, problem.orthanc_study_id,
                          problem.code, problem.message, problem.at, problem.attempts))
        return problem

    def clear_problem(self, orthanc_instance_id: str) -> bool:
        """Forget the problem of an instance; True if there was one."""
        with self._write() as conn:
            cursor = conn.execute("DELETE FROM problems WHERE orthanc_instance_id = ?", (orthanc_instance_id,))
            return cursor.rowcount > 0

    def problems(self, limit: int = 100, *, orthanc_study_id: str | None = None,
                 codes: Iterable[str] | None = None) -> list[Problem]:
        """The most recent problems, newest first; only one study's with ``orthanc_study_id``, only ``codes``."""
        clauses, params = [], []
        if orthanc_study_id:
            clauses.append("orthanc_study_id = ?")
            params.append(orthanc_study_id)
        if codes is not None:
            codes = list(codes)
            clauses.append(f"code IN ({', '.join('?' * len(codes))})")
            params.extend(codes)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        with self._read() as conn:
            if conn is None:
                return []
            found = conn.execute("SELECT orthanc_instance_id, sop_instance_uid, orthanc_study_id, code, message, at,"
                                 f" attempts FROM problems {where} ORDER BY at DESC, rowid DESC LIMIT ?",
                                 (*params, int(limit))).fetchall()
        return [Problem(*values) for values in found]

    def problem_for(self, orthanc_instance_id: str) -> Problem | None:
        """The problem recorded for one instance, if any."""
        with self._read() as conn:
            if conn is None:
                return None
            values = conn.execute("SELECT orthanc_instance_id, sop_instance_uid, orthanc_study_id, code, message,"
                                  " at, attempts FROM problems WHERE orthanc_instance_id = ?",
                                  (orthanc_instance_id,)).fetchone()
        return Problem(*values) if values else None


class _Transaction:
    """Hold the catalogue's thread lock and one SQLite transaction: commit on success, roll back on error.

    Reads run in a transaction too so that a multi-statement read sees one consistent state of the database.
    """

    def __init__(self, catalogue: Catalogue, *, immediate: bool) -> None:
        self._catalogue = catalogue
        self._immediate = immediate
        self._conn: sqlite3.Connection | None = None

    def __enter__(self) -> sqlite3.Connection | None:
        self._catalogue._lock.acquire()
        try:
            conn = self._catalogue._connection()
            if conn is not None:
                # IMMEDIATE takes the write lock up front: the seq counter is read and bumped by one writer at a
                # time, so seq order is commit order and a reader never sees a lower seq appear later.
                conn.execute("BEGIN IMMEDIATE" if self._immediate else "BEGIN")
        except BaseException:
            self._catalogue._lock.release()
            raise
        self._conn = conn
        return conn

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        try:
            if self._conn is not None:
                if exc_type is None:
                    try:
                        self._conn.execute("COMMIT")
                    except BaseException:
                        if self._conn.in_transaction:
                            self._conn.execute("ROLLBACK")
                        raise
                else:
                    self._conn.execute("ROLLBACK")
        finally:
            self._catalogue._lock.release()

