"""The "Python" layer type: a layer written by the user as a Python class.

prototxt::

    layer { name: "mine" type: "Python" bottom: "x" top: "y"
            python_param { module: "my_layers" layer: "MyLayer" param_str: "{'k': 2}" } }

``module`` is imported (the current working directory and any directory given
to :func:`add_module_search_path`, e.g. the prototxt's, are on ``sys.path``,
as pycaffe users get from PYTHONPATH); ``layer`` names a class in it that
subclasses ``framework.Layer`` and overrides the pycaffe hooks
``setup(bottom, top)``, ``reshape(bottom, top)``, ``forward(bottom, top)`` and
``backward(top, propagate_down, bottom)``.  The instance is built with the
same ``(layer_param, phase)`` constructor as every layer; ``self.param_str``
and ``self.phase`` are set before ``setup`` (python_layer.hpp).  As in Caffe,
a Python layer is a loss only if the prototxt gives it a ``loss_weight``.
``share_in_parallel`` only matters to multi-GPU Caffe and is accepted.
"""
import importlib
import os
import sys

from framework.layer import LAYER_REGISTRY, Layer

_search_paths = []


def add_module_search_path(directory):
    """Make modules in ``directory`` importable by Python layers (e.g. the prototxt's directory).

    Directories are appended to ``sys.path`` (never ahead of installed
    packages); adding one twice is harmless.
    """
    directory = os.path.abspath(directory)
    if directory not in _search_paths:
        _search_paths.append(directory)
    _extend_sys_path()


def _extend_sys_path():
    entries = {os.path.abspath(p or os.curdir) for p in sys.path}
    for directory in [os.getcwd()] + _search_paths:
        if directory not in entries:
            sys.path.append(directory)
            entries.add(directory)


def create_python_layer(layer_param, phase=None):
    """Factory registered as "Python": import the module, instantiate the class, set param_str/phase."""
    p = layer_param.python_param
    name, module_name, class_name = layer_param.name, p.module, p.layer

    def fail(message):
        from framework.errors import LayerError
        return LayerError(name, "Python", message)

    if not module_name:
        raise fail("python_param.module is not set")
    if not class_name:
        raise fail("python_param.layer is not set")
    _extend_sys_path()
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or any error raised while the module runs
        raise fail(f"cannot import python_param.module '{module_name}': "
                   f"{type(exc).__name__}: {exc}") from exc
    cls = getattr(module, class_name, None)
    if cls is None:
        raise fail(f"module '{module_name}' ({getattr(module, '__file__', '?')}) has no "
                   f"python_param.layer class '{class_name}'")
    if not (isinstance(cls, type) and issubclass(cls, Layer)):
        raise fail(f"python_param.layer '{module_name}.{class_name}' must be a subclass of "
                   f"framework.Layer, got {cls!r}")
    layer = cls(layer_param, phase)
    # python_layer.hpp sets these before calling the user's setup
    layer.param_str = p.param_str
    layer.phase = layer_param.phase if phase is None else phase
    return layer


# framework.layer.create_layer calls LAYER_REGISTRY[type](layer_param, phase), so a factory works.
if LAYER_REGISTRY.get("Python") not in (None, create_python_layer):
    from framework.errors import CaffeError
    raise CaffeError("layer type 'Python' is already registered")
LAYER_REGISTRY["Python"] = create_python_layer
