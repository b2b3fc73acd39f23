"""Caffe's DataTransformer (``data_transformer.cpp``) and the image/Datum helpers it needs.

A transform maps a batch of images ``x`` of shape ``(N, C, H, W)`` (uint8 or
float) to ``(N, C, h, w)`` in the net's dtype:

    y = (crop(x) - mean) * scale,   then mirrored left-right per item

- ``crop_size`` (default 0 = none): a ``crop_size``×``crop_size`` window, at a
  random offset per item in TRAIN and at the centre ``((H - crop) // 2,
  (W - crop) // 2)`` otherwise;
- ``mirror`` (default false): each item is flipped with probability 1/2, in
  every phase (Caffe does not disable it in TEST);
- ``mean_file``: a full-size ``BlobProto`` (C×H×W of the *uncropped* image),
  read at the item's crop offset; ``mean_value``: one value for all channels or
  one per channel; giving both is an error;
- ``scale`` (default 1) multiplies after the mean subtraction;
- ``force_color`` / ``force_gray`` decode encoded (JPEG/PNG) Datums as 3-channel
  BGR / 1-channel gray (only one of them may be set).

Arithmetic follows Caffe exactly: ``(float(pixel) - mean) * scale`` in the
output dtype.  Random draws come from a generator seeded once from the
framework's global generator (Caffe's ``InitRand``), only when the transform is
random, so ``framework.set_random_seed`` makes it reproducible.

Images follow Caffe/OpenCV conventions: decoded colour images are BGR, stored
channel-major (C×H×W) in Datums and blobs.  Decoding uses Pillow (which yields
RGB, so channels are reversed here); resizing reimplements OpenCV's
``INTER_LINEAR`` fixed-point arithmetic in NumPy.
"""
import io
import warnings

import numpy as np

from framework import random as framework_random
from framework.errors import CaffeError
from framework.layer import blob_from_proto

TRAIN, TEST = 0, 1  # caffe.proto Phase


# -- images ----------------------------------------------------------------------
def _import_pillow():
    try:
        from PIL import Image
    except ImportError:
        raise CaffeError("reading images needs the 'Pillow' package: pip install Pillow") from None
    return Image


def decode_image(data, color=None, name="image"):
    """Decode JPEG/PNG/... bytes to an ``(H, W, C)`` uint8 array in BGR order.

    color -- None: keep the file's own kind (gray stays 1 channel, colour becomes
             3-channel BGR; OpenCV's IMREAD_ANYCOLOR); True: always 3 channels
             (gray is replicated); False: 1 channel (colour converted to gray).
    Raises CaffeError naming ``name`` if the bytes are not a readable image.
    """
    Image = _import_pillow()
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # Pillow raises several types for bad data
        raise CaffeError(f"could not decode {name}: {e}") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit gray: OpenCV (without IMREAD_ANYDEPTH) keeps the high byte.
        arr = np.asarray(img, dtype=np.uint32) >> 8
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
    native_gray = img.mode in ("1", "L", "LA", "La")
    gray = native_gray if color is None else not color
    if gray:
        arr = np.asarray(img.convert("L"))[:, :, None]
    else:
        # RGB -> BGR (Caffe images are in OpenCV's channel order); alpha is dropped.
        arr = np.asarray(img.convert("RGB"))[:, :, ::-1]
    return np.ascontiguousarray(arr)


def read_image(path, height=0, width=0, is_color=True):
    """Read an image file as OpenCV's imread would (``io.cpp``: ReadImageToCVMat).

    Returns ``(H, W, C)`` uint8 BGR (C = 3) or gray (C = 1); resized to
    ``height``×``width`` with bilinear interpolation when both are > 0.
    Raises CaffeError naming the path if it cannot be read.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CaffeError(f"could not open or find image file '{path}': {e.strerror}") from None
    img = decode_image(data, color=bool(is_color), name=f"image file '{path}'")
    if height > 0 and width > 0:
        img = resize_linear(img, height, width)
    return img


def _linear_coefficients(src, dst):
    """Source indices and 11-bit fixed-point weights of OpenCV's INTER_LINEAR (resize.cpp)."""
    d = np.arange(dst)
    f = ((d + 0.5) * (src / dst) - 0.5).astype(np.float32)
    i0 = np.floor(f).astype(np.int64)
    f = (f - i0).astype(np.float32)
    low, high = i0 < 0, i0 >= src - 1
    f[low | high] = 0
    i0[low] = 0
    i0[high] = src - 1
    w1 = np.rint(f * np.float32(2048)).astype(np.int64)
    w0 = np.rint((np.float32(1) - f) * np.float32(2048)).astype(np.int64)
    return i0, np.minimum(i0 + 1, src - 1), w0, w1


def resize_linear(img, height, width):
    """Resize an ``(H, W, C)`` uint8 image like OpenCV's ``cv::resize(..., INTER_LINEAR)``.

    Half-pixel centres, edge clamping, 11-bit fixed-point weights, and OpenCV's
    switch to area averaging for an exact 2× reduction.  Matches OpenCV's
    vectorised path exactly inside the image; rows whose source is clamped at an
    edge may differ by one grey level.
    """
    img = np.asarray(img)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.dtype != np.uint8:
        raise CaffeError(f"resize_linear expects uint8 pixels, got {img.dtype}")
    H, W, C = img.shape
    if (H, W) == (height, width):
        return img.copy()
    if H == 2 * height and W == 2 * width:
        # resize.cpp: INTER_LINEAR with an exact 2x reduction is done as INTER_AREA.
        s = img.reshape(height, 2, width, 2, C).astype(np.int32).sum(axis=(1, 3))
        return ((s + 2) >> 2).astype(np.uint8)
    y0, y1, b0, b1 = _linear_coefficients(H, height)
    x0, x1, a0, a1 = _linear_coefficients(W, width)
    src = img.astype(np.int64)
    rows = src[:, x0] * a0[None, :, None] + src[:, x1] * a1[None, :, None]  # (H, width, C)
    # Vertical pass as OpenCV's SIMD code: (((r >> 4) * b) >> 16) summed, then (+2) >> 2.
    out = ((((rows[y0] >> 4) * b0[:, None, None]) >> 16)
           + (((rows[y1] >> 4) * b1[:, None, None]) >> 16) + 2) >> 2
    return np.clip(out, 0, 255).astype(np.uint8)


# -- Datums ----------------------------------------------------------------------
def _caffe_pb2():
    from proto import caffe_pb2
    return caffe_pb2


def parse_datum(value, where="database record"):
    """Parse serialized bytes into a ``Datum`` (CaffeError naming ``where`` if malformed)."""
    datum = _caffe_pb2().Datum()
    try:
        datum.ParseFromString(value)
    except Exception as e:
        raise CaffeError(f"{where} is not a serialized Datum: {e}") from None
    return datum


def datum_to_array(datum, force_color=False, force_gray=False, where="Datum"):
    """The Datum's image as a ``(C, H, W)`` array.

    Raw ``data`` bytes give uint8; ``float_data`` gives float32; an ``encoded``
    Datum is decoded (BGR; force_color / force_gray choose 3 / 1 channels,
    otherwise the file's own kind).
    """
    if force_color and force_gray:
        raise CaffeError("cannot set both force_color and force_gray")
    if datum.encoded:
        color = True if force_color else (False if force_gray else None)
        return decode_image(datum.data, color=color, name=f"encoded {where}").transpose(2, 0, 1)
    c, h, w = datum.channels, datum.height, datum.width
    if c <= 0:
        raise CaffeError(f"{where} has channels = {c} (must be > 0)")
    n = c * h * w
    if datum.data:
        if len(datum.data) != n:
            raise CaffeError(f"{where} holds {len(datum.data)} bytes but channels x height x width "
                             f"= {c} x {h} x {w} = {n}")
        return np.frombuffer(datum.data, dtype=np.uint8).reshape(c, h, w)
    if len(datum.float_data) != n:
        raise CaffeError(f"{where} holds {len(datum.float_data)} float values but channels x height x "
                         f"width = {c} x {h} x {w} = {n}")
    return np.asarray(datum.float_data, dtype=np.float32).reshape(c, h, w)


def datums_to_array(datums, force_color=False, force_gray=False, where="Datum"):
    """Stack Datums into ``(N, C, H, W)`` (uint8 when all are raw bytes); all must share a shape."""
    if not datums:
        raise CaffeError("there is no Datum to convert")
    first = datums[0]
    if not first.encoded and first.data:
        size = len(first.data)
        if all(not d.encoded and len(d.data) == size and d.channels == first.channels
               and d.height == first.height and d.width == first.width for d in datums):
            # Fast path: one join and one view for a batch of raw uint8 records.
            shape = datum_to_array(first, where=f"{where} 0").shape
            joined = b"".join(d.data for d in datums)
            return np.frombuffer(joined, dtype=np.uint8).reshape((len(datums),) + shape)
    arrays = [datum_to_array(d, force_color, force_gray, where=f"{where} {i}") for i, d in enumerate(datums)]
    for i, a in enumerate(arrays):
        if a.shape != arrays[0].shape:
            raise CaffeError(f"{where} {i} has shape {a.shape} but {where} 0 of the same batch has "
                             f"{arrays[0].shape}; all items of a batch must have one shape")
    dtype = np.uint8 if all(a.dtype == np.uint8 for a in arrays) else np.float32
    return np.stack(arrays).astype(dtype, copy=False)


def array_to_datum(array, label=None, encoded_false=False):
    """A raw ``Datum`` from a ``(C, H, W)`` array: uint8 -> ``data`` bytes, else ``float_data``.

    ``encoded_false`` stores ``encoded: false`` explicitly (Caffe's CVMatToDatum
    does; convert_mnist_data does not), which changes the serialized bytes.
    """
    array = np.asarray(array)
    if array.ndim != 3:
        raise CaffeError(f"a Datum holds a C x H x W array, got shape {array.shape}")
    datum = _caffe_pb2().Datum()
    datum.channels, datum.height, datum.width = (int(d) for d in array.shape)
    if array.dtype == np.uint8:
        datum.data = np.ascontiguousarray(array).tobytes()
    else:
        datum.float_data.extend(np.asarray(array, dtype=np.float32).ravel().tolist())
    if label is not None:
        datum.label = int(label)
    if encoded_false:
        datum.encoded = False
    return datum


def load_mean_file(path):
    """Read a mean ``BlobProto`` (binaryproto) as a float32 ``(C, H, W)`` array."""
    caffe_pb2 = _caffe_pb2()
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CaffeError(f"cannot read mean_file '{path}': {e.strerror}") from None
    proto = caffe_pb2.BlobProto()
    try:
        proto.ParseFromString(data)
        blob = blob_from_proto(proto)
    except Exception as e:
        raise CaffeError(f"mean_file '{path}' is not a BlobProto: {e}") from None
    if blob.num_axes > 4 or blob.num != 1 or blob.count == 0:
        raise CaffeError(f"mean_file '{path}' must hold one C x H x W image, got shape {blob.shape}")
    return blob.data.reshape(blob.channels, blob.height, blob.width)


# -- the transformer -------------------------------------------------------------
class DataTransformer:
    """Caffe's DataTransformer for one ``TransformationParameter`` and phase.

    ``transform(batch)`` maps ``(N, C, H, W)`` → ``(N, C, h, w)`` (see module
    docstring); ``transform_datums(datums)`` decodes Datums first;
    ``output_shape(C, H, W)`` gives ``(C, h, w)``.  Parameter errors raise
    CaffeError (layers wrap them with their name).
    """

    def __init__(self, param, phase=TRAIN):
        self.param = param
        self.phase = phase
        self.scale = float(param.scale)
        self.mirror = bool(param.mirror)
        self.crop_size = int(param.crop_size)
        self.force_color = bool(param.force_color)
        self.force_gray = bool(param.force_gray)
        if self.force_color and self.force_gray:
            raise CaffeError("cannot set both force_color and force_gray")
        self.mean = None
        self.mean_values = None
        has_mean_file = param.HasField("mean_file")
        if has_mean_file and len(param.mean_value):
            raise CaffeError("cannot specify mean_file and mean_value at the same time "
                             f"(mean_file: '{param.mean_file}', mean_value: {list(param.mean_value)})")
        if has_mean_file:
            self.mean = load_mean_file(param.mean_file)
        if len(param.mean_value):
            self.mean_values = np.asarray(param.mean_value, dtype=np.float32)
        # data_transformer.cpp InitRand: a private generator only when something is random.
        self.rng = None
        if self.mirror or (phase == TRAIN and self.crop_size):
            self.rng = np.random.default_rng(int(framework_random.rng().integers(2 ** 63)))

    def output_shape(self, channels, height, width):
        """(C, h, w) of a transformed C×H×W image (InferBlobShape)."""
        if channels <= 0:
            raise CaffeError(f"images must have at least one channel, got {channels}")
        if self.crop_size:
            if height < self.crop_size or width < self.crop_size:
                raise CaffeError(f"crop_size {self.crop_size} is larger than the {height} x {width} image")
            return channels, self.crop_size, self.crop_size
        return channels, height, width

    def decode(self, datums, where="Datum"):
        """Datums → ``(N, C, H, W)`` array, decoding encoded ones with force_color/force_gray."""
        if (self.force_color or self.force_gray) and not any(d.encoded for d in datums):
            # data_transformer.cpp logs this as an error and goes on.
            warnings.warn("force_color and force_gray only apply to encoded Datums", stacklevel=2)
        return datums_to_array(datums, self.force_color, self.force_gray, where=where)

    def transform_datums(self, datums, out=None, dtype=np.float32):
        """Decode and transform a list of Datums (see ``transform``)."""
        return self.transform(self.decode(datums), out=out, dtype=dtype)

    def transform(self, batch, out=None, dtype=np.float32):
        """Transform ``batch`` ``(N, C, H, W)``; writes into ``out`` if given, returns it."""
        x = np.asarray(batch)
        if x.ndim != 4:
            raise CaffeError(f"a batch to transform must be N x C x H x W, got shape {x.shape}")
        n, c, h, w = x.shape
        oc, oh, ow = self.output_shape(c, h, w)
        dtype = np.dtype(out.dtype if out is not None else dtype)
        if out is None:
            out = np.empty((n, oc, oh, ow), dtype=dtype)
        elif out.shape != (n, oc, oh, ow):
            raise CaffeError(f"transform output has shape {out.shape}, expected {(n, oc, oh, ow)}")
        mean = self._mean_for(c, h, w, dtype)

        # Random draws in Caffe's order: mirror flags, then crop offsets.
        flips = self.rng.integers(0, 2, size=n).astype(bool) if self.mirror else None
        if self.crop_size and self.phase == TRAIN:
            h_off = self.rng.integers(0, h - oh + 1, size=n)
            w_off = self.rng.integers(0, w - ow + 1, size=n)
        else:
            h_off = w_off = None

        if h_off is None:
            top, left = (h - oh) // 2, (w - ow) // 2  # centre crop (or no crop: offsets 0)
            out[...] = x[:, :, top:top + oh, left:left + ow]
            if mean is not None and mean.ndim == 3:
                out -= mean[:, top:top + oh, left:left + ow]
        else:
            # One gather for all items: sliding windows indexed by each item's offset.
            windows = np.lib.stride_tricks.sliding_window_view(x, (oh, ow), axis=(2, 3))
            out[...] = windows[np.arange(n), :, h_off, w_off]
            if mean is not None and mean.ndim == 3:
                mwin = np.lib.stride_tricks.sliding_window_view(mean, (oh, ow), axis=(1, 2))
                out -= mwin[:, h_off, w_off].transpose(1, 0, 2, 3)
        if mean is not None and mean.ndim == 1:
            out -= mean[:, None, None]
        if self.scale != 1:
            out *= dtype.type(self.scale)
        if flips is not None and flips.any():
            out[flips] = out[flips][..., ::-1]
        return out

    def _mean_for(self, c, h, w, dtype):
        if self.mean is not None:
            if self.mean.shape != (c, h, w):
                raise CaffeError(f"the mean_file image is {self.mean.shape[0]} x {self.mean.shape[1]} x "
                                 f"{self.mean.shape[2]} but the data is {c} x {h} x {w} "
                                 "(the mean must have the full, uncropped size)")
            return self.mean.astype(dtype, copy=False)
        if self.mean_values is not None:
            if len(self.mean_values) not in (1, c):
                raise CaffeError(f"specify either 1 mean_value or as many as channels ({c}); "
                                 f"got {len(self.mean_values)}")
            return np.broadcast_to(self.mean_values, (c,)).astype(dtype)
        return None

