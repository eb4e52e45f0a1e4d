"""Why an instance could not be indexed, in words an administrator can act on.

Every error carries a stable short :attr:`LookalikeDicomError.code` that the worker stores in its catalogue, so
that refused instances can be counted and listed by cause without parsing messages. The messages name the
DICOM attribute or transfer syntax at fault.

The errors survive pickling with their attributes intact, because Celery carries exceptions from the worker
back to whoever waits on a task.
"""

from __future__ import annotations

from typing import ClassVar


class LookalikeDicomError(Exception):
    """Base class: an instance that Lookalike read but could not, or would not, turn into an image."""

    #: Stable short identifier recorded in the catalogue; subclasses override it.
    code: ClassVar[str] = "dicom-error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidDicomError(LookalikeDicomError):
    """The data is not a DICOM Part 10 file, is truncated, or is corrupt."""

    code: ClassVar[str] = "invalid-dicom"


class MissingPixelDataError(LookalikeDicomError):
    """The instance has no Pixel Data (7FE0,0010) to index."""

    code: ClassVar[str] = "no-pixel-data"


class UnsupportedTransferSyntaxError(LookalikeDicomError):
    """The pixel data is encoded in a way no installed decoder handles."""

    code: ClassVar[str] = "unsupported-transfer-syntax"


class ImageTooLargeError(LookalikeDicomError):
    """The image claims more pixels than the configured limit; refused before any decoding.

    Checked from Rows, Columns and Samples per Pixel alone, so that a crafted header (a "memory bomb") never
    makes the worker allocate.
    """

    code: ClassVar[str] = "image-too-large"

    def __init__(self, message: str, *, claimed_pixels: int = 0, max_pixels: int = 0) -> None:
        super().__init__(message)
        self.claimed_pixels = claimed_pixels
        self.max_pixels = max_pixels

    def __reduce__(self):
        return (_rebuild, (type(self), self.message, {"claimed_pixels": self.claimed_pixels,
                                                      "max_pixels": self.max_pixels}))


class InconsistentAttributesError(LookalikeDicomError):
    """The Image Pixel attributes contradict each other or the pixel data (e.g. too few bytes for Rows x Columns)."""

    code: ClassVar[str] = "inconsistent-attributes"


class NotIndexableError(LookalikeDicomError):
    """The instance is deliberately skipped: not an image Lookalike indexes.

    Examples are a modality other than US, DX or CR, a structured report, key object selection, presentation
    state or encapsulated document, or an X-ray image FOR PROCESSING. This is not a fault of the instance;
    :attr:`reason` says why it is skipped.
    """

    code: ClassVar[str] = "not-indexable"

    def __init__(self, reason: str) -> None:
        super().__init__(f"not indexed: {reason}")
        self.reason = reason

    def __reduce__(self):
        return (type(self), (self.reason,))


def _rebuild(cls: type[LookalikeDicomError], message: str, attrs: dict) -> LookalikeDicomError:
    """Unpickle an error whose constructor takes keyword arguments."""
    return cls(message, **attrs)


#: Every error class by its code, for the catalogue and for reports.
ERRORS_BY_CODE: dict[str, type[LookalikeDicomError]] = {
    cls.code: cls
    for cls in (
        LookalikeDicomError,
        InvalidDicomError,
        MissingPixelDataError,
        UnsupportedTransferSyntaxError,
        ImageTooLargeError,
        InconsistentAttributesError,
        NotIndexableError,
    )
}
