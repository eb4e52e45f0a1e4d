"""Settings shared by the plugin, the worker and the command line.

One JSON file holds them (``LOOKALIKE_CONFIG`` names it); ``lookalike run`` writes it with generated credentials
into ``deploy/local/`` which git ignores. Orthanc's own configuration carries the same values under its
``"Lookalike"`` section, so the plugin reads them from ``orthanc.GetConfiguration()`` without a second file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

#: Modalities whose instances Lookalike indexes, and the encoder each goes to.
ENCODER_FOR_MODALITY: dict[str, str] = {"US": "us", "DX": "xr", "CR": "xr"}

#: Celery task names; the plugin queues by name so that it never imports the worker's code.
TASK_INDEX_INSTANCE = "lookalike.index_instance"
TASK_RECONCILE_STUDY = "lookalike.reconcile_study"
TASK_FORGET = "lookalike.forget"
TASK_CATCH_UP = "lookalike.catch_up"
TASK_REINDEX_INSTANCE = "lookalike.reindex_instance"

#: The queue the plugin writes to and the worker reads.
QUEUE = "lookalike"

#: Embedding split from the index (``Settings.remote_embedding``): the index host's worker sends each instance to
#: ``EMBED_QUEUE`` (workers on any host, GPUs, no index folder), which send each batch's vectors to ``WRITE_QUEUE``
#: (the one writer, beside the index). See :mod:`lookalike.worker.tasks`.
EMBED_QUEUE = "lookalike.embed"
WRITE_QUEUE = "lookalike.write"
TASK_EMBED = "lookalike.embed"
TASK_WRITE = "lookalike.write"

#: Redis key where the plugin notes when Orthanc last received an instance to index (``time.time()``, written at most
#: every ``lookalike.plugin.sender.MARK_EVERY`` seconds): the worker fetches once it is old enough (``ingest_quiet``).
INGEST_MARK_KEY = "lookalike:last-stored"

#: How the index may store its vectors (``Settings.index_storage``, ``lookalike.index.segments.IndexParams``).
INDEX_STORAGES = ("fp32", "fp16")


@dataclass
class Settings:
    """Where the parts of the stack are and how to reach them."""

    orthanc_url: str = "http://127.0.0.1:8042"
    orthanc_user: str = "lookalike"
    orthanc_password: str = ""
    redis_url: str = "redis://127.0.0.1:6379/0"
    #: Folder that holds the catalogue (SQLite) and the FAISS files.
    index_dir: str = "var/index"
    #: How index segments written from now on store their vectors: "fp32" (exact cosines) or "fp16" (half the
    #: memory and disk per vector; cosines within about 1e-3, recall: ``bench/index_scale.py --storage fp16``).
    #: Segments already written keep their storage and stay searchable, so changing it loses nothing; merges write
    #: the new one, and ``lookalike compact`` rewrites the rest (see :mod:`lookalike.index.segments`).
    index_storage: str = "fp32"
    #: Optional paths to encoder checkpoints that replace the shipped weights, keyed by encoder name.
    weights: dict[str, str] = field(default_factory=dict)
    #: Instances whose decoded pixels exceed this many are refused before decoding.
    max_pixels: int = 50_000_000
    #: The worker runs at idle CPU priority (Linux SCHED_IDLE), or else adds this niceness: ingest comes first.
    worker_idle_priority: bool = True
    worker_nice: int = 10
    #: CPU threads torch may use in the worker; the rest of the machine stays with Orthanc.
    torch_threads: int = 1
    #: Seconds between two reads of Orthanc's change log by the worker (catch-up after any outage); 0: never.
    catch_up_interval: float = 30.0
    #: The worker embeds up to this many instances in one forward per encoder, waiting at most this many seconds
    #: for a batch to fill (only while a pool process is free: a busy one lets the next batch grow).
    batch_size: int = 32
    batch_wait: float = 0.05
    #: The PACS first: before fetching a batch from Orthanc, the worker waits until Orthanc has received no instance to
    #: index for ``ingest_quiet`` seconds (fetching is Orthanc's own work, at its priority, beside its C-STOREs),
    #: but never more than ``ingest_quiet_max`` seconds per batch, so that sustained ingest is still indexed, one
    #: batch per ``ingest_quiet_max``. 0 s: fetch at once (see :mod:`lookalike.worker.ingest_gate`).
    ingest_quiet: float = 1.0
    ingest_quiet_max: float = 20.0
    #: Where the encoders run: "cpu", "cuda", "cuda:N", or "auto" (the N-th pool process of a worker takes GPU N, so
    #: ``--concurrency`` equal to the GPU count puts one process on each; the CPU where there is none).
    device: str = "cpu"
    #: The index host's worker only plans and writes; workers consuming ``lookalike.embed`` (any host) embed.
    remote_embedding: bool = False
    #: Lookup answers (REST, Explorer, DICOM query) name other patients (PatientID, name, accession number) only
    #: when a site's policy allows it; by default the reader of one patient's study learns nothing that identifies
    #: another.
    disclose_other_patients: bool = False
    #: Every lookup and retrieval, by HTTP user or calling AE title, is appended here (JSON lines, rotated, 0600).
    audit_log: str = "var/logs/audit.jsonl"
    #: The DICOM query endpoint (``lookalike query-scp``): its AE title, the address and port it listens on.
    query_aet: str = "LOOKALIKE"
    query_host: str = "0.0.0.0"
    query_port: int = 11112
    #: Calling AE titles that may query, each with the hosts (IP addresses; "*": any) it may call from.
    query_allowed: dict[str, list[str]] = field(default_factory=dict)
    #: At most this many similar studies per C-FIND, and this many associations at once.
    query_max_results: int = 10
    query_max_associations: int = 10
    #: Seconds the endpoint waits for a peer's association request or next message (twice that on an idle link).
    query_timeout: float = 30.0
    #: Rank and similarity also at the head of StudyDescription, the column every workstation's study list shows.
    query_score_in_description: bool = True
    #: The query endpoint's process also answers the REST routes' lookups (Orthanc's process never loads the
    #: index): over this Unix socket, created owner-only (0600), each request carrying ``lookup_secret``, a
    #: generated secret that lives only in the owner-only settings files (never on a command line).
    lookup_socket: str = "var/lookup.sock"
    lookup_secret: str = ""
    #: Seconds a REST route waits for the query service before answering 503: Orthanc's HTTP thread is not held
    #: longer than this when the service is down, starting or stuck.
    lookup_timeout: float = 5.0
    #: Where ``lookalike run`` keeps the state of the processes it supervises (JSON, 0600), for ``/lookalike/status``
    #: to show; empty where systemd supervises them.
    components_file: str = ""

    def __post_init__(self) -> None:
        if self.index_storage not in INDEX_STORAGES:  # a value check: the type checks are from_dict's
            raise SettingsError(f"setting 'index_storage' must be one of {', '.join(map(repr, INDEX_STORAGES))}, "
                                f"not {self.index_storage!r}")

    @classmethod
    def from_dict(cls, data: dict) -> "Settings":
        """Settings from a JSON object; a key that is not a setting, or a value of the wrong type, is an error that
        names it (a typo would otherwise leave the default in force without a word)."""
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise SettingsError(f"unknown setting(s) {', '.join(map(repr, unknown))}; known: "
                                f"{', '.join(sorted(cls.__dataclass_fields__))}")
        hints = typing.get_type_hints(cls)
        for key, value in data.items():
            if not _has_type(value, hints[key]):
                raise SettingsError(f"setting {key!r} must be {_type_name(hints[key])}, not {value!r}")
        return cls(**data)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> "Settings":
        """Read the settings from ``path``, else from ``$LOOKALIKE_CONFIG``, else the defaults."""
        path = path or os.environ.get("LOOKALIKE_CONFIG")
        if not path:
            return cls()
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict:
        return asdict(self)


class SettingsError(ValueError):
    """A settings file or section names an unknown setting or gives one a value of the wrong type."""


def _has_type(value: object, hint: object) -> bool:
    """``value``, read from JSON, fits the type ``hint`` of a setting (an int is a float; a bool is no number)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is dict:
        return isinstance(value, dict) and all(_has_type(k, args[0]) and _has_type(v, args[1])
                                               for k, v in value.items())
    if origin is list:
        return isinstance(value, list) and all(_has_type(v, args[0]) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint) and not (hint is int and isinstance(value, bool))  # type: ignore[arg-type]


def _type_name(hint: object) -> str:
    """A setting's type as its error message names it: ``int``, ``dict[str, list[str]]``."""
    return str(hint) if typing.get_origin(hint) is not None else getattr(hint, "__name__", str(hint))


#: A quoted value in a warning's text ("..." or '...'): where libraries put the value they complain about.
_QUOTED = re.compile(r"\"[^\"\n]*\"|'[^'\n]*'")


class RedactQuotedValues(logging.Filter):
    """Blank every quoted value in a captured warning: highdicom's and pydicom's warnings quote the value they
    complain about, a PatientName among others, and no log may carry a patient's name or ID."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = _QUOTED.sub('"<value withheld>"', record.getMessage()), None
        return True


class _StderrUnlessLogging(logging.StreamHandler):
    """Warnings on standard error, as Python shows them, in a process that has set up no logging of its own (the
    command line); where it has (the worker, the query service), they go to its log through the root logger."""

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            self.setStream(sys.stderr)
            super().emit(record)


def redact_warnings(handler: logging.Handler | None = None) -> None:
    """Send Python warnings through logging (``py.warnings``) with their quoted values blanked, in every process
    that imports Lookalike's settings: the plugin, the workers, the query service, the command line. ``handler``
    (the plugin's: Orthanc's log) replaces the default, standard error where nothing else logs."""
    logging.captureWarnings(True)
    logger = logging.getLogger("py.warnings")
    if not any(isinstance(f, RedactQuotedValues) for f in logger.filters):
        logger.addFilter(RedactQuotedValues())
    if handler is not None:
        logger.handlers = [handler]
    elif not logger.handlers:
        logger.addHandler(_StderrUnlessLogging())


redact_warnings()
