"""Element-wise ("neuron") layers: one bottom, one top of the same shape.

ReLU, PReLU, ELU, Sigmoid, TanH, BNLL, AbsVal, Power, Exp, Log, Threshold,
Clip, Swish and Dropout, with Caffe's forward and backward numbers
(``src/caffe/layers/<name>_layer.cpp``).

All of them except AbsVal may run in place (``top[0] is bottom[0]``).  Where
Caffe's backward reads the input ``x`` and the forward would have overwritten
it, the layer keeps a copy of ``x`` during the forward (Caffe itself would
compute a wrong gradient there; ReLU/ELU read the sign from ``y`` as Caffe does,
which is the same thing whenever their slope/alpha is non-negative).
"""
import numpy as np

from framework.layer import Layer, register_layer

TRAIN = 0  # caffe_pb2.Phase.TRAIN


class NeuronLayer(Layer):
    """Base of the element-wise layers: one bottom, one top shaped like it.

    Subclasses implement ``forward_array(x, y)`` (write f(x) into y; x and y
    may be the same array) and ``backward_array(x, y, dy)`` (return dy * f'(x)).
    ``needs_input(in_place)`` says whether backward needs the true input x when
    the forward overwrote it; the base class then keeps a copy.
    """

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def needs_input(self):
        """Whether ``backward_array`` reads x (so in-place forward must keep a copy)."""
        return False

    def reshape(self, bottom, top):
        if top[0] is not bottom[0]:
            top[0].reshape(bottom[0].shape)
        self._saved_input = None

    def forward(self, bottom, top):
        x = bottom[0].data
        if top[0] is bottom[0] and self.needs_input():
            self._saved_input = x.copy()
        else:
            self._saved_input = None
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            self.forward_array(x, top[0].data)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        x = self._saved_input if self._saved_input is not None else bottom[0].data
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            dx = self.backward_array(x, top[0].data, top[0].diff)
        bottom[0].diff[...] = dx

    def forward_array(self, x, y):
        raise NotImplementedError

    def backward_array(self, x, y, dy):
        raise NotImplementedError


def _scalar(value, like):
    """A Python/proto number as a NumPy scalar of ``like``'s dtype (Caffe's Dtype(value))."""
    return like.dtype.type(value)


@register_layer("ReLU")
class ReLULayer(NeuronLayer):
    """y = max(x, 0) + negative_slope * min(x, 0)  (relu_param.negative_slope, default 0).

    Backward (relu_layer.cpp): dx = dy * ((x > 0) + negative_slope * (x <= 0));
    the gradient at x == 0 is negative_slope.  It overrides ``backward`` to write
    into the bottom diff directly.
    """

    def setup(self, bottom, top):
        self.negative_slope = self.layer_param.relu_param.negative_slope

    def needs_input(self):
        # In place, y > 0 exactly when x > 0 unless the slope is negative.
        return self.negative_slope < 0

    def forward_array(self, x, y):
        slope = self.negative_slope
        if slope == 0:
            np.maximum(x, 0, out=y)
        else:
            np.add(np.maximum(x, 0), _scalar(slope, x) * np.minimum(x, 0), out=y)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        x = self._saved_input if self._saved_input is not None else bottom[0].data
        dy, dx = top[0].diff, bottom[0].diff
        positive = x > 0
        # written straight into the bottom diff (no temporary, no copy); in place, dx is dy
        # and each element is read before it is overwritten
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            if self.negative_slope == 0:
                np.multiply(dy, positive, out=dx)
            else:
                np.multiply(dy, np.where(positive, 1, _scalar(self.negative_slope, dy)).astype(dy.dtype),
                            out=dx)


@register_layer("PReLU")
class PReLULayer(NeuronLayer):
    """Parametric ReLU: y = max(x, 0) + a_c * min(x, 0), one slope a_c per channel (axis 1).

    prelu_param: ``channel_shared`` (default false: a (C,) slope blob; true: a
    0-axis blob with one slope), ``filler`` (default constant 0.25).
    Bottom must have at least 2 axes.  Backward (prelu_layer.cpp):
    dx = dy * ((x > 0) + a_c * (x <= 0)); d a_c += sum over n and space of
    dy * x * (x <= 0).  In place, the input is kept for the backward.
    """

    def setup(self, bottom, top):
        from framework.blob import Blob
        from framework.fillers import fill

        param = self.layer_param.prelu_param
        if bottom[0].num_axes < 2:
            raise self.error(f"bottom must have at least 2 axes (num, channels, ...), "
                             f"got shape {bottom[0].shape}")
        channels = bottom[0].shape[1]
        self.channel_shared = param.channel_shared
        if not self.blobs:
            # prelu_layer.cpp: a shared slope is a 0-axis blob, else one per channel
            slope = Blob(() if self.channel_shared else (channels,))
            if param.HasField("filler"):
                fill(slope, param.filler)
            else:
                slope.data[...] = 0.25
            self.blobs = [slope]
        expected = 1 if self.channel_shared else channels
        if self.blobs[0].count != expected:
            raise self.error(f"slope blob holds {self.blobs[0].count} values but "
                             f"channel_shared={self.channel_shared} with {channels} channels "
                             f"needs {expected}")

    def reshape(self, bottom, top):
        if bottom[0].num_axes < 2:
            raise self.error(f"bottom must have at least 2 axes, got shape {bottom[0].shape}")
        if not self.channel_shared and bottom[0].shape[1] != self.blobs[0].count:
            raise self.error(f"bottom has {bottom[0].shape[1]} channels but the slope blob "
                             f"has {self.blobs[0].count}")
        super().reshape(bottom, top)

    def needs_input(self):
        return True

    def _slope(self, x):
        """The slopes broadcastable against x (channels on axis 1)."""
        a = self.blobs[0].data.astype(x.dtype, copy=False)
        if self.channel_shared:
            return a.reshape(())
        return a.reshape((1, -1) + (1,) * (x.ndim - 2))

    def forward_array(self, x, y):
        np.add(np.maximum(x, 0), self._slope(x) * np.minimum(x, 0), out=y)

    def backward(self, top, propagate_down, bottom):
        x = self._saved_input if self._saved_input is not None else bottom[0].data
        dy = top[0].diff
        nonpositive = x <= 0
        # slope gradient first: in place, bottom diff is the top diff
        contrib = dy * x * nonpositive
        slope = self.blobs[0]
        if self.channel_shared:
            slope.diff[...] += contrib.sum()
        else:
            axes = (0,) + tuple(range(2, x.ndim))
            slope.diff[...] += contrib.sum(axis=axes)
        if propagate_down[0]:
            bottom[0].diff[...] = dy * np.where(nonpositive, self._slope(x), 1).astype(dy.dtype)


@register_layer("ELU")
class ELULayer(NeuronLayer):
    """y = x if x > 0 else alpha * (exp(x) - 1)  (elu_param.alpha, default 1).

    Backward (elu_layer.cpp): dx = dy if x > 0 else dy * (y + alpha).
    """

    def setup(self, bottom, top):
        self.alpha = self.layer_param.elu_param.alpha

    def needs_input(self):
        # In place, y > 0 exactly when x > 0 unless alpha is negative.
        return self.alpha < 0

    def forward_array(self, x, y):
        alpha = _scalar(self.alpha, x)
        # elu_layer.cpp: alpha * (exp(x) - 1), not expm1
        np.copyto(y, np.where(x > 0, x, alpha * (np.exp(np.minimum(x, 0)) - 1)))

    def backward_array(self, x, y, dy):
        alpha = _scalar(self.alpha, dy)
        return np.where(x > 0, dy, dy * (y + alpha))


@register_layer("Sigmoid")
class SigmoidLayer(NeuronLayer):
    """y = 1 / (1 + exp(-x)), computed as 0.5 * tanh(0.5 * x) + 0.5 (sigmoid_layer.cpp).

    Backward: dx = dy * y * (1 - y) (reads the top).
    """

    def forward_array(self, x, y):
        half = _scalar(0.5, x)
        np.tanh(half * x, out=y)
        y *= half
        y += half

    def backward_array(self, x, y, dy):
        return dy * y * (1 - y)


@register_layer("TanH")
class TanHLayer(NeuronLayer):
    """y = tanh(x); backward dx = dy * (1 - y^2) (reads the top)."""

    def forward_array(self, x, y):
        np.tanh(x, out=y)

    def backward_array(self, x, y, dy):
        return dy * (1 - y * y)


BNLL_THRESHOLD = 50.0  # bnll_layer.cpp: kBNLL_THRESHOLD


@register_layer("BNLL")
class BNLLLayer(NeuronLayer):
    """Binomial normal log likelihood: y = log(1 + exp(x)), computed stably as
    x + log(1 + exp(-x)) for x > 0 (bnll_layer.cpp).

    Backward: e = exp(min(x, 50)); dx = dy * e / (e + 1).
    """

    def needs_input(self):
        return True

    def forward_array(self, x, y):
        np.copyto(y, np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x))))

    def backward_array(self, x, y, dy):
        e = np.exp(np.minimum(x, _scalar(BNLL_THRESHOLD, x)))
        return dy * e / (e + 1)


@register_layer("AbsVal")
class AbsValLayer(NeuronLayer):
    """y = |x|; backward dx = sign(x) * dy (sign(0) = 0).

    absval_layer.cpp refuses in-place computation; so does this layer.
    """

    def setup(self, bottom, top):
        if top[0] is bottom[0]:
            raise self.error("AbsVal does not allow in-place computation "
                             "(its top must be a different blob from its bottom)")

    def forward_array(self, x, y):
        np.abs(x, out=y)

    def backward_array(self, x, y, dy):
        return dy * np.sign(x)


@register_layer("Power")
class PowerLayer(NeuronLayer):
    """y = (shift + scale * x) ^ power  (power_param: power 1, scale 1, shift 0).

    power_layer.cpp special cases, reproduced:
    - scale * power == 0: y is the constant 1 (power == 0) or shift^power, and dx = 0;
    - power == 1: dx = scale * dy;
    - power == 2: dx = dy * (2 * scale * shift + 2 * scale^2 * x);
    - shift == 0: dx = dy * power * y / x (NaN/inf at x == 0, as in Caffe);
    - otherwise dx = dy * scale * power * y / (shift + scale * x).
    """

    def setup(self, bottom, top):
        p = self.layer_param.power_param
        self.power, self.scale, self.shift = p.power, p.scale, p.shift
        self.diff_scale = self.power * self.scale

    def needs_input(self):
        return not (self.diff_scale == 0 or self.power == 1)

    def forward_array(self, x, y):
        t = x.dtype.type
        if self.diff_scale == 0:
            y[...] = t(1) if self.power == 0 else np.power(t(self.shift), t(self.power))
            return
        if y is not x:
            np.copyto(y, x)
        if self.scale != 1:
            y *= t(self.scale)
        if self.shift != 0:
            y += t(self.shift)
        if self.power != 1:
            np.power(y, t(self.power), out=y)

    def backward_array(self, x, y, dy):
        t = dy.dtype.type
        if self.diff_scale == 0 or self.power == 1:
            return dy * t(self.diff_scale)
        if self.power == 2:
            grad = t(self.diff_scale * self.scale) * x
            if self.shift != 0:
                grad += t(self.diff_scale * self.shift)
        elif self.shift == 0:
            grad = y / x * t(self.power)
        else:
            base = x * t(self.scale) if self.scale != 1 else x.copy()
            base += t(self.shift)
            grad = y / base
            if self.diff_scale != 1:
                grad *= t(self.diff_scale)
        return dy * grad


def _log_base(layer, base):
    """ln(base), with Caffe's convention that base == -1 means e; other bases must be > 0."""
    if base == -1:
        return 1.0
    if not base > 0:
        raise layer.error(f"base must be strictly positive (or -1 for e), got base: {base}")
    return float(np.log(base))


@register_layer("Exp")
class ExpLayer(NeuronLayer):
    """y = base ^ (shift + scale * x)  (exp_param: base -1 meaning e, scale 1, shift 0).

    exp_layer.cpp: y = outer * exp(inner * x) with inner = ln(base) * scale and
    outer = base^shift (1 when shift == 0).  Backward: dx = dy * y * inner.
    """

    def setup(self, bottom, top):
        p = self.layer_param.exp_param
        log_base = _log_base(self, p.base)
        self.inner_scale = log_base * p.scale
        if p.shift == 0:
            self.outer_scale = 1.0
        elif p.base == -1:
            self.outer_scale = float(np.exp(p.shift))
        else:
            self.outer_scale = float(np.power(p.base, p.shift))

    def forward_array(self, x, y):
        t = x.dtype.type
        if self.inner_scale == 1:
            np.exp(x, out=y)
        else:
            np.multiply(x, t(self.inner_scale), out=y)
            np.exp(y, out=y)
        if self.outer_scale != 1:
            y *= t(self.outer_scale)

    def backward_array(self, x, y, dy):
        dx = dy * y
        if self.inner_scale != 1:
            dx *= dy.dtype.type(self.inner_scale)
        return dx


@register_layer("Log")
class LogLayer(NeuronLayer):
    """y = log_base(shift + scale * x)  (log_param: base -1 meaning e, scale 1, shift 0).

    log_layer.cpp: y = ln(shift + scale * x) / ln(base);
    backward dx = dy * scale / ln(base) / (shift + scale * x).
    """

    def setup(self, bottom, top):
        p = self.layer_param.log_param
        self.base_scale = 1.0 / _log_base(self, p.base)
        self.scale, self.shift = p.scale, p.shift
        self.backward_scale = self.scale * self.base_scale

    def needs_input(self):
        return True

    def _inner(self, x, out):
        """out = shift + scale * x, in x's dtype."""
        t = x.dtype.type
        if self.scale != 1:
            np.multiply(x, t(self.scale), out=out)
        elif out is not x:
            np.copyto(out, x)
        if self.shift != 0:
            out += t(self.shift)
        return out

    def forward_array(self, x, y):
        if self.scale == 1 and self.shift == 0:
            np.log(x, out=y)
        else:
            self._inner(x, out=y)
            np.log(y, out=y)
        if self.base_scale != 1:
            y *= x.dtype.type(self.base_scale)

    def backward_array(self, x, y, dy):
        grad = np.reciprocal(self._inner(x, np.empty_like(x)))
        if self.backward_scale != 1:
            grad *= dy.dtype.type(self.backward_scale)
        return dy * grad


@register_layer("Threshold")
class ThresholdLayer(NeuronLayer):
    """y = 1 if x > threshold else 0  (threshold_param.threshold, default 0).  No backward."""

    has_backward = False

    def setup(self, bottom, top):
        self.threshold = self.layer_param.threshold_param.threshold

    def forward_array(self, x, y):
        np.greater(x, x.dtype.type(self.threshold), out=y, casting="unsafe")

    def backward(self, top, propagate_down, bottom):
        if any(propagate_down):
            raise self.error("Threshold has no backward (threshold_layer.cpp: not implemented)")


@register_layer("Clip")
class ClipLayer(NeuronLayer):
    """y = min(max(x, min), max)  (clip_param.min and clip_param.max, both required).

    Backward (clip_layer.cpp): dx = dy where min <= x <= max, else 0.
    """

    def setup(self, bottom, top):
        p = self.layer_param.clip_param
        for field in ("min", "max"):
            if not p.HasField(field):
                raise self.error(f"clip_param.{field} is required")
        if p.min > p.max:
            raise self.error(f"clip_param.min ({p.min}) must not exceed clip_param.max ({p.max})")
        self.min, self.max = p.min, p.max

    def needs_input(self):
        return True

    def forward_array(self, x, y):
        t = x.dtype.type
        np.clip(x, t(self.min), t(self.max), out=y)

    def backward_array(self, x, y, dy):
        t = x.dtype.type
        return dy * ((x >= t(self.min)) & (x <= t(self.max)))


@register_layer("Swish")
class SwishLayer(NeuronLayer):
    """y = x * sigmoid(beta * x)  (swish_param.beta, default 1).

    swish_layer.cpp keeps s = sigmoid(beta * x) and computes
    dx = dy * (beta * y + s * (1 - beta * y)).
    """

    def setup(self, bottom, top):
        self.beta = self.layer_param.swish_param.beta

    def forward_array(self, x, y):
        t = x.dtype.type
        half = t(0.5)
        s = np.tanh(half * (t(self.beta) * x))
        s *= half
        s += half
        self._sigmoid = s
        np.multiply(x, s, out=y)

    def backward_array(self, x, y, dy):
        s = self._sigmoid
        beta_y = dy.dtype.type(self.beta) * y
        return dy * (beta_y + s * (1 - beta_y))


@register_layer("Dropout")
class DropoutLayer(NeuronLayer):
    """Dropout (dropout_param.dropout_ratio r, default 0.5).

    TRAIN: each unit is kept with probability 1 - r (mask from
    ``framework.random.rng()``) and kept values are scaled by 1 / (1 - r), so
    y = x * mask / (1 - r) and dx = dy * mask / (1 - r)  (dropout_layer.cpp).
    TEST: identity in both directions.  This schema's DropoutParameter has no
    other field.
    """

    def setup(self, bottom, top):
        ratio = self.layer_param.dropout_param.dropout_ratio
        if not 0 <= ratio < 1:
            raise self.error(f"dropout_param.dropout_ratio must be in [0, 1), got {ratio}")
        self.ratio = ratio
        self.scale = 1.0 / (1.0 - ratio)
        self._mask = None

    def forward_array(self, x, y):
        from framework.random import rng

        if self.phase == TRAIN:
            # caffe_rng_bernoulli(count, 1 - r): 1 with probability 1 - r
            self._mask = rng().random(x.shape) < (1.0 - self.ratio)
            np.multiply(x, self._mask, out=y)
            y *= x.dtype.type(self.scale)
        else:
            self._mask = None
            if y is not x:
                np.copyto(y, x)

    def backward_array(self, x, y, dy):
        if self.phase == TRAIN:
            dx = dy * self._mask
            dx *= dy.dtype.type(self.scale)
            return dx
        return dy.copy()
