"""Orthanc's REST API as Lookalike uses it, reachable two ways with one interface.

The worker talks HTTP with credentials (:class:`HttpOrthanc`); the plugin calls Orthanc in-process
(``lookalike.plugin.entry.InProcessOrthanc``). Everything that needs Orthanc takes an :class:`OrthancApi`,
so handlers and tasks are tested against a real Orthanc or a small fake alike.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Protocol

import requests


class OrthancError(Exception):
    """Orthanc answered, but not with what was asked for."""


class OrthancNotFoundError(OrthancError, LookupError):
    """The resource is not (or no longer) in Orthanc."""


class OrthancUnavailableError(OrthancError):
    """Orthanc could not be reached or failed on its side: worth retrying later."""


class OrthancAuthError(OrthancError):
    """Orthanc refused the credentials: retrying will not help until an administrator fixes them."""


class OrthancApi(Protocol):
    def get_bytes(self, path: str) -> bytes: ...

    def post_bytes(self, path: str, body: bytes) -> bytes: ...


def get_json(api: OrthancApi, path: str) -> Any:
    return json.loads(api.get_bytes(path))


def instance_series(api: OrthancApi, instance_id: str) -> dict:
    """The series an instance belongs to, from Orthanc's database (no file read): its ``ID``,
    ``ParentStudy`` and ``MainDicomTags`` (with ``Modality``)."""
    return get_json(api, f"/instances/{instance_id}/series")


def study_series(api: OrthancApi, study_id: str) -> list[dict]:
    return get_json(api, f"/studies/{study_id}/series")


def find_by_uids(api: OrthancApi, level: str, study_instance_uids: list[str]) -> list[dict]:
    """The resources of ``level`` ("Study", "Series") of the studies with these StudyInstanceUIDs, expanded, from
    Orthanc's database (no file read): one call whatever their number. A study Orthanc no longer has is absent."""
    if not study_instance_uids:
        return []
    query = {"StudyInstanceUID": "\\".join(sorted(set(study_instance_uids)))}
    return json.loads(api.post_bytes("/tools/find", json.dumps({"Level": level, "Query": query,
                                                                 "Expand": True}).encode()))


def orthanc_resource_id(*dicom_ids: str) -> str:
    """Orthanc's id of a resource from its DICOM identifiers (a patient's: its PatientID alone).

    Orthanc names resources by the SHA-1 of their identifiers joined by ``|``, written as five dash-separated
    groups of eight hex digits; knowing it lets the worker act on a deletion after Orthanc has forgotten the
    resource.
    """
    digest = hashlib.sha1("|".join(dicom_ids).encode()).hexdigest()
    return "-".join(digest[i:i + 8] for i in range(0, 40, 8))


def store_instance(api: OrthancApi, dicom: bytes) -> str:
    """Store a DICOM file into Orthanc; its Orthanc id."""
    return json.loads(api.post_bytes("/instances", dicom))["ID"]


class HttpOrthanc:
    """Orthanc over HTTP with basic authentication, for the worker and the command line."""

    def __init__(self, url: str, user: str, password: str, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self.session.auth = (user, password)

    def _request(self, method: str, path: str, **kw) -> bytes:
        try:
            r = self.session.request(method, self.url + path, timeout=self.timeout, **kw)
        except requests.RequestException as exc:
            raise OrthancUnavailableError(f"Orthanc at {self.url} unreachable: {exc}") from exc
        if r.status_code == 404:
            raise OrthancNotFoundError(f"{method} {path}: not found in Orthanc")
        if r.status_code in (401, 403):
            raise OrthancAuthError(f"{method} {path}: Orthanc refused the credentials of user {self.session.auth[0]!r}")
        if r.status_code >= 500:
            raise OrthancUnavailableError(f"{method} {path}: Orthanc answered {r.status_code}")
        if r.status_code >= 400:
            raise OrthancError(f"{method} {path}: Orthanc answered {r.status_code}: {r.text[:200]}")
        return r.content

    def get_bytes(self, path: str) -> bytes:
        return self._request("GET", path)

    def post_bytes(self, path: str, body: bytes) -> bytes:
        return self._request("POST", path, data=body)
