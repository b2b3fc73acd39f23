"""The framework's one random source (fillers, dropout, shuffling, random crops).

``set_random_seed(n)`` makes runs reproducible, as Caffe's ``random_seed`` does
(the streams differ from Caffe's Boost generator; only reproducibility matches).
"""
import contextlib
import threading

import numpy as np

_rng = np.random.default_rng()
_local = threading.local()


def set_random_seed(seed):
    """Reseed the global generator used by fillers, dropout and data shuffling."""
    global _rng
    _rng = np.random.default_rng(int(seed))


def rng():
    """The generator of this thread's :func:`thread_generator` block if any, else the current
    global ``numpy.random.Generator``."""
    own = getattr(_local, "generator", None)
    return _rng if own is None else own


@contextlib.contextmanager
def thread_generator(generator):
    """Within the block, :func:`rng` on this thread returns ``generator``: threads that run
    parts of one step (framework.data_parallel's replicas) each draw from their own stream,
    so the draws do not depend on which thread asks first."""
    previous = getattr(_local, "generator", None)
    _local.generator = generator
    try:
        yield
    finally:
        _local.generator = previous
