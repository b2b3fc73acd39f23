"""Adaptive update rules: AdaGrad, RMSProp, AdaDelta, Adam (src/caffe/solvers/*_solver.cpp).

Each runs after SGDSolver's clip / normalise / regularise, on the gradient ``g``
(the parameter's diff) with ``lr = rate * lr_mult``, and leaves the step in ``g``
(``net.update()`` then does ``w -= g``).  ``delta`` (1e-8), ``rms_decay`` (0.99),
``momentum`` and ``momentum2`` (0.999) are SolverParameter fields.

- AdaGrad:  h += g²;  g = lr * g / (sqrt(h) + delta)            (momentum must be 0)
- RMSProp:  h = rms_decay*h + (1-rms_decay)*g²;  g = lr * g / (sqrt(h) + delta)
            (momentum must be 0; 0 <= rms_decay < 1)
- AdaDelta: h1 = m*h1 + (1-m)*g²;  g = g * sqrt((h2 + delta) / (h1 + delta));
            h2 = m*h2 + (1-m)*g²;  g = lr * g               (history: h1 then h2, 2N blobs)
- Adam:     m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g²;
            g = lr * sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + delta),  t = iter + 1
            (b1 = momentum, b2 = momentum2; history: m then v, 2N blobs)
"""
import math

import numpy as np

from ..solver import SolverError, register_solver
from .sgd import SGDSolver, _axpby


@register_solver("AdaGrad")
class AdaGradSolver(SGDSolver):
    """AdaGrad (``type: "AdaGrad"``); adagrad_solver.cpp."""

    def check_param(self):
        super().check_param()
        if self.param.momentum != 0:  # adagrad_solver.cpp constructor_sanity_check
            raise SolverError(f"Momentum cannot be used with AdaGrad (got momentum: {self.param.momentum:g})")

    def compute_update_value(self, i, rate):
        g = self.net.learnable_params[i].diff
        h, upd = self.history[i], self._update[i]
        t = g.dtype.type
        np.multiply(g, g, out=upd)
        np.add(h, upd, out=h)
        np.sqrt(h, out=upd)
        np.add(upd, t(self.param.delta), out=upd)
        np.divide(g, upd, out=upd)
        np.multiply(upd, self.local_rate(i, rate), out=g)


@register_solver("RMSProp")
class RMSPropSolver(SGDSolver):
    """RMSProp (``type: "RMSProp"``); rmsprop_solver.cpp."""

    def check_param(self):
        super().check_param()
        p = self.param
        if p.momentum != 0:  # rmsprop_solver.cpp constructor_sanity_check
            raise SolverError(f"Momentum cannot be used with RMSProp (got momentum: {p.momentum:g})")
        if not 0 <= p.rms_decay < 1:
            raise SolverError(f"rms_decay should lie between 0 and 1 (got rms_decay: {p.rms_decay:g})")

    def compute_update_value(self, i, rate):
        g = self.net.learnable_params[i].diff
        h, upd, tmp = self.history[i], self._update[i], self._temp[i]
        t = g.dtype.type
        decay = t(self.param.rms_decay)
        np.multiply(g, g, out=upd)
        _axpby(t(1) - decay, upd, decay, h, tmp)
        np.sqrt(h, out=upd)
        np.add(upd, t(self.param.delta), out=upd)
        np.divide(g, upd, out=upd)
        np.multiply(upd, self.local_rate(i, rate), out=g)


@register_solver("AdaDelta")
class AdaDeltaSolver(SGDSolver):
    """AdaDelta (``type: "AdaDelta"``); adadelta_solver.cpp.  Usually run with base_lr 1."""

    history_factor = 2

    def compute_update_value(self, i, rate):
        g = self.net.learnable_params[i].diff
        n = len(self.net.learnable_params)
        h_grad, h_upd = self.history[i], self.history[n + i]
        upd, tmp = self._update[i], self._temp[i]
        t = g.dtype.type
        m = t(self.param.momentum)
        delta = t(self.param.delta)
        np.multiply(g, g, out=upd)
        _axpby(t(1) - m, upd, m, h_grad, tmp)          # history of squared gradients
        np.add(h_upd, delta, out=upd)
        np.add(h_grad, delta, out=tmp)
        np.divide(upd, tmp, out=upd)
        np.sqrt(upd, out=upd)
        np.multiply(g, upd, out=g)
        np.multiply(g, g, out=upd)
        _axpby(t(1) - m, upd, m, h_upd, tmp)           # history of squared updates
        np.multiply(g, self.local_rate(i, rate), out=g)


@register_solver("Adam")
class AdamSolver(SGDSolver):
    """Adam (``type: "Adam"``); adam_solver.cpp.  Caffe suggests momentum 0.9, momentum2 0.999."""

    history_factor = 2

    def compute_update_value(self, i, rate):
        g = self.net.learnable_params[i].diff
        n = len(self.net.learnable_params)
        m, v, tmp = self.history[i], self.history[n + i], self._temp[i]
        t = g.dtype.type
        beta1, beta2 = t(self.param.momentum), t(self.param.momentum2)
        step = self.iter + 1
        # std::sqrt(Dtype(1) - pow(beta2, t)) / (Dtype(1.) - pow(beta1, t)): pow(float, int) is double
        correction = t(math.sqrt(1.0 - float(beta2) ** step) / (1.0 - float(beta1) ** step))
        _axpby(t(1) - beta1, g, beta1, m, tmp)
        np.multiply(g, g, out=tmp)
        np.multiply(v, beta2, out=v)
        np.multiply(tmp, t(1) - beta2, out=tmp)
        np.add(v, tmp, out=v)
        np.sqrt(v, out=tmp)
        np.add(tmp, t(self.param.delta), out=tmp)
        np.divide(m, tmp, out=tmp)
        np.multiply(tmp, self.local_rate(i, rate) * correction, out=g)
