"""The plugin's handlers without Orthanc: a fake ``orthanc`` module and a fake REST API passed in."""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace

import pytest

from lookalike.config import QUEUE, TASK_FORGET, TASK_INDEX_INSTANCE, TASK_RECONCILE_STUDY
from lookalike.orthanc.client import OrthancNotFoundError
from lookalike.orthanc.ingest import Remembered
from lookalike.plugin.events import ChangeHandler
from lookalike.plugin.sender import TaskSender

FAKE_ORTHANC = SimpleNamespace(
    ChangeType=SimpleNamespace(NEW_INSTANCE=3, STABLE_STUDY=9, DELETED=1),
    ResourceType=SimpleNamespace(PATIENT=0, STUDY=1, SERIES=2, INSTANCE=3),
)


class FakeApi:
    """Orthanc's REST API answering from a dict of path -> JSON; ``asked`` lists the paths it was asked for."""

    def __init__(self, answers: dict[str, object]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    def get_bytes(self, path: str) -> bytes:
        self.asked.append(path)
        if path not in self.answers:
            raise OrthancNotFoundError(path)
        return json.dumps(self.answers[path]).encode()

    def post_bytes(self, path: str, body: bytes) -> bytes:
        raise AssertionError("the change handler never writes")


def _series(modality: str) -> dict:
    return {"ID": "s1", "ParentStudy": "st1", "MainDicomTags": {"Modality": modality}}


def _instances_of(series: dict, *instances: str) -> dict[str, object]:
    """Orthanc's answers about these instances of one series: each one's parent, and the series."""
    return {**{f"/instances/{i}": {"ID": i, "ParentSeries": series["ID"]} for i in instances},
            f"/series/{series['ID']}": series}


class TestChangeHandler:
    def _handler(self, answers: dict) -> tuple[ChangeHandler, list, list]:
        sent, errors = [], []
        handler = ChangeHandler(FAKE_ORTHANC, FakeApi(answers), lambda *a: sent.append(a), errors.append)
        return handler, sent, errors

    @pytest.mark.parametrize("modality", ["US", "DX", "CR"])
    def test_new_image_instance_is_queued(self, modality: str) -> None:
        handler, sent, errors = self._handler(_instances_of(_series(modality), "i1"))
        handler(3, 3, "i1")
        assert sent == [(TASK_INDEX_INSTANCE, "i1", "s1", "st1")] and errors == []

    @pytest.mark.parametrize("modality", ["SR", "KO", "PR", "CT", "DOC"])
    def test_other_modalities_are_ignored(self, modality: str) -> None:
        handler, sent, errors = self._handler(_instances_of(_series(modality), "i1"))
        handler(3, 3, "i1")
        assert sent == [] and errors == []

    def test_a_series_is_asked_about_once_not_once_per_instance(self) -> None:
        """Orthanc's answer about a series lists its instances: asked per instance, it costs Orthanc time that grows
        with the square of the series."""
        handler, sent, _ = self._handler(_instances_of(_series("US"), "i1", "i2", "i3"))
        for i in ("i1", "i2", "i3"):
            handler(3, 3, i)
        assert [args[1] for args in sent] == ["i1", "i2", "i3"]
        assert handler.api.asked == ["/instances/i1", "/series/s1", "/instances/i2", "/instances/i3"]

    def test_stable_study_with_images_is_reconciled(self) -> None:
        handler, sent, _ = self._handler({"/studies/st1/series": [_series("SR"), _series("US")]})
        handler(9, 1, "st1")
        assert sent == [(TASK_RECONCILE_STUDY, "st1")]

    def test_stable_study_of_reports_only_is_ignored(self) -> None:
        handler, sent, _ = self._handler({"/studies/st1/series": [_series("SR")]})
        handler(9, 1, "st1")
        assert sent == []

    def test_stable_study_whose_instance_was_queued_is_reconciled_without_asking_orthanc_again(self) -> None:
        handler, sent, errors = self._handler(_instances_of(_series("US"), "i1"))
        handler(3, 3, "i1")
        handler(9, 1, "st1")
        assert sent[-1] == (TASK_RECONCILE_STUDY, "st1") and errors == []
        assert "/studies/st1/series" not in handler.api.asked

    def test_a_study_is_asked_about_again_once_it_was_stable(self) -> None:
        handler, sent, _ = self._handler({**_instances_of(_series("US"), "i1"), "/studies/st1/series": []})
        handler(3, 3, "i1")
        handler(9, 1, "st1")
        handler(9, 1, "st1")  # stable again (an instance was deleted meanwhile): Orthanc is asked, it holds nothing
        assert sent == [(TASK_INDEX_INSTANCE, "i1", "s1", "st1"), (TASK_RECONCILE_STUDY, "st1")]
        assert handler.api.asked.count("/studies/st1/series") == 1

    def test_a_deleted_study_or_series_is_forgotten(self) -> None:
        handler, sent, _ = self._handler({**_instances_of(_series("US"), "i1", "i2"), "/studies/st1/series": []})
        handler(3, 3, "i1")
        handler(1, 1, "st1")
        handler(9, 1, "st1")
        handler(1, 2, "s1")
        handler(3, 3, "i2")
        assert sent == [(TASK_INDEX_INSTANCE, "i1", "s1", "st1"), (TASK_FORGET, "study", "st1"),
                        (TASK_FORGET, "series", "s1"), (TASK_INDEX_INSTANCE, "i2", "s1", "st1")]
        assert handler.api.asked.count("/series/s1") == 2

    def test_the_oldest_remembered_study_is_forgotten_first(self) -> None:
        answers = {**_instances_of({**_series("US"), "ParentStudy": "st1"}, "i1"),
                   **_instances_of({**_series("US"), "ID": "s2", "ParentStudy": "st2"}, "i2"),
                   "/studies/st1/series": [_series("US")]}
        api, sent = FakeApi(answers), []
        handler = ChangeHandler(FAKE_ORTHANC, api, lambda *a: sent.append(a), pytest.fail, Remembered(size=1))
        handler(3, 3, "i1")
        handler(3, 3, "i2")
        asked = len(api.asked)
        handler(9, 1, "st1")  # forgotten: asked again, still reconciled
        handler(9, 1, "st2")  # remembered
        assert sent[-2:] == [(TASK_RECONCILE_STUDY, "st1"), (TASK_RECONCILE_STUDY, "st2")]
        assert api.asked[asked:] == ["/studies/st1/series"]

    def test_deletion_is_forwarded_with_its_level(self) -> None:
        handler, sent, _ = self._handler({})
        handler(1, 1, "st1")
        assert sent == [(TASK_FORGET, "study", "st1")]

    def test_vanished_instance_is_not_an_error(self) -> None:
        handler, sent, errors = self._handler({})
        handler(3, 3, "gone")
        assert sent == [] and errors == []

    def test_failure_is_logged_with_traceback_and_not_raised(self) -> None:
        def broken(*_):
            raise RuntimeError("broker down")

        errors: list[str] = []
        handler = ChangeHandler(FAKE_ORTHANC, FakeApi(_instances_of(_series("US"), "i1")), broken, errors.append)
        handler(3, 3, "i1")
        assert len(errors) == 1 and "Traceback" in errors[0] and "broker down" in errors[0]


class TestTaskSender:
    def test_tasks_reach_celery_in_order_on_the_lookalike_queue(self) -> None:
        calls = []
        sender = TaskSender(lambda name, **kw: calls.append((name, kw["args"], kw["queue"])))
        sender.send(TASK_INDEX_INSTANCE, "a")
        sender.send(TASK_INDEX_INSTANCE, "b")
        sender.join()
        assert calls == [(TASK_INDEX_INSTANCE, ["a"], QUEUE), (TASK_INDEX_INSTANCE, ["b"], QUEUE)]
        sender.close()

    def test_send_never_waits_on_the_broker(self) -> None:
        release = threading.Event()
        sender = TaskSender(lambda *a, **kw: release.wait(5))
        for i in range(100):
            sender.send(TASK_INDEX_INSTANCE, str(i))  # returns although the broker is stuck
        assert sender.pending() >= 98
        release.set()
        sender.join()
        assert sender.pending() == 0
        sender.close()

    def test_failures_are_counted_and_reported(self) -> None:
        errors: list[str] = []

        def refuse(*a, **kw):
            raise ConnectionError("redis unreachable")

        sender = TaskSender(refuse, on_error=errors.append)
        sender.send(TASK_INDEX_INSTANCE, "x")
        sender.join()
        assert sender.failed == 1 and "redis unreachable" in errors[0]
        sender.close()


    def test_a_broker_outage_drops_the_backlog_at_once_then_sending_resumes(self) -> None:
        now = [0.0]
        broker_up = [False]
        sent: list[list] = []
        errors: list[str] = []

        def send_task(name, **kw):
            if not broker_up[0]:
                raise ConnectionError("redis unreachable")
            sent.append(kw["args"])

        sender = TaskSender(send_task, on_error=errors.append, pause_after_failure=5.0, clock=lambda: now[0])
        for i in range(50):
            sender.send(TASK_INDEX_INSTANCE, str(i))
        sender.join()
        assert sender.failed == 50 and len(errors) == 1, "one try and one report per outage, not per task"
        broker_up[0] = True
        sender.send(TASK_INDEX_INSTANCE, "during-pause")
        sender.join()
        assert sent == [] and sender.failed == 51
        now[0] = 6.0
        sender.send(TASK_INDEX_INSTANCE, "after")
        sender.join()
        assert sent == [["after"]]
        sender.close()

    def test_a_long_outage_is_one_error_line_without_traceback_and_one_line_when_it_ends(self) -> None:
        now = [0.0]
        broker_up = [False]
        errors: list[str] = []
        recoveries: list[str] = []

        def send_task(name, **kw):
            if not broker_up[0]:
                raise ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

        sender = TaskSender(send_task, on_error=errors.append, on_recovery=recoveries.append, pause_after_failure=5.0,
                            clock=lambda: now[0])
        for second in range(0, 60, 2):  # a minute of outage: the broker is tried again after every pause
            now[0] = float(second)
            sender.send(TASK_INDEX_INSTANCE, str(second))
            sender.join()
        assert len(errors) == 1 and len(errors[0].splitlines()) == 1 and recoveries == []
        broker_up[0] = True
        now[0] = 70.0
        sender.send(TASK_INDEX_INSTANCE, "back")
        sender.send(TASK_INDEX_INSTANCE, "again")
        sender.join()
        assert len(errors) == 1 and len(recoveries) == 1 and "30" in recoveries[0]  # the 30 tasks dropped
        sender.close()


REGISTER_WITHOUT_ORTHANC = """
import json, sys
from types import SimpleNamespace

calls = []
section = {"index_dir": sys.argv[1], "redis_url": "redis://127.0.0.1:1/0", "lookup_socket": sys.argv[1] + "/s"}
orthanc = SimpleNamespace(
    GetConfiguration=lambda: json.dumps({"Lookalike": section}),
    RegisterOnChangeCallback=lambda *a: calls.append("change"),
    RegisterRestCallback=lambda uri, cb: calls.append(uri),
    ExtendOrthancExplorer=lambda js: calls.append("explorer"),
    LogWarning=print, LogError=print, LogInfo=print,
    ChangeType=SimpleNamespace(NEW_INSTANCE=3, STABLE_STUDY=9, DELETED=1),
    ResourceType=SimpleNamespace(PATIENT=0, STUDY=1, SERIES=2, INSTANCE=3),
)
from lookalike.plugin.entry import register
register(orthanc)
print(json.dumps({"routes": calls,
                  "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("faiss", "torch", "celery"))
                  + sorted(m for m in sys.modules if m in ("lookalike.index.store", "lookalike.index.vector_index"))}))
"""


def test_the_plugin_registers_without_loading_faiss_celery_or_the_index(tmp_path) -> None:
    """What ``register`` imports in Orthanc's process: the routes, but neither FAISS, torch, Celery nor the index
    store (lookups are the query service's, sending tasks the relay's; the stack test checks Orthanc's own memory
    map)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", REGISTER_WITHOUT_ORTHANC, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "/lookalike/studies/([^/]+)/similar" in result["routes"] and "/lookalike/status" in result["routes"]
    assert result["loaded"] == []
