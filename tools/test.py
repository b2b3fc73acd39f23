"""Score a trained net, like Caffe's ``caffe test``.

    python tools/test.py --model models/lenet/lenet_train_test.prototxt \\
        --weights examples_out/lenet_iter_2000.caffemodel --iterations 10

Runs ``--iterations`` forward passes (default 50) of the net in phase TEST (or
``--phase TRAIN``) with the given weights, logging every output of every batch
("Batch 3, accuracy = 0.98"), then the mean loss ("Loss: ...") and the mean of
each output ("accuracy = 0.981", "loss = 0.06 (* 1 = 0.06 loss)"), as caffe.cpp
does.  --stage and --level select layers by NetState rules.

Exit status 0 on success, 1 on any error (reported on one line).
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from framework.errors import CaffeError  # noqa: E402
from framework.logging_util import fmt, get_logger, init_logging  # noqa: E402

log = get_logger("tools.test")


class UsageError(Exception):
    """A bad command line (reported on one line, exit status 1)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def parse_args(argv=None):
    """Parse the command line (raises UsageError on a bad one)."""
    p = _Parser(prog="test.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="the net definition (prototxt); required")
    p.add_argument("--weights", help="the trained weights (.caffemodel or .caffemodel.h5); required")
    p.add_argument("--iterations", type=int, default=50, help="number of batches to run (default 50)")
    p.add_argument("--phase", default="TEST", type=str.upper, choices=("TEST", "TRAIN"),
                   help="net phase (default TEST)")
    p.add_argument("--stage", action="append", default=[],
                   help="network stage(s); repeat the flag or separate with ','")
    p.add_argument("--level", type=int, default=0, help="network level (default 0)")
    return p.parse_args(argv)


def score(net, iterations):
    """Run ``iterations`` forwards; log per-batch and mean outputs as caffe.cpp test().

    Returns ``(mean loss, {output name: mean})`` (an array for multi-value outputs).
    """
    log.info("Running for %d iterations.", iterations)
    sums, loss = None, np.float32(0)
    for i in range(iterations):
        loss += np.float32(net.forward_loss())
        values = [np.asarray(net.blobs[name].data, dtype=np.float32).ravel() for name in net.outputs]
        for name, v in zip(net.outputs, values):
            for score_value in v:
                log.info("Batch %d, %s = %s", i, name, fmt(score_value))
        if sums is None:
            sums = [v.copy() for v in values]
        else:
            for acc, v in zip(sums, values):
                acc += v
    loss /= np.float32(max(iterations, 1))
    log.info("Loss: %s", fmt(loss))
    means = {}
    for name, acc in zip(net.outputs, sums or []):
        mean = acc / np.float32(iterations)
        weight = np.float32(net.output_loss_weights.get(name, 0.0))
        for value in mean:
            suffix = f" (* {fmt(weight)} = {fmt(weight * value)} loss)" if weight else ""
            log.info("%s = %s%s", name, fmt(value), suffix)
        means[name] = float(mean[0]) if mean.size == 1 else mean
    return float(loss), means


def main(argv=None):
    """Run ``caffe test``; returns the exit status (0 ok, 1 error)."""
    init_logging()
    try:
        args = parse_args(argv)
    except UsageError as exc:
        log.error("test.py: %s (see --help)", exc)
        return 1
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    try:
        if not args.model:
            raise UsageError("Need a model definition to score (--model).")
        if not args.weights:
            raise UsageError("Need model weights to score (--weights).")
        if args.iterations < 1:
            raise UsageError(f"--iterations must be >= 1 (got {args.iterations})")
        for path, what in ((args.model, "net definition (--model)"), (args.weights, "weights file (--weights)")):
            if not os.path.isfile(path):
                raise UsageError(f"{what} not found: {path}")
        import framework
        stages = [s for value in args.stage for s in value.split(",") if s]
        phase = framework.TEST if args.phase == "TEST" else framework.TRAIN
        net = framework.Net(args.model, phase, level=args.level, stages=stages)
        net.copy_from(args.weights)
        score(net, args.iterations)
    except UsageError as exc:
        log.error("test.py: %s", exc)
        return 1
    except (CaffeError, OSError) as exc:
        log.error("test.py: %s", exc)
        return 1
    except KeyboardInterrupt:
        log.error("test.py: interrupted")
        return 1
    except Exception as exc:  # one line, no traceback (set CAFFE_TRACEBACK=1 to see it)
        if os.environ.get("CAFFE_TRACEBACK"):
            raise
        log.error("test.py: %s: %s", type(exc).__name__, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
