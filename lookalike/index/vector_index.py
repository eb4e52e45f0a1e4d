"""An exact in-memory FAISS index keyed by catalogue id, and the checks every stored vector passes.

:class:`VectorIndex` is the *tail* of a segmented index (:mod:`lookalike.index.segments`): the vectors changed
since the last save, a few hundred at most in a writer. Vectors are L2-normalised so that inner product is cosine
similarity; ``IndexIDMap2`` keys them by catalogue id so that an instance can be replaced or removed in place.
"""

from __future__ import annotations

import faiss
import numpy as np


def normalise(vectors: np.ndarray, dim: int | None = None) -> np.ndarray:
    """Check ``vectors`` (one, or one per row) and scale each to unit length; float32, C-contiguous, 2-D.

    Raises
    ------
    ValueError
        A vector that is not finite, is all zeros (no direction to compare), or is not ``dim`` long: such a vector
        would silently poison every search it takes part in.
    """
    array = np.asarray(vectors)
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise ValueError(f"vectors must be real numbers, got dtype {array.dtype}")
    array = array.astype(np.float64, copy=False)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] == 0:
        raise ValueError(f"vectors must be 1-D or 2-D and non-empty, got shape {np.shape(vectors)}")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"vectors have dimension {array.shape[1]}, the index expects {dim}")
    if not np.isfinite(array).all():
        raise ValueError("vectors contain NaN or infinite values")
    if (np.abs(array) > np.finfo(np.float32).max).any():
        raise ValueError("vectors hold values beyond float32's range")
    # In float64, where the squares of float32-range values cannot overflow.
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    if not (norms > 0).all():
        raise ValueError("a zero vector has no direction and cannot be compared by cosine")
    return np.ascontiguousarray(array / norms, dtype=np.float32)


def _ids_array(ids: np.ndarray | list[int]) -> np.ndarray:
    array = np.asarray(ids)
    if array.size == 0:
        return np.empty(0, dtype=np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"ids must be a 1-D array of integers, got shape {array.shape} dtype {array.dtype}")
    if (array < 0).any():
        raise ValueError("ids must be non-negative (FAISS uses -1 for 'no result')")
    return np.ascontiguousarray(array, dtype=np.int64)


class VectorIndex:
    """Exact cosine search over L2-normalised float32 vectors keyed by catalogue id.

    Not thread-safe for writes: the owner (:class:`~lookalike.index.store.IndexStore`) serialises access.
    """

    def __init__(self, dim: int) -> None:
        if dim <= 0:
            raise ValueError(f"dimension must be positive, got {dim}")
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(int(dim)))

    @property
    def dim(self) -> int:
        return int(self._index.d)

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def ids(self) -> np.ndarray:
        """The ids held, in storage order."""
        return faiss.vector_to_array(self._index.id_map).astype(np.int64)

    def vectors(self) -> np.ndarray:
        """The (unit) vectors held, in storage order (as :meth:`ids`); a copy."""
        inner = faiss.downcast_index(self._index.index)
        n, d = len(self), self.dim
        if n == 0:
            return np.empty((0, d), dtype=np.float32)
        return faiss.rev_swig_ptr(inner.get_xb(), n * d).reshape(n, d).copy()

    def add_or_replace(self, ids: np.ndarray | list[int], vectors: np.ndarray) -> None:
        """Add ``vectors`` under ``ids``; an id already present is replaced, so each id has one entry.

        Vectors are normalised here (see :func:`normalise`), and rejected with ValueError if unusable; nothing is
        changed when they are.
        """
        id_array = _ids_array(ids)
        if id_array.size == 0:
            return
        unit = normalise(vectors, self.dim)
        if unit.shape[0] != id_array.size:
            raise ValueError(f"{id_array.size} ids for {unit.shape[0]} vectors")
        if np.unique(id_array).size != id_array.size:
            raise ValueError("ids repeat within one call")
        self._index.remove_ids(id_array)
        self._index.add_with_ids(unit, id_array)

    def remove(self, ids: np.ndarray | list[int]) -> int:
        """Drop ``ids`` (absent ones are ignored); returns how many were removed."""
        id_array = _ids_array(ids)
        if id_array.size == 0:
            return 0
        return int(self._index.remove_ids(id_array))

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest ids by cosine for each query vector, best first.

        ``k`` is capped at the index size, so every returned id is real: arrays are ``(n_queries, min(k, len))``,
        scores float32 cosine similarities, ids int64.
        """
        unit = normalise(vectors, self.dim)
        k = min(int(k), len(self))
        if k <= 0:
            return np.empty((unit.shape[0], 0), dtype=np.float32), np.empty((unit.shape[0], 0), dtype=np.int64)
        scores, ids = self._index.search(unit, k)
        return scores, ids.astype(np.int64, copy=False)
