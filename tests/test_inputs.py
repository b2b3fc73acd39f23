"""Tests for layers/inputs.py: Input and DummyData."""
import numpy as np
import pytest

from gradient_check import layer_from_text
from framework.blob import Blob
from framework.errors import LayerError
from framework.random import set_random_seed


def setup(text, ntop):
    layer = layer_from_text(text)
    top = [Blob() for _ in range(ntop)]
    layer.setup_layer([], top)
    return layer, top


# ----------------------------------------------------------------------------- Input

def test_input_one_shape_for_all_tops():
    layer, top = setup('type: "Input" input_param { shape { dim: 2 dim: 3 } }', 2)
    assert [t.shape for t in top] == [(2, 3), (2, 3)]


def test_input_one_shape_per_top_and_forward_keeps_data():
    layer, top = setup('type: "Input" input_param { shape { dim: 1 dim: 3 dim: 4 dim: 5 } shape { dim: 1 } }', 2)
    assert top[0].shape == (1, 3, 4, 5) and top[1].shape == (1,)
    top[0].data[...] = 7.0
    top[1].data[...] = -1.0
    layer.reshape([], top)
    layer.forward([], top)
    np.testing.assert_array_equal(top[0].data, 7.0)
    np.testing.assert_array_equal(top[1].data, -1.0)


def test_input_without_shape_keeps_caller_shape():
    layer = layer_from_text('type: "Input"')
    top = [Blob((4, 2))]
    layer.setup_layer([], top)
    assert top[0].shape == (4, 2)
    top[0].reshape(5, 2)  # the caller reshapes; reshape/forward leave it alone
    layer.reshape([], top)
    layer.forward([], top)
    assert top[0].shape == (5, 2)


def test_input_shape_count_error():
    with pytest.raises(LayerError, match="once or once per top"):
        setup('type: "Input" input_param { shape { dim: 1 } shape { dim: 2 } }', 3)
    with pytest.raises(LayerError):
        layer_from_text('type: "Input"').setup_layer([Blob((1,))], [Blob()])


# ----------------------------------------------------------------------------- DummyData

def test_dummy_data_default_is_zero_constant():
    layer, top = setup('type: "DummyData" dummy_data_param { shape { dim: 2 dim: 3 } }', 1)
    assert top[0].shape == (2, 3)
    np.testing.assert_array_equal(top[0].data, 0)


def test_dummy_data_constant_filled_once_gaussian_refilled_each_forward():
    set_random_seed(3)
    layer, top = setup('type: "DummyData" dummy_data_param { '
                       'data_filler { type: "constant" value: 2.5 } data_filler { type: "gaussian" std: 1 } '
                       'shape { dim: 3 dim: 4 } shape { dim: 5 } }', 2)
    assert top[0].shape == (3, 4) and top[1].shape == (5,)
    np.testing.assert_array_equal(top[0].data, 2.5)
    np.testing.assert_array_equal(top[1].data, 0)  # random tops are not filled at setup (Caffe's refill_)
    layer.forward([], top)
    first = top[1].data.copy()
    assert np.all(first != 0)
    top[0].data[0, 0] = -9.0  # a constant top is never refilled
    layer.forward([], top)
    assert top[0].data[0, 0] == -9.0
    assert not np.allclose(top[1].data, first)
    # reproducible with the global seed
    set_random_seed(3)
    layer2, top2 = setup('type: "DummyData" dummy_data_param { '
                         'data_filler { type: "constant" value: 2.5 } data_filler { type: "gaussian" std: 1 } '
                         'shape { dim: 3 dim: 4 } shape { dim: 5 } }', 2)
    layer2.forward([], top2)
    np.testing.assert_array_equal(top2[1].data, first)


def test_dummy_data_one_filler_for_all_tops():
    set_random_seed(0)
    layer, top = setup('type: "DummyData" dummy_data_param { data_filler { type: "uniform" min: 1 max: 2 } '
                       'shape { dim: 2 } shape { dim: 3 } }', 2)
    layer.forward([], top)
    for t in top:
        assert np.all((t.data >= 1) & (t.data <= 2))
        assert len(np.unique(t.data)) == t.count


def test_dummy_data_legacy_dims():
    layer, top = setup('type: "DummyData" dummy_data_param { data_filler { type: "constant" value: 1 } '
                       'num: 2 num: 3 channels: 4 height: 1 width: 5 }', 2)
    assert top[0].shape == (2, 4, 1, 5) and top[1].shape == (3, 4, 1, 5)
    np.testing.assert_array_equal(top[1].data, 1)


@pytest.mark.parametrize("text,ntop,message", [
    ('data_filler { } data_filler { } shape { dim: 1 }', 3, "number of data fillers"),
    ('shape { dim: 1 } shape { dim: 2 }', 3, "once or once per top"),
    ('', 1, "once or once per top"),
    ('num: 1 channels: 1 height: 1 width: 1 shape { dim: 1 }', 1, "both shape and legacy"),
    ('num: 1 num: 2 channels: 1 height: 1 width: 1', 3, "'num' once"),
    ('num: 1 channels: 1 height: 1', 1, "'width' once"),
])
def test_dummy_data_errors(text, ntop, message):
    with pytest.raises(LayerError, match=message):
        setup(f'type: "DummyData" dummy_data_param {{ {text} }}', ntop)
