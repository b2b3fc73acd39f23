"""Benchmark a net's layers, like Caffe's ``caffe time``.

    python tools/time.py --model models/lenet/lenet.prototxt
    python tools/time.py --model deploy.prototxt --iterations 20 --batch 8 --threads 2
    python tools/time.py --model train_val.prototxt --phase TRAIN --weights w.caffemodel

As caffe.cpp's time(): one forward and one backward to warm up (allocations),
then ``--iterations`` rounds of a forward over every layer followed by a
backward over every layer, each layer timed on its own.  Logged in Caffe's
format: a line per iteration ("Iteration: 3 forward-backward time: 12.3 ms."),
"Average time per layer:" with a forward and a backward line per layer
("     conv1\\tforward: 1.234 ms."), then "Average Forward pass", "Average
Backward pass", "Average Forward-Backward" and "Total Time".  After Caffe's
"*** Benchmark ends ***" line come two extra tables (not in Caffe): each layer
with its type and share of the time, and the time per layer type.

As in Caffe, the backward round calls every layer's backward with the net's
``bottom_need_backward`` flags, even in a net without a loss (a deploy file):
there it computes the parameter gradients only.  Layers that have no backward
at all (Accuracy, data layers) cost nothing in it.

Inputs: deploy nets (``Input`` layers or an ``input:`` header) get random
N(0, 1) data (zeros for blobs whose name contains "label"); nets with data
layers read their sources as usual.  ``--batch N`` sets the first dimension of
every Input shape and the ``batch_size`` of data layers.  ``--weights`` loads a
.caffemodel (else the fillers' or zero weights are timed, which costs the same).

Threads: ``--threads N`` limits the BLAS (and OpenMP) pools.  It sets
OPENBLAS_NUM_THREADS / OMP_NUM_THREADS / MKL_NUM_THREADS before NumPy is
imported, and uses threadpoolctl as well when it is installed (needed when
NumPy was imported earlier, as when ``main`` is called from Python).  Without
the flag the BLAS uses its default, all cores.

Exit status 0 on success, 1 on any error (reported on one line).
"""
import argparse
import os
import sys
import time as _time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


class UsageError(Exception):
    """A bad command line (reported on one line, exit status 1)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def parse_args(argv=None):
    """Parse the command line (raises UsageError on a bad one)."""
    p = _Parser(prog="time.py", description=__doc__.split("\n\n")[0],
                epilog="--batch, --threads and --warmup are not caffe time flags.")
    p.add_argument("--model", help="the net definition (prototxt); required")
    p.add_argument("--iterations", type=int, default=50, help="timed iterations (default 50)")
    p.add_argument("--phase", default="TRAIN", type=str.upper, choices=("TEST", "TRAIN"),
                   help="net phase (default TRAIN, as caffe time)")
    p.add_argument("--weights", help="weights to load (.caffemodel or .caffemodel.h5), optional")
    p.add_argument("--batch", type=int, default=None,
                   help="batch size: first dim of every Input shape and batch_size of data layers")
    p.add_argument("--threads", type=int, default=None,
                   help="BLAS threads (default: the BLAS's own default, all cores)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed forward+backward rounds before timing (default 1, as caffe time)")
    p.add_argument("--stage", action="append", default=[],
                   help="network stage(s); repeat the flag or separate with ','")
    p.add_argument("--level", type=int, default=0, help="network level (default 0)")
    p.add_argument("--seed", type=int, default=1, help="seed of the random inputs (default 1)")
    return p.parse_args(argv)


# -- threads and BLAS ------------------------------------------------------------

def set_threads(count):
    """Limit the BLAS/OpenMP thread pools to ``count`` threads.

    Sets the environment variables (effective only if NumPy is not imported
    yet) and, when threadpoolctl is installed, also limits already-loaded
    pools.  Returns a short description of how the limit was applied.
    """
    if count is None:
        return "default"
    if count < 1:
        raise UsageError(f"--threads must be >= 1 (got {count})")
    for name in _THREAD_VARIABLES:
        os.environ[name] = str(count)
    how = "environment"
    try:
        import threadpoolctl
    except ImportError:
        if "numpy" in sys.modules:
            how = "environment (NumPy already loaded and threadpoolctl missing: may not apply)"
        return how
    threadpoolctl.threadpool_limits(limits=count)
    return how + " + threadpoolctl"


def blas_info():
    """(description, threads) of NumPy's BLAS: threadpoolctl's view, else numpy's build config."""
    import numpy as np

    try:
        import threadpoolctl
        pools = [p for p in threadpoolctl.threadpool_info() if p.get("user_api") == "blas"]
        if pools:
            p = pools[0]
            desc = f"{p.get('internal_api')} {p.get('version')} ({p.get('architecture')})"
            return desc, int(p.get("num_threads"))
    except ImportError:
        pass
    desc = "unknown BLAS"
    try:
        config = np.show_config(mode="dicts")
        blas = config["Build Dependencies"]["blas"]
        desc = f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # older NumPy: no dict mode
        pass
    threads = None
    for name in _THREAD_VARIABLES[:2]:
        if os.environ.get(name, "").isdigit():
            threads = int(os.environ[name])
            break
    return desc, threads or os.cpu_count()


# -- net preparation -----------------------------------------------------------

def set_batch_size(net_param, batch):
    """Set the batch size of a NetParameter in place.

    First dim of every Input layer's shapes, and ``batch_size`` of every layer
    parameter that has one (data_param, image_data_param, memory_data_param, ...).
    Returns the number of layers changed.
    """
    changed = 0
    for layer in net_param.layer:
        touched = False
        if layer.type == "Input":
            for shape in layer.input_param.shape:
                if len(shape.dim):
                    shape.dim[0] = batch
                    touched = True
        for field, value in layer.ListFields():
            if field.name.endswith("_param") and field.message_type is not None \
                    and "batch_size" in field.message_type.fields_by_name:
                value.batch_size = batch
                touched = True
        changed += touched
    return changed


def fill_inputs(net, seed=1):
    """Random N(0, 1) data in every net input; zeros in blobs named like labels."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for name in net.inputs:
        blob = net.blobs[name]
        if "label" in name.lower():
            blob.data[...] = 0
        else:
            blob.data[...] = rng.standard_normal(blob.shape, dtype=np.float32)


def load_net(model, phase="TRAIN", batch=None, weights=None, level=0, stages=()):
    """Build the Net for timing: the prototxt with ``--batch`` applied, weights loaded."""
    import framework
    from framework.net import read_net_param

    param = read_net_param(model)
    if batch is not None:
        if batch < 1:
            raise UsageError(f"--batch must be >= 1 (got {batch})")
        if not set_batch_size(param, batch):
            raise UsageError(f"--batch {batch}: {model} has no Input layer and no data layer "
                             "with a batch_size")
    param.state.phase = framework.TEST if phase == "TEST" else framework.TRAIN
    param.state.level = level
    param.state.stage.extend(stages)
    net = framework.Net(param)
    if weights:
        net.copy_from(weights)
    return net


# -- timing ----------------------------------------------------------------------

def _forward_layer(net, i):
    # as Caffe's Layer::Forward: reshape, forward, and the loss of a loss layer
    net.forward_from_to(i, i)


def _backward_layer(net, i):
    layer = net.layers[i]
    if layer.has_backward:
        layer.backward(net._tops[i], net._bottom_need_backward[i], net._bottoms[i])


def time_layers(net, iterations, warmup=1, log=None):
    """Caffe's time(): per-layer forward/backward times averaged over ``iterations``.

    Returns a dict: ``forward``/``backward`` (lists of ms per layer per
    iteration), ``forward_ms``, ``backward_ms``, ``forward_backward_ms``
    (averages per iteration), ``total_ms``, ``initial_loss``.
    """
    clock = _time.perf_counter
    n = len(net.layers)
    if log:
        log.info("Performing Forward")
    initial_loss = net.forward_loss()
    if log:
        log.info("Initial loss: %s", _fmt(initial_loss))
        log.info("Performing Backward")
    for i in reversed(range(n)):
        _backward_layer(net, i)
    for _ in range(max(0, warmup - 1)):
        net.forward_loss()
        for i in reversed(range(n)):
            _backward_layer(net, i)
    if log:
        log.info("*** Benchmark begins ***")
        log.info("Testing for %d iterations.", iterations)
    forward = [0.0] * n
    backward = [0.0] * n
    forward_total = backward_total = 0.0
    start_all = clock()
    for j in range(iterations):
        start_iter = clock()
        for i in range(n):
            t0 = clock()
            _forward_layer(net, i)
            forward[i] += clock() - t0
        middle = clock()
        forward_total += middle - start_iter
        for i in reversed(range(n)):
            t0 = clock()
            _backward_layer(net, i)
            backward[i] += clock() - t0
        end_iter = clock()
        backward_total += end_iter - middle
        if log:
            log.info("Iteration: %d forward-backward time: %s ms.", j + 1, _fmt((end_iter - start_iter) * 1e3))
    total = clock() - start_all
    scale = 1e3 / iterations
    return {
        "forward": [t * scale for t in forward],
        "backward": [t * scale for t in backward],
        "forward_ms": forward_total * scale,
        "backward_ms": backward_total * scale,
        "forward_backward_ms": total * scale,
        "total_ms": total * 1e3,
        "initial_loss": initial_loss,
    }


def _fmt(value):
    from framework.logging_util import fmt
    return fmt(value)


def report(net, result, log):
    """Log Caffe's summary lines, then our per-layer and per-type tables."""
    names = net.layer_names
    log.info("Average time per layer: ")
    for name, f, b in zip(names, result["forward"], result["backward"]):
        log.info("%10s\tforward: %s ms.", name, _fmt(f))
        log.info("%10s\tbackward: %s ms.", name, _fmt(b))
    log.info("Average Forward pass: %s ms.", _fmt(result["forward_ms"]))
    log.info("Average Backward pass: %s ms.", _fmt(result["backward_ms"]))
    log.info("Average Forward-Backward: %s ms.", _fmt(result["forward_backward_ms"]))
    log.info("Total Time: %s ms.", _fmt(result["total_ms"]))
    log.info("*** Benchmark ends ***")
    for line in table_lines(net, result):
        log.info("%s", line)


def table_lines(net, result):
    """The extra tables: per layer (name, type, forward, backward, share) and per type."""
    rows = list(zip(net.layer_names, (l.type for l in net.layers), result["forward"], result["backward"]))
    total = sum(f + b for _, _, f, b in rows) or 1.0
    wn = max([len("layer")] + [len(r[0]) for r in rows])
    wt = max([len("type")] + [len(r[1]) for r in rows])
    lines = ["Per-layer table (ms per iteration):",
             f"{'layer':<{wn}}  {'type':<{wt}}  {'forward':>10}  {'backward':>10}  {'share':>6}"]
    for name, typ, f, b in rows:
        lines.append(f"{name:<{wn}}  {typ:<{wt}}  {f:10.3f}  {b:10.3f}  {100 * (f + b) / total:5.1f}%")
    by_type = {}
    for _, typ, f, b in rows:
        entry = by_type.setdefault(typ, [0, 0.0, 0.0])
        entry[0] += 1
        entry[1] += f
        entry[2] += b
    lines.append("Time per layer type (ms per iteration):")
    lines.append(f"{'type':<{wt}}  {'layers':>6}  {'forward':>10}  {'backward':>10}  {'share':>6}")
    for typ, (count, f, b) in sorted(by_type.items(), key=lambda kv: -(kv[1][1] + kv[1][2])):
        lines.append(f"{typ:<{wt}}  {count:6d}  {f:10.3f}  {b:10.3f}  {100 * (f + b) / total:5.1f}%")
    return lines


def main(argv=None):
    """Run ``caffe time``; returns the exit status (0 ok, 1 error)."""
    # parse and apply --threads before anything imports NumPy (the framework does)
    usage_error, how = None, "default"
    try:
        args = parse_args(argv)
        how = set_threads(args.threads)
    except UsageError as exc:
        usage_error = exc
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    from framework.logging_util import get_logger, init_logging

    init_logging()
    log = get_logger("tools.time")
    if usage_error is not None:
        log.error("time.py: %s (see --help)", usage_error)
        return 1
    try:
        if not args.model:
            raise UsageError("Need a model definition to time (--model).")
        if args.iterations < 1:
            raise UsageError(f"--iterations must be >= 1 (got {args.iterations})")
        if args.warmup < 1:
            raise UsageError(f"--warmup must be >= 1 (got {args.warmup})")
        for path, what in ((args.model, "net definition (--model)"), (args.weights, "weights file (--weights)")):
            if path and not os.path.isfile(path):
                raise UsageError(f"{what} not found: {path}")
        desc, threads = blas_info()
        log.info("Use CPU.")
        log.info("BLAS: %s, %s thread(s) (set by: %s)", desc, threads, how)
        stages = [s for value in args.stage for s in value.split(",") if s]
        net = load_net(args.model, args.phase, args.batch, args.weights, args.level, stages)
        fill_inputs(net, args.seed)
        result = time_layers(net, args.iterations, args.warmup, log)
        report(net, result, log)
    except UsageError as exc:
        log.error("time.py: %s", exc)
        return 1
    except KeyboardInterrupt:
        log.error("time.py: interrupted")
        return 1
    except Exception as exc:  # one line, no traceback (set CAFFE_TRACEBACK=1 to see it)
        if os.environ.get("CAFFE_TRACEBACK"):
            raise
        log.error("time.py: %s: %s", type(exc).__name__, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
