"""Blob: the N-D array pair (data, diff) that flows between layers, as in Caffe."""
import numpy as np


class Blob:
    """A named-less holder of ``data`` and ``diff`` arrays of one shape.

    ``data`` is allocated on construction and on every reshape that changes the
    element count; ``diff`` is allocated lazily on first access (inference never
    touches it, so it costs no memory there).  Both share the blob's dtype,
    float32 unless asked otherwise (the gradient checker uses float64).

    Assigning ``blob.data = array`` replaces the array; its shape must equal the
    blob's shape (layers declare shapes in ``reshape`` and fill them in
    ``forward``).  pycaffe-style ``blob.data[...] = x`` writes in place.
    """

    __slots__ = ("_data", "_diff")

    def __init__(self, shape=(), dtype=np.float32):
        self._data = np.zeros(_as_shape(shape), dtype=dtype)
        self._diff = None

    # -- shape -----------------------------------------------------------------
    @property
    def shape(self):
        return self._data.shape

    @property
    def count(self):
        return self._data.size

    @property
    def num_axes(self):
        return self._data.ndim

    @property
    def dtype(self):
        return self._data.dtype

    def shape_at(self, axis):
        """Size of ``axis``; negative axes count from the end, as Caffe's shape(i)."""
        return self._data.shape[self.canonical_axis(axis)]

    def canonical_axis(self, axis):
        """Caffe's CanonicalAxisIndex: map a possibly negative axis into range, or raise."""
        n = self._data.ndim
        if not -n <= axis < max(n, 1):
            raise IndexError(f"axis {axis} out of range for a {n}-D blob of shape {self.shape}")
        return axis + n if axis < 0 else axis

    def count_range(self, start, end=None):
        """Product of the sizes of axes [start, end) (Caffe's count(start, end))."""
        dims = self._data.shape[start:end]
        return int(np.prod(dims, dtype=np.int64)) if dims else 1

    # legacy 4-D accessors (pycaffe keeps them)
    num = property(lambda self: self._legacy(0))
    channels = property(lambda self: self._legacy(1))
    height = property(lambda self: self._legacy(2))
    width = property(lambda self: self._legacy(3))

    def _legacy(self, i):
        if self._data.ndim > 4:
            raise ValueError(f"legacy accessor on a {self._data.ndim}-D blob")
        return self._data.shape[i] if i < self._data.ndim else 1

    def reshape(self, *shape):
        """Change the shape; keeps contents when the count is unchanged, else zero-fills."""
        if len(shape) == 1 and not isinstance(shape[0], (int, np.integer)):
            shape = shape[0]
        shape = _as_shape(shape)
        if shape == self._data.shape:
            return
        if int(np.prod(shape, dtype=np.int64)) == self._data.size:
            self._data = self._data.reshape(shape)
            if self._diff is not None:
                self._diff = self._diff.reshape(shape)
        else:
            self._data = np.zeros(shape, dtype=self._data.dtype)
            self._diff = None

    def reshape_like(self, other):
        self.reshape(other.shape)

    def set_dtype(self, dtype):
        """Convert data (and diff, if allocated) to ``dtype``."""
        self._data = self._data.astype(dtype, copy=False)
        if self._diff is not None:
            self._diff = self._diff.astype(dtype, copy=False)

    # -- arrays ----------------------------------------------------------------
    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, value):
        value = np.asarray(value, dtype=self._data.dtype)
        if value.shape != self._data.shape:
            raise ValueError(f"cannot assign an array of shape {value.shape} to a blob of shape {self._data.shape}")
        self._data = value

    @property
    def diff(self):
        if self._diff is None:
            self._diff = np.zeros(self._data.shape, dtype=self._data.dtype)
        return self._diff

    @diff.setter
    def diff(self, value):
        value = np.asarray(value, dtype=self._data.dtype)
        if value.shape != self._data.shape:
            raise ValueError(f"cannot assign a diff of shape {value.shape} to a blob of shape {self._data.shape}")
        self._diff = value

    @property
    def has_diff(self):
        return self._diff is not None

    def free_diff(self):
        """Drop the diff array (it is re-created, zeroed, on next access)."""
        self._diff = None

    def share_data(self, other):
        """Make this blob use ``other``'s data array (Caffe's ShareData)."""
        self._data = other._data

    def share_diff(self, other):
        self._diff = other.diff

    def __repr__(self):
        return f"Blob(shape={self.shape}, dtype={self.dtype})"


def _as_shape(shape):
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"negative dimension in blob shape {shape}")
    return shape
