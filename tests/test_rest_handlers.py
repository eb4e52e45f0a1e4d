"""The REST handlers without a live stack: ``rest.similar``, ``similar_report``, ``similar_kos`` and ``status``
called with small fakes of Orthanc's REST API and of the lookups; and the routes as ``entry.register`` wires them
into a fake ``orthanc`` module, with a real query-service socket answered by the same fake lookups (or by nothing).

What needs Orthanc itself (its routing and query strings, stored reports, the browser, DCMTK) is in
``test_rest.py`` and the other stack tests."""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from lookalike.index.catalogue import Catalogue
from lookalike.index.search import MatchedInstance, SimilarStudies, SimilarStudy, StudyNotIndexedError
from lookalike.orthanc.client import OrthancNotFoundError
from lookalike.plugin import rest
from lookalike.query.lookup_service import AuditUnavailable, LookupRequest, LookupServer, LookupUnavailable

QUERY = "0a1b2c3d-11111111-22222222-33333333-44444444"
OTHER = "5e6f7a8b-55555555-66666666-77777777-88888888"
NO_IMAGES = "9c0d1e2f-99999999-aaaaaaaa-bbbbbbbb-cccccccc"
QUERY_UID = "1.2.826.0.1.3680043.8.498.1"
OTHER_UID = "1.2.826.0.1.3680043.8.498.2"
OTHER_IDENTITY = ("OTHER^PATIENT", "PID-OTHER-77", "ACC-OTHER-77")


class FakeOrthancApi:
    """Orthanc's REST API for the few reads the handlers make: studies, their series, ``/tools/find``, the last
    change. Every path
    asked for is kept in ``asked``; anything else is an error (the handlers under test must not file anything)."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.studies = {
            QUERY: {"ID": QUERY, "MainDicomTags": {"StudyInstanceUID": QUERY_UID, "AccessionNumber": "ACC-Q"},
                    "PatientMainDicomTags": {"PatientName": "QUERY^PATIENT", "PatientID": "PID-Q"}},
            OTHER: {"ID": OTHER, "MainDicomTags": {"StudyInstanceUID": OTHER_UID, "AccessionNumber": OTHER_IDENTITY[2]},
                    "PatientMainDicomTags": {"PatientName": OTHER_IDENTITY[0], "PatientID": OTHER_IDENTITY[1]}},
            NO_IMAGES: {"ID": NO_IMAGES, "MainDicomTags": {"StudyInstanceUID": "1.2.826.0.1.3680043.8.498.3"}},
        }
        self.series = {QUERY: ["US"], OTHER: ["US"], NO_IMAGES: ["SR", "PR"]}

    def get_bytes(self, path: str) -> bytes:
        self.asked.append(path)
        if path == "/changes?last":
            return json.dumps({"Changes": [], "Done": True, "Last": 12}).encode()
        parts = path.strip("/").split("/")
        if parts[0] == "studies" and parts[1] in self.studies:
            if len(parts) == 2:
                return json.dumps(self.studies[parts[1]]).encode()
            if parts[2:] == ["series"]:
                return json.dumps([{"MainDicomTags": {"Modality": m}} for m in self.series[parts[1]]]).encode()
        raise OrthancNotFoundError(path)

    def post_bytes(self, path: str, body: bytes) -> bytes:
        self.asked.append(path)
        if path == "/tools/find":
            query = json.loads(body)
            uids = set(query["Query"]["StudyInstanceUID"].split("\\"))
            return json.dumps([s for s in self.studies.values()
                               if s["MainDicomTags"]["StudyInstanceUID"] in uids]).encode()
        raise AssertionError(f"unexpected POST {path}")


def match(rank: int = 1, score: float = 0.93) -> SimilarStudy:
    """The other study, as a lookup answers it."""
    best = MatchedInstance(sop_instance_uid="1.2.3.4.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.6.1",
                           series_instance_uid="1.2.3.4", orthanc_instance_id="inst-other",
                           query_sop_instance_uid="1.2.3.5.1", score=score, query_orthanc_instance_id="inst-query")
    return SimilarStudy(rank=rank, study_instance_uid=OTHER_UID, orthanc_study_id=OTHER,
                        patient_id=OTHER_IDENTITY[1], study_date="20240611", modality="US", score=score,
                        model_version="us-v1", best_match=best)


class FakeLookups:
    """:class:`~lookalike.query.lookup_service.Lookups`: answers ``answer`` (a :class:`SimilarStudies`) or raises
    ``raises``; keeps every request it was asked."""

    def __init__(self, catalogue: Catalogue, answer: SimilarStudies | None = None,
                 raises: Exception | None = None) -> None:
        self.catalogue = catalogue
        self.answer = answer if answer is not None else SimilarStudies([match()], {"us-v1": 0.5})
        self.raises = raises
        self.requests: list[LookupRequest] = []

    def lookup(self, request: LookupRequest) -> SimilarStudies:
        self.requests.append(request)
        if self.raises is not None:
            raise self.raises
        return self.answer

    def ping(self) -> None:
        if isinstance(self.raises, LookupUnavailable):
            raise self.raises


@pytest.fixture
def catalogue(tmp_path: Path):
    with Catalogue(tmp_path / "catalogue.sqlite") as c:
        yield c


@pytest.fixture
def api() -> FakeOrthancApi:
    return FakeOrthancApi()


# --- the handlers, called as plain functions ----------------------------------------------------------------------

class TestSimilar:
    def test_answer_names_its_study_scope_and_limit_and_hides_the_other_patient(self, api, catalogue) -> None:
        lookups = FakeLookups(catalogue)
        status, body = rest.similar(api, lookups, QUERY, limit=3, scope="patient", who="dr.x", host="10.0.0.9")
        assert status == 200
        assert (body["study"], body["study_instance_uid"], body["scope"], body["limit"]) == (
            QUERY, QUERY_UID, "patient", 3)
        assert [s["orthanc_study_id"] for s in body["similar"]] == [OTHER]
        assert not any(identity in json.dumps(body) for identity in OTHER_IDENTITY)
        [request] = lookups.requests
        assert request == LookupRequest(orthanc_study_id=QUERY, study_instance_uid=QUERY_UID, limit=3,
                                        scope="patient", who="dr.x", action="lookup", host="10.0.0.9")

    def test_disclosure_names_the_other_patient(self, api, catalogue) -> None:
        _, body = rest.similar(api, FakeLookups(catalogue), QUERY, limit=3, disclose=True)
        [first] = body["similar"]
        assert (first["patient_name"], first["patient_id"], first["accession_number"]) == OTHER_IDENTITY

    def test_an_empty_answer_states_the_floor_it_applied(self, api, catalogue) -> None:
        lookups = FakeLookups(catalogue, SimilarStudies([], {"us-v1": 0.62, "us-v0": None}))
        status, body = rest.similar(api, lookups, QUERY, limit=10)
        assert status == 200 and body["similar"] == []
        assert body["floors"] == {"us-v1": 0.62, "us-v0": None}

    @pytest.mark.parametrize("bad", [f"{QUERY}?expand", f"{QUERY}/../{QUERY}", QUERY.upper(), f"{QUERY}-00000000",
                                     "not-a-study", "1.2.840.10008", ""])
    def test_an_id_not_of_orthancs_form_is_404_and_never_reaches_orthanc_or_the_lookups(self, api, catalogue,
                                                                                       bad: str) -> None:
        lookups = FakeLookups(catalogue)
        for handler in (rest.similar, rest.similar_report, rest.similar_kos):
            status, body = handler(api, lookups, bad, limit=3)
            assert status == 404 and body["study"] == bad and body["error"]
        assert api.asked == [] and lookups.requests == []

    def test_a_study_orthanc_does_not_have_is_404_and_not_looked_up(self, api, catalogue) -> None:
        lookups = FakeLookups(catalogue)
        missing = "deadbeef-00000000-00000000-00000000-00000000"
        for handler in (rest.similar, rest.similar_report, rest.similar_kos):
            status, body = handler(api, lookups, missing, limit=3)
            assert status == 404 and body["study"] == missing
        assert lookups.requests == []

    def test_an_unavailable_query_service_is_raised_for_the_route_to_answer_503(self, api, catalogue) -> None:
        down = LookupUnavailable("no socket at /run/lookalike/lookup.sock")
        lookups = FakeLookups(catalogue, raises=down)
        for handler in (rest.similar, rest.similar_report, rest.similar_kos):
            with pytest.raises(LookupUnavailable):
                handler(api, lookups, QUERY, limit=3)
        status, body = rest.unavailable(down)
        assert status == 503 and "similar" not in body and str(down) in body["reason"]

    def test_an_unwritable_audit_trail_is_503_and_nothing_answered(self, api, catalogue) -> None:
        lookups = FakeLookups(catalogue, raises=AuditUnavailable("disk full"))
        for handler in (rest.similar, rest.similar_report, rest.similar_kos):
            status, body = handler(api, lookups, QUERY, limit=3)
            assert status == 503 and "similar" not in body and "disk full" in body["reason"]
        assert not any(path.startswith("/tools/find") or path.startswith("/instances") for path in api.asked)


class TestNotIndexed:
    """409: the study is known to Orthanc, the index has nothing for it; the answer says which case it is."""

    def _answer(self, api, catalogue, study: str, pending: int = 0) -> tuple[int, dict]:
        return rest.similar(api, FakeLookups(catalogue, raises=StudyNotIndexedError(study)), study, limit=3,
                            pending=pending)

    def test_problems_recorded_on_its_instances_are_listed(self, api, catalogue) -> None:
        catalogue.record_problem("inst-1", "no-pixel-data", "the instance has no Pixel Data",
                                 sop_instance_uid="1.2.3.9", orthanc_study_id=QUERY)
        catalogue.record_problem("inst-9", "image-too-large", "elsewhere", orthanc_study_id=OTHER)
        status, body = self._answer(api, catalogue, QUERY)
        assert status == 409 and body["study"] == QUERY and body["modalities"] == ["US"]
        assert [(p["instance"], p["code"]) for p in body["problems"]] == [("inst-1", "no-pixel-data")]

    def test_a_study_without_images_and_a_queued_study_are_told_apart(self, api, catalogue) -> None:
        status, no_images = self._answer(api, catalogue, NO_IMAGES)
        assert status == 409 and no_images["modalities"] == ["PR", "SR"] and no_images["problems"] == []
        assert all(m in no_images["reason"] for m in ("PR", "SR"))
        status, queued = self._answer(api, catalogue, QUERY, pending=4)
        assert status == 409 and queued["queued_tasks"] == 4 and queued["problems"] == []
        assert queued["reason"] != no_images["reason"]

    def test_report_and_kos_answer_409_alike_and_file_nothing(self, api, catalogue) -> None:
        lookups = FakeLookups(catalogue, raises=StudyNotIndexedError(QUERY))
        for handler in (rest.similar_report, rest.similar_kos):
            status, body = handler(api, lookups, QUERY, limit=3)
            assert status == 409 and body["study"] == QUERY
        assert "/instances" not in " ".join(api.asked)  # no POST either: FakeOrthancApi would have raised


class TestStatus:
    def test_counts_an_unreachable_broker_and_a_silent_query_service(self, catalogue) -> None:
        def broken() -> int:
            raise ConnectionError("broker down")

        lookups = FakeLookups(catalogue, raises=LookupUnavailable("not running"))
        status, body = rest.status(catalogue, broken, pending=4, lookups=lookups)
        assert status == 200 and body["indexed"] == []
        assert body["queue"] == {"broker": None, "plugin_pending": 4, "broker_error": "broker down"}
        assert body["query_service"]["answering"] is False and "not running" in body["query_service"]["error"]

    def test_queue_length_and_an_answering_query_service(self, catalogue) -> None:
        _, body = rest.status(catalogue, lambda: 7, lookups=FakeLookups(catalogue))
        assert body["queue"]["broker"] == 7 and body["queue"]["broker_error"] is None
        assert body["query_service"] == {"answering": True, "error": None}

    def test_recorded_problems_are_listed(self, catalogue) -> None:
        catalogue.record_problem("inst-1", "no-pixel-data", "no pixels", orthanc_study_id=QUERY)
        _, body = rest.status(catalogue, lambda: 0)
        assert [(p["instance"], p["study"], p["code"]) for p in body["problems"]] == [
            ("inst-1", QUERY, "no-pixel-data")]


class TestParameters:
    def test_query_values_are_url_decoded(self) -> None:
        assert rest.decode_query({"limit": "%35", "scope": "pa%74ient", "a+b": "c+d%2Be"}) == {
            "limit": "5", "scope": "patient", "a b": "c d+e"}

    @pytest.mark.parametrize("raw,expected", [(None, 10), ("", 10), ("3", 3), (3, 3), ("100", 100)])
    def test_limit(self, raw, expected: int) -> None:
        assert rest.parse_limit(raw) == expected

    @pytest.mark.parametrize("raw", ["0", "101", "x", "-1", "2.5", 2.5, True, 0])
    def test_bad_limits_are_refused(self, raw) -> None:
        with pytest.raises(ValueError, match="limit"):
            rest.parse_limit(raw)

    def test_scope(self) -> None:
        assert [rest.parse_scope(s) for s in (None, "", "archive", "patient")] == [
            "archive", "archive", "archive", "patient"]
        for bad in ("everyone", "Patient", 1):
            with pytest.raises(ValueError, match="scope"):
                rest.parse_scope(bad)

    def test_a_name_given_twice_is_refused(self) -> None:
        with pytest.raises(ValueError, match="limit"):
            rest.decode_query({"limit": "1", "%6Cimit": "50"})

    def test_a_post_must_be_json_from_orthancs_own_origin(self) -> None:
        own = {"Host": "pacs.example:8042", "Content-Type": "application/json; charset=utf-8"}
        assert rest.post_refusal(own) is None
        assert rest.post_refusal({**own, "Origin": "http://pacs.example:8042"}) is None
        assert rest.post_refusal({**own, "Origin": "https://pacs.example:8042"}) is None
        for content_type in ("application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x"):
            assert rest.post_refusal({**own, "Content-Type": content_type})[0] == 415
        assert rest.post_refusal({"Host": "pacs.example:8042"})[0] == 415
        for origin in ("http://evil.example", "http://pacs.example:8043", "null", "http://pacs.example:8042.evil"):
            assert rest.post_refusal({**own, "Origin": origin})[0] == 403, origin

    def test_post_body(self) -> None:
        assert rest.parse_post_body(b"") == {}
        assert rest.parse_post_body(b'{"limit": 3, "scope": "patient"}') == {"limit": 3, "scope": "patient"}
        for bad, field in ((b"limit=3", None), (b"[3]", None), (b'{"limt": 3}', "limt")):
            with pytest.raises(ValueError) as refused:
                rest.parse_post_body(bad)
            assert field is None or field in str(refused.value)

    def test_the_user_comes_from_the_basic_credentials(self) -> None:
        token = base64.b64encode(b"dr.smith:secret:with:colons").decode()
        assert rest.http_user({"authorization": f"Basic {token}"}) == "dr.smith"
        assert rest.http_user({"Authorization": f"basic {token}"}) == "dr.smith"
        assert rest.http_user({}) == "anonymous"
        assert rest.http_user({"authorization": "Bearer abc"}) == "anonymous"
        assert rest.http_user({"authorization": "Basic !!!"}) == "anonymous"


# --- the routes, as entry.register wires them -------------------------------------------------------------------

class Output:
    """What a route callback sends back through Orthanc's output object."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.body: dict = {}
        self.allowed: str | None = None

    def AnswerBuffer(self, text: str, mime: str) -> None:  # noqa: N802 (Orthanc's name)
        self.status, self.headers["Content-Type"], self.body = 200, mime, json.loads(text)

    def SetHttpHeader(self, name: str, value: str) -> None:  # noqa: N802
        self.headers[name] = value

    def SendHttpStatus(self, status: int, text: str, length: int) -> None:  # noqa: N802
        assert length == len(text)
        self.status, self.body = status, json.loads(text)

    def SendMethodNotAllowed(self, allowed: str) -> None:  # noqa: N802
        self.status, self.allowed = 405, allowed


class FakeOrthancModule:
    """The ``orthanc`` module as ``entry.register`` uses it: configuration, registrations, in-process REST calls
    answered by a :class:`FakeOrthancApi`, and the log."""

    ChangeType = SimpleNamespace(NEW_INSTANCE=3, STABLE_STUDY=9, DELETED=1)
    ResourceType = SimpleNamespace(PATIENT=0, STUDY=1, SERIES=2, INSTANCE=3)

    def __init__(self, section: dict, api: FakeOrthancApi) -> None:
        self.section, self.api = section, api
        self.routes: dict[str, object] = {}
        self.filter = None
        self.log: list[tuple[str, str]] = []

    def GetConfiguration(self) -> str:  # noqa: N802
        return json.dumps({"Lookalike": self.section})

    def RegisterOnChangeCallback(self, callback) -> None:  # noqa: N802
        pass

    def RegisterIncomingHttpRequestFilter(self, callback) -> None:  # noqa: N802
        self.filter = callback

    def RegisterRestCallback(self, uri: str, callback) -> None:  # noqa: N802
        self.routes[uri] = callback

    def ExtendOrthancExplorer(self, js: str) -> None:  # noqa: N802
        pass

    def RestApiGet(self, path: str) -> bytes:  # noqa: N802
        try:
            return self.api.get_bytes(path)
        except OrthancNotFoundError:
            raise RuntimeError("Unknown resource") from None

    def RestApiPost(self, path: str, body: bytes) -> bytes:  # noqa: N802
        return self.api.post_bytes(path, body)

    def LogError(self, text: str) -> None:  # noqa: N802
        self.log.append(("error", text))

    def LogWarning(self, text: str) -> None:  # noqa: N802
        self.log.append(("warning", text))

    def LogInfo(self, text: str) -> None:  # noqa: N802
        self.log.append(("info", text))

    def call(self, route: str, method: str, *groups: str, get: dict | None = None, body: bytes = b"",
             headers: dict | None = None, ip: str = "10.1.2.3") -> Output:
        """One request as Orthanc hands it over: the filter first, then the route, in the same thread."""
        uri = "/lookalike/" + route.format(*groups)
        self.filter(uri, ip=ip)
        output = Output()
        token = base64.b64encode(b"dr.route:pw").decode()
        self.routes[f"/lookalike/{route.format(*['([^/]+)'] * len(groups))}"](
            output, uri, method=method, groups=groups, get=get or {}, body=body,
            headers={"Authorization": f"Basic {token}", **(headers or {})})
        return output


SIMILAR, REPORT, KOS = "studies/{}/similar", "studies/{}/similar-report", "studies/{}/similar-kos"
JSON_POST = {"Host": "pacs.example:8042", "Content-Type": "application/json"}


@pytest.fixture
def socket_dir():
    """A short folder for the query service's socket (a Unix socket path holds at most 107 bytes)."""
    folder = tempfile.mkdtemp(prefix="lk")
    yield Path(folder)
    shutil.rmtree(folder, ignore_errors=True)


def _plugin(tmp_path: Path, socket_dir: Path, api: FakeOrthancApi) -> FakeOrthancModule:
    from lookalike.plugin.entry import register

    section = {"index_dir": str(tmp_path / "index"), "redis_url": "redis://127.0.0.1:1/0",
               "lookup_socket": str(socket_dir / "lookup.sock"), "lookup_secret": "s3cret", "lookup_timeout": 5.0}
    orthanc = FakeOrthancModule(section, api)
    register(orthanc)
    return orthanc


@pytest.fixture
def served(tmp_path: Path, socket_dir: Path, api: FakeOrthancApi, catalogue: Catalogue):
    """The plugin's routes, with a query service on its socket answering from :class:`FakeLookups`."""
    lookups = FakeLookups(catalogue, SimilarStudies([], {"us-v1": 0.62}))
    server = LookupServer(lookups, socket_dir / "lookup.sock", "s3cret")
    server.start()
    try:
        yield _plugin(tmp_path, socket_dir, api), lookups
    finally:
        server.stop()


class TestRoutes:
    def test_an_empty_answer_states_the_floor_and_the_lookup_names_the_caller(self, served) -> None:
        orthanc, lookups = served
        out = orthanc.call(SIMILAR, "GET", QUERY, get={"limit": "%35", "scope": "pati%65nt"}, ip="10.9.8.7")
        assert out.status == 200 and out.headers["Content-Type"] == "application/json"
        assert (out.body["similar"], out.body["floors"], out.body["limit"], out.body["scope"]) == (
            [], {"us-v1": 0.62}, 5, "patient")
        [request] = lookups.requests
        assert (request.who, request.host, request.orthanc_study_id) == ("dr.route", "10.9.8.7", QUERY)

    @pytest.mark.parametrize("get", [{"limit": "0"}, {"limit": "101"}, {"limit": "x"}, {"limit": "%2D1"},
                                     {"scope": "all"}, {"limit": "1", "%6Cimit": "50"}])
    def test_bad_parameters_are_400_and_not_looked_up(self, served, get: dict) -> None:
        orthanc, lookups = served
        out = orthanc.call(SIMILAR, "GET", QUERY, get=get)
        assert out.status == 400 and out.headers["Content-Type"] == "application/json" and out.body["error"]
        assert lookups.requests == []

    @pytest.mark.parametrize("body", [b'{"limit": 0}', b'{"limit": "many"}', b'{"scope": "all"}', b'{"limt": 2}',
                                      b"limit=2"])
    def test_a_bad_post_body_is_400(self, served, body: bytes) -> None:
        orthanc, lookups = served
        out = orthanc.call(REPORT, "POST", QUERY, body=body, headers=JSON_POST)
        assert out.status == 400 and out.body["error"] and lookups.requests == []

    def test_a_kos_is_of_the_patients_priors_only(self, served) -> None:
        orthanc, lookups = served
        out = orthanc.call(KOS, "POST", QUERY, body=b'{"scope": "archive"}', headers=JSON_POST)
        assert out.status == 400 and lookups.requests == []

    @pytest.mark.parametrize("route", [REPORT, KOS])
    def test_a_post_that_a_cross_site_form_could_send_is_refused_and_logged(self, served, route: str) -> None:
        orthanc, lookups = served
        form = orthanc.call(route, "POST", QUERY, body=b"limit=2",
                            headers={"Host": "pacs.example:8042", "Content-Type": "application/x-www-form-urlencoded"})
        plain = orthanc.call(route, "POST", QUERY, body=b'{"limit": 2}',
                             headers={"Host": "pacs.example:8042", "Content-Type": "text/plain"})
        foreign = orthanc.call(route, "POST", QUERY, body=b'{"limit": 2}',
                               headers={**JSON_POST, "Origin": "http://evil.example"}, ip="10.6.6.6")
        assert (form.status, plain.status, foreign.status) == (415, 415, 403)
        assert all(o.headers["Content-Type"] == "application/json" and o.body["error"] for o in (form, plain, foreign))
        assert lookups.requests == [] and orthanc.api.asked == []  # nothing asked, nothing filed
        warnings = [text for level, text in orthanc.log if level == "warning" and QUERY in text]
        assert len(warnings) == 3 and "10.6.6.6" in warnings[-1]

    def test_the_wrong_method_is_405(self, served) -> None:
        orthanc, _ = served
        assert orthanc.call(SIMILAR, "POST", QUERY, headers=JSON_POST).status == 405
        assert orthanc.call(REPORT, "GET", QUERY).status == 405

    def test_an_id_not_of_orthancs_form_is_404_not_500(self, served) -> None:
        orthanc, lookups = served
        for study in (f"{QUERY}%3Fexpand", "abc%3F", "abc?"):
            out = orthanc.call(SIMILAR, "GET", study)
            assert out.status == 404 and out.headers["Content-Type"] == "application/json" and out.body["error"]
        assert lookups.requests == [] and orthanc.api.asked == []

    def test_not_indexed_is_409_through_the_query_service(self, served) -> None:
        orthanc, lookups = served
        lookups.raises = StudyNotIndexedError(NO_IMAGES)
        out = orthanc.call(SIMILAR, "GET", NO_IMAGES)
        assert out.status == 409 and out.body["study"] == NO_IMAGES and out.body["modalities"] == ["PR", "SR"]

    def test_no_query_service_is_503_logged_once_as_an_error_and_status_still_answers(
            self, tmp_path: Path, socket_dir: Path, api: FakeOrthancApi) -> None:
        orthanc = _plugin(tmp_path, socket_dir, api)  # nothing listens on the socket
        for route, method, headers in ((SIMILAR, "GET", {}), (REPORT, "POST", JSON_POST), (KOS, "POST", JSON_POST)):
            out = orthanc.call(route, method, QUERY, headers=headers)
            assert out.status == 503 and out.headers["Content-Type"] == "application/json", route
            assert "similar" not in out.body and str(socket_dir / "lookup.sock") in out.body["reason"]
        errors = [text for level, text in orthanc.log if level == "error"]
        assert len(errors) == 3 and all(QUERY in e and "Traceback" not in e for e in errors)
        status = orthanc.call("status", "GET")
        assert status.status == 200 and status.body["query_service"]["answering"] is False
        assert status.body["queue"]["broker"] is None and status.body["queue"]["broker_error"]
        catch_up = status.body["catch_up"]
        assert (catch_up["cursor"], catch_up["orthanc_last_change"], catch_up["behind"]) == (0, 12, 12)
        assert catch_up["reset_detected"] is False
