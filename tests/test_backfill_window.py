"""Back-indexing keeps the workers fed: a window of at most one batch outstanding, topped up as instances settle,
not a barrier that waits for a whole batch (the workers would run dry at every batch's tail)."""

from __future__ import annotations

from lookalike.worker.backfill import Backfill


class Worker:
    """A worker seen through the catalogue: it settles ``per_pause`` of the queued instances, oldest first, each time
    the back-fill pauses to wait for it (simulated time)."""

    def __init__(self, per_pause: int) -> None:
        self.per_pause = per_pause
        self.queued: list[str] = []
        self.indexed: set[str] = set()
        self.now = 0.0
        self.outstanding_at_send: list[int] = []
        #: At the first send after each wait for the worker: how many queued instances were still unsettled.
        self.unsettled_when_resuming: list[int] = []
        self._waited = False

    # the catalogue's two questions
    def is_indexed(self, instance_id: str, model_version: str | None = None) -> bool:
        return instance_id in self.indexed

    def problem_for(self, instance_id: str):
        return None

    def send(self, name: str, args: list, kwargs: dict) -> None:
        waiting = [i for i in self.queued if i not in self.indexed]
        self.outstanding_at_send.append(len(waiting) + 1)
        if self._waited:
            self.unsettled_when_resuming.append(len(waiting))
            self._waited = False
        self.queued.append(args[0])

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        if seconds < 0.1:  # the rate limit's pause between two sends: the worker is no quicker than that
            return
        self._waited = True
        waiting = [i for i in self.queued if i not in self.indexed]
        self.indexed.update(waiting[:self.per_pause])


def test_the_queue_is_topped_up_before_a_batch_settles_and_never_exceeds_one_batch() -> None:
    worker = Worker(per_pause=5)
    backfill = Backfill(None, worker, worker.send, None, batch=32, rate=1e9, clock=worker.clock, sleep=worker.sleep)
    items = [(f"i{n}", "se", "st") for n in range(200)]
    report = backfill.run_instances(items)
    assert report.indexed == 200 and report.queued == 200 and report.waiting == 0
    assert max(worker.outstanding_at_send) <= 32
    # queuing resumed while half a batch still waited for the worker (a barrier would resume with none waiting)
    assert worker.unsettled_when_resuming and min(worker.unsettled_when_resuming) > 0


def test_a_worker_that_settles_nothing_leaves_them_waiting_after_the_timeout() -> None:
    worker = Worker(per_pause=0)
    backfill = Backfill(None, worker, worker.send, None, batch=4, rate=1e9, settle_timeout=5.0,
                        clock=worker.clock, sleep=worker.sleep)
    report = backfill.run_instances([(f"i{n}", "se", "st") for n in range(10)])
    assert report.indexed == 0 and report.queued == 10 and report.waiting == 10
