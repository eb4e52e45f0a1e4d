"""The relay that sends the plugin's tasks from a process of its own: a real relay process and a real Redis."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from lookalike.config import INGEST_MARK_KEY, QUEUE, TASK_INDEX_INSTANCE, TASK_RECONCILE_STUDY, Settings
from lookalike.ops.stack import free_port
from lookalike.plugin.relay import RELAY_NICE, RelayClient, relay_command
from tests.support import require_programs, wait_for

ROOT = Path(__file__).resolve().parent.parent
SITE_PACKAGES = next(p for p in sys.path if p.endswith("site-packages"))


@pytest.fixture
def redis_url(tmp_path):
    require_programs("redis-server")
    port = free_port()
    server = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
                               "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                              stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    wait_for(lambda: _ping(url), timeout=20, what="redis-server")
    yield url
    server.terminate()
    server.wait(10)


def _ping(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url).ping())
    except redis.ConnectionError:
        return False


def _client(url: str, errors: list, warnings: list, **kw) -> RelayClient:
    command, env = relay_command([str(ROOT), SITE_PACKAGES])
    return RelayClient(command, env, Settings.from_dict({"redis_url": url}).to_dict(), errors.append,
                       warnings.append, **kw)


def _queued(url: str) -> list[tuple[str, list]]:
    """The Celery messages waiting on the queue, oldest first: (task name, args)."""
    found = []
    for raw in reversed(redis.Redis.from_url(url).lrange(QUEUE, 0, -1)):
        message = json.loads(raw)
        args = json.loads(base64.b64decode(message["body"]))[0]
        found.append((message["headers"]["task"], args))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class TestRelay:
    def test_tasks_reach_celery_in_order_from_a_process_below_orthancs_priority(self, redis_url) -> None:
        errors, warnings = [], []
        client = _client(redis_url, errors, warnings)
        try:
            client.send(TASK_INDEX_INSTANCE, "i1", "se1", "st1")
            client.send(TASK_INDEX_INSTANCE, "i2", "se1", "st1")
            client.send(TASK_RECONCILE_STUDY, "st1")
            wait_for(lambda: len(_queued(redis_url)) == 3, timeout=30, what="three tasks in Redis")
            assert _queued(redis_url) == [(TASK_INDEX_INSTANCE, ["i1", "se1", "st1"]),
                                          (TASK_INDEX_INSTANCE, ["i2", "se1", "st1"]),
                                          (TASK_RECONCILE_STUDY, ["st1"])]
            pid = client.pid
            assert pid is not None and pid != os.getpid()
            assert os.getpriority(os.PRIO_PROCESS, pid) >= os.getpriority(os.PRIO_PROCESS, 0) + RELAY_NICE
            # The ingest mark the worker's gate waits on is written by the relay too.
            assert redis.Redis.from_url(redis_url).get(INGEST_MARK_KEY) is not None
            wait_for(lambda: client.pending() == 0, timeout=10, what="no task held")
        finally:
            client.close()
        assert errors == [] and warnings == []

    def test_a_broker_outage_is_one_error_line_and_the_tasks_are_dropped(self) -> None:
        errors, warnings = [], []
        client = _client(f"redis://127.0.0.1:{free_port()}/0", errors, warnings)  # nothing listens there
        try:
            for i in range(20):
                client.send(TASK_INDEX_INSTANCE, f"i{i}", "se", "st")
            wait_for(lambda: errors and client.pending() == 0, timeout=60, what="the outage said and the tasks dropped")
            time.sleep(0.5)
        finally:
            client.close()
        assert len(errors) == 1 and "Redis" in errors[0] and "Traceback" not in errors[0], errors

    def test_a_relay_killed_with_kill_9_is_said_in_the_log_and_replaced(self, redis_url) -> None:
        errors, warnings = [], []
        client = _client(redis_url, errors, warnings, restart_after=0.5)
        try:
            client.send(TASK_INDEX_INSTANCE, "before", "se", "st")
            wait_for(lambda: len(_queued(redis_url)) == 1, timeout=30, what="the first task")
            first = client.pid
            os.kill(first, signal.SIGKILL)
            wait_for(lambda: any("ended" in e for e in errors), timeout=10, what="the relay's end in the log")
            time.sleep(0.6)
            client.send(TASK_INDEX_INSTANCE, "after", "se", "st")
            wait_for(lambda: len(_queued(redis_url)) == 2, timeout=30, what="a task through a new relay")
            assert client.pid not in (None, first)
            assert [args[0] for _, args in _queued(redis_url)] == ["before", "after"]
        finally:
            client.close()
        assert len(errors) == 1 and "-9" in errors[0], errors

    def test_the_relay_sends_what_it_holds_and_ends_when_orthancs_side_closes(self, redis_url) -> None:
        client = _client(redis_url, [], [])
        for i in range(50):
            client.send(TASK_INDEX_INSTANCE, f"i{i}", "se", "st")
        client.join()
        pid = client.pid
        client.close()
        assert not _alive(pid)
        assert len(_queued(redis_url)) == 50

    def test_the_relay_ends_when_orthancs_process_is_killed(self, redis_url, tmp_path) -> None:
        script = (
            "import sys, time\n"
            f"sys.path[:0] = [{str(ROOT)!r}]\n"
            "from tests.test_relay import _client\n"
            "c = _client(sys.argv[1], [], [])\n"
            f"c.send({TASK_RECONCILE_STUDY!r}, 'st')\n"
            "c.join()\n"
            "print(c.pid, flush=True)\n"
            "time.sleep(600)\n"
        )
        orthanc = subprocess.Popen([sys.executable, "-c", script, redis_url], stdout=subprocess.PIPE, text=True)
        relay = int(orthanc.stdout.readline())
        assert _alive(relay)
        orthanc.kill()
        orthanc.wait()
        wait_for(lambda: not _alive(relay), timeout=15, what="the relay to end with Orthanc")
