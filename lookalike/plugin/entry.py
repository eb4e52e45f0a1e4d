"""Wires Lookalike's handlers to Orthanc: the only module that touches the ``orthanc`` module's registration calls.

``deploy/orthanc/lookalike_plugin.py`` (the script Orthanc loads) calls :func:`register` with the ``orthanc``
module. Settings come from the ``"Lookalike"`` section of Orthanc's own configuration.

Orthanc's process loads neither FAISS nor the index: every lookup goes over one channel, the query service's
socket (:class:`~lookalike.query.lookup_service.LookupClient`), and the query service records the lookups it
answers in the audit trail (the routes here record the requests they refuse).
Three reads of the catalogue are left here, read-only (SQLite alone, no vectors, no FAISS), each for a reason:

- ``/lookalike/status``: it must answer while the query service is down, starting or stuck (it is where an
  administrator sees that, ``"query_service": {"answering": false}``), so it cannot ask that service;
- the 409 of a study not indexed: the problems recorded on its instances, read after the query service said
  "not indexed"; a study that is not indexed is the case where the index has nothing to say, the catalogue does;
- an SR's or KOS's evidence (the query study's own rows): the document must reference the instances the answer
  was computed from, and the catalogue rows hold their UIDs and Orthanc ids without a second round trip through
  the service's socket for data that carries no score.
"""

from __future__ import annotations

import json
import threading
import traceback
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import redis

from lookalike.config import QUEUE, Settings
from lookalike.encoders.floors import SimilarityFloors
from lookalike.index.catalogue import CATALOGUE_FILE, Catalogue
from lookalike.orthanc.client import OrthancError, OrthancNotFoundError
from lookalike.plugin import rest
from lookalike.plugin.events import ChangeHandler
from lookalike.plugin.relay import RelayClient, relay_command
from lookalike.query.audit import AuditLog
from lookalike.query.lookup_service import LookupClient, LookupUnavailable


class InProcessOrthanc:
    """:class:`~lookalike.orthanc.client.OrthancApi` over the plugin's in-process REST calls."""

    def __init__(self, orthanc: Any) -> None:
        self.orthanc = orthanc

    def _call(self, fn: Callable[..., Any], path: str, *args: Any) -> bytes:
        try:
            return fn(path, *args)
        except Exception as exc:
            # Plugin 4.0 raises a bare exception; Orthanc's error text names the missing resource.
            text = str(exc)
            if "Unknown resource" in text or "InexistentItem" in text or "Inexistent" in text:
                raise OrthancNotFoundError(f"{path}: not found in Orthanc") from exc
            raise OrthancError(f"{path}: {text}") from exc

    def get_bytes(self, path: str) -> bytes:
        return self._call(self.orthanc.RestApiGet, path)

    def post_bytes(self, path: str, body: bytes) -> bytes:
        return self._call(self.orthanc.RestApiPost, path, body)


def _answer(output: Any, status: int, body: dict) -> None:
    text = json.dumps(body, indent=2)
    if status == 200:
        output.AnswerBuffer(text, "application/json")
    else:  # SendHttpStatus sends no Content-Type of its own
        output.SetHttpHeader("Content-Type", "application/json")
        output.SendHttpStatus(status, text, len(text))


class CallerAddresses:
    """The address of the HTTP client each Orthanc thread is serving, for the audit trail.

    A REST callback of orthanc-python 4.0 gets no client address; its incoming-request filter does, and Orthanc
    calls both in the same HTTP thread, one after the other, for one request. The filter notes the address by
    thread (the OS thread's id: orthanc-python gives each callback a fresh Python thread state, so
    ``threading.local`` would not survive from one to the next); the route takes it back.
    """

    PREFIX = "/lookalike/"

    def __init__(self) -> None:
        self._by_thread: dict[int, str] = {}

    def __call__(self, uri: str, **request: Any) -> bool:
        """The incoming-request filter: note the caller of a Lookalike route, and let every request through."""
        if uri.startswith(self.PREFIX):
            self._by_thread[threading.get_ident()] = str(request.get("ip", ""))
        return True

    def take(self) -> str:
        """The address the filter noted for the request this thread serves; "" where none."""
        return self._by_thread.pop(threading.get_ident(), "")


def _components(path: str) -> dict | None:
    """The supervisor's report of the stack's processes (``lookalike run``), or None where there is none."""
    try:
        return json.loads(Path(path).read_text()) if path else None
    except (OSError, ValueError):
        return None


def register(orthanc: Any) -> None:
    """Register the change callback, the REST routes and the Orthanc Explorer extension."""
    section = json.loads(orthanc.GetConfiguration()).get("Lookalike", {})
    # The two paths are the loader script's (deploy/orthanc/lookalike_plugin.py); every other key is a setting.
    settings = Settings.from_dict({k: v for k, v in section.items() if k not in ("site_packages", "source_root")})

    api = InProcessOrthanc(orthanc)
    # Read-only, for the three reads the module's docstring names and justifies; lookups go to the query service.
    catalogue = Catalogue(Path(settings.index_dir) / CATALOGUE_FILE, readonly=True)
    # The floors the query service applies to the lookups, read where it reads them (beside the site's weights
    # first), so that the status page shows the floor the answers actually use.
    floors = SimilarityFloors(settings.weights.values(), catalogue)
    lookups = LookupClient(settings.lookup_socket, settings.lookup_secret, settings.lookup_timeout, catalogue)
    broker = redis.Redis.from_url(settings.redis_url, socket_timeout=1, socket_connect_timeout=1)
    # Celery's work runs in the relay process, below Orthanc's priority (lookalike.plugin.relay); it also marks in
    # Redis when instances arrive, which the worker waits on before fetching (lookalike.worker.ingest_gate).
    command, env = relay_command([section.get("source_root", ""), section.get("site_packages", "")])
    sender = RelayClient(command, env, settings.to_dict(), orthanc.LogError, orthanc.LogWarning)

    orthanc.RegisterOnChangeCallback(ChangeHandler(orthanc, api, sender.send, orthanc.LogError))
    callers = CallerAddresses()
    if hasattr(orthanc, "RegisterIncomingHttpRequestFilter"):  # orthanc-python 3.0 and later
        orthanc.RegisterIncomingHttpRequestFilter(callers)
    else:
        orthanc.LogWarning("Lookalike: this Python plugin has no incoming-request filter: the audit trail records "
                           "REST lookups without the caller's address")

    try:
        audit: AuditLog | None = AuditLog(settings.audit_log)
    except OSError as exc:
        audit = None
        orthanc.LogError(f"Lookalike: the audit trail {settings.audit_log} cannot be opened ({exc}): refused REST "
                         "requests are not recorded")

    def record_refusal(response: rest.Response, action: str | None, groups: tuple, who: str, host: str) -> None:
        """A lookup route's refusal into the audit trail; one it cannot take is said in Orthanc's log."""
        if action is None or audit is None:
            return
        try:
            rest.audit_refusal(audit, response, action=action, study_id=groups[0] if groups else "", who=who,
                               host=host)
        except OSError as exc:
            orthanc.LogError(f"Lookalike: a refused {action} request was not recorded in the audit trail: {exc}")

    def route(handler: Callable[..., rest.Response], methods: tuple[str, ...],
              action: str | None = None) -> Callable[..., None]:
        """The Orthanc callback of one route; ``action`` names a lookup route's requests in the audit trail."""
        def callback(output: Any, uri: str, **request: Any) -> None:
            host = callers.take()
            if request.get("method") not in methods:
                output.SendMethodNotAllowed(",".join(methods))
                return
            headers = request.get("headers", {})
            who = rest.http_user(headers)
            try:
                refusal = rest.post_refusal(headers) if request.get("method") == "POST" else None
                if refusal is not None:
                    orthanc.LogWarning(f"Lookalike: POST {uri} from {host or '?'} refused: {refusal[1]['error']}")
                    status, body = refusal
                else:
                    # Orthanc hands a GET its query string (undecoded), and a POST only its body.
                    if request.get("method") == "POST":
                        query = rest.parse_post_body(request.get("body", b""))
                    else:
                        query = rest.decode_query(request.get("get", {}))
                    status, body = handler(*request.get("groups", ()), query=query, who=who, host=host)
            except ValueError as exc:
                status, body = 400, {"error": str(exc)}
            except LookupUnavailable as exc:
                orthanc.LogError(f"Lookalike: {uri} answered 503: {exc}")
                status, body = rest.unavailable(exc)
            except Exception:
                orthanc.LogError(f"Lookalike: {uri} failed: {traceback.format_exc()}")
                status, body = 500, {"error": "internal error; see Orthanc's log"}
            record_refusal((status, body), action, tuple(request.get("groups", ())), who, host)
            _answer(output, status, body)

        return callback

    def similar(study_id: str, query: dict, who: str, host: str) -> rest.Response:
        return rest.similar(api, lookups, study_id, rest.parse_limit(query.get("limit")),
                            rest.parse_scope(query.get("scope")), disclose=settings.disclose_other_patients,
                            pending=sender.pending(), who=who, host=host)

    def similar_report(study_id: str, query: dict, who: str, host: str) -> rest.Response:
        return rest.similar_report(api, lookups, study_id, rest.parse_limit(query.get("limit")),
                                   rest.parse_scope(query.get("scope")), pending=sender.pending(), who=who,
                                   host=host)

    def similar_kos(study_id: str, query: dict, who: str, host: str) -> rest.Response:
        if query.get("scope", "patient") != "patient":
            raise ValueError("a Key Object Selection lists the same patient's priors only: scope is patient")
        return rest.similar_kos(api, lookups, study_id, rest.parse_limit(query.get("limit")),
                                pending=sender.pending(), who=who, host=host)

    def status(query: dict, who: str, host: str) -> rest.Response:
        code, body = rest.status(catalogue, lambda: broker.llen(QUEUE), sender.pending(), api, lookups, floors,
                                 settings.weights)
        components = _components(settings.components_file)
        if components is not None:  # `lookalike run`'s supervisor: each process's state, restarts, last exit
            body["components"] = components
        return code, body

    orthanc.RegisterRestCallback("/lookalike/studies/([^/]+)/similar", route(similar, ("GET",), "lookup"))
    orthanc.RegisterRestCallback("/lookalike/studies/([^/]+)/similar-report",
                                 route(similar_report, ("POST",), "report"))
    orthanc.RegisterRestCallback("/lookalike/studies/([^/]+)/similar-kos", route(similar_kos, ("POST",), "kos"))
    orthanc.RegisterRestCallback("/lookalike/status", route(status, ("GET",)))
    orthanc.ExtendOrthancExplorer(resources.files("lookalike.plugin").joinpath("explorer.js").read_text())
    broker_at = redis.connection.parse_url(settings.redis_url)  # the URL holds Redis's password: not for the log
    orthanc.LogWarning(f"Lookalike {settings.index_dir}: plugin ready, queue {QUEUE} on Redis at "
                       f"{broker_at.get('host', broker_at.get('path', '?'))}:{broker_at.get('port', '')}, lookups "
                       f"by the query service at {settings.lookup_socket}")
