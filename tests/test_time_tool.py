"""tools/time.py: Caffe's ``caffe time`` on small nets (line formats, flags, errors)."""
import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "time.py")

DEPLOY = """
name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 9 dim: 9 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool1" top: "ip1"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "prob" type: "Softmax" bottom: "ip1" top: "prob" }
"""

TRAIN = """
name: "tiny_train"
layer { name: "data" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 3 dim: 2 dim: 6 dim: 6 } shape { dim: 3 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 3 kernel_size: 3 weight_filler { type: "gaussian" std: 0.01 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "conv1" top: "ip1"
        inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.01 } } }
layer { name: "acc" type: "Accuracy" bottom: "ip1" bottom: "label" top: "acc" }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip1" bottom: "label" top: "loss" }
"""

PREFIX = r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ [\w.]+:\d+\] "


def _load_tool():
    spec = importlib.util.spec_from_file_location("caffe_time_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(tmp_path, text, name="net.prototxt"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _run(*args):
    proc = subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
    return proc.returncode, proc.stderr


def _messages(log):
    """The log lines without glog's prefix (every line must carry one)."""
    out = []
    for line in log.splitlines():
        match = re.match(PREFIX, line)
        assert match, f"line without Caffe's log prefix: {line!r}"
        out.append(line[match.end():])
    return out


def test_deploy_net_end_to_end_has_caffes_lines(tmp_path):
    code, log = _run("--model", _write(tmp_path, DEPLOY), "--iterations", "3", "--threads", "1")
    assert code == 0, log
    lines = _messages(log)
    assert "Use CPU." in lines
    for fixed in ("Performing Forward", "Performing Backward", "*** Benchmark begins ***",
                  "Testing for 3 iterations.", "Average time per layer: ", "*** Benchmark ends ***"):
        assert fixed in lines, fixed
    assert any(re.fullmatch(r"Initial loss: 0", line) for line in lines)
    iterations = [line for line in lines if line.startswith("Iteration: ")]
    assert [int(re.fullmatch(r"Iteration: (\d+) forward-backward time: [\d.e+-]+ ms\.", line).group(1))
            for line in iterations] == [1, 2, 3]
    # one forward and one backward line per layer, name right-aligned in 10 columns, in net order
    per_layer = [line for line in lines if re.fullmatch(r" *\S+\t(forward|backward): [\d.e+-]+ ms\.", line)]
    names = ["data", "conv1", "relu1", "pool1", "ip1", "prob"]
    expected = []
    for name in names:
        expected += [f"{name:>10}\tforward", f"{name:>10}\tbackward"]
    assert [line.split(":")[0] for line in per_layer] == expected
    summary = {}
    for key in ("Average Forward pass", "Average Backward pass", "Average Forward-Backward", "Total Time"):
        found = [line for line in lines if line.startswith(key + ": ")]
        assert len(found) == 1, key
        summary[key] = float(re.fullmatch(re.escape(key) + r": ([\d.e+-]+) ms\.", found[0]).group(1))
    assert summary["Average Forward pass"] > 0
    assert summary["Total Time"] >= summary["Average Forward-Backward"] * 3 * 0.999
    # Caffe's lines come before the end marker; our extra tables after it
    end = lines.index("*** Benchmark ends ***")
    assert lines.index("Average time per layer: ") < end
    table = lines[lines.index("Per-layer table (ms per iteration):") + 2:]
    rows = [row.split() for row in table[:len(names)]]
    assert [r[0] for r in rows] == names
    assert [r[1] for r in rows] == ["Input", "Convolution", "ReLU", "Pooling", "InnerProduct", "Softmax"]
    assert all(r[4].endswith("%") for r in rows)
    assert "Time per layer type (ms per iteration):" in lines


def test_batch_flag_reshapes_the_input(tmp_path):
    code, log = _run("--model", _write(tmp_path, DEPLOY), "--iterations", "1", "--batch", "5")
    assert code == 0, log
    shapes = [line.split("Top shape: ")[1] for line in _messages(log) if "Top shape: " in line]
    assert shapes[0] == "5 3 9 9 (1215)"
    assert shapes[-1] == "5 5 (25)"


def test_train_phase_reports_the_initial_loss(tmp_path):
    code, log = _run("--model", _write(tmp_path, TRAIN), "--iterations", "2", "--phase", "TRAIN")
    assert code == 0, log
    loss = [line for line in _messages(log) if line.startswith("Initial loss: ")]
    # 4 classes, tiny random weights (logits ~1e-3): the loss is log(4)
    assert abs(float(loss[0].split(": ")[1]) - np.log(4)) < 0.01


def test_weights_flag_loads_a_caffemodel(tmp_path):
    import framework

    model = _write(tmp_path, DEPLOY)
    net = framework.Net(model, framework.TEST)
    weights = str(tmp_path / "w.caffemodel")
    net.save(weights)
    code, log = _run("--model", model, "--weights", weights, "--iterations", "1", "--phase", "TEST")
    assert code == 0, log
    assert "Average Forward pass" in log


@pytest.mark.parametrize("args, message", [
    ((), "Need a model definition to time (--model)."),
    (("--model", "no/such.prototxt"), "net definition (--model) not found: no/such.prototxt"),
    (("--iterations", "0"), "--iterations must be >= 1 (got 0)"),
    (("--threads", "0"), "--threads must be >= 1 (got 0)"),
    (("--batch", "0"), "--batch must be >= 1 (got 0)"),
    (("--phase", "VAL"), "argument --phase: invalid choice"),
])
def test_errors_are_one_line_with_status_1(tmp_path, args, message):
    model = _write(tmp_path, DEPLOY)
    if args and args[0] != "--model":
        args = ("--model", model) + args
    code, log = _run(*args)
    assert code == 1
    errors = [line for line in log.splitlines() if line.startswith("E")]
    assert len(errors) == 1 and message in errors[0], log
    assert "Traceback" not in log


def test_batch_flag_needs_an_input_or_data_layer(tmp_path):
    text = """
    name: "nodata"
    layer { name: "d" type: "DummyData" top: "d" dummy_data_param { shape { dim: 2 dim: 3 } } }
    layer { name: "ip" type: "InnerProduct" bottom: "d" top: "ip" inner_product_param { num_output: 2 } }
    """
    code, log = _run("--model", _write(tmp_path, text), "--batch", "4")
    assert code == 1
    assert "has no Input layer and no data layer with a batch_size" in log


# -- the functions, in process ------------------------------------------------------

def test_time_layers_runs_backward_like_caffe(tmp_path):
    """Caffe times every layer's Backward, even in a net without a loss: param gradients appear."""
    tool = _load_tool()
    net = tool.load_net(_write(tmp_path, DEPLOY), phase="TEST")
    tool.fill_inputs(net, seed=3)
    assert not any(net.layer_need_backward)
    result = tool.time_layers(net, iterations=2)
    assert len(result["forward"]) == len(result["backward"]) == len(net.layers)
    assert all(t >= 0 for t in result["forward"] + result["backward"])
    # the input got N(0, 1) values, and conv1's weight gradient was computed (top diff 0 -> 0,
    # but the array was touched: allocated with the weights' shape)
    assert abs(float(net.blobs["data"].data.std()) - 1) < 0.3
    assert net.params["conv1"][0].has_diff


def test_time_layers_skips_layers_without_backward(tmp_path):
    tool = _load_tool()
    net = tool.load_net(_write(tmp_path, TRAIN), phase="TRAIN")
    tool.fill_inputs(net)
    assert not net.blobs["label"].data.any()  # labels get zeros, a valid class
    acc = net.layer_by_name("acc")
    assert not acc.has_backward

    def refuse(*args):
        raise AssertionError("Accuracy's backward must not be called")
    acc.backward = refuse
    result = tool.time_layers(net, iterations=1)
    assert len(result["backward"]) == len(net.layers)
    assert np.abs(net.params["ip1"][0].diff).sum() > 0  # the loss's gradient reached ip1


def test_set_batch_size_changes_inputs_and_data_layers():
    from proto import caffe_pb2
    from google.protobuf import text_format

    tool = _load_tool()
    param = text_format.Parse("""
      layer { name: "in" type: "Input" top: "a" top: "b"
              input_param { shape { dim: 2 dim: 3 } shape { dim: 2 } } }
      layer { name: "db" type: "Data" top: "x" data_param { source: "s" batch_size: 7 } }
      layer { name: "mem" type: "MemoryData" top: "y" top: "z"
              memory_data_param { batch_size: 3 channels: 1 height: 1 width: 1 } }
      layer { name: "relu" type: "ReLU" bottom: "a" top: "a" }
    """, caffe_pb2.NetParameter())
    assert tool.set_batch_size(param, 11) == 3
    assert [list(s.dim) for s in param.layer[0].input_param.shape] == [[11, 3], [11]]
    assert param.layer[1].data_param.batch_size == 11
    assert param.layer[2].memory_data_param.batch_size == 11


def test_report_table_lines_sum_to_100_percent(tmp_path):
    tool = _load_tool()
    net = tool.load_net(_write(tmp_path, DEPLOY), phase="TEST")
    result = {"forward": [1.0, 2.0, 0.5, 0.5, 4.0, 1.0], "backward": [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]}
    lines = tool.table_lines(net, result)
    rows = [line.split() for line in lines[2:2 + len(net.layers)]]
    assert sum(float(r[4].rstrip("%")) for r in rows) == pytest.approx(100, abs=0.5)
    assert rows[1][:4] == ["conv1", "Convolution", "2.000", "1.000"]
    by_type = lines[lines.index("Time per layer type (ms per iteration):") + 2:]
    assert by_type[0].split()[:3] == ["InnerProduct", "1", "4.000"]  # largest share first
