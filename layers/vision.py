"""Vision layers: Convolution, Deconvolution, Im2col, Pooling, SPP and Crop.

The math lives in small functions at the top of the module (im2col / col2im,
the convolution products, the pooling kernels); the Layer classes below only
read parameters, check shapes and call them.

Convolution follows Caffe's im2col + GEMM formulation (``base_conv_layer.cpp``)
but over a whole chunk of the batch at once: the im2col buffer is a strided
view of the padded input copied once, then one ``np.matmul`` call covers every
image and every group, in one of two GEMM layouts (per image, or batch-merged
for small maps; see "two layouts" below).  1x1 stride-1 kernels skip im2col.
col2im loops over the kernel offsets (kh·kw slice-adds), never over pixels.
Small maps with kernels larger than 1x1 use a third, position-major column
order (image fastest) in which im2col/col2im copy long contiguous runs.
Pooling loops over the kernel offsets too (MAX separably in TEST; MAX over
disjoint windows keeps its argmax as tap numbers and routes gradients by a
bitwise select per tap).  Large memory-bound copies can be split over threads
(:mod:`layers.parallel`: where BLAS is held to one thread).
"""
import threading

import numpy as np
from numpy.lib.stride_tricks import as_strided

from framework.blob import Blob
from framework.fillers import fill
from framework.layer import Layer, register_layer
from framework import random as _random
from layers.parallel import in_blocks, pcopyto, row_broadcast, split_apply as _split_apply
from proto import caffe_pb2

#: Upper bound (bytes) of a convolution's work buffers (columns + transposed
#: result); larger batches are processed in chunks of whole images so memory
#: stays bounded (Caffe keeps one image's columns).
COL_BUFFER_BYTES = 48 << 20

#: Caffe initialises max pooling with -FLT_MAX whatever the Dtype (pooling_layer.cpp).
_FLT_MAX = float(np.finfo(np.float32).max)
#: Stochastic pooling's TEST denominator starts at FLT_MIN (pooling_layer.cu).
_FLT_MIN = float(np.finfo(np.float32).tiny)

_TRAIN = caffe_pb2.TRAIN
_POOL = caffe_pb2.PoolingParameter


# =============================================================================
# im2col geometry and kernels
# =============================================================================

def _prod(values):
    out = 1
    for v in values:
        out *= int(v)
    return out


def _c_div(a, b):
    """Integer division truncating toward zero, as C++ ``/`` on ints."""
    q = abs(a) // b
    return q if a >= 0 else -q


def conv_output_size(size, kernel, stride, pad, dilation):
    """Caffe's convolution output size (conv_layer.cpp compute_output_shape).

    (size + 2·pad − (dilation·(kernel − 1) + 1)) / stride + 1 with C integer
    division: floor for the usual non-negative numerator; an input smaller than
    the dilated kernel still gives 1 when the numerator is in (−stride, 0).
    """
    extent = dilation * (kernel - 1) + 1
    return _c_div(size + 2 * pad - extent, stride) + 1


def deconv_output_size(size, kernel, stride, pad, dilation):
    """Caffe's deconvolution output size (deconv_layer.cpp): s·(H − 1) + d·(k − 1) + 1 − 2p."""
    return stride * (size - 1) + dilation * (kernel - 1) + 1 - 2 * pad


class ConvGeometry:
    """Shapes of one im2col convolution, in the *convolution* direction.

    ``channels`` and ``in_shape`` describe the convolution input (for
    Deconvolution: its top), ``out_shape`` its output; ``kernel``, ``stride``,
    ``pad``, ``dilation`` are per-spatial-axis tuples; ``group`` splits the
    channels.  ``padded_shape`` is the zero-padded input extent im2col reads:
    at least H + 2p, and large enough for every window (Caffe's im2col reads
    zeros outside the image, which the C-division rule above can reach).
    """

    def __init__(self, channels, in_shape, out_shape, kernel, stride, pad, dilation, group):
        self.channels = int(channels)
        self.in_shape = tuple(int(v) for v in in_shape)
        self.out_shape = tuple(int(v) for v in out_shape)
        self.kernel = tuple(kernel)
        self.stride = tuple(stride)
        self.pad = tuple(pad)
        self.dilation = tuple(dilation)
        self.group = int(group)
        self.padded_shape = tuple(
            max(i + 2 * p, (o - 1) * s + d * (k - 1) + 1)
            for i, o, k, s, p, d in zip(self.in_shape, self.out_shape, self.kernel,
                                        self.stride, self.pad, self.dilation))
        # base_conv_layer.cpp: im2col is the identity for 1x1, stride 1, pad 0
        self.is_1x1 = all(k == 1 and s == 1 and p == 0
                          for k, s, p in zip(self.kernel, self.stride, self.pad))
        self.kernel_count = _prod(self.kernel)
        self.in_count = _prod(self.in_shape)
        self.out_count = _prod(self.out_shape)
        self.col_rows = self.channels // self.group * self.kernel_count  # per group

    def col_bytes_per_image(self, itemsize, num_output=0):
        """Work-buffer bytes per image: columns (C·Π k·Π O) plus the transposed GEMM result (M·Π O)."""
        return (self.channels * self.kernel_count + num_output) * self.out_count * itemsize


def _view(array, shape):
    """Reshape that must not copy (writes through ``out=`` would be lost otherwise)."""
    view = array.view()
    view.shape = shape
    return view


def _pad_spatial(x, pad, padded_shape, value=0):
    """``x`` (n, C, *S) placed at offset ``pad`` in a (n, C, *padded_shape) array of ``value``."""
    spatial = x.shape[2:]
    if tuple(padded_shape) == tuple(spatial):
        return x
    xp = np.full(x.shape[:2] + tuple(padded_shape), value, dtype=x.dtype)
    xp[(slice(None), slice(None)) + tuple(slice(p, p + s) for p, s in zip(pad, spatial))] = x
    return xp


# -- parallel memory-bound copies: see layers/parallel.py ------------------------

def _output_pass(dst, src, bias, relu, residual=None):
    """dst (n, M, P) = src (+ bias (M,) per channel) (+ residual (n, M, P)), then max(·, 0) if
    ``relu``.

    ``src`` is ``dst`` itself (in place) or a view of the same shape (the transposed
    GEMM result of the batch-merged layouts).  Split over threads along the images,
    or along the channels for a single image in place; the residual (an Eltwise SUM folded
    into the convolution, ``Layer.fused_residual``) and the ReLU (``Layer.fused_relu``) follow
    the add block by block (:func:`layers.parallel.in_blocks`), from cache.  The sums are the
    layers' own, in their order: (conv + bias) + residual.
    """
    n, m, p = dst.shape
    with_bias, with_residual = bias is not None, residual is not None

    def block(d, s, *extra):
        b = extra[0] if with_bias else None
        r = extra[-1] if with_residual else None
        if b is not None:
            np.add(s, b, out=d)
            s = d
        if r is not None:
            np.add(s, r, out=d)
        elif s is not d:
            np.copyto(d, s)
        if relu:
            np.maximum(d, 0, out=d)

    def in_place(d, *extra):
        block(d, d, *extra)

    def part(func, *arrays):  # one thread's share, in cache-sized blocks
        with row_broadcast(p):
            in_blocks(func, arrays)

    if src is dst:  # in place: rows (n·M, P) with one bias value per row
        arrays = (_view(dst, (n * m, p)),)
        if with_bias:
            arrays += (np.tile(bias, n).reshape(-1, 1),)
        if with_residual:
            arrays += (_view(residual, (n * m, p)),)
        _split_apply(lambda *parts: part(in_place, *parts), arrays, dst.nbytes)
        return
    bcol = (bias.reshape(-1, 1),) if with_bias else ()

    def images(d, s, *r):
        for i in range(d.shape[0]):
            part(block, d[i], s[i], *bcol, *(x[i] for x in r))

    _split_apply(images, (dst, src) + ((_view(residual, dst.shape),) if with_residual else ()), dst.nbytes)


_scratch_store = threading.local()


def _scratch(shape, dtype, slot=0):
    """A reusable work array (one per thread and ``slot``) for im2col/GEMM buffers.

    Reusing buffers avoids mapping fresh pages for every chunk (~20% of a
    large convolution's time).  Valid only until the next call with the same
    slot: slot 0 holds columns, 1 the transposed GEMM operand/result, 2 the
    padded input or the col2im accumulator, 3 the position-major col2im
    accumulator (max pooling borrows slot 0).
    """
    dtype = np.dtype(dtype)
    nbytes = _prod(shape) * dtype.itemsize
    buffers = getattr(_scratch_store, "buffers", None)
    if buffers is None:
        buffers = _scratch_store.buffers = {}
    buf = buffers.get(slot)
    if buf is None or buf.nbytes < nbytes:
        buffers.pop(slot, None)  # let the old buffer go before taking the new one
        buf = np.empty(max(nbytes, 1), dtype=np.uint8)
        buffers[slot] = buf
    return buf[:nbytes].view(dtype).reshape(shape)


def release_scratch():
    """Free this thread's work buffers (they are re-created on demand)."""
    _scratch_store.buffers = {}


def im2col(x, geom, out=None):
    """Columns of ``x`` (n, C, *in_shape): shape (n, G, C/G·Π kernel, Π out_shape).

    Row order within a group is channel-major then kernel offsets, as Caffe's
    im2col_cpu / im2col_nd_cpu; out-of-image taps read zero.  Built as a
    strided view of the padded input, copied once (into ``out`` if given, a
    C-contiguous array of that shape).  (The Im2col layer's layout; the
    convolutions use :func:`im2col_batch`.)
    """
    n = x.shape[0]
    g = geom
    xp = _pad_spatial(x, g.pad, g.padded_shape)
    st = xp.strides
    spatial_strides = st[2:]
    cg = g.channels // g.group
    shape = (n, g.group, cg) + g.kernel + g.out_shape
    strides = ((st[0], st[1] * cg, st[1])
               + tuple(d * s for d, s in zip(g.dilation, spatial_strides))
               + tuple(k * s for k, s in zip(g.stride, spatial_strides)))
    windows = as_strided(xp, shape=shape, strides=strides, writeable=False)
    if out is None:
        return windows.reshape(n, g.group, g.col_rows, g.out_count)
    np.copyto(_view(out, shape), windows)
    return out


def col2im(cols, geom, out=None):
    """Adjoint of :func:`im2col`: sum columns (n, G, C/G·Π k, Π out) back into (n, C, *in_shape).

    Loops over the kernel offsets, adding one strided slice each (Caffe's
    col2im_cpu accumulates the same terms).  Writes into ``out`` if given.
    """
    g = geom
    n = cols.shape[0]
    c = cols.reshape((n, g.channels) + g.kernel + g.out_shape)
    direct = out is not None and g.padded_shape == g.in_shape
    if direct:  # no padding: accumulate straight into the output
        xp = out.reshape((n, g.channels) + g.in_shape)
        xp[...] = 0
    else:
        xp = np.zeros((n, g.channels) + g.padded_shape, dtype=cols.dtype)
    head = (slice(None), slice(None))
    for offset in np.ndindex(*g.kernel):
        window = tuple(slice(k * d, k * d + s * (o - 1) + 1, s)
                       for k, d, s, o in zip(offset, g.dilation, g.stride, g.out_shape))
        target = xp[head + window]
        np.add(target, c[head + offset], out=target)  # `+=` on a slice copies it back again
    if direct:
        return out
    inner = xp[head + tuple(slice(p, p + i) for p, i in zip(g.pad, g.in_shape))]
    if out is None:
        return inner
    out[...] = inner
    return out


# -- two layouts for the GEMMs ------------------------------------------------------
#
# Per image (Caffe's, ``im2col``): columns (n, G, K, O); W (G, M/G, K) @ cols is a
# stack of n GEMMs writing straight into the (n, M, O) output, no copies.  Good when
# O = Π out_shape is large (56x56, 28x28 maps: the GEMMs are big anyway).
#
# Batch-merged (``im2col_batch``): columns (G, K, n·O), the images side by side, so
# W @ cols is ONE GEMM per group over the whole chunk, and the weight gradient
# dy (G, M/G, n·O) @ colsᵀ sums over the images inside it.  The price is a
# transposed copy of the output (n <-> M; fused with the bias add) and of dy.
# Measured on 2 cores: 15-20% faster GEMMs for 14x14 and 7x7 maps (ResNet's
# stages 4 and 5), where n separate GEMMs with 196 or 49 columns are inefficient,
# and slower for large maps, where the transposes cost more than they save.

#: Output maps with fewer positions than this use the batch-merged layout.  (Was 512:
#: LeNet's conv1 on 26x26 crops, 22x22 = 484 positions, 1 -> 20 channels, batch 64,
#: measured 0.7 ms per image-wise vs 3.3 ms merged for its backward on 2 cores: one
#: (20 × 30976)·(30976 × 25) weight-gradient GEMM is far slower than 64 small ones.)
MERGE_BELOW_OUT = 256


def _use_merged(n, geom):
    return n > 1 and geom.out_count < MERGE_BELOW_OUT


def _padded_input(x, geom, slot=2):
    """``x`` (n, C, *S) zero-padded to (n, C, *padded_shape) in a scratch buffer (``x`` if no padding)."""
    g = geom
    if g.padded_shape == g.in_shape:
        return x
    xp = _scratch(x.shape[:2] + g.padded_shape, x.dtype, slot)
    head = (slice(None), slice(None))
    for axis, (p, size, total) in enumerate(zip(g.pad, g.in_shape, g.padded_shape)):
        before = (slice(None),) * axis
        xp[head + before + (slice(0, p),)] = 0
        xp[head + before + (slice(p + size, total),)] = 0
    xp[head + tuple(slice(p, p + s) for p, s in zip(g.pad, g.in_shape))] = x
    return xp


def im2col_batch(x, geom, out):
    """Columns of ``x`` (n, C, *in_shape) in the batch-merged layout (G, C/G·Π k, n·Π O).

    Row r = c·Π k + kernel offset (Caffe's order), column i·Π O + output position
    for image i.  ``out``: a contiguous buffer of that many elements.
    """
    g = geom
    n = x.shape[0]
    xp = _padded_input(x, g)
    st = xp.strides
    shape = (g.channels,) + g.kernel + (n,) + g.out_shape
    strides = ((st[1],) + tuple(d * s for d, s in zip(g.dilation, st[2:]))
               + (st[0],) + tuple(k * s for k, s in zip(g.stride, st[2:])))
    pcopyto(_view(out, shape), as_strided(xp, shape=shape, strides=strides, writeable=False))
    return _view(out, (g.group, g.col_rows, n * g.out_count))


def col2im_batch(cols, geom, out):
    """Adjoint of :func:`im2col_batch`: columns (G, C/G·Π k, n·Π O) summed into ``out`` (n, C, *in_shape).

    Accumulates the kernel offsets' slices in a (C, n, *padded) buffer (same
    order of terms as Caffe's col2im), then one transposed copy into ``out``.
    """
    g = geom
    n = out.shape[0]
    c = cols.reshape((g.channels,) + g.kernel + (n,) + g.out_shape)
    acc = _scratch((g.channels, n) + g.padded_shape, cols.dtype, 2)
    acc[...] = 0
    head = (slice(None), slice(None))
    for offset in np.ndindex(*g.kernel):
        window = tuple(slice(k * d, k * d + s * (o - 1) + 1, s)
                       for k, d, s, o in zip(offset, g.dilation, g.stride, g.out_shape))
        target = acc[head + window]
        np.add(target, c[(slice(None),) + offset], out=target)  # `+=` on a slice copies it back again
    inner = acc[head + tuple(slice(p, p + i) for p, i in zip(g.pad, g.in_shape))]
    pcopyto(_view(out, (n, g.channels) + g.in_shape), inner.swapaxes(0, 1))
    return out


# -- a third layout: position-major columns ------------------------------------------------
#
# The batch-merged columns put the images side by side (column i·Π O + position), so
# every im2col copy and col2im add runs along one output row only (8 elements for
# LeNet's conv2): NumPy's per-row overhead dominates.  Nothing fixes the column
# order (W·cols keeps it, the weight gradient contracts over all columns), so for
# small maps the columns go position-major, image fastest (column position·n + i):
# the input is transposed once to (C, *padded, n), and a kernel tap's slice then
# covers out_w·n contiguous elements in im2col and col2im (LeNet's conv2 backward:
# im2col ~6x, col2im ~3x faster).  The output and dy need one transposed copy each,
# as in the batch-merged layout.  Same products; the input gradient sums the kernel
# offsets in Caffe's order within each block of output rows (see PM_BLOCK_BYTES),
# and the weight/bias gradients sum the n·O columns in another order (float
# round-off).  The Convolution layer's forward uses it unless Winograd takes the
# shape (conv_forward dispatches that).

#: Convolutions in the batch-merged layout with kernels larger than 1x1 and at most
#: PM_MAX_OUTPUTS outputs per group run in the position-major layout instead (forward
#: through the layer, backward always).  The copies weigh 1/M against the GEMMs: with
#: ResNet's and CaffeNet's 256-512 outputs the two layouts measured mixed (position-major
#: up to 10% slower on one thread), so those stay batch-merged.
POSITION_MAJOR = True
PM_MAX_OUTPUTS = 128

#: The weight gradient GEMM is computed transposed (colsᵀ-major, (K, M/G) result) when the
#: outputs per group are at most this many: OpenBLAS runs (K × n·O)·(n·O × M/G) 15-25%
#: faster than (M/G × n·O)·(n·O × K) for thin dy (LeNet's 20 and 50 outputs), and up to
#: 50% slower for wide ones (ResNet's 512) (measured, 1 thread).
THIN_WGRAD_OUTPUTS = 64


def _use_position_major(n, geom, outputs):
    """The position-major layout: batch-merged (small) maps, kernels larger than 1x1 (a 1x1
    kernel's im2col is a plain gather, no faster in this order: measured slower), few
    ``outputs`` per group."""
    return (POSITION_MAJOR and _use_merged(n, geom) and geom.kernel_count > 1
            and outputs <= PM_MAX_OUTPUTS)


def _input_position_major(x, geom, slot=2):
    """``x`` (n, C, *in_shape) as a zero-padded (C, *padded_shape, n) array in scratch."""
    g = geom
    xt = _scratch((g.channels,) + g.padded_shape + (x.shape[0],), x.dtype, slot)
    if g.padded_shape != g.in_shape:
        xt[...] = 0
    inner = xt[(slice(None),) + tuple(slice(p, p + s) for p, s in zip(g.pad, g.in_shape))]
    pcopyto(inner, np.moveaxis(x, 0, -1))
    return xt


#: Position-major convolutions work through the output in blocks of whole rows (first
#: spatial axis) whose columns take at most this many bytes, so that a block's columns
#: are still cached when the GEMM or col2im reads them (LeNet's conv2, batch 64: 2 blocks
#: of 4 rows, measured 0.7-1.5 ms faster per training step than one 8 MB block; 2 MB
#: blocks fell in between).
PM_BLOCK_BYTES = 4 << 20


def _row_blocks(geom, n, itemsize):
    """(start, stop) output rows (first spatial axis) of each position-major block."""
    rows = geom.out_shape[0]
    row_bytes = geom.group * geom.col_rows * (geom.out_count // rows) * n * itemsize
    step = max(1, PM_BLOCK_BYTES // max(1, row_bytes))
    return [(r, min(rows, r + step)) for r in range(0, rows, step)]


def im2col_position_major(xt, geom, out, rows=None):
    """Columns (G, C/G·Π k, Π O·n) of ``xt`` (C, *padded_shape, n) from :func:`_input_position_major`.

    Row r = c·Π k + kernel offset (Caffe's order), column position·n + image.
    ``rows`` = (start, stop) limits them to those output rows (first spatial axis).
    ``out``: a contiguous buffer of at least that many elements.
    """
    g = geom
    n = xt.shape[-1]
    start, stop = rows if rows is not None else (0, g.out_shape[0])
    out_shape = (stop - start,) + g.out_shape[1:]
    st = xt.strides
    shape = (g.channels,) + g.kernel + out_shape + (n,)
    strides = ((st[0],) + tuple(d * s for d, s in zip(g.dilation, st[1:-1]))
               + tuple(k * s for k, s in zip(g.stride, st[1:-1])) + (st[-1],))
    cols = out[:_prod(shape)]
    pcopyto(_view(cols, shape), as_strided(xt[:, start * g.stride[0]:], shape=shape, strides=strides,
                                           writeable=False))
    return _view(cols, (g.group, g.col_rows, _prod(out_shape) * n))


def _col2im_position_major_add(acc, cols, geom, rows):
    """acc (C, *padded_shape, n) += the kernel offsets' slices of ``cols``, the columns of output
    rows ``rows`` = (start, stop), in Caffe's col2im order.  On the calling thread: split over
    threads, the many short adds measured no faster (GIL hand-offs)."""
    g = geom
    n = acc.shape[-1]
    start, stop = rows
    out_shape = (stop - start,) + g.out_shape[1:]
    c = cols.reshape((g.channels,) + g.kernel + out_shape + (n,))
    first = start * g.stride[0]
    for offset in np.ndindex(*g.kernel):
        window = (slice(None),) + tuple(slice(f + k * d, f + k * d + s * (o - 1) + 1, s)
                                        for f, k, d, s, o in zip((first,) + (0,) * (len(offset) - 1), offset,
                                                                 g.dilation, g.stride, out_shape))
        target = acc[window]
        np.add(target, c[(slice(None),) + offset], out=target)


def _col2im_position_major_finish(acc, geom, out):
    """The image part of ``acc`` (C, *padded_shape, n) transposed into ``out`` (n, C, *in_shape)."""
    g = geom
    inner = acc[(slice(None),) + tuple(slice(p, p + i) for p, i in zip(g.pad, g.in_shape))]
    pcopyto(_view(out, (out.shape[0], g.channels) + g.in_shape).swapaxes(0, 1), np.moveaxis(inner, -1, 1))
    return out


def _columns(x, geom):
    """Per-image columns (n, G, K, O): a view of ``x`` for 1x1 kernels, else :func:`im2col` in scratch."""
    shape = (x.shape[0], geom.group, geom.col_rows, geom.out_count)
    if geom.is_1x1:
        return x.reshape(shape)
    return im2col(x, geom, out=_scratch(shape, x.dtype, 0))


def _columns_batch(x, geom):
    """Batch-merged columns (G, K, n·O) (:func:`im2col_batch`, in scratch)."""
    size = geom.group * geom.col_rows * x.shape[0] * geom.out_count
    return im2col_batch(x, geom, _scratch((size,), x.dtype, 0))


def _add_bias_inplace(y, bias, relu=False, residual=None):
    """y (n, M, O) += bias (M,) (None: no bias) (+ residual), then max(·, 0) if ``relu``; split
    over threads."""
    if bias is not None or relu or residual is not None:
        _output_pass(y, y, bias, relu, residual)


def conv_forward(x, weights, geom, out, bias=None, relu=False, residual=None):
    """Convolution product: out (n, M, *out_shape) = W ⋆ x (+ bias) (+ residual, an array of
    out's shape), then max(·, 0) if ``relu``.

    x (n, C, *in_shape); weights (M, C/G, *kernel); bias (M,) or None.  One
    matmul call per chunk: per image (G, M/G, K) @ (n, G, K, O) straight into
    ``out``, or batch-merged (G, M/G, K) @ (G, K, n·O) then transposed into
    ``out`` with the bias added in the same pass (small maps, see above).
    A 1x1 stride-1 unpadded kernel in the per-image layout needs no im2col.
    3x3 stride-1 kernels go to Winograd F(2x2, 3x3) where
    :func:`layers.winograd.use_winograd` says it is faster (opt-out:
    ``layers.winograd.ENABLED = False``).
    """
    from layers import winograd  # here, not at the top: winograd imports this module
    if winograd.use_winograd(x, weights, geom):
        return winograd.conv_forward(x, weights, geom, out, bias, relu, residual)
    n = x.shape[0]
    m = weights.shape[0]
    g = geom
    w = weights.reshape(g.group, m // g.group, g.col_rows)
    if not _use_merged(n, g):
        np.matmul(w, _columns(x, g), out=_view(out, (n, g.group, m // g.group, g.out_count)))
        _add_bias_inplace(_view(out, (n, m, g.out_count)), bias, relu, residual)
        return out
    yt = np.matmul(w, _columns_batch(x, g), out=_scratch((g.group, m // g.group, n * g.out_count), x.dtype, 1))
    return _store_output(yt.reshape(m, n, g.out_count).swapaxes(0, 1), bias, out, relu, residual)


def _store_output(src, bias, out, relu=False, residual=None):
    """Copy ``src`` (n, M, Π O), a transposed view of a GEMM result, into ``out`` (n, M, *O),
    adding ``bias`` (M,) and ``residual`` (if given) and applying max(·, 0) (if ``relu``) in
    the same pass."""
    _output_pass(_view(out, src.shape), src, bias, relu, residual)
    return out


def _row_sums(a):
    """Sum of each row of the 2-D ``a`` as one GEMV with a ones vector (the bias gradient:
    conv_layer.cpp's gemv per image), ~3x faster than NumPy's reduction over a strided axis."""
    return np.matmul(a, np.ones(a.shape[1], dtype=a.dtype))


def _transposed_dy(dy, geom):
    """dy (n, M, *O) as (G, M/G, n·O) in a scratch buffer (transposed copy)."""
    n, m = dy.shape[:2]
    g = geom
    dyt = _scratch((g.group, m // g.group, n * g.out_count), dy.dtype, 1)
    pcopyto(_view(dyt, (m, n, g.out_count)), dy.reshape(n, m, g.out_count).swapaxes(0, 1))
    return dyt


def conv_backward(x, dy, weights, geom, dx=None, weight_grad=True, bias_grad=False):
    """Both gradients of :func:`conv_forward` for one chunk of images.

    Returns (weight gradient (M, C/G·Π k) summed over the images or None,
    bias gradient (M,) or None) and writes the input gradient into ``dx`` if
    given (``weights`` is needed only then).  Per-image layout: dy·colsᵀ per
    image summed over the images (Caffe's order), dx = col2im(Wᵀ·dy).
    Batch-merged: dy transposed once, the weight gradient one GEMM over n·O
    columns, dx = col2im_batch(Wᵀ·dyᵀ).  The weight and input gradients of wide 3x3
    stride-1 convolutions go through Winograd instead
    (:func:`layers.winograd.use_for_weight_gradient`, :func:`layers.winograd.use_for_data_gradient`).
    """
    from layers import winograd  # here, not at the top: winograd imports this module
    if not (weight_grad or bias_grad or dx is not None):
        return None, None
    if weight_grad and winograd.use_for_weight_gradient(x, dy, geom):
        wgrad = winograd.conv_weight_grad(x, dy, geom)
        return wgrad, conv_backward(None, dy, weights, geom, dx, False, bias_grad)[1]
    if dx is not None and winograd.use_for_data_gradient(dy, weights, geom):
        wgrad, bgrad = conv_backward(x, dy, None, geom, None, weight_grad, bias_grad)
        winograd.conv_backward_data(dy, weights, geom, dx)
        return wgrad, bgrad
    n, m = dy.shape[:2]
    g = geom
    mg = m // g.group
    wgrad = bgrad = None
    if not _use_merged(n, g):
        dyv = dy.reshape(n, g.group, mg, g.out_count)
        if bias_grad:
            bgrad = _row_sums(dy.reshape(n * m, g.out_count)).reshape(n, m).sum(axis=0)
        if weight_grad:
            per_image = np.matmul(dyv, _columns(x, g).swapaxes(-1, -2))
            wgrad = (per_image[0] if n == 1 else per_image.sum(axis=0)).reshape(m, g.col_rows)
        if dx is not None:
            wt = weights.reshape(g.group, mg, g.col_rows).swapaxes(1, 2)
            shape = (n, g.group, g.col_rows, g.out_count)
            if g.is_1x1:
                np.matmul(wt, dyv, out=_view(dx, shape))
            else:
                col2im(np.matmul(wt, dyv, out=_scratch(shape, dy.dtype, 0)), g, dx)
        return wgrad, bgrad
    if _use_position_major(n, g, mg):
        return _conv_backward_position_major(x, dy, weights, g, dx, weight_grad, bias_grad)
    dyt = _transposed_dy(dy, g)
    if bias_grad:
        bgrad = dyt.reshape(m, -1).sum(axis=1)
    if weight_grad:
        wgrad = np.matmul(dyt, _columns_batch(x, g).swapaxes(-1, -2)).reshape(m, g.col_rows)
    if dx is not None:
        wt = weights.reshape(g.group, mg, g.col_rows).swapaxes(1, 2)
        dcols = np.matmul(wt, dyt, out=_scratch((g.group, g.col_rows, n * g.out_count), dy.dtype, 0))
        if g.is_1x1:  # the columns are the input itself, images side by side
            pcopyto(_view(dx, (n, g.channels, g.out_count)),
                    dcols.reshape(g.channels, n, g.out_count).swapaxes(0, 1))
        else:
            col2im_batch(dcols, g, dx)
    return wgrad, bgrad


def _conv_backward_position_major(x, dy, weights, geom, dx, weight_grad, bias_grad):
    """:func:`conv_backward` with position-major columns (see above), block by block of
    output rows: weight gradient summed over the blocks, input gradient accumulated in
    one buffer; same returns."""
    n, m = dy.shape[:2]
    g = geom
    mg = m // g.group
    bgrad = None
    dyt = _scratch((g.group, mg, g.out_count * n), dy.dtype, 1)
    pcopyto(_view(dyt, (m, g.out_count, n)), np.moveaxis(dy.reshape(n, m, g.out_count), 0, -1))
    if bias_grad:
        bgrad = dyt.reshape(m, -1).sum(axis=1)
    if not weight_grad and dx is None:
        return None, bgrad
    per_row = g.out_count // g.out_shape[0] * n
    blocks = _row_blocks(g, n, dy.itemsize)
    buf = _scratch((g.group * g.col_rows * per_row * max(b - a for a, b in blocks),), dy.dtype, 0)
    xt = _input_position_major(x, g) if weight_grad else None
    if dx is not None:
        wt = weights.reshape(g.group, mg, g.col_rows).swapaxes(1, 2)
        acc = _scratch((g.channels,) + g.padded_shape + (n,), dy.dtype, 3)
        acc[...] = 0
    thin = mg <= THIN_WGRAD_OUTPUTS
    wsum = None
    for start, stop in blocks:
        dyb = dyt[:, :, start * per_row:stop * per_row]
        if weight_grad:
            cols = im2col_position_major(xt, g, buf, (start, stop))
            # thin dy: the transposed product, (K, M/G) result, is the faster GEMM
            part = np.matmul(cols, dyb.swapaxes(-1, -2)) if thin else np.matmul(dyb, cols.swapaxes(-1, -2))
            wsum = part if wsum is None else np.add(wsum, part, out=wsum)
        if dx is not None:
            dcols = np.matmul(wt, dyb, out=_view(buf[:g.group * g.col_rows * dyb.shape[-1]],
                                                 (g.group, g.col_rows, dyb.shape[-1])))
            _col2im_position_major_add(acc, dcols, g, (start, stop))
    if dx is not None:
        _col2im_position_major_finish(acc, g, dx)
    wgrad = None
    if weight_grad:
        wgrad = (wsum.swapaxes(-1, -2) if thin else wsum).reshape(m, g.col_rows)
    return wgrad, bgrad


def _forward_in_position_major(x, weights, geom):
    """Convolution forward in the position-major layout (:func:`conv_forward_position_major`):
    where the backward uses it and the columns outweigh the output (C/G·Π k ≥ 4·M/G: its
    output transpose is the costlier one; LeNet's 1-channel conv1 measured 40% slower), unless
    Winograd (dispatched inside :func:`conv_forward`) takes the shape."""
    outputs = weights.shape[0] // geom.group
    if not _use_position_major(x.shape[0], geom, outputs) or geom.col_rows < 4 * outputs:
        return False
    from layers import winograd  # imported here: it imports this module
    return not winograd.use_winograd(x, weights, geom)


def conv_forward_position_major(x, weights, geom, out, bias=None, relu=False, residual=None):
    """:func:`conv_forward` through position-major columns (see above): one GEMM per group
    and block of output rows, then one transposed copy into ``out`` with the bias added
    in the same pass.

    Same products and sums as the batch-merged layout (a column's order does not
    change its dot product); faster im2col for small maps.
    """
    n = x.shape[0]
    m = weights.shape[0]
    g = geom
    per_row = g.out_count // g.out_shape[0] * n
    blocks = _row_blocks(g, n, x.itemsize)
    buf = _scratch((g.group * g.col_rows * per_row * max(b - a for a, b in blocks),), x.dtype, 0)
    xt = _input_position_major(x, g)
    w = weights.reshape(g.group, m // g.group, g.col_rows)
    yt = _scratch((g.group, m // g.group, g.out_count * n), x.dtype, 1)
    for start, stop in blocks:
        np.matmul(w, im2col_position_major(xt, g, buf, (start, stop)),
                  out=yt[:, :, start * per_row:stop * per_row])
    return _store_output(np.moveaxis(yt.reshape(m, g.out_count, n), -1, 0), bias, out, relu, residual)


def conv_backward_data(dy, weights, geom, out):
    """Gradient of :func:`conv_forward` w.r.t. x: out (n, C, *in_shape) = col2im(Wᵀ · dy)."""
    conv_backward(None, dy, weights, geom, out, weight_grad=False)
    return out


def conv_weight_grad(x, dy, geom):
    """Gradient of :func:`conv_forward` w.r.t. the weights, summed over the images: (M, C/G·Π kernel)."""
    return conv_backward(x, dy, None, geom)[0]


def _chunks(num, per_image_bytes):
    """Slices over the batch so that one chunk's work buffers stay under COL_BUFFER_BYTES."""
    step = max(1, COL_BUFFER_BYTES // max(1, per_image_bytes))
    for start in range(0, num, step):
        yield slice(start, min(num, start + step))


# =============================================================================
# Convolution parameters shared by Convolution, Deconvolution and Im2col
# =============================================================================

def _spatial_values(layer, cp, name, num_spatial, default, min_value):
    """One ``repeated`` spatial field or its _h/_w pair (base_conv_layer.cpp LayerSetUp)."""
    repeated = list(getattr(cp, name))
    has_h, has_w = cp.HasField(name + "_h"), cp.HasField(name + "_w")
    if has_h or has_w:
        if num_spatial != 2:
            raise layer.error(f"{name}_h & {name}_w can only be used for 2-D convolution "
                              f"(the input has {num_spatial} spatial axes)")
        if repeated:
            raise layer.error(f"either {name} or {name}_h/{name}_w should be specified, not both "
                              f"({name}: {repeated}, {name}_h: {getattr(cp, name + '_h')}, "
                              f"{name}_w: {getattr(cp, name + '_w')})")
        values = [getattr(cp, name + "_h"), getattr(cp, name + "_w")]
    else:
        if len(repeated) not in (0, 1, num_spatial):
            raise layer.error(f"{name} must be specified once, or once per spatial dimension "
                              f"({name} specified {len(repeated)} times: {repeated}; "
                              f"{num_spatial} spatial dims)")
        if not repeated:
            values = [default] * num_spatial
        else:
            values = [repeated[0 if len(repeated) == 1 else i] for i in range(num_spatial)]
    for v in values:
        if v < min_value:
            raise layer.error(f"{name} must be at least {min_value} in every spatial dimension, "
                              f"got {values}")
    return tuple(int(v) for v in values)


def _kernel_values(layer, cp, num_spatial):
    """kernel_size (repeated) or kernel_h/kernel_w; every dimension nonzero."""
    if cp.HasField("kernel_h") or cp.HasField("kernel_w"):
        if num_spatial != 2:
            raise layer.error(f"kernel_h & kernel_w can only be used for 2-D convolution "
                              f"(the input has {num_spatial} spatial axes)")
        if len(cp.kernel_size):
            raise layer.error(f"either kernel_size or kernel_h/kernel_w should be specified, not both "
                              f"(kernel_size: {list(cp.kernel_size)}, kernel_h: {cp.kernel_h}, "
                              f"kernel_w: {cp.kernel_w})")
        values = (cp.kernel_h, cp.kernel_w)
    else:
        given = list(cp.kernel_size)
        if len(given) not in (1, num_spatial):
            raise layer.error(f"kernel_size must be specified once, or once per spatial dimension "
                              f"(kernel_size specified {len(given)} times: {given}; "
                              f"{num_spatial} spatial dims)")
        values = tuple(given[0 if len(given) == 1 else i] for i in range(num_spatial))
    if any(v <= 0 for v in values):
        raise layer.error(f"filter dimensions must be nonzero: kernel {list(values)}")
    return tuple(int(v) for v in values)


def _parse_conv_geometry_params(layer, cp, num_spatial):
    """(kernel, stride, pad, dilation) tuples from a ConvolutionParameter."""
    kernel = _kernel_values(layer, cp, num_spatial)
    stride = _spatial_values(layer, cp, "stride", num_spatial, 1, 1)
    pad = _spatial_values(layer, cp, "pad", num_spatial, 0, 0)
    dilation = list(cp.dilation)
    if len(dilation) not in (0, 1, num_spatial):
        raise layer.error(f"dilation must be specified once, or once per spatial dimension "
                          f"(dilation specified {len(dilation)} times: {dilation}; "
                          f"{num_spatial} spatial dims)")
    dilation = tuple(int(dilation[0 if len(dilation) == 1 else i]) if dilation else 1
                     for i in range(num_spatial))
    if any(d <= 0 for d in dilation):
        raise layer.error(f"dilation must be nonzero in every spatial dimension, got {list(dilation)}")
    return kernel, stride, pad, dilation


def _channel_axis(layer, blob, axis):
    try:
        return blob.canonical_axis(axis)
    except IndexError:
        raise layer.error(f"axis {axis} is out of range for a bottom of shape {blob.shape}") from None


def _cast(array, dtype):
    return array if array.dtype == dtype else array.astype(dtype)


# =============================================================================
# Convolution and Deconvolution
# =============================================================================

class _BaseConvolution(Layer):
    """Shared setup/reshape of Convolution and Deconvolution (Caffe's BaseConvolutionLayer).

    Parameters (``convolution_param``): num_output (required, > 0); bias_term
    (default true); kernel_size / kernel_h,kernel_w; stride (default 1) or
    stride_h,stride_w; pad (default 0) or pad_h,pad_w; dilation (default 1);
    group (default 1, divides channels and num_output); weight_filler and
    bias_filler (default constant 0); axis (channel axis, default 1: the axes
    before it are batch axes, those after it spatial); force_nd_im2col and
    engine choose Caffe implementations with identical results and are accepted.
    Any number of bottoms of one shape, one top per bottom, same weights.
    """

    min_bottom_blobs = 1
    min_top_blobs = 1
    equal_num_bottom_top_blobs = True
    reverse_dimensions = False

    def setup(self, bottom, top):
        cp = self.layer_param.convolution_param
        x = bottom[0]
        self.channel_axis = _channel_axis(self, x, cp.axis)
        self.num_spatial = x.num_axes - self.channel_axis - 1
        self.kernel, self.stride, self.pad, self.dilation = \
            _parse_conv_geometry_params(self, cp, self.num_spatial)
        self.channels = x.shape[self.channel_axis]
        self.num_output = int(cp.num_output)
        if self.num_output <= 0:
            raise self.error(f"num_output must be positive, got {cp.num_output}")
        self.group = int(cp.group)
        if self.group <= 0:
            raise self.error(f"group must be positive, got {cp.group}")
        if self.channels % self.group:
            raise self.error(f"the number of input channels ({self.channels}) must be a multiple "
                             f"of group ({self.group})")
        if self.num_output % self.group:
            raise self.error(f"num_output ({self.num_output}) must be a multiple of group ({self.group})")
        if self.reverse_dimensions:
            conv_out, conv_in = self.channels, self.num_output
        else:
            conv_out, conv_in = self.num_output, self.channels
        self.bias_term = bool(cp.bias_term)
        weight_shape = (conv_out, conv_in // self.group) + self.kernel
        bias_shape = (self.num_output,)
        if self.blobs:
            # base_conv_layer.cpp: preloaded blobs must match exactly
            if len(self.blobs) != 1 + self.bias_term:
                raise self.error(f"incorrect number of weight blobs: expected {1 + self.bias_term} "
                                 f"(bias_term: {self.bias_term}), got {len(self.blobs)}")
            if tuple(self.blobs[0].shape) != weight_shape:
                raise self.error(f"incorrect weight shape: expected shape {weight_shape}; "
                                 f"instead, shape was {tuple(self.blobs[0].shape)}")
            if self.bias_term and tuple(self.blobs[1].shape) != bias_shape:
                raise self.error(f"incorrect bias shape: expected shape {bias_shape}; "
                                 f"instead, shape was {tuple(self.blobs[1].shape)}")
        else:
            weights = Blob(weight_shape)
            fill(weights, cp.weight_filler)
            self.blobs = [weights]
            if self.bias_term:
                bias = Blob(bias_shape)
                fill(bias, cp.bias_filler)
                self.blobs.append(bias)

    def reshape(self, bottom, top):
        x = bottom[0]
        if x.num_axes != self.channel_axis + 1 + self.num_spatial:
            raise self.error(f"bottom num_axes may not change: expected "
                             f"{self.channel_axis + 1 + self.num_spatial} axes, got shape {x.shape}")
        if x.shape[self.channel_axis] != self.channels:
            raise self.error(f"input size incompatible with convolution kernel: expected "
                             f"{self.channels} channels on axis {self.channel_axis}, got shape {x.shape}")
        for b in bottom[1:]:
            if b.shape != x.shape:
                raise self.error(f"all inputs must have the same shape: {x.shape} vs {b.shape}")
        self.num = x.count_range(0, self.channel_axis)
        spatial = x.shape[self.channel_axis + 1:]
        args = (self.kernel, self.stride, self.pad, self.dilation)
        if self.reverse_dimensions:
            out_spatial = tuple(deconv_output_size(s, *a) for s, *a in zip(spatial, *args))
            if any(o <= 0 for o in out_spatial):
                raise self.error(f"output size {out_spatial} is not positive for input {spatial}")
            self.geom = ConvGeometry(self.num_output, out_spatial, spatial, *args, self.group)
        else:
            out_spatial = tuple(conv_output_size(s, *a) for s, *a in zip(spatial, *args))
            if any(o <= 0 for o in out_spatial):
                raise self.error(f"output size {out_spatial} is not positive for input {spatial} "
                                 f"(kernel {self.kernel}, stride {self.stride}, pad {self.pad}, "
                                 f"dilation {self.dilation})")
            self.geom = ConvGeometry(self.channels, spatial, out_spatial, *args, self.group)
        top_shape = x.shape[:self.channel_axis] + (self.num_output,) + out_spatial
        for t in top:
            t.reshape(top_shape)

    # shapes (num, channels, *spatial) used by the math functions
    def _bottom_shape(self):
        g = self.geom
        if self.reverse_dimensions:
            return (self.num, self.channels) + g.out_shape
        return (self.num, self.channels) + g.in_shape

    def _top_shape(self):
        g = self.geom
        if self.reverse_dimensions:
            return (self.num, self.num_output) + g.in_shape
        return (self.num, self.num_output) + g.out_shape

    def _params(self, dtype):
        weights = _cast(self.blobs[0].data, dtype)
        bias = _cast(self.blobs[1].data, dtype) if self.bias_term else None
        return weights, bias

    def _chunk_slices(self, itemsize):
        conv_out = self.blobs[0].shape[0]  # M in the convolution direction
        return list(_chunks(self.num, self.geom.col_bytes_per_image(itemsize, conv_out)))

    def _param_needs(self):
        """(weight gradient, bias gradient) wanted: Caffe's param_propagate_down (all, standalone)."""
        flags = getattr(self, "param_propagate_down", None) or [True] * len(self.blobs)
        return flags[0], self.bias_term and flags[-1]

    def _add_bias(self, y, bias):
        y_flat = _view(y, (y.shape[0], self.num_output, -1))
        y_flat += bias.reshape(1, -1, 1)

    def _accumulate_bias_grad(self, dy):
        dyv = dy.reshape(dy.shape[0], self.num_output, -1)
        self.blobs[1].diff[...] += dyv.sum(axis=(0, 2))


@register_layer("Convolution")
class ConvolutionLayer(_BaseConvolution):
    """Caffe's Convolution: y = W ⋆ x + b (cross-correlation, Caffe's convention).

    Shapes: bottom (N, C, *S); top (N, M, *O) with M = num_output and
    O = floor((S + 2p − (d(k−1)+1)) / s) + 1 per spatial axis (conv_layer.cpp).
    Weights (M, C/group, *kernel), bias (M,).  Any number of spatial axes
    (N-D convolution, as Caffe's im2col_nd); 1x1 stride-1 pad-0 kernels skip
    im2col and are one plain matmul.
    """

    #: Set by the net for a memory-saving forward that also runs the Eltwise SUM right after
    #: this layer (framework.net, _plan_residual_folds): (the Eltwise's top, its other bottom).
    #: The output plus that bottom is written into that top in the output pass, and this
    #: layer's own top is left unwritten.  Exact: the same two sums, one memory pass fewer.
    fused_residual = None

    def can_fold_relu(self):
        return len(self.layer_param.top) == 1

    def can_fold_residual(self):
        """Whether forward can write ``top + residual`` into another blob (``fused_residual``)."""
        return len(self.layer_param.top) == 1

    def forward(self, bottom, top):
        relu = self.fused_relu
        fold = self.fused_residual
        for b, t in zip(bottom, top):
            x = b.data.reshape(self._bottom_shape())
            y = _view((t if fold is None else fold[0]).data, self._top_shape())
            residual = None if fold is None else fold[1].data.reshape(self._top_shape())
            weights, bias = self._params(x.dtype)
            for sl in self._chunk_slices(x.itemsize):
                r = None if residual is None else residual[sl]
                if _forward_in_position_major(x[sl], weights, self.geom):
                    conv_forward_position_major(x[sl], weights, self.geom, y[sl], bias, relu, r)
                else:
                    conv_forward(x[sl], weights, self.geom, y[sl], bias, relu, r)

    def backward(self, top, propagate_down, bottom):
        want_weights, want_bias = self._param_needs()
        for i, (b, t) in enumerate(zip(bottom, top)):
            dx = _view(b.diff, self._bottom_shape()) if propagate_down[i] else None
            if dx is None and not want_weights and not want_bias:
                continue
            x = b.data.reshape(self._bottom_shape())
            dy = t.diff.reshape(self._top_shape())
            weights, _ = self._params(x.dtype)
            for sl in self._chunk_slices(x.itemsize):
                wgrad, bgrad = conv_backward(x[sl], dy[sl], weights, self.geom,
                                             None if dx is None else dx[sl], want_weights, want_bias)
                if wgrad is not None:
                    wdiff = self.blobs[0].diff
                    wdiff += wgrad.reshape(wdiff.shape)
                if bgrad is not None:
                    self.blobs[1].diff[...] += bgrad


@register_layer("Deconvolution")
class DeconvolutionLayer(_BaseConvolution):
    """Caffe's Deconvolution (transposed convolution, deconv_layer.cpp).

    Forward is Convolution's backward-data pass, backward is its forward:
    bottom (N, C, *S); top (N, M, *O) with O = s(S − 1) + d(k − 1) + 1 − 2p.
    Weights (C, M/group, *kernel), bias (M,).
    """

    reverse_dimensions = True

    def forward(self, bottom, top):
        for b, t in zip(bottom, top):
            x = b.data.reshape(self._bottom_shape())
            y = _view(t.data, self._top_shape())
            weights, bias = self._params(x.dtype)
            for sl in self._chunk_slices(x.itemsize):
                conv_backward_data(x[sl], weights, self.geom, y[sl])
            if bias is not None:
                self._add_bias(y, bias)

    def backward(self, top, propagate_down, bottom):
        for i, (b, t) in enumerate(zip(bottom, top)):
            x = b.data.reshape(self._bottom_shape())
            dy = t.diff.reshape(self._top_shape())
            weights, _ = self._params(x.dtype)
            if self.bias_term:
                self._accumulate_bias_grad(dy)
            dx = _view(b.diff, self._bottom_shape()) if propagate_down[i] else None
            wdiff = self.blobs[0].diff
            for sl in self._chunk_slices(x.itemsize):
                # deconv_layer.cpp: weight grad = im2col(top diff) against bottom data
                wdiff += conv_weight_grad(dy[sl], x[sl], self.geom).reshape(wdiff.shape)
                if dx is not None:
                    conv_forward(dy[sl], weights, self.geom, dx[sl])


@register_layer("Im2col")
class Im2colLayer(Layer):
    """Caffe's Im2col layer: the convolution column buffer as a blob.

    Reads kernel/stride/pad/dilation/axis from ``convolution_param`` (group,
    num_output, fillers and bias are not used by Caffe's Im2col).
    Bottom (N, C, *S) -> top (N, C·Π kernel, *O), rows in Caffe's channel-major
    order (row c·Π k + kernel offset), O as Convolution's output size.
    """

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def setup(self, bottom, top):
        cp = self.layer_param.convolution_param
        self.channel_axis = _channel_axis(self, bottom[0], cp.axis)
        self.num_spatial = bottom[0].num_axes - self.channel_axis - 1
        if self.num_spatial < 1:
            raise self.error(f"needs at least one spatial axis after the channel axis "
                             f"{self.channel_axis}; bottom shape {bottom[0].shape}")
        self.kernel, self.stride, self.pad, self.dilation = \
            _parse_conv_geometry_params(self, cp, self.num_spatial)

    def reshape(self, bottom, top):
        x = bottom[0]
        if x.num_axes != self.channel_axis + 1 + self.num_spatial:
            raise self.error(f"bottom num_axes may not change: got shape {x.shape}")
        spatial = x.shape[self.channel_axis + 1:]
        args = (self.kernel, self.stride, self.pad, self.dilation)
        out_spatial = tuple(conv_output_size(s, *a) for s, *a in zip(spatial, *args))
        if any(o <= 0 for o in out_spatial):
            raise self.error(f"output size {out_spatial} is not positive for input {spatial}")
        self.channels = x.shape[self.channel_axis]
        self.num = x.count_range(0, self.channel_axis)
        self.geom = ConvGeometry(self.channels, spatial, out_spatial, *args, 1)
        top[0].reshape(x.shape[:self.channel_axis]
                       + (self.channels * self.geom.kernel_count,) + out_spatial)

    def forward(self, bottom, top):
        g = self.geom
        x = bottom[0].data.reshape((self.num, self.channels) + g.in_shape)
        y = _view(top[0].data, (self.num, 1, g.col_rows, g.out_count))
        for sl in _chunks(self.num, g.col_bytes_per_image(x.itemsize)):
            im2col(x[sl], g, out=y[sl])

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        g = self.geom
        dy = top[0].diff.reshape(self.num, 1, g.col_rows, g.out_count)
        dx = _view(bottom[0].diff, (self.num, self.channels) + g.in_shape)
        for sl in _chunks(self.num, g.col_bytes_per_image(dy.itemsize)):
            col2im(dy[sl], g, dx[sl])


# =============================================================================
# Pooling
# =============================================================================

def pooled_size(size, kernel, stride, pad, ceil_mode):
    """Pooling output size before the padding correction (pooling_layer.cpp Reshape)."""
    span = size + 2 * pad - kernel
    steps = -((-span) // stride) if ceil_mode else span // stride
    return steps + 1


class PoolingKernel:
    """2-D pooling over (N, C, H, W) with Caffe's exact window rules (pooling_layer.cpp/.cu).

    ``method``: PoolingParameter MAX / AVE / STOCHASTIC; ``kernel``, ``stride``,
    ``pad``: (h, w) pairs; ``ceil_mode``: round_mode CEIL (default) or FLOOR;
    ``train``: STOCHASTIC samples in TRAIN and takes Σx²/Σx in TEST.
    ``forward`` returns the pooled top; MAX keeps the argmax plane index
    (h·W + w, −1 for an empty window) in ``mask``, STOCHASTIC TRAIN the sampled
    index; ``backward`` routes gradients from them (or from an explicit mask).
    """

    def __init__(self, method, kernel, stride, pad, ceil_mode=True, train=True):
        self.method = method
        self.kernel = tuple(kernel)
        self.stride = tuple(stride)
        self.pad = tuple(pad)
        self.ceil_mode = ceil_mode
        self.train = train
        self._mask = None
        self._code = None  # MAX over disjoint windows: the argmax as a tap number (see mask)

    @property
    def mask(self):
        """The argmax (MAX) or sampled (STOCHASTIC TRAIN) plane index h·W + w per output, −1 for none.

        The disjoint-window MAX path keeps only the tap number per output; the
        plane indices are derived from it when asked for (a mask top).
        """
        if self._mask is None and self._code is not None:
            self._mask = self._code_to_index(self._code)
        return self._mask

    @mask.setter
    def mask(self, value):
        self._mask = value
        self._code = None

    def output_shape(self, height, width):
        """(pooled_h, pooled_w) with Caffe's padding correction; it applies to both axes
        as soon as either pad is nonzero (pooling_layer.cpp)."""
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.pad
        out_h = pooled_size(height, kh, sh, ph, self.ceil_mode)
        out_w = pooled_size(width, kw, sw, pw, self.ceil_mode)
        if ph or pw:
            # the last window must start strictly inside the image (or its left/top padding)
            if (out_h - 1) * sh >= height + ph:
                out_h -= 1
            if (out_w - 1) * sw >= width + pw:
                out_w -= 1
        return out_h, out_w

    def set_input_shape(self, shape):
        """Record the bottom shape (N, C, H, W); returns the top shape."""
        self.in_shape = tuple(shape)
        n, c, h, w = shape
        self.out_hw = self.output_shape(h, w)
        return (n, c) + self.out_hw

    # -- helpers ---------------------------------------------------------------
    def _padded_hw(self, offset):
        """Extent of a padded plane (image at ``offset``) covering every window."""
        h, w = self.in_shape[2:]
        return tuple(max(o + s_in + o, (out - 1) * st + k)
                     for o, s_in, out, st, k in zip(offset, (h, w), self.out_hw, self.stride, self.kernel))

    def _offsets(self):
        (kh, kw), (sh, sw), (oh, ow) = self.kernel, self.stride, self.out_hw
        for i in range(kh):
            for j in range(kw):
                yield i, j, (slice(None), slice(None), slice(i, i + sh * (oh - 1) + 1, sh),
                             slice(j, j + sw * (ow - 1) + 1, sw))

    def _window_starts(self, offset):
        """Window starts in image coordinates for each output row / column."""
        (sh, sw), (oh, ow) = self.stride, self.out_hw
        return np.arange(oh) * sh - offset[0], np.arange(ow) * sw - offset[1]

    def _disjoint_windows(self):
        """True when no two windows overlap (pad 0, stride ≥ kernel): then every bottom element
        feeds at most one output.  The last windows may be clipped at the image edge."""
        return self.pad == (0, 0) and all(s >= k for s, k in zip(self.stride, self.kernel))

    def _tap_index(self, i, j, offset):
        """Plane index h·W + w of kernel tap (i, j) for every window, shape (out_h, out_w)."""
        hs, ws = self._window_starts(offset)
        return (hs[:, None] + i) * self.in_shape[3] + (ws[None, :] + j)

    # -- forward ---------------------------------------------------------------
    def forward(self, x, out, need_mask=True):
        """Pool ``x`` (N, C, H, W) into ``out``; MAX computes the argmax mask only if ``need_mask``."""
        if self.method == _POOL.MAX:
            return self._forward_max(x, out, need_mask)
        if self.method == _POOL.AVE:
            return self._forward_ave(x, out)
        if self.method == _POOL.STOCHASTIC:
            return self._forward_stochastic(x, out)
        raise ValueError(f"unknown pooling method {self.method}")

    def _forward_max(self, x, out, need_mask):
        # window [start, min(start + k, H)) clipped at 0: padding is -inf and never wins;
        # an empty window keeps -FLT_MAX; fmax, like Caffe's '>', never picks a NaN
        if need_mask and self._disjoint_windows():
            return self._forward_max_disjoint(x, out)
        # planes are independent: treat (N·C) as the batch and split it over threads
        planes = (x.shape[0] * x.shape[1], 1)
        xv, outv = x.reshape(planes + x.shape[2:]), _view(out, planes + out.shape[2:])
        self.mask = None
        if need_mask:
            code = np.empty(outv.shape, dtype=self._code_dtype())
            _split_apply(self._max_and_code, (xv, outv, code), x.nbytes)
            self._code = code.reshape(out.shape)
        else:
            _split_apply(self._max_planes, (xv, outv), x.nbytes)
        return out

    def _max_and_code(self, x, out, code):
        """:meth:`_max_planes` into ``out`` and the first maximal tap's number into ``code``."""
        xp = self._max_planes(x, out)
        self._first_hit([xp[window] for _, _, window in self._offsets()], out, code)

    def _max_planes(self, x, out):
        """out = max over each window of x (N, C, H, W); returns the -inf padded input.

        Separable: the max over the kernel's columns for every padded row first
        (kw passes over an (H + 2p) x out_w array), then over its rows (kh passes
        over the output), instead of kh·kw passes over the output; max is exact,
        so the result is the same, and fmax's NaN rule composes.
        """
        xp = _pad_spatial(x, self.pad, self._padded_hw(self.pad), value=-np.inf)
        (kh, kw), (sh, sw), (oh, ow) = self.kernel, self.stride, self.out_hw
        rows = np.array(xp[:, :, :, 0:sw * (ow - 1) + 1:sw])
        for j in range(1, kw):
            np.fmax(rows, xp[:, :, :, j:j + sw * (ow - 1) + 1:sw], out=rows)
        out[...] = -_FLT_MAX
        for i in range(kh):
            np.fmax(out, rows[:, :, i:i + sh * (oh - 1) + 1:sh], out=out)
        return xp

    def _code_dtype(self):
        taps = self.kernel[0] * self.kernel[1]
        return np.int8 if taps < 127 else np.int16 if taps < 32767 else np.int32

    def _forward_max_disjoint(self, x, out):
        """MAX with disjoint windows: fmax over the taps, then the first tap equal to it;
        keeps the tap numbers (``_code``) for :meth:`_backward_disjoint`.

        No separable pass (each tap is read once anyway); the result equals
        :meth:`_max_planes` + :meth:`_first_hit`.
        """
        (kh, kw), (oh, ow) = self.kernel, self.out_hw
        n, c, h, w = x.shape
        if self.stride == self.kernel:
            # the windows tile an (oh·kh, ow·kw) plane: one copy splits it into kh·kw contiguous
            # tap planes, so the 2·kh·kw passes below run on contiguous data, not strided reads
            extent = (oh * kh, ow * kw)
            xp = x if extent[0] <= h and extent[1] <= w else _pad_spatial(
                x, (0, 0), (max(h, extent[0]), max(w, extent[1])), value=-np.inf)
            tiles = _view(xp[:, :, :extent[0], :extent[1]], (n, c, oh, kh, ow, kw))
            planes = _scratch((kh, kw) + out.shape, x.dtype, 0)  # the columns' slot: less memory touched
            pcopyto(planes, tiles.transpose(3, 5, 0, 1, 2, 4))
            taps = [planes[i, j] for i in range(kh) for j in range(kw)]
        else:  # gaps between the windows: strided taps of the (-inf padded) bottom
            xp = _pad_spatial(x, (0, 0), self._padded_hw((0, 0)), value=-np.inf)
            taps = [xp[window] for _, _, window in self._offsets()]
        np.fmax(taps[0], -_FLT_MAX, out=out)  # Caffe starts at -FLT_MAX; NaN never wins
        for tap in taps[1:]:
            np.fmax(out, tap, out=out)
        self.mask = None
        self._code = self._first_hit(taps, out)
        return out

    def _first_hit(self, taps, best, code=None):
        """Per output, the number of the first tap (row-major window order) equal to ``best``, −1 if none
        (written into ``code`` if given).

        Caffe's strict '>' scan keeps the first maximum (pooling_layer.cpp).  Visiting the
        taps in reverse, ``code += hit·(k − code)`` leaves the first hit's tap number k
        (small-integer arithmetic: far cheaper than masked assignment).
        """
        code_dtype = self._code_dtype()
        if code is None:
            code = np.empty(best.shape, dtype=code_dtype)
        code[...] = -1
        step = np.empty_like(code)
        hit = np.empty(best.shape, dtype=bool)
        for k in range(len(taps) - 1, -1, -1):
            np.equal(taps[k], best, out=hit)
            np.subtract(code_dtype(k), code, out=step)
            np.multiply(step, hit, out=step)
            np.add(code, step, out=code)
        return code

    def _code_to_index(self, code):
        """Tap numbers (−1: none) as plane indices h·W + w (Caffe's mask)."""
        width, kw = self.in_shape[3], self.kernel[1]
        taps_delta = np.array([i * width + j for i in range(self.kernel[0]) for j in range(kw)],
                              dtype=np.int64)
        return np.where(code >= 0, self._tap_index(0, 0, self.pad) + taps_delta.take(code), -1)

    def max_mask(self, x):
        """Recompute the MAX argmax mask from the bottom data ``x``."""
        out = np.empty(x.shape[:2] + self.out_hw, dtype=x.dtype)
        self._forward_max(x, out, need_mask=True)
        return self.mask

    def _ave_divisor(self, dtype):
        # pool_size counts padding but not the overhang past H + pad (pooling_layer.cpp)
        h, w = self.in_shape[2:]
        hs, ws = self._window_starts(self.pad)
        size_h = np.minimum(hs + self.kernel[0], h + self.pad[0]) - hs
        size_w = np.minimum(ws + self.kernel[1], w + self.pad[1]) - ws
        return np.outer(size_h, size_w).astype(dtype)

    def _forward_ave(self, x, out):
        if self.out_hw == (1, 1) and self.pad == (0, 0) and tuple(self.kernel) == tuple(x.shape[2:]):
            # one window covering the plane (global pooling): sum / (H·W)
            n, c = x.shape[:2]
            np.sum(x.reshape(n, c, -1), axis=2, out=_view(out, (n, c)))
            out /= out.dtype.type(x.shape[2] * x.shape[3])
            return out
        xp = _pad_spatial(x, self.pad, self._padded_hw(self.pad))
        out[...] = 0
        for _, _, window in self._offsets():
            out += xp[window]
        with np.errstate(divide="ignore", invalid="ignore"):
            out /= self._ave_divisor(out.dtype)
        return out

    def _forward_stochastic(self, x, out):
        # pooling_layer.cu: windows [o·s, min(o·s + k, H)), no padding
        h, w = self.in_shape[2:]
        hs, ws = self._window_starts((0, 0))
        xp = _pad_spatial(x, (0, 0), self._padded_hw((0, 0)))
        if not self.train:
            # TEST: Σx² / (FLT_MIN + Σx) over the window (StoPoolForwardTest)
            total = np.full(out.shape, _FLT_MIN, dtype=out.dtype)
            out[...] = 0
            for _, _, window in self._offsets():
                values = xp[window]
                total += values
                out += values * values
            out /= total
            self.mask = None
            return out
        # TRAIN: u ~ U[0, 1); pick the first tap whose running sum reaches u·Σx (StoPoolForwardTrain)
        total = np.zeros(out.shape, dtype=out.dtype)
        for _, _, window in self._offsets():
            total += xp[window]
        rand_dtype = out.dtype if out.dtype in (np.float32, np.float64) else np.float64
        threshold = _random.rng().random(out.shape, dtype=rand_dtype) * total
        running = np.zeros(out.shape, dtype=out.dtype)
        mask = np.full(out.shape, -1, dtype=np.int64)
        last = np.full(out.shape[2:], -1, dtype=np.int64)
        for i, j, window in self._offsets():
            inside = ((hs + i) < h)[:, None] & ((ws + j) < w)[None, :]
            running += xp[window]
            tap = self._tap_index(i, j, (0, 0))
            np.copyto(mask, tap, where=inside & (mask < 0) & (running >= threshold))
            np.copyto(last, tap, where=inside)
        # Caffe leaves the top unset when no tap reaches the threshold (possible only with
        # negative sums); we take the window's last tap so the output is defined
        np.copyto(mask, last, where=mask < 0)
        self.mask = mask
        flat = x.reshape(x.shape[0] * x.shape[1], -1)
        out[...] = np.take_along_axis(flat, mask.reshape(flat.shape[0], -1), axis=1).reshape(out.shape)
        return out

    # -- backward --------------------------------------------------------------
    def backward(self, dy, dx, mask=None, x=None):
        """Write the bottom gradient into ``dx`` (N, C, H, W) from the top gradient ``dy``.

        MAX uses ``mask`` if given, else the mask kept by forward, else one recomputed
        from the bottom data ``x``; STOCHASTIC uses the TRAIN samples.
        """
        if self.method == _POOL.AVE:
            self._backward_ave(dy, dx)
            return
        if self.method == _POOL.STOCHASTIC and not self.train:
            raise ValueError("stochastic pooling has no backward in the TEST phase")
        if mask is None:
            if self._mask is None and self._code is None:
                self.max_mask(x)
            if self._code is not None and dy.dtype == dx.dtype:
                if not self._disjoint_windows():
                    self._backward_overlapping(dy, dx, self._code)
                    return
                if self._padded_hw((0, 0)) == tuple(self.in_shape[2:]):
                    self._backward_disjoint(dy, dx, self._code)
                    return
            # clipped last windows (a small edge case: LeNet's 7x7 -> 4x4 pool2 on 26x26
            # crops) scatter; selecting into a padded plane measured slower
            mask = self.mask
        self._backward_scatter(dy, dx, mask)

    def _backward_disjoint(self, dy, dx, code):
        """dx from the tap numbers of disjoint windows: each bottom element receives at most one
        gradient, so Caffe's ``dx = 0; dx[argmax] += dy`` is a select per tap, done on the bits
        (dy AND an all-ones / all-zeros mask): exact, and a NaN in dy stays where it belongs.
        The windows must lie inside the image (none clipped)."""
        if not all(s == k and o * k == size for s, k, o, size in zip(self.stride, self.kernel,
                                                                     self.out_hw, self.in_shape[2:])):
            dx[...] = 0  # gaps between the windows or rows/columns past the last one
        bits = np.dtype(f"u{dy.itemsize}")
        hit = np.empty(code.shape, dtype=bool)
        select = np.empty(code.shape, dtype=bits)
        dy_bits = dy.view(bits)
        kw = self.kernel[1]
        for i, j, window in self._offsets():
            np.equal(code, i * kw + j, out=hit)
            np.negative(hit.view(np.uint8), out=select, dtype=bits, casting="unsafe")
            np.bitwise_and(dy_bits, select, out=dx[window].view(bits))

    def _backward_overlapping(self, dy, dx, code):
        """dx from the tap numbers of overlapping windows, split over threads by (N·C) planes.

        Tap by tap, the gradient of the outputs whose maximum that tap holds is added to the
        tap's window of a zero (padded) plane.  The taps go in reverse, so each bottom element
        sums its windows' gradients in output row-major order, as pooling_layer.cpp's
        ``bottom_diff[argmax] += top_diff`` loop does: the same float32 sums.
        """
        planes = (dy.shape[0] * dy.shape[1], 1)
        _split_apply(self._backward_overlapping_planes,
                     (dy.reshape(planes + dy.shape[2:]), _view(dx, planes + dx.shape[2:]),
                      code.reshape(planes + code.shape[2:])), dx.nbytes)

    def _backward_overlapping_planes(self, dy, dx, code):
        h, w = self.in_shape[2:]
        padded = self._padded_hw(self.pad)
        direct = self.pad == (0, 0) and padded == (h, w)
        acc = dx if direct else np.empty(dx.shape[:2] + padded, dtype=dx.dtype)
        acc[...] = 0
        bits = np.dtype(f"u{dy.itemsize}")
        hit = np.empty(code.shape, dtype=bool)
        select = np.empty(code.shape, dtype=bits)
        picked = np.empty(code.shape, dtype=bits)
        dy_bits = dy.view(bits)
        kw = self.kernel[1]
        for i, j, window in reversed(list(self._offsets())):
            np.equal(code, i * kw + j, out=hit)
            # dy where hit, +0.0 elsewhere, on the bits (a ufunc's where= measured 2.5x slower):
            # a NaN or inf in dy stays in its window
            np.negative(hit.view(np.uint8), out=select, dtype=bits, casting="unsafe")
            np.bitwise_and(dy_bits, select, out=picked)
            target = acc[window]
            np.add(target, picked.view(dy.dtype), out=target)
        if not direct:
            ph, pw = self.pad
            dx[...] = acc[:, :, ph:ph + h, pw:pw + w]

    def _backward_scatter(self, dy, dx, mask):
        """dx[index] += dy for each pooled output (MAX argmax / STOCHASTIC sample)."""
        n, c, h, w = dx.shape
        index = np.asarray(mask).reshape(n * c, -1).astype(np.int64)
        valid = (index >= 0) & (index < h * w)  # Caffe would write out of bounds for -1
        index = index + (np.arange(n * c) * (h * w))[:, None]
        grad = np.bincount(index[valid], weights=dy.reshape(n * c, -1)[valid], minlength=dx.size)
        dx[...] = grad.reshape(dx.shape)

    def _backward_ave(self, dy, dx):
        h, w = self.in_shape[2:]
        with np.errstate(divide="ignore", invalid="ignore"):
            scaled = dy / self._ave_divisor(dy.dtype)
        dxp = np.zeros(dy.shape[:2] + self._padded_hw(self.pad), dtype=dy.dtype)
        for _, _, window in self._offsets():
            dxp[window] += scaled
        ph, pw = self.pad
        dx[...] = dxp[:, :, ph:ph + h, pw:pw + w]


def _pooling_setup_values(layer, pp):
    """kernel/stride/pad (h, w) pairs from a PoolingParameter, checked as pooling_layer.cpp."""
    has = pp.HasField
    if pp.global_pooling:
        if has("kernel_size") or has("kernel_h") or has("kernel_w"):
            raise layer.error("with global_pooling: true the filter size cannot be specified "
                              f"(kernel_size: {pp.kernel_size}, kernel_h: {pp.kernel_h}, "
                              f"kernel_w: {pp.kernel_w})")
        kernel = None
    else:
        if has("kernel_size") and (has("kernel_h") or has("kernel_w")):
            raise layer.error(f"filter size is kernel_size OR kernel_h and kernel_w; not both "
                              f"(kernel_size: {pp.kernel_size}, kernel_h: {pp.kernel_h}, "
                              f"kernel_w: {pp.kernel_w})")
        if not has("kernel_size") and not (has("kernel_h") and has("kernel_w")):
            raise layer.error("the filter size needs kernel_size, or both kernel_h and kernel_w "
                              f"(kernel_h given: {has('kernel_h')}, kernel_w given: {has('kernel_w')})")
        kernel = (pp.kernel_size,) * 2 if has("kernel_size") else (pp.kernel_h, pp.kernel_w)
        if min(kernel) <= 0:
            raise layer.error(f"filter dimensions cannot be zero: kernel {kernel}")
    for name in ("pad", "stride"):
        if has(name + "_h") != has(name + "_w") or (has(name) and has(name + "_h")):
            raise layer.error(f"{name} is {name} OR {name}_h and {name}_w are required "
                              f"({name}: {getattr(pp, name)}, {name}_h: {getattr(pp, name + '_h')}, "
                              f"{name}_w: {getattr(pp, name + '_w')})")
    pad = (pp.pad_h, pp.pad_w) if has("pad_h") else (pp.pad, pp.pad)
    stride = (pp.stride_h, pp.stride_w) if has("stride_h") else (pp.stride, pp.stride)
    if min(stride) <= 0:
        raise layer.error(f"stride must be positive, got {stride}")
    if pp.global_pooling and (pad != (0, 0) or stride != (1, 1)):
        raise layer.error(f"with global_pooling: true only pad = 0 and stride = 1 are allowed "
                          f"(pad {pad}, stride {stride})")
    return kernel, tuple(int(s) for s in stride), tuple(int(p) for p in pad)


def _check_pooling_pad(layer, method, kernel, pad):
    """pooling_layer.cpp: padding only for AVE/MAX, and smaller than the kernel."""
    if pad[0] or pad[1]:
        if method not in (_POOL.AVE, _POOL.MAX):
            raise layer.error(f"padding is implemented only for average and max pooling "
                              f"(pool: {_POOL.PoolMethod.Name(method)}, pad {pad})")
        if pad[0] >= kernel[0] or pad[1] >= kernel[1]:
            raise layer.error(f"pad must be smaller than the kernel: pad {pad}, kernel {kernel}")


def _check_4d(layer, blob):
    if blob.num_axes != 4:
        raise layer.error(f"input must have 4 axes (num, channels, height, width), got shape {blob.shape}")


@register_layer("Pooling")
class PoolingLayer(Layer):
    """Caffe's Pooling over (N, C, H, W) (pooling_layer.cpp / .cu).

    ``pooling_param``: pool MAX (default) / AVE / STOCHASTIC; kernel_size or
    kernel_h,kernel_w; stride (default 1) or stride_h,stride_w; pad (default 0)
    or pad_h,pad_w; global_pooling (kernel = H×W; pad 0 and stride 1 only);
    round_mode CEIL (default) or FLOOR.

    Output size: ceil((H + 2p − k)/s) + 1 (floor with FLOOR), decremented when
    padding is used and (out − 1)·s ≥ H + p.  MAX windows are clipped to the
    image, ties go to the first maximum, an optional second top holds the
    argmax as float plane indices h·W + w.  AVE divides the sum over the
    clipped window by the window size clipped only at H + p.  STOCHASTIC samples
    one tap with probability ∝ activation in TRAIN (gradient flows to it) and
    returns Σx²/Σx in TEST (no backward in TEST).  ``engine`` is accepted (the
    results are Caffe's CPU ones whatever the engine).
    """

    exact_num_bottom_blobs = 1
    min_top_blobs = 1
    max_top_blobs = 2

    def setup(self, bottom, top):
        pp = self.layer_param.pooling_param
        self.method = pp.pool
        if len(top) > 1 and self.method != _POOL.MAX:
            raise self.error(f"only MAX pooling can produce a second (mask) top; "
                             f"pool is {_POOL.PoolMethod.Name(self.method)} with {len(top)} tops")
        kernel, self.stride, self.pad = _pooling_setup_values(self, pp)
        self.global_pooling = bool(pp.global_pooling)
        _check_4d(self, bottom[0])
        self.kernel = bottom[0].shape[2:] if self.global_pooling else tuple(int(k) for k in kernel)
        if min(self.kernel) <= 0:
            raise self.error(f"filter dimensions cannot be zero: kernel {self.kernel}")
        _check_pooling_pad(self, self.method, self.kernel, self.pad)
        self.ceil_mode = pp.round_mode == _POOL.CEIL
        self.pool = None

    def reshape(self, bottom, top):
        _check_4d(self, bottom[0])
        if self.global_pooling:
            self.kernel = tuple(bottom[0].shape[2:])
        self.pool = PoolingKernel(self.method, self.kernel, self.stride, self.pad, self.ceil_mode,
                                  train=(self.phase == _TRAIN))
        top_shape = self.pool.set_input_shape(bottom[0].shape)
        if min(top_shape[2:]) <= 0:
            raise self.error(f"pooled output {top_shape[2:]} is empty for input {bottom[0].shape} "
                             f"(kernel {self.kernel}, stride {self.stride}, pad {self.pad})")
        for t in top:
            t.reshape(top_shape)

    def forward(self, bottom, top):
        # the argmax is only needed for a mask top or a later backward (TRAIN);
        # a TEST-phase backward recomputes it from the bottom
        need_mask = len(top) > 1 or self.phase == _TRAIN
        self.pool.forward(bottom[0].data, top[0].data, need_mask)
        if len(top) > 1:
            top[1].data[...] = self.pool.mask

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        if self.method == _POOL.STOCHASTIC and self.phase != _TRAIN:
            raise self.error("STOCHASTIC pooling has no backward in the TEST phase "
                             "(Caffe routes gradients only through TRAIN-phase samples)")
        # pooling_layer.cpp: with a mask top, backward reads the argmax from top[1]
        mask = top[1].data if len(top) > 1 else None
        self.pool.backward(top[0].diff, bottom[0].diff, mask, bottom[0].data)


# =============================================================================
# SPP
# =============================================================================

@register_layer("SPP")
class SPPLayer(Layer):
    """Spatial pyramid pooling (spp_layer.cpp): Pooling per level, flattened and concatenated.

    ``spp_param``: pyramid_height L (≥ 1), pool MAX (default) / AVE / STOCHASTIC.
    Level i uses 2^i bins: kernel = stride = ceil(H / 2^i), pad = (kernel·2^i − H + 1) // 2
    (same for W), Pooling's CEIL output rule.  Top (N, Σ_i C·out_h·out_w), the
    levels concatenated in order, each flattened as (C, out_h, out_w); with
    L = 1 Caffe returns the single pooling's 4-D top (N, C, out_h, out_w).
    Caffe builds the inner Pooling layers with a default LayerParameter, so their
    phase is TRAIN: STOCHASTIC always samples, also in a TEST net.
    """

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def setup(self, bottom, top):
        sp = self.layer_param.spp_param
        self.pyramid_height = int(sp.pyramid_height)
        if self.pyramid_height < 1:
            raise self.error(f"pyramid_height must be at least 1, got {sp.pyramid_height}")
        self.method = int(sp.pool)  # SPPParameter and PoolingParameter enums share values
        _check_4d(self, bottom[0])

    def _level(self, level, height, width):
        bins = 2 ** level
        kernel, pad = [], []
        for size in (height, width):
            k = -(-size // bins)
            kernel.append(k)
            pad.append((k * bins - size + 1) // 2)
        _check_pooling_pad(self, self.method, kernel, pad)
        return PoolingKernel(self.method, kernel, kernel, pad, ceil_mode=True, train=True)

    def reshape(self, bottom, top):
        _check_4d(self, bottom[0])
        n, c, h, w = bottom[0].shape
        if h <= 0 or w <= 0:
            raise self.error(f"input dimensions cannot be zero: shape {bottom[0].shape}")
        self.pools = [self._level(i, h, w) for i in range(self.pyramid_height)]
        self.level_shapes = [p.set_input_shape(bottom[0].shape) for p in self.pools]
        if self.pyramid_height == 1:
            top[0].reshape(self.level_shapes[0])
        else:
            top[0].reshape(n, sum(_prod(s[1:]) for s in self.level_shapes))

    def forward(self, bottom, top):
        x = bottom[0].data
        n = x.shape[0]
        y = top[0].data.reshape(n, -1)
        start = 0
        for pool, shape in zip(self.pools, self.level_shapes):
            size = _prod(shape[1:])
            out = np.empty(shape, dtype=x.dtype)
            pool.forward(x, out, need_mask=self.phase == _TRAIN)
            y[:, start:start + size] = out.reshape(n, size)
            start += size

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dx = bottom[0].diff
        n = dx.shape[0]
        dy = top[0].diff.reshape(n, -1)
        total = np.zeros_like(dx)
        level_dx = np.empty_like(dx)
        start = 0
        for pool, shape in zip(self.pools, self.level_shapes):
            size = _prod(shape[1:])
            pool.backward(np.ascontiguousarray(dy[:, start:start + size]).reshape(shape), level_dx,
                          x=bottom[0].data)
            total += level_dx  # the Split inside Caffe's SPP sums the levels' gradients
            start += size
        dx[...] = total


# =============================================================================
# Crop
# =============================================================================

@register_layer("Crop")
class CropLayer(Layer):
    """Caffe's Crop (crop_layer.cpp): crop bottom[0] to bottom[1]'s shape.

    ``crop_param``: axis (default 2; axes from it on are cropped), offset
    (none: 0; one value for every cropped axis; or one per cropped axis).
    top = bottom[0][..., o_i : o_i + bottom[1].shape[i], ...] for i ≥ axis.
    Backward scatters the gradient into a zero bottom[0] diff; bottom[1] only
    provides a shape (its gradient is zero).
    """

    exact_num_bottom_blobs = 2
    exact_num_top_blobs = 1

    def setup(self, bottom, top):
        cp = self.layer_param.crop_param
        self.axis = _channel_axis(self, bottom[0], cp.axis)
        n_axes = bottom[0].num_axes
        self.offsets = [int(o) for o in cp.offset]
        if len(self.offsets) > 1 and self.axis + len(self.offsets) != n_axes:
            raise self.error(f"number of offset values specified ({len(self.offsets)}: {self.offsets}) "
                             f"must be equal to the number of dimensions following axis {self.axis} "
                             f"({n_axes - self.axis})")

    def reshape(self, bottom, top):
        src, ref = bottom
        n_axes = src.num_axes
        if ref.num_axes < n_axes:
            raise self.error(f"bottom[1] (shape {ref.shape}) has fewer axes than bottom[0] (shape {src.shape})")
        self.slices = []
        new_shape = []
        for i in range(n_axes):
            if i < self.axis:
                self.slices.append(slice(None))
                new_shape.append(src.shape[i])
                continue
            if not self.offsets:
                offset = 0
            elif len(self.offsets) == 1:
                offset = self.offsets[0]
            else:
                offset = self.offsets[i - self.axis]
            size = ref.shape[i]
            if src.shape[i] - offset < size:
                raise self.error(f"the crop for dimension {i} is out of bounds with size {size} and "
                                 f"offset {offset} (bottom[0] shape {src.shape})")
            self.slices.append(slice(offset, offset + size))
            new_shape.append(size)
        self.slices = tuple(self.slices)
        top[0].reshape(new_shape)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data[self.slices]

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            dx = bottom[0].diff
            dx[...] = 0
            dx[self.slices] = top[0].diff
        if len(propagate_down) > 1 and propagate_down[1]:
            bottom[1].diff[...] = 0
