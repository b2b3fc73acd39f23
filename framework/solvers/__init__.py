"""Caffe's update rules, one class per solver ``type`` (src/caffe/solvers/*.cpp).

- :class:`SGDSolver` ("SGD"): momentum SGD; the base of all the others (clip, normalise,
  regularise, history, snapshots).
- :class:`NesterovSolver` ("Nesterov"), :class:`AdaGradSolver` ("AdaGrad"),
  :class:`RMSPropSolver` ("RMSProp"), :class:`AdaDeltaSolver` ("AdaDelta"),
  :class:`AdamSolver` ("Adam").
"""
from .sgd import NesterovSolver, SGDSolver
from .adaptive import AdaDeltaSolver, AdaGradSolver, AdamSolver, RMSPropSolver

__all__ = ["SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver",
           "AdamSolver"]
