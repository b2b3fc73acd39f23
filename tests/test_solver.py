"""Solvers against reference computations of Caffe's update formulas (sgd_solver.cpp and siblings).

The net is tiny: Input (x: 5×3, y: 5×2) -> InnerProduct (2 outputs; weight lr_mult 1 /
decay_mult 1, bias lr_mult 2 / decay_mult 0.5) -> EuclideanLoss, so the gradient has a closed
form and the reference below is plain float64 NumPy written from Caffe's formulas.
"""
import logging
import math
import os
import shutil

import numpy as np
import pytest
from google.protobuf import text_format

import framework
from framework import io as caffe_io
from framework.lr_policy import LRPolicyError, learning_rate
from framework.solver import SolverError
from proto import caffe_pb2

N, D, K = 5, 3, 2
LR_MULT = (1.0, 2.0)
DECAY_MULT = (1.0, 0.5)

NET = """
name: "tiny"
layer { name: "in" type: "Input" top: "x" top: "y"
  input_param { shape { dim: 5 dim: 3 } shape { dim: 5 dim: 2 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "p"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0.5 }
  inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.5 }
                        bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "p" bottom: "y" top: "loss" }
"""

RNG = np.random.default_rng(7)
BATCHES = [(RNG.normal(size=(N, D)).astype(np.float32), RNG.normal(size=(N, K)).astype(np.float32))
           for _ in range(3)]

# One configuration per solver type, each with a different lr policy / regularisation.
CONFIGS = {
    "SGD": 'base_lr: 0.05 momentum: 0.9 weight_decay: 0.01 lr_policy: "step" gamma: 0.5 stepsize: 2',
    "Nesterov": 'base_lr: 0.05 momentum: 0.8 weight_decay: 0.02 regularization_type: "L1" '
                'lr_policy: "inv" gamma: 0.1 power: 0.75',
    "AdaGrad": 'base_lr: 0.1 weight_decay: 0.01 lr_policy: "exp" gamma: 0.9 delta: 1e-6',
    "RMSProp": 'base_lr: 0.01 rms_decay: 0.95 weight_decay: 0.001 regularization_type: "L1" '
               'lr_policy: "poly" power: 2 max_iter: 20',
    "AdaDelta": 'base_lr: 1 momentum: 0.95 delta: 1e-6 weight_decay: 0.001 lr_policy: "fixed"',
    "Adam": 'base_lr: 0.01 momentum: 0.9 momentum2: 0.999 weight_decay: 0.0005 '
            'lr_policy: "multistep" gamma: 0.5 stepvalue: 2 stepvalue: 4',
}
CLASSES = {"SGD": framework.SGDSolver, "Nesterov": framework.NesterovSolver,
           "AdaGrad": framework.AdaGradSolver, "RMSProp": framework.RMSPropSolver,
           "AdaDelta": framework.AdaDeltaSolver, "Adam": framework.AdamSolver}


def solver_param(text="", net=NET, **fields):
    p = caffe_pb2.SolverParameter()
    text_format.Merge(text, p)
    if net is not None:
        text_format.Merge(net, p.net_param)
    for k, v in fields.items():
        setattr(p, k, v)
    return p


def feed(net, batch):
    net.blobs["x"].data[...] = batch[0]
    net.blobs["y"].data[...] = batch[1]


def make(type_name, text="", batch=BATCHES[0], **fields):
    p = solver_param(f'type: "{type_name}" random_seed: 5 ' + text, **fields)
    s = framework.get_solver(p)
    feed(s.net, batch)
    return s


def params(s):
    return [b.data.copy() for b in s.net.learnable_params]


# -- the reference ---------------------------------------------------------------------------

def ref_grads(W, b, x, y):
    """EuclideanLoss(x W^T + b, y) = sum((p - y)^2) / (2N) and its gradients."""
    p = x @ W.T + b
    dp = (p - y) / x.shape[0]
    return float(((p - y) ** 2).sum() / (2 * x.shape[0])), [dp.T @ x, dp.sum(0)]


def ref_lr(p, it):
    base = p.base_lr
    pol = p.lr_policy
    if pol == "fixed":
        return base
    if pol == "step":
        return base * p.gamma ** (it // p.stepsize)
    if pol == "exp":
        return base * p.gamma ** it
    if pol == "inv":
        return base * (1 + p.gamma * it) ** (-p.power)
    if pol == "multistep":
        return base * p.gamma ** sum(1 for v in p.stepvalue if it >= v)
    if pol == "poly":
        return base * (1 - it / p.max_iter) ** p.power
    if pol == "sigmoid":
        return base / (1 + math.exp(-p.gamma * (it - p.stepsize)))
    raise AssertionError(pol)


class Reference:
    """Caffe's ApplyUpdate in float64: clip -> / iter_size -> regularise -> rule -> w -= step."""

    def __init__(self, type_name, p, W, b):
        self.type, self.p = type_name, p
        self.w = [W.astype(np.float64), b.astype(np.float64)]
        self.h = [np.zeros_like(x) for x in self.w]
        self.h2 = [np.zeros_like(x) for x in self.w]
        self.it = 0
        self.losses = []

    def step(self, batches):
        p = self.p
        g = [np.zeros_like(x) for x in self.w]
        loss = 0.0
        for x, y in batches:  # iter_size forward/backward passes accumulate
            l, gi = ref_grads(self.w[0], self.w[1], x.astype(np.float64), y.astype(np.float64))
            loss += l
            g = [a + c for a, c in zip(g, gi)]
        self.losses.append(loss / len(batches))
        rate = ref_lr(p, self.it)
        if p.clip_gradients >= 0:
            norm = math.sqrt(sum((a ** 2).sum() for a in g))
            if norm > p.clip_gradients:
                g = [a * (p.clip_gradients / norm) for a in g]
        g = [a / p.iter_size for a in g]
        for i in range(2):
            decay = p.weight_decay * DECAY_MULT[i]
            reg = self.w[i] if p.regularization_type == "L2" else np.sign(self.w[i])
            g[i] = g[i] + decay * reg
            lr = rate * LR_MULT[i]
            self.w[i] = self.w[i] - self._rule(i, g[i], lr)
        self.it += 1

    def _rule(self, i, g, lr):
        p, t = self.p, self.type
        if t == "SGD":
            self.h[i] = p.momentum * self.h[i] + lr * g
            return self.h[i]
        if t == "Nesterov":
            old = self.h[i]
            self.h[i] = p.momentum * old + lr * g
            return (1 + p.momentum) * self.h[i] - p.momentum * old
        if t == "AdaGrad":
            self.h[i] = self.h[i] + g * g
            return lr * g / (np.sqrt(self.h[i]) + p.delta)
        if t == "RMSProp":
            self.h[i] = p.rms_decay * self.h[i] + (1 - p.rms_decay) * g * g
            return lr * g / (np.sqrt(self.h[i]) + p.delta)
        if t == "AdaDelta":
            self.h[i] = p.momentum * self.h[i] + (1 - p.momentum) * g * g
            u = g * np.sqrt((self.h2[i] + p.delta) / (self.h[i] + p.delta))
            self.h2[i] = p.momentum * self.h2[i] + (1 - p.momentum) * u * u
            return lr * u
        if t == "Adam":
            b1, b2, n = p.momentum, p.momentum2, self.it + 1
            self.h[i] = b1 * self.h[i] + (1 - b1) * g
            self.h2[i] = b2 * self.h2[i] + (1 - b2) * g * g
            return lr * math.sqrt(1 - b2 ** n) / (1 - b1 ** n) * self.h[i] / (np.sqrt(self.h2[i]) + p.delta)
        raise AssertionError(t)


def assert_matches(s, ref, what=""):
    for got, want in zip(params(s), ref.w):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6, err_msg=what)


# -- every solver type against the reference ----------------------------------------------------

@pytest.mark.parametrize("type_name", list(CONFIGS))
def test_solver_matches_reference(type_name):
    s = make(type_name, CONFIGS[type_name])
    assert type(s) is CLASSES[type_name]
    ref = Reference(type_name, s.param, *params(s))
    for it in range(6):
        s.step(1)
        ref.step([BATCHES[0]])
        assert s.iter == it + 1
        assert_matches(s, ref, f"{type_name} after iteration {it}")
    # the history has Caffe's layout: N blobs, or 2N for AdaDelta / Adam (first group h, then h2)
    n = len(s.net.learnable_params)
    assert len(s.history) == (2 * n if type_name in ("AdaDelta", "Adam") else n)
    if type_name in ("SGD", "AdaGrad", "RMSProp", "Adam", "AdaDelta"):
        for got, want in zip(s.history[:n], ref.h):
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
    if type_name in ("AdaDelta", "Adam"):
        for got, want in zip(s.history[n:], ref.h2):
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-9)


def test_sgd_first_update_by_hand():
    """One SGD step written out: w1 = w0 - (lr*lr_mult*(g + wd*decay_mult*w0)) with zero history."""
    s = make("SGD", 'base_lr: 0.1 momentum: 0.9 weight_decay: 0.1 lr_policy: "fixed"')
    W0, b0 = params(s)
    _, (gW, gb) = ref_grads(W0.astype(np.float64), b0.astype(np.float64), *BATCHES[0])
    s.step(1)
    np.testing.assert_allclose(s.net.learnable_params[0].data, W0 - 0.1 * (gW + 0.1 * W0), rtol=1e-5)
    np.testing.assert_allclose(s.net.learnable_params[1].data, b0 - 0.2 * (gb + 0.05 * b0), rtol=1e-5)
    # with momentum the second step is 0.9*h + lr*g
    h = [0.1 * (gW + 0.1 * W0), 0.2 * (gb + 0.05 * b0)]
    W1, b1 = params(s)
    _, (gW, gb) = ref_grads(W1.astype(np.float64), b1.astype(np.float64), *BATCHES[0])
    s.step(1)
    np.testing.assert_allclose(s.net.learnable_params[0].data, W1 - (0.9 * h[0] + 0.1 * (gW + 0.1 * W1)),
                               rtol=1e-5)
    assert s.history[0].dtype == np.float32


@pytest.mark.parametrize("type_name", ["SGD", "Adam"])
def test_iter_size_accumulates_and_averages(type_name):
    """iter_size 3: three different batches accumulate, the gradient and the loss are averaged."""
    s = make(type_name, CONFIGS[type_name] + " iter_size: 3 display: 1 average_loss: 1")
    calls = []
    original = s.net.forward_backward

    def forward_backward():
        feed(s.net, BATCHES[len(calls) % 3])
        calls.append(1)
        return original()

    s.net.forward_backward = forward_backward
    ref = Reference(type_name, s.param, *params(s))
    for _ in range(3):
        s.step(1)
        ref.step(BATCHES)
        assert_matches(s, ref)
        assert s.smoothed_loss == pytest.approx(ref.losses[-1], rel=1e-5)
    assert len(calls) == 9


@pytest.mark.parametrize("type_name", ["SGD", "Nesterov", "RMSProp"])
def test_clip_gradients(type_name, caplog):
    """The global L2 norm over all parameters is clipped before the iter_size division."""
    s = make(type_name, CONFIGS[type_name] + " clip_gradients: 0.05 iter_size: 2")
    ref = Reference(type_name, s.param, *params(s))
    with caplog.at_level(logging.INFO, logger="framework"):
        for _ in range(4):
            s.step(1)
            ref.step([BATCHES[0], BATCHES[0]])
            assert_matches(s, ref)
    assert "Gradient clipping: scaling down gradients (L2 norm" in caplog.text
    assert "> 0.05) by scale factor" in caplog.text


def test_clip_gradients_not_applied_below_threshold():
    s = make("SGD", CONFIGS["SGD"] + " clip_gradients: 1e6")
    ref = Reference("SGD", s.param, *params(s))
    s.step(2)
    ref.step([BATCHES[0]])
    ref.step([BATCHES[0]])
    assert_matches(s, ref)


def test_lr_mult_zero_freezes_and_decay_mult_zero_skips_decay():
    net = NET.replace("param { lr_mult: 2 decay_mult: 0.5 }", "param { lr_mult: 0 decay_mult: 0 }")
    s = framework.get_solver(solver_param('base_lr: 0.1 momentum: 0.9 weight_decay: 0.5 lr_policy: "fixed"',
                                          net=net))
    feed(s.net, BATCHES[0])
    b0 = s.net.learnable_params[1].data.copy()
    s.step(3)
    np.testing.assert_array_equal(s.net.learnable_params[1].data, b0)
    assert s.net.params_lr == [1.0, 0.0]


# -- learning-rate policies ------------------------------------------------------------------

POLICY_SETTINGS = {
    "fixed": "",
    "step": "gamma: 0.5 stepsize: 3",
    "exp": "gamma: 0.95",
    "inv": "gamma: 0.0001 power: 0.75",
    "multistep": "gamma: 0.1 stepvalue: 3 stepvalue: 7 stepvalue: 8",
    "poly": "power: 1.5 max_iter: 20",
    "sigmoid": "gamma: 0.5 stepsize: 6",
}


@pytest.mark.parametrize("policy", list(POLICY_SETTINGS))
def test_lr_policy_values(policy):
    p = solver_param(f'base_lr: 0.02 lr_policy: "{policy}" {POLICY_SETTINGS[policy]}', net=None)
    step = 0
    for it in range(20):
        rate, step = learning_rate(p, it, step)
        assert isinstance(rate, np.float32)
        assert float(rate) == pytest.approx(ref_lr(p, it), rel=2e-6), (policy, it)
    if policy == "multistep":
        assert step == 3
    if policy == "step":
        assert step == 19 // 3


def test_lr_policy_used_by_the_solver(caplog):
    """The rate each iteration uses is logged as 'Iteration N, lr = ...'."""
    s = make("SGD", 'base_lr: 0.02 lr_policy: "step" gamma: 0.5 stepsize: 2 display: 1')
    with caplog.at_level(logging.INFO, logger="framework"):
        s.step(5)
    for it in range(5):
        assert f"Iteration {it}, lr = {0.02 * 0.5 ** (it // 2):g}" in caplog.text
    assert s.current_step == 2


def test_multistep_logs_and_keeps_current_step(caplog):
    s = make("SGD", 'base_lr: 0.1 lr_policy: "multistep" gamma: 0.1 stepvalue: 1 stepvalue: 3')
    with caplog.at_level(logging.INFO, logger="framework"):
        s.step(4)
    assert "MultiStep Status: Iteration 1, step = 1" in caplog.text
    assert "MultiStep Status: Iteration 3, step = 2" in caplog.text
    assert s.current_step == 2


@pytest.mark.parametrize("policy,settings,field", [
    ("step", "gamma: -0.1 stepsize: 2", "gamma"),
    ("exp", "gamma: -1", "gamma"),
    ("inv", "gamma: -0.5 power: 1", "gamma"),
    ("multistep", "gamma: -0.1 stepvalue: 3", "gamma"),
    ("sigmoid", "gamma: -0.1 stepsize: 3", "gamma"),
    ("step", "gamma: 0.1 stepsize: 0", "stepsize"),
    ("step", "gamma: 0.1", "stepsize"),
    ("sigmoid", "gamma: 0.1 stepsize: -3", "stepsize"),
])
def test_lr_policy_checks(policy, settings, field):
    p = solver_param(f'base_lr: 0.1 lr_policy: "{policy}" {settings}', net=None)
    with pytest.raises(LRPolicyError, match=field):
        learning_rate(p, 0)
    with pytest.raises(SolverError, match=f"lr_policy '{policy}' needs {field}"):
        framework.get_solver(solver_param(f'base_lr: 0.1 lr_policy: "{policy}" {settings}'))


def test_lr_policy_gamma_zero_allowed_for_step():
    p = solver_param('base_lr: 0.1 lr_policy: "step" gamma: 0 stepsize: 1', net=None)
    assert learning_rate(p, 0)[0] == np.float32(0.1)
    assert learning_rate(p, 1)[0] == 0


def test_unknown_and_missing_lr_policy():
    with pytest.raises(SolverError, match="unknown lr_policy 'cosine'"):
        framework.get_solver(solver_param('base_lr: 0.1 lr_policy: "cosine"'))
    with pytest.raises(SolverError, match="lr_policy is not set"):
        framework.get_solver(solver_param('base_lr: 0.1'))


# -- snapshot / restore ----------------------------------------------------------------------

@pytest.mark.parametrize("type_name", list(CONFIGS))
def test_snapshot_restore_is_bit_identical(type_name, tmp_path):
    prefix = str(tmp_path / "snap")
    text = CONFIGS[type_name] + f' snapshot_prefix: "{prefix}"'
    full = make(type_name, text)
    init = params(full)
    full.step(6)

    first = make(type_name, text)
    for blob, w in zip(first.net.learnable_params, init):
        blob.data[...] = w
    first.step(3)
    state = first.snapshot()
    assert state == prefix + "_iter_3.solverstate"
    assert os.path.isfile(prefix + "_iter_3.caffemodel")

    resumed = make(type_name, text, random_seed=99)   # different initial weights: restore overwrites
    resumed.restore(state)
    assert resumed.iter == 3
    assert resumed.current_step == first.current_step
    resumed.step(3)
    assert resumed.iter == 6
    for a, b in zip(params(resumed), params(full)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(resumed.history, full.history):
        np.testing.assert_array_equal(a, b)


def test_solverstate_contents(tmp_path):
    prefix = str(tmp_path / "m")
    s = make("Adam", CONFIGS["Adam"] + f' snapshot_prefix: "{prefix}"')
    s.step(3)
    s.snapshot()
    state = caffe_io.read_binary_proto(prefix + "_iter_3.solverstate", caffe_pb2.SolverState)
    assert state.iter == 3
    assert state.learned_net == prefix + "_iter_3.caffemodel"
    assert state.current_step == 1
    assert len(state.history) == 4
    np.testing.assert_array_equal(caffe_io.blob_to_array(state.history[2]), s.history[2])
    assert tuple(state.history[0].shape.dim) == (2, 3)
    weights = caffe_io.read_binary_proto(prefix + "_iter_3.caffemodel", caffe_pb2.NetParameter)
    ip = [l for l in weights.layer if l.name == "ip"][0]
    np.testing.assert_array_equal(caffe_io.blob_to_array(ip.blobs[0]), s.net.params["ip"][0].data)
    assert not ip.blobs[0].diff  # snapshot_diff defaults to false


@pytest.mark.parametrize("type_name", ["SGD", "Adam"])
def test_hdf5_snapshot_restore(type_name, tmp_path):
    h5py = pytest.importorskip("h5py")
    prefix = str(tmp_path / "h")
    text = CONFIGS[type_name] + f' snapshot_prefix: "{prefix}" snapshot_format: HDF5'
    full = make(type_name, text)
    init = params(full)
    full.step(4)
    first = make(type_name, text)
    for blob, w in zip(first.net.learnable_params, init):
        blob.data[...] = w
    first.step(2)
    state = first.snapshot()
    assert state == prefix + "_iter_2.solverstate.h5"
    with h5py.File(prefix + "_iter_2.caffemodel.h5", "r") as f:
        assert set(f["data"]) == {"in", "ip", "loss"}
        np.testing.assert_array_equal(f["data/ip/0"][()], first.net.params["ip"][0].data)
        assert f["data/ip/1"].dtype == np.float32 and "diff" not in f
    with h5py.File(state, "r") as f:
        assert f["iter"].shape == (1,) and int(f["iter"][0]) == 2
        assert f["learned_net"][()].decode() == prefix + "_iter_2.caffemodel.h5"
        assert len(f["history"]) == len(first.history)
        np.testing.assert_array_equal(f["history/1"][()], first.history[1])
    resumed = make(type_name, text, random_seed=11)
    resumed.restore(state)
    resumed.step(2)
    for a, b in zip(params(resumed), params(full)):
        np.testing.assert_array_equal(a, b)



def test_net_copy_from_reads_hdf5_snapshot(tmp_path):
    pytest.importorskip("h5py")
    prefix = str(tmp_path / "w")
    trained = make("SGD", CONFIGS["SGD"] + f' snapshot_prefix: "{prefix}" snapshot_format: HDF5')
    trained.step(3)
    trained.snapshot()
    fresh = make("SGD", CONFIGS["SGD"], random_seed=5)
    assert not np.array_equal(fresh.net.params["ip"][0].data, trained.net.params["ip"][0].data)
    fresh.net.copy_from(prefix + "_iter_3.caffemodel.h5")
    for a, b in zip(params(fresh), params(trained)):
        np.testing.assert_array_equal(a, b)

def test_snapshot_diff_writes_diffs(tmp_path):
    prefix = str(tmp_path / "d")
    s = make("SGD", CONFIGS["SGD"] + f' snapshot_prefix: "{prefix}" snapshot_diff: true')
    s.step(1)
    s.snapshot()
    weights = caffe_io.read_binary_proto(prefix + "_iter_1.caffemodel", caffe_pb2.NetParameter)
    ip = [l for l in weights.layer if l.name == "ip"][0]
    np.testing.assert_array_equal(caffe_io.blob_to_array(ip.blobs[0], diff=True), s.net.params["ip"][0].diff)


def test_restore_finds_learned_net_beside_the_state(tmp_path, monkeypatch):
    """learned_net is relative to the CWD in Caffe; if absent there, the state's folder is tried."""
    monkeypatch.chdir(tmp_path)
    s = make("SGD", CONFIGS["SGD"] + ' snapshot_prefix: "run"')
    s.step(2)
    s.snapshot()
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("run_iter_2.caffemodel", "run_iter_2.solverstate"):
        shutil.move(str(tmp_path / name), str(moved / name))
    other = make("SGD", CONFIGS["SGD"], random_seed=42)
    other.restore(str(moved / "run_iter_2.solverstate"))
    for a, b in zip(params(other), params(s)):
        np.testing.assert_array_equal(a, b)
    os.remove(moved / "run_iter_2.caffemodel")
    with pytest.raises(SolverError, match="run_iter_2.caffemodel.*not found"):
        other.restore(str(moved / "run_iter_2.solverstate"))


def test_restore_errors(tmp_path):
    prefix = str(tmp_path / "e")
    sgd = make("SGD", CONFIGS["SGD"] + f' snapshot_prefix: "{prefix}"')
    sgd.step(1)
    state = sgd.snapshot()
    adam = make("Adam", CONFIGS["Adam"])
    with pytest.raises(SolverError, match="Incorrect length of history blobs"):
        adam.restore(state)
    with pytest.raises(SolverError, match="solver state file not found"):
        sgd.restore(str(tmp_path / "nope.solverstate"))
    bad = tmp_path / "bad.solverstate"
    bad.write_bytes(b"\xff\xff\xff garbage")
    with pytest.raises(framework.CaffeError, match="bad.solverstate"):
        sgd.restore(str(bad))


def test_solve_snapshots_and_logs_like_caffe(tmp_path, caplog):
    prefix = str(tmp_path / "lg")
    s = framework.get_solver(solver_param(
        f'base_lr: 0.01 momentum: 0.9 lr_policy: "fixed" display: 2 max_iter: 5 snapshot: 2 '
        f'snapshot_prefix: "{prefix}" test_iter: 1 test_interval: 4 test_initialization: false'))
    feed(s.net, BATCHES[0])
    feed(s.test_nets[0], BATCHES[1])
    with caplog.at_level(logging.INFO, logger="framework"):
        s.solve()
    text = caplog.text
    assert "Solving tiny" in text and "Learning Rate Policy: fixed" in text
    assert "Iteration 0, Testing net (#0)" not in text          # test_initialization: false
    assert "Iteration 4, Testing net (#0)" in text
    lines = [r.getMessage() for r in caplog.records]
    display = [l for l in lines if l.startswith("Iteration 2 (")]
    assert len(display) == 1 and " iter/s, " in display[0] and "s/2 iters), loss = " in display[0]
    train_out = [l for l in lines if l.startswith("    Train net output #0: loss = ")]
    assert len(train_out) == 3 and train_out[0].endswith(" loss)") and "(* 1 = " in train_out[0]
    assert "Iteration 2, lr = 0.01" in lines
    assert f"Snapshotting to binary proto file {prefix}_iter_2.caffemodel" in lines
    assert f"Snapshotting solver state to binary proto file {prefix}_iter_4.solverstate" in lines
    # snapshot_after_train at 5 (not a multiple of 2); no display after the last step (5 % 2 != 0)
    assert os.path.isfile(prefix + "_iter_5.caffemodel")
    assert lines[-1] == "Optimization Done."
    # the test net shares the trained weights: its loss is the reference loss on BATCHES[1]
    test_line = [l for l in lines if l.startswith("    Test net output #0: loss = ")]
    assert len(test_line) == 1


def test_test_net_output_means_and_weight_sharing(caplog):
    s = framework.get_solver(solver_param('base_lr: 0.1 lr_policy: "fixed" test_iter: 3 test_interval: 100 '
                                          'test_compute_loss: true'))
    feed(s.net, BATCHES[0])
    feed(s.test_nets[0], BATCHES[2])
    s.step(2)
    W, b = params(s)
    want, _ = ref_grads(W.astype(np.float64), b.astype(np.float64), *BATCHES[2])
    with caplog.at_level(logging.INFO, logger="framework"):
        means = s.test(0)
    assert means["loss"] == pytest.approx(want, rel=1e-5)
    assert f"Test loss: {np.float32(want):g}" in caplog.text
    assert s.mean_scores[0] == [pytest.approx(want, rel=1e-5)]
    assert s.test_nets[0].params["ip"][0] is s.net.params["ip"][0]


def test_display_smooths_loss_over_average_loss(caplog):
    s = make("SGD", 'base_lr: 0.05 lr_policy: "fixed" display: 1 average_loss: 3')
    ref = Reference("SGD", s.param, *params(s))
    with caplog.at_level(logging.INFO, logger="framework"):
        s.step(5)
    for _ in range(5):
        ref.step([BATCHES[0]])
    assert float(s.smoothed_loss) == pytest.approx(np.mean(ref.losses[-3:]), rel=1e-5)
    msgs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Iteration 1 (")]
    assert msgs[0].endswith(f"loss = {np.float32(np.mean(ref.losses[:2])):g}")


def test_stop_and_snapshot_actions(tmp_path, caplog):
    prefix = str(tmp_path / "act")
    s = make("SGD", CONFIGS["SGD"] + f' max_iter: 10 snapshot_prefix: "{prefix}"')
    actions = iter(["none", "snapshot", "none", "stop"])
    s.set_action_function(lambda: next(actions, "none"))
    with caplog.at_level(logging.INFO, logger="framework"):
        s.solve()
    assert s.iter == 4
    assert os.path.isfile(prefix + "_iter_2.solverstate")    # SNAPSHOT request
    assert os.path.isfile(prefix + "_iter_4.solverstate")    # STOP, then snapshot_after_train
    assert "Optimization stopped early." in caplog.text
    assert "Optimization Done." not in caplog.text


def test_callbacks_and_lr_property():
    s = make("SGD", 'base_lr: 0.1 lr_policy: "inv" gamma: 0.5 power: 1')
    events = []
    s.add_callback(lambda: events.append(("start", s.iter)), lambda: events.append(("ready", s.iter)))
    s.step(2)
    assert events == [("start", 0), ("ready", 0), ("start", 1), ("ready", 1)]
    assert s.lr == pytest.approx(0.1 / (1 + 0.5 * 2))


def test_debug_info_logs_layers(caplog):
    s = make("SGD", CONFIGS["SGD"] + " display: 1 debug_info: true")
    with caplog.at_level(logging.INFO, logger="framework"):
        s.step(1)
    assert "    [Forward] Layer ip, top blob p data: " in caplog.text
    assert "    [Backward] Layer ip, param blob 0 diff: " in caplog.text
    assert "    [Update] Layer ip, param 1 data: " in caplog.text


# -- solver definitions ----------------------------------------------------------------------

def test_random_seed_makes_initial_weights_reproducible():
    a, b = make("SGD", CONFIGS["SGD"]), make("SGD", CONFIGS["SGD"])
    c = make("SGD", CONFIGS["SGD"], random_seed=6)
    for x, y, z in zip(params(a), params(b), params(c)):
        np.testing.assert_array_equal(x, y)
        assert not np.array_equal(x, z)


def test_legacy_solver_type_enum():
    p = solver_param(CONFIGS["Adam"])
    p.solver_type = caffe_pb2.SolverParameter.ADAM
    assert type(framework.get_solver(p)) is framework.AdamSolver
    p.type = "Adam"
    with pytest.raises(framework.CaffeError, match="solver_type"):
        framework.get_solver(p)


def test_class_constructors_and_unknown_type():
    s = framework.NesterovSolver(solver_param(CONFIGS["SGD"]))
    assert isinstance(s, framework.NesterovSolver)
    with pytest.raises(SolverError, match="unknown solver type 'LBFGS'.*known types: .*Adam"):
        framework.get_solver(solver_param('type: "LBFGS" base_lr: 0.1 lr_policy: "fixed"'))


@pytest.mark.parametrize("text,match", [
    ('type: "AdaGrad" momentum: 0.9', "Momentum cannot be used with AdaGrad"),
    ('type: "RMSProp" momentum: 0.5', "Momentum cannot be used with RMSProp"),
    ('type: "RMSProp" rms_decay: 1', "rms_decay should lie between 0 and 1"),
    ("average_loss: 0", "average_loss should be >= 1"),
    ("iter_size: 0", "iter_size should be >= 1"),
    ('weight_decay: 0.1 regularization_type: "L3"', "unknown regularization_type 'L3'"),
    ("test_iter: 2", "test_interval must be > 0"),
    ("test_iter: 1 test_interval: 5 test_state { stage: 'a' } test_state { stage: 'b' }",
     "test_state must be unspecified or specified once per test net"),
])
def test_bad_solver_settings(text, match):
    with pytest.raises(SolverError, match=match):
        framework.get_solver(solver_param('base_lr: 0.1 lr_policy: "fixed" ' + text))


def test_net_field_errors(tmp_path, monkeypatch):
    with pytest.raises(SolverError, match="must specify a train net using one of these fields"):
        framework.get_solver(solver_param('base_lr: 0.1 lr_policy: "fixed"', net=None))
    p = solver_param('base_lr: 0.1 lr_policy: "fixed" train_net: "a.prototxt"')
    with pytest.raises(SolverError, match="must not contain more than one.*net_param, train_net"):
        framework.get_solver(p)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SolverError, match="net file 'missing.prototxt' \\(solver field net\\) not found"):
        framework.get_solver(solver_param('base_lr: 0.1 lr_policy: "fixed" net: "missing.prototxt"', net=None))
    (tmp_path / "train.prototxt").write_text(NET)
    p = solver_param('base_lr: 0.1 lr_policy: "fixed" train_net: "train.prototxt" test_iter: 1 '
                     'test_interval: 3', net=None)
    with pytest.raises(SolverError, match="test_iter must be specified for each test network"):
        framework.get_solver(p)


def test_snapshot_prefix_checks(tmp_path):
    with pytest.raises(SolverError, match="Cannot write to snapshot prefix"):
        framework.get_solver(solver_param(
            f'base_lr: 0.1 lr_policy: "fixed" snapshot: 5 snapshot_prefix: "{tmp_path}/no/such/dir/x"'))
    with pytest.raises(SolverError, match="snapshot is specified but snapshot_prefix is not"):
        framework.get_solver(solver_param('base_lr: 0.1 lr_policy: "fixed" snapshot: 5'))


def test_solver_file_paths_states_and_prefix_default(tmp_path, monkeypatch):
    """Nets by path (relative to the CWD), test nets per test_iter, NetState merging, default prefix."""
    monkeypatch.chdir(tmp_path)
    staged = NET + """
layer { name: "extra" type: "Power" bottom: "p" top: "q" include { stage: "more" } }
layer { name: "lvl" type: "Power" bottom: "p" top: "r" include { min_level: 2 } }
"""
    (tmp_path / "net.prototxt").write_text(staged)
    (tmp_path / "outdir").mkdir()
    (tmp_path / "solver.prototxt").write_text(
        'net: "net.prototxt" base_lr: 0.1 lr_policy: "fixed" test_iter: 1 test_iter: 2 test_interval: 10 '
        'train_state { stage: "more" } test_state { level: 2 } test_state { stage: "more" level: 1 }')
    s = framework.get_solver("solver.prototxt")
    assert s.param.snapshot_prefix == "solver"
    assert "extra" in s.net.layer_names and "lvl" not in s.net.layer_names
    assert s.net.phase == caffe_pb2.TRAIN
    assert len(s.test_nets) == 2
    assert "lvl" in s.test_nets[0].layer_names and "extra" not in s.test_nets[0].layer_names
    assert "extra" in s.test_nets[1].layer_names and "lvl" not in s.test_nets[1].layer_names
    assert all(n.phase == caffe_pb2.TEST for n in s.test_nets)
    (tmp_path / "s2.prototxt").write_text('net: "net.prototxt" base_lr: 0.1 lr_policy: "fixed" '
                                          'snapshot_prefix: "outdir"')
    assert framework.SGDSolver("s2.prototxt").param.snapshot_prefix == os.path.join("outdir", "s2")
    with pytest.raises(SolverError, match="solver file not found: nothere.prototxt"):
        framework.get_solver("nothere.prototxt")


def test_solver_weights_field(tmp_path):
    src = make("SGD", CONFIGS["SGD"] + f' snapshot_prefix: "{tmp_path}/w"')
    src.step(2)
    src.snapshot()
    p = solver_param(CONFIGS["SGD"] + f' weights: "{tmp_path}/w_iter_2.caffemodel" test_iter: 1 test_interval: 5',
                     random_seed=123)
    s = framework.get_solver(p)
    np.testing.assert_array_equal(s.net.params["ip"][0].data, src.net.params["ip"][0].data)
    np.testing.assert_array_equal(s.test_nets[0].params["ip"][1].data, src.net.params["ip"][1].data)
    p.ClearField("weights")
    p.weights.append(str(tmp_path / "absent.caffemodel"))
    with pytest.raises(SolverError, match="weights file not found"):
        framework.get_solver(p)


# -- a real Caffe snapshot -------------------------------------------------------------------

def test_restore_caffe_written_solverstate(shared_dir, tmp_path, monkeypatch):
    """lenet_iter_20.solverstate (written by Caffe) restores and training continues from 21."""
    folder = tmp_path / "fx"
    shutil.copytree(os.path.join(shared_dir, "caffe-fixtures"), folder)
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            os.chmod(os.path.join(root, name), 0o755)
    monkeypatch.chdir(folder)
    s = framework.get_solver("lenet_solver.prototxt")
    assert type(s) is framework.SGDSolver
    s.restore("lenet_iter_20.solverstate")
    assert s.iter == 20 and s.current_step == 0
    weights = caffe_io.read_binary_proto("lenet_iter_20.caffemodel", caffe_pb2.NetParameter)
    by_name = {l.name: l for l in weights.layer}
    for name in ("conv1", "conv2", "ip1", "ip2"):
        for blob, proto in zip(s.net.params[name], by_name[name].blobs):
            np.testing.assert_array_equal(blob.data, caffe_io.blob_to_array(proto).reshape(blob.shape))
    state = caffe_io.read_binary_proto("lenet_iter_20.solverstate", caffe_pb2.SolverState)
    for h, proto in zip(s.history, state.history):
        np.testing.assert_array_equal(h, caffe_io.blob_to_array(proto).reshape(h.shape))

    # the expected first update: the data restarts at the first batch, as in Caffe
    check = framework.Net("lenet_train.prototxt", framework.TRAIN)
    check.copy_from("lenet_iter_20.caffemodel")
    check.clear_param_diffs()
    check.forward_backward()
    w = [b.data.astype(np.float64) for b in check.learnable_params]
    g = [b.diff.astype(np.float64) for b in check.learnable_params]
    lr = 0.01 * (1 + 0.0001 * 20) ** -0.75
    expected = [wi - (0.9 * h + lr * m * (gi + 0.0005 * wi))
                for wi, gi, h, m in zip(w, g, s.history, check.params_lr)]
    s.step(1)
    assert s.iter == 21
    for blob, want in zip(s.net.learnable_params, expected):
        np.testing.assert_allclose(blob.data, want, rtol=1e-4, atol=1e-6)


class _LoopSGD(framework.SGDSolver):
    """SGDSolver's update through the per-step loop (normalize, regularize,
    compute_update_value, Net.update), which the blocked path must equal bit for bit."""


@pytest.mark.parametrize("text", [
    'base_lr: 0.05 momentum: 0.9 weight_decay: 0.01 lr_policy: "fixed"',
    'base_lr: 0.05 momentum: 0.8 weight_decay: 0.02 regularization_type: "L1" lr_policy: "inv" '
    'gamma: 0.1 power: 0.75 iter_size: 2',
    'base_lr: 0.1 momentum: 0 weight_decay: 0 lr_policy: "fixed" clip_gradients: 0.05'])
def test_sgd_blocked_update_equals_the_step_by_step_update(monkeypatch, text):
    from layers import parallel
    monkeypatch.setattr(parallel, "BLOCK_BYTES", 8)  # several blocks in each 2x3 weight
    results = []
    for cls in (framework.SGDSolver, _LoopSGD):
        p = solver_param('type: "SGD" random_seed: 5 ' + text)
        s = cls(p)
        feed(s.net, BATCHES[0])
        for batch in BATCHES:
            feed(s.net, batch)
            s.step(1)
        results.append([b.data.copy() for b in s.net.learnable_params] + [h.copy() for h in s.history])
    assert any(np.abs(a).max() > 0 for a in results[0])
    for got, want in zip(*results):
        np.testing.assert_array_equal(got, want)
