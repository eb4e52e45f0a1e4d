"""The plugin's tasks reach Celery from a process of their own, below Orthanc's CPU priority.

Celery's ``send_task`` costs about a millisecond of CPU per task inside Orthanc's process (building the message,
kombu's publish, the Redis round trip, all under the GIL that the change callbacks need too). Measured with the
C-STORE bench's stacks on 2 cores: Orthanc used 0.61-0.71 CPU s per 100 instances with the plugin sending, 0.44-0.46
with the same plugin dropping its tasks, against 0.31-0.39 without the plugin. So the plugin only writes one line
per task into a pipe, and the relay process does Celery's work at a lower priority (niceness
:data:`RELAY_NICE`): while Orthanc stores, the relay runs on CPU time Orthanc leaves.

Two halves, one per process:

- :class:`RelayClient`, in Orthanc's process: ``send`` returns at once (a queue drained into the relay's standard
  input by a thread of its own, so that no callback ever waits on a full pipe); the relay's lines for Orthanc's log
  go to Orthanc's log; a relay that died is started again at the next task (its tasks are left to the worker's
  catch-up from Orthanc's change log, as during a broker outage), at most every ``restart_after`` seconds.
- :func:`main` (``python -m lookalike.plugin.relay``): the :class:`~lookalike.plugin.sender.TaskSender` the plugin
  ran before, with the same outage handling (tasks dropped at once while Redis refuses them, one line when an
  outage starts and one when it ends) and the same ingest mark. It ends when its standard input closes, that is
  when Orthanc stops or dies.

The pipe speaks lines of JSON. In: first the settings (never on the command line, which every local user reads),
then ``[task name, [args]]`` per task. Out: ``E <text>`` and ``W <text>`` for Orthanc's log (error, warning), and
``P <n>`` whenever the number of tasks the relay holds has changed (the status route's ``plugin_pending``).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, TextIO

import redis

from lookalike.config import INGEST_MARK_KEY, Settings
from lookalike.plugin.sender import TaskSender

#: Niceness the relay adds to its own: below Orthanc's threads, above the worker's SCHED_IDLE.
RELAY_NICE = 10

#: Seconds between two reports of the relay's backlog.
REPORT_EVERY = 0.2


def relay_command(paths: list[str]) -> tuple[list[str], dict[str, str]]:
    """The relay's command line and environment from inside Orthanc's embedded Python.

    ``paths``: where Lookalike and its packages import from (the plugin's ``source_root`` and ``site_packages``,
    which the loader script put first on ``sys.path``); the relay runs the interpreter Orthanc embeds, with them on
    its ``PYTHONPATH`` in the same order.
    """
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    python = Path(sys.base_prefix) / "bin" / version
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    return [str(python), "-m", "lookalike.plugin.relay"], env


class RelayClient:
    """Orthanc's side of the relay: hands tasks to it, and its lines to Orthanc's log.

    Parameters
    ----------
    command, env
        How to start the relay (:func:`relay_command`).
    settings
        The settings (``Settings.to_dict()``) the relay connects to Redis with; sent over its standard input.
    log_error, log_warning
        Orthanc's log (``orthanc.LogError``, ``orthanc.LogWarning``).
    restart_after
        Seconds after a failed or dead relay before another is started; tasks meanwhile are dropped and left to the
        worker's catch-up.
    """

    def __init__(self, command: list[str], env: dict[str, str] | None, settings: dict,
                 log_error: Callable[[str], None], log_warning: Callable[[str], None],
                 restart_after: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._command, self._env, self._settings = command, env, settings
        self._log_error, self._log_warning = log_error, log_warning
        self._restart_after, self._clock = restart_after, clock
        self._queue: queue.Queue[tuple[str, tuple] | None] = queue.Queue()
        self._proc: subprocess.Popen | None = None
        self._held = 0  # tasks the relay last said it holds
        self._not_before = float("-inf")  # no start before this time (the last one failed or died)
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="lookalike-relay-writer", daemon=True)
        self._thread.start()

    def send(self, name: str, *args: Any) -> None:
        """Return at once; the task reaches the relay, then the broker, shortly after."""
        self._queue.put((name, args))

    def pending(self) -> int:
        """Tasks not yet handed to the broker: here and in the relay."""
        return self._queue.qsize() + self._held

    def join(self) -> None:
        """Wait until everything sent so far was written to the relay (for tests)."""
        self._queue.join()

    @property
    def pid(self) -> int | None:
        """The running relay's process id (None while none runs)."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def close(self, timeout: float = 5.0) -> None:
        """Close the relay's input (it sends what it holds, for up to 5 s, and ends) and wait for it."""
        self._closing = True
        self._queue.put(None)
        self._thread.join(timeout)
        proc = self._proc
        if proc is not None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    if self._proc is not None and self._proc.stdin is not None:
                        self._proc.stdin.close()
                    return
                self._write(json.dumps([item[0], list(item[1])]))
            finally:
                self._queue.task_done()

    def _write(self, line: str) -> None:
        proc = self._running()
        if proc is None:
            return  # none runs: the task is left to the catch-up, as the log said when the relay ended
        try:
            proc.stdin.write(line + "\n")
            proc.stdin.flush()
        except (OSError, ValueError):  # it died since (EPIPE: Orthanc ignores SIGPIPE); its reader says so in the log
            pass

    def _running(self) -> subprocess.Popen | None:
        """The relay, started if none runs and none failed a moment ago."""
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        if self._clock() < self._not_before:
            return None
        self._not_before = self._clock() + self._restart_after
        try:
            proc = subprocess.Popen(self._command, env=self._env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    text=True, bufsize=1)
            proc.stdin.write(json.dumps(self._settings) + "\n")
            proc.stdin.flush()
        except OSError as exc:
            self._log_error(f"Lookalike: the task relay does not start ({exc}); new instances are left to the "
                            "worker's catch-up from Orthanc's change log until it does")
            return None
        self._proc = proc
        threading.Thread(target=self._read, args=(proc,), name="lookalike-relay-reader", daemon=True).start()
        return proc

    def _read(self, proc: subprocess.Popen) -> None:
        """The relay's lines into Orthanc's log and the backlog count, until it ends."""
        for line in proc.stdout:
            kind, _, text = line.rstrip("\n").partition(" ")
            if kind == "P" and text.isdigit():
                self._held = int(text)
            elif kind == "E":
                self._log_error(text)
            elif kind == "W":
                self._log_warning(text)
        code = proc.wait()
        self._held = 0
        if not self._closing:
            self._not_before = self._clock() + self._restart_after
            self._log_error(f"Lookalike: the task relay (pid {proc.pid}) ended with exit code {code}; another "
                            f"starts at the next task after {self._restart_after:g} s, and the tasks it held are "
                            "left to the worker's catch-up from Orthanc's change log")


def _say(out: TextIO, lock: threading.Lock, kind: str, text: str) -> None:
    with lock:
        out.write(f"{kind} {' '.join(text.splitlines())}\n")
        out.flush()


def main() -> None:
    """The relay process: tasks from standard input to Celery, until standard input closes."""
    os.nice(RELAY_NICE)
    # Here, not at the module's top: Orthanc's process imports this module, and never Celery.
    from lookalike.worker.celery_app import make_app  # noqa: PLC0415

    settings = Settings.from_dict(json.loads(sys.stdin.readline()))
    out, lock = sys.stdout, threading.Lock()
    broker = redis.Redis.from_url(settings.redis_url, socket_timeout=1, socket_connect_timeout=1)
    sender = TaskSender(make_app(settings).send_task, on_error=lambda text: _say(out, lock, "E", text),
                        on_recovery=lambda text: _say(out, lock, "W", text),
                        mark_ingest=lambda at: broker.set(INGEST_MARK_KEY, repr(at)))
    done = threading.Event()

    def report() -> None:
        said = 0
        while not done.wait(REPORT_EVERY):
            if (held := sender.pending()) != said:
                _say(out, lock, "P", str(held))
                said = held

    reporter = threading.Thread(target=report, name="lookalike-relay-report", daemon=True)
    reporter.start()
    for line in sys.stdin:
        name, args = json.loads(line)
        sender.send(name, *args)
    sender.close()
    done.set()
    reporter.join()
    _say(out, lock, "P", "0")


if __name__ == "__main__":
    main()
