"""When a study was made, as DICOM says it (StudyDate DA, StudyTime TM), and which of two came first.

One rule for "a prior is an earlier study": the lookup's patient scope (:mod:`lookalike.index.search`) and the Key
Object Selection's check of its priors (:mod:`lookalike.dicom.kos`) both ask :func:`is_prior`.
"""

from __future__ import annotations

import re

#: A DICOM DA (YYYYMMDD); the ACR-NEMA form YYYY.MM.DD is read too.
_DATE = re.compile(r"\d{8}")
#: A DICOM TM: HH, HHMM or HHMMSS, then an optional fraction of up to six digits; the ACR-NEMA form HH:MM:SS too.
_TIME = re.compile(r"(\d{2}|\d{4}|\d{6})(?:\.(\d{1,6}))?")


def study_date_key(value: str | None) -> str | None:
    """A StudyDate as YYYYMMDD, comparable as text; None when it is empty or no date."""
    text = (value or "").strip().replace(".", "")
    return text if _DATE.fullmatch(text) else None


def study_time_key(value: str | None) -> str | None:
    """A StudyTime as HHMMSSffffff, comparable as text (HH and HHMM padded); None when it is empty or no time."""
    found = _TIME.fullmatch((value or "").strip().replace(":", ""))
    if found is None:
        return None
    return found.group(1).ljust(6, "0") + (found.group(2) or "").ljust(6, "0")


def is_prior(study_date: str | None, query_date: str | None, study_time: str | None = None,
             query_time: str | None = None) -> bool:
    """Whether a study of ``study_date`` (and ``study_time``) is a prior of the query study: strictly earlier.

    By StudyDate, then, on the same day, by StudyTime: a study of that day is a prior only when both times are
    known and it is the earlier one. Without both dates nothing can be called earlier, and neither can a study of
    the same day whose time (or the query's) is unknown.
    """
    date, query = study_date_key(study_date), study_date_key(query_date)
    if date is None or query is None:
        return False
    if date != query:
        return date < query
    time, query_clock = study_time_key(study_time), study_time_key(query_time)
    return time is not None and query_clock is not None and time < query_clock
