"""benchmarks/: the net builders, the PyTorch mirror and a --tiny run of benchmark.py.

The PyTorch parts are skipped (with the reason printed) when torch is not
installed; our side always runs.  No timing is asserted.
"""
import json
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from google.protobuf import text_format

import framework
from proto import caffe_pb2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import benchmark, nets  # noqa: E402

SCRIPT = os.path.join(ROOT, "benchmarks", "benchmark.py")

try:
    import torch  # noqa: F401
    TORCH_MISSING = None
except ImportError as exc:  # CI without the bench extra
    TORCH_MISSING = f"PyTorch is not installed ({exc}): the torch side of the benchmark is not tested"
    print(TORCH_MISSING)

needs_torch = pytest.mark.skipif(TORCH_MISSING is not None, reason=TORCH_MISSING or "")


def run_script(*args, timeout=300):
    proc = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


# -- nets ------------------------------------------------------------------------

def test_resnet50_nets_have_the_expected_flops_and_heads():
    deploy = framework.Net(nets.resnet50_deploy(1))
    assert deploy.blobs["data"].shape == (1, 3, 224, 224)
    assert nets.conv_fc_flops(deploy) == pytest.approx(7.716e9, rel=1e-3)  # ResNet-50: ~3.86 GMAC
    train_param = nets.resnet50_train(2)
    kinds = {layer.name: layer for layer in train_param.layer}
    assert kinds["loss"].type == "SoftmaxWithLoss" and list(kinds["loss"].bottom) == ["fc1000", "label"]
    bns = [layer for layer in train_param.layer if layer.type == "BatchNorm"]
    assert len(bns) == 53 and not any(bn.batch_norm_param.HasField("use_global_stats") for bn in bns)
    assert train_param.state.phase == caffe_pb2.TRAIN


def test_lenet_train_uses_inputs_and_train_layers_only():
    net = framework.Net(nets.lenet_train(5))
    assert net.inputs == ["data", "label"]
    assert net.blobs["data"].shape == (5, 1, 28, 28) and net.blobs["label"].shape == (5,)
    assert "accuracy" not in net.layer_names and net.outputs == ["loss"]
    assert nets.conv_fc_flops(net) == 5 * 2 * (20 * 25 * 576 + 50 * 500 * 64 + 500 * 800 + 10 * 500)


def test_caffenet_has_grouped_convs_and_lrn():
    net = framework.Net(nets.caffenet_deploy(2))
    assert net.blobs["prob"].shape == (2, 1000)
    assert net.params["conv2"][0].shape == (256, 48, 5, 5)  # group 2
    assert [l.type for l in net.layers].count("LRN") == 2
    assert nets.conv_fc_flops(net) == pytest.approx(2 * 1.449e9, rel=2e-3)


def test_weights_dict_round_trip_and_randomize():
    a = framework.Net(nets.lenet_train(2))
    b = framework.Net(nets.lenet_train(2))
    nets.randomize_weights(a, seed=3)
    nets.load_weights_dict(b, nets.weights_dict(a))
    for name in a.params:
        for x, y in zip(a.params[name], b.params[name]):
            np.testing.assert_array_equal(x.data, y.data)
    w = a.params["conv1"][0].data
    assert abs(w.std() - np.sqrt(1 / 25)) < 0.05  # N(0, 1/fan_in)


# -- the PyTorch mirror --------------------------------------------------------------

MIRROR_NET = """
name: "mirror"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 dim: 9 dim: 9 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1 stride: 2 group: 2 } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "lrn" type: "LRN" bottom: "conv" top: "lrn" lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 } }
layer { name: "pool" type: "Pooling" bottom: "lrn" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ave" type: "Pooling" bottom: "lrn" top: "ave" pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "c2" type: "Convolution" bottom: "ave" top: "c2" convolution_param { num_output: 6 kernel_size: 1 } }
layer { name: "cut" type: "Pooling" bottom: "c2" top: "c2p" pooling_param { pool: MAX kernel_size: 1 stride: 1 } }
layer { name: "sum" type: "Eltwise" bottom: "pool" bottom: "c2p" top: "sum" eltwise_param { coeff: 1 coeff: -0.5 } }
layer { name: "ip" type: "InnerProduct" bottom: "sum" top: "ip" inner_product_param { num_output: 5 } }
layer { name: "drop" type: "Dropout" bottom: "ip" top: "ip" }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""


@needs_torch
def test_torch_mirror_matches_our_net_on_every_mapped_layer():
    from benchmarks.torch_mirror import TorchMirror

    param = text_format.Parse(MIRROR_NET, caffe_pb2.NetParameter())
    param.state.phase = caffe_pb2.TEST
    net = framework.Net(param)
    nets.randomize_weights(net, seed=2)
    x = np.random.default_rng(1).standard_normal((2, 4, 9, 9)).astype(np.float32)
    ours = net.forward(data=x)["prob"]
    mirror = TorchMirror(net)
    assert len([op for op in mirror.ops if op is not None]) == len(net.layers) - 2  # Input; Scale folded
    with torch.inference_mode():
        theirs = mirror(data=x.copy())["prob"].numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


@needs_torch
def test_torch_mirror_refuses_unknown_layers():
    from benchmarks.torch_mirror import TorchMirror

    param = text_format.Parse("""
      layer { name: "d" type: "Input" top: "d" input_param { shape { dim: 1 dim: 3 } } }
      layer { name: "e" type: "Exp" bottom: "d" top: "e" }""", caffe_pb2.NetParameter())
    with pytest.raises(NotImplementedError, match="Exp"):
        TorchMirror(framework.Net(param))


# -- the script ------------------------------------------------------------------------

def test_tiny_run_of_our_side_only(tmp_path):
    """Runs without PyTorch too: our timing, FLOPs and memory subprocess."""
    out = tmp_path / "r.json"
    text = run_script("--tiny", "--no-torch", "--no-blas-variants", "--cases", "lenet_train_b64,caffenet_b10",
                      "--memory-cases", "lenet_train_b64", "--threads", "1", "--json", str(out))
    assert "PyTorch: not run: --no-torch" in text
    assert "BLAS:" in text and "OPENBLAS_CORETYPE:" in text
    result = json.loads(out.read_text())["as_is"]
    lenet = result["results"]["lenet_train_b64"]
    assert lenet["timing"]["ours_ms"] > 0 and lenet["timing"]["gflops_ours"] > 0
    assert "torch" not in lenet["timing"]["runs"]
    assert lenet["memory"]["ours"]["peak_kib"] > 0 and lenet["memory"]["ours"]["traced_peak_kib"] > 0
    caffenet = result["results"]["caffenet_b10"]["timing"]
    assert set(caffenet["runs"]) == {"ours", "ours*"}
    assert result["info"]["threads"] == 1


@needs_torch
def test_tiny_run_against_torch_reports_ratio_and_agreement(tmp_path):
    out = tmp_path / "r.json"
    text = run_script("--tiny", "--no-blas-variants", "--cases", "lenet_train_b64,caffenet_b10",
                      "--memory-cases", "caffenet_b10", "--json", str(out))
    assert "ours/torch" in text
    result = json.loads(out.read_text())["as_is"]["results"]
    lenet = result["lenet_train_b64"]
    assert lenet["agreement"]["loss"] < 1e-5 and lenet["agreement"]["grad_l2"] < 1e-4
    assert lenet["timing"]["ratio_ours"] > 0
    caffenet = result["caffenet_b10"]
    assert caffenet["agreement"]["output"] < 1e-4 and caffenet["agreement"]["output*"] < 1e-4
    assert set(caffenet["memory"]) == {"ours", "ours*", "torch"}
    assert all(m["peak_kib"] > 0 for m in caffenet["memory"].values())


def test_timing_reports_each_sides_middle_half(monkeypatch):
    """time_case keeps every run; the report prints the first to third quartile per side."""
    ticks = iter(range(10 ** 6))
    durations = {"ours": iter([5, 1, 3, 2, 4, 9, 7, 6]), "torch": iter([2, 2, 2, 2, 2, 2, 2, 2])}
    clock = {"now": 0.0}

    class FakeCase:
        flops = 1e9

        def sides(self):
            def side(name):
                def run():
                    if warmed[name] < 2:  # the two warm-up rounds take no time
                        warmed[name] += 1
                        return
                    clock["now"] += next(durations[name]) / 1e3
                return run
            return {"ours": side("ours"), "torch": side("torch")}

    warmed = {"ours": 0, "torch": 0}
    monkeypatch.setattr(benchmark.time, "perf_counter", lambda: clock["now"])
    monkeypatch.setattr(benchmark.time, "sleep", lambda s: next(ticks))
    t = benchmark.time_case(FakeCase(), 8, 0.0)
    assert t["runs"]["ours"] == pytest.approx([5, 1, 3, 2, 4, 9, 7, 6])
    q1, q3 = t["ours_quartiles_ms"]
    assert q1 < t["ours_ms"] < q3 and (q1, q3) == pytest.approx((2.25, 6.75))
    assert t["torch_quartiles_ms"] == pytest.approx([2.0, 2.0])
    stream = io.StringIO()
    benchmark.print_report({"cpu": "x", "cores": 2, "threads": 2, "numpy": "n", "OPENBLAS_CORETYPE": "-"},
                           {"lenet_train_b64": {"timing": t}}, stream)
    row = next(line for line in stream.getvalue().splitlines() if line.startswith("lenet_train_b64    ours "))
    assert f"{q1:.1f}-{q3:.1f}" in row and "middle half" in stream.getvalue()


def test_bad_case_name_is_a_usage_error():
    proc = subprocess.run([sys.executable, SCRIPT, "--cases", "vgg16"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "unknown case(s) vgg16" in proc.stderr


def test_steal_share_is_the_stolen_part_of_the_cpu_time_used(tmp_path):
    """/proc/stat's cpu line: user nice system idle iowait irq softirq steal ...; idle and
    iowait are not time used, and the share is of the time used or stolen."""
    before = tmp_path / "before"
    after = tmp_path / "after"
    before.write_text("cpu  1000 0 200 5000 10 0 5 100 0 0\ncpu0 1 2 3\n")
    after.write_text("cpu  1600 0 300 9000 20 0 15 190 0 0\ncpu0 1 2 3\n")
    first, second = benchmark.read_cpu_times(before), benchmark.read_cpu_times(after)
    assert first[:8] == [1000, 0, 200, 5000, 10, 0, 5, 100]
    share = benchmark.steal_share(first, second)
    assert share == pytest.approx(90 / (600 + 100 + 10 + 90))
    assert benchmark.steal_share(first, first) is None  # nothing used: no share
    assert benchmark.read_cpu_times(tmp_path / "missing") is None
    assert benchmark.steal_share(None, second) is None
    text = io.StringIO()
    benchmark.print_report({"cpu": "x", "cores": 2, "threads": 2, "numpy": "n", "OPENBLAS_CORETYPE": "-",
                            "steal_share": share}, {}, text)
    assert "(/proc/stat steal): 11.2% of the time used" in text.getvalue()
