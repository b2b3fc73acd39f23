"""Utility layers: dense products, blob plumbing and reductions.

InnerProduct, Embed, Concat, Slice, Split, Flatten, Reshape, Tile, Eltwise,
Reduction, ArgMax, Filter, BatchReindex, Silence, Parameter.

Each layer follows Caffe's CPU implementation (``src/caffe/layers/<name>_layer.cpp``);
the math lives in small NumPy functions, the classes hold the plumbing.
Layers that only move data (Split, Flatten, Reshape, one-input Concat,
one-output Slice, Parameter) make their tops *views* of the bottom arrays, as
Caffe's ``ShareData`` does, so they cost no copy in forward.
"""
import numpy as np

from framework.layer import Layer, register_layer
from layers.parallel import in_blocks, matmul as split_matmul, split_apply
from proto import caffe_pb2

# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _share_view(top, source, shape):
    """Make ``top`` hold a view of ``source`` (an array) with ``shape`` (Caffe's ShareData).

    The bottom arrays are C-contiguous, so ``reshape`` returns a view, not a copy.
    """
    if top.dtype != source.dtype:
        top.set_dtype(source.dtype)
    top.reshape(shape)
    top.data = source.reshape(shape)


def _canonical_axis(layer, blob, axis, field):
    """Blob.canonical_axis with a LayerError naming the field on failure."""
    try:
        return blob.canonical_axis(axis)
    except IndexError:
        raise layer.error(f"{field} {axis} is out of range for a {blob.num_axes}-D bottom "
                          f"of shape {blob.shape}") from None


def _legacy_axis(layer, param, bottom, legacy_field, field="axis"):
    """Concat/Slice axis: the legacy non-negative ``concat_dim``/``slice_dim`` or ``axis``."""
    if param.HasField(legacy_field):
        if param.HasField(field):
            raise layer.error(f"either {field} or {legacy_field} should be specified; not both")
        axis = getattr(param, legacy_field)
        if axis >= bottom.num_axes:  # concat_layer.cpp / slice_layer.cpp: no negative legacy dims
            raise layer.error(f"{legacy_field} {axis} is out of range for a {bottom.num_axes}-D "
                              f"bottom of shape {bottom.shape}")
        return axis
    return _canonical_axis(layer, bottom, getattr(param, field), field)


def _as_indices(layer, values, limit, what):
    """Integer indices from a float array; raise naming the layer if any is not in [0, limit)."""
    index = values.astype(np.int64)
    if values.size:
        bad = np.flatnonzero(index != values)
        if bad.size:
            raise layer.error(f"{what} must be integers, got {values.flat[bad[0]]!r}")
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= limit:
            value = lo if lo < 0 else hi
            raise layer.error(f"{what} {value} is out of range [0, {limit})")
    return index


def _gather(source, index, out):
    """out[i] = source[index[i]] along axis 0 (indices already validated)."""
    if out.dtype == source.dtype:
        np.take(source, index, axis=0, out=out, mode="clip")
    else:
        out[...] = np.take(source, index, axis=0)


# --------------------------------------------------------------------------
# InnerProduct
# --------------------------------------------------------------------------


#: InnerProduct forwards of fewer rows (images) than this compute W · xᵀ (see forward); from
#: 256 rows on, x · Wᵀ measured faster (fc6 at 256 rows: 70.9 against 78.3 ms).
WEIGHT_MAJOR_BELOW_ROWS = 128


@register_layer("InnerProduct")
class InnerProductLayer(Layer):
    """Fully connected layer: y = x W^T + b over the flattened trailing axes.

    Shapes: bottom (d_0, ..., d_{axis-1}, d_axis, ...) is viewed as (M, K) with
    M = d_0 ... d_{axis-1} and K = product of the remaining dims; top is
    (d_0, ..., d_{axis-1}, N).  One matmul covers the whole batch.

    inner_product_param:
      num_output (N, required), bias_term (true), weight_filler / bias_filler
      (constant 0), axis (1; negative counts from the end),
      transpose (false: W is (N, K); true: W is stored (K, N)).
    Blobs: [W, b].
    """

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def setup(self, bottom, top):
        p = self.layer_param.inner_product_param
        self.num_output = p.num_output
        if self.num_output <= 0:
            raise self.error(f"inner_product_param.num_output must be positive, got {p.num_output}")
        self.bias_term = p.bias_term
        self.transpose = p.transpose
        self.axis = _canonical_axis(self, bottom[0], p.axis, "inner_product_param.axis")
        self.K = bottom[0].count_range(self.axis)
        w_shape = (self.K, self.num_output) if self.transpose else (self.num_output, self.K)
        specs = [(w_shape, p.weight_filler, "weight")]
        if self.bias_term:
            specs.append(((self.num_output,), p.bias_filler, "bias"))
        self.init_param_blobs(specs)

    def reshape(self, bottom, top):
        axis = _canonical_axis(self, bottom[0], self.layer_param.inner_product_param.axis,
                               "inner_product_param.axis")
        k = bottom[0].count_range(axis)
        if k != self.K:  # inner_product_layer.cpp: K fixed at setup
            raise self.error(f"input size incompatible with inner product parameters: "
                             f"bottom {bottom[0].shape} flattens to K={k} from axis {axis}, "
                             f"weights expect K={self.K}")
        self.axis = axis
        self.M = bottom[0].count_range(0, axis)
        top[0].reshape(bottom[0].shape[:axis] + (self.num_output,))

    def _weight_nk(self):
        """W as an (N, K) array (a transposed view when stored (K, N))."""
        w = self.blobs[0].data
        return w.T if self.transpose else w

    def forward(self, bottom, top):
        x = bottom[0].data.reshape(self.M, self.K)
        y = top[0].data.reshape(self.M, self.num_output)
        if self.M < WEIGHT_MAJOR_BELOW_ROWS:
            # few rows: W (N, K) · xᵀ then a small transposed copy is the faster GEMM (OpenBLAS
            # streams the weights better as the left operand): CaffeNet's fc6 at batch 10
            # 16.7 -> 14.2 ms on 2 threads, 31.3 -> 25.6 on one; fc1000 at batch 8 0.63 -> 0.38
            yt = split_matmul(self._weight_nk(), x.T, np.empty((self.num_output, self.M), y.dtype))
            np.copyto(y, yt.T)
        else:
            split_matmul(x, self._weight_nk().T, y)
        if self.bias_term:
            y += self.blobs[1].data

    def backward(self, top, propagate_down, bottom):
        dy = top[0].diff.reshape(self.M, self.num_output)
        x = bottom[0].data.reshape(self.M, self.K)
        if self.param_needs_gradient(0):
            w_diff = self.blobs[0].diff
            if self.transpose:
                w_diff += x.T @ dy
            else:
                w_diff += dy.T @ x
        if self.bias_term and self.param_needs_gradient(1):
            self.blobs[1].diff += dy.sum(axis=0)
        if propagate_down[0]:
            np.matmul(dy, self._weight_nk(), out=bottom[0].diff.reshape(self.M, self.K))


# --------------------------------------------------------------------------
# Embed
# --------------------------------------------------------------------------


@register_layer("Embed")
class EmbedLayer(Layer):
    """Lookup table: y[..., :] = W[x[...], :] + b.

    The bottom holds integer indices in [0, input_dim) (stored as floats); the
    top has the bottom's shape plus a trailing axis of size num_output.
    embed_param: num_output (N), input_dim (K), bias_term (true),
    weight_filler / bias_filler (constant 0).  Blobs: [W (K, N), b (N)].
    No gradient flows to the indices; the weights get scatter-added gradients.
    """

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def setup(self, bottom, top):
        p = self.layer_param.embed_param
        self.num_output = p.num_output
        self.input_dim = p.input_dim
        if self.num_output <= 0:
            raise self.error(f"embed_param.num_output must be positive, got {p.num_output}")
        if self.input_dim <= 0:
            raise self.error(f"embed_param.input_dim must be positive, got {p.input_dim}")
        self.bias_term = p.bias_term
        # embed_layer.cpp: W is (K, N), transposed from InnerProduct
        w_shape = (self.input_dim, self.num_output)
        specs = [(w_shape, p.weight_filler, "weight")]
        if self.bias_term:
            specs.append(((self.num_output,), p.bias_filler, "bias"))
        self.init_param_blobs(specs)

    def allow_force_backward(self, bottom_index):
        return False

    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].shape + (self.num_output,))

    def _indices(self, bottom):
        return _as_indices(self, bottom[0].data.reshape(-1), self.input_dim, "embed index")

    def forward(self, bottom, top):
        index = self._indices(bottom)
        y = top[0].data.reshape(index.size, self.num_output)
        _gather(self.blobs[0].data, index, y)
        if self.bias_term:
            y += self.blobs[1].data

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            raise self.error("cannot backpropagate to the embed layer's input (indices)")
        index = self._indices(bottom)
        dy = top[0].diff.reshape(index.size, self.num_output)
        if self.param_needs_gradient(0):
            np.add.at(self.blobs[0].diff, index, dy)
        if self.bias_term and self.param_needs_gradient(1):
            self.blobs[1].diff += dy.sum(axis=0)


# --------------------------------------------------------------------------
# Concat / Slice / Split
# --------------------------------------------------------------------------


@register_layer("Concat")
class ConcatLayer(Layer):
    """Concatenate the bottoms along one axis.

    concat_param: axis (1, negative counts from the end) or the legacy
    concat_dim (non-negative; not both).  All bottoms must match except along
    the axis.  With a single bottom the top is a view of it.
    """

    min_bottom_blobs = 1
    exact_num_top_blobs = 1

    def reshape(self, bottom, top):
        p = self.layer_param.concat_param
        first = bottom[0]
        axis = _legacy_axis(self, p, first, "concat_dim")
        shape = list(first.shape)
        for i, b in enumerate(bottom[1:], 1):
            if b.num_axes != first.num_axes:
                raise self.error(f"all inputs must have the same number of axes: bottom 0 is "
                                 f"{first.shape}, bottom {i} is {b.shape}")
            if b.shape[:axis] != first.shape[:axis] or b.shape[axis + 1:] != first.shape[axis + 1:]:
                raise self.error(f"all inputs must have the same shape except at concat axis "
                                 f"{axis}: bottom 0 is {first.shape}, bottom {i} is {b.shape}")
            shape[axis] += b.shape[axis]
        self.axis = axis
        if len(bottom) == 1:  # concat_layer.cpp: one input is shared, not copied
            _share_view(top[0], first.data, first.shape)
        else:
            top[0].reshape(shape)

    def forward(self, bottom, top):
        if len(bottom) == 1:
            _share_view(top[0], bottom[0].data, bottom[0].shape)
            return
        np.concatenate([b.data for b in bottom], axis=self.axis, out=top[0].data)

    def backward(self, top, propagate_down, bottom):
        dy = top[0].diff
        lead = (slice(None),) * self.axis
        start = 0
        for b, down in zip(bottom, propagate_down):
            size = b.shape[self.axis]
            if down:
                b.diff[...] = dy[lead + (slice(start, start + size),)]
            start += size


@register_layer("Slice")
class SliceLayer(Layer):
    """Split a bottom along one axis into several tops.

    slice_param: axis (1) or legacy slice_dim; slice_point (strictly increasing,
    one fewer than the tops).  Without slice points the axis is divided equally
    (it must be divisible by the number of tops).  One top is a view of the bottom.
    """

    exact_num_bottom_blobs = 1
    min_top_blobs = 1

    def reshape(self, bottom, top):
        p = self.layer_param.slice_param
        b = bottom[0]
        axis = _legacy_axis(self, p, b, "slice_dim")
        size = b.shape[axis]
        points = list(p.slice_point)
        if points:
            if len(points) != len(top) - 1:
                raise self.error(f"slice_point has {len(points)} entries; {len(top)} tops need "
                                 f"{len(top) - 1}")
            bounds = [0] + points + [size]
            if any(hi <= lo for lo, hi in zip(bounds, bounds[1:])):
                raise self.error(f"slice_point {points} must be strictly increasing within "
                                 f"(0, {size}) (axis {axis} of shape {b.shape})")
        else:
            if size % len(top):
                raise self.error(f"number of top blobs ({len(top)}) should evenly divide the "
                                 f"input slice axis ({size})")
            step = size // len(top)
            bounds = list(range(0, size + 1, step))
        self.axis = axis
        self.bounds = bounds
        if len(top) == 1:
            _share_view(top[0], b.data, b.shape)
            return
        shape = list(b.shape)
        for t, lo, hi in zip(top, bounds, bounds[1:]):
            shape[axis] = hi - lo
            t.reshape(shape)

    def _slices(self):
        lead = (slice(None),) * self.axis
        return [lead + (slice(lo, hi),) for lo, hi in zip(self.bounds, self.bounds[1:])]

    def forward(self, bottom, top):
        if len(top) == 1:
            _share_view(top[0], bottom[0].data, bottom[0].shape)
            return
        x = bottom[0].data
        for t, index in zip(top, self._slices()):
            t.data[...] = x[index]

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dx = bottom[0].diff
        for t, index in zip(top, self._slices()):
            dx[index] = t.diff


@register_layer("Split")
class SplitLayer(Layer):
    """Give one bottom to several consumers: every top shares the bottom's data array.

    Backward sums the tops' diffs into the bottom's diff (split_layer.cpp).
    Inserted automatically by the net for blobs with several consumers.
    """

    exact_num_bottom_blobs = 1
    min_top_blobs = 1

    def reshape(self, bottom, top):
        b = bottom[0]
        for i, t in enumerate(top):
            if t is b:  # split_layer.cpp: tops share data, so in-place makes no sense
                raise self.error(f"does not allow in-place computation (top {i} is the bottom)")
            if t.dtype != b.dtype:
                t.set_dtype(b.dtype)
            t.reshape(b.shape)
            t.share_data(b)

    def forward(self, bottom, top):
        b = bottom[0]
        for t in top:
            if t.data is not b.data:  # the bottom's array was replaced since reshape
                t.reshape(b.shape)
                t.share_data(b)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dx = bottom[0].diff
        if len(top) == 1:
            np.copyto(dx, top[0].diff)
            return
        np.add(top[0].diff, top[1].diff, out=dx)
        for t in top[2:]:
            dx += t.diff


# --------------------------------------------------------------------------
# Flatten / Reshape
# --------------------------------------------------------------------------


class _ViewLayer(Layer):
    """Base of Flatten and Reshape: the top is a reshaped view of the bottom."""

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def top_shape(self, bottom):
        raise NotImplementedError

    def reshape(self, bottom, top):
        if top[0] is bottom[0]:
            raise self.error("does not allow in-place computation")
        shape = self.top_shape(bottom[0])
        if int(np.prod(shape, dtype=np.int64)) != bottom[0].count:
            raise self.error(f"output count must match input count: top shape {shape} vs "
                             f"bottom shape {bottom[0].shape}")
        _share_view(top[0], bottom[0].data, shape)

    def forward(self, bottom, top):
        # re-share (a view costs nothing): the bottom's array may have been replaced
        _share_view(top[0], bottom[0].data, top[0].shape)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff.reshape(bottom[0].shape)


@register_layer("Flatten")
class FlattenLayer(_ViewLayer):
    """Merge axes [axis, end_axis] into one (flatten_param: axis 1, end_axis -1).

    (N, C, H, W) -> (N, C*H*W) by default; the top is a view of the bottom.
    """

    def top_shape(self, bottom):
        p = self.layer_param.flatten_param
        start = _canonical_axis(self, bottom, p.axis, "flatten_param.axis")
        end = _canonical_axis(self, bottom, p.end_axis, "flatten_param.end_axis")
        if end < start:
            raise self.error(f"flatten_param.end_axis {p.end_axis} comes before axis {p.axis} "
                             f"for bottom shape {bottom.shape}")
        shape = bottom.shape
        return shape[:start] + (bottom.count_range(start, end + 1),) + shape[end + 1:]


@register_layer("Reshape")
class ReshapeLayer(_ViewLayer):
    """Change the shape without touching the data (the top is a view of the bottom).

    reshape_param: shape (dims; 0 copies the bottom's dim at that position,
    one -1 is inferred from the count), axis (0; negative counts from the end
    with -1 meaning "after the last axis") and num_axes (-1: through the last
    axis) select the range of bottom axes replaced by ``shape``.
    """

    def setup(self, bottom, top):
        dims = list(self.layer_param.reshape_param.shape.dim)
        self.copy_axes = [i for i, d in enumerate(dims) if d == 0]
        inferred = [i for i, d in enumerate(dims) if d == -1]
        bad = [d for d in dims if d < -1]
        if bad:
            raise self.error(f"reshape_param.shape has invalid dim {bad[0]} (dims must be >= -1)")
        if len(inferred) > 1:  # reshape_layer.cpp: at most one -1
            raise self.error(f"reshape_param.shape {dims} contains multiple -1 dims; at most a "
                             f"single -1 may be specified")
        self.inferred_axis = inferred[0] if inferred else -1
        self.dims = dims

    def top_shape(self, bottom):
        p = self.layer_param.reshape_param
        n = bottom.num_axes
        # reshape_layer.cpp: a negative axis counts so that -1 means "after the last axis"
        start = p.axis if p.axis >= 0 else n + p.axis + 1
        if not 0 <= start <= n:
            raise self.error(f"reshape_param.axis {p.axis} is out of range for a {n}-D bottom")
        if p.num_axes < -1:
            raise self.error(f"reshape_param.num_axes must be >= 0, or -1 for all; got {p.num_axes}")
        end = n if p.num_axes == -1 else start + p.num_axes
        if end > n:
            raise self.error(f"reshape_param.axis + num_axes = {end} is out of range for a "
                             f"{n}-D bottom")
        shape = list(bottom.shape[:start]) + list(self.dims) + list(bottom.shape[end:])
        for i in self.copy_axes:
            if start + i >= n:
                raise self.error(f"reshape_param.shape {self.dims} contains a 0 at position {i}, "
                                 f"but there is no corresponding bottom axis to copy")
            shape[start + i] = bottom.shape[start + i]
        if self.inferred_axis >= 0:
            known = int(np.prod([d for j, d in enumerate(shape) if j != start + self.inferred_axis],
                                dtype=np.int64))
            if known == 0 or bottom.count % known:
                raise self.error(f"bottom count ({bottom.count}) must be divisible by the product "
                                 f"of the specified dimensions ({known})")
            shape[start + self.inferred_axis] = bottom.count // known
        return tuple(shape)


# --------------------------------------------------------------------------
# Tile
# --------------------------------------------------------------------------


@register_layer("Tile")
class TileLayer(Layer):
    """Repeat the block of axes [axis, ...) ``tiles`` times along ``axis``.

    tile_param: axis (1), tiles (required, > 0).  A (N, C, H) bottom with
    axis 1 gives (N, tiles*C, H), laid out as ``tiles`` consecutive copies.
    Backward sums the copies.
    """

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def setup(self, bottom, top):
        p = self.layer_param.tile_param
        self.tiles = p.tiles
        if self.tiles <= 0:
            raise self.error(f"tile_param.tiles must be positive, got {p.tiles}")

    def reshape(self, bottom, top):
        b = bottom[0]
        self.axis = _canonical_axis(self, b, self.layer_param.tile_param.axis, "tile_param.axis")
        self.outer = b.count_range(0, self.axis)
        self.inner = b.count_range(self.axis)
        shape = list(b.shape)
        shape[self.axis] *= self.tiles
        top[0].reshape(shape)

    def forward(self, bottom, top):
        x = bottom[0].data.reshape(self.outer, 1, self.inner)
        np.copyto(top[0].data.reshape(self.outer, self.tiles, self.inner), x)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            dy = top[0].diff.reshape(self.outer, self.tiles, self.inner)
            np.sum(dy, axis=1, out=bottom[0].diff.reshape(self.outer, self.inner))


# --------------------------------------------------------------------------
# Eltwise
# --------------------------------------------------------------------------

ELTWISE_PROD, ELTWISE_SUM, ELTWISE_MAX = 0, 1, 2  # EltwiseParameter.EltwiseOp


def _sum_relu(a, b, y):
    """y = max(a + b, 0) in cache-sized blocks (:func:`layers.parallel.in_blocks`), split
    over threads (an Eltwise SUM with the in-place ReLU after it folded in: ResNet's joins)."""
    def block(y_part, a_part, b_part):
        np.add(a_part, b_part, out=y_part)
        np.maximum(y_part, 0, out=y_part)

    split_apply(lambda *parts: in_blocks(block, parts), [v.reshape(-1) for v in (y, a, b)], y.nbytes)


@register_layer("Eltwise")
class EltwiseLayer(Layer):
    """Element-wise combination of equally shaped bottoms.

    eltwise_param.operation: SUM (default; y = sum_i coeff_i * x_i, coeff one
    per bottom, default all 1), PROD (y = prod_i x_i; no coeffs), MAX
    (y = max_i x_i; ties between the first two bottoms go to the second, later
    bottoms must be strictly larger, as in eltwise_layer.cpp; coeffs are
    ignored, as in Caffe).  stable_prod_grad (true): PROD's gradient is the
    product of the other inputs; false: y / x_i (wrong where x_i == 0).
    """

    min_bottom_blobs = 2
    exact_num_top_blobs = 1

    def setup(self, bottom, top):
        p = self.layer_param.eltwise_param
        self.op = p.operation
        if self.op not in (ELTWISE_PROD, ELTWISE_SUM, ELTWISE_MAX):
            raise self.error(f"unknown eltwise_param.operation {self.op}")
        coeffs = list(p.coeff)
        if coeffs and len(coeffs) != len(bottom):
            raise self.error(f"eltwise_param.coeff takes one coefficient per bottom blob: "
                             f"{len(coeffs)} given for {len(bottom)} bottoms")
        if coeffs and self.op == ELTWISE_PROD:
            raise self.error("eltwise_param.coeff is only allowed for SUM (operation is PROD)")
        self.coeffs = coeffs or [1.0] * len(bottom)
        self.stable_prod_grad = p.stable_prod_grad

    def reshape(self, bottom, top):
        for i, b in enumerate(bottom):
            if b.shape != bottom[0].shape:
                raise self.error(f"all bottoms must have the same shape: bottom 0 is "
                                 f"{bottom[0].shape}, bottom {i} is {b.shape}")
            if top[0] is b:
                raise self.error("does not allow in-place computation")
        top[0].reshape(bottom[0].shape)

    def can_fold_relu(self):
        return self.op == ELTWISE_SUM  # PROD's and MAX's backward read the top (or its argmax)

    def forward(self, bottom, top):
        y = top[0].data
        xs = [b.data for b in bottom]
        if self.op == ELTWISE_SUM and self.fused_relu and len(xs) == 2 and self.coeffs == [1, 1]:
            _sum_relu(xs[0], xs[1], y)
            return
        if self.op == ELTWISE_PROD:
            np.multiply(xs[0], xs[1], out=y)
            for x in xs[2:]:
                y *= x
        elif self.op == ELTWISE_SUM:
            if self.coeffs[0] == 1 and self.coeffs[1] == 1:
                np.add(xs[0], xs[1], out=y)  # x * 1 == x exactly: one pass fewer
                start = 2
            else:
                np.multiply(xs[0], self.coeffs[0], out=y)
                start = 1
            for c, x in zip(self.coeffs[start:], xs[start:]):
                if c == 1:
                    y += x
                else:
                    y += c * x
            if self.fused_relu:
                np.maximum(y, 0, out=y)
        else:
            # eltwise_layer.cpp: a > b keeps a (index 0), else b (index 1); later: strictly greater
            first = np.greater(xs[0], xs[1])
            self.max_index = np.where(first, 0, 1).astype(np.int32)
            np.maximum(xs[0], xs[1], out=y)
            for i, x in enumerate(xs[2:], 2):
                wins = x > y
                self.max_index[wins] = i
                np.copyto(y, x, where=wins)

    def backward(self, top, propagate_down, bottom):
        dy = top[0].diff
        for i, (b, down) in enumerate(zip(bottom, propagate_down)):
            if not down:
                continue
            dx = b.diff
            if self.op == ELTWISE_PROD:
                if self.stable_prod_grad:
                    others = [o.data for j, o in enumerate(bottom) if j != i]
                    np.copyto(dx, others[0])
                    for x in others[1:]:
                        dx *= x
                else:
                    np.divide(top[0].data, b.data, out=dx)
                dx *= dy
            elif self.op == ELTWISE_SUM:
                if self.coeffs[i] == 1:
                    np.copyto(dx, dy)
                else:
                    np.multiply(dy, self.coeffs[i], out=dx)
            else:
                np.multiply(dy, self.max_index == i, out=dx)


# --------------------------------------------------------------------------
# Reduction
# --------------------------------------------------------------------------

REDUCE_SUM, REDUCE_ASUM, REDUCE_SUMSQ, REDUCE_MEAN = 1, 2, 3, 4  # ReductionParameter.ReductionOp


@register_layer("Reduction")
class ReductionLayer(Layer):
    """Reduce all axes from ``axis`` to the end: SUM, ASUM (sum |x|), SUMSQ (sum x^2), MEAN.

    reduction_param: operation (SUM), axis (0: the whole blob reduces to a
    scalar of shape ()), coeff (1; multiplies the result).  The top keeps
    the bottom's leading axes [0, axis).
    """

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def setup(self, bottom, top):
        p = self.layer_param.reduction_param
        self.op = p.operation
        if self.op not in (REDUCE_SUM, REDUCE_ASUM, REDUCE_SUMSQ, REDUCE_MEAN):
            raise self.error(f"unknown reduction_param.operation {self.op}")

    def reshape(self, bottom, top):
        p = self.layer_param.reduction_param
        b = bottom[0]
        self.axis = _canonical_axis(self, b, p.axis, "reduction_param.axis")
        self.num = b.count_range(0, self.axis)
        self.dim = b.count_range(self.axis)
        top[0].reshape(b.shape[:self.axis])
        # reduction_layer.cpp: MEAN folds 1/dim into the coefficient
        self.coeff = p.coeff / self.dim if self.op == REDUCE_MEAN and self.dim else p.coeff

    def forward(self, bottom, top):
        x = bottom[0].data.reshape(self.num, self.dim)
        y = top[0].data.reshape(self.num)
        if self.op in (REDUCE_SUM, REDUCE_MEAN):
            np.sum(x, axis=1, out=y)
        elif self.op == REDUCE_ASUM:
            np.sum(np.abs(x), axis=1, out=y)
        else:
            np.einsum("ij,ij->i", x, x, out=y)
        if self.coeff != 1:
            y *= self.coeff

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        scale = (top[0].diff.reshape(self.num, 1) * self.coeff)
        x = bottom[0].data.reshape(self.num, self.dim)
        dx = bottom[0].diff.reshape(self.num, self.dim)
        if self.op in (REDUCE_SUM, REDUCE_MEAN):
            np.copyto(dx, np.broadcast_to(scale, dx.shape))
        elif self.op == REDUCE_ASUM:
            np.multiply(np.sign(x), scale, out=dx)
        else:
            np.multiply(x, 2 * scale, out=dx)


# --------------------------------------------------------------------------
# ArgMax
# --------------------------------------------------------------------------


def top_k_indices(x, k):
    """Indices of the k largest entries of each row of the 2-D ``x``, largest first.

    Ties go to the larger index first: argmax_layer.cpp sorts (value, index)
    pairs with std::greater.
    """
    dim = x.shape[1]
    reversed_x = x[:, ::-1]
    if k == 1:
        return dim - 1 - np.argmax(reversed_x, axis=1)[:, None]
    order = np.argsort(-reversed_x, axis=1, kind="stable")[:, :k]
    return dim - 1 - order


@register_layer("ArgMax")
class ArgMaxLayer(Layer):
    """Indices (and optionally values) of the top_k largest entries.

    argmax_param: top_k (1), out_max_val (false), axis (unset).
    With ``axis``: the top is the bottom with shape[axis] = top_k, holding
    indices, or the max values when out_max_val.  Without: each item's
    flattened trailing axes are searched and the top is (N, 1, top_k) (at least
    3 axes, padded with 1s to the bottom's rank); out_max_val makes it
    (N, 2, top_k) with indices in channel 0 and values in channel 1.
    No backward.
    """

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1
    has_backward = False

    def setup(self, bottom, top):
        p = self.layer_param.argmax_param
        self.top_k = p.top_k
        self.out_max_val = p.out_max_val
        self.has_axis = p.HasField("axis")
        if self.top_k < 1:
            raise self.error(f"argmax_param.top_k must not be less than 1, got {p.top_k}")
        if self.has_axis:
            axis = _canonical_axis(self, bottom[0], p.axis, "argmax_param.axis")
            if self.top_k > bottom[0].shape[axis]:
                raise self.error(f"argmax_param.top_k {self.top_k} must be <= the size of axis "
                                 f"{axis} ({bottom[0].shape[axis]})")
        elif self.top_k > bottom[0].count_range(1):
            raise self.error(f"argmax_param.top_k {self.top_k} must be <= the flattened item "
                             f"size {bottom[0].count_range(1)}")

    def allow_force_backward(self, bottom_index):
        return False

    def reshape(self, bottom, top):
        b = bottom[0]
        if self.has_axis:
            self.axis = _canonical_axis(self, b, self.layer_param.argmax_param.axis,
                                        "argmax_param.axis")
            shape = list(b.shape)
            shape[self.axis] = self.top_k
        else:
            shape = [1] * max(b.num_axes, 3)
            shape[0] = b.shape[0]
            shape[1] = 2 if self.out_max_val else 1
            shape[2] = self.top_k
        top[0].reshape(shape)

    def forward(self, bottom, top):
        x = bottom[0].data
        if self.has_axis:
            moved = np.moveaxis(x, self.axis, -1)
            rows = moved.reshape(-1, moved.shape[-1])
            index = top_k_indices(rows, self.top_k)
            result = np.take_along_axis(rows, index, axis=1) if self.out_max_val else index
            result = result.reshape(moved.shape[:-1] + (self.top_k,))
            top[0].data[...] = np.moveaxis(result, -1, self.axis)
        else:
            rows = x.reshape(x.shape[0], -1)
            index = top_k_indices(rows, self.top_k)
            y = top[0].data.reshape(x.shape[0], -1, self.top_k)
            y[:, 0] = index
            if self.out_max_val:
                y[:, 1] = np.take_along_axis(rows, index, axis=1)

    def backward(self, top, propagate_down, bottom):
        raise self.error("ArgMax has no backward")


# --------------------------------------------------------------------------
# Filter / BatchReindex
# --------------------------------------------------------------------------


@register_layer("Filter")
class FilterLayer(Layer):
    """Keep the items (rows along axis 0) whose selector is non-zero.

    Bottoms: the blobs to filter, then the selector (shape (N,) or (N, 1, ...)).
    Tops: one per filtered bottom, holding the selected rows in order.
    Backward scatters the top diffs back to their rows; other rows get 0.
    As in filter_layer.cpp, the first reshape (at setup, before the selector
    holds data) keeps all N rows.
    """

    min_bottom_blobs = 2
    min_top_blobs = 1

    def setup(self, bottom, top):
        if len(top) != len(bottom) - 1:
            raise self.error(f"needs one top per filtered bottom: {len(bottom) - 1} filtered "
                             f"bottoms, {len(top)} tops")
        self.first_reshape = True
        self.selector_index = len(bottom) - 1

    def allow_force_backward(self, bottom_index):
        selector = getattr(self, "selector_index", len(self.layer_param.bottom) - 1)
        return bottom_index != selector

    def _select(self, bottom):
        selector = bottom[-1]
        if any(d != 1 for d in selector.shape[1:]):
            raise self.error(f"selector blob dimensions must be singletons (1), except the "
                             f"first; got shape {selector.shape}")
        for i, b in enumerate(bottom[:-1]):
            if not b.shape or b.shape[0] != selector.shape[0]:
                raise self.error(f"bottom {i} (shape {b.shape}) must have the same 0th "
                                 f"dimension as the selector ({selector.shape[0]})")
        return np.flatnonzero(selector.data.reshape(-1))

    def _shape_tops(self, bottom, top, num):
        for t, b in zip(top, bottom):
            t.reshape((num,) + b.shape[1:])

    def reshape(self, bottom, top):
        self.indices = self._select(bottom)
        num = len(self.indices)
        if self.first_reshape:
            num = bottom[0].shape[0]
            self.first_reshape = False
        self._shape_tops(bottom, top, num)

    def forward(self, bottom, top):
        # Caffe reshapes right before every forward; do it here too so the
        # selected rows always follow the selector's current values.
        self.indices = self._select(bottom)
        self._shape_tops(bottom, top, len(self.indices))
        for t, b in zip(top, bottom):
            _gather(b.data, self.indices, t.data)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[-1]:
            raise self.error("cannot backpropagate to the filter's selector input")
        for t, b, down in zip(top, bottom, propagate_down):
            if down:
                dx = b.diff
                dx[...] = 0
                dx[self.indices] = t.diff


@register_layer("BatchReindex")
class BatchReindexLayer(Layer):
    """Gather items along axis 0: top[i] = bottom0[index[i]].

    bottom[1] is a 1-D blob of integer indices into bottom[0]'s first axis
    (repeats allowed).  Backward accumulates each top row's diff into the
    row it came from; no gradient to the indices.
    """

    exact_num_bottom_blobs = 2
    exact_num_top_blobs = 1

    def allow_force_backward(self, bottom_index):
        return bottom_index == 0

    def reshape(self, bottom, top):
        if bottom[1].num_axes != 1:
            raise self.error(f"bottom 1 (indices) must be 1-D, got shape {bottom[1].shape}")
        top[0].reshape(bottom[1].shape[:1] + bottom[0].shape[1:])

    def _indices(self, bottom):
        # batch_reindex_layer.cpp: indices must lie in [0, num)
        return _as_indices(self, bottom[1].data, bottom[0].shape[0], "reindex index")

    def forward(self, bottom, top):
        _gather(bottom[0].data, self._indices(bottom), top[0].data)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[1]:
            raise self.error("cannot backpropagate to the reindex indices (bottom 1)")
        if propagate_down[0]:
            dx = bottom[0].diff
            dx[...] = 0
            np.add.at(dx, self._indices(bottom), top[0].diff)


# --------------------------------------------------------------------------
# Silence / Parameter
# --------------------------------------------------------------------------


@register_layer("Silence")
class SilenceLayer(Layer):
    """Swallow its bottoms (no tops), so they are not reported as net outputs.

    Backward writes zero gradients into the bottoms.
    """

    min_bottom_blobs = 1
    exact_num_top_blobs = 0

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        pass

    def backward(self, top, propagate_down, bottom):
        for b, down in zip(bottom, propagate_down):
            if down:
                b.diff[...] = 0


@register_layer("Parameter")
class ParameterLayer(Layer):
    """Expose a learnable blob as a top (parameter_param.shape; zero-initialised).

    The top is a view of the blob's data; backward accumulates the top's diff
    into the blob's diff.  (Caffe shares the diff too, so its gradient is
    overwritten rather than accumulated across iter_size passes; accumulating
    is what every other parameter does.)
    """

    exact_num_bottom_blobs = 0
    exact_num_top_blobs = 1

    def setup(self, bottom, top):
        shape = tuple(self.layer_param.parameter_param.shape.dim)
        if any(d < 0 for d in shape):
            raise self.error(f"parameter_param.shape has a negative dim: {shape}")
        # Caffe creates the blob zero-filled: the default FillerParameter is constant 0
        self.init_param_blobs([(shape, caffe_pb2.FillerParameter(), "parameter")])

    def reshape(self, bottom, top):
        blob = self.blobs[0]
        _share_view(top[0], blob.data, blob.shape)

    def forward(self, bottom, top):
        blob = self.blobs[0]
        _share_view(top[0], blob.data, blob.shape)

    def backward(self, top, propagate_down, bottom):
        if self.param_needs_gradient(0):
            self.blobs[0].diff += top[0].diff
