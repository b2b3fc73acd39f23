"""Caffe's learning-rate policies (``SGDSolver::GetLearningRate`` in sgd_solver.cpp).

With ``it`` the current iteration and the SolverParameter fields ``base_lr``,
``gamma``, ``power``, ``stepsize``, ``stepvalue`` and ``max_iter``:

- ``fixed``:     base_lr
- ``step``:      base_lr * gamma ^ floor(it / stepsize)
- ``exp``:       base_lr * gamma ^ it
- ``inv``:       base_lr * (1 + gamma * it) ^ (-power)
- ``multistep``: base_lr * gamma ^ current_step, where current_step advances by one
  (at most once per call) when it >= stepvalue[current_step]
- ``poly``:      base_lr * (1 - it / max_iter) ^ power
- ``sigmoid``:   base_lr / (1 + exp(-gamma * (it - stepsize)))

``current_step`` is solver state (it is saved in the .solverstate): ``step``
sets it, ``multistep`` advances it.  The rate is a float32, as Caffe's
``Dtype rate``; ``inv``, ``poly`` and ``sigmoid`` are evaluated in float32 as
Caffe's float arithmetic does, ``step``/``exp``/``multistep`` raise to an
integer power in double and round once (C++ promotes ``pow(float, int)``).

Settings are checked as Caffe checks them: gamma >= 0 for step, exp, inv,
multistep and sigmoid; stepsize > 0 for step and sigmoid.
"""
import numpy as np

from .errors import CaffeError

POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")

_NEEDS_GAMMA = ("step", "exp", "inv", "multistep", "sigmoid")
_NEEDS_STEPSIZE = ("step", "sigmoid")


class LRPolicyError(CaffeError):
    """An unknown learning-rate policy or a setting the policy refuses."""


def check_lr_policy(param):
    """Raise :class:`LRPolicyError` unless ``param``'s policy and its settings are valid."""
    policy = param.lr_policy
    if policy not in POLICIES:
        if not policy:
            raise LRPolicyError(f"lr_policy is not set in the solver (known policies: {', '.join(POLICIES)})")
        raise LRPolicyError(f"unknown lr_policy '{policy}' (known policies: {', '.join(POLICIES)})")
    # sgd_solver.cpp: CHECK_GE(gamma, 0) / CHECK_GT(stepsize, 0)
    if policy in _NEEDS_GAMMA and not param.gamma >= 0:
        raise LRPolicyError(f"lr_policy '{policy}' needs gamma >= 0 (got gamma: {param.gamma:g})")
    if policy in _NEEDS_STEPSIZE and not param.stepsize > 0:
        raise LRPolicyError(f"lr_policy '{policy}' needs stepsize > 0 (got stepsize: {param.stepsize})")
    if policy == "poly" and param.max_iter <= 0:
        raise LRPolicyError(f"lr_policy 'poly' needs max_iter > 0 (got max_iter: {param.max_iter})")


def learning_rate(param, iteration, current_step=0):
    """Return ``(rate, current_step)`` for ``iteration`` under ``param.lr_policy``.

    ``rate`` is a ``numpy.float32``; ``current_step`` is the updated step counter
    (unchanged except for ``step`` and ``multistep``).
    """
    check_lr_policy(param)
    f32 = np.float32
    policy = param.lr_policy
    base_lr = float(f32(param.base_lr))
    gamma = f32(param.gamma)
    it = int(iteration)
    if policy == "fixed":
        rate = base_lr
    elif policy == "step":
        current_step = it // param.stepsize
        rate = base_lr * float(gamma) ** current_step
    elif policy == "exp":
        rate = base_lr * float(gamma) ** it
    elif policy == "inv":
        # (Dtype(1) + gamma * iter) ^ (-power), all float
        base = f32(1) + gamma * f32(it)
        rate = f32(base_lr) * np.power(base, -f32(param.power), dtype=np.float32)
    elif policy == "multistep":
        if current_step < len(param.stepvalue) and it >= param.stepvalue[current_step]:
            current_step += 1
        rate = base_lr * float(gamma) ** current_step
    elif policy == "poly":
        frac = f32(1) - f32(it) / f32(param.max_iter)
        rate = f32(base_lr) * np.power(frac, f32(param.power), dtype=np.float32)
    else:  # sigmoid
        with np.errstate(over="ignore"):
            e = np.exp(-gamma * (f32(it) - f32(param.stepsize)), dtype=np.float32)
            rate = f32(base_lr) * (f32(1) / (f32(1) + e))
    return f32(rate), current_step
