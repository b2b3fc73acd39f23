"""SGD with momentum (sgd_solver.cpp) and Nesterov's accelerated gradient (nesterov_solver.cpp).

:class:`SGDSolver` also holds everything the other update rules share:
the learning rate (``framework.lr_policy``), and for each learnable parameter
``w`` with gradient ``g`` (its diff), in this order (SGDSolver::ApplyUpdate)::

    clip:       if clip_gradients >= 0 and ||all g||_2 > clip_gradients: g *= clip / ||g||
    normalise:  g /= iter_size                      (gradients were accumulated iter_size times)
    regularise: g += wd * decay_mult * w            (L2)   or   * sign(w)   (L1)
    update:     ComputeUpdateValue(g, lr * lr_mult)  -> g holds the step
    net.update: w -= g

The SGD update keeps one history blob per parameter::

    h = momentum * h + lr * lr_mult * g;   g = h

All arithmetic is vectorised per parameter blob, in place, in the parameter's
dtype (float32), with Caffe's operation order (``axpby``: ``y = b*y; y += a*x``).
"""
import functools
import logging

import numpy as np

from proto import caffe_pb2

from .. import io as caffe_io
from ..lr_policy import learning_rate
from ..logging_util import fmt
from ..solver import Solver, SolverError, register_solver

log = logging.getLogger("framework.solver")


@register_solver("SGD")
class SGDSolver(Solver):
    """Stochastic gradient descent with momentum (Caffe's ``type: "SGD"``).

    Solver fields used: base_lr, lr_policy (+ gamma, power, stepsize, stepvalue,
    max_iter), momentum (0), weight_decay (0), regularization_type ("L2"),
    clip_gradients (-1: off), iter_size (1).  ``self.history`` is a list of
    arrays: ``history_factor`` groups of one array per learnable parameter, in
    the order Caffe saves them in the .solverstate.
    """

    history_factor = 1

    def __init__(self, source, _param_path=None):
        super().__init__(source, _param_path)
        self.presolve()

    # -- state -----------------------------------------------------------------
    def presolve(self):
        """Allocate history (and scratch buffers) for every learnable parameter (SGDSolver::PreSolve)."""
        params = self.net.learnable_params
        self.history = [np.zeros(p.shape, dtype=p.dtype) for _ in range(self.history_factor) for p in params]
        self._update = [np.zeros(p.shape, dtype=p.dtype) for p in params]
        self._temp = [np.zeros(p.shape, dtype=p.dtype) for p in params]

    # -- the update ------------------------------------------------------------
    def get_learning_rate(self):
        """The rate for this iteration; advances ``current_step`` for step / multistep."""
        previous = self.current_step
        rate, self.current_step = learning_rate(self.param, self.iter, self.current_step)
        if self.param.lr_policy == "multistep" and self.current_step != previous:
            log.info("MultiStep Status: Iteration %d, step = %d", self.iter, self.current_step)
        return rate

    def apply_update(self):
        """Clip, then per parameter normalise, regularise and compute the step; then net.update()."""
        rate = self.get_learning_rate()
        p = self.param
        if p.display and self.iter % p.display == 0:
            log.info("Iteration %d, lr = %s", self.iter, fmt(rate))
        self.clip_gradients()
        if type(self) is SGDSolver:
            from layers.parallel import run_balanced  # the layers import the framework

            params = self.net.learnable_params
            run_balanced([functools.partial(self._sgd_step_in_blocks, i, rate) for i in range(len(params))],
                         [p.count for p in params], self._update_threads())
            return
        for i in range(len(self.net.learnable_params)):
            self.normalize(i)
            self.regularize(i)
            self.compute_update_value(i, rate)
        self.net.update()

    def _update_threads(self):
        """Threads the parameters' updates are shared over: those of a data-parallel net
        (framework.data_parallel), whose replicas held BLAS to one thread, so that no OpenBLAS
        worker spins on the other cores (ResNet-50's update: 94 -> 60 ms on 2 threads); else
        one (after a step's multi-threaded GEMMs the second thread gained nothing: 96 -> 93)."""
        parallel = getattr(self.net, "data_parallel", None)
        return parallel.threads if parallel is not None else 1

    def _sgd_step_in_blocks(self, i, rate):
        """normalize, regularize, compute_update_value and Net.update for parameter ``i``, the
        same operations in the same order element by element, over cache-sized blocks: the
        temporaries stay in cache and each array is read from memory once (ResNet-50's 25.6M
        parameters: 77 -> 51 ms per iteration)."""
        from layers.parallel import in_blocks

        blob = self.net.learnable_params[i]
        d, w, h = (a.reshape(-1) for a in (blob.diff, blob.data, self.history[i]))
        t = d.dtype.type
        p = self.param
        scale = t(1) / t(p.iter_size) if p.iter_size != 1 else None
        decay = t(p.weight_decay) * t(self.net.params_weight_decay[i])
        if decay and p.regularization_type not in ("L1", "L2"):
            raise SolverError(f"Unknown regularization type: {p.regularization_type}")
        l1 = p.regularization_type == "L1"
        local_rate, momentum = self.local_rate(i, rate), t(p.momentum)

        def step(g, weights, history):
            if scale is not None:
                np.multiply(g, scale, out=g)
            if decay:
                temp = np.sign(weights) if l1 else np.multiply(weights, decay)
                if l1:
                    np.multiply(temp, decay, out=temp)
                np.add(g, temp, out=g)
            np.multiply(history, momentum, out=history)
            np.add(history, np.multiply(g, local_rate), out=history)
            np.copyto(g, history)
            np.subtract(weights, g, out=weights)

        in_blocks(step, [d, w, h])

    def clip_gradients(self):
        """Scale all diffs down so their global L2 norm is at most clip_gradients (if >= 0)."""
        clip = self.param.clip_gradients
        if clip < 0:
            return
        params = self.net.learnable_params
        sumsq = np.float32(0)
        for blob in params:
            d = blob.diff.reshape(-1)
            sumsq += np.dot(d, d)
        l2norm = np.sqrt(np.float32(sumsq))
        if l2norm > clip:
            scale = np.float32(clip) / l2norm
            log.info("Gradient clipping: scaling down gradients (L2 norm %s > %s) by scale factor %s",
                     fmt(l2norm), fmt(np.float32(clip)), fmt(scale))
            for blob in params:
                d = blob.diff
                np.multiply(d, d.dtype.type(scale), out=d)

    def normalize(self, i):
        """Divide the accumulated gradient by iter_size."""
        iter_size = self.param.iter_size
        if iter_size == 1:
            return
        d = self.net.learnable_params[i].diff
        t = d.dtype.type
        np.multiply(d, t(1) / t(iter_size), out=d)

    def regularize(self, i):
        """Add the weight-decay gradient: L2 ``wd*w`` or L1 ``wd*sign(w)``, wd = weight_decay * decay_mult."""
        blob = self.net.learnable_params[i]
        d, w = blob.diff, blob.data
        t = d.dtype.type
        local_decay = t(self.param.weight_decay) * t(self.net.params_weight_decay[i])
        if not local_decay:
            return
        temp = self._temp[i]
        if self.param.regularization_type == "L2":
            np.multiply(w, local_decay, out=temp)
        elif self.param.regularization_type == "L1":
            np.sign(w, out=temp)
            np.multiply(temp, local_decay, out=temp)
        else:
            raise SolverError(f"Unknown regularization type: {self.param.regularization_type}")
        np.add(d, temp, out=d)

    def local_rate(self, i, rate):
        """``rate * lr_mult`` in the parameter's dtype."""
        t = self.net.learnable_params[i].dtype.type
        return t(rate) * t(self.net.params_lr[i])

    def compute_update_value(self, i, rate):
        """h = momentum*h + local_rate*g; g = h."""
        g = self.net.learnable_params[i].diff
        h, upd = self.history[i], self._update[i]
        t = g.dtype.type
        _axpby(self.local_rate(i, rate), g, t(self.param.momentum), h, upd)
        np.copyto(g, h)

    # -- snapshot / restore ----------------------------------------------------
    def snapshot_solver_state(self, model_filename):
        """Write the SolverState (iter, learned_net, current_step, history) next to the model."""
        if self.param.snapshot_format == caffe_pb2.SolverParameter.HDF5:
            from .hdf5 import save_solver_state_hdf5
            filename = self._snapshot_filename(".solverstate.h5")
            log.info("Snapshotting solver state to HDF5 file %s", filename)
            save_solver_state_hdf5(filename, self.iter, model_filename, self.current_step, self.history)
            return filename
        state = caffe_pb2.SolverState()
        state.iter = self.iter
        state.learned_net = model_filename
        state.current_step = self.current_step
        for h in self.history:
            caffe_io.array_to_blob_proto(h, out=state.history.add())
        filename = self._snapshot_filename(".solverstate")
        log.info("Snapshotting solver state to binary proto file %s", filename)
        caffe_io.write_binary_proto(filename, state)
        return filename

    def restore_solver_state_from_binaryproto(self, state_file):
        state = caffe_io.read_binary_proto(state_file, caffe_pb2.SolverState)
        self.iter = state.iter
        if state.HasField("learned_net"):
            self._copy_learned_net(self.resolve_learned_net(state.learned_net, state_file))
        self.current_step = state.current_step
        self._restore_history([(f"history {i}", lambda p=p: caffe_io.blob_to_array(p))
                               for i, p in enumerate(state.history)], state_file)

    def restore_solver_state_from_hdf5(self, state_file):
        from .hdf5 import read_solver_state_hdf5
        state = read_solver_state_hdf5(state_file)
        self.iter = state["iter"]
        if state.get("learned_net"):
            self._copy_learned_net(self.resolve_learned_net(state["learned_net"], state_file))
        self.current_step = state["current_step"]
        self._restore_history([(f"history/{i}", lambda a=a: a) for i, a in enumerate(state["history"])],
                              state_file)

    def _copy_learned_net(self, path):
        if path.endswith(".h5"):
            try:
                self.net.copy_from(path)
                return
            except ImportError:
                from .hdf5 import load_net_hdf5
                load_net_hdf5(self.net, path)
                return
        self.net.copy_from(path)

    def _restore_history(self, loaders, state_file):
        if len(loaders) != len(self.history):
            raise SolverError(f"{state_file}: Incorrect length of history blobs: the state has {len(loaders)}, "
                              f"this {self.type_name} solver keeps {len(self.history)} "
                              f"({self.history_factor} per learnable parameter, "
                              f"{len(self.net.learnable_params)} parameters)")
        log.info("%s: restoring history", type(self).__name__)
        for (what, load), h in zip(loaders, self.history):
            values = load()
            if values.size != h.size:
                raise SolverError(f"{state_file}: {what} has shape {values.shape}, "
                                  f"the parameter has shape {h.shape}")
            h[...] = values.reshape(h.shape)


@register_solver("Nesterov")
class NesterovSolver(SGDSolver):
    """Nesterov's accelerated gradient (``type: "Nesterov"``)::

        h_new = momentum*h + local_rate*g;   g = (1 + momentum)*h_new - momentum*h
    """

    def compute_update_value(self, i, rate):
        g = self.net.learnable_params[i].diff
        h, upd, tmp = self.history[i], self._update[i], self._temp[i]
        t = g.dtype.type
        m = t(self.param.momentum)
        np.copyto(upd, h)                            # keep the old history to step back
        _axpby(self.local_rate(i, rate), g, m, h, tmp)
        _axpby(t(1) + m, h, -m, upd, tmp)            # step back, then over-step
        np.copyto(g, upd)


def _axpby(a, x, b, y, scratch):
    """y = b*y + a*x in place, in Caffe's order (scale y, then add a*x); ``scratch`` is clobbered."""
    np.multiply(y, b, out=y)
    np.multiply(x, a, out=scratch)
    np.add(y, scratch, out=y)
