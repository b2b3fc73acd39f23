"""Train a net from a solver prototxt, like Caffe's ``caffe train``.

    python tools/train.py --solver models/lenet/lenet_solver.prototxt
    python tools/train.py --solver S --weights A.caffemodel[,B.caffemodel]   # fine-tune
    python tools/train.py --solver S --snapshot S_iter_500.solverstate      # resume

Flags follow caffe.cpp: --weights and --snapshot cannot be combined; --stage and
--level set the training net's NetState (train_state); SIGINT stops training
(after the final snapshot, with snapshot_after_train) and SIGHUP snapshots, unless
--sigint_effect / --sighup_effect say otherwise.  Two flags are ours: --iterations
overrides the solver's max_iter (``caffe train`` has no such override) and --model
replaces the solver's net (net / train_net / test_net fields) by the given prototxt.
Paths inside the solver file are relative to the current directory, as in Caffe.

Log lines use Caffe's format on stderr.  Exit status 0 on success, 1 on any error
(reported on one line).
"""
import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from framework.errors import CaffeError  # noqa: E402
from framework.logging_util import ProgressBar, get_logger, init_logging  # noqa: E402

log = get_logger("tools.train")

EFFECTS = ("stop", "snapshot", "none")


class UsageError(Exception):
    """A bad command line (reported on one line, exit status 1)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def _stages(values):
    """--stage may repeat and may hold comma-separated names (caffe.cpp splits on ',')."""
    out = []
    for value in values or []:
        out.extend(s for s in value.split(",") if s)
    return out


def parse_args(argv=None):
    """Parse the command line (raises UsageError on a bad one)."""
    p = _Parser(prog="train.py", description=__doc__.split("\n\n")[0],
                epilog="--iterations, --model and --threads are not caffe train flags: --iterations overrides the "
                       "solver's max_iter, --model replaces the solver's net definition, --threads "
                       "splits each batch over replicas of the net.")
    p.add_argument("--solver", help="the solver definition (solver.prototxt); required")
    p.add_argument("--weights", help="pretrained weights to fine-tune from, comma-separated "
                                     "(cannot be combined with --snapshot)")
    p.add_argument("--snapshot", help="a .solverstate (or .solverstate.h5) to resume training from")
    p.add_argument("--iterations", type=int, default=None,
                   help="override the solver's max_iter (not in caffe train)")
    p.add_argument("--stage", action="append", default=[],
                   help="network stage(s) of the training net; repeat the flag or separate with ','")
    p.add_argument("--level", type=int, default=0, help="network level of the training net (default 0)")
    p.add_argument("--sigint_effect", default="stop", choices=EFFECTS,
                   help="what SIGINT (Ctrl-C) does: stop (default; the final snapshot is still "
                        "written), snapshot, or none")
    p.add_argument("--sighup_effect", default="snapshot", choices=EFFECTS,
                   help="what SIGHUP does: snapshot (default), stop, or none")
    p.add_argument("--model", help="replace the solver's net (net/train_net/test_net) with this "
                                   "prototxt (not in caffe train)")
    p.add_argument("--threads", type=int, default=1,
                   help="split each training batch over this many replicas of the net, one per core "
                        "(framework.data_parallel; not in caffe train; default 1: off)")
    return p.parse_args(argv)


class SignalHandler:
    """Caffe's SignalHandler: remembers SIGINT/SIGHUP and maps them to solver actions."""

    def __init__(self, sigint_effect, sighup_effect):
        self.effects = {signal.SIGINT: sigint_effect}
        if hasattr(signal, "SIGHUP"):
            self.effects[signal.SIGHUP] = sighup_effect
        self.pending = []
        self.previous = {}

    def _handle(self, signum, frame):
        self.pending.append(signum)

    def __enter__(self):
        for signum in self.effects:
            try:
                self.previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        return False

    def action(self):
        """The action for the oldest pending signal ("none" when there is none)."""
        while self.pending:
            signum = self.pending.pop(0)
            effect = self.effects.get(signum, "none")
            if effect != "none":
                log.info("Got %s: requesting %s", signal.Signals(signum).name, effect)
                return effect
        return "none"


def _check_file(path, what):
    if not os.path.exists(path):
        raise UsageError(f"{what} not found: {path}")
    if os.path.isdir(path) and not path.endswith(".h5"):
        raise UsageError(f"{what} is a directory, not a file: {path}")


def build_solver(args):
    """Read the solver definition, apply the flags, and create the solver (no training yet)."""
    import framework
    from framework.solver import read_solver_param

    if not args.solver:
        raise UsageError("Need a solver definition to train (--solver).")
    if args.snapshot and args.weights:
        raise UsageError("Give a snapshot to resume training or weights to finetune but not both "
                         "(--snapshot and --weights).")
    _check_file(args.solver, "solver file (--solver)")
    if args.snapshot:
        _check_file(args.snapshot, "solver state (--snapshot)")
    weights = [w for w in (args.weights or "").split(",") if w] if args.weights is not None else []
    if args.weights is not None and not weights:
        raise UsageError("--weights needs at least one weights file")
    for w in weights:
        _check_file(w, "weights file (--weights)")
    if args.model:
        _check_file(args.model, "net definition (--model)")
    if args.iterations is not None and args.iterations < 0:
        raise UsageError(f"--iterations must be >= 0 (got {args.iterations})")

    param = read_solver_param(args.solver)
    param.train_state.level = args.level
    param.train_state.stage.extend(_stages(args.stage))
    if args.model:
        for field in ("net", "net_param", "train_net", "train_net_param", "test_net", "test_net_param"):
            param.ClearField(field)
        param.net = args.model
    if args.iterations is not None:
        param.max_iter = args.iterations
    if args.snapshot:
        param.ClearField("weights")
    elif weights:
        param.ClearField("weights")
        param.weights.append(",".join(weights))
    return framework.get_solver(param)


def main(argv=None):
    """Run ``caffe train``; returns the exit status (0 ok, 1 error)."""
    init_logging()
    try:
        args = parse_args(argv)
    except UsageError as exc:
        log.error("train.py: %s (see --help)", exc)
        return 1
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    try:
        with SignalHandler(args.sigint_effect, args.sighup_effect) as handler:
            solver = build_solver(args)
            if args.threads > 1:
                from framework import data_parallel
                data_parallel.enable_training(solver.net, args.threads)
                log.info("Splitting each batch over %d replicas of the training net", args.threads)
            solver.set_action_function(handler.action)
            if args.snapshot:
                log.info("Resuming from %s", args.snapshot)
                solver.restore(args.snapshot)
            log.info("Starting Optimization")
            max_iter = solver.param.max_iter
            with ProgressBar(max_iter, start=solver.iter) as bar:
                solver.add_callback(lambda: None, lambda: bar.update(solver.iter + 1))
                solver.solve()
            log.info("Optimization Done.")
    except UsageError as exc:
        log.error("train.py: %s", exc)
        return 1
    except (CaffeError, OSError) as exc:
        log.error("train.py: %s", exc)
        return 1
    except KeyboardInterrupt:
        log.error("train.py: interrupted")
        return 1
    except Exception as exc:  # one line, no traceback (set CAFFE_TRACEBACK=1 to see it)
        if os.environ.get("CAFFE_TRACEBACK"):
            raise
        log.error("train.py: %s: %s", type(exc).__name__, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
