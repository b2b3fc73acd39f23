"""User-defined layers registered from user code with framework.register_layer.

Two layers are registered by a fixture (one with the decorator form, one with the
direct form) under names no other test uses, and removed again afterwards so the
global registry is left as it was.
"""
import numpy as np
import pytest

import framework
from framework.blob import Blob
from framework.errors import CaffeError, LayerError
from framework.layer import LAYER_REGISTRY
from gradient_check import check_gradient, layer_from_text, make_blob
from proto import caffe_pb2

QUAD = "TestCustomChannelPower"
PAIR = "TestCustomPairProduct"


@pytest.fixture
def custom_types():
    """Register QUAD (decorator form) and PAIR (direct form); unregister them afterwards."""
    assert QUAD not in LAYER_REGISTRY and PAIR not in LAYER_REGISTRY

    @framework.register_layer(QUAD)
    class ChannelPower(framework.Layer):
        """y[n, c, ...] = w[c] * x[n, c, ...] ** p + b[c]; p from power_param.power."""

        exact_num_bottom_blobs = 1
        exact_num_top_blobs = 1

        def setup(self, bottom, top):
            self.p = self.layer_param.power_param.power
            channels = bottom[0].shape[1]
            self.init_param_blobs([
                ((channels,), caffe_pb2.FillerParameter(type="constant", value=1.0), "weight"),
                ((channels,), caffe_pb2.FillerParameter(type="constant", value=0.0), "bias")])

        def reshape(self, bottom, top):
            top[0].reshape(bottom[0].shape)

        def _per_channel(self, blob, x):
            return blob.data.astype(x.dtype).reshape((1, -1) + (1,) * (x.ndim - 2))

        def forward(self, bottom, top):
            x = bottom[0].data
            w, b = (self._per_channel(blob, x) for blob in self.blobs)
            top[0].data[...] = w * x ** self.p + b

        def backward(self, top, propagate_down, bottom):
            x, dy = bottom[0].data, top[0].diff
            axes = (0,) + tuple(range(2, x.ndim))
            if self.param_needs_gradient(0):
                self.blobs[0].diff[...] += np.sum(dy * x ** self.p, axis=axes)
            if self.param_needs_gradient(1):
                self.blobs[1].diff[...] += np.sum(dy, axis=axes)
            if propagate_down[0]:
                w = self._per_channel(self.blobs[0], x)
                bottom[0].diff[...] = dy * w * self.p * x ** (self.p - 1)

    class PairProduct(framework.Layer):
        """y = a * b elementwise (two bottoms of one shape)."""

        exact_num_bottom_blobs = 2
        exact_num_top_blobs = 1

        def reshape(self, bottom, top):
            if bottom[0].shape != bottom[1].shape:
                raise self.error(f"bottoms differ in shape: {bottom[0].shape} vs {bottom[1].shape}")
            top[0].reshape(bottom[0].shape)

        def forward(self, bottom, top):
            top[0].data[...] = bottom[0].data * bottom[1].data

        def backward(self, top, propagate_down, bottom):
            if propagate_down[0]:
                bottom[0].diff[...] = top[0].diff * bottom[1].data
            if propagate_down[1]:
                bottom[1].diff[...] = top[0].diff * bottom[0].data

    returned = framework.register_layer(PAIR, PairProduct)
    assert returned is PairProduct
    try:
        yield ChannelPower, PairProduct
    finally:
        LAYER_REGISTRY.pop(QUAD, None)
        LAYER_REGISTRY.pop(PAIR, None)


NET = f"""
name: "custom"
force_backward: true
layer {{ name: "x" type: "Input" top: "x"
        input_param {{ shape {{ dim: 2 dim: 3 dim: 4 dim: 5 }} }} }}
layer {{ name: "z" type: "Input" top: "z"
        input_param {{ shape {{ dim: 2 dim: 3 dim: 4 dim: 5 }} }} }}
layer {{ name: "pow" type: "{QUAD}" bottom: "x" top: "q" power_param {{ power: 3 }} }}
layer {{ name: "prod" type: "{PAIR}" bottom: "q" bottom: "z" top: "y" }}
"""


def write(tmp_path, text, name="net.prototxt"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def random_params(net, rng):
    w = rng.uniform(0.5, 1.5, 3).astype(np.float32)
    b = rng.normal(0, 0.3, 3).astype(np.float32)
    net.params["pow"][0].data[...] = w
    net.params["pow"][1].data[...] = b
    return w.astype(np.float64), b.astype(np.float64)


def test_registered_types_are_the_classes(custom_types):
    power_cls, pair_cls = custom_types
    assert LAYER_REGISTRY[QUAD] is power_cls and LAYER_REGISTRY[PAIR] is pair_cls
    assert power_cls.type_name == QUAD and pair_cls.type_name == PAIR


def test_net_forward_matches_numpy(custom_types, tmp_path):
    power_cls, pair_cls = custom_types
    net = framework.Net(write(tmp_path, NET), framework.TEST)
    assert [type(layer) for layer in net.layers[2:]] == [power_cls, pair_cls]
    assert [layer.type for layer in net.layers[2:]] == [QUAD, PAIR]
    assert net.outputs == ["y"]
    # parameter blobs created in setup from the fillers given there
    assert [b.shape for b in net.params["pow"]] == [(3,), (3,)]
    assert np.all(net.params["pow"][0].data == 1) and np.all(net.params["pow"][1].data == 0)
    rng = np.random.default_rng(4)
    w, b = random_params(net, rng)
    x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    z = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    out = net.forward(x=x, z=z)["y"]
    x64, z64 = x.astype(np.float64), z.astype(np.float64)
    expected = (w[None, :, None, None] * x64 ** 3 + b[None, :, None, None]) * z64
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_net_backward_reaches_the_custom_layers(custom_types, tmp_path):
    net = framework.Net(write(tmp_path, NET), framework.TRAIN)
    rng = np.random.default_rng(5)
    w, b = random_params(net, rng)
    x = rng.normal(size=(2, 3, 4, 5))
    z = rng.normal(size=(2, 3, 4, 5))
    dy = rng.normal(size=(2, 3, 4, 5))
    net.forward(x=x, z=z)
    net.clear_param_diffs()
    diffs = net.backward(y=dy)
    wb = w[None, :, None, None]
    q = wb * x ** 3 + b[None, :, None, None]
    dq = dy * z
    np.testing.assert_allclose(diffs["z"], dy * q, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(diffs["x"], dq * wb * 3 * x ** 2, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(net.params["pow"][0].diff, np.sum(dq * x ** 3, axis=(0, 2, 3)),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(net.params["pow"][1].diff, np.sum(dq, axis=(0, 2, 3)),
                               rtol=1e-4, atol=1e-4)


def test_custom_layer_weights_round_trip_through_a_caffemodel(custom_types, tmp_path):
    model = write(tmp_path, NET)
    net = framework.Net(model, framework.TEST)
    w, b = random_params(net, np.random.default_rng(6))
    weights = str(tmp_path / "custom.caffemodel")
    net.save(weights)
    again = framework.Net(model, weights, framework.TEST)
    np.testing.assert_array_equal(again.params["pow"][0].data, w.astype(np.float32))
    np.testing.assert_array_equal(again.params["pow"][1].data, b.astype(np.float32))


def test_gradient_of_the_decorator_registered_layer(custom_types):
    layer = layer_from_text(f'name: "pow" type: "{QUAD}" power_param {{ power: 3 }}')
    assert isinstance(layer, custom_types[0])
    rng = np.random.default_rng(7)
    bottom = [make_blob(rng.normal(size=(2, 3, 2, 3)))]
    top = [Blob()]
    layer.setup_layer(bottom, top)
    layer.blobs[0].data[...] = rng.uniform(0.5, 1.5, 3)
    layer.blobs[1].data[...] = rng.normal(0, 0.3, 3)
    check_gradient(layer, bottom, top, setup=False)


def test_gradient_of_the_directly_registered_layer(custom_types):
    layer = layer_from_text(f'name: "prod" type: "{PAIR}"')
    assert isinstance(layer, custom_types[1])
    rng = np.random.default_rng(8)
    bottom = [make_blob(rng.normal(size=(3, 4))), make_blob(rng.normal(size=(3, 4)))]
    check_gradient(layer, bottom, [Blob()])


def test_a_wrong_gradient_is_caught(custom_types):
    """The check above can fail: halve PairProduct's gradient and the checker objects."""
    layer = layer_from_text(f'name: "prod" type: "{PAIR}"')
    correct = layer.backward

    def halved(top, propagate_down, bottom):
        correct(top, propagate_down, bottom)
        bottom[1].diff[...] *= 0.5

    layer.backward = halved
    rng = np.random.default_rng(9)
    bottom = [make_blob(rng.normal(size=(3, 4))), make_blob(rng.normal(size=(3, 4)))]
    with pytest.raises(AssertionError, match="bottom 1"):
        check_gradient(layer, bottom, [Blob()])


def test_blob_count_checks_apply_to_custom_layers(custom_types, tmp_path):
    text = NET.replace('bottom: "q" bottom: "z" top: "y"', 'bottom: "q" top: "y"')
    with pytest.raises(LayerError, match=rf"layer 'prod' \(type {PAIR}\): takes 2 bottom blob"):
        framework.Net(write(tmp_path, text), framework.TEST)


def test_registering_an_existing_name_again_is_an_error(custom_types):
    power_cls, _ = custom_types

    class Other(framework.Layer):
        pass

    with pytest.raises(CaffeError, match=f"layer type '{QUAD}' is already registered"):
        framework.register_layer(QUAD, Other)
    with pytest.raises(CaffeError, match=f"layer type '{PAIR}' is already registered"):
        framework.register_layer(PAIR)(Other)  # decorator form
    relu = LAYER_REGISTRY["ReLU"]
    with pytest.raises(CaffeError, match="layer type 'ReLU' is already registered"):
        framework.register_layer("ReLU", Other)
    # nothing was replaced
    assert LAYER_REGISTRY[QUAD] is power_cls and LAYER_REGISTRY["ReLU"] is relu
    assert Other.type_name is None


def test_unknown_type_lists_the_known_types_with_the_new_ones(custom_types, tmp_path):
    text = NET + 'layer { name: "odd" type: "TestCustomNoSuchType" bottom: "y" top: "o" }\n'
    with pytest.raises(LayerError, match="unknown layer type 'TestCustomNoSuchType'") as info:
        framework.Net(write(tmp_path, text), framework.TEST)
    message = str(info.value)
    assert "layer 'odd'" in message
    known = message.split("known types: ", 1)[1]
    names = [n.strip(" )") for n in known.split(",")]
    for name in (QUAD, PAIR, "ReLU", "Convolution", "Input"):
        assert name in names


def test_the_registry_is_clean_without_the_fixture():
    assert QUAD not in LAYER_REGISTRY and PAIR not in LAYER_REGISTRY
