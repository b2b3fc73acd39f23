"""The Solver: Caffe's training loop (solver.cpp), with pycaffe's Python API.

A solver owns one training net and any number of test nets, built from a
``SolverParameter`` (a solver prototxt).  ``step(n)`` runs n iterations of::

    clear param diffs -> [test every test_interval] -> forward/backward iter_size times
    -> display -> apply_update (the subclass's update rule) -> iter += 1 -> [snapshot]

``solve()`` steps up to ``max_iter``, snapshots at the end (``snapshot_after_train``),
runs a last forward for the display and a last test, then logs "Optimization Done.".
The update rules live in ``framework/solvers/`` (SGD, Nesterov, AdaGrad, RMSProp,
AdaDelta, Adam); create one with :func:`get_solver` (by the solver's ``type``) or
directly with its class, as pycaffe does::

    solver = framework.get_solver("lenet_solver.prototxt")
    solver.step(100); solver.net.blobs["loss"].data; solver.snapshot()

Paths in the solver file (``net``, ``train_net``, ``test_net``, ``snapshot_prefix``,
``weights``) are relative to the current directory, as in Caffe.  Log lines follow
solver.cpp's formats so Caffe's log parsers work.
"""
import copy
import logging
import os
import time

import numpy as np
from google.protobuf import text_format

from proto import caffe_pb2

from .errors import CaffeError
from .logging_util import fmt
from .lr_policy import LRPolicyError, check_lr_policy

log = logging.getLogger("framework.solver")

SOLVER_REGISTRY = {}


class SolverError(CaffeError):
    """A solver definition, snapshot or solver state is invalid."""


class SolverAction:
    """What an action function (signal handler) may ask for (Caffe's SolverAction)."""
    NONE = "none"
    STOP = "stop"
    SNAPSHOT = "snapshot"


def register_solver(type_name):
    """Class decorator registering a Solver subclass under its ``type`` string."""

    def add(cls):
        if type_name in SOLVER_REGISTRY and SOLVER_REGISTRY[type_name] is not cls:
            raise SolverError(f"solver type '{type_name}' is already registered")
        SOLVER_REGISTRY[type_name] = cls
        cls.type_name = type_name
        return cls

    return add


def _ensure_registered():
    from . import solvers  # noqa: F401  (registers the built-in solver types)


def read_solver_param(path):
    """Read a solver prototxt: parse, upgrade the legacy ``solver_type`` enum, default the prefix.

    As Caffe's ReadSolverParamsFromTextFileOrDie (upgrade_proto.cpp): a missing
    ``snapshot_prefix`` becomes the solver file's path without its extension, and a
    prefix naming an existing directory becomes ``<dir>/<solver file stem>``.
    """
    from . import io as caffe_io
    from .upgrade import upgrade_solver

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise SolverError(f"solver file not found: {path}")
    param = caffe_io.read_prototxt(path, caffe_pb2.SolverParameter)
    upgrade_solver(param, source=path)
    _upgrade_snapshot_prefix(param, path)
    return param


def _upgrade_snapshot_prefix(param, path):
    """upgrade_proto.cpp UpgradeSnapshotPrefixProperty."""
    if not param.HasField("snapshot_prefix"):
        param.snapshot_prefix = os.path.splitext(path)[0]
        log.info("snapshot_prefix was not specified and is set to %s", param.snapshot_prefix)
    elif os.path.isdir(param.snapshot_prefix):
        stem = os.path.splitext(os.path.basename(path))[0]
        param.snapshot_prefix = os.path.join(param.snapshot_prefix, stem)
        log.info("snapshot_prefix was a directory and is replaced to %s", param.snapshot_prefix)


def _as_solver_param(source):
    """A private SolverParameter from a path or a SolverParameter (upgraded copy)."""
    if isinstance(source, caffe_pb2.SolverParameter):
        from .upgrade import upgrade_solver
        param = caffe_pb2.SolverParameter()
        param.CopyFrom(source)
        upgrade_solver(param, source="<SolverParameter>")
        return param, None
    if isinstance(source, (str, bytes, os.PathLike)):
        path = os.fsdecode(source)
        return read_solver_param(path), path
    raise TypeError(f"a solver needs a solver prototxt path or a SolverParameter, got {type(source).__name__}")


def get_solver(source):
    """Create the solver named by the definition's ``type`` (pycaffe's ``caffe.get_solver``).

    ``source`` is a solver prototxt path or a ``caffe_pb2.SolverParameter``.  The
    legacy ``solver_type`` enum is upgraded first.  An unknown type lists the known ones.
    """
    _ensure_registered()
    param, path = _as_solver_param(source)
    cls = SOLVER_REGISTRY.get(param.type)
    if cls is None:
        raise SolverError(f"unknown solver type '{param.type}' "
                          f"(known types: {', '.join(sorted(SOLVER_REGISTRY))})")
    return cls(param, _param_path=path)


class Solver:
    """Base class: builds the nets and runs Caffe's training loop.

    Subclasses implement ``apply_update()`` (and the snapshot / restore of their
    state).  Attributes (pycaffe's names): ``net`` (the training net),
    ``test_nets`` (list), ``iter``, ``param`` (the SolverParameter).
    Methods: ``step(n)``, ``solve(resume_file=None)``, ``snapshot()``,
    ``restore(path)``, ``test_all()``, ``test(i)``, ``apply_update()``,
    ``add_callback(on_start, on_gradients_ready)``, ``set_action_function(fn)``.
    """

    type_name = None

    def __init__(self, source, _param_path=None):
        if isinstance(source, caffe_pb2.SolverParameter) and _param_path is not None:
            param = source  # already read and upgraded by get_solver
        else:
            param, _param_path = _as_solver_param(source)
        self.param = param
        self.param_file = _param_path
        log.info("Initializing solver from parameters: \n%s", text_format.MessageToString(param))
        self.check_param()
        self._check_snapshot_write_permissions()
        if param.random_seed >= 0:
            from .random import set_random_seed
            set_random_seed(param.random_seed)  # solver.cpp: random_seed + solver_rank (rank 0)
        self.net = None
        self.test_nets = []
        self._init_train_net()
        self._init_test_nets()
        log.info("Solver scaffolding done.")
        self.iter = 0
        self.current_step = 0
        self.requested_early_exit = False
        self.smoothed_loss = np.float32(0)
        self._losses = []
        self.mean_scores = [[] for _ in self.test_nets]
        self._callbacks = []
        self._action_function = None
        self._iterations_last = 0

    # -- checks ----------------------------------------------------------------
    def check_param(self):
        """Refuse settings Caffe refuses (before any net is built)."""
        p = self.param
        if p.average_loss < 1:  # solver.cpp: CHECK_GE(average_loss, 1)
            raise SolverError(f"average_loss should be >= 1 (got average_loss: {p.average_loss})")
        if p.iter_size < 1:
            raise SolverError(f"iter_size should be >= 1 (got iter_size: {p.iter_size})")
        try:
            check_lr_policy(p)
        except LRPolicyError as exc:
            raise SolverError(str(exc)) from None
        if p.weight_decay and p.regularization_type not in ("L1", "L2"):
            raise SolverError(f"unknown regularization_type '{p.regularization_type}' (known: L1, L2)")

    def _check_snapshot_write_permissions(self):
        """solver.cpp CheckSnapshotWritePermissions: probe-write ``<prefix>_iter_0.tempfile``."""
        p = self.param
        if not p.snapshot:
            return
        if not p.HasField("snapshot_prefix"):
            raise SolverError("In solver params, snapshot is specified but snapshot_prefix is not")
        probe = self._snapshot_filename(".tempfile", iteration=0)
        try:
            with open(probe, "wb"):
                pass
            os.remove(probe)
        except OSError:
            raise SolverError(f"Cannot write to snapshot prefix '{p.snapshot_prefix}'. "
                              f"Make sure that the directory exists and is writeable.") from None

    # -- nets ------------------------------------------------------------------
    def _read_net_file(self, path, field):
        from .net import read_net_param
        if not os.path.isfile(path):
            raise SolverError(f"net file '{path}' (solver field {field}) not found "
                              f"(paths are relative to the current directory, {os.getcwd()})")
        return read_net_param(path)

    def _init_train_net(self):
        from .net import Net
        p = self.param
        fields = [f for f in ("net", "net_param", "train_net", "train_net_param") if p.HasField(f)]
        names = "net, net_param, train_net, train_net_param"
        if not fields:
            raise SolverError(f"SolverParameter must specify a train net using one of these fields: {names}")
        if len(fields) > 1:
            raise SolverError(f"SolverParameter must not contain more than one of these fields "
                              f"specifying a train_net: {names} (got {', '.join(fields)})")
        field = fields[0]
        if field.endswith("_param"):
            log.info("Creating training net specified in %s.", field)
            net_param = caffe_pb2.NetParameter()
            net_param.CopyFrom(getattr(p, field))
        else:
            log.info("Creating training net from %s file: %s", field, getattr(p, field))
            net_param = self._read_net_file(getattr(p, field), field)
        # Solver defaults < the net's own state < train_state (solver.cpp InitTrainNet).
        state = caffe_pb2.NetState(phase=caffe_pb2.TRAIN)
        state.MergeFrom(net_param.state)
        state.MergeFrom(p.train_state)
        net_param.state.CopyFrom(state)
        self.net = Net(net_param)
        for weights in p.weights:
            self._load_net_weights(self.net, weights)

    def _init_test_nets(self):
        from .net import Net
        p = self.param
        has_net_param, has_net_file = p.HasField("net_param"), p.HasField("net")
        if has_net_param and has_net_file:
            raise SolverError("Both net_param and net_file may not be specified.")
        num_test_nets = len(p.test_net_param) + len(p.test_net)
        if has_net_param or has_net_file:
            if len(p.test_iter) < num_test_nets:
                raise SolverError(f"test_iter must be specified for each test network "
                                  f"({num_test_nets} test nets, {len(p.test_iter)} test_iter)")
        elif len(p.test_iter) != num_test_nets:
            raise SolverError(f"test_iter must be specified for each test network "
                              f"({num_test_nets} test nets, {len(p.test_iter)} test_iter)")
        # Extra test_iter entries make extra test nets from the generic net (solver.cpp).
        num_instances = len(p.test_iter)
        if p.test_state and len(p.test_state) != num_instances:
            raise SolverError(f"test_state must be unspecified or specified once per test net "
                              f"({num_instances} test nets, {len(p.test_state)} test_state)")
        if num_instances and p.test_interval <= 0:
            raise SolverError(f"test_interval must be > 0 when there are test nets "
                              f"(got test_interval: {p.test_interval})")
        sources, params = [], []
        for net_param in p.test_net_param:
            sources.append("test_net_param")
            params.append(copy.deepcopy(net_param))
        for path in p.test_net:
            sources.append(f"test_net file: {path}")
            params.append(self._read_net_file(path, "test_net"))
        remaining = num_instances - len(params)
        for _ in range(remaining):
            if has_net_param:
                sources.append("net_param")
                params.append(copy.deepcopy(p.net_param))
            else:
                sources.append(f"net file: {p.net}")
                params.append(self._read_net_file(p.net, "net"))
        self.test_nets = []
        for i, net_param in enumerate(params):
            state = caffe_pb2.NetState(phase=caffe_pb2.TEST)
            state.MergeFrom(net_param.state)
            if p.test_state:
                state.MergeFrom(p.test_state[i])
            net_param.state.CopyFrom(state)
            log.info("Creating test net (#%d) specified by %s", i, sources[i])
            net = Net(net_param)
            for weights in p.weights:
                self._load_net_weights(net, weights)
            self.test_nets.append(net)

    @staticmethod
    def _load_net_weights(net, model_list):
        """Copy weights from each file of a comma-separated list (caffe.cpp / solver.cpp LoadNetWeights)."""
        for path in model_list.split(","):
            path = path.strip()
            if not path:
                continue
            if not os.path.isfile(path):
                raise SolverError(f"weights file not found: {path}")
            log.info("Finetuning from %s", path)
            net.copy_from(path)

    # -- pycaffe API -----------------------------------------------------------
    def add_callback(self, on_start, on_gradients_ready):
        """Call ``on_start()`` before each iteration's forward and ``on_gradients_ready()`` before its update."""
        self._callbacks.append((on_start, on_gradients_ready))

    def set_action_function(self, function):
        """``function()`` returns a :class:`SolverAction` value; polled each iteration (signals)."""
        self._action_function = function

    def _requested_action(self):
        if self._action_function is None:
            return SolverAction.NONE
        return self._action_function() or SolverAction.NONE

    @property
    def lr(self):
        """The learning rate the next update would use (no state change)."""
        from .lr_policy import learning_rate
        return float(learning_rate(self.param, self.iter, self.current_step)[0])

    # -- training loop ---------------------------------------------------------
    def step(self, iters):
        """Run ``iters`` training iterations (solver.cpp Step)."""
        p = self.param
        start_iter = self.iter
        stop_iter = self.iter + int(iters)
        self._losses = []
        self.smoothed_loss = np.float32(0)
        self._iterations_last = self.iter
        timer = time.perf_counter()
        while self.iter < stop_iter:
            self.net.clear_param_diffs()
            if (p.test_interval and self.iter % p.test_interval == 0
                    and (self.iter > 0 or p.test_initialization)):
                self.test_all()
                if self.requested_early_exit:
                    break
            for on_start, _ in self._callbacks:
                on_start()
            display = bool(p.display) and self.iter % p.display == 0
            debug = display and p.debug_info
            loss = np.float32(0)
            for _ in range(p.iter_size):
                loss += np.float32(self.net.forward_backward())
            loss /= np.float32(p.iter_size)
            if debug:
                self._log_forward_backward_debug()
            self._update_smoothed_loss(loss, start_iter)
            if display:
                lapse = time.perf_counter() - timer
                per_s = (self.iter - self._iterations_last) / (lapse if lapse else 1)
                log.info("Iteration %d (%s iter/s, %ss/%d iters), loss = %s", self.iter, fmt(per_s),
                         fmt(lapse), p.display, fmt(self.smoothed_loss))
                timer = time.perf_counter()
                self._iterations_last = self.iter
                self._log_outputs(self.net, "Train", lambda name: self.net.blobs[name].data)
            for _, on_gradients_ready in self._callbacks:
                on_gradients_ready()
            self.apply_update()
            if debug:
                self._log_update_debug()
            self.iter += 1
            request = self._requested_action()
            if (p.snapshot and self.iter % p.snapshot == 0) or request == SolverAction.SNAPSHOT:
                self.snapshot()
            if request == SolverAction.STOP:
                self.requested_early_exit = True
                break

    def solve(self, resume_file=None):
        """Train to ``max_iter`` (solver.cpp Solve), optionally resuming from a .solverstate."""
        p = self.param
        log.info("Solving %s", self.net.name)
        log.info("Learning Rate Policy: %s", p.lr_policy)
        self.requested_early_exit = False
        if resume_file:
            log.info("Restoring previous solver status from %s", resume_file)
            self.restore(resume_file)
        start_iter = self.iter
        self.step(p.max_iter - self.iter)
        if p.snapshot_after_train and (not p.snapshot or self.iter % p.snapshot != 0):
            self.snapshot()
        if self.requested_early_exit:
            log.info("Optimization stopped early.")
            return
        # A last forward for the display (no update) and a last test (solver.cpp).
        if p.display and self.iter % p.display == 0:
            loss = np.float32(self.net.forward_loss())
            self._update_smoothed_loss(loss, start_iter)
            log.info("Iteration %d, loss = %s", self.iter, fmt(self.smoothed_loss))
        if p.test_interval and self.iter % p.test_interval == 0:
            self.test_all()
        log.info("Optimization Done.")

    def _update_smoothed_loss(self, loss, start_iter):
        """Average of the last ``average_loss`` losses (solver.cpp UpdateSmoothedLoss)."""
        average = self.param.average_loss
        loss = np.float32(loss)
        if len(self._losses) < average:
            self._losses.append(loss)
            size = len(self._losses)
            self.smoothed_loss = np.float32((self.smoothed_loss * np.float32(size - 1) + loss) / np.float32(size))
        else:
            idx = (self.iter - start_iter) % average
            self.smoothed_loss = np.float32(self.smoothed_loss + (loss - self._losses[idx]) / np.float32(average))
            self._losses[idx] = loss

    @staticmethod
    def _log_outputs(net, which, values_of):
        """``    Train net output #k: name = v (* w = w*v loss)`` for every output value."""
        index = 0
        for name in net.outputs:
            weight = np.float32(net.output_loss_weights.get(name, 0.0))
            for value in np.asarray(values_of(name)).ravel():
                suffix = f" (* {fmt(weight)} = {fmt(weight * np.float32(value))} loss)" if weight else ""
                log.info("    %s net output #%d: %s = %s%s", which, index, name, fmt(value), suffix)
                index += 1

    # -- testing ---------------------------------------------------------------
    def test_all(self):
        """Test every test net (solver.cpp TestAll); returns the list of mean-score dicts."""
        results = []
        for i in range(len(self.test_nets)):
            if self.requested_early_exit:
                break
            results.append(self.test(i))
        return results

    def test(self, test_net_id=0):
        """Run ``test_iter[i]`` forwards of test net ``i`` on the current weights; log the means.

        Returns ``{output name: mean}`` (an array for outputs with several values);
        the flat list of means is kept in ``self.mean_scores[i]`` as Caffe's mean_scores_.
        """
        p = self.param
        log.info("Iteration %d, Testing net (#%d)", self.iter, test_net_id)
        test_net = self.test_nets[test_net_id]
        test_net.share_trained_layers_with(self.net)
        sums, owners = None, []
        loss = np.float32(0)
        iters = p.test_iter[test_net_id]
        for i in range(iters):
            request = self._requested_action()
            while request != SolverAction.NONE:
                if request == SolverAction.SNAPSHOT:
                    self.snapshot()
                elif request == SolverAction.STOP:
                    self.requested_early_exit = True
                request = self._requested_action()
            if self.requested_early_exit:
                break
            iter_loss = test_net.forward_loss()
            if p.test_compute_loss:
                loss += np.float32(iter_loss)
            values = [np.asarray(test_net.blobs[name].data, dtype=np.float32).ravel() for name in test_net.outputs]
            if sums is None:
                sums = [v.copy() for v in values]
                owners = list(test_net.outputs)
            else:
                for acc, v in zip(sums, values):
                    acc += v
        if self.requested_early_exit:
            log.info("Test interrupted.")
            return {}
        if p.test_compute_loss:
            log.info("Test loss: %s", fmt(loss / np.float32(iters)))
        means = {}
        flat = []
        index = 0
        for name, acc in zip(owners, sums or []):
            mean = acc / np.float32(iters)
            weight = np.float32(test_net.output_loss_weights.get(name, 0.0))
            for value in mean:
                suffix = f" (* {fmt(weight)} = {fmt(weight * value)} loss)" if weight else ""
                log.info("    Test net output #%d: %s = %s%s", index, name, fmt(value), suffix)
                flat.append(float(value))
                index += 1
            means[name] = float(mean[0]) if mean.size == 1 else mean
        self.mean_scores[test_net_id] = flat
        return means

    # -- debug info (Caffe's Net::*DebugInfo, logged after the pass) ------------
    def _log_forward_backward_debug(self):
        net = self.net
        for name, layer in zip(net.layer_names, net.layers):
            for top in net.top_names[name]:
                data = net.blobs[top].data
                log.info("    [Forward] Layer %s, top blob %s data: %s", name, top, fmt(_abs_mean(data)))
            for j, blob in enumerate(layer.blobs):
                log.info("    [Forward] Layer %s, param blob %d data: %s", name, j, fmt(_abs_mean(blob.data)))
        for name, layer in reversed(list(zip(net.layer_names, net.layers))):
            for j, blob in enumerate(layer.blobs):
                log.info("    [Backward] Layer %s, param blob %d diff: %s", name, j, fmt(_abs_mean(blob.diff)))

    def _log_update_debug(self):
        net = self.net
        for name, layer in zip(net.layer_names, net.layers):
            for j, blob in enumerate(layer.blobs):
                log.info("    [Update] Layer %s, param %d data: %s; diff: %s", name, j,
                         fmt(_abs_mean(blob.data)), fmt(_abs_mean(blob.diff)))

    # -- snapshots -------------------------------------------------------------
    def _snapshot_filename(self, extension, iteration=None):
        it = self.iter if iteration is None else iteration
        return f"{self.param.snapshot_prefix}_iter_{it}{extension}"

    def snapshot(self):
        """Write ``<prefix>_iter_<N>.caffemodel`` and ``.solverstate`` (or their ``.h5`` forms).

        Returns the path of the solver state file.
        """
        fmt_ = self.param.snapshot_format
        if fmt_ == caffe_pb2.SolverParameter.BINARYPROTO:
            model_filename = self._snapshot_filename(".caffemodel")
            log.info("Snapshotting to binary proto file %s", model_filename)
            self.net.save(model_filename, write_diff=self.param.snapshot_diff)
        elif fmt_ == caffe_pb2.SolverParameter.HDF5:
            from .solvers.hdf5 import save_net_hdf5
            model_filename = self._snapshot_filename(".caffemodel.h5")
            log.info("Snapshotting to HDF5 file %s", model_filename)
            save_net_hdf5(self.net, model_filename, write_diff=self.param.snapshot_diff)
        else:
            raise SolverError(f"Unsupported snapshot format {fmt_}")
        return self.snapshot_solver_state(model_filename)

    def snapshot_solver_state(self, model_filename):
        raise NotImplementedError(f"{type(self).__name__}.snapshot_solver_state")

    def restore(self, state_file):
        """Load a ``.solverstate`` (or ``.solverstate.h5``): iteration, weights and history."""
        state_file = os.fspath(state_file)
        if not os.path.isfile(state_file):
            raise SolverError(f"solver state file not found: {state_file}")
        if state_file.endswith(".h5"):
            self.restore_solver_state_from_hdf5(state_file)
        else:
            self.restore_solver_state_from_binaryproto(state_file)

    def restore_solver_state_from_binaryproto(self, state_file):
        raise NotImplementedError(f"{type(self).__name__}.restore_solver_state_from_binaryproto")

    def restore_solver_state_from_hdf5(self, state_file):
        raise NotImplementedError(f"{type(self).__name__}.restore_solver_state_from_hdf5")

    @staticmethod
    def resolve_learned_net(learned_net, state_file):
        """Where the weights named by a solver state are.

        Caffe opens ``learned_net`` as written (relative to the current directory).
        When that file does not exist we also try it relative to the solver state's
        folder, then its base name in that folder (a snapshot folder that was moved
        or read from elsewhere).  Raises SolverError listing the places tried.
        """
        tried = [learned_net]
        if os.path.isfile(learned_net):
            return learned_net
        if not os.path.isabs(learned_net):
            folder = os.path.dirname(os.path.abspath(state_file))
            for candidate in (os.path.join(folder, learned_net),
                              os.path.join(folder, os.path.basename(learned_net))):
                if candidate not in tried:
                    tried.append(candidate)
                if os.path.isfile(candidate):
                    log.info("learned_net %s not found in the current directory; using %s",
                             learned_net, candidate)
                    return candidate
        raise SolverError(f"the weights file '{learned_net}' named by solver state '{state_file}' "
                          f"was not found (tried: {', '.join(tried)})")

    def apply_update(self):
        raise NotImplementedError(f"{type(self).__name__}.apply_update")

    def __repr__(self):
        return f"<{type(self).__name__} iter={self.iter} net='{self.net.name}'>"


def _abs_mean(array):
    a = np.asarray(array)
    return float(np.abs(a).sum(dtype=np.float64) / a.size) if a.size else 0.0
