"""Tests for layers/neuron.py: forward against slow per-element references, gradients,
in-place use, Caffe's special cases and error paths."""
import math

import numpy as np
import pytest

from framework.blob import Blob
from framework.errors import LayerError
from framework.random import set_random_seed
from gradient_check import check_gradient, layer_from_text, make_blob

SHAPE = (2, 3, 2, 3)      # odd-ish, small enough for finite differences
ODD_SHAPE = (1, 3, 5, 7)  # batch 1


def inputs(shape=SHAPE, seed=0, low=None):
    x = np.random.default_rng(seed).standard_normal(shape)
    if low is not None:
        x = np.abs(x) + low
    return x


def run(text, x, in_place=False, phase=0, dtype=np.float64):
    """Set up a layer on x and run one forward; returns (layer, bottom, top)."""
    layer = layer_from_text(text, phase)
    bottom = make_blob(x, dtype)
    top = bottom if in_place else Blob((), dtype=dtype)
    layer.setup_layer([bottom], [top])
    layer.reshape([bottom], [top])
    layer.forward([bottom], [top])
    return layer, bottom, top


def reference(func, x):
    """Apply a scalar Python function element by element (the slow, obvious reference)."""
    out = np.empty_like(x, dtype=np.float64)
    for index, value in np.ndenumerate(x):
        out[index] = func(float(value))
    return out


def grad_check(text, x, in_place=False, phase=0, **kwargs):
    layer = layer_from_text(text, phase)
    bottom = make_blob(x)
    top = bottom if in_place else Blob(())
    return check_gradient(layer, [bottom], [top], **kwargs)


def f32(v):
    """A prototxt float as the schema stores it (float32)."""
    return float(np.float32(v))


def sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


# (prototxt, scalar reference, input positivity offset or None, kink or None)
SIMPLE = {
    "relu": ('type: "ReLU"', lambda v: max(v, 0.0), None, 0.0),
    "leaky_relu": ('type: "ReLU" relu_param { negative_slope: 0.1 }',
                   lambda v: v if v > 0 else f32(0.1) * v, None, 0.0),
    "elu": ('type: "ELU" elu_param { alpha: 0.7 }',
            lambda v: v if v > 0 else f32(0.7) * (math.exp(v) - 1), None, 0.0),
    "sigmoid": ('type: "Sigmoid"', sigmoid, None, None),
    "tanh": ('type: "TanH"', math.tanh, None, None),
    "bnll": ('type: "BNLL"', lambda v: math.log1p(math.exp(v)) if v < 30 else v + math.log1p(math.exp(-v)),
             None, None),
    "power": ('type: "Power" power_param { power: 3 scale: 0.5 shift: 2 }',
              lambda v: (2 + 0.5 * v) ** 3, None, None),
    "exp": ('type: "Exp" exp_param { base: 2 scale: 0.5 shift: 1 }',
            lambda v: 2.0 ** (1 + 0.5 * v), None, None),
    "log": ('type: "Log" log_param { base: 10 scale: 2 shift: 0.5 }',
            lambda v: math.log10(0.5 + 2 * v), 0.1, None),
    "clip": ('type: "Clip" clip_param { min: -0.5 max: 0.8 }',
             lambda v: min(max(v, -0.5), f32(0.8)), None, None),
    "swish": ('type: "Swish" swish_param { beta: 1.5 }', lambda v: v * sigmoid(1.5 * v), None, None),
}


def clip_safe(x):
    """Move inputs away from Clip's kinks at -0.5 and 0.8."""
    x = x.copy()
    for edge in (-0.5, 0.8):
        near = np.abs(x - edge) < 0.02
        x[near] += 0.05
    return x


def prepared(name, shape=SHAPE, seed=0):
    text, func, low, kink = SIMPLE[name]
    x = inputs(shape, seed, low)
    if name == "clip":
        x = clip_safe(x)
    return text, func, x, kink


@pytest.mark.parametrize("name", sorted(SIMPLE))
@pytest.mark.parametrize("shape", [SHAPE, ODD_SHAPE])
def test_forward_matches_reference(name, shape):
    text, func, x, _ = prepared(name, shape)
    _, _, top = run(text, x)
    assert top.shape == x.shape
    np.testing.assert_allclose(top.data, reference(func, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(SIMPLE))
def test_forward_float32_keeps_dtype(name):
    text, func, x, _ = prepared(name)
    _, _, top = run(text, x, dtype=np.float32)
    assert top.data.dtype == np.float32
    np.testing.assert_allclose(top.data, reference(func, x.astype(np.float32)), rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(SIMPLE))
def test_in_place_forward_matches(name):
    text, _, x, _ = prepared(name)
    _, _, separate = run(text, x)
    _, bottom, top = run(text, x, in_place=True)
    assert top is bottom
    np.testing.assert_array_equal(top.data, separate.data)


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("name", sorted(SIMPLE))
def test_gradient(name, in_place):
    text, _, x, kink = prepared(name, shape=(2, 3, 2, 2))
    kw = {"kink": kink, "kink_range": 0.01} if kink is not None else {}
    grad_check(text, x, in_place=in_place, **kw)


@pytest.mark.parametrize("name", sorted(SIMPLE))
def test_in_place_backward_equals_separate(name):
    """In-place backward must see the true input, not the overwritten top."""
    text, _, x, _ = prepared(name)
    dy = inputs(seed=5)
    grads = []
    for in_place in (False, True):
        layer, bottom, top = run(text, x, in_place=in_place)
        top.diff[...] = dy
        layer.backward([top], [True], [bottom])
        grads.append(bottom.diff.copy())
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-13, atol=1e-15)


def test_relu_gradient_values_and_kink():
    x = np.array([[-2.0, -0.0, 0.0, 3.0]])
    layer, bottom, top = run('type: "ReLU" relu_param { negative_slope: 0.25 }', x)
    top.diff[...] = 1.0
    layer.backward([top], [True], [bottom])
    # relu_layer.cpp: the gradient at exactly 0 uses negative_slope
    np.testing.assert_array_equal(bottom.diff, [[0.25, 0.25, 0.25, 1.0]])


def test_propagate_down_false_leaves_bottom_diff():
    layer, bottom, top = run('type: "TanH"', inputs())
    bottom.diff[...] = 7.0
    top.diff[...] = 1.0
    layer.backward([top], [False], [bottom])
    assert np.all(bottom.diff == 7.0)


def test_bnll_large_inputs_stay_finite():
    x = np.array([-80.0, -60.0, 0.0, 60.0, 1000.0])
    layer, bottom, top = run('type: "BNLL"', x)
    expected = [math.log1p(math.exp(-80)), math.log1p(math.exp(-60)), math.log(2), 60.0, 1000.0]
    np.testing.assert_allclose(top.data, expected, rtol=1e-12)
    top.diff[...] = 1.0
    layer.backward([top], [True], [bottom])
    # bnll_layer.cpp clamps the exponent at 50
    e50 = math.exp(50)
    np.testing.assert_allclose(bottom.diff, [math.exp(-80) / (1 + math.exp(-80)),
                                             math.exp(-60) / (1 + math.exp(-60)),
                                             0.5, e50 / (e50 + 1), e50 / (e50 + 1)], rtol=1e-12)


# ---------------------------------------------------------------- AbsVal
def test_absval_forward_backward():
    x = inputs()
    layer, bottom, top = run('type: "AbsVal"', x)
    np.testing.assert_array_equal(top.data, reference(abs, x))
    grad_check('type: "AbsVal"', x, kink=0.0, kink_range=0.01)


def test_absval_sign_at_zero():
    layer, bottom, top = run('type: "AbsVal"', np.array([-1.0, 0.0, 2.0]))
    top.diff[...] = 3.0
    layer.backward([top], [True], [bottom])
    np.testing.assert_array_equal(bottom.diff, [-3.0, 0.0, 3.0])


def test_absval_refuses_in_place():
    with pytest.raises(LayerError, match="in-place"):
        run('name: "abs1" type: "AbsVal"', inputs(), in_place=True)


# ---------------------------------------------------------------- PReLU
def prelu_reference(x, slopes):
    out = np.empty_like(x)
    for index, value in np.ndenumerate(x):
        a = slopes[index[1]] if len(slopes) > 1 else slopes[0]
        out[index] = value if value > 0 else a * value
    return out


def test_prelu_default_slopes_per_channel():
    x = inputs()
    layer, _, top = run('type: "PReLU"', x)
    assert layer.blobs[0].shape == (3,)
    assert layer.blobs[0].dtype == np.float32
    np.testing.assert_array_equal(layer.blobs[0].data, [0.25, 0.25, 0.25])
    np.testing.assert_allclose(top.data, prelu_reference(x, [0.25] * 3), rtol=1e-12)


def test_prelu_channel_shared_blob_is_scalar():
    x = inputs(ODD_SHAPE)
    layer, _, top = run('type: "PReLU" prelu_param { channel_shared: true '
                        'filler { type: "constant" value: 0.1 } }', x)
    assert layer.blobs[0].shape == ()
    np.testing.assert_allclose(top.data, prelu_reference(x, [np.float32(0.1)]), rtol=1e-12)


def test_prelu_custom_slopes_forward():
    x = inputs()
    layer, bottom, top = run('type: "PReLU"', x)
    layer.blobs[0].data[...] = [-0.5, 0.0, 2.0]
    layer.forward([bottom], [top])
    np.testing.assert_allclose(top.data, prelu_reference(x, [-0.5, 0.0, 2.0]), rtol=1e-12)


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("shared", ["false", "true"])
def test_prelu_gradient_including_slope(in_place, shared):
    text = ('type: "PReLU" prelu_param { channel_shared: %s '
            'filler { type: "uniform" min: -0.5 max: 0.9 } }' % shared)
    set_random_seed(3)
    x = inputs((2, 3, 2, 2), seed=4)
    analytic = grad_check(text, x, in_place=in_place, kink=0.0, kink_range=0.01)
    assert np.any(analytic[("param", 0)] != 0)


def test_prelu_in_place_keeps_input_for_backward():
    x = inputs()
    dy = inputs(seed=9)
    results = []
    for in_place in (False, True):
        layer, bottom, top = run('type: "PReLU"', x, in_place=in_place)
        layer.blobs[0].set_dtype(np.float64)
        layer.blobs[0].data[...] = [0.3, -0.2, 1.5]
        bottom.data[...] = x
        layer.forward([bottom], [top])
        top.diff[...] = dy
        layer.backward([top], [True], [bottom])
        results.append((bottom.diff.copy(), layer.blobs[0].diff.copy()))
    np.testing.assert_array_equal(results[1][0], results[0][0])
    np.testing.assert_array_equal(results[1][1], results[0][1])
    # slope gradient by a slow loop: sum of dy * x where x <= 0
    expected = np.zeros(3)
    for (n, c, h, w), value in np.ndenumerate(x):
        if value <= 0:
            expected[c] += dy[n, c, h, w] * value
    np.testing.assert_allclose(results[0][1], expected, rtol=1e-12)


def test_prelu_slope_diff_accumulates():
    layer, bottom, top = run('type: "PReLU"', inputs())
    top.diff[...] = 1.0
    layer.backward([top], [True], [bottom])
    once = layer.blobs[0].diff.copy()
    layer.backward([top], [True], [bottom])
    np.testing.assert_allclose(layer.blobs[0].diff, 2 * once)


def test_prelu_needs_two_axes():
    with pytest.raises(LayerError, match="2 axes"):
        run('name: "p" type: "PReLU"', np.ones(4))


def test_prelu_preloaded_slope_size_checked():
    text = ('name: "p" type: "PReLU" blobs { shape { dim: 2 } data: 0.1 data: 0.2 }')
    with pytest.raises(LayerError, match="slope"):
        run(text, inputs())


def test_prelu_preloaded_slope_used():
    text = ('type: "PReLU" blobs { shape { dim: 3 } data: 0.1 data: 0.2 data: 0.3 }')
    x = inputs()
    _, _, top = run(text, x)
    np.testing.assert_allclose(top.data, prelu_reference(x, np.float32([0.1, 0.2, 0.3])), rtol=1e-12)


# ---------------------------------------------------------------- Power
POWER_CASES = [
    # (power, scale, shift, positive inputs?)
    (2.0, 0.5, 1.0, False),   # power == 2 special case
    (2.0, 1.5, 0.0, False),   # power == 2 without shift
    (0.5, 1.0, 0.0, True),    # shift == 0 special case: power * y / x
    (3.0, 2.0, 0.5, True),    # general case
    (1.0, 2.0, 1.0, False),   # power == 1: dx = scale * dy
    (-1.0, 1.0, 0.0, True),
]


@pytest.mark.parametrize("power,scale,shift,positive", POWER_CASES)
def test_power_forward_and_gradient(power, scale, shift, positive):
    text = f'type: "Power" power_param {{ power: {power} scale: {scale} shift: {shift} }}'
    x = inputs(low=0.2) if positive else inputs()
    _, _, top = run(text, x)
    np.testing.assert_allclose(top.data, reference(lambda v: (shift + scale * v) ** power, x), rtol=1e-12)
    grad_check(text, x[:1])
    grad_check(text, x[:1], in_place=True)


def test_power_constant_cases():
    x = inputs()
    # scale 0: y = shift^power everywhere, zero gradient
    layer, bottom, top = run('type: "Power" power_param { power: 3 scale: 0 shift: 2 }', x)
    np.testing.assert_array_equal(top.data, np.full(x.shape, 8.0))
    top.diff[...] = 1.0
    layer.backward([top], [True], [bottom])
    np.testing.assert_array_equal(bottom.diff, 0.0)
    # power 0: y = 1 even where shift^0 would matter
    _, _, top = run('type: "Power" power_param { power: 0 scale: 2 shift: 0 }', x)
    np.testing.assert_array_equal(top.data, np.ones(x.shape))


def test_power_shift_zero_gradient_nan_at_zero_like_caffe():
    layer, bottom, top = run('type: "Power" power_param { power: 0.5 }', np.array([0.0, 4.0]))
    top.diff[...] = 1.0
    layer.backward([top], [True], [bottom])
    # power_layer.cpp computes power * y / x: 0/0 at x == 0
    assert math.isnan(bottom.diff[0])
    assert bottom.diff[1] == pytest.approx(0.25)


# ---------------------------------------------------------------- Exp / Log
def test_exp_default_base_e():
    x = inputs()
    _, _, top = run('type: "Exp"', x)
    np.testing.assert_allclose(top.data, np.exp(x), rtol=1e-14)
    grad_check('type: "Exp" exp_param { scale: -0.7 shift: 0.3 }', x)


@pytest.mark.parametrize("kind", ["Exp", "Log"])
@pytest.mark.parametrize("base", [0, -2])
def test_exp_log_bad_base(kind, base):
    with pytest.raises(LayerError, match="base"):
        run(f'name: "e" type: "{kind}" {kind.lower()}_param {{ base: {base} }}', inputs(low=0.1))


def test_log_default_base_e():
    x = inputs(low=0.1)
    _, _, top = run('type: "Log"', x)
    np.testing.assert_allclose(top.data, np.log(x), rtol=1e-14)
    grad_check('type: "Log" log_param { base: 2 }', x)


# ---------------------------------------------------------------- Threshold
def test_threshold_forward_and_no_backward():
    x = inputs()
    layer, bottom, top = run('type: "Threshold" threshold_param { threshold: 0.3 }', x)
    np.testing.assert_array_equal(top.data, reference(lambda v: 1.0 if v > 0.3 else 0.0, x))
    assert layer.has_backward is False
    with pytest.raises(LayerError):
        layer.backward([top], [True], [bottom])
    layer2, bottom2, top2 = run('type: "Threshold"', np.array([-1.0, 0.0, 1e-9]), in_place=True)
    np.testing.assert_array_equal(top2.data, [0.0, 0.0, 1.0])


# ---------------------------------------------------------------- Clip
def test_clip_gradient_mask_values():
    x = np.array([-1.0, -0.5, 0.0, 0.8, 1.0])
    layer, bottom, top = run('type: "Clip" clip_param { min: -0.5 max: 0.8 }', x, in_place=True)
    top.diff[...] = 2.0
    layer.backward([top], [True], [bottom])
    # clip_layer.cpp: gradient passes where min <= x <= max (inclusive)
    np.testing.assert_array_equal(bottom.diff, [0.0, 2.0, 2.0, 2.0, 0.0])


def test_clip_errors():
    with pytest.raises(LayerError, match="max"):
        run('name: "c" type: "Clip" clip_param { min: -1 }', inputs())
    with pytest.raises(LayerError, match="min"):
        run('name: "c" type: "Clip" clip_param { min: 2 max: 1 }', inputs())


# ---------------------------------------------------------------- Dropout
def test_dropout_test_phase_is_identity():
    x = inputs()
    for in_place in (False, True):
        layer, bottom, top = run('type: "Dropout" dropout_param { dropout_ratio: 0.7 }', x,
                                 in_place=in_place, phase=1)
        np.testing.assert_array_equal(top.data, x)
        dy = inputs(seed=2)
        top.diff[...] = dy
        layer.backward([top], [True], [bottom])
        np.testing.assert_array_equal(bottom.diff, dy)


@pytest.mark.parametrize("in_place", [False, True])
def test_dropout_train_scale_and_mask_statistics(in_place):
    ratio = 0.3
    set_random_seed(11)
    x = np.abs(inputs((40, 50, 10))) + 0.5  # nonzero inputs: every zero output was dropped
    layer, bottom, top = run(f'type: "Dropout" dropout_param {{ dropout_ratio: {ratio} }}', x,
                             in_place=in_place, phase=0)
    y = top.data.copy()
    kept = y != 0
    # kept values scaled by 1 / (1 - ratio), dropped values exactly zero
    np.testing.assert_allclose(y[kept], x[kept] / (1 - f32(ratio)), rtol=1e-12)
    fraction = kept.mean()
    assert abs(fraction - (1 - ratio)) < 0.01, fraction
    # backward uses the same mask and scale
    dy = inputs(x.shape, seed=3)
    top.diff[...] = dy
    layer.backward([top], [True], [bottom])
    np.testing.assert_allclose(bottom.diff, np.where(kept, dy / (1 - f32(ratio)), 0.0), rtol=1e-12)


def test_dropout_train_reproducible_with_seed_and_varies_between_passes():
    x = np.ones((4, 100))
    set_random_seed(5)
    layer, bottom, top = run('type: "Dropout"', x)
    first = top.data.copy()
    layer.forward([bottom], [top])
    second = top.data.copy()
    assert not np.array_equal(first, second)
    assert set(np.unique(first)) == {0.0, 2.0}
    set_random_seed(5)
    _, _, top_again = run('type: "Dropout"', x)
    np.testing.assert_array_equal(top_again.data, first)


def test_dropout_gradient_with_fixed_mask():
    def reseed():
        set_random_seed(21)
    layer = layer_from_text('type: "Dropout" dropout_param { dropout_ratio: 0.4 }', 0)
    bottom = make_blob(inputs((2, 3, 2, 2)))
    check_gradient(layer, [bottom], [Blob(())], reseed=reseed)


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_dropout_bad_ratio(ratio):
    with pytest.raises(LayerError, match="dropout_ratio"):
        run(f'name: "d" type: "Dropout" dropout_param {{ dropout_ratio: {ratio} }}', inputs())


# ---------------------------------------------------------------- counts / registry
@pytest.mark.parametrize("type_name", ["ReLU", "Sigmoid", "Dropout", "PReLU"])
def test_one_bottom_one_top(type_name):
    layer = layer_from_text(f'name: "n" type: "{type_name}"')
    with pytest.raises(LayerError):
        layer.setup_layer([make_blob(inputs()), make_blob(inputs())], [Blob(())])


# ---------------------------------------------------------------- ReLU against loops
def relu_references(x, dy, slope):
    """Forward and backward of ReLU by scalar loops (relu_layer.cpp, gradient slope at 0)."""
    y = reference(lambda v: v if v > 0 else slope * v, x)
    dx = np.empty_like(y)
    for index, value in np.ndenumerate(x):
        dx[index] = float(dy[index]) * (1.0 if value > 0 else slope)
    return y, dx


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("slope", [0.0, 0.1, -0.5])
@pytest.mark.parametrize("shape", [(3, 5, 4, 3), (1, 7, 3, 5), (2, 3), (7,)])
def test_relu_odd_shapes_in_place_and_dtypes_match_reference(shape, slope, in_place, dtype):
    """Forward and backward (written straight into the bottom diff) against scalar loops."""
    x = inputs(shape, seed=8).astype(dtype)
    x.reshape(-1)[::5] = 0  # the kink: gradient is negative_slope
    dy = inputs(shape, seed=9).astype(dtype)
    layer, bottom, top = run(f'type: "ReLU" relu_param {{ negative_slope: {slope} }}', x,
                             in_place=in_place, dtype=dtype)
    y_ref, dx_ref = relu_references(x, dy, f32(slope))
    assert top.data.dtype == dtype
    tol = 1e-6 if dtype == np.float32 else 1e-15
    np.testing.assert_allclose(top.data, y_ref, rtol=tol, atol=tol)
    top.diff[...] = dy
    layer.backward([top], [True], [bottom])
    np.testing.assert_allclose(bottom.diff, dx_ref, rtol=tol, atol=tol)
