"""Winograd F(2x2, 3x3) convolution forward, input and weight gradients (Lavin & Gray,
"Fast Algorithms for Convolutional Neural Networks", 2016).

Each 2x2 block of outputs is computed from a 4x4 tile d of the padded input
(tiles overlap by 2) and the 3x3 filter g as

    Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A

with Bᵀ (4x4), G (4x3), Aᵀ (2x4) below: 16 multiplications per output block
and channel instead of 36, i.e. 2.25x fewer GEMM flops than im2col.  Summed
over the channels, the 16 elementwise products become 16 GEMMs
U[p] (K x C) · V[p] (C x tiles), one ``np.matmul`` over the stack (per group).

Steps of :func:`conv_forward` (2-D, 3x3 kernel, stride 1, dilation 1, any pad,
any group count, float32 or float64):

* input transform Bᵀ d B into V (16, n, th, tw, C), channels last: per block
  of tile rows, one transposing copy of the input into a zero-padded buffer
  split by row/column parity, then 8 + 16 slab adds (tile-column then
  tile-row neighbours are whole slabs apart), no per-tile loop.
* filter transform G g Gᵀ: one GEMM with G ⊗ G, cached per weight array
  (see "Filter cache").
* 16 GEMMs (one ``np.matmul`` over the stack, per group):
  M[p] (tiles, K) = V[p] (tiles, C) · U[p]ᵀ, the images side by side.
* output transform Aᵀ M A in place in M (24 slab adds), then one transposing
  copy per output parity into y[..., a::2, b::2], which also crops the
  partial tiles of odd sizes.  The bias is added to M at position (1, 1),
  which Aᵀ·A spreads to the four outputs of the tile with weight 1.
Both transforms run over blocks of about ``BLOCK_BYTES``, split over the
threads of :mod:`layers.parallel` where it splits passes; V, M and the block buffers are
:mod:`layers.vision`'s reusable scratch arrays.

Accuracy: the transforms' coefficients are 0, ±1 and ±1/2 and the tile is
the smallest one, so F(2x2, 3x3) is about as accurate as the direct sum
(larger tiles, F(4x4, 3x3) and up, lose digits quickly).  Measured (float32,
N(0, 1) inputs, He-initialised weights, pad 1, relative error
max|y − y64| / max|y64| against a float64 reference), C = 16..1024 at the
ResNet-50 map sizes: im2col 4.3e-7..6.3e-7, Winograd 2.2e-7..7.1e-7, between
0.45x and 1.55x the im2col path's error.  The tests assert
error ≤ ``ERROR_BOUND`` = 2e-6 and ≤ 4x the im2col error on the same problem.

Opt-out: ``layers.winograd.ENABLED = False`` (or the environment variable
``CAFFE_NUMPY_WINOGRAD=0`` — also "false", "no", "off" — read at import)
sends every convolution through the im2col + GEMM path, Caffe's own
formulation and summation order, e.g. to compare with Caffe to the last bits.

Input gradient (:func:`conv_backward_data`): dx is the convolution of dy, padded
by 2 − pad, with the filters transposed (K <-> C) and flipped; the flipped
filters' transform is the forward's at mirrored positions, so the cached U
serves both (the forward's GEMMs take U[p] transposed, the gradient's U[mirror(p)]
as stored).  Same transforms,
same accuracy.  The weight gradient (:func:`conv_weight_grad`, see "weight gradient" below)
reuses the input transform and sums the tiles inside 16 GEMMs.

Filter cache: solvers update the weights in place, so the array identity
alone cannot tell stale weights.  Each cache entry keeps a copy of the weights
it was computed from and is used only if ``np.array_equal(copy, weights)``;
the comparison reads the weights twice (~0.6-0.8 ms for 512x512x3x3 float32,
against ~1.2 ms to redo the transform), and is exact, unlike a checksum.  A
weight array's entry disappears with the array (weak reference).  Memory: the
copy plus the transformed filter are 25/9 of the 3x3 weights (≈125 MB for
ResNet-50); :func:`clear_cache` frees it.
"""
import os
import threading
import weakref

import numpy as np

from layers import parallel
from layers.parallel import split_apply as _split_apply
from layers.vision import _scratch, _view

#: Use the Winograd path where :func:`use_winograd` allows it.  Set to False
#: (or CAFFE_NUMPY_WINOGRAD=0 in the environment) for Caffe's exact im2col path.
ENABLED = os.environ.get("CAFFE_NUMPY_WINOGRAD", "1").strip().lower() not in ("0", "false", "no", "off")

#: Relative error bound (max |y − y_ref| / max |y_ref|, float32) the tests assert.
ERROR_BOUND = 2e-6

#: Bytes of V (input transform) or M (output transform) per block: some tile
#: rows of one image, or several whole images.
BLOCK_BYTES = 4 << 20

#: Transforms over at least this many bytes (of V or M) are split over the copy
#: threads of layers.parallel (where it splits passes at all); below it the hand-offs cost
#: more than they save (measured on 2 cores: 3 MB loses 40%, 6 MB gains 15%, 25 MB gains 30%).
SPLIT_MIN_BYTES = 6 << 20

#: Dispatch rule (see use_winograd): at least this many input and output
#: channels per group ...
MIN_CHANNELS = 64
#: ... and this many tiles per GEMM, n·⌈Ho/2⌉·⌈Wo/2⌉ (also for the input gradient, tiles of
#: the input).  96: the 7x7 stage at batch 4 (64 tiles) ran as fast or faster on im2col (one
#: thread 7.35 against 7.37 ms, two 4.60 against 5.21; in training, where the weights change
#: every step, the filter transform came on top), at batch 8 (128 tiles) slower (15.1
#: against 12.3 ms on one thread); ResNet-50 data-parallel training step 0.97 of the time
#: with 96 instead of 48, b8 inference 0.98.
MIN_TILES = 96


#: Winograd for a single image while BLAS runs on several threads.  Off: the GEMMs then run
#: on every core and the transforms (NumPy passes, unsplit beside BLAS: layers.parallel) on
#: one, and a single image's im2col needs no transposes (per-image layout).  Measured on the
#: second machine (docs/benchmarks.md), forward with bias and ReLU, 2 threads: ResNet-50's
#: 3x3 shapes at batch 1 took 1.06-1.25x im2col's time through Winograd; at batch 2
#: 0.96-1.06x, at batches 4 and 8 0.69-0.99x (7x7 at batch 4 1.13x).  On one thread
#: (data-parallel replicas) Winograd stays.
SINGLE_IMAGE_ON_THREADS = False


# Lavin & Gray's F(2x2, 3x3) matrices.  The transforms below are hand-expanded
# adds of these rows (the tests check them against the matrices).
BT = np.array([[1, 0, -1, 0],
                [0, 1, 1, 0],
                [0, -1, 1, 0],
                [0, 1, 0, -1]], dtype=np.float64)
G = np.array([[1, 0, 0],
               [0.5, 0.5, 0.5],
               [0.5, -0.5, 0.5],
               [0, 0, 1]], dtype=np.float64)
AT = np.array([[1, 1, 1, 0],
                [0, 1, -1, -1]], dtype=np.float64)
#: (G ⊗ G): row 4i+j maps a flattened 3x3 filter to position (i, j) of G g Gᵀ.
_GG = np.kron(G, G)


def supports(x, weights, geom):
    """True if the convolution can run as F(2x2, 3x3): 2-D, 3x3, stride 1, dilation 1, float32/64."""
    return _supported(geom, x.dtype, weights.dtype)


def _supported(geom, dtype, other_dtype):
    """:func:`supports` from the geometry and the two operands' dtypes."""
    return (len(geom.kernel) == 2 and geom.kernel == (3, 3) and geom.stride == (1, 1)
            and geom.dilation == (1, 1) and dtype in (np.float32, np.float64) and other_dtype == dtype)


def _wide(geom, outputs, channels):
    """At least ``channels`` input and output channels per group (``outputs`` in all)."""
    return geom.channels // geom.group >= channels and outputs // geom.group >= channels


def _tiles(images, shape):
    """2x2 tiles covering ``images`` maps of ``shape``: n·⌈H/2⌉·⌈W/2⌉."""
    return images * ((shape[0] + 1) // 2) * ((shape[1] + 1) // 2)


def use_winograd(x, weights, geom):
    """Dispatch rule of the Convolution forward: ENABLED, supported, and measured to be faster.

    Measured against the im2col path (ResNet-50's 3x3 shapes, batches 1, 2, 4,
    8; 1 and 2 threads): Winograd is faster from about 100 tiles per GEMM
    (MIN_TILES); below that (7x7 maps at batches 1-4) the GEMMs are bound by
    reading the transformed weights, 16/9 the size of the originals, and it is
    up to 1.8x slower.  With fewer than 64 channels per group the results were
    mixed (16-32 channels: 0.9x-1.3x), so those keep im2col.  With GEMMs on
    several threads, a single image keeps im2col too (SINGLE_IMAGE_ON_THREADS).
    """
    if not ENABLED or not supports(x, weights, geom) or not _wide(geom, weights.shape[0], MIN_CHANNELS):
        return False
    if x.shape[0] == 1 and not SINGLE_IMAGE_ON_THREADS and parallel.gemm_threads() > 1:
        return False
    return _tiles(x.shape[0], geom.out_shape) >= MIN_TILES


# -- filter transform and its cache -------------------------------------------------

def filter_transform(weights, group, dtype=None):
    """The transformed filters U = G g Gᵀ for the GEMMs: (16, groups, K/G, C/G), U[p] per group.

    Axis 0 is the position p = 4i + j in the 4x4 transformed tile.  ``weights``
    (K, C/G, 3, 3).  One GEMM, (G ⊗ G) (16, 9) · taps (9, K·C/G), in the weights'
    precision: G's entries are 0, ±1/2 and 1, so each value is a sum of at most 9
    exactly scaled taps (in float32 within 1.2e-7 of the exact value, relative to the
    largest).  Training redoes it every iteration (512x512x3x3: 1.2 ms; it was 18.6 ms
    as separable adds in float64 with a transposing copy into a (C, K) layout).
    """
    k, cg = weights.shape[:2]
    dtype = weights.dtype if dtype is None else np.dtype(dtype)
    taps = weights.reshape(k * cg, 9)
    u = np.matmul(_GG.astype(taps.dtype), taps.T)
    return u.reshape(16, group, k // group, cg).astype(dtype, copy=False)


_cache = {}
_cache_lock = threading.Lock()
_key_locks = {}  # per cache key: one transform at a time (cached_filter_transform)


def clear_cache():
    """Drop every cached transformed filter."""
    with _cache_lock:
        _cache.clear()
        _key_locks.clear()


def _forget(key):
    """Weak-reference callback: drop the entry of a weight array that no longer exists."""
    def callback(ref):
        with _cache_lock:
            if key in _cache and _cache[key][0] is ref:
                del _cache[key]
                _key_locks.pop(key, None)
    return callback


def cached_filter_transform(weights, group):
    """:func:`filter_transform` of ``weights``, reused while the array and its values are unchanged.

    One thread at a time per weight array: replicas of a net on several threads
    (framework.data_parallel) reach a layer together after each weight update, and the
    later ones then reuse the transform the first one made (two concurrent transforms of
    512x512x3x3 filters took ~10 ms each instead of 2.4)."""
    key = (id(weights), group)
    with _cache_lock:
        lock = _key_locks.setdefault(key, threading.Lock())
    with lock:
        entry = _cache.get(key)
        if entry is not None:
            ref, copy, u = entry
            if ref() is weights and copy.shape == weights.shape and copy.dtype == weights.dtype \
                    and np.array_equal(copy, weights):
                return u
        u = filter_transform(weights, group)
        try:
            ref = weakref.ref(weights, _forget(key))
        except TypeError:  # not weak-referenceable: do not cache
            return u
        with _cache_lock:
            _cache[key] = (ref, weights.copy(), u)
    return u


# -- input and output transforms ----------------------------------------------------
#
# Layouts: V (16, n, th, tw, C) and M (16, n, th, tw, K) have the channels
# last, so a step of the input transform is an add of two slabs one tile row
# or one tile column apart (contiguous runs of tw·C or C elements; NumPy is
# ~10x slower on the stride-2 element access of a channels-first layout), and
# the output transform, which combines the 16 planes of a tile without
# shifts, runs over whole contiguous slabs.  The GEMMs are then plain
# row-major V[p] (tiles, C) · Uᵀ[p] (C, K), the fastest orientation measured
# for 64 channels.  The two transposes this costs are single copies per
# block: the input into the zero-padded, parity-split buffer the transform
# reads, and each output parity plane into y[..., a::2, b::2].

def _bt(i, d0, d1, d2, d3, out):
    """Row i of Bᵀ applied to (d0, d1, d2, d3): d0 − d2, d1 + d2, d2 − d1, d1 − d3."""
    if i == 0:
        np.subtract(d0, d2, out=out)
    elif i == 1:
        np.add(d1, d2, out=out)
    elif i == 2:
        np.subtract(d2, d1, out=out)
    else:
        np.subtract(d1, d3, out=out)


def _parity_span(first, count, parity, pad, size):
    """Range [lo, hi) of t in [0, count) whose source 2·(first + t) + parity − pad is in [0, size).

    Returns (lo, hi, source index of lo).
    """
    offset = 2 * first + parity - pad  # source index of t = 0
    lo = min(count, max(0, -(offset // 2)))
    hi = max(lo, min(count, (size - offset + 1) // 2))
    return lo, hi, offset + 2 * lo


def _threads(nbytes):
    """Copy threads for a transform over ``nbytes`` of V or M (1 below SPLIT_MIN_BYTES)."""
    return parallel.copy_threads() if nbytes >= SPLIT_MIN_BYTES else 1


def _blocks(n, th, per_row_bytes, threads):
    """Blocks (image slice, first tile row, end tile row) of about BLOCK_BYTES, at least one per thread.

    ``per_row_bytes``: bytes of one image's tile row.  A block is some tile
    rows of one image, or whole images.  Large blocks keep NumPy's per-call
    overhead (and the GIL) small against the work; small ones stay in cache.
    """
    total = n * th * per_row_bytes
    rows = max(1, min(BLOCK_BYTES, total // threads) // per_row_bytes)
    if rows >= th:
        images = max(1, rows // th)
        return [(slice(i, min(n, i + images)), 0, th) for i in range(0, n, images)]
    parts = -(-th // rows)
    bounds = [th * p // parts for p in range(parts + 1)]
    return [(slice(i, i + 1), bounds[p], bounds[p + 1]) for i in range(n) for p in range(parts)]


def _over_blocks(func, n, th, per_row_bytes):
    """Run ``func(images, ty0, ty1)`` over the blocks, split over the copy threads when large."""
    nbytes = n * th * per_row_bytes
    threads = _threads(nbytes)
    blocks = _blocks(n, th, per_row_bytes, threads)
    if threads == 1:
        for block in blocks:
            func(*block)
        return

    def part(indices):
        for i in indices:
            func(*blocks[i])

    _split_apply(part, (np.arange(len(blocks)),), nbytes)


def _input_transform(x, pad, v, images, ty0, ty1):
    """V[p, images, ty0:ty1] = Bᵀ d B for those tiles; x (n, C, H, W), v (16, n, th, tw, C)."""
    _, c, h, w = x.shape
    tw = v.shape[3]
    ph, pw = pad
    xs = x[images]
    nb, tb = xs.shape[0], ty1 - ty0
    # xq[pr, pc, i, a, b] = padded input at row 2·(ty0 + a) + pr, column 2·b + pc (channels last)
    xq = _scratch((2, 2, nb, tb + 1, tw + 1, c), x.dtype, "winograd-in")
    xq.fill(0)  # the padding; one contiguous fill costs less than 16 strided border fills
    for pr in (0, 1):
        lo, hi, r0 = _parity_span(ty0, tb + 1, pr, ph, h)
        for pc in (0, 1):
            blo, bhi, c0 = _parity_span(0, tw + 1, pc, pw, w)
            if hi > lo and bhi > blo:
                src = xs[:, :, r0:r0 + 2 * (hi - lo) - 1:2, c0:c0 + 2 * (bhi - blo) - 1:2]
                np.copyto(xq[pr, pc, :, lo:hi, blo:bhi], src.transpose(0, 2, 3, 1))
    # columns first, as 8 strided slab ops; then the 16 row combinations read
    # whole contiguous slabs (tap r is cols[r % 2] shifted by r // 2 tile rows)
    cols = _scratch((2, 4, nb, tb + 1, tw, c), x.dtype, "winograd-cols")
    for pr in (0, 1):  # tap s of a tile row is xq[., s % 2] shifted by s // 2 tile columns
        e0, e1 = xq[pr]
        for j in range(4):
            _bt(j, e0[..., :tw, :], e1[..., :tw, :], e0[..., 1:, :], e1[..., 1:, :], cols[pr, j])
    for i in range(4):
        for j in range(4):
            d0, d1 = cols[0, j], cols[1, j]
            _bt(i, d0[:, :tb], d1[:, :tb], d0[:, 1:], d1[:, 1:], v[4 * i + j, images, ty0:ty1])


def _output_transform(m, y, bias, relu, residual, images, ty0, ty1):
    """y = Aᵀ M A (+ bias) (+ residual), then max(·, 0) if ``relu``, for the tiles of images ×
    tile rows [ty0, ty1).

    m (16, n, th, tw, K) is overwritten there; y and ``residual`` (or None) (n, K, Ho, Wo).
    """
    mb = m[:, images, ty0:ty1]
    if bias is not None:
        # Aᵀ e₁₁ A is the all-ones 2x2 block: the bias enters once, at position (1, 1)
        mb[5] += bias
    # rows of Aᵀ: P(0, j) = M0j + M1j + M2j into M0j, P(1, j) = M1j − M3j − M2j into M3j
    for j in range(4):
        m0, m1, m2, m3 = mb[j], mb[4 + j], mb[8 + j], mb[12 + j]
        m0 += m1
        m0 += m2
        np.subtract(m1, m3, out=m3)
        m3 -= m2
    # columns: Y(a, 0) = Pa0 + Pa1 + Pa2 into Pa0, Y(a, 1) = Pa1 − Pa3 − Pa2 into Pa3
    ho = y.shape[2]
    for a, base in ((0, 0), (1, 12)):
        p0, p1, p2, p3 = mb[base], mb[base + 1], mb[base + 2], mb[base + 3]
        p0 += p1
        p0 += p2
        np.subtract(p1, p3, out=p3)
        p3 -= p2
        for b, plane in ((0, p0), (1, p3)):
            rows = (images, slice(None), slice(2 * ty0 + a, min(ho, 2 * ty1), 2), slice(b, None, 2))
            dst = y[rows]  # crops the partial tiles
            src = plane[:, :dst.shape[2], :dst.shape[3]].transpose(0, 3, 1, 2)
            if residual is not None:  # (conv + bias) + residual, the layers' order
                np.add(src, residual[rows], out=dst)
                src = dst
            if relu:  # the folded ReLU costs nothing here: the copy happens anyway
                np.maximum(src, 0, out=dst)
            elif src is not dst:
                np.copyto(dst, src)


def conv_forward(x, weights, geom, out, bias=None, relu=False, residual=None):
    """Convolution forward by Winograd F(2x2, 3x3): out (n, K, Ho, Wo) = W ⋆ x (+ bias)
    (+ residual), then max(·, 0) if ``relu``.

    x (n, C, H, W); weights (K, C/G, 3, 3); bias (K,) or None; ``geom`` a
    :class:`layers.vision.ConvGeometry` with stride 1, dilation 1 (any pad).
    Same contract as :func:`layers.vision.conv_forward`.
    """
    u = cached_filter_transform(weights, geom.group)
    if u.dtype != x.dtype:
        u = u.astype(x.dtype)
    return _convolve(x, u, False, weights.shape[0], geom.pad, geom.group, geom.out_shape, out, bias, relu,
                     residual)


# Position p = 4i + j of the transformed tile -> its mirror 4σ(i) + σ(j), σ = (3, 1, 2, 0):
# reversing the three taps of a filter row (J) swaps rows 0 and 3 of G (G·J = P·G), so the
# flipped filter's transform is G (J g J) Gᵀ = P (G g Gᵀ) Pᵀ.
_SIGMA = (3, 1, 2, 0)
_MIRROR = tuple(4 * _SIGMA[i] + _SIGMA[j] for i in range(4) for j in range(4))


def use_for_data_gradient(dy, weights, geom):
    """Whether :func:`conv_backward_data` takes this convolution's input gradient: ENABLED, a
    shape :func:`supports`, pad at most 2 (the gradient is a convolution of dy padded by 2 − pad)
    and, as for the forward, >= MIN_CHANNELS channels per group both ways and >= MIN_TILES tiles
    of the input."""
    if not ENABLED or not supports(dy, weights, geom) or max(geom.pad) > 2:
        return False
    return _wide(geom, weights.shape[0], MIN_CHANNELS) and _tiles(dy.shape[0], geom.in_shape) >= MIN_TILES


def conv_backward_data(dy, weights, geom, dx):
    """Input gradient of a 3x3 stride-1 convolution by Winograd: dx (n, C, H, W) = dy ⋆ W',
    where W'[c, k] is W[k, c] flipped in both axes and dy (n, K, Ho, Wo) is padded by 2 − pad
    (the transposed convolution Caffe computes as col2im(Wᵀ·dy)).  W' is never formed: its
    transformed filters are the forward's (cached) at the mirrored positions, transposed.
    Overwrites ``dx``, as Caffe's backward does."""
    u = cached_filter_transform(weights, geom.group)
    if u.dtype != dy.dtype:
        u = u.astype(dy.dtype)
    pad = tuple(2 - p for p in geom.pad)
    return _convolve(dy, u, True, geom.channels, pad, geom.group, geom.in_shape, dx, None, False)


# -- weight gradient -----------------------------------------------------------------
#
# The forward is linear in the filter g: Y = Aᵀ [(G g Gᵀ) ⊙ V] A per tile, V = Bᵀ d B.  Its
# adjoint gives the weight gradient as a sum over the tiles of every image:
#
#     dL/dg = Gᵀ [ Σ_tiles (A dY Aᵀ) ⊙ V ] G
#
# (the adjoint of g -> G g Gᵀ is M -> Gᵀ M G, of M -> Aᵀ M A is dY -> A dY Aᵀ, and ⊙ V is its
# own adjoint).  So: V as in the forward, the 2x2 blocks of dy spread to 4x4 tiles by A (adds
# only), 16 GEMMs M[p] (K, C) = W[p]ᵀ (K, tiles) · V[p] (tiles, C) that also sum over the
# tiles, and one small GEMM with (G ⊗ G)ᵀ back to the nine taps: 16/36 of im2col's
# multiply-adds, and no column matrix (9x the input) to write and read.

# A's rows are (1, 0), (1, 1), (1, −1), (0, −1).  Row 3 is computed without its minus sign
# (dy's second row as it is), so positions p = 4i + j with i == 3 or j == 3 carry a sign,
# which the final transform puts back: column p of (G ⊗ G)ᵀ times _SIGNS[p].
_SIGNS = np.array([(-1.0) ** ((i == 3) + (j == 3)) for i in range(4) for j in range(4)])
_GG_T_SIGNED = _GG.T * _SIGNS


#: The weight gradient goes through Winograd from this many output tiles, n·⌈Ho/2⌉·⌈Wo/2⌉:
#: its 16 (K, C) partial sums and their final transform cost the same whatever the tile
#: count, and with fewer tiles im2col was faster (measured on one thread, ResNet-50's shapes:
#: 7x7 maps at 64 and 128 tiles 1.31x and 1.04x im2col's time, 14x14 at 98 tiles 0.85x).
WGRAD_MIN_TILES = 160
#: ... and, when BLAS runs on several threads (the im2col GEMM speeds up, the transforms, one
#: pass per core, do not), this many channels per group both ways: with 64 the transforms
#: outweigh the saved multiply-adds (2 threads: 56x56 maps 1.11-1.21x im2col's time;
#: 128 channels 0.87-0.94x, 256 0.82-0.98x; on one thread 64 channels gain, 0.72-0.84x).
WGRAD_MIN_CHANNELS_ON_THREADS = 128


def use_for_weight_gradient(x, dy, geom):
    """Whether :func:`conv_weight_grad` takes this convolution's weight gradient: ENABLED, a 2-D
    3x3 stride-1 undilated float32/float64 convolution with >= MIN_CHANNELS channels per group
    both ways (WGRAD_MIN_CHANNELS_ON_THREADS when BLAS runs on several threads) and
    >= WGRAD_MIN_TILES output tiles."""
    if not ENABLED or not _supported(geom, x.dtype, dy.dtype):
        return False
    channels = MIN_CHANNELS if parallel.gemm_threads() == 1 else WGRAD_MIN_CHANNELS_ON_THREADS
    return _wide(geom, dy.shape[1], channels) and _tiles(x.shape[0], geom.out_shape) >= WGRAD_MIN_TILES


def conv_weight_grad(x, dy, geom):
    """Weight gradient of a 3x3 stride-1 convolution by Winograd, summed over the images:
    (K, C/G·9) in Caffe's layout (rows K, columns c·9 + 3·i + j), from x (n, C, H, W) and
    dy (n, K, Ho, Wo)."""
    n, c = x.shape[:2]
    k = dy.shape[1]
    g = geom.group
    v = _transformed_input(x, geom.pad, geom.out_shape)
    _, _, th, tw, _ = v.shape
    tiles = n * th * tw
    w = _scratch((16, n, th, tw, k), x.dtype, "winograd-m")
    _over_blocks(lambda *block: _gradient_transform(dy, w, *block), n, th, 16 * tw * k * x.itemsize)
    # per group: M[p] (K/G, C/G) = W[p]ᵀ (K/G, tiles) · V[p] (tiles, C/G)
    vs = _view(v, (16, tiles, g, c // g)).swapaxes(1, 2)
    ws = _view(w, (16, tiles, g, k // g)).swapaxes(1, 2)
    m = np.matmul(ws.swapaxes(-1, -2), vs)  # (16, G, K/G, C/G)
    taps = np.matmul(_GG_T_SIGNED.astype(x.dtype), m.reshape(16, -1))  # (9, K·C/G)
    return np.ascontiguousarray(taps.T).reshape(k, (c // g) * 9)


def _transformed_input(x, pad, out_shape):
    """V (16, n, ⌈Ho/2⌉, ⌈Wo/2⌉, C) = Bᵀ d B for every tile of x (n, C, H, W) padded by ``pad``
    (the scratch array "winograd-v")."""
    n, c = x.shape[:2]
    th, tw = (out_shape[0] + 1) // 2, (out_shape[1] + 1) // 2
    v = _scratch((16, n, th, tw, c), x.dtype, "winograd-v")
    _over_blocks(lambda *block: _input_transform(x, pad, v, *block), n, th, 16 * tw * c * x.itemsize)
    return v


def _gradient_transform(dy, w, images, ty0, ty1):
    """W[p, images, ty0:ty1] = (A dY Aᵀ)[p] (rows 3 without their sign, see _SIGNS) for the 2x2
    blocks dY of dy (n, K, Ho, Wo) in those tile rows, zero past the edges; w (16, n, th, tw, K)."""
    ho = dy.shape[2]
    wb = w[:, images, ty0:ty1]
    dys = dy[images]
    # the four corners p = 0, 3, 12, 15 are dy's own values: (a, b) -> position 12a + 3b
    for a in (0, 1):
        rows = dys[:, :, 2 * ty0 + a:min(ho, 2 * ty1):2]
        for b in (0, 1):
            src = rows[:, :, :, b::2].transpose(0, 2, 3, 1)
            dst = wb[12 * a + 3 * b]
            if src.shape[1:3] != dst.shape[1:3]:
                dst.fill(0)  # the last tile row or column of an odd size
            np.copyto(dst[:, :src.shape[1], :src.shape[2]], src)
    # columns of the rows i = 0 and 3: j = 1, 2 from j = 0, 3 ...
    for base in (0, 12):
        np.add(wb[base], wb[base + 3], out=wb[base + 1])
        np.subtract(wb[base], wb[base + 3], out=wb[base + 2])
    # ... then the rows i = 1, 2 from the rows 0 and 3
    for j in range(4):
        np.add(wb[j], wb[12 + j], out=wb[4 + j])
        np.subtract(wb[j], wb[12 + j], out=wb[8 + j])


def _convolve(x, u, transposed, k, pad, g, out_shape, out, bias, relu, residual=None):
    """out (n, k, *out_shape) from x (n, c, H, W) and transformed filters ``u``
    (16, G, C_out/G, C_in/G), or, if ``transposed``, a forward's u used as the filters of the
    input gradient (position p takes u[_MIRROR[p]] as stored, the forward u[p] transposed)."""
    n, c = x.shape[:2]
    ho, wo = out_shape
    v = _transformed_input(x, pad, out_shape)
    _, _, th, tw, _ = v.shape
    tiles = n * th * tw
    m = _scratch((16, n, th, tw, k), x.dtype, "winograd-m")
    # per group: M[p] (tiles, K/G) = V[p] (tiles, C/G) · U[p]ᵀ (C/G, K/G), rows of C and K elements
    vs = _view(v, (16, tiles, g, c // g)).swapaxes(1, 2)
    ms = _view(m, (16, tiles, g, k // g)).swapaxes(1, 2)
    if not transposed:
        np.matmul(vs, u.swapaxes(-1, -2), out=ms)
    else:
        for p in range(16):
            np.matmul(vs[p], u[_MIRROR[p]], out=ms[p])
    y = _view(out, (n, k, ho, wo))
    res = None if residual is None else _view(residual, (n, k, ho, wo))
    _over_blocks(lambda *block: _output_transform(m, y, bias, relu, res, *block), n, th, 16 * tw * k * x.itemsize)
    return out
