"""The framework's one random source (fillers, dropout, shuffling, random crops).

``set_random_seed(n)`` makes runs reproducible, as Caffe's ``random_seed`` does
(the streams differ from Caffe's Boost generator; only reproducibility matches).
"""
import numpy as np

_rng = np.random.default_rng()


def set_random_seed(seed):
    """Reseed the global generator used by fillers, dropout and data shuffling."""
    global _rng
    _rng = np.random.default_rng(int(seed))


def rng():
    """The current global ``numpy.random.Generator``."""
    return _rng
