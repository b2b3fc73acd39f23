"""framework.DataParallelNet: the batch split over net replicas on threads gives the net's own
outputs (float32 round-off apart), with BLAS held to one thread while it runs."""
import numpy as np
import pytest
from google.protobuf import text_format
from threadpoolctl import threadpool_info

import framework
from proto import caffe_pb2

NET = """
name: "dp"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 6 dim: 3 dim: 12 dim: 12 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.3 }
                            bias_filler { type: "gaussian" std: 0.3 } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""


def make_net(text=NET):
    framework.set_random_seed(11)
    param = text_format.Parse(text, caffe_pb2.NetParameter())
    param.state.phase = framework.TEST
    return framework.Net(param)


def images(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 12, 12)).astype(np.float32)


def blas_threads():
    return [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"]


@pytest.mark.parametrize("threads, batch", [(2, 6), (2, 5), (3, 7), (4, 2)])
def test_outputs_equal_the_net_forward_on_the_whole_batch(threads, batch):
    x = images(batch)
    want = make_net().forward(data=x, blobs=["pool"])
    dp = framework.DataParallelNet(make_net(), threads=threads)
    got = dp.forward(data=x, blobs=["pool"])
    assert set(got) == {"prob", "pool"}
    for name in got:  # a slice may take another GEMM layout or BLAS blocking: float32 round-off
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7)
    # each replica ran one contiguous slice (up to the fully connected tail, which ran once)
    used = min(threads, batch)
    sizes = [r.blobs["data"].shape[0] for r in dp.replicas[:used]]
    assert sizes == [batch * (k + 1) // used - batch * k // used for k in range(used)]


def test_the_fully_connected_tail_runs_once_over_the_whole_batch():
    from framework.data_parallel import _fully_connected_tail
    net = make_net()
    assert _fully_connected_tail(net) == (net.layer_names.index("ip"), ["pool"])
    conv_after = NET.replace('layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }',
                             'layer { name: "r" type: "Reshape" bottom: "ip" top: "r" '
                             'reshape_param { shape { dim: 0 dim: 5 dim: 1 dim: 1 } } }\n'
                             'layer { name: "c2" type: "Convolution" bottom: "r" top: "c2" '
                             'convolution_param { num_output: 2 kernel_size: 1 } }')
    assert _fully_connected_tail(make_net(conv_after)) == (None, [])
    x = images(5, seed=2)
    want = make_net().forward(data=x, blobs=["ip", "pool"])
    dp = framework.DataParallelNet(net, threads=2)
    got = dp.forward(data=x, blobs=["ip", "pool"])
    assert dp.replicas[0].blobs["ip"].shape[0] == 5 and dp.replicas[1].blobs["data"].shape[0] == 3
    for name in ("prob", "ip", "pool"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7, err_msg=name)


def test_replicas_share_the_weights_and_start_at_their_share_of_the_batch():
    net = make_net()
    dp = framework.DataParallelNet(net, threads=3)
    assert dp.replicas[0] is net and len(dp.replicas) == 3
    for replica in dp.replicas[1:]:
        assert replica.params["conv"][0] is net.params["conv"][0]
        assert replica.blobs["data"].shape[0] == 2  # 6 images / 3 threads
    net.params["ip"][0].data[...] *= -1  # a change to the net's weights reaches every replica
    x = images(6, seed=1)
    np.testing.assert_allclose(dp.forward(data=x)["prob"], make_net_with(net).forward(data=x)["prob"],
                               rtol=1e-6, atol=1e-7)


def make_net_with(source):
    net = make_net()
    net.share_trained_layers_with(source)
    return net


def test_blas_runs_single_threaded_inside_and_as_before_after():
    before = blas_threads()
    dp = framework.DataParallelNet(make_net(), threads=2)
    seen = []
    original = dp.replicas[1].forward

    def recording_forward(**kwargs):
        seen.append(blas_threads())
        return original(**kwargs)

    dp.replicas[1].forward = recording_forward
    dp.forward(data=images(4))
    assert seen and all(t == 1 for t in seen[0])
    assert blas_threads() == before


def test_the_tail_splits_its_gemms_over_our_threads_with_blas_on_one_thread(monkeypatch, two_cores):
    from layers import parallel
    monkeypatch.setattr(parallel, "SPLIT_GEMM_MIN_MACS", 0)
    before = blas_threads()
    x = images(6, seed=4)
    want = make_net().forward(data=x)
    dp = framework.DataParallelNet(make_net(), threads=2)
    ip = dp.net.layers[dp.tail_start]
    seen, calls = [], []
    original_forward, original_matmul = ip.forward, parallel.np.matmul

    def recording_forward(bottom, top):
        seen.append(blas_threads())
        return original_forward(bottom, top)

    def recording_matmul(a, b, out=None):
        calls.append(a.shape)
        return original_matmul(a, b, out=out)

    monkeypatch.setattr(ip, "forward", recording_forward)
    monkeypatch.setattr(parallel.np, "matmul", recording_matmul)
    got = dp.forward(data=x)
    monkeypatch.undo()
    np.testing.assert_allclose(got["prob"], want["prob"], rtol=1e-6, atol=1e-7)
    assert seen and all(t == 1 for t in seen[0])   # no OpenBLAS worker left spinning afterwards
    # W (5, K = 8·6·6) · xᵀ, its 5 rows in two shares (the other calls are the convolution's)
    assert sorted(c for c in calls if c[-1] == 288) == [(2, 288), (3, 288)]
    assert blas_threads() == before


def test_a_single_image_runs_on_the_first_replica_alone():
    x = images(1)
    dp = framework.DataParallelNet(make_net(), threads=2)
    np.testing.assert_array_equal(dp.forward(data=x)["prob"], make_net().forward(data=x)["prob"])


def test_bad_inputs_are_named():
    dp = framework.DataParallelNet(make_net(), threads=2)
    with pytest.raises(framework.NetError, match="'label'.*not inputs of net 'dp'"):
        dp.forward(data=images(2), label=np.zeros(2))
    two_inputs = NET.replace('top: "data" input_param { shape { dim: 6 dim: 3 dim: 12 dim: 12 } }',
                             'top: "data" top: "extra" input_param { shape { dim: 6 dim: 3 dim: 12 dim: 12 } '
                             'shape { dim: 6 dim: 2 } }')
    dp2 = framework.DataParallelNet(make_net(two_inputs), threads=2)
    with pytest.raises(framework.NetError, match="same batch size"):
        dp2.forward(data=images(4), extra=np.zeros((3, 2), np.float32))


def test_a_net_without_input_blobs_is_refused():
    text = NET.replace('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 6 dim: 3 dim: 12 dim: 12 } } }',
                       'layer { name: "data" type: "DummyData" top: "data" '
                       'dummy_data_param { shape { dim: 6 dim: 3 dim: 12 dim: 12 } } }')
    with pytest.raises(framework.NetError, match="no input blobs"):
        framework.DataParallelNet(make_net(text), threads=2)


# -- training ------------------------------------------------------------------------

from framework import data_parallel  # noqa: E402
from test_batchnorm_fold import make_net as make_bn_net  # noqa: E402  (BatchNorm/Scale branches, batch 3)


def step_results(net):
    net.clear_param_diffs()
    loss = net.forward_backward()
    return loss, {name: [(b.data.copy(), b.diff.copy()) for b in blobs] for name, blobs in net.params.items()}


@pytest.mark.parametrize("threads", [2, 3])
def test_training_step_equals_the_whole_batch_on_one_net(threads):
    plain, split = make_bn_net(), make_bn_net()
    trainer = data_parallel.enable_training(split, threads)
    assert split.data_parallel is trainer and len(trainer.replicas) == threads
    for _ in range(2):  # the second step starts from the running statistics the first updated
        want_loss, want = step_results(plain)
        loss, got = step_results(split)
        assert loss == pytest.approx(want_loss, rel=1e-6)
    assert float(split.blobs["loss"].data) == pytest.approx(float(plain.blobs["loss"].data), rel=1e-6)
    for name, blobs in want.items():
        for k, (data, diff) in enumerate(blobs):
            scale = max(1e-6, float(np.abs(diff).max()))
            np.testing.assert_allclose(got[name][k][1], diff, rtol=0, atol=1e-5 * scale, err_msg=f"{name} diff {k}")
            # BatchNorm's running statistics: updated once per batch, from the whole batch's
            np.testing.assert_allclose(got[name][k][0], data, rtol=1e-5, atol=1e-6, err_msg=f"{name} data {k}")
    assert np.abs(want["bn_a"][0][0]).max() > 0 and np.abs(want["conv_a"][0][1]).max() > 0


SOLVER_NET = """
name: "dp_train"
layer { name: "data" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 5 dim: 3 dim: 8 dim: 8 } shape { dim: 5 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1 bias_term: false weight_filler { type: "msra" } } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
        inner_product_param { num_output: 4 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def test_training_with_a_solver_follows_the_same_weights():
    from benchmarks.benchmark import solver_param
    rng = np.random.default_rng(12)
    x = rng.standard_normal((5, 3, 8, 8)).astype(np.float32) * 2 + 0.5
    labels = rng.integers(0, 4, 5).astype(np.float32)
    results = []
    for threads in (1, 2):
        framework.set_random_seed(13)
        param = text_format.Parse(SOLVER_NET, caffe_pb2.NetParameter())
        solver = framework.get_solver(solver_param(param))
        solver.net.blobs["data"].data[...] = x
        solver.net.blobs["label"].data[...] = labels
        if threads > 1:
            data_parallel.enable_training(solver.net, threads)
        before = [b.data.copy() for b in solver.net.learnable_params]
        solver.step(4)
        results.append([b.data.copy() for b in solver.net.learnable_params])
        assert all(np.isfinite(b).all() for b in results[-1])
        assert max(np.abs(b - a).max() for a, b in zip(before, results[-1])) > 1e-2  # it did learn
    for got, want in zip(results[1], results[0]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


DROPOUT_NET = SOLVER_NET.replace(
    'layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"',
    'layer { name: "drop" type: "Dropout" bottom: "conv" top: "conv" dropout_param { dropout_ratio: 0.5 } }\n'
    'layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"')


@pytest.mark.parametrize("late", [0, 1])
def test_dropout_draws_do_not_depend_on_which_replica_gets_there_first(late):
    import time
    from benchmarks.benchmark import solver_param
    rng = np.random.default_rng(14)
    x = rng.standard_normal((5, 3, 8, 8)).astype(np.float32)
    labels = rng.integers(0, 4, 5).astype(np.float32)

    def train(seed, late_rank):
        framework.set_random_seed(seed)
        solver = framework.get_solver(solver_param(text_format.Parse(DROPOUT_NET, caffe_pb2.NetParameter())))
        solver.net.blobs["data"].data[...] = x
        solver.net.blobs["label"].data[...] = labels
        trainer = data_parallel.enable_training(solver.net, 2)
        drop = trainer.replicas[late_rank].layers[solver.net.layer_names.index("drop")]
        original = drop.forward

        def late_forward(bottom, top):  # the other replica draws its mask first
            time.sleep(0.05)
            return original(bottom, top)

        drop.forward = late_forward
        solver.step(3)
        return [b.data.copy() for b in solver.net.learnable_params]

    want = train(15, late)
    got = train(15, 1 - late)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    other_seed = train(16, late)
    assert any(not np.array_equal(a, b) for a, b in zip(other_seed, want))


def test_a_batch_smaller_than_the_threads_runs_on_the_net_itself():
    plain, split = make_bn_net(), make_bn_net()
    data_parallel.enable_training(split, 4)  # batch 3
    assert step_results(split)[0] == step_results(plain)[0]


def test_an_error_in_a_replica_is_raised_and_the_next_step_runs():
    net = make_bn_net()
    trainer = data_parallel.enable_training(net, 2)
    layer = trainer.replicas[1].layers[net.layer_names.index("scale_c")]
    original = layer.forward

    def broken(bottom, top):
        raise ValueError("replica failure")

    layer.forward = broken
    with pytest.raises(ValueError, match="replica failure"):
        net.forward_backward()
    layer.forward = original
    want = step_results(make_bn_net())[0]
    assert step_results(net)[0] == pytest.approx(want, rel=1e-6)


DATA_LAYER_NET = SOLVER_NET.replace(
    'layer { name: "data" type: "Input" top: "data" top: "label"\n'
    '        input_param { shape { dim: 5 dim: 3 dim: 8 dim: 8 } shape { dim: 5 } } }',
    'layer { name: "data" type: "DummyData" top: "data" top: "label"\n'
    '        dummy_data_param { shape { dim: 5 dim: 3 dim: 8 dim: 8 } shape { dim: 5 }\n'
    '                           data_filler { type: "gaussian" std: 2 } data_filler { type: "constant" value: 1 } } }')


def test_training_reads_data_layers_once_per_step_and_splits_their_tops():
    assert "DummyData" in DATA_LAYER_NET
    results = []
    for threads in (1, 2):
        framework.set_random_seed(14)  # the same weights
        param = text_format.Parse(DATA_LAYER_NET, caffe_pb2.NetParameter())
        param.state.phase = framework.TRAIN
        net = framework.Net(param)
        if threads > 1:
            trainer = data_parallel.enable_training(net, threads)
            assert [r.layers[0].type for r in trainer.replicas] == ["Input", "Input"]
        framework.set_random_seed(15)  # building the replicas drew from the generator
        losses = [step_results(net)[0] for _ in range(3)]  # three batches, drawn one by one
        results.append((losses, step_results(net)[1]))
    assert len(set(results[0][0])) == 3  # new data every step
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-6)
    for name, blobs in results[0][1].items():
        for k, (data, diff) in enumerate(blobs):
            np.testing.assert_allclose(results[1][1][name][k][1], diff, rtol=1e-5, atol=1e-6, err_msg=name)


def test_training_refuses_bottomless_non_data_layers_and_losses_not_averaged_over_the_batch():
    with pytest.raises(framework.NetError, match="layer 'p' \\(Parameter\\) has no bottoms and is not a data layer"):
        data_parallel.DataParallelTraining(make_net(NET.replace(
            'layer { name: "prob"', 'layer { name: "p" type: "Parameter" top: "p" '
            'parameter_param { shape { dim: 2 } } }\nlayer { name: "prob"')), threads=2)
    text = NET.replace('top: "data" input_param { shape { dim: 6 dim: 3 dim: 12 dim: 12 } }',
                       'top: "data" top: "label" input_param { shape { dim: 6 dim: 3 dim: 12 dim: 12 } '
                       'shape { dim: 6 } }').replace(
        'layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }',
        'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" '
        'loss_param { ignore_label: 2 } }')
    param = text_format.Parse(text, caffe_pb2.NetParameter())
    param.state.phase = framework.TRAIN
    with pytest.raises(framework.NetError, match="layer 'loss' \\(SoftmaxWithLoss\\).*ignore_label"):
        data_parallel.DataParallelTraining(framework.Net(param), threads=2)


def test_training_frees_the_nets_own_activations_and_gives_them_back():
    net = make_bn_net()
    inputs = {name: net.blobs[name].data.copy() for name in net.inputs}
    before = step_results(make_bn_net())[0]
    data_parallel.enable_training(net, 2)
    conv = net.blobs["conv_a"].data
    assert conv.shape == (3, 4, 5, 5) and not conv.flags.writeable and conv.base.nbytes <= 8  # freed
    assert all(np.array_equal(net.blobs[name].data, value) for name, value in inputs.items())  # kept
    assert step_results(net)[0] == pytest.approx(before, rel=1e-6)
    # a forward of the net itself (a solver's last display) gets arrays for its layers back
    assert net.forward_loss() == pytest.approx(before, rel=1e-6)
    assert net.blobs["conv_a"].data.flags.writeable
    step_results(net)  # and the next split step frees them again
    assert not net.blobs["conv_a"].data.flags.writeable
    data_parallel.disable_training(net)
    assert net.data_parallel is None and net.blobs["conv_a"].data.flags.writeable
    assert step_results(net)[0] == pytest.approx(before, rel=1e-6)  # on its own again


def test_the_solver_update_of_a_data_parallel_net_is_shared_over_its_threads(two_cores, monkeypatch):
    """After a data-parallel step the SGD update runs its parameters on both threads
    (SGDSolver._update_threads); element-wise, so exactly the one-thread update's numbers."""
    import threading

    from benchmarks.benchmark import solver_param
    from framework.solvers import sgd

    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 3, 8, 8)).astype(np.float32)
    labels = rng.integers(0, 4, 5).astype(np.float32)
    param = text_format.Parse(SOLVER_NET, caffe_pb2.NetParameter())
    solver = framework.get_solver(solver_param(param))
    solver.net.blobs["data"].data[...] = x
    solver.net.blobs["label"].data[...] = labels
    data_parallel.enable_training(solver.net, 2)
    solver.step(1)  # history no longer zero
    solver.net.clear_param_diffs()
    solver.net.forward_backward()
    diffs = [b.diff.copy() for b in solver.net.learnable_params]
    start = ([b.data.copy() for b in solver.net.learnable_params], [h.copy() for h in solver.history])

    threads = {}
    step = sgd.SGDSolver._sgd_step_in_blocks

    def spy(self, i, rate):
        threads[i] = threading.get_ident()
        return step(self, i, rate)

    monkeypatch.setattr(sgd.SGDSolver, "_sgd_step_in_blocks", spy)
    solver.apply_update()
    shared = [b.data.copy() for b in solver.net.learnable_params]
    assert sorted(threads) == list(range(len(diffs))) and len(set(threads.values())) == 2

    for blob, data, diff, history, saved in zip(solver.net.learnable_params, start[0], diffs, solver.history,
                                                start[1]):
        blob.data[...], blob.diff[...], history[...] = data, diff, saved
    monkeypatch.setattr(sgd.SGDSolver, "_update_threads", lambda self: 1)
    solver.iter -= 1  # the same learning rate
    solver.apply_update()
    for got, want in zip(shared, solver.net.learnable_params):
        np.testing.assert_array_equal(got, want.data)


def test_run_balanced_runs_every_task_once_and_raises_the_first_error(two_cores):
    import threading

    from layers.parallel import run_balanced

    ran = []
    tasks = [lambda i=i: ran.append((i, threading.get_ident())) for i in range(5)]
    run_balanced(tasks, [5, 1, 4, 2, 3], 2)
    assert sorted(i for i, _ in ran) == list(range(5))
    by_thread = {}
    for i, tid in ran:
        by_thread.setdefault(tid, []).append(i)
    assert sorted(sorted(v) for v in by_thread.values()) == [[0, 1, 3], [2, 4]]  # loads 8 and 7

    def fail():
        raise ValueError("task failed")

    with pytest.raises(ValueError, match="task failed"):
        run_balanced([fail, lambda: None], [1, 1], 2)
    ran.clear()
    run_balanced(tasks, [1] * 5, 1)
    assert [i for i, _ in ran] == list(range(5)) and len({t for _, t in ran}) == 1
