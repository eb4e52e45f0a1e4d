"""The lookup service: similar-study lookups answered by the query service's process, asked for by the plugin.

Orthanc's process never loads the FAISS index: at a million vectors a first lookup there cost 14 s and 670 MB of
Orthanc's memory, and the GIL of its embedded Python serialises every callback. The process of the DICOM query
endpoint (``lookalike query-scp``) holds the index read-only; beside its C-FIND service it answers the REST
routes' lookups through this module. Both ends live here, with the one serialisation of an answer:

Transport
    HTTP/1.0 over a Unix socket (``Settings.lookup_socket``, in the state folder), bound owner-only (0600): nothing
    on the network, no port to allocate, and no other local user can connect.
Authentication
    Every request carries ``Settings.lookup_secret`` (``Authorization: Bearer``), a secret generated with the
    stack's passwords and kept in the owner-only settings files (never on a command line). A request without it
    is refused (401) and the peer's uid and pid logged.
Audit
    The service records each lookup (:class:`LocalLookups`) before its answer leaves the process: one line per
    lookup whoever asked, and an answer the audit trail could not record is never sent (503 ``audit``).
Failure
    The client (:class:`LookupClient`) waits ``Settings.lookup_timeout`` seconds at most; a service that is down,
    starting or stuck raises :class:`LookupUnavailable`, whose message tells an administrator what to look at.

Requests: ``GET /health`` and ``POST /lookup`` with a :class:`LookupRequest` as JSON; answers are JSON.
"""

from __future__ import annotations

import errno
import hmac
import http.client
import json
import logging
import os
import socket
import socketserver
import struct
import threading
import time
from dataclasses import MISSING, asdict, dataclass, fields
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lookalike.index.search import MatchedInstance, SimilarStudies, SimilarStudy, StudyNotIndexedError, similar_studies

from lookalike.encoders.floors import SimilarityFloors
from lookalike.query.audit import AuditLog

if TYPE_CHECKING:  # the store pulls in FAISS; the client side (Orthanc's process) must not
    from lookalike.index.catalogue import Catalogue
    from lookalike.index.store import IndexStore

log = logging.getLogger("lookalike.lookup_service")

#: Longest request body the service reads: a lookup request is a few hundred bytes.
MAX_REQUEST_BYTES = 64 * 1024
#: Longest Unix socket path Linux accepts (``sun_path`` is 108 bytes with its terminating NUL).
MAX_SOCKET_PATH = 107


class LookupUnavailable(RuntimeError):
    """The query service did not answer (down, starting, stuck or refusing): the lookup cannot be made now."""


class AuditUnavailable(RuntimeError):
    """The audit trail could not be written: the lookup is not answered unrecorded."""


@dataclass(frozen=True)
class LookupRequest:
    """One lookup as the audit trail records it: the study asked about, how, and by whom."""

    orthanc_study_id: str
    #: The study's StudyInstanceUID as Orthanc knows it (the audit entry's ``study``).
    study_instance_uid: str
    limit: int
    scope: str
    #: The HTTP user (``via`` "rest").
    who: str
    #: "lookup", "report" or "kos" (see :mod:`lookalike.query.audit`).
    action: str = "lookup"
    via: str = "rest"
    #: The caller's address as Orthanc saw it (the audit entry's ``host``); empty where unknown.
    host: str = ""

    @classmethod
    def from_json(cls, data: Any) -> "LookupRequest":
        """Read a request, checking each field's type; ValueError for anything else."""
        if not isinstance(data, dict):
            raise ValueError("a lookup request is a JSON object")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}")
        for f in fields(cls):
            if f.name not in data:
                if f.default is MISSING:
                    raise ValueError(f"{f.name} is required")
                continue
            wanted = int if f.name == "limit" else str
            value = data[f.name]
            if not isinstance(value, wanted) or isinstance(value, bool):
                raise ValueError(f"{f.name} must be {wanted.__name__}, not {value!r}")
        return cls(**data)


# -- the one serialisation of an answer ----------------------------------------------------------------------------

def matches_to_json(matches: list[SimilarStudy]) -> list[dict[str, Any]]:
    """The answer as JSON-ready data, every field of :class:`SimilarStudy` (the patient's too: the plugin decides
    what leaves the server, through :meth:`SimilarStudy.as_public_dict`)."""
    return [asdict(m) for m in matches]


def _box(value: list | None) -> tuple[int, int, int, int, float] | None:
    return None if value is None else (int(value[0]), int(value[1]), int(value[2]), int(value[3]), float(value[4]))


def matches_from_json(items: list[dict[str, Any]]) -> list[SimilarStudy]:
    """:func:`matches_to_json` read back: the same :class:`SimilarStudy` values (boxes as tuples again)."""
    out = []
    for item in items:
        best = dict(item["best_match"])
        best["lesion_box"], best["query_lesion_box"] = _box(best.get("lesion_box")), _box(best.get("query_lesion_box"))
        out.append(SimilarStudy(**{**item, "best_match": MatchedInstance(**best)}))
    return out


# -- answering, in the process that holds the index ----------------------------------------------------------------

class Lookups(Protocol):
    """What the REST routes need: lookups, and the catalogue read-only for what needs no index."""

    catalogue: "Catalogue"

    def lookup(self, request: LookupRequest) -> SimilarStudies: ...

    def ping(self) -> None: ...


class LocalLookups:
    """Lookups in this process: the index searched, the lookup recorded, then the answer returned.

    The query service answers the plugin with one of these; tests call the REST handlers with one directly.

    Parameters
    ----------
    store
        The index, read-only.
    audit
        Where each lookup is recorded before it is answered; None records nothing (tests of the answers alone).
    floors
        The models' similarity floors; default those of the shipped weights and the catalogue's active models.
    """

    def __init__(self, store: "IndexStore", audit: "AuditLog | None" = None,
                 floors: "SimilarityFloors | None" = None) -> None:
        self.store = store
        self.audit = audit
        self.catalogue = store.catalogue
        self.floors = floors if floors is not None else SimilarityFloors(catalogue=store.catalogue)

    def lookup(self, request: LookupRequest) -> SimilarStudies:
        """The studies most similar to the request's, recorded in the audit trail.

        Raises
        ------
        StudyNotIndexedError
            Nothing of the study is searchable (not recorded: nothing was answered).
        AuditUnavailable
            The audit line could not be written; nothing is answered.
        ValueError
            A limit below 1 or an unknown scope.
        """
        # No store.refresh() of every index first: the search brings its own index up to date, and a refresh of
        # all of them lists the catalogue's keys, a scan that grows with the archive.
        matches = similar_studies(self.store, request.orthanc_study_id, request.limit, request.scope, self.floors)
        if self.audit is not None:
            try:
                self.audit.record(who=request.who, via=request.via, host=request.host or None, action=request.action,
                                  study=request.study_instance_uid, orthanc_study_id=request.orthanc_study_id,
                                  scope=request.scope, results=[m.study_instance_uid for m in matches],
                                  limit=request.limit)
            except OSError as exc:
                raise AuditUnavailable(str(exc)) from exc
        return matches

    def ping(self) -> None:
        """Always answering: it is this process."""


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    # Orthanc runs up to 50 HTTP threads: let them queue rather than be refused.
    request_queue_size = 64

    def server_bind(self) -> None:
        """Bind, then make the socket owner-only before it listens (``connect`` needs write permission)."""
        super().server_bind()
        os.chmod(self.server_address, 0o600)


class LookupServer:
    """The service end: answers :class:`LookupRequest` with ``lookups`` on the Unix socket ``path``.

    A thread of its own accepts, and each request runs in a thread of its own (the index store is thread-safe).
    """

    def __init__(self, lookups: LocalLookups, path: str | os.PathLike, secret: str) -> None:
        if not secret:
            raise ValueError("lookup_secret is empty in the settings: run `lookalike configure` (or `lookalike run`)"
                             " to generate one")
        self.lookups = lookups
        self.path = Path(path)
        self.secret = secret.encode()
        if len(os.fsencode(self.path)) > MAX_SOCKET_PATH:
            raise ValueError(f"lookup_socket {self.path} is longer than {MAX_SOCKET_PATH} bytes, the most a Unix"
                             " socket path may be: choose a shorter state folder or lookup_socket")
        self._server: _UnixHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Listen (a stale socket file of a killed service is replaced; a live one is an error)."""
        self._remove_stale()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._server = _UnixHTTPServer(str(self.path), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, name="lookup-service", daemon=True)
        self._thread.start()
        log.info("lookups for the REST routes answered on %s", self.path)

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server = None
        self.path.unlink(missing_ok=True)

    def _remove_stale(self) -> None:
        if not self.path.exists():
            return
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1)
            probe.connect(str(self.path))
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
                raise
            self.path.unlink(missing_ok=True)  # left behind by a service that was killed
        else:
            raise RuntimeError(f"another query service already answers on {self.path}")
        finally:
            probe.close()

    def authorised(self, header: str | None) -> bool:
        scheme, _, token = (header or "").partition(" ")
        return scheme == "Bearer" and hmac.compare_digest(token.strip().encode(), self.secret)


def _peer(sock: socket.socket) -> str:
    """uid and pid of the process at the other end of a Unix socket, for the log."""
    try:
        pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    except OSError:
        return "unknown peer"
    return f"uid {uid}, pid {pid}"


def _handler(server: LookupServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # one request per connection: nothing kept open between two lookups

        def address_string(self) -> str:  # a Unix socket's peer has no address
            return _peer(self.connection)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (BaseHTTPRequestHandler's name)
            log.debug("%s: " + format, self.address_string(), *args)

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _allowed(self) -> bool:
            if server.authorised(self.headers.get("Authorization")):
                return True
            log.warning("lookup request without the right secret refused (%s)", _peer(self.connection))
            self._send(401, {"error": "the lookup secret is missing or wrong"})
            return False

        def do_GET(self) -> None:  # noqa: N802 (BaseHTTPRequestHandler's name)
            if not self._allowed():
                return
            if self.path != "/health":
                self._send(404, {"error": f"no {self.path}"})
                return
            self._send(200, {"answering": True})

        def do_POST(self) -> None:  # noqa: N802
            # The body is read before any answer: a client still sending would otherwise meet a closed socket.
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                length = -1
            body = self.rfile.read(length) if 0 < length <= MAX_REQUEST_BYTES else b""
            if not self._allowed():
                return
            if self.path != "/lookup":
                self._send(404, {"error": f"no {self.path}"})
                return
            try:
                if not body:
                    raise ValueError(f"a lookup request is 1 to {MAX_REQUEST_BYTES} bytes, not {length}")
                request = LookupRequest.from_json(json.loads(body))
                started = time.perf_counter()
                matches = server.lookups.lookup(request)
            except StudyNotIndexedError as exc:
                self._send(409, {"error": "not indexed", "reason": str(exc)})
            except AuditUnavailable as exc:
                log.error("lookup not answered: the audit trail could not be written: %s", exc)
                self._send(503, {"error": "audit", "reason": str(exc)})
            except ValueError as exc:
                self._send(400, {"error": str(exc)})
            except Exception:
                log.exception("lookup failed")
                self._send(500, {"error": "the lookup failed; see the query service's log"})
            else:
                log.info("REST %s by %s: study %s, scope %s, %d answer(s) found in %.0f ms", request.action,
                         request.who, request.study_instance_uid, request.scope, len(matches),
                         (time.perf_counter() - started) * 1000)
                self._send(200, {"similar": matches_to_json(matches), "floors": getattr(matches, "floors", {})})

    return Handler


# -- asking, from Orthanc's process --------------------------------------------------------------------------------

class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


#: Seconds the status page waits for the service's health answer: a stuck service must not hold Orthanc's HTTP
#: thread for a whole lookup timeout just to say that it is stuck.
PING_TIMEOUT = 1.0


class LookupClient:
    """The plugin's end: asks the query service, never waiting more than ``timeout`` seconds for a step.

    Parameters
    ----------
    path, secret, timeout
        ``Settings.lookup_socket``, ``lookup_secret`` and ``lookup_timeout``.
    catalogue
        The catalogue, opened read-only in the caller's process (SQLite alone, no vectors loaded) for what needs
        no index: why a study is not indexed, a report's evidence, the status page; None for a caller that only
        asks (a readiness probe).
    """

    def __init__(self, path: str | os.PathLike, secret: str, timeout: float,
                 catalogue: "Catalogue | None" = None) -> None:
        self.path = str(path)
        self.secret = secret
        self.timeout = timeout
        self.catalogue = catalogue

    def lookup(self, request: LookupRequest) -> SimilarStudies:
        """The query service's answer (recorded by it in the audit trail before it was sent), with its floors.

        Raises
        ------
        LookupUnavailable
            No answer within the timeout, or none at all.
        StudyNotIndexedError, AuditUnavailable, ValueError
            As :meth:`LocalLookups.lookup` raises them in the service.
        """
        status, body = self._call("POST", "/lookup", asdict(request))
        if status == 200:
            return SimilarStudies(matches_from_json(body["similar"]), body.get("floors") or {})
        if status == 409:
            raise StudyNotIndexedError(request.orthanc_study_id)
        if status == 503 and body.get("error") == "audit":
            raise AuditUnavailable(body.get("reason", ""))
        if status == 400:
            raise ValueError(body.get("error", "bad lookup request"))
        raise self._unavailable(f"it answered {status}: {body.get('error', '')}")

    def ping(self) -> None:
        """Return if the service answers, else raise :class:`LookupUnavailable`."""
        status, body = self._call("GET", "/health", None, min(self.timeout, PING_TIMEOUT))
        if status != 200:
            raise self._unavailable(f"it answered {status}: {body.get('error', '')}")

    def _call(self, method: str, path: str, payload: dict | None, timeout: float | None = None) -> tuple[int, dict]:
        wait = self.timeout if timeout is None else timeout
        connection = _UnixConnection(self.path, wait)
        headers = {"Authorization": f"Bearer {self.secret}"}
        data = None
        if payload is not None:
            data = json.dumps(payload).encode()
            headers["Content-Type"] = "application/json"
        try:
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
            text = response.read()
        except TimeoutError:
            raise self._unavailable(f"no answer within {wait:g} s") from None
        except FileNotFoundError:
            raise self._unavailable("it is not running (no socket)") from None
        except ConnectionRefusedError:
            raise self._unavailable("it is not running (connection refused)") from None
        except (OSError, http.client.HTTPException) as exc:
            raise self._unavailable(f"{type(exc).__name__}: {exc}") from None
        finally:
            connection.close()
        try:
            body = json.loads(text)
        except ValueError:
            raise self._unavailable(f"it answered {response.status} with something that is not JSON") from None
        return response.status, body if isinstance(body, dict) else {}

    def _unavailable(self, reason: str) -> LookupUnavailable:
        return LookupUnavailable(
            f"the query service (process `lookalike query-scp`, systemd unit lookalike-query) did not answer at "
            f"{self.path}: {reason}. It is restarted automatically; if this lasts, see its log query-scp.log")
