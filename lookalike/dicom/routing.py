"""Which encoder an instance goes to, or why it is skipped.

Lookalike embeds ultrasound with one encoder and projection radiography (DX, CR) with another
(:data:`lookalike.config.ENCODER_FOR_MODALITY`). Everything else that reaches Orthanc (reports, key
object selections, presentation states, raw detector images FOR PROCESSING, other modalities) is skipped
with a :class:`~lookalike.dicom.errors.NotIndexableError` whose ``reason`` the catalogue keeps.
"""

from __future__ import annotations

import pydicom
from pydicom.uid import UID

from lookalike.config import ENCODER_FOR_MODALITY
from lookalike.dicom.errors import NotIndexableError

#: Modalities that never hold an image Lookalike could embed, whatever their SOP class claims.
NON_IMAGE_MODALITIES: frozenset[str] = frozenset({"SR", "KO", "PR", "DOC", "REG", "SEG", "RWV", "PLAN"})

#: Words in a SOP Class name (as pydicom spells it) that mark a non-image or not-for-display storage class.
_NON_IMAGE_SOP_CLASS_WORDS: tuple[str, ...] = (
    "SR Storage",  # Basic Text, Enhanced, Comprehensive, X-Ray Radiation Dose, ... SR
    "Key Object Selection",
    "Presentation State",
    "Encapsulated",
    "Raw Data",
    "Waveform",
    "Spectroscopy",
    "Segmentation",
    "Registration",
    "Real World Value Mapping",
    "Measurement Report",
)


def _sop_class_reason(sop_class_uid: str) -> str | None:
    """Return why the SOP Class is not indexable, or None when it may hold an indexable image."""
    uid = UID(sop_class_uid)
    name = uid.name if uid.name != str(uid) else ""
    if not name:
        return None
    if any(word in name for word in _NON_IMAGE_SOP_CLASS_WORDS):
        return f"SOP Class {name} ({uid}) is not an image"
    if "For Processing" in name:
        return f"SOP Class {name} ({uid}) holds raw detector data FOR PROCESSING, not an image for display"
    return None


def encoder_for(ds: pydicom.Dataset) -> str:
    """Return the name of the encoder ("us" or "xr") that embeds the image in `ds`.

    Only the header is read, so it is cheap to call before decoding and works on a dataset read with
    ``stop_before_pixels=True``.

    Parameters
    ----------
    ds
        The instance.

    Returns
    -------
    str
        A value of :data:`lookalike.config.ENCODER_FOR_MODALITY`.

    Raises
    ------
    NotIndexableError
        For a non-image SOP Class (SR, KO, PR, encapsulated document, ...), an image FOR PROCESSING
        (Presentation Intent Type or SOP Class), a missing Modality, or a modality Lookalike does not index.
    """
    sop_class_uid = str(ds.get("SOPClassUID", "") or "")
    if sop_class_uid:
        reason = _sop_class_reason(sop_class_uid)
        if reason is not None:
            raise NotIndexableError(reason)

    modality = str(ds.get("Modality", "") or "").strip().upper()
    if not modality:
        raise NotIndexableError("Modality (0008,0060) is missing or empty")
    if modality in NON_IMAGE_MODALITIES:
        raise NotIndexableError(f"Modality {modality} is not an image modality")

    intent = str(ds.get("PresentationIntentType", "") or "").strip().upper()
    if intent == "FOR PROCESSING":
        raise NotIndexableError(
            "Presentation Intent Type is FOR PROCESSING (raw detector data); only FOR PRESENTATION images are indexed"
        )

    try:
        return ENCODER_FOR_MODALITY[modality]
    except KeyError:
        indexed = ", ".join(sorted(ENCODER_FOR_MODALITY))
        raise NotIndexableError(f"Modality {modality} is not indexed (Lookalike indexes {indexed})") from None
