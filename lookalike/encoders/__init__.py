"""Image encoders for similar-case retrieval: ``us`` (breast ultrasound) and ``xr`` (chest X-ray).

Importing this package does not import torch; :func:`load_encoder` does, so processes that only need the
names (the Orthanc plugin) stay light.
"""

from lookalike.encoders.base import ENCODER_NAMES, Embedding, Encoder, load_encoder

__all__ = ["ENCODER_NAMES", "Embedding", "Encoder", "load_encoder"]
