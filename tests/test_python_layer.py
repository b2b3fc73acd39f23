"""Tests for layers/python_layer.py: user layers loaded from a module by name."""
import sys
import textwrap

import numpy as np
import pytest

from gradient_check import check_gradient, layer_from_text, make_blob
from framework.blob import Blob
from framework.errors import LayerError
from layers import python_layer

MODULE = textwrap.dedent('''
    import ast
    import numpy as np
    import framework

    class TimesK(framework.Layer):
        """y = k * x + offset, k and offset from param_str (a Python dict literal)."""

        def setup(self, bottom, top):
            params = ast.literal_eval(self.param_str)
            self.k = params["k"]
            self.offset = params.get("offset", 0.0)
            self.seen_phase = self.phase
            self.calls = []

        def reshape(self, bottom, top):
            self.calls.append("reshape")
            top[0].reshape(bottom[0].shape)

        def forward(self, bottom, top):
            self.calls.append("forward")
            top[0].data[...] = self.k * bottom[0].data + self.offset

        def backward(self, top, propagate_down, bottom):
            self.calls.append("backward")
            if propagate_down[0]:
                bottom[0].diff[...] = self.k * top[0].diff

    class SumSquares(framework.Layer):
        """A loss-like layer: y = sum(x^2), shape ()."""

        def setup(self, bottom, top):
            pass

        def reshape(self, bottom, top):
            top[0].reshape(())

        def forward(self, bottom, top):
            top[0].data[...] = np.sum(bottom[0].data ** 2)

        def backward(self, top, propagate_down, bottom):
            bottom[0].diff[...] = 2 * bottom[0].data * top[0].diff

    NOT_A_LAYER = 3
''')


@pytest.fixture
def module_dir(tmp_path, monkeypatch, request):
    """Write the user module (uniquely named per test) into tmp_path and chdir there."""
    name = "user_layers_" + request.node.name.replace("[", "_").replace("]", "_").replace("-", "_")
    (tmp_path / f"{name}.py").write_text(MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # undo our sys.path additions afterwards
    monkeypatch.setattr(python_layer, "_search_paths", [])
    yield name
    sys.modules.pop(name, None)


def python_layer_text(module, cls="TimesK", param_str="{'k': 3.0, 'offset': 1.0}", extra=""):
    return (f'name: "py" type: "Python" python_param {{ module: "{module}" layer: "{cls}" '
            f'param_str: "{param_str}" }} {extra}')


def test_python_layer_forward_backward_param_str(module_dir):
    layer = layer_from_text(python_layer_text(module_dir), phase=1)
    assert type(layer).__name__ == "TimesK"
    assert layer.param_str == "{'k': 3.0, 'offset': 1.0}"
    x = np.arange(6.0).reshape(2, 3)
    bottom, top = [make_blob(x)], [Blob()]
    layer.setup_layer(bottom, top)
    assert layer.k == 3.0 and layer.seen_phase == 1
    assert layer.type == "Python"
    layer.forward(bottom, top)
    np.testing.assert_allclose(top[0].data, 3 * x + 1)
    top[0].diff[...] = 1
    layer.backward(top, [True], bottom)
    np.testing.assert_allclose(bottom[0].diff, 3.0)
    assert layer.calls == ["reshape", "forward", "backward"]
    assert layer.loss_weights == [0.0]  # not a loss without loss_weight


def test_python_layer_gradient_check(module_dir):
    layer = layer_from_text(python_layer_text(module_dir, param_str="{'k': -2.0}"))
    check_gradient(layer, [make_blob(np.random.default_rng(0).standard_normal((1, 3, 2)))], [Blob()])


def test_python_layer_is_loss_only_with_loss_weight(module_dir):
    layer = layer_from_text(python_layer_text(module_dir, "SumSquares", extra="loss_weight: 0.5"))
    bottom, top = [make_blob(np.array([1.0, 2.0]))], [Blob()]
    top[0].set_dtype(np.float64)
    layer.setup_layer(bottom, top)
    assert layer.loss_weights == [0.5]
    assert float(top[0].diff) == 0.5  # the loss weight sits in the top's diff
    layer.forward(bottom, top)
    layer.backward(top, [True], bottom)
    np.testing.assert_allclose(bottom[0].diff, [1.0, 2.0])


def test_python_layer_in_a_net_from_prototxt_directory(tmp_path, module_dir, monkeypatch):
    import framework

    net_dir = tmp_path / "nets"
    net_dir.mkdir()
    other = f"{module_dir}_beside_prototxt"
    (net_dir / f"{other}.py").write_text(MODULE)
    (net_dir / "net.prototxt").write_text(textwrap.dedent(f'''
        name: "pynet"
        force_backward: true
        layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 2 dim: 2 }} }} }}
        layer {{ name: "scale" type: "Python" bottom: "data" top: "scaled"
                python_param {{ module: "{other}" layer: "TimesK" param_str: "{{'k': 2.0}}" }} }}
        layer {{ name: "loss" type: "Python" bottom: "scaled" top: "loss" loss_weight: 1
                python_param {{ module: "{module_dir}" layer: "SumSquares" }} }}
    '''))
    python_layer.add_module_search_path(net_dir)  # what the net loader should do for its prototxt
    try:
        net = framework.Net(str(net_dir / "net.prototxt"), framework.TEST)
        x = np.array([[1.0, -1.0], [0.5, 2.0]])
        net.blobs["data"].data[...] = x
        loss = net.forward_loss()
        assert loss == pytest.approx(np.sum((2 * x) ** 2), rel=1e-6)
        net.backward()
        np.testing.assert_allclose(net.blobs["data"].diff, 8 * x, rtol=1e-6)
    finally:
        sys.modules.pop(other, None)


def test_missing_module_error(module_dir):
    with pytest.raises(LayerError, match=r"layer 'py'.*no_such_module_xyz.*ModuleNotFoundError"):
        layer_from_text(python_layer_text("no_such_module_xyz"))


def test_module_raising_on_import(tmp_path, module_dir):
    (tmp_path / "broken_user_module.py").write_text("raise ValueError('boom at import')\n")
    try:
        with pytest.raises(LayerError, match=r"broken_user_module.*ValueError: boom at import"):
            layer_from_text(python_layer_text("broken_user_module"))
    finally:
        sys.modules.pop("broken_user_module", None)


def test_missing_class_error(module_dir):
    with pytest.raises(LayerError, match=rf"layer 'py'.*'{module_dir}'.*no python_param.layer class 'Nope'"):
        layer_from_text(python_layer_text(module_dir, "Nope"))


def test_class_must_be_a_layer(module_dir):
    with pytest.raises(LayerError, match="subclass of framework.Layer"):
        layer_from_text(python_layer_text(module_dir, "NOT_A_LAYER"))


def test_module_not_set_error():
    with pytest.raises(LayerError, match="python_param.module is not set"):
        layer_from_text('name: "py" type: "Python" python_param { layer: "X" }')
