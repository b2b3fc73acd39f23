"""Tests for layers/utility.py: forward against slow references, backward with check_gradient."""
import itertools
import math

import numpy as np
import pytest

from gradient_check import check_gradient, layer_from_text, make_blob
from framework.blob import Blob
from framework.errors import LayerError


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def run(layer, bottoms, ntop=1):
    """Set up and run forward; bottoms are arrays (float64) or Blobs."""
    bottom = [b if isinstance(b, Blob) else make_blob(b) for b in bottoms]
    top = [Blob() for _ in range(ntop)]
    for t in top:
        t.set_dtype(np.float64)
    layer.setup_layer(bottom, top)
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    return bottom, top


# ----------------------------------------------------------------------------- InnerProduct

def ip_reference(x, w, b, axis, transpose):
    m = int(np.prod(x.shape[:axis]))
    x2 = x.reshape(m, -1)
    wn = w.T if transpose else w
    out = np.zeros((m, wn.shape[0]))
    for i in range(m):
        for n in range(wn.shape[0]):
            out[i, n] = sum(x2[i, k] * wn[n, k] for k in range(x2.shape[1])) + (b[n] if b is not None else 0)
    return out.reshape(x.shape[:axis] + (wn.shape[0],))


@pytest.mark.parametrize("rows_limit", [0, 1 << 30])  # both GEMM orientations of the forward
@pytest.mark.parametrize("axis,transpose,bias", [(1, False, True), (1, True, True), (2, False, False),
                                                 (-1, True, False), (0, False, True)])
def test_inner_product_forward_and_gradient(monkeypatch, axis, transpose, bias, rows_limit):
    from layers import utility
    monkeypatch.setattr(utility, "WEIGHT_MAJOR_BELOW_ROWS", rows_limit)
    layer = layer_from_text(f"""type: "InnerProduct" inner_product_param {{ num_output: 3 axis: {axis}
        transpose: {str(transpose).lower()} bias_term: {str(bias).lower()}
        weight_filler {{ type: "gaussian" std: 1 }} bias_filler {{ type: "uniform" min: -1 max: 1 }} }}""")
    x = rand(2, 3, 2, seed=1)
    bottom, top = run(layer, [x])
    ax = axis % x.ndim
    k = int(np.prod(x.shape[ax:]))
    w = layer.blobs[0].data
    assert w.shape == ((k, 3) if transpose else (3, k))
    assert len(layer.blobs) == (2 if bias else 1)
    b = layer.blobs[1].data if bias else None
    assert top[0].shape == x.shape[:ax] + (3,)
    np.testing.assert_allclose(top[0].data, ip_reference(x, w, b, ax, transpose), rtol=1e-5, atol=1e-6)
    check_gradient(layer, [make_blob(x)], [Blob()])


def test_inner_product_batch_one_and_float32_params():
    layer = layer_from_text('type: "InnerProduct" inner_product_param { num_output: 4 '
                            'weight_filler { type: "xavier" } bias_filler { type: "constant" value: 0.5 } }')
    bottom = [Blob((1, 5))]
    bottom[0].data[...] = rand(1, 5)
    top = [Blob()]
    layer.setup_layer(bottom, top)
    assert layer.blobs[0].dtype == np.float32 and layer.blobs[1].dtype == np.float32
    np.testing.assert_array_equal(layer.blobs[1].data, 0.5)
    layer.forward(bottom, top)
    assert top[0].dtype == np.float32
    np.testing.assert_allclose(top[0].data, bottom[0].data @ layer.blobs[0].data.T + 0.5, rtol=1e-5)
    check_gradient(layer, bottom, top, setup=False)


def test_inner_product_param_diffs_accumulate():
    layer = layer_from_text('type: "InnerProduct" inner_product_param { num_output: 2 '
                            'weight_filler { type: "gaussian" } }')
    bottom, top = run(layer, [rand(3, 4)])
    top[0].diff[...] = 1.0
    layer.backward(top, [True], bottom)
    once = layer.blobs[0].diff.copy()
    layer.backward(top, [True], bottom)
    np.testing.assert_allclose(layer.blobs[0].diff, 2 * once)
    np.testing.assert_allclose(layer.blobs[1].diff, [6.0, 6.0])


def test_inner_product_errors():
    with pytest.raises(LayerError, match="num_output"):
        run(layer_from_text('type: "InnerProduct" inner_product_param { }'), [rand(2, 3)])
    layer = layer_from_text('type: "InnerProduct" inner_product_param { num_output: 2 }')
    bottom, top = run(layer, [rand(2, 3)])
    with pytest.raises(LayerError, match="incompatible"):
        layer.reshape([make_blob(rand(2, 4))], top)
    with pytest.raises(LayerError, match="axis"):
        run(layer_from_text('type: "InnerProduct" inner_product_param { num_output: 2 axis: 3 }'), [rand(2, 3)])


def test_inner_product_preloaded_weights_checked():
    from proto import caffe_pb2
    from framework.layer import create_layer
    from google.protobuf import text_format
    param = text_format.Parse('name: "ip" type: "InnerProduct" inner_product_param { num_output: 2 bias_term: false }',
                              caffe_pb2.LayerParameter())
    blob = param.blobs.add()  # legacy 4-D (1, 1, N, K) as in old .caffemodel files
    blob.num, blob.channels, blob.height, blob.width = 1, 1, 2, 3
    blob.data.extend([1, 2, 3, 4, 5, 6])
    layer = create_layer(param)
    bottom, top = run(layer, [np.ones((1, 3))])
    assert layer.blobs[0].shape == (2, 3)
    np.testing.assert_allclose(top[0].data, [[6, 15]])
    bad = create_layer(param)
    with pytest.raises(LayerError, match="weight blob has shape"):
        run(bad, [np.ones((1, 4))])


# ----------------------------------------------------------------------------- Embed

def test_embed_forward_and_weight_gradient():
    layer = layer_from_text('type: "Embed" embed_param { num_output: 3 input_dim: 5 '
                            'weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } }')
    idx = np.array([[0, 4, 2], [2, 2, 1]], dtype=float)
    bottom, top = run(layer, [idx])
    w, b = layer.blobs[0].data, layer.blobs[1].data
    assert w.shape == (5, 3)
    assert top[0].shape == (2, 3, 3)
    for i, j in itertools.product(range(2), range(3)):
        np.testing.assert_allclose(top[0].data[i, j], w[int(idx[i, j])] + b)
    grads = check_gradient(layer, [make_blob(idx)], [Blob()], check_bottom=[])
    # index 2 appears three times, index 3 never: its row gets no gradient
    np.testing.assert_array_equal(grads[("param", 0)][3], 0)
    assert not layer.allow_force_backward(0)


def test_embed_backward_refuses_bottom_and_accumulates():
    layer = layer_from_text('type: "Embed" embed_param { num_output: 2 input_dim: 3 bias_term: false }')
    bottom, top = run(layer, [np.array([1.0, 1.0, 0.0])])
    top[0].diff[...] = [[1, 2], [3, 4], [5, 6]]
    layer.backward(top, [False], bottom)
    np.testing.assert_array_equal(layer.blobs[0].diff, [[5, 6], [4, 6], [0, 0]])
    with pytest.raises(LayerError, match="cannot backpropagate"):
        layer.backward(top, [True], bottom)


def test_embed_out_of_range_and_non_integer():
    layer = layer_from_text('name: "emb" type: "Embed" embed_param { num_output: 2 input_dim: 3 }')
    with pytest.raises(LayerError, match=r"layer 'emb'.*embed index 3 is out of range \[0, 3\)"):
        run(layer, [np.array([0.0, 3.0])])
    layer = layer_from_text('name: "emb" type: "Embed" embed_param { num_output: 2 input_dim: 3 }')
    with pytest.raises(LayerError, match="out of range"):
        run(layer, [np.array([-1.0])])
    layer = layer_from_text('name: "emb" type: "Embed" embed_param { num_output: 2 input_dim: 3 }')
    with pytest.raises(LayerError, match="integers"):
        run(layer, [np.array([0.5])])
    with pytest.raises(LayerError, match="input_dim"):
        run(layer_from_text('type: "Embed" embed_param { num_output: 2 }'), [np.zeros(1)])


# ----------------------------------------------------------------------------- Concat / Slice / Split

@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_concat_forward_and_gradient(axis):
    shapes = []
    for extra in (1, 2, 3):
        s = [2, 3, 2]
        s[axis] = extra
        shapes.append(tuple(s))
    xs = [rand(*s, seed=i) for i, s in enumerate(shapes)]
    layer = layer_from_text(f'type: "Concat" concat_param {{ axis: {axis} }}')
    bottom, top = run(layer, xs)
    ax = axis % 3
    # slow reference: walk the output along the axis
    ref = np.zeros(top[0].shape)
    pos = 0
    for x in xs:
        for j in range(x.shape[ax]):
            src = np.take(x, j, axis=ax)
            idx = [slice(None)] * 3
            idx[ax] = pos
            ref[tuple(idx)] = src
            pos += 1
    np.testing.assert_array_equal(top[0].data, ref)
    check_gradient(layer, [make_blob(x) for x in xs], [Blob()])


def test_concat_legacy_dim_and_single_bottom_shares():
    layer = layer_from_text('type: "Concat" concat_param { concat_dim: 0 }')
    bottom, top = run(layer, [rand(1, 2), rand(2, 2, seed=1)])
    assert top[0].shape == (3, 2)
    single = layer_from_text('type: "Concat"')
    bottom, top = run(single, [rand(2, 3)])
    assert np.shares_memory(top[0].data, bottom[0].data)
    check_gradient(single, bottom, [Blob()])


def test_concat_errors():
    with pytest.raises(LayerError, match="same shape except"):
        run(layer_from_text('type: "Concat"'), [rand(2, 3), rand(3, 3)])
    with pytest.raises(LayerError, match="number of axes"):
        run(layer_from_text('type: "Concat"'), [rand(2, 3), rand(2, 3, 1)])
    with pytest.raises(LayerError, match="not both"):
        run(layer_from_text('type: "Concat" concat_param { axis: 1 concat_dim: 1 }'), [rand(2, 3)])
    with pytest.raises(LayerError, match="concat_dim 2 is out of range"):
        run(layer_from_text('type: "Concat" concat_param { concat_dim: 2 }'), [rand(2, 3)])


@pytest.mark.parametrize("axis,points,sizes", [(0, [1, 3], [1, 2, 2]), (1, [2], [2, 3]),
                                               (-1, [], [2, 2]), (2, [1], [1, 3])])
def test_slice_forward_and_gradient(axis, points, sizes):
    shape = [5, 5, 4]
    shape[axis] = sum(sizes)
    x = rand(*shape, seed=3)
    text = " ".join(f"slice_point: {p}" for p in points)
    layer = layer_from_text(f'type: "Slice" slice_param {{ axis: {axis} {text} }}')
    bottom, top = run(layer, [x], ntop=len(sizes))
    ax = axis % 3
    start = 0
    for t, size in zip(top, sizes):
        ref = np.stack([np.take(x, start + j, axis=ax) for j in range(size)], axis=ax)
        np.testing.assert_array_equal(t.data, ref)
        start += size
    small = x[tuple(slice(0, 2) if d != ax else slice(None) for d in range(3))]
    check_gradient(layer, [make_blob(small)], [Blob() for _ in sizes])


def test_slice_legacy_dim_single_top_and_errors():
    layer = layer_from_text('type: "Slice" slice_param { slice_dim: 0 }')
    bottom, top = run(layer, [rand(4, 2)], ntop=2)
    np.testing.assert_array_equal(top[1].data, bottom[0].data[2:])
    one = layer_from_text('type: "Slice"')
    bottom, top = run(one, [rand(2, 3)])
    assert np.shares_memory(top[0].data, bottom[0].data)
    with pytest.raises(LayerError, match="evenly divide"):
        run(layer_from_text('type: "Slice"'), [rand(2, 3)], ntop=2)
    with pytest.raises(LayerError, match="slice_point has 2 entries"):
        run(layer_from_text('type: "Slice" slice_param { slice_point: 1 slice_point: 2 }'), [rand(2, 4)], ntop=2)
    with pytest.raises(LayerError, match="strictly increasing"):
        run(layer_from_text('type: "Slice" slice_param { slice_point: 2 slice_point: 1 }'), [rand(2, 4)], ntop=3)
    with pytest.raises(LayerError, match="strictly increasing"):
        run(layer_from_text('type: "Slice" slice_param { slice_point: 4 }'), [rand(2, 4)], ntop=2)


def test_split_shares_data_and_sums_diffs():
    layer = layer_from_text('type: "Split"')
    x = rand(2, 3)
    bottom, top = run(layer, [x], ntop=3)
    for t in top:
        assert t.data is bottom[0].data
    bottom[0].data[0, 0] = 42.0
    assert top[2].data[0, 0] == 42.0
    for i, t in enumerate(top):
        t.diff[...] = rand(2, 3, seed=10 + i)
    layer.backward(top, [True], bottom)
    np.testing.assert_allclose(bottom[0].diff, sum(rand(2, 3, seed=10 + i) for i in range(3)))
    check_gradient(layer_from_text('type: "Split"'), [make_blob(rand(1, 3))], [Blob(), Blob()])
    check_gradient(layer_from_text('type: "Split"'), [make_blob(rand(3))], [Blob()])


def test_split_follows_bottom_reshape_and_refuses_in_place():
    layer = layer_from_text('type: "Split"')
    bottom, top = run(layer, [rand(2, 3)], ntop=2)
    bottom[0].reshape(4, 1)
    layer.reshape(bottom, top)
    assert top[1].shape == (4, 1) and top[1].data is bottom[0].data
    bottom[0].data = np.ones((4, 1))  # replaced array: forward re-shares
    layer.forward(bottom, top)
    assert top[0].data is bottom[0].data
    with pytest.raises(LayerError, match="in-place"):
        b = make_blob(rand(2))
        layer_from_text('type: "Split"').setup_layer([b], [b])


# ----------------------------------------------------------------------------- Flatten / Reshape

def test_flatten_default_and_axes():
    x = rand(2, 3, 4, 5)
    layer = layer_from_text('type: "Flatten"')
    bottom, top = run(layer, [x])
    assert top[0].shape == (2, 60)
    assert np.shares_memory(top[0].data, bottom[0].data)
    np.testing.assert_array_equal(top[0].data, x.reshape(2, 60))
    bottom, top = run(layer_from_text('type: "Flatten" flatten_param { axis: 1 end_axis: 2 }'), [x])
    assert top[0].shape == (2, 12, 5)
    bottom, top = run(layer_from_text('type: "Flatten" flatten_param { axis: -3 end_axis: -2 }'), [x])
    assert top[0].shape == (2, 12, 5)
    bottom, top = run(layer_from_text('type: "Flatten" flatten_param { axis: 0 }'), [x])
    assert top[0].shape == (120,)
    check_gradient(layer_from_text('type: "Flatten"'), [make_blob(rand(1, 2, 3))], [Blob()])


def test_flatten_errors():
    with pytest.raises(LayerError, match="in-place"):
        b = make_blob(rand(2, 3))
        layer_from_text('type: "Flatten"').setup_layer([b], [b])
    with pytest.raises(LayerError, match="end_axis"):
        run(layer_from_text('type: "Flatten" flatten_param { axis: 2 end_axis: 1 }'), [rand(2, 3, 4)])


@pytest.mark.parametrize("spec,shape_in,shape_out", [
    ("shape { dim: 0 dim: -1 }", (2, 3, 4), (2, 12)),
    ("shape { dim: -1 dim: 0 }", (2, 3, 4), (8, 3)),
    ("shape { dim: 0 dim: 2 dim: -1 dim: 1 }", (3, 4, 5), (3, 2, 10, 1)),
    ("shape { dim: 6 dim: 4 }", (2, 3, 4), (6, 4)),
    ("shape { dim: 2 dim: 2 } axis: 1 num_axes: 1", (3, 4, 5), (3, 2, 2, 5)),
    ("shape { dim: 1 } axis: -1 num_axes: 0", (3, 4), (3, 4, 1)),
    ("shape { dim: 1 } axis: 0 num_axes: 0", (3, 4), (1, 3, 4)),
    ("shape { dim: -1 } axis: 1", (3, 4, 5), (3, 20)),
    ("shape { }", (1, 1), ()),
])
def test_reshape_rules(spec, shape_in, shape_out):
    x = rand(*shape_in)
    layer = layer_from_text(f'type: "Reshape" reshape_param {{ {spec} }}')
    bottom, top = run(layer, [x])
    assert top[0].shape == shape_out
    assert np.shares_memory(top[0].data, bottom[0].data)
    np.testing.assert_array_equal(top[0].data.reshape(-1), x.reshape(-1))


def test_reshape_gradient_and_batch_change():
    layer = layer_from_text('type: "Reshape" reshape_param { shape { dim: 0 dim: -1 } }')
    check_gradient(layer, [make_blob(rand(2, 3, 2))], [Blob()])
    bottom, top = run(layer_from_text('type: "Reshape" reshape_param { shape { dim: 0 dim: -1 } }'),
                      [rand(2, 3, 2)])
    bottom[0].reshape(5, 3, 2)
    bottom[0].data[...] = 7
    layer2 = layer_from_text('type: "Reshape" reshape_param { shape { dim: 0 dim: -1 } }')
    layer2.setup_layer(bottom, top)
    layer2.forward(bottom, top)
    assert top[0].shape == (5, 6) and top[0].data[4, 5] == 7


@pytest.mark.parametrize("spec,shape_in,message", [
    ("shape { dim: -1 dim: -1 }", (2, 3), "multiple -1"),
    ("shape { dim: 5 }", (2, 3), "count must match"),
    ("shape { dim: -1 dim: 4 }", (2, 3), "divisible"),
    ("shape { dim: 0 dim: 0 dim: 0 }", (2, 3), "no corresponding bottom axis"),
    ("shape { dim: -2 }", (2, 3), "invalid dim -2"),
    ("shape { dim: 6 } axis: 3", (2, 3), "axis 3 is out of range"),
    ("shape { dim: 6 } axis: 1 num_axes: 3", (2, 3), "out of range"),
])
def test_reshape_errors(spec, shape_in, message):
    with pytest.raises(LayerError, match=message):
        run(layer_from_text(f'type: "Reshape" reshape_param {{ {spec} }}'), [rand(*shape_in)])


# ----------------------------------------------------------------------------- Tile

@pytest.mark.parametrize("axis,tiles", [(0, 2), (1, 3), (-1, 2)])
def test_tile_forward_and_gradient(axis, tiles):
    x = rand(2, 3, 2)
    layer = layer_from_text(f'type: "Tile" tile_param {{ axis: {axis} tiles: {tiles} }}')
    bottom, top = run(layer, [x])
    ax = axis % 3
    outer = int(np.prod(x.shape[:ax]))
    inner = x.reshape(outer, -1)
    ref = np.concatenate([inner] * tiles, axis=1).reshape(top[0].shape)
    expected = list(x.shape)
    expected[ax] *= tiles
    assert top[0].shape == tuple(expected)
    np.testing.assert_array_equal(top[0].data, ref)
    check_gradient(layer, [make_blob(x)], [Blob()])


def test_tile_errors():
    with pytest.raises(LayerError, match="tiles must be positive"):
        run(layer_from_text('type: "Tile" tile_param { axis: 1 }'), [rand(2, 3)])


# ----------------------------------------------------------------------------- Eltwise

def test_eltwise_sum_with_coeffs():
    xs = [rand(2, 3, seed=i) for i in range(3)]
    layer = layer_from_text('type: "Eltwise" eltwise_param { operation: SUM coeff: 1 coeff: -0.5 coeff: 2 }')
    bottom, top = run(layer, xs)
    np.testing.assert_allclose(top[0].data, xs[0] - 0.5 * xs[1] + 2 * xs[2])
    check_gradient(layer, [make_blob(x) for x in xs], [Blob()])
    plain = layer_from_text('type: "Eltwise"')
    bottom, top = run(plain, xs[:2])
    np.testing.assert_allclose(top[0].data, xs[0] + xs[1])


@pytest.mark.parametrize("stable", [True, False])
def test_eltwise_prod(stable):
    xs = [rand(2, 3, seed=i) + 2.0 for i in range(3)]
    layer = layer_from_text(f'type: "Eltwise" eltwise_param {{ operation: PROD '
                            f'stable_prod_grad: {str(stable).lower()} }}')
    bottom, top = run(layer, xs)
    np.testing.assert_allclose(top[0].data, xs[0] * xs[1] * xs[2])
    check_gradient(layer, [make_blob(x) for x in xs], [Blob()])


def test_eltwise_prod_stable_gradient_with_zero():
    xs = [np.array([0.0, 2.0]), np.array([3.0, 4.0])]
    layer = layer_from_text('type: "Eltwise" eltwise_param { operation: PROD }')
    bottom, top = run(layer, xs)
    top[0].diff[...] = 1
    layer.backward(top, [True, True], bottom)
    np.testing.assert_array_equal(bottom[0].diff, [3.0, 4.0])  # y / x would give nan at x = 0


def test_eltwise_max_forward_ties_and_gradient():
    a = np.array([1.0, 5.0, 2.0, 3.0])
    b = np.array([1.0, 4.0, 6.0, 3.0])
    c = np.array([0.0, 5.0, 6.0, 7.0])
    layer = layer_from_text('type: "Eltwise" eltwise_param { operation: MAX }')
    bottom, top = run(layer, [a, b, c])
    np.testing.assert_array_equal(top[0].data, [1, 5, 6, 7])
    top[0].diff[...] = [10, 20, 30, 40]
    layer.backward(top, [True, True, True], bottom)
    # ties between bottoms 0 and 1 go to 1; a later equal bottom does not win
    np.testing.assert_array_equal(bottom[0].diff, [0, 20, 0, 0])
    np.testing.assert_array_equal(bottom[1].diff, [10, 0, 30, 0])
    np.testing.assert_array_equal(bottom[2].diff, [0, 0, 0, 40])
    xs = [rand(2, 3, 2, seed=i) for i in range(3)]
    check_gradient(layer_from_text('type: "Eltwise" eltwise_param { operation: MAX }'),
                   [make_blob(x) for x in xs], [Blob()])


def test_eltwise_errors():
    with pytest.raises(LayerError, match="one coefficient per bottom"):
        run(layer_from_text('type: "Eltwise" eltwise_param { coeff: 1 }'), [rand(2), rand(2)])
    with pytest.raises(LayerError, match="only allowed for SUM"):
        run(layer_from_text('type: "Eltwise" eltwise_param { operation: PROD coeff: 1 coeff: 1 }'),
            [rand(2), rand(2)])
    with pytest.raises(LayerError, match="same shape"):
        run(layer_from_text('type: "Eltwise"'), [rand(2), rand(3)])
    with pytest.raises(LayerError, match="at least 2 bottom"):
        run(layer_from_text('type: "Eltwise"'), [rand(2)])


# ----------------------------------------------------------------------------- Reduction

def reduction_reference(x, op, axis, coeff):
    lead = x.shape[:axis]
    rows = x.reshape(int(np.prod(lead)), -1)
    out = []
    for row in rows:
        values = list(row)
        if op == "SUM":
            r = sum(values)
        elif op == "ASUM":
            r = sum(abs(v) for v in values)
        elif op == "SUMSQ":
            r = sum(v * v for v in values)
        else:
            r = sum(values) / len(values)
        out.append(coeff * r)
    return np.array(out).reshape(lead)


@pytest.mark.parametrize("op", ["SUM", "ASUM", "SUMSQ", "MEAN"])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_reduction_forward_and_gradient(op, axis):
    x = rand(2, 3, 2, seed=4)
    layer = layer_from_text(f'type: "Reduction" reduction_param {{ operation: {op} axis: {axis} coeff: -1.5 }}')
    bottom, top = run(layer, [x])
    ax = axis % 3
    assert top[0].shape == x.shape[:ax]
    np.testing.assert_allclose(top[0].data, reduction_reference(x, op, ax, -1.5))
    check_gradient(layer, [make_blob(x)], [Blob()], kink=0.0 if op == "ASUM" else None, kink_range=0.01)


def test_reduction_default_is_scalar_sum():
    layer = layer_from_text('type: "Reduction"')
    bottom, top = run(layer, [np.arange(6.0).reshape(2, 3)])
    assert top[0].shape == ()
    assert float(top[0].data) == 15.0


# ----------------------------------------------------------------------------- ArgMax

def argmax_reference(row, k):
    pairs = sorted(((v, j) for j, v in enumerate(row)), reverse=True)  # std::greater on (value, index)
    return [j for _, j in pairs[:k]], [v for v, _ in pairs[:k]]


def test_argmax_flattened_top_k_and_max_val():
    x = rand(3, 2, 2, 2, seed=5)
    x[1].flat[2] = x[1].flat[5] = 9.0  # a tie: the larger index comes first
    for k, out_max in [(1, False), (3, False), (2, True)]:
        layer = layer_from_text(f'type: "ArgMax" argmax_param {{ top_k: {k} out_max_val: {str(out_max).lower()} }}')
        bottom, top = run(layer, [x])
        assert top[0].shape == (3, 2 if out_max else 1, k, 1)
        for n in range(3):
            idx, val = argmax_reference(x[n].reshape(-1), k)
            np.testing.assert_array_equal(top[0].data[n, 0, :, 0], idx)
            if out_max:
                np.testing.assert_array_equal(top[0].data[n, 1, :, 0], val)
    layer = layer_from_text('type: "ArgMax"')
    bottom, top = run(layer, [x])
    assert top[0].data[1, 0, 0, 0] == 5
    assert not layer.has_backward


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_argmax_with_axis(axis):
    x = rand(3, 4, 2, seed=6)
    for out_max in (False, True):
        layer = layer_from_text(f'type: "ArgMax" argmax_param {{ top_k: 2 axis: {axis} '
                                f'out_max_val: {str(out_max).lower()} }}')
        bottom, top = run(layer, [x])
        ax = axis % 3
        moved = np.moveaxis(x, ax, -1)
        ref = np.zeros(moved.shape[:-1] + (2,))
        for pos in itertools.product(*[range(s) for s in moved.shape[:-1]]):
            idx, val = argmax_reference(moved[pos], 2)
            ref[pos] = val if out_max else idx
        np.testing.assert_array_equal(top[0].data, np.moveaxis(ref, -1, ax))


def test_argmax_small_bottom_and_errors():
    bottom, top = run(layer_from_text('type: "ArgMax"'), [np.array([[1.0, 3.0, 2.0]])])
    assert top[0].shape == (1, 1, 1)
    assert top[0].data.item() == 1
    with pytest.raises(LayerError, match="top_k"):
        run(layer_from_text('type: "ArgMax" argmax_param { top_k: 4 }'), [rand(2, 3)])
    with pytest.raises(LayerError, match="top_k"):
        run(layer_from_text('type: "ArgMax" argmax_param { top_k: 3 axis: 0 }'), [rand(2, 3)])
    with pytest.raises(LayerError, match="top_k"):
        run(layer_from_text('type: "ArgMax" argmax_param { top_k: 0 }'), [rand(2, 3)])


# ----------------------------------------------------------------------------- Filter / BatchReindex

def test_filter_forward_backward():
    x = rand(4, 2, 3)
    y = rand(4, 5, seed=1)
    selector = np.array([1.0, 0.0, 2.0, 0.0]).reshape(4, 1)
    layer = layer_from_text('type: "Filter"')
    bottom = [make_blob(x), make_blob(y), make_blob(selector)]
    top = [Blob(), Blob()]
    for t in top:
        t.set_dtype(np.float64)
    layer.setup_layer(bottom, top)
    assert top[0].shape == (4, 2, 3)  # first reshape keeps every row (filter_layer.cpp)
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    np.testing.assert_array_equal(top[0].data, x[[0, 2]])
    np.testing.assert_array_equal(top[1].data, y[[0, 2]])
    check_gradient(layer, bottom, top, check_bottom=[0, 1], setup=False)
    top[0].diff[...] = 1
    layer.backward(top, [True, False, False], bottom)
    np.testing.assert_array_equal(bottom[0].diff[:, 0, 0], [1, 0, 1, 0])
    with pytest.raises(LayerError, match="selector"):
        layer.backward(top, [True, False, True], bottom)
    assert not layer.allow_force_backward(2) and layer.allow_force_backward(0)


def test_filter_errors():
    with pytest.raises(LayerError, match="one top per filtered bottom"):
        run(layer_from_text('type: "Filter"'), [rand(2, 3), np.ones(2)], ntop=2)
    with pytest.raises(LayerError, match="singletons"):
        run(layer_from_text('type: "Filter"'), [rand(2, 3), np.ones((2, 2))])
    with pytest.raises(LayerError, match="0th dimension"):
        run(layer_from_text('type: "Filter"'), [rand(3, 3), np.ones(2)])


def test_batch_reindex_forward_and_gradient():
    x = rand(3, 2, 2)
    idx = np.array([2.0, 0.0, 2.0, 1.0, 2.0])
    layer = layer_from_text('type: "BatchReindex"')
    bottom, top = run(layer, [x, idx])
    assert top[0].shape == (5, 2, 2)
    for i, j in enumerate(idx.astype(int)):
        np.testing.assert_array_equal(top[0].data[i], x[j])
    grads = check_gradient(layer, [make_blob(x), make_blob(idx)], [Blob()], check_bottom=[0])
    assert np.abs(grads[("bottom", 0)][2]).sum() > 0
    top[0].diff[...] = 1
    layer.backward(top, [True, False], bottom)
    np.testing.assert_array_equal(bottom[0].diff[:, 0, 0], [1, 1, 3])  # repeats accumulate
    with pytest.raises(LayerError, match="indices"):
        layer.backward(top, [True, True], bottom)


def test_batch_reindex_errors():
    with pytest.raises(LayerError, match="out of range"):
        run(layer_from_text('type: "BatchReindex"'), [rand(2, 2), np.array([0.0, 2.0])])
    with pytest.raises(LayerError, match="1-D"):
        run(layer_from_text('type: "BatchReindex"'), [rand(2, 2), np.zeros((2, 1))])


# ----------------------------------------------------------------------------- Silence / Parameter

def test_silence_zeroes_diffs():
    layer = layer_from_text('type: "Silence"')
    bottom = [make_blob(rand(2, 3)), make_blob(rand(4))]
    layer.setup_layer(bottom, [])
    layer.forward(bottom, [])
    bottom[0].diff[...] = 5
    bottom[1].diff[...] = 5
    layer.backward([], [True, False], bottom)
    np.testing.assert_array_equal(bottom[0].diff, 0)
    np.testing.assert_array_equal(bottom[1].diff, 5)
    with pytest.raises(LayerError):
        layer_from_text('type: "Silence"').setup_layer(bottom, [Blob()])


def test_parameter_layer():
    layer = layer_from_text('type: "Parameter" parameter_param { shape { dim: 2 dim: 3 } }')
    top = [Blob()]
    layer.setup_layer([], top)
    assert len(layer.blobs) == 1 and layer.blobs[0].shape == (2, 3)
    assert layer.blobs[0].dtype == np.float32
    np.testing.assert_array_equal(top[0].data, 0)
    layer.blobs[0].data[...] = np.arange(6).reshape(2, 3)
    layer.forward([], top)
    np.testing.assert_array_equal(top[0].data, np.arange(6).reshape(2, 3))
    top[0].diff[...] = 1
    layer.backward(top, [], [])
    layer.backward(top, [], [])
    np.testing.assert_array_equal(layer.blobs[0].diff, 2)  # accumulates
    check_gradient(layer_from_text('type: "Parameter" parameter_param { shape { dim: 3 } }'), [], [Blob()])


def test_frozen_params_get_no_gradient():
    layer = layer_from_text('type: "InnerProduct" inner_product_param { num_output: 2 '
                            'weight_filler { type: "gaussian" } }')
    bottom, top = run(layer, [rand(3, 4)])
    layer.param_propagate_down = [False, True]  # what the net sets for lr_mult: 0
    top[0].diff[...] = 1.0
    layer.backward(top, [True], bottom)
    np.testing.assert_array_equal(layer.blobs[0].diff, 0)
    np.testing.assert_array_equal(layer.blobs[1].diff, [3, 3])
    np.testing.assert_allclose(bottom[0].diff, np.ones((3, 2)) @ layer.blobs[0].data)


# ----------------------------------------------------------------------------- Eltwise / Split against loops

def eltwise_reference(op, xs, coeffs):
    """(y, winner) element by element: SUM/PROD left to right; MAX with Caffe's tie rule."""
    flat = [np.asarray(x, dtype=np.float64).reshape(-1) for x in xs]
    y = np.empty_like(flat[0])
    winner = np.zeros(y.shape, dtype=int)
    for k in range(y.size):
        values = [f[k] for f in flat]
        if op == "SUM":
            y[k] = sum(c * v for c, v in zip(coeffs, values))
        elif op == "PROD":
            y[k] = math.prod(values)
        else:
            best, winner[k] = (values[0], 0) if values[0] > values[1] else (values[1], 1)
            for i, v in enumerate(values[2:], 2):
                if v > best:
                    best, winner[k] = v, i
            y[k] = best
    return y.reshape(xs[0].shape), winner.reshape(xs[0].shape)


ELTWISE_CASES = [
    ("SUM", ""), ("SUM", "coeff: 1 coeff: -0.5 coeff: 2"), ("PROD", ""),
    ("PROD", "stable_prod_grad: false"), ("MAX", ""),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(3, 5, 4, 3), (1, 7, 3, 5), (5,)])
@pytest.mark.parametrize("op,extra", ELTWISE_CASES)
def test_eltwise_odd_shapes_and_dtypes_match_reference(op, extra, shape, dtype):
    xs = [rand(*shape, seed=30 + i) for i in range(3)]
    xs[1].reshape(-1)[::4] = xs[0].reshape(-1)[::4]  # MAX ties between the first two bottoms
    dy = rand(*shape, seed=40)
    layer = layer_from_text(f'type: "Eltwise" eltwise_param {{ operation: {op} {extra} }}')
    bottom = [make_blob(x, dtype) for x in xs]
    top = [Blob((), dtype=dtype)]
    layer.setup_layer(bottom, top)
    layer.forward(bottom, top)
    cast = [x.astype(dtype) for x in xs]
    coeffs = [float(np.float32(c)) for c in extra.split()[1::2]] if "coeff" in extra else [1.0] * 3
    y, winner = eltwise_reference(op, cast, coeffs)
    tol = 2e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(top[0].data, y, rtol=tol, atol=tol)
    top[0].diff[...] = dy
    layer.backward(top, [True] * 3, bottom)
    for i, b in enumerate(bottom):
        if op == "SUM":
            expected = coeffs[i] * dy.astype(dtype)
        elif op == "PROD":
            expected = math.prod(c for j, c in enumerate(cast) if j != i) * dy.astype(dtype)
        else:
            expected = np.where(winner == i, dy.astype(dtype), 0)
        np.testing.assert_allclose(b.diff, expected, rtol=10 * tol, atol=10 * tol)


@pytest.mark.parametrize("op,extra", ELTWISE_CASES)
def test_eltwise_gradient_all_ops(op, extra):
    xs = [rand(3, 2, 3, seed=50 + i) + (2.0 if op == "PROD" else 0.0) for i in range(3)]
    check_gradient(layer_from_text(f'type: "Eltwise" eltwise_param {{ operation: {op} {extra} }}'),
                   [make_blob(x) for x in xs], [Blob()])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("ntop", [1, 2, 3])
@pytest.mark.parametrize("shape", [(3, 5, 4, 3), (1, 7, 3, 5), (5,)])
def test_split_sums_diffs_odd_shapes_and_dtypes(shape, ntop, dtype):
    layer = layer_from_text('type: "Split"')
    bottom = [make_blob(rand(*shape), dtype)]
    top = [Blob((), dtype=dtype) for _ in range(ntop)]
    layer.setup_layer(bottom, top)
    layer.forward(bottom, top)
    diffs = [rand(*shape, seed=60 + i).astype(dtype) for i in range(ntop)]
    for t, d in zip(top, diffs):
        t.diff[...] = d
    layer.backward(top, [True], bottom)
    expected = np.zeros(shape)
    for d in diffs:
        expected += d
    tol = 1e-6 if dtype == np.float32 else 1e-15
    np.testing.assert_allclose(bottom[0].diff, expected, rtol=tol, atol=tol)
    check_gradient(layer_from_text('type: "Split"'), [make_blob(rand(*shape))], [Blob() for _ in range(ntop)])
