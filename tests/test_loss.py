"""Loss layers and Accuracy against slow loop references; gradients with check_gradient.

check_gradient sets the loss top's diff to a random scalar, so the loss_weight
scaling of every backward is exercised.
"""
import math

import numpy as np
import pytest

from framework.blob import Blob
from framework.errors import LayerError
from gradient_check import check_gradient, layer_from_text, make_blob
from layers.loss import (BATCH_SIZE, FULL, NONE, VALID, loss_normalizer, normalization_mode)
from proto import caffe_pb2

FLT_MIN = 1.1754943508222875e-38


# -- slow references ----------------------------------------------------------------------
def ref_normalizer(mode, outer, inner, count):
    value = {"FULL": outer * inner, "VALID": count, "BATCH_SIZE": outer, "NONE": 1}[mode]
    return max(1.0, float(value))


def ref_softmax(x, axis):
    moved = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    out = np.empty_like(moved)
    for idx in np.ndindex(moved.shape[:-1]):
        peak = max(moved[idx])
        exps = [math.exp(v - peak) for v in moved[idx]]
        out[idx] = [e / sum(exps) for e in exps]
    return np.moveaxis(out, -1, axis)


def split(shape, axis):
    outer = int(np.prod(shape[:axis]))
    inner = int(np.prod(shape[axis + 1:]))
    return outer, shape[axis], inner


def ref_softmax_loss(x, labels, axis=1, ignore=None, mode="VALID"):
    p = ref_softmax(x, axis)
    outer, classes, inner = split(x.shape, axis)
    p3 = p.reshape(outer, classes, inner)
    lab = labels.reshape(outer, inner)
    loss, count = 0.0, 0
    for i in range(outer):
        for j in range(inner):
            y = int(lab[i, j])
            if ignore is not None and y == ignore:
                continue
            loss -= math.log(max(p3[i, y, j], FLT_MIN))
            count += 1
    return loss / ref_normalizer(mode, outer, inner, count)


def ref_infogain_loss(x, labels, h, axis=1, ignore=None, mode="VALID"):
    p = ref_softmax(x, axis)
    outer, classes, inner = split(x.shape, axis)
    p3 = p.reshape(outer, classes, inner)
    lab = labels.reshape(outer, inner)
    loss, count = 0.0, 0
    for i in range(outer):
        for j in range(inner):
            y = int(lab[i, j])
            if ignore is not None and y == ignore:
                continue
            for k in range(classes):
                loss -= h[y, k] * math.log(max(p3[i, k, j], 1e-20))
            count += 1
    return loss / ref_normalizer(mode, outer, inner, count)


def ref_sigmoid_ce(x, t, ignore=None, mode="BATCH_SIZE"):
    loss, count = 0.0, 0
    for xi, ti in zip(x.reshape(-1), t.reshape(-1)):
        if ignore is not None and int(ti) == ignore:
            continue
        s = 1.0 / (1.0 + math.exp(-xi))
        loss -= ti * math.log(s) + (1 - ti) * math.log(1 - s)
        count += 1
    return loss / ref_normalizer(mode, x.shape[0], x.size // x.shape[0], count)


def ref_hinge(x, labels, norm):
    n = x.shape[0]
    x2 = x.reshape(n, -1)
    loss = 0.0
    for i in range(n):
        for k in range(x2.shape[1]):
            sign = -1.0 if k == int(labels.reshape(-1)[i]) else 1.0
            m = max(0.0, 1.0 + sign * x2[i, k])
            loss += m if norm == "L1" else m * m
    return loss / n


def ref_contrastive(a, b, y, margin=1.0, legacy=False):
    n = a.shape[0]
    a2, b2 = a.reshape(n, -1), b.reshape(n, -1)
    loss = 0.0
    for i in range(n):
        d2 = sum((a2[i, c] - b2[i, c]) ** 2 for c in range(a2.shape[1]))
        if int(y.reshape(-1)[i]):
            loss += d2
        elif legacy:
            loss += max(margin - d2, 0.0)
        else:
            loss += max(margin - math.sqrt(d2), 0.0) ** 2
    return loss / n / 2


def ref_accuracy(x, labels, axis=1, top_k=1, ignore=None):
    outer, classes, inner = split(x.shape, axis)
    x3 = x.reshape(outer, classes, inner)
    lab = labels.reshape(outer, inner)
    hits, count = 0, 0
    seen, right = [0] * classes, [0] * classes
    for i in range(outer):
        for j in range(inner):
            y = int(lab[i, j])
            if ignore is not None and y == ignore:
                continue
            # others scoring at least as high as the true class (ties count against it)
            rivals = sum(1 for k in range(classes) if k != y and x3[i, k, j] >= x3[i, y, j])
            seen[y] += 1
            if rivals < top_k:
                hits += 1
                right[y] += 1
            count += 1
    per_class = [r / s if s else 0.0 for r, s in zip(right, seen)]
    return (hits / count if count else 0.0), per_class


# -- helpers -------------------------------------------------------------------------------
def build(text, *arrays, ntop=1, dtype=np.float64, forward=True):
    layer = layer_from_text(text)
    bottom = [make_blob(a, dtype=dtype) for a in arrays]
    top = [Blob(dtype=dtype) for _ in range(ntop)]
    layer.setup_layer(bottom, top)
    if forward:
        layer.forward(bottom, top)
    return layer, bottom, top


def labels_for(rng, outer_inner_shape, classes):
    return rng.integers(0, classes, size=outer_inner_shape).astype(np.float64)


def loss_param_text(mode, ignore=None):
    parts = []
    if ignore is not None:
        parts.append(f"ignore_label: {ignore}")
    if mode.startswith("legacy_"):
        parts.append(f"normalize: {mode[len('legacy_'):]}")
    elif mode != "default":
        parts.append(f"normalization: {mode}")
    return f"loss_param {{ {' '.join(parts)} }}" if parts else ""


def effective_mode(mode, default):
    return {"default": default, "legacy_true": "VALID", "legacy_false": "BATCH_SIZE"}.get(mode, mode)


# -- shared normaliser ----------------------------------------------------------------------
def test_loss_normalizer_modes_and_guard():
    assert loss_normalizer(FULL, 4, 3, 5) == 12
    assert loss_normalizer(VALID, 4, 3, 5) == 5
    assert loss_normalizer(VALID, 4, 3, -1) == 12
    assert loss_normalizer(BATCH_SIZE, 4, 3, 5) == 4
    assert loss_normalizer(NONE, 4, 3, 5) == 1
    assert loss_normalizer(VALID, 4, 3, 0) == 1  # max(1, .) guard: all labels ignored
    assert loss_normalizer(FULL, 0, 3, 0) == 1


def test_normalization_mode_resolution():
    lp = caffe_pb2.LossParameter()
    assert normalization_mode(lp, VALID) == VALID
    assert normalization_mode(lp, BATCH_SIZE) == BATCH_SIZE
    lp.normalize = True
    assert normalization_mode(lp, BATCH_SIZE) == VALID
    lp.normalize = False
    assert normalization_mode(lp, VALID) == BATCH_SIZE
    lp.normalization = FULL  # explicit normalization wins over the legacy flag
    assert normalization_mode(lp, VALID) == FULL


# -- SoftmaxWithLoss ----------------------------------------------------------------------
SOFTMAX_MODES = ["default", "FULL", "VALID", "BATCH_SIZE", "NONE", "legacy_true", "legacy_false"]


@pytest.mark.parametrize("mode", SOFTMAX_MODES)
def test_softmax_loss_forward_modes_with_ignore(mode):
    rng = np.random.default_rng(10)
    x = rng.standard_normal((3, 4, 2, 2)) * 2
    labels = labels_for(rng, (3, 1, 2, 2), 4)
    labels.reshape(-1)[[1, 5, 6]] = 255
    text = f'type: "SoftmaxWithLoss" {loss_param_text(mode, 255)}'
    _, _, top = build(text, x, labels)
    assert top[0].shape == ()
    want = ref_softmax_loss(x, labels, ignore=255, mode=effective_mode(mode, "VALID"))
    np.testing.assert_allclose(top[0].data, want, rtol=1e-12)


@pytest.mark.parametrize("mode", SOFTMAX_MODES)
def test_softmax_loss_gradient_modes_with_ignore(mode):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 3, 3))
    labels = labels_for(rng, (2, 3), 3)
    labels[0, 1] = -1
    layer = layer_from_text(f'type: "SoftmaxWithLoss" {loss_param_text(mode, -1)}')
    grads = check_gradient(layer, [make_blob(x), make_blob(labels)], [Blob()], check_bottom=[0])
    assert np.all(grads[("bottom", 0)][0, :, 1] == 0)  # ignored position gets no gradient


def test_softmax_loss_backward_formula_and_loss_weight():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 3))
    labels = np.array([2.0, 0.0])
    layer, bottom, top = build('type: "SoftmaxWithLoss" loss_weight: 3', x, labels)
    assert layer.loss_weights == [3.0] and top[0].diff[()] == 3.0
    layer.backward(top, [True, False], bottom)
    p = ref_softmax(x, 1)
    p[0, 2] -= 1
    p[1, 0] -= 1
    np.testing.assert_allclose(bottom[0].diff, 3.0 * p / 2, rtol=1e-12)


@pytest.mark.parametrize("shape,axis", [((1, 5), 1), ((1, 3, 2), 1), ((2, 3, 4), 2), ((2, 2, 3), -1)])
def test_softmax_loss_axes_and_batch_one(shape, axis):
    rng = np.random.default_rng(13)
    x = rng.standard_normal(shape)
    outer, classes, inner = split(shape, axis if axis >= 0 else len(shape) + axis)
    labels = labels_for(rng, (outer * inner,), classes)
    if shape[0] != labels.shape[0]:
        labels = labels.reshape((shape[0], -1))
    text = f'type: "SoftmaxWithLoss" softmax_param {{ axis: {axis} }}'
    _, _, top = build(text, x, labels)
    np.testing.assert_allclose(top[0].data, ref_softmax_loss(x, labels, axis=axis % len(shape)),
                               rtol=1e-12)
    check_gradient(layer_from_text(text), [make_blob(x), make_blob(labels)], [Blob()], check_bottom=[0])


def test_softmax_loss_second_top_is_probabilities():
    rng = np.random.default_rng(14)
    x = rng.standard_normal((2, 3, 2))
    labels = labels_for(rng, (2, 2), 3)
    layer, bottom, top = build('type: "SoftmaxWithLoss"', x, labels, ntop=2)
    assert layer.loss_weights == [1.0, 0.0]
    assert top[1].shape == x.shape
    np.testing.assert_allclose(top[1].data, ref_softmax(x, 1), rtol=1e-12)
    np.testing.assert_allclose(top[0].data, ref_softmax_loss(x, labels), rtol=1e-12)
    layer = layer_from_text('type: "SoftmaxWithLoss"')
    check_gradient(layer, [make_blob(x), make_blob(labels)], [Blob(), Blob()], check_bottom=[0],
                   top_weights=[True, False])


def test_softmax_loss_all_ignored_gives_zero():
    x = np.random.default_rng(15).standard_normal((2, 3))
    labels = np.array([7.0, 7.0])
    layer, bottom, top = build('type: "SoftmaxWithLoss" loss_param { ignore_label: 7 }', x, labels)
    assert top[0].data[()] == 0.0
    layer.backward(top, [True, False], bottom)
    assert np.all(bottom[0].diff == 0)


def test_softmax_loss_clamps_at_flt_min_in_float32():
    x = np.array([[0.0, -1000.0]], dtype=np.float32)
    layer, bottom, top = build('type: "SoftmaxWithLoss"', x, np.array([1.0]), dtype=np.float32)
    assert top[0].data.dtype == np.float32 and top[0].shape == ()
    np.testing.assert_allclose(top[0].data, -math.log(FLT_MIN), rtol=1e-6)


def test_softmax_loss_float32_matches_reference():
    rng = np.random.default_rng(16)
    x = rng.standard_normal((4, 10)).astype(np.float32)
    labels = labels_for(rng, (4,), 10)
    _, _, top = build('type: "SoftmaxWithLoss"', x, labels, dtype=np.float32)
    np.testing.assert_allclose(top[0].data, ref_softmax_loss(x, labels), rtol=1e-5)


def test_softmax_loss_label_count_mismatch():
    with pytest.raises(LayerError, match=r"Number of labels must match number of predictions"):
        build('type: "SoftmaxWithLoss"', np.zeros((2, 3, 2)), np.zeros((2, 3)))


def test_softmax_loss_first_dimension_mismatch():
    with pytest.raises(LayerError, match=r"same first dimension"):
        build('type: "SoftmaxWithLoss"', np.zeros((2, 3)), np.zeros((3,)))


@pytest.mark.parametrize("bad", [3.0, -1.0])
def test_softmax_loss_label_out_of_range(bad):
    with pytest.raises(LayerError, match=r"layer 'my_loss'.*label value .* outside the valid range \[0, 3\)"):
        build('name: "my_loss" type: "SoftmaxWithLoss"', np.zeros((2, 3)), np.array([0.0, bad]))


def test_softmax_loss_refuses_label_gradient():
    layer, bottom, top = build('type: "SoftmaxWithLoss"', np.zeros((2, 3)), np.array([0.0, 1.0]))
    assert not layer.allow_force_backward(1) and layer.allow_force_backward(0)
    with pytest.raises(LayerError, match=r"cannot backpropagate to label inputs"):
        layer.backward(top, [True, True], bottom)


def test_softmax_loss_refuses_weight_on_probability_top():
    with pytest.raises(LayerError, match=r"loss_weight on the probability top"):
        build('type: "SoftmaxWithLoss" loss_weight: 1 loss_weight: 0.5', np.zeros((2, 3)),
              np.array([0.0, 1.0]), ntop=2)


# -- SigmoidCrossEntropyLoss -------------------------------------------------------------------
@pytest.mark.parametrize("mode", SOFTMAX_MODES)
def test_sigmoid_ce_forward_modes_with_ignore(mode):
    rng = np.random.default_rng(20)
    x = rng.standard_normal((3, 2, 2)) * 2
    t = rng.uniform(0, 1, size=(3, 4))
    t.reshape(-1)[[0, 7]] = -1
    _, _, top = build(f'type: "SigmoidCrossEntropyLoss" {loss_param_text(mode, -1)}', x, t)
    assert top[0].shape == ()
    want = ref_sigmoid_ce(x, t, ignore=-1, mode=effective_mode(mode, "BATCH_SIZE"))
    np.testing.assert_allclose(top[0].data, want, rtol=1e-12)


def test_sigmoid_ce_default_is_batch_size_without_ignore():
    rng = np.random.default_rng(21)
    x = rng.standard_normal((4, 3))
    t = rng.uniform(0, 1, size=(4, 3))
    _, _, top = build('type: "SigmoidCrossEntropyLoss"', x, t)
    np.testing.assert_allclose(top[0].data, ref_sigmoid_ce(x, t), rtol=1e-12)


@pytest.mark.parametrize("mode", ["default", "FULL", "VALID", "NONE"])
def test_sigmoid_ce_gradient(mode):
    rng = np.random.default_rng(22)
    x = rng.standard_normal((2, 3, 2))
    t = rng.uniform(0, 1, size=(2, 3, 2))
    t[1, 2, 0] = -1
    layer = layer_from_text(f'type: "SigmoidCrossEntropyLoss" {loss_param_text(mode, -1)}')
    grads = check_gradient(layer, [make_blob(x), make_blob(t)], [Blob()], check_bottom=[0])
    assert grads[("bottom", 0)][1, 2, 0] == 0


def test_sigmoid_ce_batch_one_and_extreme_inputs_are_finite():
    x = np.array([[100.0, -100.0, 0.0]], dtype=np.float32)
    t = np.array([[0.0, 1.0, 1.0]], dtype=np.float32)
    layer, bottom, top = build('type: "SigmoidCrossEntropyLoss"', x, t, dtype=np.float32)
    np.testing.assert_allclose(top[0].data, 200.0 + math.log(2.0), rtol=1e-6)
    layer.backward(top, [True, False], bottom)
    np.testing.assert_allclose(bottom[0].diff, [[1.0, -1.0, -0.5]], rtol=1e-6)


def test_sigmoid_ce_count_mismatch_and_label_gradient():
    with pytest.raises(LayerError, match=r"must have the same count"):
        build('type: "SigmoidCrossEntropyLoss"', np.zeros((2, 3)), np.zeros((2, 2)))
    layer, bottom, top = build('type: "SigmoidCrossEntropyLoss"', np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(LayerError, match=r"cannot backpropagate to label inputs"):
        layer.backward(top, [True, True], bottom)


# -- EuclideanLoss ------------------------------------------------------------------------------
@pytest.mark.parametrize("shape_a,shape_b", [((3, 2, 2), (3, 4)), ((1, 5), (1, 5, 1, 1))])
def test_euclidean_forward_and_gradient_to_both(shape_a, shape_b):
    rng = np.random.default_rng(30)
    a = rng.standard_normal(shape_a)
    b = rng.standard_normal(shape_b)
    layer, _, top = build('type: "EuclideanLoss"', a, b)
    want = sum((u - v) ** 2 for u, v in zip(a.reshape(-1), b.reshape(-1))) / shape_a[0] / 2
    np.testing.assert_allclose(top[0].data, want, rtol=1e-12)
    assert layer.allow_force_backward(1)
    grads = check_gradient(layer_from_text('type: "EuclideanLoss"'), [make_blob(a), make_blob(b)], [Blob()])
    np.testing.assert_allclose(grads[("bottom", 1)].reshape(-1), -grads[("bottom", 0)].reshape(-1))


def test_euclidean_errors():
    with pytest.raises(LayerError, match=r"Inputs must have the same dimension"):
        build('type: "EuclideanLoss"', np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(LayerError, match=r"loss_param.ignore_label is not supported"):
        build('type: "EuclideanLoss" loss_param { ignore_label: 1 }', np.zeros((2, 3)), np.zeros((2, 3)))


# -- HingeLoss -----------------------------------------------------------------------------------
HINGE_X = np.array([[0.3, -0.4, 1.5, -1.6], [0.5, 0.1, -0.6, 1.4], [-1.5, 0.2, 0.7, -0.3]])
HINGE_Y = np.array([2.0, 0.0, 3.0])


@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_hinge_forward_and_gradient(norm):
    text = f'type: "HingeLoss" hinge_loss_param {{ norm: {norm} }}'
    _, _, top = build(text, HINGE_X, HINGE_Y)
    np.testing.assert_allclose(top[0].data, ref_hinge(HINGE_X, HINGE_Y, norm), rtol=1e-12)
    check_gradient(layer_from_text(text), [make_blob(HINGE_X), make_blob(HINGE_Y)], [Blob()],
                   check_bottom=[0])


def test_hinge_default_l1_batch_one_4d():
    x = HINGE_X[:1].reshape(1, 4, 1, 1)
    _, _, top = build('type: "HingeLoss"', x, np.array([[2.0]]))
    np.testing.assert_allclose(top[0].data, ref_hinge(x, np.array([2.0]), "L1"), rtol=1e-12)


def test_hinge_errors():
    with pytest.raises(LayerError, match=r"outside the valid range \[0, 4\)"):
        build('type: "HingeLoss"', HINGE_X, np.array([2.0, 0.0, 4.0]))
    with pytest.raises(LayerError, match=r"one label per item"):
        build('type: "HingeLoss"', HINGE_X, np.zeros((3, 2)))
    layer, bottom, top = build('type: "HingeLoss"', HINGE_X, HINGE_Y)
    with pytest.raises(LayerError, match=r"cannot backpropagate to label inputs"):
        layer.backward(top, [True, True], bottom)


# -- InfogainLoss -------------------------------------------------------------------------------
def infogain_matrix(classes, seed=40):
    rng = np.random.default_rng(seed)
    return np.eye(classes) + rng.uniform(0, 0.5, size=(classes, classes))


@pytest.mark.parametrize("mode", ["default", "FULL", "VALID", "BATCH_SIZE", "NONE"])
def test_infogain_forward_and_gradient_with_h_bottom(mode):
    rng = np.random.default_rng(41)
    x = rng.standard_normal((3, 4))
    labels = np.array([1.0, 9.0, 3.0])
    h = infogain_matrix(4)
    text = f'type: "InfogainLoss" {loss_param_text(mode, 9)}'
    _, _, top = build(text, x, labels, h)
    want = ref_infogain_loss(x, labels, h, ignore=9, mode=effective_mode(mode, "VALID"))
    np.testing.assert_allclose(top[0].data, want, rtol=1e-12)
    grads = check_gradient(layer_from_text(text), [make_blob(x), make_blob(labels), make_blob(h)], [Blob()],
                           check_bottom=[0])
    assert np.all(grads[("bottom", 0)][1] == 0)


def test_infogain_identity_h_equals_softmax_loss():
    rng = np.random.default_rng(42)
    x = rng.standard_normal((2, 3, 2))
    labels = labels_for(rng, (2, 2), 3)
    _, _, top = build('type: "InfogainLoss"', x, labels, np.eye(3))
    np.testing.assert_allclose(top[0].data, ref_softmax_loss(x, labels), rtol=1e-12)


def test_infogain_source_file_axis_and_second_top(tmp_path):
    rng = np.random.default_rng(43)
    x = rng.standard_normal((2, 2, 3))  # classes on axis 2
    labels = labels_for(rng, (2, 2), 3)
    h = infogain_matrix(3, seed=44)
    proto = caffe_pb2.BlobProto(num=1, channels=1, height=3, width=3)
    proto.data.extend(h.reshape(-1).tolist())
    path = tmp_path / "h.binaryproto"
    path.write_bytes(proto.SerializeToString())
    text = f'type: "InfogainLoss" infogain_loss_param {{ source: "{path}" axis: 2 }}'
    layer, _, top = build(text, x, labels, ntop=2)
    h32 = h.astype(np.float32).astype(np.float64)  # BlobProto.data holds floats
    np.testing.assert_allclose(top[0].data, ref_infogain_loss(x, labels, h32, axis=2), rtol=1e-12)
    np.testing.assert_allclose(top[1].data, ref_softmax(x, 2), rtol=1e-12)
    assert layer.loss_weights == [1.0, 0.0]
    check_gradient(layer_from_text(text), [make_blob(x), make_blob(labels)], [Blob(), Blob()],
                   check_bottom=[0], top_weights=[True, False])


def test_infogain_errors(tmp_path):
    x, labels = np.zeros((2, 3)), np.array([0.0, 1.0])
    with pytest.raises(LayerError, match=r"Infogain matrix source must be specified"):
        build('type: "InfogainLoss"', x, labels)
    with pytest.raises(LayerError, match=r"H must be 3x3"):
        build('type: "InfogainLoss"', x, labels, np.eye(2))
    with pytest.raises(LayerError, match=r"normalize is deprecated"):
        build('type: "InfogainLoss" loss_param { normalize: true }', x, labels, np.eye(3))
    with pytest.raises(LayerError, match=r"cannot read infogain_loss_param.source"):
        build(f'type: "InfogainLoss" infogain_loss_param {{ source: "{tmp_path}/missing" }}', x, labels)
    with pytest.raises(LayerError, match=r"outside the valid range"):
        build('type: "InfogainLoss"', x, np.array([0.0, 3.0]), np.eye(3))
    with pytest.raises(LayerError, match=r"Number of labels must match"):
        build('type: "InfogainLoss"', x, np.array([[0.0, 1.0], [1.0, 0.0]]), np.eye(3))
    layer, bottom, top = build('type: "InfogainLoss"', x, labels, np.eye(3))
    assert not layer.allow_force_backward(2)
    with pytest.raises(LayerError, match=r"cannot backpropagate to infogain inputs"):
        layer.backward(top, [True, False, True], bottom)


# -- MultinomialLogisticLoss -----------------------------------------------------------------
def test_multinomial_forward_gradient_and_clamp():
    rng = np.random.default_rng(50)
    p = rng.uniform(0.1, 1.0, size=(3, 4))
    labels = np.array([3.0, 0.0, 2.0])
    text = 'type: "MultinomialLogisticLoss"'
    _, _, top = build(text, p, labels)
    want = -sum(math.log(p[i, int(labels[i])]) for i in range(3)) / 3
    np.testing.assert_allclose(top[0].data, want, rtol=1e-12)
    check_gradient(layer_from_text(text), [make_blob(p), make_blob(labels)], [Blob()], check_bottom=[0])
    # probability 0 is clamped at kLOG_THRESHOLD = 1e-20, also in the gradient
    zero = np.array([[0.0, 1.0]])
    layer, bottom, top = build(text, zero.reshape(1, 2, 1, 1), np.array([0.0]))
    np.testing.assert_allclose(top[0].data, -math.log(1e-20), rtol=1e-12)
    top[0].diff[...] = 2.0
    layer.backward(top, [True, False], bottom)
    np.testing.assert_allclose(bottom[0].diff.reshape(-1), [-2.0 / 1e-20, 0.0], rtol=1e-12)


def test_multinomial_errors():
    with pytest.raises(LayerError, match=r"one value per item"):
        build('type: "MultinomialLogisticLoss"', np.ones((2, 3)), np.zeros((2, 2)))
    with pytest.raises(LayerError, match=r"outside the valid range \[0, 3\)"):
        build('type: "MultinomialLogisticLoss"', np.ones((2, 3)), np.array([0.0, 5.0]))


# -- ContrastiveLoss ---------------------------------------------------------------------------
def pairs(distances, channels=3, seed=60):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((len(distances), channels))
    direction = rng.standard_normal((len(distances), channels))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    return a, a + direction * np.asarray(distances)[:, None]


@pytest.mark.parametrize("legacy", [False, True])
def test_contrastive_forward_and_gradient(legacy):
    # dissimilar pairs both inside (0.4, 0.7) and outside (1.3) the margin; squared 0.16, 0.49, 1.69
    a, b = pairs([0.5, 0.4, 0.7, 1.3, 0.9])
    y = np.array([1.0, 0.0, 0.0, 0.0, 1.0])
    text = f'type: "ContrastiveLoss" contrastive_loss_param {{ margin: 1.0 legacy_version: {str(legacy).lower()} }}'
    _, _, top = build(text, a, b, y)
    np.testing.assert_allclose(top[0].data, ref_contrastive(a, b, y, 1.0, legacy), rtol=1e-12)
    # Caffe's non-legacy backward divides by (d + 1e-4) instead of d: a relative error ~1e-4
    grads = check_gradient(layer_from_text(text), [make_blob(a), make_blob(b), make_blob(y)], [Blob()],
                           check_bottom=[0, 1], threshold=1e-3)
    assert np.all(grads[("bottom", 0)][3] == 0)  # outside the margin: no gradient
    np.testing.assert_allclose(grads[("bottom", 1)], -grads[("bottom", 0)])


def test_contrastive_4d_batch_one_and_margin():
    a, b = pairs([0.8])
    _, _, top = build('type: "ContrastiveLoss" contrastive_loss_param { margin: 2.0 }',
                      a.reshape(1, 3, 1, 1), b.reshape(1, 3, 1, 1), np.zeros((1, 1, 1, 1)))
    np.testing.assert_allclose(top[0].data, (2.0 - 0.8) ** 2 / 2, rtol=1e-12)


def test_contrastive_errors():
    with pytest.raises(LayerError, match=r"same C"):
        build('type: "ContrastiveLoss"', np.zeros((2, 3)), np.zeros((2, 4)), np.zeros(2))
    with pytest.raises(LayerError, match=r"same C"):
        build('type: "ContrastiveLoss"', np.zeros((2, 3, 2, 1)), np.zeros((2, 3, 2, 1)), np.zeros(2))
    with pytest.raises(LayerError, match=r"one value per pair"):
        build('type: "ContrastiveLoss"', np.zeros((2, 3)), np.zeros((2, 3)), np.zeros(3))
    a, b = pairs([0.5, 0.5])
    layer, bottom, top = build('type: "ContrastiveLoss"', a, b, np.zeros(2))
    assert not layer.allow_force_backward(2) and layer.allow_force_backward(1)
    with pytest.raises(LayerError, match=r"cannot backpropagate to label inputs"):
        layer.backward(top, [True, True, True], bottom)


# -- Accuracy -----------------------------------------------------------------------------------
def test_accuracy_top1_with_ties():
    x = np.array([[0.1, 0.7, 0.2], [0.5, 0.5, 0.0], [0.3, 0.3, 0.4], [0.9, 0.0, 0.1]])
    labels = np.array([1.0, 0.0, 2.0, 2.0])  # row 1 is a tie: counts as wrong
    layer, _, top = build('type: "Accuracy"', x, labels, ntop=2)
    assert not layer.has_backward
    assert top[0].shape == () and top[1].shape == (3,)
    np.testing.assert_allclose(top[0].data, 0.5)
    np.testing.assert_allclose(top[1].data, [0.0, 1.0, 0.5])
    want, per_class = ref_accuracy(x, labels)
    np.testing.assert_allclose(top[0].data, want)
    np.testing.assert_allclose(top[1].data, per_class)


@pytest.mark.parametrize("shape,axis,top_k", [((5, 4), 1, 2), ((2, 4, 3), 1, 3), ((2, 3, 5), -1, 2),
                                              ((1, 6), 1, 1)])
def test_accuracy_matches_reference(shape, axis, top_k):
    rng = np.random.default_rng(70)
    x = rng.integers(0, 4, size=shape).astype(np.float64)  # small integers: many ties
    outer, classes, inner = split(shape, axis % len(shape))
    labels = labels_for(rng, (outer * inner,), classes)
    labels[0] = -5
    text = f'type: "Accuracy" accuracy_param {{ axis: {axis} top_k: {top_k} ignore_label: -5 }}'
    _, _, top = build(text, x, labels, ntop=2)
    want, per_class = ref_accuracy(x, labels, axis % len(shape), top_k, ignore=-5)
    np.testing.assert_allclose(top[0].data, want, rtol=1e-12)
    np.testing.assert_allclose(top[1].data, per_class, rtol=1e-12)


def test_accuracy_all_ignored_is_zero_and_float32():
    x = np.ones((2, 3), dtype=np.float32)
    _, _, top = build('type: "Accuracy" accuracy_param { ignore_label: 1 }', x, np.ones(2), dtype=np.float32)
    assert top[0].data.dtype == np.float32 and top[0].data[()] == 0.0


def test_accuracy_errors():
    with pytest.raises(LayerError, match=r"top_k must be less than or equal to the number of classes"):
        build('type: "Accuracy" accuracy_param { top_k: 4 }', np.zeros((2, 3)), np.zeros(2))
    with pytest.raises(LayerError, match=r"Number of labels must match"):
        build('type: "Accuracy"', np.zeros((2, 3, 2)), np.zeros(2))
    with pytest.raises(LayerError, match=r"outside the valid range"):
        build('type: "Accuracy"', np.zeros((2, 3)), np.array([0.0, 3.0]))
    with pytest.raises(LayerError, match=r"top_k must be at least 1"):
        build('type: "Accuracy" accuracy_param { top_k: 0 }', np.zeros((2, 3)), np.zeros(2))
    layer, bottom, top = build('type: "Accuracy"', np.zeros((2, 3)), np.zeros(2))
    with pytest.raises(LayerError, match=r"no backward"):
        layer.backward(top, [True, False], bottom)


# -- common to the loss layers -------------------------------------------------------------------
@pytest.mark.parametrize("text,arrays", [
    ('type: "SoftmaxWithLoss"', (np.zeros((2, 3)), np.zeros(2))),
    ('type: "SigmoidCrossEntropyLoss"', (np.zeros((2, 3)), np.zeros((2, 3)))),
    ('type: "EuclideanLoss"', (np.zeros((2, 3)), np.zeros((2, 3)))),
    ('type: "HingeLoss"', (np.zeros((2, 3)), np.zeros(2))),
    ('type: "InfogainLoss"', (np.zeros((2, 3)), np.zeros(2), np.eye(3))),
    ('type: "MultinomialLogisticLoss"', (np.ones((2, 3)), np.zeros(2))),
    ('type: "ContrastiveLoss"', (np.zeros((2, 3)), np.ones((2, 3)), np.zeros(2))),
])
def test_loss_layers_scalar_top_and_default_weight(text, arrays):
    layer, _, top = build(text, *arrays)
    assert layer.is_loss and layer.loss_weights == [1.0]
    assert top[0].shape == () and top[0].diff[()] == 1.0
    assert np.isfinite(top[0].data[()])
