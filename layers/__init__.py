"""NumPy implementations of Caffe's layers, grouped by family.

Importing this package registers every layer type with ``framework.layer``.
"""
from . import (data, inputs, loss, neuron, normalization, python_layer, softmax,  # noqa: F401
               utility, vision)
