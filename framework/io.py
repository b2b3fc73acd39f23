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
