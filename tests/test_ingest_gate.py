"""The PACS first: the worker fetches from Orthanc only once it has received nothing for a moment, within a cap.

Time is simulated: a fake clock advances only when the gate (or the simulated modality) sleeps.
"""

from __future__ import annotations

import pytest

from lookalike.config import TASK_INDEX_INSTANCE, TASK_RECONCILE_STUDY
from lookalike.index.store import IndexStore
from lookalike.plugin.sender import MARK_EVERY, TaskSender
from lookalike.worker.ingest_gate import RETRY_READ_AFTER, IngestGate
from lookalike.worker.pipeline import Pipeline, Request
from tests.support import FakeEncoder, FakeOrthanc, dicom_bytes, random_us


class Modality:
    """A modality storing one instance every ``every`` seconds until ``until`` (simulated), as the plugin marks it."""

    def __init__(self, every: float, until: float) -> None:
        self.now, self.every, self.until = 0.0, every, until

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def last_stored(self) -> float:
        """The mark: the last store at or before now."""
        return min(self.now, self.until) // self.every * self.every


class TestIngestGate:
    def test_waits_while_instances_arrive_and_lets_go_once_quiet(self) -> None:
        pacs = Modality(every=0.125, until=5.0)
        gate = IngestGate(pacs.last_stored, quiet=1.0, quiet_max=60.0, clock=pacs.clock, sleep=pacs.sleep)
        assert not gate.is_quiet()
        gate.wait()
        assert pacs.now >= 6.0 - 1e-9  # the last store (5.0) plus the quiet window
        assert gate.is_quiet()

    def test_sustained_ingest_still_gets_a_batch_through_per_cap(self) -> None:
        pacs = Modality(every=0.125, until=1e9)
        gate = IngestGate(pacs.last_stored, quiet=1.0, quiet_max=10.0, clock=pacs.clock, sleep=pacs.sleep)
        gate.wait()
        assert pacs.now == pytest.approx(10.0)
        assert not gate.is_quiet()  # still receiving: the batch goes anyway
        gate.wait()
        assert pacs.now == pytest.approx(20.0)

    def test_no_mark_an_unreadable_mark_or_a_zero_window_never_hold_indexing(self) -> None:
        def redis_down() -> float:
            raise ConnectionError("Redis is away")

        pacs = Modality(every=0.125, until=1e9)
        for gate in (IngestGate(lambda: None, 1.0, 60.0, clock=pacs.clock, sleep=pacs.sleep),
                     IngestGate(redis_down, 1.0, 60.0, clock=pacs.clock, sleep=pacs.sleep),
                     IngestGate(pacs.last_stored, 0.0, 60.0, clock=pacs.clock, sleep=pacs.sleep)):
            assert gate.is_quiet()
            gate.wait()
        assert pacs.now == 0.0


    def test_an_unreachable_mark_is_not_asked_for_again_at_once(self) -> None:
        pacs = Modality(every=0.125, until=1e9)
        reads = []

        def redis_down() -> float:
            reads.append(pacs.now)
            raise ConnectionError("Redis is away")

        gate = IngestGate(redis_down, 1.0, 60.0, clock=pacs.clock, sleep=pacs.sleep)
        for _ in range(10):
            assert gate.is_quiet()
        assert len(reads) == 1
        pacs.sleep(RETRY_READ_AFTER)
        assert gate.is_quiet() and len(reads) == 2


class RecordingOrthanc(FakeOrthanc):
    """Notes the simulated time of every file fetched."""

    def __init__(self, pacs: Modality) -> None:
        super().__init__()
        self.pacs, self.fetched_at = pacs, []

    def get_bytes(self, path: str) -> bytes:
        if path.endswith("/file"):
            self.fetched_at.append(self.pacs.now)
        return super().get_bytes(path)


class TestDeferredIndexing:
    def test_nothing_is_fetched_while_stores_arrive_and_all_is_indexed_after(self, tmp_path) -> None:
        pacs = Modality(every=0.0625, until=3.0)
        api, encoder = RecordingOrthanc(pacs), FakeEncoder()
        for i in range(6):
            api.add(f"i{i}", dicom_bytes(random_us(i)))
        gate = IngestGate(pacs.last_stored, quiet=1.0, quiet_max=60.0, clock=pacs.clock, sleep=pacs.sleep)
        store = IndexStore(tmp_path)
        try:
            pipeline = Pipeline.local(api, store, lambda name, weights=None: encoder, max_pixels=10_000_000)
            pipeline.embedder.gate = gate
            first = pipeline.index_many([Request("i0"), Request("i1"), Request("i2")],
                                        ahead=[Request("i3"), Request("i4"), Request("i5")])
            second = pipeline.index_many([Request("i3"), Request("i4"), Request("i5")])
            assert [o.status for o in first + second] == ["indexed"] * 6
            assert len(api.fetched_at) == 6 and min(api.fetched_at) >= 4.0 - 1e-9  # 3.0 last store + 1 s quiet
            assert all(store.catalogue.is_indexed(f"i{i}") for i in range(6))
        finally:
            store.close()

    def test_fetching_ahead_stops_while_orthanc_receives(self, tmp_path) -> None:
        pacs = Modality(every=0.0625, until=1e9)
        api = RecordingOrthanc(pacs)
        for i in range(2):
            api.add(f"i{i}", dicom_bytes(random_us(i)))
        receiving = [True]
        gate = IngestGate(lambda: pacs.now if receiving[0] else None, quiet=1.0, quiet_max=60.0, clock=pacs.clock,
                          sleep=pacs.sleep)
        store = IndexStore(tmp_path)
        try:
            pipeline = Pipeline.local(api, store, lambda name, weights=None: FakeEncoder(), max_pixels=10_000_000)
            pipeline.embedder.gate = gate
            jobs = pipeline.indexer.plan([Request("i0"), Request("i1")])
            pipeline.embedder._fetch_ahead(jobs)
            assert api.fetched_at == [] and pipeline.embedder._ahead == {}
            receiving[0] = False
            pipeline.embedder._fetch_ahead(jobs)
            assert sorted(pipeline.embedder._ahead) == ["i0", "i1"]
        finally:
            store.close()


class TestIngestMark:
    def test_index_tasks_mark_the_ingest_a_few_times_a_second_not_per_instance(self) -> None:
        now = [100.0]
        marks: list[float] = []
        sender = TaskSender(lambda *a, **kw: None, clock=lambda: now[0], mark_ingest=marks.append)
        for i in range(50):
            sender.send(TASK_INDEX_INSTANCE, f"i{i}", "se", "st")
        sender.join()
        assert len(marks) == 1
        now[0] += MARK_EVERY
        sender.send(TASK_INDEX_INSTANCE, "j", "se", "st")
        sender.join()
        assert len(marks) == 2
        sender.close()

    def test_other_tasks_do_not_mark_and_a_failed_mark_does_not_stop_sending(self) -> None:
        sent: list[str] = []

        def mark(at: float) -> None:
            raise ConnectionError("Redis is away")

        sender = TaskSender(lambda name, **kw: sent.append(name), mark_ingest=mark)
        sender.send(TASK_RECONCILE_STUDY, "st")
        sender.send(TASK_INDEX_INSTANCE, "a", "se", "st")
        sender.send(TASK_INDEX_INSTANCE, "b", "se", "st")
        sender.join()
        assert sent == [TASK_RECONCILE_STUDY, TASK_INDEX_INSTANCE, TASK_INDEX_INSTANCE]
        assert sender.failed == 0
        sender.close()

        marks: list[float] = []
        sender = TaskSender(lambda *a, **kw: None, mark_ingest=marks.append)
        sender.send(TASK_RECONCILE_STUDY, "st")
        sender.join()
        assert marks == []
        sender.close()
