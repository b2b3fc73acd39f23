"""Reading and writing Caffe's files: text prototxt, binary protos and blobs.

Text (``.prototxt``)
    :func:`read_prototxt`, :func:`parse_prototxt_text`, :func:`read_net_param`,
    :func:`read_solver_param`, :func:`write_prototxt`.  Syntax errors raise
    :class:`~framework.errors.PrototxtError` as ``file:line:column: message``.
    No V0/V1 upgrade happens here (see ``framework/upgrade.py``).

Binary (``.caffemodel``, ``.solverstate``, ``.binaryproto``)
    :func:`read_binary_proto` and :func:`write_binary_proto` (atomic).  Files
    that are not a valid message of the asked type raise
    :class:`~framework.errors.WeightsError` naming the path.

Blobs
    :func:`blob_to_array` / :func:`array_to_blob_proto` convert between a
    ``BlobProto`` and a NumPy array without per-element Python work: the
    packed ``data``/``diff`` fields go through their wire bytes (one
    ``SerializeToString`` + ``np.frombuffer`` to read, one ``MergeFromString``
    to write), several times faster than ``np.array(proto.data)`` or
    ``proto.data.extend(array)``.  :func:`blobproto_to_array` and
    :func:`array_to_blobproto` are pycaffe's ``caffe.io`` names;
    :func:`load_mean_file` / :func:`save_mean_file` handle ``mean.binaryproto``.

Images (pycaffe's ``caffe.io``)
    :func:`load_image` (float RGB in [0, 1], H×W×C), :func:`resize_image`,
    :func:`oversample` (10 crops) and :class:`Transformer`, which turns
    images into a net's input blobs (transpose, channel swap, scales, mean).
"""
import os
import tempfile

import numpy as np
from google.protobuf import message as _pb_message
from google.protobuf import text_format

from proto import caffe_pb2

from .errors import PrototxtError, WeightsError

# BlobProto field numbers of the packed value arrays (caffe.proto).
_FIELD_DATA = 5
_FIELD_DIFF = 6
_FIELD_DOUBLE_DATA = 8
_FIELD_DOUBLE_DIFF = 9
_WIRE_VARINT, _WIRE_FIXED64, _WIRE_LEN, _WIRE_FIXED32 = 0, 1, 2, 5

# Recent upb runtimes give repeated scalar fields an ``__array__`` that copies
# the packed values in one memcpy (~10 GB/s); without it, ``np.array(field)``
# walks the values one Python object at a time, and large fields are read
# through their serialized wire bytes instead.  Below _SMALL_FIELD values the
# plain path is as fast either way.
_FIELD_HAS_ARRAY = hasattr(type(caffe_pb2.BlobProto().data), "__array__")
_SMALL_FIELD = 2048


# ----------------------------------------------------------------------------
# Text format
# ----------------------------------------------------------------------------

def parse_prototxt_text(text, message_type, source="<string>"):
    """Parse protobuf text format ``text`` into a new ``message_type`` message.

    ``message_type`` is a message class (e.g. ``caffe_pb2.NetParameter``) or an
    instance, which is filled in place (merged) and returned.  Caffe's
    dialect (single- or double-quoted strings, ``#`` comments, legacy V1
    ``layers {}`` blocks) is plain protobuf text format.  A syntax or schema
    error raises PrototxtError ``"<source>:<line>:<column>: <reason>"``; a
    message lacking a required field (only ClipParameter's min/max are
    required) raises PrototxtError naming the field path.
    """
    message = message_type() if isinstance(message_type, type) else message_type
    try:
        text_format.Merge(text, message)
    except text_format.ParseError as exc:
        raise PrototxtError(_format_parse_error(exc, source, message)) from None
    missing = message.FindInitializationErrors()
    if missing:  # C++ TextFormat::Parse rejects these too (e.g. ClipParameter min/max)
        raise PrototxtError(f"{source}: {message.DESCRIPTOR.full_name} is missing required "
                            f"field(s) {', '.join(missing)}")
    return message


def read_prototxt(path, message_type):
    """Read the text-format protobuf file ``path`` into a ``message_type`` message.

    Returns the parsed message.  Errors raise PrototxtError naming the file:
    ``"lenet.prototxt:12:5: Message type "caffe.LayerParameter" has no field
    named "foo"."`` for syntax/schema errors, ``"<path>: file not found"``
    (and similar) when the file cannot be read.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise PrototxtError(f"{path}: file not found") from None
    except OSError as exc:
        raise PrototxtError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise PrototxtError(f"{path}:{line}:{col}: not valid UTF-8 text "
                            f"(is this a binary file?)") from None
    return parse_prototxt_text(text, message_type, source=path)


def read_net_param(path):
    """Read a net definition (``.prototxt``) into a ``caffe_pb2.NetParameter``.

    The message is returned as written: legacy V0/V1 nets are *not* upgraded
    here (``framework.upgrade`` does that).
    """
    return read_prototxt(path, caffe_pb2.NetParameter)


def read_solver_param(path):
    """Read a solver definition (``solver.prototxt``) into a ``caffe_pb2.SolverParameter``.

    Legacy fields (``solver_type`` enum) are left as written; no upgrade here.
    """
    return read_prototxt(path, caffe_pb2.SolverParameter)


def write_prototxt(path, message):
    """Write ``message`` in protobuf text format to ``path`` atomically."""
    _atomic_write(path, text_format.MessageToString(message).encode("utf-8"), PrototxtError)


def _format_parse_error(exc, source, message):
    """``source:line:col: reason`` from a text_format.ParseError."""
    line, col = exc.GetLine(), exc.GetColumn()
    reason = str(exc)
    # The library prefixes "line:col : "; keep only the reason.
    prefix = f"{line}:{col} : "
    if line is not None and reason.startswith(prefix):
        reason = reason[len(prefix):]
    where = f"{source}:{line}:{col}" if line is not None else source
    return f"{where}: {reason} (while parsing {message.DESCRIPTOR.full_name})"


# ----------------------------------------------------------------------------
# Binary format
# ----------------------------------------------------------------------------

def read_binary_proto(path, message_type):
    """Parse the binary protobuf file ``path`` as a ``message_type`` message.

    ``message_type`` is a message class or an instance (filled in place).
    Any size that protobuf allows works: the Python runtime (upb) has no 64 MB
    total-size limit (Caffe raises its C++ limit to 2 GB for the same
    reason).  A missing/unreadable file, a file that is not a valid
    ``message_type`` (e.g. a text prototxt or a truncated download), or one
    missing required fields raises WeightsError naming the path.
    """
    path = os.fspath(path)
    message = message_type() if isinstance(message_type, type) else message_type
    name = message.DESCRIPTOR.full_name
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise WeightsError(f"{path}: file not found") from None
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        message.ParseFromString(raw)
    except _pb_message.DecodeError as exc:
        raise WeightsError(f"{path}: not a valid binary {name} ({len(raw)} bytes): {exc}") from None
    missing = message.FindInitializationErrors()
    if missing:
        raise WeightsError(f"{path}: binary {name} lacks required field(s) {', '.join(missing)}")
    return message


def write_binary_proto(path, message):
    """Serialize ``message`` to ``path`` atomically (binary protobuf).

    The bytes go to a temporary file in the same directory, are flushed to
    disk, then renamed over ``path`` (``os.replace``), so readers see either
    the old file or the complete new one, never a partial write; the
    temporary file is removed if anything fails.  Raises WeightsError if the
    message cannot be serialized (e.g. over protobuf's 2 GB limit).
    """
    try:
        data = message.SerializeToString()
    except (_pb_message.EncodeError, ValueError) as exc:
        raise WeightsError(f"{os.fspath(path)}: cannot serialize "
                           f"{message.DESCRIPTOR.full_name}: {exc}") from None
    _atomic_write(path, data, WeightsError)


def _atomic_write(path, data, error_cls):
    """Write bytes ``data`` to ``path`` via a same-directory temp file + os.replace."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".",
                                   suffix=".tmp")
    except OSError as exc:
        raise error_cls(f"{path}: cannot write ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; use the usual mode
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise error_cls(f"{path}: cannot write ({exc.strerror or exc})") from None
        raise


def _read_umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


# ----------------------------------------------------------------------------
# Blobs
# ----------------------------------------------------------------------------

def blob_shape(blob_proto):
    """The shape a BlobProto describes, as Caffe's Blob::FromProto reads it.

    The legacy 4-D dims (num, channels, height, width) win when any of them
    is set; otherwise ``shape.dim`` (possibly empty: a 0-axis scalar blob).
    """
    p = blob_proto
    if p.HasField("num") or p.HasField("channels") or p.HasField("height") or p.HasField("width"):
        return (p.num, p.channels, p.height, p.width)  # blob.cpp FromProto: legacy dims first
    return tuple(p.shape.dim)


def blob_values(blob_proto, diff=False, dtype=np.float32):
    """The flat values of a BlobProto as a new writable 1-D ``dtype`` array.

    ``diff=False`` reads ``double_data`` if it is non-empty, else ``data``
    (Caffe's Blob::FromProto rule); ``diff=True`` reads ``double_diff`` or
    ``diff`` likewise.  Returns an empty array when the field is empty.
    """
    p = blob_proto
    if diff:
        candidates = ((p.double_diff, _FIELD_DOUBLE_DIFF, "<f8"), (p.diff, _FIELD_DIFF, "<f4"))
    else:
        candidates = ((p.double_data, _FIELD_DOUBLE_DATA, "<f8"), (p.data, _FIELD_DATA, "<f4"))
    field, number, wire_dtype = candidates[0] if len(candidates[0][0]) else candidates[1]
    n = len(field)
    if n == 0:
        return np.empty(0, dtype=dtype)
    if _FIELD_HAS_ARRAY or n < _SMALL_FIELD:
        return np.array(field, dtype=dtype)  # upb: one memcpy via __array__
    # Older runtimes / pure-Python backend: go through the packed wire bytes.
    payload = _packed_payloads(p.SerializeToString(), (number,))[number]
    values = np.frombuffer(payload, dtype=wire_dtype)
    if values.size != n:  # cannot happen for well-formed protos; fall back safely
        return np.array(field, dtype=dtype)
    return values.astype(dtype)  # copies: writable, native byte order


def blob_to_array(blob_proto, diff=False, dtype=np.float32):
    """A BlobProto's values as an ndarray shaped like the blob.

    The shape comes from :func:`blob_shape` (legacy num/channels/height/width
    when set, else ``shape``); values from ``data`` or ``double_data``
    (``diff=True``: ``diff`` / ``double_diff``), converted to ``dtype``
    (float32 by default, Caffe's type).  Raises WeightsError when the number
    of stored values does not match the shape, as Caffe's FromProto check.
    """
    shape = blob_shape(blob_proto)
    values = blob_values(blob_proto, diff=diff, dtype=dtype)
    count = int(np.prod(shape, dtype=np.int64))
    if values.size != count:
        what = "diff" if diff else "data"
        raise WeightsError(f"BlobProto of shape {shape} (count {count}) holds "
                           f"{values.size} {what} values")
    return values.reshape(shape)


def array_to_blob_proto(array, write_diff=None, out=None):
    """A BlobProto holding ``array`` (float32 ``data``) with its ``shape``.

    ``write_diff``: an optional array of the same size stored as ``diff``
    (None: no diff).  Values are written as float32, as Caffe's float blobs.
    ``out``: an existing BlobProto to fill (it is cleared first), e.g.
    ``layer_param.blobs.add()``, which avoids a copy; default a new one.
    Returns the BlobProto.
    """
    array = np.asarray(array)
    proto = caffe_pb2.BlobProto() if out is None else out
    proto.Clear()
    proto.shape.dim.extend(int(d) for d in array.shape)
    # Appending an ndarray to a repeated field converts element by element
    # (~16 MB/s); parsing the packed wire bytes is one copy (~700 MB/s).
    proto.MergeFromString(_packed_float_field(_FIELD_DATA, array))
    if write_diff is not None:
        write_diff = np.asarray(write_diff)
        if write_diff.size != array.size:
            raise ValueError(f"diff has {write_diff.size} values, data has {array.size}")
        proto.MergeFromString(_packed_float_field(_FIELD_DIFF, write_diff))
    return proto


def blobproto_to_array(blob, return_diff=False):
    """pycaffe's ``caffe.io.blobproto_to_array``: the blob's data (or diff) as an array.

    Legacy num/channels/height/width dims win when set, else ``shape``.  Our
    arrays are float32 (Caffe's storage type); pycaffe returned float64.
    """
    return blob_to_array(blob, diff=return_diff)


def array_to_blobproto(arr, diff=None):
    """pycaffe's ``caffe.io.array_to_blobproto``: a BlobProto with ``shape`` and data (and diff)."""
    return array_to_blob_proto(arr, write_diff=diff)


def load_mean_file(path):
    """Read a ``mean.binaryproto`` (BlobProto) and return the mean as a (C, H, W) float32 array.

    Accepts the legacy 1×C×H×W dims Caffe's compute_image_mean writes, a
    ``shape`` of (1, C, H, W), or a 3-axis (C, H, W) shape.  Anything else
    raises WeightsError naming the file.
    """
    path = os.fspath(path)
    proto = read_binary_proto(path, caffe_pb2.BlobProto)
    try:
        mean = blob_to_array(proto)
    except WeightsError as exc:
        raise WeightsError(f"{path}: {exc}") from None
    if mean.ndim == 4 and mean.shape[0] == 1:
        return mean[0]
    if mean.ndim == 3:
        return mean
    raise WeightsError(f"{path}: mean blob has shape {mean.shape}; expected 1xCxHxW or CxHxW")


def save_mean_file(path, array):
    """Write a (C, H, W) (or 1×C×H×W) mean as Caffe's compute_image_mean does, atomically.

    The BlobProto uses the legacy dims num=1, channels, height, width and
    float32 ``data`` (no ``shape``), so Caffe and older tools read it.
    """
    mean = np.asarray(array)
    if mean.ndim == 4 and mean.shape[0] == 1:
        mean = mean[0]
    if mean.ndim != 3:
        raise ValueError(f"mean must be CxHxW or 1xCxHxW, got shape {np.shape(array)}")
    proto = caffe_pb2.BlobProto()
    proto.num = 1
    proto.channels, proto.height, proto.width = (int(d) for d in mean.shape)
    proto.MergeFromString(_packed_float_field(_FIELD_DATA, mean))
    write_binary_proto(path, proto)


# -- wire-format helpers ---------------------------------------------------------

def _encode_varint(value):
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _packed_float_field(number, array):
    """Wire bytes of a packed ``repeated float`` field holding ``array`` (as float32)."""
    values = np.asarray(array, dtype="<f4").reshape(-1)
    if values.size == 0:
        return b""
    header = _encode_varint((number << 3) | _WIRE_LEN) + _encode_varint(values.nbytes)
    buf = bytearray(len(header) + values.nbytes)
    buf[:len(header)] = header
    np.frombuffer(buf, dtype="<f4", offset=len(header))[:] = values
    return buf


def _decode_varint(buf, pos):
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _packed_payloads(serialized, numbers):
    """Walk the top-level fields of a serialized message; return {number: memoryview}.

    Only length-delimited fields listed in ``numbers`` are returned (the last
    occurrence: a freshly serialized packed field appears exactly once).  The
    loop runs once per top-level field (a handful for a BlobProto), not per value.
    """
    view = memoryview(serialized)
    found, pos, end = {}, 0, len(serialized)
    while pos < end:
        key, pos = _decode_varint(view, pos)
        number, wire = key >> 3, key & 7
        if wire == _WIRE_VARINT:
            _, pos = _decode_varint(view, pos)
        elif wire == _WIRE_FIXED64:
            pos += 8
        elif wire == _WIRE_FIXED32:
            pos += 4
        elif wire == _WIRE_LEN:
            length, pos = _decode_varint(view, pos)
            if number in numbers:
                found[number] = view[pos:pos + length]
            pos += length
        else:  # groups never occur in caffe.proto
            raise WeightsError(f"unexpected wire type {wire} in a serialized BlobProto")
    return found


# ----------------------------------------------------------------------------
# Images and the Transformer (pycaffe's caffe.io: load_image, resize_image,
# oversample, Transformer)
# ----------------------------------------------------------------------------

from .errors import CaffeError  # noqa: E402  (used by this section only)


class TransformerError(CaffeError, ValueError):
    """A Transformer setting does not fit the net input (also a ValueError, as in pycaffe)."""


def load_image(filename, color=True):
    """pycaffe's ``caffe.io.load_image``: an image file as float32 ``(H, W, C)`` in [0, 1].

    color -- True (default): RGB, 3 channels (gray images are repeated on all
             three); False: 1 channel (colour images become luminance
             0.2125 R + 0.7154 G + 0.0721 B, scikit-image's ``rgb2gray``).
    Channels are in RGB order (not Caffe's BGR: ``Transformer.set_channel_swap``
    reorders them); an alpha channel is dropped.  8-bit images are divided by
    255, 16-bit ones by 65535 (``img_as_float``).  Decoding uses Pillow.
    Raises CaffeError naming the file when it is missing or not an image.
    """
    try:
        from PIL import Image
    except ImportError:
        raise CaffeError("load_image needs the 'Pillow' package: pip install Pillow") from None
    filename = os.fspath(filename)
    try:
        with Image.open(filename) as img:
            img.load()
            return _pil_to_float(img, color)
    except FileNotFoundError:
        raise CaffeError(f"image file '{filename}' not found") from None
    except IsADirectoryError:
        raise CaffeError(f"image file '{filename}' is a directory") from None
    except Image.UnidentifiedImageError:
        raise CaffeError(f"cannot read image file '{filename}': not an image format "
                         f"Pillow can decode") from None
    except OSError as exc:  # PIL.UnidentifiedImageError and truncated files are OSErrors
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise CaffeError(f"cannot read image file '{filename}': {reason}") from None
    except (ValueError, SyntaxError) as exc:  # some corrupt files raise these in Pillow
        raise CaffeError(f"cannot read image file '{filename}': {exc}") from None


def _pil_to_float(img, color):
    """A loaded PIL image as float32 (H, W, C) in [0, 1] (skimage's img_as_float)."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img, dtype=np.float64) / 65535.0
        arr = arr[:, :, None]
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float64)[:, :, None]
    elif mode == "I":
        arr = np.asarray(img, dtype=np.float64) / 2147483647.0
        arr = arr[:, :, None]
    elif mode in ("1", "L", "LA", "La"):
        arr = np.asarray(img.convert("L"), dtype=np.float64)[:, :, None] / 255.0
    else:  # RGB, RGBA, P, CMYK, YCbCr...: RGB, alpha dropped
        arr = np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0
    if color and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif not color and arr.shape[2] == 3:
        arr = arr @ np.array([0.2125, 0.7154, 0.0721])  # skimage.color.rgb2gray
        arr = arr[:, :, None]
    return arr.astype(np.float32)


def _sample_grid(src, dst):
    """Source coordinates of ``dst`` output pixels, half-pixel centres: (d + 0.5)·src/dst − 0.5."""
    return (np.arange(dst, dtype=np.float64) + 0.5) * (src / dst) - 0.5


def resize_image(im, new_dims, interp_order=1):
    """pycaffe's ``caffe.io.resize_image``: resize ``im`` (H, W, K) to ``new_dims`` (h, w).

    interp_order -- 1 (default): bilinear; 0: nearest neighbour.
    Pixel centres are aligned (output pixel d samples source coordinate
    (d + 0.5)·H/h − 0.5) and coordinates outside the image are clamped to its
    edge.  Any number of channels K; returns float32 (h, w, K).
    A constant image stays exactly constant (pycaffe special-cases it too).
    pycaffe resamples with scikit-image, whose ``mode='constant'`` blends the
    outermost output pixels toward the image minimum when upscaling and which
    (in newer versions) blurs before downscaling; this plain bilinear version
    does neither, so values can differ from pycaffe's near the borders.
    """
    im = np.asarray(im)
    if im.ndim == 2:
        im = im[:, :, None]
    if im.ndim != 3:
        raise TransformerError(f"resize_image expects an H x W x K image, got shape {im.shape}")
    h, w = (int(d) for d in new_dims)
    if h <= 0 or w <= 0:
        raise TransformerError(f"resize_image: new_dims must be positive, got {tuple(new_dims)}")
    H, W, _ = im.shape
    if (H, W) == (h, w):
        return im.astype(np.float32)
    if interp_order == 0:
        rows = np.minimum(np.floor((np.arange(h) + 0.5) * (H / h)).astype(np.int64), H - 1)
        cols = np.minimum(np.floor((np.arange(w) + 0.5) * (W / w)).astype(np.int64), W - 1)
        return im[rows][:, cols].astype(np.float32)
    if interp_order != 1:
        raise TransformerError(f"resize_image: interp_order must be 0 or 1, got {interp_order}")
    im = im.astype(np.float32, copy=False)
    ys = np.clip(_sample_grid(H, h), 0, H - 1)
    xs = np.clip(_sample_grid(W, w), 0, W - 1)
    y0 = np.floor(ys).astype(np.int64)
    x0 = np.floor(xs).astype(np.int64)
    y1 = np.minimum(y0 + 1, H - 1)
    x1 = np.minimum(x0 + 1, W - 1)
    wy = (ys - y0).astype(np.float32)[:, None, None]
    wx = (xs - x0).astype(np.float32)[None, :, None]
    # a + w·(b − a) form: exact where neighbours are equal (a constant image stays constant)
    top, bottom = im[y0], im[y1]                      # (h, W, K) each
    top = top[:, x0] + wx * (top[:, x1] - top[:, x0])  # (h, w, K)
    bottom = bottom[:, x0] + wx * (bottom[:, x1] - bottom[:, x0])
    return (top + wy * (bottom - top)).astype(np.float32, copy=False)


def _crop_boxes(im_dims, crop_dims):
    """pycaffe's 10-crop boxes (y0, x0, y1, x1): 4 corners, the centre, then the same 5 again."""
    H, W = (int(d) for d in im_dims)
    ch, cw = (int(d) for d in crop_dims)
    if ch > H or cw > W:
        raise TransformerError(f"crop {ch}x{cw} is larger than the image {H}x{W}")
    boxes = [(y, x, y + ch, x + cw) for y in (0, H - ch) for x in (0, W - cw)]
    # Centre: start/end truncated toward zero from centre -/+ half the crop (io.py's int cast).
    centre = np.array([H / 2.0, W / 2.0, H / 2.0, W / 2.0])
    half = np.array([-ch / 2.0, -cw / 2.0, ch / 2.0, cw / 2.0])
    boxes.append(tuple(int(v) for v in np.trunc(centre + half)))
    return boxes + boxes


def oversample(images, crop_dims):
    """pycaffe's ``caffe.io.oversample``: 10 crops of each (H, W, K) image.

    For each image, in order: the top-left, top-right, bottom-left and
    bottom-right corners, the centre, then those five crops mirrored
    left-right.  ``images`` is a sequence (or N×H×W×K array) of images of one
    size; returns float32 (10·N, crop_h, crop_w, K).
    """
    images = [np.asarray(im) for im in images]
    if not images:
        raise TransformerError("oversample: no images given")
    H, W, K = images[0].shape
    ch, cw = (int(d) for d in crop_dims)
    boxes = _crop_boxes((H, W), (ch, cw))
    crops = np.empty((10 * len(images), ch, cw, K), dtype=np.float32)
    for i, im in enumerate(images):
        if im.shape != (H, W, K):
            raise TransformerError(f"oversample: image {i} has shape {im.shape}, image 0 has "
                                   f"{(H, W, K)}; all images must have one size")
        for j, (y0, x0, y1, x1) in enumerate(boxes):
            crops[10 * i + j] = im[y0:y1, x0:x1]
        crops[10 * i + 5:10 * i + 10] = crops[10 * i + 5:10 * i + 10, :, ::-1]  # the mirrors
    return crops


class Transformer:
    """pycaffe's ``caffe.io.Transformer``: images (H, W, K) to net input blobs and back.

    ``inputs`` maps each input name to its blob shape, e.g.
    ``Transformer({"data": net.blobs["data"].data.shape})``.  Per input, the
    optional settings are applied by :meth:`preprocess` in this order:

    1. convert to float32 (a copy: the caller's array is never modified);
    2. resize to the input's (H, W) if the image's first two dims differ;
    3. ``transpose`` (e.g. ``(2, 0, 1)``: H×W×K → K×H×W);
    4. ``channel_swap`` (e.g. ``(2, 1, 0)``: RGB → BGR);
    5. multiply by ``raw_scale`` (e.g. 255 for images loaded in [0, 1]);
    6. subtract ``mean`` (a per-channel (C,) vector or a (C, H, W) array);
    7. multiply by ``input_scale``.

    :meth:`deprocess` undoes 7 → 3 (not the resize).
    """

    def __init__(self, inputs):
        self.inputs = {name: tuple(int(d) for d in shape) for name, shape in inputs.items()}
        self.transpose = {}
        self.channel_swap = {}
        self.raw_scale = {}
        self.mean = {}
        self.input_scale = {}

    def _check_input(self, in_):
        if in_ not in self.inputs:
            raise TransformerError(f"'{in_}' is not one of the net inputs: {list(self.inputs)}")

    def preprocess(self, in_, data):
        """Format ``data`` (H, W, K) for input ``in_``: steps 1-7 of the class docstring."""
        self._check_input(in_)
        caffe_in = np.array(data, dtype=np.float32)  # a copy, so the steps below work in place
        in_dims = self.inputs[in_][2:]
        if len(in_dims) == 2 and caffe_in.shape[:2] != in_dims:
            caffe_in = resize_image(caffe_in, in_dims)
        transpose = self.transpose.get(in_)
        if transpose is not None:
            caffe_in = caffe_in.transpose(transpose)
        channel_swap = self.channel_swap.get(in_)
        if channel_swap is not None:
            caffe_in = caffe_in[list(channel_swap), :, :]
        raw_scale = self.raw_scale.get(in_)
        if raw_scale is not None:
            caffe_in *= raw_scale
        mean = self.mean.get(in_)
        if mean is not None:
            caffe_in -= mean
        input_scale = self.input_scale.get(in_)
        if input_scale is not None:
            caffe_in *= input_scale
        return caffe_in

    def deprocess(self, in_, data):
        """Invert :meth:`preprocess` (except the resize) for one blob item, e.g. for display.

        ``data`` is squeezed first (a 1×K×H×W batch of one works); returns
        float32 (H, W, K) when a transpose was set.
        """
        self._check_input(in_)
        decaf_in = np.array(data, dtype=np.float32).squeeze()
        input_scale = self.input_scale.get(in_)
        if input_scale is not None:
            decaf_in /= input_scale
        mean = self.mean.get(in_)
        if mean is not None:
            decaf_in += mean
        raw_scale = self.raw_scale.get(in_)
        if raw_scale is not None:
            decaf_in /= raw_scale
        channel_swap = self.channel_swap.get(in_)
        if channel_swap is not None:
            decaf_in = decaf_in[np.argsort(channel_swap), :, :]
        transpose = self.transpose.get(in_)
        if transpose is not None:
            decaf_in = decaf_in.transpose(np.argsort(transpose))
        return decaf_in

    def set_transpose(self, in_, order):
        """Axis order applied to the image, e.g. ``(2, 0, 1)`` for H×W×K → K×H×W."""
        self._check_input(in_)
        order = tuple(int(a) for a in order)
        if len(order) != len(self.inputs[in_]) - 1:
            raise TransformerError(f"transpose order {order} needs {len(self.inputs[in_]) - 1} "
                                   f"axes, as many as the input '{in_}' has per item")
        if sorted(order) != list(range(len(order))):
            raise TransformerError(f"transpose order {order} is not a permutation of "
                                   f"0..{len(order) - 1}")
        self.transpose[in_] = order

    def set_channel_swap(self, in_, order):
        """Channel order taken after the transpose, e.g. ``(2, 1, 0)`` for RGB → BGR."""
        self._check_input(in_)
        order = tuple(int(c) for c in order)
        channels = self.inputs[in_][1]
        if len(order) != channels:
            raise TransformerError(f"channel swap {order} needs {channels} entries, as many as "
                                   f"the input '{in_}' has channels")
        if sorted(order) != list(range(channels)):
            raise TransformerError(f"channel swap {order} is not a permutation of 0..{channels - 1}")
        self.channel_swap[in_] = order

    def set_raw_scale(self, in_, scale):
        """Multiply the raw image by ``scale`` (e.g. 255 for [0, 1] images), before the mean."""
        self._check_input(in_)
        self.raw_scale[in_] = scale

    def set_mean(self, in_, mean):
        """Mean to subtract: a per-channel (C,) vector or an elementwise (C, H, W) / (H, W) array.

        The shape must fit the input blob (C = its channels; (C, H, W) = its
        item shape), else TransformerError.
        """
        self._check_input(in_)
        mean = np.asarray(mean)
        shape = self.inputs[in_]
        if mean.ndim == 1:
            if len(shape) < 2 or mean.shape[0] != shape[1]:
                raise TransformerError(f"mean has {mean.shape[0]} channels; input '{in_}' of "
                                       f"shape {shape} has {shape[1] if len(shape) > 1 else 0}")
            mean = mean[:, np.newaxis, np.newaxis]
        else:
            ms = mean.shape if mean.ndim != 2 else (1,) + mean.shape
            if len(ms) != 3:
                raise TransformerError(f"mean shape {mean.shape} is invalid: expected (C,), (H, W) "
                                       f"or (C, H, W)")
            if ms != shape[1:]:
                raise TransformerError(f"mean shape {mean.shape} is incompatible with input "
                                       f"'{in_}' of shape {shape} (expected {shape[1:]} or "
                                       f"a per-channel ({shape[1]},) vector)")
        self.mean[in_] = mean

    def set_input_scale(self, in_, scale):
        """Multiply the mean-subtracted input by ``scale`` (the last step)."""
        self._check_input(in_)
        self.input_scale[in_] = scale
