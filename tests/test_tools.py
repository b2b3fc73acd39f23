"""tools/train.py and tools/test.py end to end (Caffe's ``caffe train`` / ``caffe test``).

The nets are small: the 200 Caffe-converted digits of the shared fixtures (mnist_200_lmdb) through
one InnerProduct layer.  The TRAIN batch holds all 200 digits, so every batch is the same and a
resumed run must equal an uninterrupted one bit for bit (Caffe restarts data sources on restore).
"""
import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import framework
from framework import io as caffe_io
from framework import logging_util
from proto import caffe_pb2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_tool = _load_tool("train")
test_tool = _load_tool("test")

NET = """name: "mlp"
layer { name: "mnist" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { scale: 0.00390625 } data_param { source: "mnist_200_lmdb" batch_size: 200 backend: LMDB } }
layer { name: "mnist" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { scale: 0.00390625 } data_param { source: "mnist_200_lmdb" batch_size: 50 backend: LMDB } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  param { lr_mult: 1 } param { lr_mult: 2 }
  inner_product_param { num_output: 10 weight_filler { type: "xavier" } bias_filler { type: "constant" } } }
layer { name: "staged" type: "Power" bottom: "ip" top: "staged" include { stage: "extra" } }
layer { name: "leveled" type: "Power" bottom: "ip" top: "leveled" include { min_level: 3 } }
layer { name: "accuracy" type: "Accuracy" bottom: "ip" bottom: "label" top: "accuracy" include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""

SOLVER = """net: "mlp.prototxt"
test_iter: 2
test_interval: 4
base_lr: 0.1
momentum: 0.9
weight_decay: 0.0005
lr_policy: "inv"
gamma: 0.0001
power: 0.75
display: 2
max_iter: 6
snapshot: 3
snapshot_prefix: "mlp"
random_seed: 1701
"""


@pytest.fixture
def workdir(shared_dir, tmp_path, monkeypatch):
    """A folder with mnist_200_lmdb, mlp.prototxt and solver.prototxt; the CWD for the test."""
    src = os.path.join(shared_dir, "caffe-fixtures", "mnist_200_lmdb")
    dst = tmp_path / "mnist_200_lmdb"
    shutil.copytree(src, dst)
    for name in os.listdir(dst):
        os.chmod(dst / name, 0o644)
    (tmp_path / "mlp.prototxt").write_text(NET)
    (tmp_path / "solver.prototxt").write_text(SOLVER)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(tool, args, capsys):
    """Run a tool's main(); return (exit status, captured stderr); drop the tool's log handler."""
    capsys.readouterr()
    try:
        code = tool.main(args)
    finally:
        if logging_util._installed_handler is not None:
            logging.getLogger().removeHandler(logging_util._installed_handler)
            logging_util._installed_handler = None
    return code, capsys.readouterr().err


def weights_of(path):
    param = caffe_io.read_binary_proto(path, caffe_pb2.NetParameter)
    return {l.name: [caffe_io.blob_to_array(b) for b in l.blobs] for l in param.layer if l.blobs}


def assert_one_error_line(err, *fragments):
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("E")]
    assert len(errors) == 1, err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


# -- train -------------------------------------------------------------------------------------

def test_train_end_to_end(workdir, capsys):
    code, err = run(train_tool, ["--solver", "solver.prototxt"], capsys)
    assert code == 0, err
    for it in (3, 6):
        assert (workdir / f"mlp_iter_{it}.caffemodel").is_file()
        assert (workdir / f"mlp_iter_{it}.solverstate").is_file()
    for fragment in ("Starting Optimization", "Solving mlp", "Iteration 0, Testing net (#0)",
                     "    Test net output #0: accuracy = ", "    Test net output #1: loss = ",
                     "Iteration 2 (", "    Train net output #0: loss = ", "Iteration 4, lr = ",
                     "Snapshotting to binary proto file mlp_iter_3.caffemodel",
                     "Snapshotting solver state to binary proto file mlp_iter_6.solverstate",
                     "Iteration 6, loss = ", "Optimization Done."):
        assert fragment in err, fragment
    # glog-style prefix on every log line (the solver's multi-line parameter dump aside)
    logged = [line for line in err.splitlines() if "Iteration " in line or "net output #" in line]
    assert logged and all(line[0] == "I" and ".py:" in line and "] " in line for line in logged)
    state = caffe_io.read_binary_proto("mlp_iter_6.solverstate", caffe_pb2.SolverState)
    assert state.iter == 6 and state.learned_net == "mlp_iter_6.caffemodel"


def test_train_resume_equals_uninterrupted(workdir, capsys):
    code, err = run(train_tool, ["--solver", "solver.prototxt"], capsys)
    assert code == 0, err
    full = weights_of("mlp_iter_6.caffemodel")
    os.remove("mlp_iter_6.caffemodel")
    os.remove("mlp_iter_6.solverstate")
    code, err = run(train_tool, ["--solver", "solver.prototxt", "--snapshot", "mlp_iter_3.solverstate"], capsys)
    assert code == 0, err
    assert "Resuming from mlp_iter_3.solverstate" in err
    assert "Iteration 0" not in err and "Iteration 4, Testing net (#0)" in err
    resumed = weights_of("mlp_iter_6.caffemodel")
    for name in full:
        for a, b in zip(full[name], resumed[name]):
            np.testing.assert_array_equal(a, b)


def test_train_finetune_with_weights(workdir, capsys):
    code, err = run(train_tool, ["--solver", "solver.prototxt", "--iterations", "3"], capsys)
    assert code == 0, err
    source = weights_of("mlp_iter_3.caffemodel")
    (workdir / "ft").mkdir()
    (workdir / "ft.prototxt").write_text(SOLVER.replace('snapshot_prefix: "mlp"', 'snapshot_prefix: "ft/x"')
                                        .replace("snapshot: 3", "snapshot: 0"))
    # --iterations 0: no update, so the final snapshot holds exactly the copied weights
    code, err = run(train_tool, ["--solver", "ft.prototxt", "--weights", "mlp_iter_3.caffemodel",
                                 "--iterations", "0"], capsys)
    assert code == 0, err
    assert "Finetuning from mlp_iter_3.caffemodel" in err
    copied = weights_of("ft/x_iter_0.caffemodel")
    for a, b in zip(source["ip"], copied["ip"]):
        np.testing.assert_array_equal(a, b)
    # two comma-separated files; training then runs from those weights
    code, err = run(train_tool, ["--solver", "ft.prototxt", "--weights",
                                 "mlp_iter_3.caffemodel,ft/x_iter_0.caffemodel", "--iterations", "2"], capsys)
    assert code == 0, err
    assert "Finetuning from ft/x_iter_0.caffemodel" in err
    assert (workdir / "ft" / "x_iter_2.caffemodel").is_file()


def test_train_threads_splits_the_batch_and_learns_the_same_weights(workdir, capsys):
    code, err = run(train_tool, ["--solver", "solver.prototxt"], capsys)
    assert code == 0, err
    want = weights_of("mlp_iter_6.caffemodel")
    code, err = run(train_tool, ["--solver", "solver.prototxt", "--threads", "2"], capsys)
    assert code == 0, err
    assert "Splitting each batch over 2 replicas of the training net" in err
    got = weights_of("mlp_iter_6.caffemodel")
    assert np.abs(want["ip"][0]).max() > 0
    for name, blobs in want.items():
        for a, b in zip(got[name], blobs):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)


def test_train_stage_level_and_model_flags(workdir):
    args = train_tool.parse_args(["--solver", "solver.prototxt", "--stage", "extra", "--level", "3"])
    solver = train_tool.build_solver(args)
    assert "staged" in solver.net.layer_names and "leveled" in solver.net.layer_names
    assert "staged" not in solver.test_nets[0].layer_names  # caffe train sets train_state only
    solver = train_tool.build_solver(train_tool.parse_args(["--solver", "solver.prototxt", "--stage", "a,extra"]))
    assert "staged" in solver.net.layer_names and "leveled" not in solver.net.layer_names
    (workdir / "other.prototxt").write_text(NET.replace('name: "mlp"', 'name: "other"'))
    solver = train_tool.build_solver(train_tool.parse_args(
        ["--solver", "solver.prototxt", "--model", "other.prototxt", "--iterations", "9"]))
    assert solver.net.name == "other" and solver.test_nets[0].name == "other"
    assert solver.param.max_iter == 9


def test_train_help_mentions_our_flags(capsys):
    capsys.readouterr()
    code, _ = run(train_tool, ["--help"], capsys)
    assert code == 0
    help_text = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train.py"), "--help"],
                               capture_output=True, text=True).stdout
    assert "--iterations" in help_text and "max_iter" in help_text and "--sigint_effect" in help_text


@pytest.mark.parametrize("args,fragments", [
    (["--solver", "solver.prototxt", "--weights", "a.caffemodel", "--snapshot", "b.solverstate"],
     ["not both"]),
    ([], ["Need a solver definition"]),
    (["--solver", "nothere.prototxt"], ["solver file (--solver) not found: nothere.prototxt"]),
    (["--solver", "solver.prototxt", "--weights", "missing.caffemodel"],
     ["weights file (--weights) not found: missing.caffemodel"]),
    (["--solver", "solver.prototxt", "--snapshot", "missing.solverstate"],
     ["solver state (--snapshot) not found: missing.solverstate"]),
    (["--solver", "solver.prototxt", "--sigint_effect", "explode"], ["sigint_effect", "explode"]),
    (["--solver", "solver.prototxt", "--gpu", "0"], ["unrecognized arguments: --gpu"]),
    (["--solver", "solver.prototxt", "--iterations", "-2"], ["--iterations must be >= 0"]),
    (["--solver", "solver.prototxt", "--model", "nomodel.prototxt"], ["nomodel.prototxt"]),
])
def test_train_bad_flags(workdir, capsys, args, fragments):
    code, err = run(train_tool, args, capsys)
    assert code == 1
    assert_one_error_line(err, *fragments)


def test_train_bad_files(workdir, capsys):
    (workdir / "broken.prototxt").write_text('net: "mlp.prototxt"\nbase_lr: 0.1\nlr_policy: fixed oops\n')
    code, err = run(train_tool, ["--solver", "broken.prototxt"], capsys)
    assert code == 1
    assert_one_error_line(err, "broken.prototxt:3:")
    (workdir / "wrong.prototxt").write_text(NET.replace("num_output: 10", "num_output: 7"))
    code, err = run(train_tool, ["--solver", "solver.prototxt", "--iterations", "1"], capsys)
    assert code == 0
    code, err = run(train_tool, ["--solver", "solver.prototxt", "--model", "wrong.prototxt",
                                 "--weights", "mlp_iter_1.caffemodel"], capsys)
    assert code == 1
    assert_one_error_line(err, "shape mismatch")
    (workdir / "nonet.prototxt").write_text('net: "absent.prototxt" base_lr: 0.1 lr_policy: "fixed"')
    code, err = run(train_tool, ["--solver", "nonet.prototxt"], capsys)
    assert code == 1
    assert_one_error_line(err, "absent.prototxt")


def test_signal_handler_maps_signals():
    with train_tool.SignalHandler("stop", "snapshot") as handler:
        assert handler.action() == "none"
        os.kill(os.getpid(), signal.SIGHUP)
        assert handler.action() == "snapshot"
        os.kill(os.getpid(), signal.SIGINT)
        assert handler.action() == "stop"
        assert handler.action() == "none"
    with train_tool.SignalHandler("none", "none") as handler:
        os.kill(os.getpid(), signal.SIGINT)
        assert handler.action() == "none"


def test_sighup_snapshots_and_sigint_stops(workdir):
    """A real process: SIGHUP writes a snapshot and training goes on; SIGINT stops (with a snapshot)."""
    (workdir / "long.prototxt").write_text(SOLVER.replace("max_iter: 6", "max_iter: 100000")
                                           .replace("display: 2", "display: 1")
                                           .replace("snapshot: 3", "snapshot: 0")
                                           .replace("test_interval: 4", "test_interval: 100000"))
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "train.py"), "--solver", "long.prototxt"],
                            stderr=subprocess.PIPE, text=True, cwd=workdir)
    seen = []
    try:
        deadline = time.time() + 60
        sent_hup = sent_int = False
        for line in proc.stderr:
            seen.append(line)
            if not sent_hup and "Iteration 3, lr" in line:
                proc.send_signal(signal.SIGHUP)
                sent_hup = True
            elif sent_hup and not sent_int and "Snapshotting solver state" in line:
                proc.send_signal(signal.SIGINT)
                sent_int = True
            assert time.time() < deadline, "training did not react to the signals"
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(seen)
    assert code == 0, text
    assert "Got SIGHUP: requesting snapshot" in text and "Got SIGINT: requesting stop" in text
    assert "Optimization stopped early." in text
    snaps = sorted(int(name.split("_iter_")[1].split(".")[0]) for name in os.listdir(workdir)
                   if name.startswith("mlp_iter_") and name.endswith(".solverstate"))
    assert len(snaps) == 2 and snaps[0] < snaps[1]


# -- test --------------------------------------------------------------------------------------

def test_test_tool_scores(workdir, capsys):
    code, err = run(train_tool, ["--solver", "solver.prototxt", "--iterations", "3"], capsys)
    assert code == 0, err
    code, err = run(test_tool, ["--model", "mlp.prototxt", "--weights", "mlp_iter_3.caffemodel",
                                "--iterations", "3"], capsys)
    assert code == 0, err
    lines = [line.split("] ", 1)[1] for line in err.splitlines() if "] " in line]
    assert "Running for 3 iterations." in lines
    # the reference: the same net, batches 0, 1, 2 of 50 digits
    net = framework.Net("mlp.prototxt", framework.TEST)
    net.copy_from("mlp_iter_3.caffemodel")
    acc, loss = [], []
    for i in range(3):
        net.forward()
        acc.append(float(net.blobs["accuracy"].data))
        loss.append(float(net.blobs["loss"].data))
        assert f"Batch {i}, accuracy = {acc[-1]:g}" in lines
        assert f"Batch {i}, loss = {np.float32(loss[-1]):g}" in lines
    mean_acc, mean_loss = np.float32(np.mean(acc)), np.float32(np.mean(loss))
    assert f"accuracy = {mean_acc:g}" in lines
    assert f"loss = {mean_loss:g} (* 1 = {mean_loss:g} loss)" in lines
    assert f"Loss: {mean_loss:g}" in lines


def test_test_tool_phase_stage_level(workdir, capsys):
    code, err = run(train_tool, ["--solver", "solver.prototxt", "--iterations", "1"], capsys)
    assert code == 0
    code, err = run(test_tool, ["--model", "mlp.prototxt", "--weights", "mlp_iter_1.caffemodel",
                                "--iterations", "1", "--phase", "train", "--stage", "extra", "--level", "3"], capsys)
    assert code == 0, err
    assert "Batch 0, staged = " in err and "Batch 0, leveled = " in err
    assert "accuracy" not in err  # the Accuracy layer is TEST-only


@pytest.mark.parametrize("args,fragments", [
    (["--weights", "w.caffemodel"], ["Need a model definition"]),
    (["--model", "mlp.prototxt"], ["Need model weights"]),
    (["--model", "nothere.prototxt", "--weights", "solver.prototxt"], ["net definition (--model) not found"]),
    (["--model", "mlp.prototxt", "--weights", "nothere.caffemodel"], ["weights file (--weights) not found"]),
    (["--model", "mlp.prototxt", "--weights", "solver.prototxt"], ["solver.prototxt"]),
    (["--model", "mlp.prototxt", "--weights", "x", "--phase", "VAL"], ["phase", "VAL"]),
    (["--model", "mlp.prototxt", "--weights", "x", "--iterations", "0"], ["--iterations must be >= 1"]),
])
def test_test_tool_errors(workdir, capsys, args, fragments):
    code, err = run(test_tool, args, capsys)
    assert code == 1
    assert_one_error_line(err, *fragments)


# -- logging -----------------------------------------------------------------------------------

class _FakeTTY:
    def __init__(self):
        self.parts = []

    def write(self, text):
        self.parts.append(text)

    def flush(self):
        pass

    def isatty(self):
        return True


def test_progress_bar_keeps_log_lines_whole():
    stream = _FakeTTY()
    handler = logging_util.init_logging(stream=stream)
    try:
        with logging_util.ProgressBar(10, stream=stream) as bar:
            bar.update(4)
            logging_util.get_logger("solver").info("Iteration 4, lr = %s", logging_util.fmt(0.01))
        text = "".join(stream.parts)
    finally:
        logging.getLogger().removeHandler(handler)
        logging_util._installed_handler = None
    assert "4/10" in text
    log_line = text.split("\r\033[K")[1].split("\n")[0]   # erased bar, then the whole log line
    assert log_line.startswith("I") and log_line.endswith("] Iteration 4, lr = 0.01")
    assert text.endswith("\r\033[K")                          # the bar is erased at the end
    plain = _FakeTTY()
    plain.isatty = lambda: False
    with logging_util.ProgressBar(10, stream=plain) as bar:
        bar.update(5)
    assert plain.parts == []


def test_fmt_prints_like_cpp_streams():
    assert logging_util.fmt(np.float32(0.1)) == "0.1"
    assert logging_util.fmt(2.3411318) == "2.34113"
    assert logging_util.fmt(1e-5) == "1e-05"
    assert logging_util.fmt(123456789.0) == "1.23457e+08"
    assert logging_util.fmt(7) == "7"
