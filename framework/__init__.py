"""A Caffe-compatible framework in NumPy: pycaffe's API over Caffe's file formats.

    import framework
    net = framework.Net("deploy.prototxt", "weights.caffemodel", framework.TEST)
    out = net.forward(data=batch)
"""
from .blob import Blob
from .errors import CaffeError, LayerError, NetError, PrototxtError, WeightsError
from .layer import Layer, register_layer
from .random import set_random_seed

TRAIN = 0  # caffe_pb2.TRAIN
TEST = 1   # caffe_pb2.TEST

from .net import Net  # noqa: E402  (imports the layer registry, which needs the names above)

import layers as _layers  # noqa: E402,F401  (registers every built-in layer type)

# Solvers (pycaffe's names): get_solver(path) picks the class from the solver's `type`.
from .solver import Solver, SolverError, get_solver  # noqa: E402
from .solvers import (AdaDeltaSolver, AdaGradSolver, AdamSolver, NesterovSolver,  # noqa: E402
                      RMSPropSolver, SGDSolver)

# pycaffe's caffe.Classifier (image preprocessing in framework.io.Transformer).
from .classifier import Classifier  # noqa: E402

# Inference with the batch split over one net replica per core.
from .data_parallel import DataParallelNet  # noqa: E402
