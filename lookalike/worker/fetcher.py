"""Fetch and decode an instance, here or in a process of its own, so that work done ahead does not slow the encoder.

:class:`~lookalike.worker.pipeline.Embedder` fetches and decodes the next batch while the current one embeds. In a
thread of the worker's process that overlapped nothing on the CPU: the encoder's forward holds Python's GIL between
torch's operations (module calls, MONAI's MetaTensor), so the thread's Python (the HTTP request, pydicom's parse,
the imaging-region crop: about 6 ms of CPU per 256 x 256 ultrasound instance) ran in turns with the forward instead
of beside it. Measured on ``bench/backfill_throughput.py``'s stack (one worker, 2 cores, 1000 instances): the
worker's forwards took 29.8 ms per image against the bare encoder's 24.3 ms, about the encoder's time plus the
thread's 6.2 ms of CPU per instance. :class:`FetchProcess` runs the
same :func:`fetch_instance` in one process started for it (a fresh interpreter: it never imports torch), on the core
the encoder leaves free; the pool process only unpickles the result. The process is a plain subprocess speaking
pickles over two pipes: Celery's pool processes are daemonic, and :mod:`multiprocessing` refuses children to those.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, BinaryIO

from lookalike.dicom.errors import LookalikeDicomError
from lookalike.dicom.instance import PreparedInstance, prepare_instance
from lookalike.orthanc.client import OrthancApi, instance_series

__all__ = ["FetchProcess", "FetchProcessDied", "Fetched", "fetch_instance"]

#: The decoded instance (or why it cannot be), its Orthanc series and its study.
Fetched = tuple[PreparedInstance | LookalikeDicomError, str | None, str | None]

#: The folder that holds the ``lookalike`` package, for the helper's interpreter to import it from.
_SOURCE_ROOT = str(Path(__file__).resolve().parents[2])


class FetchProcessDied(Exception):
    """The helper process ended (a decoder that crashed on the instance, a kill); the next fetch starts another."""


def fetch_instance(api: OrthancApi, instance_id: str, series_id: str | None, study_id: str | None,
                   max_pixels: int) -> Fetched:
    """The decoded instance (or why it cannot be), its series and its study (looked up when not given).

    Raises
    ------
    OrthancError
        Orthanc unreachable, the instance gone, the credentials refused: the caller decides.
    """
    data = api.get_bytes(f"/instances/{instance_id}/file")
    if series_id is None or study_id is None:
        series = instance_series(api, instance_id)
        series_id, study_id = series["ID"], series["ParentStudy"]
    try:
        return prepare_instance(data, max_pixels), series_id, study_id
    except LookalikeDicomError as exc:
        return exc, series_id, study_id


def _answer(api: OrthancApi, max_pixels: int, request: tuple) -> bytes:
    """The pickled answer to one request: ``("ok", fetched)`` or ``("raise", exception)``; a problem
    (:class:`~lookalike.dicom.errors.LookalikeDicomError`) pickles with its attributes, as Celery needs too."""
    try:
        answer: tuple = ("ok", fetch_instance(api, *request, max_pixels))
    except Exception as exc:  # noqa: BLE001 (raised again on the other side, as it would have been there)
        answer = ("raise", exc)
    try:
        return pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # noqa: BLE001 (an exception that does not pickle: its words do)
        what = answer[1] if answer[0] == "raise" else exc
        return pickle.dumps(("raise", RuntimeError(f"{type(what).__name__}: {what}")))


def serve(requests_fd: int, answers_fd: int) -> None:
    """The helper process: the api and pixel limit first, then one answer per request until the pipe closes (the
    process it serves closed it, or ended: a pool process killed outright closes it too)."""
    with os.fdopen(requests_fd, "rb") as requests, os.fdopen(answers_fd, "wb") as answers:
        api, max_pixels = pickle.load(requests)
        while True:
            try:
                request = pickle.load(requests)
            except EOFError:
                return
            answers.write(_answer(api, max_pixels, request))
            answers.flush()


class FetchProcess:
    """:func:`fetch_instance` in one process of its own, started on first use and again after it ended.

    Parameters
    ----------
    api
        Orthanc's REST API; it is pickled into the process (:class:`~lookalike.orthanc.client.HttpOrthanc`, with its
        session's headers and credentials).
    max_pixels
        As :func:`~lookalike.dicom.instance.prepare_instance`'s.
    """

    def __init__(self, api: OrthancApi, max_pixels: int) -> None:
        self.api, self.max_pixels = api, max_pixels
        self.process: subprocess.Popen | None = None
        self._requests: BinaryIO | None = None
        self._answers: BinaryIO | None = None
        self._lock = threading.Lock()

    def _start(self) -> None:
        requests_read, requests_write = os.pipe()
        answers_read, answers_write = os.pipe()
        code = (f"import sys; sys.path.insert(0, {_SOURCE_ROOT!r}); from lookalike.worker.fetcher import serve; "
                f"serve({requests_read}, {answers_write})")
        try:
            self.process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                                            pass_fds=(requests_read, answers_write))
        finally:
            os.close(requests_read)
            os.close(answers_write)
        self._requests, self._answers = os.fdopen(requests_write, "wb"), os.fdopen(answers_read, "rb")
        self._send((self.api, self.max_pixels))

    def _send(self, message: Any) -> None:
        pickle.dump(message, self._requests, protocol=pickle.HIGHEST_PROTOCOL)
        self._requests.flush()

    def fetch(self, instance_id: str, series_id: str | None, study_id: str | None) -> Fetched:
        """As :func:`fetch_instance`, in the helper process; raises what it raises there.

        Raises
        ------
        FetchProcessDied
            The process ended before it answered: the next call starts another.
        """
        with self._lock:
            try:
                if self.process is None:
                    self._start()
                self._send((instance_id, series_id, study_id))
                kind, value = pickle.load(self._answers)
            except (OSError, EOFError, pickle.UnpicklingError) as exc:
                self._stop()
                raise FetchProcessDied(f"the process fetching ahead ended: {type(exc).__name__}: {exc}") from exc
        if kind == "raise":
            raise value
        return value

    def _stop(self) -> None:
        process, self.process = self.process, None
        for pipe in (self._requests, self._answers):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
        self._requests = self._answers = None
        if process is not None:
            try:
                process.wait(timeout=5)  # it ends at the closed pipe
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def close(self) -> None:
        """Stop the process (a later :meth:`fetch` starts another)."""
        with self._lock:
            self._stop()
