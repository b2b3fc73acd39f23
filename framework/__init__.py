"""A Caffe-compatible framework in NumPy: pycaffe's API over Caffe's file formats."""
from .blob import Blob
from .errors import CaffeError, LayerError, NetError, PrototxtError, WeightsError
from .layer import Layer, register_layer
from .random import set_random_seed

TRAIN = 0  # caffe_pb2.TRAIN
TEST = 1   # caffe_pb2.TEST
