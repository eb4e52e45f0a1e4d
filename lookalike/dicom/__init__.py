"""Reading DICOM instances for Lookalike: parse, route to an encoder, decode to a grayscale image.

The Orthanc plugin imports this package, so it depends on pydicom and numpy only (never on torch).
"""

from lookalike.dicom.decode import DEFAULT_MAX_PIXELS, DecodedImage, decode_image, read_dataset
from lookalike.dicom.errors import (
    ERRORS_BY_CODE,
    ImageTooLargeError,
    InconsistentAttributesError,
    InvalidDicomError,
    LookalikeDicomError,
    MissingPixelDataError,
    NotIndexableError,
    UnsupportedTransferSyntaxError,
)
from lookalike.dicom.instance import PreparedInstance, prepare_instance
from lookalike.dicom.routing import encoder_for

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DecodedImage",
    "ERRORS_BY_CODE",
    "ImageTooLargeError",
    "InconsistentAttributesError",
    "InvalidDicomError",
    "LookalikeDicomError",
    "MissingPixelDataError",
    "NotIndexableError",
    "PreparedInstance",
    "UnsupportedTransferSyntaxError",
    "decode_image",
    "encoder_for",
    "prepare_instance",
    "read_dataset",
]
