"""The :class:`Encoder` wrapper and :func:`load_encoder`; torch is imported only when a model is loaded."""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.encoders.lesion import finder_from_checkpoint, prepare_views
from lookalike.encoders.preprocessing import build_preprocess

#: Encoders the project ships, in the order the configuration names them.
ENCODER_NAMES: tuple[str, ...] = ("us", "xr")

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

_CACHE: dict[tuple[str, str, str], tuple[tuple[int, int], "Encoder"]] = {}
_LOCK = threading.Lock()


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Embedding:
    """What :meth:`Encoder.embed_with_boxes` gives: the vectors and, per image, the lesion box it used.

    ``boxes[i]`` is a :class:`lookalike.encoders.lesion.LesionBox` in image ``i``'s own pixels (the array handed
    to the encoder, e.g. the decoded frame after its imaging-region crop), or None: no lesion found, or an
    encoder without a lesion finder; the vector then comes from the whole image.
    """

    vectors: np.ndarray
    boxes: list[Any]


class Encoder:
    """A trained image encoder: grayscale images of any size -> L2-normalised float32 vectors.

    Parameters
    ----------
    name : str
        ``"us"`` or ``"xr"``.
    net : torch.nn.Module
        Network mapping (B, 1, S, S) in [0, 1] to (B, dim).
    image_size : int
        Side S that :func:`lookalike.encoders.preprocessing.build_preprocess` resizes to.
    dim : int
        Embedding size.
    model_version : str
        Architecture tag + first 8 hex digits of the weights' sha256; stored with every vector so that
        vectors of different weights are never mixed.
    batch_size : int
        Images per forward pass inside :meth:`embed`.
    center : sequence of float, optional
        Mean L2-normalised embedding of the training images (``arch["center"]``), subtracted before the final
        normalisation. Without it the vectors share a large common component and every cosine lies near 1;
        centred, a cosine says how alike two images are relative to the typical training image.
    views : sequence of str
        Input channels (:func:`lookalike.encoders.lesion.prepare_views`): ``("whole",)`` or
        ``("whole", "lesion")``.
    finder : lookalike.encoders.lesion.LesionFinder, optional
        Runs on every image inside :meth:`embed_with_boxes`, so the worker, ``lookalike embed`` and
        evaluation crop the lesion by one code path; required for the ``"lesion"`` view.
    lesion_margin : float
        Context around the lesion box, as a fraction of its size on each side.
    device : str
        Where the networks run (``"cpu"``, ``"cuda"``, ``"cuda:N"``); the caller has moved them there
        (:func:`load_encoder`). Preprocessing stays on the CPU; on a GPU the networks run under ``torch.autocast``
        (bfloat16, or float16 on a GPU without it; a batch that overflows is run again in float32), so their
        vectors differ from the CPU's by rounding; on the CPU in float32, what training evaluated.
    """

    def __init__(
        self,
        name: str,
        net: Any,
        image_size: int,
        dim: int,
        model_version: str,
        batch_size: int = 64,
        center: Sequence[float] | None = None,
        views: Sequence[str] = ("whole",),
        finder: Any = None,
        lesion_margin: float = 0.5,
        device: str = "cpu",
    ) -> None:
        self.name = name
        self.net = net.eval()
        self.image_size = int(image_size)
        self.dim = int(dim)
        self.model_version = model_version
        self.batch_size = int(batch_size)
        self.center = None if center is None else np.asarray(center, dtype=np.float32)
        self.views = tuple(views)
        self.finder = finder
        self.lesion_margin = float(lesion_margin)
        self.device = device
        #: Mixed precision on a GPU, decided once: bfloat16 where the GPU has it (float16's range can overflow in a
        #: VAE), else float16; None on the CPU.
        self._half = None
        if device.startswith("cuda"):
            import torch  # here, not above: torch only once a model is loaded (module docstring)

            self._half = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self._preprocess = build_preprocess(self.image_size)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Encoder(name={self.name!r}, dim={self.dim}, model_version={self.model_version!r}, device={self.device!r})"

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Embed grayscale images: :meth:`embed_with_boxes` without the boxes.

        Parameters
        ----------
        images : sequence of numpy.ndarray
            Each 2-D float grayscale in [0, 1] (values outside are clipped), any size and aspect.

        Returns
        -------
        numpy.ndarray
            float32 (n, dim), rows L2-normalised; the same input gives the same bits on the same machine.
        """
        return self.embed_with_boxes(images).vectors

    def embed_with_boxes(self, images: Sequence[np.ndarray]) -> Embedding:
        """Embed grayscale images and say which lesion box each vector was made from.

        The lesion finder (when the checkpoint has one) runs here, in batches of ``batch_size``, so that
        every caller gets the same crop for the same pixels.
        """
        import torch  # here, not above: torch only once a model is loaded (module docstring)

        if len(images) == 0:
            return Embedding(np.zeros((0, self.dim), dtype=np.float32), [])
        out, boxes = [], []
        with self._lock, torch.no_grad():
            self.net.eval()
            for i in range(0, len(images), self.batch_size):
                with self._autocast():
                    batch, found = prepare_views(
                        images[i : i + self.batch_size], self._preprocess, self.views, self.finder, self.lesion_margin
                    )
                    vectors = self._forward(batch)
                if self._half is not None and not np.isfinite(vectors).all():  # half precision overflowed: float32
                    vectors = self._forward(batch)
                out.append(vectors if self.center is None else centre_vectors(vectors, self.center))
                boxes += found
        return Embedding(np.ascontiguousarray(np.concatenate(out), dtype=np.float32), boxes)

    def _forward(self, batch: Any) -> np.ndarray:
        """L2-normalised float32 rows of the network's output for a CPU batch, computed on this encoder's device."""
        import torch.nn.functional as F  # here, not above: torch only once a model is loaded (module docstring)

        if self.device != "cpu":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        return F.normalize(self.net(batch).float(), dim=1).cpu().numpy()

    def _autocast(self) -> Any:
        """Mixed precision on a GPU (:attr:`_half`), none on the CPU."""
        import torch  # here, not above: torch only once a model is loaded (module docstring)

        return contextlib.nullcontext() if self._half is None else torch.autocast("cuda", dtype=self._half)


def centre_vectors(vectors: np.ndarray, center: np.ndarray) -> np.ndarray:
    """Rows of ``vectors`` minus ``center``, L2-normalised again: how a centred encoder's vectors are made."""
    v = np.asarray(vectors, dtype=np.float32) - center
    return (v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def build_net(arch: dict[str, Any]) -> Any:
    """Rebuild the network a checkpoint's ``arch`` describes."""
    if arch.get("name") == "us" and "base" in arch:
        from lookalike.encoders.fused import FusedUltrasoundNet  # brings torch: only once a model is loaded

        return FusedUltrasoundNet(arch)
    if arch.get("name") == "us":
        from lookalike.encoders.ultrasound import UltrasoundNet  # brings torch: only once a model is loaded

        return UltrasoundNet(arch)
    if arch.get("name") == "xr" and "base" in arch:
        from lookalike.encoders.fused import FusedXrayNet  # brings torch: only once a model is loaded

        return FusedXrayNet(arch)
    if arch.get("name") == "xr":
        from lookalike.encoders.xray import XrayNet  # brings torch: only once a model is loaded

        return XrayNet(arch)
    raise ValueError(f"unknown encoder architecture {arch.get('name')!r}")


def resolve_device(setting: str, process_index: int = 0) -> str:
    """The torch device a ``device`` setting names: ``cpu``, ``cuda``, ``cuda:N``, or ``auto``.

    ``auto`` is one GPU per worker process: the ``process_index``-th process of a pool takes GPU
    ``process_index % count`` (a worker started with ``--concurrency`` equal to the host's GPU count uses each
    once), or the CPU where torch sees no GPU. Asking torch how many GPUs there are initialises CUDA in this
    process: the worker calls this only in its pool processes, after the fork (see ``lookalike.worker.tasks``).

    Raises
    ------
    ValueError
        A setting of none of these forms, or a GPU this machine does not have.
    """
    import torch  # here, not above: torch only once a model is loaded (module docstring)

    if setting == "cpu":
        return "cpu"
    if setting == "auto":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return f"cuda:{process_index % count}" if count else "cpu"
    head, _, index = setting.partition(":")
    if head != "cuda" or (index and not index.isdigit()):
        raise ValueError(f"device must be cpu, cuda, cuda:N or auto, not {setting!r}")
    if not torch.cuda.is_available() or int(index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {setting!r}: torch sees {torch.cuda.device_count()} GPU(s) here")
    return setting


def _on_device(net: Any, device: str) -> Any:
    """``net`` on ``device``, taking CPU tensors and giving float32 CPU tensors back: for the lesion finder, whose
    code builds its batches on the CPU (one finder serves training, evaluation and the worker)."""
    import torch  # here, not above: torch only once a model is loaded (module docstring)

    class OnDevice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = net.to(device)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x.to(device, non_blocking=True)).float().cpu()

    return OnDevice().eval()


def load_encoder(name: str, weights: str | Path | None = None, device: str = "cpu") -> Encoder:
    """Load an encoder, cached per (name, path, device) in this process and reloaded if the file changes.

    Parameters
    ----------
    name : str
        One of :data:`ENCODER_NAMES`.
    weights : str or Path, optional
        Checkpoint written by :func:`lookalike.lab.train.train`; default the shipped
        ``weights/<name>.pt``.
    device : str
        A torch device (:func:`resolve_device` turns a setting into one); the networks are moved there.

    Returns
    -------
    Encoder

    Raises
    ------
    ValueError
        Unknown name, or a checkpoint trained for the other encoder.
    FileNotFoundError
        Missing weights file.
    """
    if name not in ENCODER_NAMES:
        raise ValueError(f"unknown encoder {name!r}; expected one of {ENCODER_NAMES}")
    path = Path(weights) if weights is not None else WEIGHTS_DIR / f"{name}.pt"
    path = path.expanduser().resolve()
    st = path.stat()
    stamp = (st.st_mtime_ns, st.st_size)
    key = (name, str(path), device)
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        import torch  # here, not above: torch only once a model is loaded (module docstring)

        sha = file_sha256(path)
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        arch = ckpt["arch"]
        finder = None
        if "lesion" in ckpt:
            finder = finder_from_checkpoint(ckpt)
            if device != "cpu":
                finder.net = _on_device(finder.net, device)
        if arch.get("name") != name:
            raise ValueError(f"{path} holds a {arch.get('name')!r} encoder, not {name!r}")
        net = build_net(arch)
        missing, unexpected = net.load_state_dict(ckpt["state_dict"], strict=False)
        allowed_missing = ("vae.decoder.", "vae.post_quant", "base.vae.decoder.", "base.vae.post_quant")
        bad = [k for k in missing if not k.startswith(allowed_missing)]
        if bad or unexpected:
            raise ValueError(f"{path}: state_dict does not match its arch (missing {bad[:5]}, unexpected {unexpected[:5]})")
        enc = Encoder(
            name, net.to(device), arch["image_size"], arch["dim"], f"{name}-{arch['tag']}-{sha[:8]}",
            center=arch.get("center"), views=arch.get("views", ("whole",)), finder=finder,
            lesion_margin=arch.get("lesion_margin", 0.5), device=device,
        )
        _CACHE[key] = (stamp, enc)
        return enc
