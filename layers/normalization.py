"""Normalisation layers: BatchNorm, LRN, MVN, and the per-channel Scale and Bias.

Numbers follow Caffe's CPU code (``src/caffe/layers/{batch_norm,lrn,mvn,scale,
bias}_layer.cpp``).  The math lives in small functions; the Layer classes read
parameters, keep what backward needs, and handle in-place use.
"""
import numpy as np

from framework.blob import Blob
from framework.fillers import fill
from framework.layer import Layer, register_layer
from layers.parallel import in_blocks, row_broadcast

TEST = 1  # caffe_pb2.Phase.TEST


# ---------------------------------------------------------------------------
# BatchNorm
# ---------------------------------------------------------------------------

def _per_row(values, repeats):
    """(C,) values as a column with one entry per row of an (N·C, spatial) view."""
    return np.tile(values, repeats).reshape(-1, 1)


def _channel_view(array, channels):
    """View an (N, C, ...) array (or a 1-D (N,) one, C == 1) as (N, C, spatial)."""
    return array.reshape(array.shape[0] if array.ndim else 1, channels, -1)


@register_layer("BatchNorm")
class BatchNormLayer(Layer):
    """Normalise each channel (axis 1) to zero mean and unit variance: y = (x - mu) / sqrt(var + eps).

    batch_norm_param: ``use_global_stats`` (default: true in TEST, false in
    TRAIN), ``moving_average_fraction`` lambda (0.999), ``eps`` (1e-5).
    Blobs (statistics, never learned; all start at 0): running mean sum M (C,),
    running variance sum V (C,), scale factor s (1,).

    Batch statistics (over the m = N * H * W values of a channel, biased
    variance) update s <- lambda*s + 1, M <- lambda*M + mu,
    V <- lambda*V + m/(m-1) * var (factor 1 when m == 1).  Global statistics use
    mu = M/s, var = V/s, with 1/s replaced by 0 when s == 0 (so y = x/sqrt(eps)).
    Backward: global dx = dy / sqrt(var + eps); batch
    dx = (dy - mean(dy) - mean(dy * y) * y) / sqrt(var + eps).

    At setup, like batch_norm_layer.cpp, each blob without a ``param`` spec gets
    ``param { lr_mult: 0 }`` appended to the layer parameter, and a spec with a
    non-zero lr_mult is refused.  The layer may run in place.
    """

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def setup(self, bottom, top):
        p = self.layer_param.batch_norm_param
        self.moving_average_fraction = p.moving_average_fraction
        self.eps = p.eps
        # batch_norm_layer.cpp: use_global_stats defaults to (phase == TEST)
        self.use_global_stats = (p.use_global_stats if p.HasField("use_global_stats")
                                 else self.phase == TEST)
        if bottom[0].num_axes == 0:
            raise self.error("bottom must have at least one axis")
        self.channels = 1 if bottom[0].num_axes == 1 else bottom[0].shape[1]
        expected = [(self.channels,), (self.channels,), (1,)]
        if not self.blobs:
            self.blobs = [Blob(shape) for shape in expected]  # zero-filled
        else:
            counts = [b.count for b in self.blobs]
            if counts != [int(np.prod(s)) for s in expected]:
                raise self.error(f"stored statistics blobs have {counts} values; "
                                 f"{self.channels} channels need {[e[0] for e in expected]}")
        self._mask_statistics_from_learning()
        self._x_norm = None  # normalised output kept for the batch-statistics backward
        # Set by the net for a forward that also runs the in-place Scale right after this
        # layer (and the ReLU after that, if ``fused_relu``): see can_fold_scale.
        self.fused_scale = None
        # Set by framework.data_parallel for a replica of a net whose batch is split over
        # threads: (sync, rank); batch statistics are then sums over every replica's images.
        self.stats_sync = None

    def _mask_statistics_from_learning(self):
        """batch_norm_layer.cpp: statistics get lr_mult 0; a non-zero lr_mult is an error."""
        specs = self.layer_param.param
        for i in range(len(self.blobs)):
            if len(specs) == i:
                specs.add().lr_mult = 0.0
            elif specs[i].lr_mult != 0:
                raise self.error(
                    f"Cannot configure batch normalization statistics as layer parameters "
                    f"(param {i} has lr_mult: {specs[i].lr_mult}; BatchNorm blobs need lr_mult: 0)")

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        channels = 1 if len(shape) == 1 else shape[1]
        if len(shape) == 0 or channels != self.channels:
            raise self.error(f"bottom shape {shape} does not have the {self.channels} channels "
                             f"the layer was set up with")
        if top[0] is not bottom[0]:
            top[0].reshape(shape)

    def _batch_mean(self, x3):
        """Per-channel mean over the batch and the number of values per channel, m."""
        if self.stats_sync is None:
            return x3.mean(axis=(0, 2)), x3.size // self.channels
        sums, m = self._batch_sums(x3.sum(axis=(0, 2)), x3.size // self.channels)
        return sums / x3.dtype.type(m), m

    def _batch_sums(self, partial, count=0):
        """``partial`` per-channel sums (and a count) totalled over the replicas of
        ``stats_sync`` (in rank order, so every replica gets the same numbers)."""
        if self.stats_sync is None:
            return partial, count
        sync, rank = self.stats_sync
        total = sync.all_sum(rank, np.append(partial.astype(np.float64), count))
        return total[:-1].astype(partial.dtype), int(round(total[-1]))

    def _update_batch_stats(self, mean, var, m):
        """The running statistics, updated once per batch (by the first replica, if split)."""
        if self.stats_sync is None or self.stats_sync[1] == 0:
            self._update_running_stats(mean, var, m=m)

    def can_fold_scale(self, scale):
        """Whether this layer's forward and backward can run ``scale`` (a ScaleLayer working in
        place on this layer's top) in the same passes: batch statistics, and one gamma (and beta)
        value per channel, learned by the Scale (one bottom)."""
        p = scale.layer_param.scale_param
        return (not self.use_global_stats and p.axis == 1 and p.num_axes == 1
                and len(scale.blobs) == 1 + scale.bias_term
                and all(b.shape == (self.channels,) for b in scale.blobs))

    def forward(self, bottom, top):
        x = bottom[0].data
        dtype = x.dtype
        x3 = _channel_view(x, self.channels)
        y3 = _channel_view(top[0].data, self.channels)
        with row_broadcast(x3.shape[2]):
            if self.fused_scale is not None:
                self._normalize_and_scale(x3, y3, dtype)
            else:
                self._normalize(x3, y3, dtype)

    def _normalize_and_scale(self, x3, y3, dtype):
        """Batch statistics, then y = gamma * x_norm + beta (then max(y, 0) if the Scale's
        ``fused_relu``): the BatchNorm -> Scale -> ReLU of ResNet training in three memory passes
        over cache-sized blocks of (N·C, spatial) rows instead of about ten.  x_norm is kept for
        backward and shared with the Scale as its saved input.  Same operations as the layers one
        by one, except that the squared deviations are summed per row first (float32 round-off)."""
        scale = self.fused_scale
        n, c, s = x3.shape
        mean, m = self._batch_mean(x3)
        x2, y2 = x3.reshape(n * c, s), y3.reshape(n * c, s)
        row_squares = np.empty(n * c, dtype)

        def centre(y, x, mean_col, squares):
            np.subtract(x, mean_col, out=y)
            np.einsum("rs,rs->r", y, y, out=squares)

        in_blocks(centre, [y2, x2, _per_row(mean, n), row_squares])
        var = self._batch_sums(row_squares.reshape(n, c).sum(axis=0))[0] / dtype.type(m)
        self._update_batch_stats(mean, var, m)
        std = np.sqrt(var + dtype.type(self.eps))
        self._std = std
        keep = self.backward_needed
        if keep:
            if self._x_norm is None or self._x_norm.shape != y3.shape or self._x_norm.dtype != dtype:
                self._x_norm = np.empty_like(y3)
            norm2 = self._x_norm.reshape(n * c, s)
        else:
            self._x_norm = None
            norm2 = y2
        relu = scale.fused_relu
        columns = [_per_row(std, n)] + [_per_row(b.data.astype(dtype, copy=False).reshape(-1), n)
                                        for b in scale.blobs]

        def normalise(y, norm, std_col, gamma_col, beta_col=None):
            np.divide(y, std_col, out=norm)
            np.multiply(norm, gamma_col, out=y)
            if beta_col is not None:
                y += beta_col
            if relu:
                np.maximum(y, 0, out=y)

        in_blocks(normalise, [y2, norm2] + columns)
        scale._x = self._x_norm  # the Scale's input, for its own backward

    def _normalize(self, x3, y3, dtype):
        """y = (x - mu) / std over (N, C, spatial) views; keeps std (and x_norm) for backward."""
        if self.use_global_stats:
            mean, var = self._global_stats(dtype)
            np.subtract(x3, mean[:, None], out=y3)  # elementwise: safe in place
        else:
            mean, m = self._batch_mean(x3)
            np.subtract(x3, mean[:, None], out=y3)  # x is not read again: safe in place
            var = self._batch_sums(np.einsum("ncs,ncs->c", y3, y3))[0] / dtype.type(m)
            self._update_batch_stats(mean, var, m)
        std = np.sqrt(var + dtype.type(self.eps))
        y3 /= std[:, None]
        # batch_norm_layer.cpp caches x_norm, as later in-place layers may clobber the top;
        # only the batch-statistics backward reads it.
        if self.backward_needed and not self.use_global_stats:
            if self._x_norm is None or self._x_norm.shape != y3.shape or self._x_norm.dtype != dtype:
                self._x_norm = np.empty_like(y3)
            np.copyto(self._x_norm, y3)  # reused between passes: no fresh pages to fault in
        else:
            self._x_norm = None
        self._std = std

    def _global_stats(self, dtype):
        """mu = M/s, var = V/s, computed in the blobs' dtype with Caffe's s == 0 guard."""
        m_sum, v_sum, s = (b.data for b in self.blobs)
        s0 = s.reshape(-1)[0]
        factor = s.dtype.type(0) if s0 == 0 else s.dtype.type(1) / s0
        return (factor * m_sum).astype(dtype), (factor * v_sum).astype(dtype)

    def _update_running_stats(self, mean, var, m):
        """s <- lambda*s + 1; M <- lambda*M + mu; V <- lambda*V + m/(m-1)*var."""
        m_sum, v_sum, s = (b.data for b in self.blobs)
        t = s.dtype.type
        lam = t(self.moving_average_fraction)
        s *= lam
        s += t(1)
        correction = t(m) / t(m - 1) if m > 1 else t(1)
        m_sum *= lam
        m_sum += mean.astype(m_sum.dtype, copy=False).reshape(m_sum.shape)
        v_sum *= lam
        v_sum += (correction * var.astype(v_sum.dtype, copy=False)).reshape(v_sum.shape)

    def backward_with_scale(self, top, bottom, relu):
        """The backward of the ReLU (if ``relu``), the folded Scale and this layer in two passes,
        after a forward that ran them folded (``fused_scale``).  ``top`` is the shared blob (its
        diff the gradient of the last of them), ``bottom`` this layer's.  The Scale's parameter
        gradients accumulate as in its own backward; the BatchNorm terms use
        mean(gamma·dy) = gamma·mean(dy) (float32 round-off apart, the layers' own numbers)."""
        scale = self.fused_scale
        dy3 = _channel_view(top[0].diff, self.channels)
        n, c, s = dy3.shape
        dy2 = dy3.reshape(n * c, s)
        dx2 = _channel_view(bottom[0].diff, self.channels).reshape(n * c, s)
        norm2 = self._x_norm.reshape(n * c, s)
        dtype = dy2.dtype
        row_dy, row_dy_norm = np.empty(n * c, dtype), np.empty(n * c, dtype)

        def sums(dy, norm, sum_dy, sum_dy_norm, y=None):
            if y is not None:  # the ReLU's backward, as ReLULayer does it
                with np.errstate(invalid="ignore", over="ignore"):
                    np.multiply(dy, y > 0, out=dy)
            np.add.reduce(dy, axis=1, out=sum_dy)
            np.einsum("rs,rs->r", dy, norm, out=sum_dy_norm)

        relu_input = [top[0].data.reshape(n * c, s)] if relu else []
        in_blocks(sums, [dy2, norm2, row_dy, row_dy_norm] + relu_input)
        sum_dy = row_dy.reshape(n, c).sum(axis=0)
        sum_dy_norm = row_dy_norm.reshape(n, c).sum(axis=0)
        gamma_blob = scale.blobs[0]
        gamma_blob.diff[...] += sum_dy_norm.reshape(gamma_blob.shape)  # this replica's images
        if scale.bias_term:
            scale.blobs[1].diff[...] += sum_dy.reshape(scale.blobs[1].shape)
        gamma = gamma_blob.data.astype(dtype, copy=False).reshape(-1)
        both, m = self._batch_sums(np.concatenate([sum_dy, sum_dy_norm]), n * s)  # the batch's
        sum_dy, sum_dy_norm = both[:c], both[c:]
        inv_m = dtype.type(1.0 / m)
        columns = [_per_row(v, n) for v in (gamma, gamma * sum_dy * inv_m,
                                            gamma * sum_dy_norm * inv_m, self._std)]

        def gradient(dx, dy, norm, gamma_col, mean_col, mean_norm_col, std_col):
            # (gamma·dy - mean(gamma·dy) - x_norm·mean(gamma·dy·x_norm)) / std; dx may be dy
            term = norm * mean_norm_col
            np.multiply(dy, gamma_col, out=dx)
            dx -= mean_col
            dx -= term
            dx /= std_col

        with row_broadcast(s):
            in_blocks(gradient, [dx2, dy2, norm2] + columns)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy3 = _channel_view(top[0].diff, self.channels)
        dx3 = _channel_view(bottom[0].diff, self.channels)
        with row_broadcast(dy3.shape[2]):
            self._backward(dy3, dx3)

    def _backward(self, dy3, dx3):
        if self.use_global_stats:
            np.divide(dy3, self._std[:, None], out=dx3)
            return
        y3 = self._x_norm
        c = self.channels
        both, m = self._batch_sums(np.concatenate([dy3.sum(axis=(0, 2)),
                                                   np.einsum("ncs,ncs->c", dy3, y3)]), dy3.size // c)
        inv_m = dy3.dtype.type(1.0 / m)
        mean_dy, mean_dy_y = both[:c] * inv_m, both[c:] * inv_m
        # (dy - mean_dy - y * mean_dy_y) / std, in the same order, written into dx; in place
        # dx is dy, which the statistics above have already read
        n, c, s = dy3.shape
        columns = [_per_row(v, n) for v in (mean_dy, mean_dy_y, self._std)]

        def gradient(dx, dy, y, mean_col, mean_y_col, std_col):
            term = y * mean_y_col
            np.subtract(dy, mean_col, out=dx)
            dx -= term
            dx /= std_col

        in_blocks(gradient, [dx3.reshape(n * c, s), dy3.reshape(n * c, s), y3.reshape(n * c, s)] + columns)


# ---------------------------------------------------------------------------
# LRN
# ---------------------------------------------------------------------------

def window_sum(a, size, axis):
    """Sum of ``a`` over a centred window of odd ``size`` along ``axis``, zero-padded.

    out[i] = sum of a[j] for |j - i| <= (size - 1) / 2 and 0 <= j < len.
    Loops over the window offsets only.
    """
    half = (size - 1) // 2
    out = a.copy()
    length = a.shape[axis]

    def sl(start, stop):
        index = [slice(None)] * a.ndim
        index[axis] = slice(start, stop)
        return tuple(index)

    for d in range(1, min(half, length - 1) + 1):
        out[sl(d, None)] += a[sl(0, length - d)]   # neighbour below: i - d
        out[sl(0, length - d)] += a[sl(d, None)]   # neighbour above: i + d
    return out


def lrn_across_channels(x, size, alpha, beta, k):
    """ACROSS_CHANNELS forward: returns (y, scale), scale = k + alpha/n * window sum of x^2 over C."""
    t = x.dtype.type
    scale = window_sum(x * x, size, axis=1)
    scale *= t(alpha / size)
    scale += t(k)
    y = x * np.power(scale, t(-beta))
    return y, scale


def lrn_within_channel(x, size, alpha, beta):
    """WITHIN_CHANNEL forward: returns (y, scale), scale = 1 + alpha/n^2 * n-by-n window sum of x^2.

    lrn_layer.cpp builds this from square -> AVE pooling (pad (n-1)/2, so the
    divisor is always n^2) -> power(shift 1, scale alpha, power -beta) -> product:
    ``k`` is not used.
    """
    t = x.dtype.type
    box = window_sum(window_sum(x * x, size, axis=2), size, axis=3)
    box /= t(size * size)
    scale = box * t(alpha)
    scale += t(1)
    y = x * np.power(scale, t(-beta))
    return y, scale


@register_layer("LRN")
class LRNLayer(Layer):
    """Local response normalisation of a 4-D (N, C, H, W) bottom.

    lrn_param: ``local_size`` n (odd, default 5), ``alpha`` (1), ``beta`` (0.75),
    ``k`` (1), ``norm_region`` (ACROSS_CHANNELS or WITHIN_CHANNEL).
    ACROSS_CHANNELS: s = k + (alpha/n) * sum of x^2 over channels c-(n-1)/2 ... c+(n-1)/2,
    y = x * s^-beta; dx = dy * s^-beta - (2*alpha*beta/n) * x * window_sum(dy * y / s).
    WITHIN_CHANNEL: s = 1 + (alpha/n^2) * sum of x^2 over the zero-padded n x n
    window (k ignored); dx = dy * s^-beta - (2*alpha*beta/n^2) * x * box_sum(dy * y / s).
    """

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def setup(self, bottom, top):
        p = self.layer_param.lrn_param
        self.size = p.local_size
        if self.size % 2 != 1:
            raise self.error(f"LRN only supports odd values for local_size, got local_size: {self.size}")
        self.alpha, self.beta, self.k = p.alpha, p.beta, p.k
        self.across_channels = p.norm_region == type(p).ACROSS_CHANNELS

    def reshape(self, bottom, top):
        if bottom[0].num_axes != 4:
            raise self.error(f"input must have 4 axes (num, channels, height, width), "
                             f"got shape {bottom[0].shape}")
        if top[0] is not bottom[0]:
            top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        x = bottom[0].data
        if self.across_channels:
            y, scale = lrn_across_channels(x, self.size, self.alpha, self.beta, self.k)
        else:
            y, scale = lrn_within_channel(x, self.size, self.alpha, self.beta)
        self._x = x.copy() if top[0] is bottom[0] and self.backward_needed else None
        self._scale = scale
        top[0].data[...] = y

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        x = self._x if self._x is not None else bottom[0].data
        dy = top[0].diff
        t = dy.dtype.type
        scale = self._scale
        scale_pow = np.power(scale, t(-self.beta))
        y = x * scale_pow  # recomputed: the top may have been overwritten in place
        ratio = dy * y / scale
        if self.across_channels:
            summed = window_sum(ratio, self.size, axis=1)
            coeff = t(2.0 * self.alpha * self.beta / self.size)
        else:
            summed = window_sum(window_sum(ratio, self.size, axis=2), self.size, axis=3)
            coeff = t(2.0 * self.alpha * self.beta / (self.size * self.size))
        bottom[0].diff[...] = dy * scale_pow - coeff * x * summed


# ---------------------------------------------------------------------------
# MVN
# ---------------------------------------------------------------------------

@register_layer("MVN")
class MVNLayer(Layer):
    """Mean-variance normalisation per (sample, channel), or per sample with across_channels.

    mvn_param: ``normalize_variance`` (default true), ``across_channels``
    (default false), ``eps`` (1e-9).  y = (x - mean) / (std + eps): mvn_layer.cpp
    adds eps to the standard deviation, not to the variance.  Backward:
    dx = (dy - mean(dy) - y * mean(dy * y)) / (std + eps), or dx = dy - mean(dy)
    without variance normalisation.  Means run over H*W (C*H*W across channels).
    """

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def setup(self, bottom, top):
        p = self.layer_param.mvn_param
        self.normalize_variance = p.normalize_variance
        self.across_channels = p.across_channels
        self.eps = p.eps

    def reshape(self, bottom, top):
        if bottom[0].num_axes > 4:
            raise self.error(f"bottom must have at most 4 axes (num, channels, height, width), "
                             f"got shape {bottom[0].shape}")
        if top[0] is not bottom[0]:
            top[0].reshape(bottom[0].shape)

    def _rows(self, array):
        """(groups, dim) view: one row per sample (across channels) or per (sample, channel)."""
        shape = array.shape
        num = shape[0] if shape else 1
        if not self.across_channels and len(shape) > 1:
            num *= shape[1]
        return array.reshape(num, -1)

    def forward(self, bottom, top):
        x2 = self._rows(bottom[0].data)
        y2 = self._rows(top[0].data)
        mean = x2.mean(axis=1, keepdims=True)
        np.subtract(x2, mean, out=y2)
        if self.normalize_variance:
            t = x2.dtype.type
            var = np.einsum("ij,ij->i", y2, y2)[:, None] / t(y2.shape[1])
            std = np.sqrt(var)
            std += t(self.eps)
            y2 /= std
            self._std = std
            self._y = y2.copy() if self.backward_needed else None

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy2 = self._rows(top[0].diff)
        mean_dy = dy2.mean(axis=1, keepdims=True)
        if self.normalize_variance:
            y2 = self._y
            mean_dy_y = np.einsum("ij,ij->i", dy2, y2)[:, None] / dy2.dtype.type(dy2.shape[1])
            dx2 = (dy2 - mean_dy - y2 * mean_dy_y) / self._std
        else:
            dx2 = dy2 - mean_dy
        bottom[0].diff[...] = dx2.reshape(bottom[0].shape)


# ---------------------------------------------------------------------------
# Scale and Bias
# ---------------------------------------------------------------------------

def _param_shape(layer, bottom, axis, num_axes, what):
    """Shape of a learned scale/bias: bottom axes [axis, axis + num_axes) (num_axes -1: to the end)."""
    if num_axes < -1:
        raise layer.error(f"num_axes must be non-negative, or -1 to extend to the end of bottom[0]; "
                          f"got num_axes: {num_axes}")
    axis = _canonical_axis(layer, bottom, axis)
    if num_axes >= 0 and bottom.num_axes < axis + num_axes:
        raise layer.error(f"{what} blob's shape extends past bottom[0]'s shape {bottom.shape} when "
                          f"applied starting with bottom[0] axis = {axis} (num_axes: {num_axes})")
    end = None if num_axes == -1 else axis + num_axes
    return bottom.shape[axis:end]


def _canonical_axis(layer, bottom, axis):
    try:
        return bottom.canonical_axis(axis)
    except IndexError:
        raise layer.error(f"axis {axis} is out of range for bottom[0] of shape {bottom.shape}") from None


def _broadcast_dims(layer, bottom, operand, axis, what):
    """(outer, dim, inner) for broadcasting ``operand`` over ``bottom`` from ``axis``.

    A 0-axis operand always uses axis 0 (scale_layer.cpp / bias_layer.cpp).
    """
    axis = 0 if operand.num_axes == 0 else _canonical_axis(layer, bottom, axis)
    end = axis + operand.num_axes
    if bottom.num_axes < end or bottom.shape[axis:end] != operand.shape:
        raise layer.error(f"{what} of shape {operand.shape} does not match bottom[0] shape "
                          f"{bottom.shape} starting at axis {axis}")
    return bottom.count_range(0, axis), operand.count, bottom.count_range(end)


def _scale_bias_relu(x2, gamma, beta, outer, y2):
    """y2 = max(x2 * gamma (+ beta), 0) row by row: x2, y2 (outer·dim, inner), gamma and beta
    (dim,) repeated over the ``outer`` blocks of rows; the same multiply and add as the unfolded
    forward, in blocks of rows that stay in cache (:func:`layers.parallel.in_blocks`; y2 may be x2)."""
    columns = [_per_row(v.reshape(-1), outer) for v in (gamma, beta) if v is not None]

    def block(y, x, g, b=None):
        np.multiply(x, g, out=y)
        if b is not None:
            y += b
        np.maximum(y, 0, out=y)

    with row_broadcast(x2.shape[1]):
        in_blocks(block, [y2, x2] + columns)


@register_layer("Scale")
class ScaleLayer(Layer):
    """y = x * gamma (+ beta), gamma broadcast over bottom axes [axis, axis + num_axes).

    scale_param: ``axis`` (1), ``num_axes`` (1; -1 = all remaining axes; 0 = a
    scalar), ``filler`` (constant 1), ``bias_term`` (false), ``bias_filler``
    (constant 0).  One bottom: blobs [gamma, beta?].  Two bottoms: gamma is
    bottom[1] (its shape decides the axes covered) and blobs are [beta] only.
    Backward: dx = dy * gamma; dgamma = sum of dy * x over the broadcast axes
    (accumulated into a learned gamma, assigned to bottom[1]'s diff); dbeta = sum dy.
    May run in place (the input is kept for dgamma).
    """

    min_bottom_blobs = 1
    max_bottom_blobs = 2
    exact_num_top_blobs = 1

    def can_fold_relu(self):
        return True  # backward reads the input (kept when in place) and dy, never the top

    def setup(self, bottom, top):
        p = self.layer_param.scale_param
        self.axis = p.axis
        self.bias_term = p.bias_term
        if len(bottom) == 1 and not self.blobs:
            gamma = Blob(_param_shape(self, bottom[0], p.axis, p.num_axes, "scale"))
            if p.HasField("filler"):
                fill(gamma, p.filler)
            else:
                gamma.data[...] = 1  # scale_layer.cpp: identity by default
            self.blobs = [gamma]
        if self.bias_term:
            # scale_layer.cpp: the bias covers the same axes as the scale
            num_axes = bottom[1].num_axes if len(bottom) > 1 else p.num_axes
            if len(self.blobs) + len(bottom) < 3:
                beta = Blob(_param_shape(self, bottom[0], p.axis, num_axes, "bias"))
                fill(beta, p.bias_filler)  # unset FillerParameter: constant 0
                self.blobs.append(beta)
        self._x = None  # the input, kept for dgamma when running in place
        expected = (1 if len(bottom) == 1 else 0) + (1 if self.bias_term else 0)
        if len(self.blobs) != expected:
            raise self.error(f"expected {expected} parameter blob(s) for {len(bottom)} bottom(s) and "
                             f"bias_term: {self.bias_term}, got {len(self.blobs)}")

    def _gamma(self, bottom):
        return bottom[1] if len(bottom) > 1 else self.blobs[0]

    def reshape(self, bottom, top):
        self._dims = _broadcast_dims(self, bottom[0], self._gamma(bottom), self.axis, "scale")
        if self.bias_term:
            self._bias_dims = _broadcast_dims(self, bottom[0], self.blobs[-1], self.axis, "bias")
        if top[0] is not bottom[0]:
            top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        x = bottom[0].data
        outer, dim, inner = self._dims
        if top[0] is bottom[0] and self.backward_needed:
            if self._x is None or self._x.shape != x.shape or self._x.dtype != x.dtype:
                self._x = np.empty_like(x)
            np.copyto(self._x, x)  # reused between passes: no fresh pages to fault in
        else:
            self._x = None
        gamma = self._gamma(bottom).data.astype(x.dtype, copy=False).reshape(1, dim, 1)
        y3 = top[0].data.reshape(outer, dim, inner)
        if self.fused_relu and (not self.bias_term or self._bias_dims == self._dims):
            beta = self.blobs[-1].data.astype(x.dtype, copy=False) if self.bias_term else None
            _scale_bias_relu(x.reshape(outer * dim, inner), gamma.reshape(-1), beta, outer,
                             y3.reshape(outer * dim, inner))
            return
        with row_broadcast(inner):
            np.multiply(x.reshape(outer, dim, inner), gamma, out=y3)
        if self.bias_term:
            b_outer, b_dim, b_inner = self._bias_dims
            beta = self.blobs[-1].data.astype(x.dtype, copy=False).reshape(1, b_dim, 1)
            y3b = top[0].data.reshape(b_outer, b_dim, b_inner)
            with row_broadcast(b_inner):
                y3b += beta
        if self.fused_relu:
            np.maximum(y3, 0, out=y3)

    def backward(self, top, propagate_down, bottom):
        dy = top[0].diff
        outer, dim, inner = self._dims
        dy3 = dy.reshape(outer, dim, inner)
        if self.bias_term:
            b_outer, b_dim, b_inner = self._bias_dims
            beta = self.blobs[-1]
            beta.diff[...] += dy.reshape(b_outer, b_dim, b_inner).sum(axis=(0, 2)).reshape(beta.shape)
        two_bottoms = len(bottom) > 1
        gamma = self._gamma(bottom)
        if not two_bottoms or propagate_down[1]:
            x = self._x if self._x is not None else bottom[0].data
            grad = np.einsum("oci,oci->c", dy3, x.reshape(outer, dim, inner)).reshape(gamma.shape)
            if two_bottoms:
                gamma.diff[...] = grad
            else:
                # scale_layer.cpp overwrites the diff when gamma is as large as x; parameter
                # diffs accumulate here, per this framework's contract.
                gamma.diff[...] += grad
        if propagate_down[0]:
            g = gamma.data.astype(dy.dtype, copy=False).reshape(1, dim, 1)
            # in place, dx is dy, read above for the parameter gradients
            with row_broadcast(inner):
                np.multiply(dy3, g, out=bottom[0].diff.reshape(outer, dim, inner))


@register_layer("Bias")
class BiasLayer(Layer):
    """y = x + b, b broadcast over bottom axes [axis, axis + num_axes).

    bias_param: ``axis`` (1), ``num_axes`` (1; -1 = all remaining; 0 = scalar),
    ``filler`` (constant 0).  One bottom: blobs [b].  Two bottoms: b is
    bottom[1] and there are no blobs.  Backward: dx = dy; db = sum of dy over
    the broadcast axes (accumulated into a learned b, assigned to bottom[1]'s
    diff).  May run in place.
    """

    min_bottom_blobs = 1
    max_bottom_blobs = 2
    exact_num_top_blobs = 1

    def setup(self, bottom, top):
        p = self.layer_param.bias_param
        self.axis = p.axis
        if len(bottom) == 1 and not self.blobs:
            bias = Blob(_param_shape(self, bottom[0], p.axis, p.num_axes, "bias"))
            fill(bias, p.filler)  # unset FillerParameter: constant 0
            self.blobs = [bias]
        expected = 1 if len(bottom) == 1 else 0
        if len(self.blobs) != expected:
            raise self.error(f"expected {expected} parameter blob(s) with {len(bottom)} bottom(s), "
                             f"got {len(self.blobs)}")

    def _bias(self, bottom):
        return bottom[1] if len(bottom) > 1 else self.blobs[0]

    def reshape(self, bottom, top):
        self._dims = _broadcast_dims(self, bottom[0], self._bias(bottom), self.axis, "bias")
        if top[0] is not bottom[0]:
            top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        x = bottom[0].data
        outer, dim, inner = self._dims
        b = self._bias(bottom).data.astype(x.dtype, copy=False).reshape(1, dim, 1)
        with row_broadcast(inner):
            np.add(x.reshape(outer, dim, inner), b, out=top[0].data.reshape(outer, dim, inner))

    def backward(self, top, propagate_down, bottom):
        dy = top[0].diff
        outer, dim, inner = self._dims
        bias = self._bias(bottom)
        if len(bottom) == 1 or propagate_down[1]:
            grad = dy.reshape(outer, dim, inner).sum(axis=(0, 2)).reshape(bias.shape)
            if len(bottom) == 1:
                bias.diff[...] += grad
            else:
                bias.diff[...] = grad
        if propagate_down[0] and bottom[0] is not top[0]:
            bottom[0].diff[...] = dy
