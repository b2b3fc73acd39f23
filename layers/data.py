"""Caffe's data layers: Data, ImageData, HDF5Data, HDF5Output, MemoryData.

They take no bottoms (except HDF5Output) and have no backward.  Relative paths
in their parameters are opened relative to the current working directory, as
Caffe does (not relative to the prototxt).

Data and ImageData are *prefetching* layers (Caffe's
BasePrefetchingDataLayer): a background thread prepares up to
``data_param.prefetch`` batches (default 4) while the net computes; the order
of batches is the same as reading synchronously (``prefetch: 0`` here reads in
``forward``).  The thread stops when the layer is closed (``layer.close()``) or
garbage-collected.
"""
import functools
import queue
import threading
import weakref

import numpy as np

from framework import random as framework_random
from framework.db import DatabaseError, backend_name, open_db
from framework.errors import CaffeError, LayerError
from framework.layer import Layer, register_layer

from .data_transformer import DataTransformer, parse_datum, read_image

__all__ = ["DataLayer", "ImageDataLayer", "HDF5DataLayer", "HDF5OutputLayer", "MemoryDataLayer",
           "BatchPrefetcher"]


# -- prefetching ------------------------------------------------------------------
class _Failure:
    def __init__(self, exc):
        self.exc = exc


class BatchPrefetcher:
    """Runs ``load_batch()`` in a daemon thread, keeping up to ``depth`` batches ready.

    ``next()`` returns batches in production order (so the sequence equals
    calling ``load_batch()`` directly); an exception in the thread is re-raised
    by ``next()``.  ``stop()`` ends the thread (idempotent).
    ``load_batch`` must not hold a reference to the owning layer, so the layer
    can be garbage-collected (which stops the thread).
    """

    def __init__(self, load_batch, depth, name="prefetch"):
        self._load = load_batch
        self._queue = queue.Queue(maxsize=max(1, int(depth)))
        self._stop = threading.Event()
        self._failure = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                item = self._load()
            except BaseException as exc:  # handed to the consumer, never lost
                item = _Failure(exc)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue
            if isinstance(item, _Failure):
                return

    def next(self):
        """The next batch (blocks until the thread has one)."""
        if self._failure is not None:
            raise self._failure.exc
        if self._stop.is_set():
            raise CaffeError("the prefetch thread has been stopped")
        while True:
            try:
                item = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise CaffeError("the prefetch thread ended unexpectedly") from None
        if isinstance(item, _Failure):
            self._failure = item
            raise item.exc
        return item

    @property
    def alive(self):
        return self._thread.is_alive()

    def stop(self, timeout=10.0):
        """Ask the thread to finish its current batch and exit; wait for it."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)


def _reject_legacy_fields(layer, param, name):
    """Caffe ignores the old per-layer transform fields; we refuse them rather than ignore them."""
    for field in ("scale", "mean_file", "crop_size", "mirror", "force_encoded_color"):
        if field in param.DESCRIPTOR.fields_by_name and param.HasField(field):
            raise layer.error(f"{name}.{field} ({getattr(param, field)!r}) is a legacy field that Caffe "
                              "ignores in this layer format; set it in transform_param instead")


class BasePrefetchingDataLayer(Layer):
    """Shared plumbing of Data and ImageData (Caffe's BasePrefetchingDataLayer).

    Subclasses implement ``make_loader(top)`` returning an object whose
    ``load_batch()`` gives ``(data, labels or None)`` arrays and which holds no
    reference to the layer; this class shapes the tops, runs the prefetch
    thread, and copies batches into the tops in ``forward``.
    """

    exact_num_bottom_blobs = 0
    has_backward = False

    def setup(self, bottom, top):
        self.output_labels = len(top) > 1
        self.transformer = self._guard(lambda: DataTransformer(self.layer_param.transform_param, self.phase))
        self.loader = self.make_loader(top)
        depth = int(self.layer_param.data_param.prefetch)
        self.prefetcher = None
        if depth > 0:
            self.prefetcher = BatchPrefetcher(self.loader.load_batch, depth, name=f"prefetch-{self.name}")
            self._finalizer = weakref.finalize(self, self.prefetcher.stop)

    def error_factory(self):
        """A function making this layer's LayerError that holds no reference to the layer (for loaders)."""
        return functools.partial(LayerError, self.name, self.type)

    def _guard(self, fn):
        try:
            return fn()
        except LayerError:
            raise
        except CaffeError as e:
            raise self.error(str(e)) from None

    def reshape(self, bottom, top):
        """Tops are shaped in setup and by each batch in forward (Caffe's BaseDataLayer::Reshape is empty)."""

    def next_batch(self):
        """The next ``(data, labels)`` batch, from the prefetch thread or read now."""
        if self.prefetcher is not None:
            return self._guard(self.prefetcher.next)
        return self._guard(self.loader.load_batch)

    def forward(self, bottom, top):
        data, labels = self.next_batch()
        top[0].reshape(data.shape)
        np.copyto(top[0].data, data, casting="unsafe")
        if self.output_labels:
            top[1].reshape(labels.shape)
            np.copyto(top[1].data, labels, casting="unsafe")

    def backward(self, top, propagate_down, bottom):
        """Data layers have no backward."""

    def close(self):
        """Stop the prefetch thread (also done when the layer is garbage-collected)."""
        if self.prefetcher is not None:
            self.prefetcher.stop()


def _positive(layer, param_name, value):
    if value <= 0:
        raise layer.error(f"{param_name} must be positive, got {value}")
    return int(value)


# -- Data --------------------------------------------------------------------------
class _DatumLoader:
    """Reads ``batch_size`` Datums per batch from a database cursor (wrapping) and transforms them."""

    def __init__(self, cursor, transformer, batch_size, output_labels, dtype, fail, source):
        self.cursor = cursor
        self.transformer = transformer
        self.batch_size = batch_size
        self.output_labels = output_labels
        self.dtype = dtype
        self.fail = fail
        self.source = source

    def load_batch(self):
        values = self.cursor.read(self.batch_size)
        where = f"record of '{self.source}'"
        datums = [parse_datum(v, where) for v in values]
        try:
            data = self.transformer.transform_datums(datums, dtype=self.dtype)
        except CaffeError as e:
            raise self.fail(f"reading '{self.source}': {e}") from None
        labels = None
        if self.output_labels:
            labels = np.fromiter((d.label for d in datums), dtype=self.dtype, count=len(datums))
        return data, labels


@register_layer("Data")
class DataLayer(BasePrefetchingDataLayer):
    """Reads ``Datum`` records from an LMDB or LevelDB database (Caffe's DataLayer).

    data_param: source (database path), batch_size, backend (LEVELDB by
    default, as caffe.proto; LMDB must be asked for), rand_skip (skip a random
    number in [0, rand_skip) of records at start; default 0), prefetch (batches
    read ahead, default 4; 0 reads synchronously).
    transform_param: see ``DataTransformer``.
    Tops: data ``(batch_size, C, h, w)`` (shape from the first record) and,
    with two tops, label ``(batch_size,)``.  Records are read in key order and
    the reader wraps around at the end.
    """

    min_top_blobs = 1
    max_top_blobs = 2

    def make_loader(self, top):
        p = self.layer_param.data_param
        _reject_legacy_fields(self, p, "data_param")
        batch_size = _positive(self, "data_param.batch_size", p.batch_size)
        if not p.source:
            raise self.error("data_param.source is not set")
        try:
            self.db = open_db(p.source, backend_name(p.backend), "read")
        except DatabaseError as e:
            raise self.error(f"data_param.source: {e}") from None
        cursor = self.db.cursor(wrap=True)
        if not cursor.valid:
            raise self.error(f"database '{p.source}' is empty")
        first = self._guard(lambda: parse_datum(cursor.value, f"first record of '{p.source}'"))
        c, h, w = self._guard(lambda: self.transformer.decode([first], where=f"first record of '{p.source}'")
                              ).shape[1:]
        shape = self._guard(lambda: self.transformer.output_shape(c, h, w))
        top[0].reshape((batch_size,) + tuple(shape))
        if self.output_labels:
            top[1].reshape((batch_size,))
        if p.rand_skip:
            skip = int(framework_random.rng().integers(p.rand_skip))
            for _ in range(skip):
                cursor.next()
        return _DatumLoader(cursor, self.transformer, batch_size, self.output_labels, top[0].dtype,
                            self.error_factory(), p.source)


# -- ImageData ---------------------------------------------------------------------
def read_image_list(source, fail):
    """Parse an image list: one ``path label`` per line (split at the last space)."""
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise fail(f"cannot open source '{source}': {e.strerror}") from None
    lines = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        path, sep, label = line.rstrip("\r").rpartition(" ")
        try:
            value = int(label)
        except ValueError:
            value = None
        if not sep or not path or value is None:
            raise fail(f"line {number} of source '{source}' is not 'path label': {line!r}")
        lines.append((path, value))
    if not lines:
        raise fail(f"source '{source}' lists no images")
    return lines


class _ImageLoader:
    """Reads, resizes and transforms ``batch_size`` listed images per batch."""

    def __init__(self, lines, position, root, new_height, new_width, is_color, shuffle, rng,
                 transformer, batch_size, dtype, fail):
        self.lines = lines
        self.position = position
        self.root = root
        self.size = (new_height, new_width)
        self.is_color = is_color
        self.shuffle = shuffle
        self.rng = rng
        self.transformer = transformer
        self.batch_size = batch_size
        self.dtype = dtype
        self.fail = fail

    def read(self, index):
        path = self.root + self.lines[index][0]  # image_data_layer.cpp: root_folder + path
        try:
            return read_image(path, self.size[0], self.size[1], self.is_color)
        except CaffeError as e:
            raise self.fail(str(e)) from None

    def load_batch(self):
        images, labels, paths = [], [], []
        for _ in range(self.batch_size):
            images.append(self.read(self.position))
            paths.append(self.root + self.lines[self.position][0])
            labels.append(self.lines[self.position][1])
            self.position += 1
            if self.position >= len(self.lines):
                # image_data_layer.cpp: restart from the first image, reshuffling if asked.
                self.position = 0
                if self.shuffle:
                    self.rng.shuffle(self.lines)
        for img, path in zip(images, paths):
            if img.shape != images[0].shape:
                raise self.fail(f"image '{path}' is {img.shape[0]} x {img.shape[1]} x {img.shape[2]} but "
                                f"'{paths[0]}' in the same batch is {images[0].shape[0]} x "
                                f"{images[0].shape[1]} x {images[0].shape[2]} (set new_height/new_width)")
        batch = np.stack(images).transpose(0, 3, 1, 2)
        try:
            data = self.transformer.transform(batch, dtype=self.dtype)
        except CaffeError as e:
            raise self.fail(str(e)) from None
        return data, np.asarray(labels, dtype=self.dtype)


@register_layer("ImageData")
class ImageDataLayer(BasePrefetchingDataLayer):
    """Reads images listed in a text file (Caffe's ImageDataLayer).

    image_data_param: source (text file, one ``path label`` per line), root_folder
    (prefixed to each path by plain concatenation, as Caffe: end it with '/'),
    batch_size (default 1), shuffle (default false; reshuffled every epoch),
    new_height/new_width (resize, both or neither; default 0 = keep), is_color
    (default true: 3-channel BGR; false: gray), rand_skip (default 0).
    Tops: data ``(batch_size, C, h, w)`` and label ``(batch_size,)``.
    Prefetching depth comes from data_param.prefetch (default 4), as in Caffe.
    """

    exact_num_top_blobs = 2

    def make_loader(self, top):
        p = self.layer_param.image_data_param
        _reject_legacy_fields(self, p, "image_data_param")
        batch_size = _positive(self, "image_data_param.batch_size", p.batch_size)
        new_height, new_width = int(p.new_height), int(p.new_width)
        if (new_height == 0) != (new_width == 0):
            raise self.error(f"new_height ({new_height}) and new_width ({new_width}) must be set together")
        if not p.source:
            raise self.error("image_data_param.source is not set")
        lines = read_image_list(p.source, self.error)
        rng = None
        if p.shuffle:
            # image_data_layer.cpp: a private generator seeded from Caffe's RNG.
            rng = np.random.default_rng(int(framework_random.rng().integers(2 ** 63)))
            rng.shuffle(lines)
        position = 0
        if p.rand_skip:
            skip = int(framework_random.rng().integers(p.rand_skip))
            if skip >= len(lines):
                raise self.error(f"not enough images in '{p.source}' to skip {skip} (rand_skip {p.rand_skip})")
            position = skip
        loader = _ImageLoader(lines, position, p.root_folder, new_height, new_width, p.is_color,
                              p.shuffle, rng, self.transformer, batch_size, top[0].dtype, self.error_factory())
        first = loader.read(position)
        shape = self._guard(lambda: self.transformer.output_shape(first.shape[2], first.shape[0], first.shape[1]))
        top[0].reshape((batch_size,) + tuple(shape))
        top[1].reshape((batch_size,))
        return loader


# -- HDF5 -------------------------------------------------------------------------
def _import_h5py(layer):
    try:
        import h5py
    except ImportError:
        raise layer.error("HDF5 layers need the 'h5py' package: pip install h5py") from None
    return h5py


@register_layer("HDF5Data")
class HDF5DataLayer(Layer):
    """Reads datasets from HDF5 files (Caffe's HDF5DataLayer; no prefetching, as Caffe).

    hdf5_data_param: source (text file listing .h5 paths, whitespace separated),
    batch_size, shuffle (default false: shuffles the file order and the rows of
    each file, again at every pass).
    Each top is filled from the dataset of the same name; top shape is
    ``(batch_size,) + dataset.shape[1:]``.  All datasets of a file must have the
    same number of rows.  transform_param is not allowed (HDF5 data is generic).
    """

    exact_num_bottom_blobs = 0
    min_top_blobs = 1
    has_backward = False

    def setup(self, bottom, top):
        self.h5py = _import_h5py(self)
        if self.layer_param.HasField("transform_param"):
            raise self.error("HDF5Data does not transform data (remove transform_param)")
        p = self.layer_param.hdf5_data_param
        self.batch_size = _positive(self, "hdf5_data_param.batch_size", p.batch_size)
        self.shuffle = bool(p.shuffle)
        self.names = list(self.layer_param.top)
        if len(self.names) != len(top):
            raise self.error(f"{len(top)} top blobs but {len(self.names)} top names in the layer definition")
        try:
            with open(p.source, encoding="utf-8") as f:
                self.files = f.read().split()
        except OSError as e:
            raise self.error(f"failed to open source file '{p.source}': {e.strerror}") from None
        if not self.files:
            raise self.error(f"must have at least 1 HDF5 filename listed in '{p.source}'")
        self.file_order = np.arange(len(self.files))
        if self.shuffle:
            framework_random.rng().shuffle(self.file_order)
        self.current_file = 0
        self.row_shapes = None
        self._load(self.files[self.file_order[0]], top[0].dtype)
        self.row_shapes = [a.shape[1:] for a in self.arrays]
        for t, a in zip(top, self.arrays):
            t.reshape((self.batch_size,) + a.shape[1:])

    def _load(self, path, dtype):
        try:
            f = self.h5py.File(path, "r")
        except (OSError, IOError) as e:
            raise self.error(f"failed opening HDF5 file '{path}': {e}") from None
        arrays = []
        with f:
            for name in self.names:
                if name not in f:
                    raise self.error(f"HDF5 file '{path}' has no dataset '{name}' (top blob names must "
                                     f"match dataset names; the file has {sorted(f.keys())})")
                ds = f[name]
                if ds.dtype.kind not in "fiub" or ds.ndim < 1:
                    raise self.error(f"dataset '{name}' in '{path}' must be a numeric array with at least "
                                     f"one axis (got dtype {ds.dtype}, shape {ds.shape})")
                arrays.append(np.asarray(ds[...], dtype=dtype))
        rows = arrays[0].shape[0]
        for name, a in zip(self.names, arrays):
            if a.shape[0] != rows:
                raise self.error(f"datasets in '{path}' have different numbers of rows: "
                                 f"'{self.names[0]}' has {rows}, '{name}' has {a.shape[0]}")
            if self.row_shapes is not None:
                expected = self.row_shapes[self.names.index(name)]
                if a.shape[1:] != expected:
                    raise self.error(f"dataset '{name}' in '{path}' has rows of shape {a.shape[1:]}, but "
                                     f"the first file's rows have shape {expected}")
        if rows == 0:
            raise self.error(f"HDF5 file '{path}' has no rows")
        self.arrays = arrays
        self.rows = rows
        self.permutation = np.arange(rows)
        if self.shuffle:
            framework_random.rng().shuffle(self.permutation)
        self.current_row = 0

    def reshape(self, bottom, top):
        for t, a in zip(top, self.arrays):
            t.reshape((self.batch_size,) + a.shape[1:])

    def forward(self, bottom, top):
        filled = 0
        while filled < self.batch_size:
            k = min(self.batch_size - filled, self.rows - self.current_row)
            rows = self.permutation[self.current_row:self.current_row + k]
            for t, a in zip(top, self.arrays):
                t.data[filled:filled + k] = a[rows] if self.shuffle else a[self.current_row:self.current_row + k]
            filled += k
            self.current_row += k
            if self.current_row == self.rows:
                self._next_pass(top[0].dtype)

    def _next_pass(self, dtype):
        """hdf5_data_layer.cpp Next(): move to the next file (reshuffling at the wrap) and reshuffle rows."""
        if len(self.files) > 1:
            self.current_file += 1
            if self.current_file == len(self.files):
                self.current_file = 0
                if self.shuffle:
                    framework_random.rng().shuffle(self.file_order)
            self._load(self.files[self.file_order[self.current_file]], dtype)
        else:
            self.current_row = 0
            if self.shuffle:
                framework_random.rng().shuffle(self.permutation)

    def backward(self, top, propagate_down, bottom):
        """No backward."""


@register_layer("HDF5Output")
class HDF5OutputLayer(Layer):
    """Writes its two bottoms to an HDF5 file as datasets "data" and "label" (Caffe's HDF5OutputLayer).

    hdf5_output_param: file_name (created, truncated, at setup).  Each dataset
    has the blob's legacy 4-D shape (num, channels, height, width) in the
    bottoms' dtype.  As in Caffe, a file takes one batch: a second forward
    raises (Caffe fails creating the datasets again).
    """

    exact_num_bottom_blobs = 2
    exact_num_top_blobs = 0
    has_backward = False

    def setup(self, bottom, top):
        self.h5py = _import_h5py(self)
        self.file_name = self.layer_param.hdf5_output_param.file_name
        if not self.file_name:
            raise self.error("hdf5_output_param.file_name is not set")
        try:
            self.h5py.File(self.file_name, "w").close()
        except OSError as e:
            raise self.error(f"failed to open HDF5 file '{self.file_name}' for writing: {e}") from None
        self.written = False

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        data, label = bottom
        if data.num != label.num:
            raise self.error(f"data blob and label blob must have the same batch size "
                             f"({data.num} vs {label.num})")
        if self.written:
            raise self.error(f"HDF5 file '{self.file_name}' already holds datasets 'data' and 'label' "
                             "(Caffe's HDF5Output writes one batch per file)")
        with self.h5py.File(self.file_name, "r+") as f:
            for name, blob in (("data", data), ("label", label)):
                legacy = (blob.num, blob.channels, blob.height, blob.width)
                f.create_dataset(name, data=blob.data.reshape(legacy))
        self.written = True

    def backward(self, top, propagate_down, bottom):
        """No backward (Caffe's Backward_cpu does nothing)."""


# -- MemoryData --------------------------------------------------------------------
@register_layer("MemoryData")
class MemoryDataLayer(Layer):
    """Serves batches from arrays given through Python (Caffe's MemoryDataLayer).

    memory_data_param: batch_size, channels, height, width (all required, > 0).
    Tops: data ``(batch_size, channels, height, width)`` and labels: shape
    ``(batch_size,)`` after setup and ``(batch_size, 1, 1, 1)`` after a forward,
    as in Caffe.  ``set_input_arrays(data, labels)`` (pycaffe) or
    ``reset(data, labels, n)`` supply ``n`` items (a multiple of batch_size);
    forward walks through them batch by batch, wrapping around.  Arrays given
    this way are not transformed (Caffe warns about transform_param);
    ``add_datum_vector(datums)`` is transformed.
    """

    exact_num_bottom_blobs = 0
    exact_num_top_blobs = 2
    has_backward = False

    def setup(self, bottom, top):
        p = self.layer_param.memory_data_param
        self.batch_size, self.channels, self.height, self.width = (
            int(p.batch_size), int(p.channels), int(p.height), int(p.width))
        if min(self.batch_size, self.channels, self.height, self.width) <= 0:
            raise self.error("batch_size, channels, height, and width must be specified and positive in "
                             f"memory_data_param (got {self.batch_size}, {self.channels}, {self.height}, "
                             f"{self.width})")
        self.dtype = top[0].dtype
        self.transformer = None
        if self.layer_param.HasField("transform_param"):
            try:
                self.transformer = DataTransformer(self.layer_param.transform_param, self.phase)
            except CaffeError as e:
                raise self.error(str(e)) from None
        self._data = self._labels = None
        self.n = 0
        self.pos = 0
        self.has_new_data = False
        top[0].reshape(self.batch_size, self.channels, self.height, self.width)
        top[1].reshape(self.batch_size)

    def set_input_arrays(self, data, labels):
        """pycaffe's set_input_arrays: data ``(n, C, H, W)``, labels ``(n,)`` or ``(n, 1, 1, 1)``."""
        data = np.asarray(data)
        labels = np.asarray(labels)
        if labels.ndim == 1:
            labels = labels[:, None, None, None]
        expected = (self.channels, self.height, self.width)
        if data.ndim != 4 or data.shape[1:] != expected:
            raise self.error(f"data array must have shape (n, {expected[0]}, {expected[1]}, {expected[2]}), "
                             f"got {data.shape}")
        if labels.ndim != 4 or labels.shape[1:] != (1, 1, 1):
            raise self.error(f"labels array must have shape (n,) or (n, 1, 1, 1), got {labels.shape}")
        if data.shape[0] != labels.shape[0]:
            raise self.error(f"data and labels must have the same first dimension "
                             f"({data.shape[0]} vs {labels.shape[0]})")
        self.reset(data, labels, data.shape[0])

    def reset(self, data, labels, n):
        """Use the first ``n`` items of ``data`` / ``labels`` (Caffe's Reset)."""
        n = int(n)
        if n <= 0 or n % self.batch_size:
            raise self.error(f"the number of items ({n}) must be a positive multiple of the batch size "
                             f"({self.batch_size})")
        size = self.channels * self.height * self.width
        data = np.asarray(data, dtype=self.dtype).reshape(-1, size)
        labels = np.asarray(labels, dtype=self.dtype).reshape(-1)
        if data.shape[0] < n or labels.shape[0] < n:
            raise self.error(f"reset with n = {n} but only {data.shape[0]} data items and "
                             f"{labels.shape[0]} labels were given")
        # Copies: the layer never depends on the caller keeping (or not changing) its arrays.
        self._data = data[:n].reshape(n, self.channels, self.height, self.width).copy()
        self._labels = labels[:n].copy()
        self.n = n
        self.pos = 0

    def add_datum_vector(self, datums):
        """Transform a list of Datums (a multiple of batch_size) and serve them (AddDatumVector)."""
        if self.has_new_data:
            raise self.error("can't add data until the current data has been consumed")
        if not datums or len(datums) % self.batch_size:
            raise self.error(f"the number of added Datums ({len(datums)}) must be a positive multiple of "
                             f"the batch size ({self.batch_size})")
        transformer = self.transformer or DataTransformer(self.layer_param.transform_param, self.phase)
        try:
            data = transformer.transform_datums(list(datums), dtype=self.dtype)
        except CaffeError as e:
            raise self.error(str(e)) from None
        if data.shape[1:] != (self.channels, self.height, self.width):
            raise self.error(f"added Datums give items of shape {data.shape[1:]}, but memory_data_param "
                             f"declares {(self.channels, self.height, self.width)}")
        self.reset(data, [d.label for d in datums], len(datums))
        self.has_new_data = True

    def set_batch_size(self, batch_size):
        """Change the batch size (Caffe's set_batch_size); not while added data is unconsumed."""
        if self.has_new_data:
            raise self.error("can't change batch_size until the current data has been consumed")
        if batch_size <= 0:
            raise self.error(f"batch_size must be positive, got {batch_size}")
        self.batch_size = int(batch_size)

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        if self._data is None:
            raise self.error("MemoryData needs to be given data first: call set_input_arrays(data, labels)")
        b = self.batch_size
        if self.pos + b > self.n:
            raise self.error(f"batch_size {b} does not divide the {self.n} items given")
        top[0].reshape(b, self.channels, self.height, self.width)
        top[1].reshape(b, 1, 1, 1)  # memory_data_layer.cpp reshapes labels to 4-D in forward
        top[0].data[...] = self._data[self.pos:self.pos + b]
        top[1].data[...] = self._labels[self.pos:self.pos + b].reshape(b, 1, 1, 1)
        self.pos = (self.pos + b) % self.n
        if self.pos == 0:
            self.has_new_data = False

    def backward(self, top, propagate_down, bottom):
        """No backward."""
