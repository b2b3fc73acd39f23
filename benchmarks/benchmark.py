"""Our framework against PyTorch on the same nets, weights and inputs.

    python benchmarks/benchmark.py                 # all cases, 2 threads, both OpenBLAS settings
    python benchmarks/benchmark.py --tiny          # seconds: tiny batches, 1-2 repeats (CI)
    python benchmarks/benchmark.py --cases resnet50_b8 --repeat 20 --json out.json

Cases (``--cases``, comma-separated):
  resnet50_b1, resnet50_b8   ResNet-50 deploy inference, batch 1 / 8
  resnet50_train_b8          ResNet-50 training step (forward + backward + SGD update,
                             BatchNorm on batch statistics), batch 8
  lenet_train_b64            LeNet training step, batch 64
  caffenet_b10               CaffeNet deploy inference (LRN, grouped conv), batch 10

For each case: both sides get the same weights (random, see nets.randomize_weights)
and the same input; the outputs are compared first (max rel diff = max|ours - torch| /
max|torch| over each output, and in training over the loss and every parameter
gradient); then ``--repeat`` pairs are timed, one run of each side per pair, the
order alternating, in one process, so that drift of the machine hits both alike.
Printed: our median, PyTorch's median, each side's middle half of the runs (first to
third quartile: how steady the side was), the median of the per-pair ratios ours/torch,
the effective GFLOP/s (convolution + inner product multiply-adds, x3 for a training
step), and peak memory.

Peak memory is measured in fresh subprocesses, one per side and case: peak RSS
(VmHWM, reset through /proc/self/clear_refs after the net is built) during two
forward passes, minus the RSS after the imports; so it counts the weights, every
activation and workspace buffer, and any lazily allocated library memory
(OpenBLAS buffers, oneDNN caches), but not the interpreter and the libraries' code.
The children run with MALLOC_MMAP_THRESHOLD_=131072 (large blocks always mmap'ed,
so freed memory leaves the RSS at once) and call malloc_trim after building, so
the RSS follows live memory rather than glibc's heap fragmentation; both sides alike.
Ours is also given as NumPy's own allocations (tracemalloc traced from before the
net is built, peak reset with the RSS one: live weights, blobs and temporaries during
the forwards; tracing costs our side a few MiB of RSS).

Threads: ``--threads N`` (default 2) sets OPENBLAS_NUM_THREADS/OMP_NUM_THREADS before
NumPy is imported, and torch.set_num_threads(N).  The machine's environment may
set OPENBLAS_CORETYPE (here: Haswell, which holds OpenBLAS to AVX2 kernels); this
script never changes its own environment, but unless ``--no-blas-variants`` it
re-runs itself in a subprocess whose environment lacks OPENBLAS_CORETYPE and
prints both tables.  PyTorch is optional (``pip install .[bench]``): without it
only our side runs, and the script says why.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CASES = ("resnet50_b1", "resnet50_b8", "resnet50_train_b8", "lenet_train_b64", "caffenet_b10")
#: timed pairs per case (full run)
REPEATS = {"resnet50_b1": 20, "resnet50_b8": 10, "resnet50_train_b8": 6,
           "lenet_train_b64": 40, "caffenet_b10": 10}
#: target ratio ours/PyTorch (medians, 2 threads)
TARGETS = {"resnet50_b1": 1.0, "resnet50_b8": 0.8, "resnet50_train_b8": 1.0,
           "lenet_train_b64": 1.0, "caffenet_b10": 1.0}
MEMORY_CASES = ("resnet50_b8", "resnet50_b1", "caffenet_b10")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="benchmark.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny batches and 1-2 repeats: shows it works")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    p.add_argument("--threads", type=int, default=2, help="BLAS / torch threads (default 2)")
    p.add_argument("--repeat", type=int, default=None, help="timed pairs per case (default: per case)")
    p.add_argument("--gap", type=float, default=0.25,
                   help="seconds of sleep between timed runs, so one side's idle-spinning "
                        "threads do not slow the other (default 0.25: OpenBLAS's threads spin ~0.1 s after work)")
    p.add_argument("--no-torch", action="store_true", help="run our side only")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--memory-cases", default=",".join(MEMORY_CASES),
                   help=f"cases whose peak memory is measured (default {','.join(MEMORY_CASES)})")
    p.add_argument("--no-blas-variants", action="store_true",
                   help="do not re-run with OPENBLAS_CORETYPE removed from the environment")
    p.add_argument("--json", help="write the results (both settings) to this file")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    p.add_argument("--side", help=argparse.SUPPRESS)
    p.add_argument("--weights-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.cases = [c for c in args.cases.split(",") if c]
    args.memory_cases = [c for c in args.memory_cases.split(",") if c]
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
    if args.threads < 1:
        p.error(f"--threads must be >= 1 (got {args.threads})")
    return args


def set_thread_env(threads):
    """BLAS/OpenMP pool sizes: must run before NumPy (or torch) is imported."""
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)


# -- environment description ------------------------------------------------------

def machine_info(threads, torch=None):
    """CPU, core count, BLAS (threadpoolctl or numpy's build config), versions, OPENBLAS_CORETYPE."""
    import numpy as np

    info = {"cpu": "unknown", "cores": os.cpu_count(), "threads": threads,
            "numpy": np.__version__, "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "(unset)")}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import threadpoolctl
        pools = threadpoolctl.threadpool_info()
        blas = [p for p in pools if p.get("user_api") == "blas" and "openblas" in p.get("prefix", "")
                or p.get("internal_api") == "openblas"]
        pool = blas[0] if blas else next((p for p in pools if p.get("user_api") == "blas"), None)
        if pool:
            info["blas"] = (f"{pool.get('internal_api')} {pool.get('version')}, kernels "
                            f"{pool.get('architecture')}, {pool.get('num_threads')} threads")
    except ImportError:
        config = np.show_config(mode="dicts")
        blas = config.get("Build Dependencies", {}).get("blas", {})
        info["blas"] = (f"{blas.get('name')} {blas.get('version')} (threadpoolctl not installed: "
                        f"kernel set unknown; OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')})")
    try:
        with open("/proc/loadavg") as f:
            info["loadavg_start"] = " ".join(f.read().split()[:3])
    except OSError:
        pass
    info["cpu_times_start"] = read_cpu_times()
    if torch is not None:
        info["torch"] = f"{torch.__version__}, {torch.get_num_threads()} threads, " \
                        f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
    return info


def read_cpu_times(path="/proc/stat"):
    """The machine's cumulative CPU times (the "cpu" line of /proc/stat, in clock ticks), or None."""
    try:
        with open(path) as f:
            return [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None


def steal_share(before, after):
    """Of the CPU time used or stolen between two :func:`read_cpu_times` readings, the share the
    hypervisor gave to other guests (steal, the 8th field), or None.  On a virtual machine this
    is time our threads wanted the cores and did not get: a run with more than a few percent
    measured a slowed machine."""
    if not before or not after or len(before) < 8 or len(after) < 8:
        return None
    delta = [b - a for a, b in zip(before, after)]
    user, nice, system, _idle, _iowait, irq, softirq, steal = delta[:8]
    used = user + nice + system + irq + softirq + steal
    return steal / used if used > 0 else None


# -- cases ------------------------------------------------------------------------

def case_spec(name, tiny):
    """(kind, net-param builder, batch) for a case; tiny mode shrinks batches (and LeNet's)."""
    from benchmarks import nets

    if name == "resnet50_b1":
        return "infer", lambda: nets.resnet50_deploy(1)
    if name == "resnet50_b8":
        return "infer", lambda: nets.resnet50_deploy(1 if tiny else 8)
    if name == "resnet50_train_b8":
        return "train", lambda: nets.resnet50_train(1 if tiny else 8)
    if name == "lenet_train_b64":
        return "train", lambda: nets.lenet_train(4 if tiny else 64)
    if name == "caffenet_b10":
        return "infer", lambda: nets.caffenet_deploy(1 if tiny else 10)
    raise KeyError(name)


def make_inputs(net, seed=0):
    """Random N(0, 1) data, labels uniform over the classes of the last layer's output."""
    import numpy as np

    rng = np.random.default_rng(seed)
    inputs = {}
    for name in net.inputs:
        shape = net.blobs[name].shape
        if "label" in name:
            inputs[name] = rng.integers(0, 10, shape).astype(np.float32)
        else:
            inputs[name] = rng.standard_normal(shape, dtype=np.float32)
    return inputs


def solver_param(net_param):
    """SGD, lr 0.01, momentum 0.9, weight decay 5e-4: PyTorch's SGD with the same values."""
    from proto import caffe_pb2

    p = caffe_pb2.SolverParameter(type="SGD", base_lr=0.01, momentum=0.9, weight_decay=5e-4,
                                  lr_policy="fixed", max_iter=10 ** 9, display=0, snapshot=0)
    p.net_param.CopyFrom(net_param)
    return p


def rel_diff(ours, theirs):
    """max|a - b| / max|b| (0 when both are zero)."""
    import numpy as np

    a = np.asarray(ours, dtype=np.float64)
    b = np.asarray(theirs, dtype=np.float64)
    scale = np.abs(b).max() if b.size else 0.0
    err = np.abs(a - b).max() if b.size else 0.0
    return float(err / scale) if scale else float(err)


class Case:
    """One benchmark case: our runner, PyTorch's (or None), the agreement check, FLOPs."""

    def __init__(self, name, tiny, torch=None):
        import numpy as np

        import framework
        from benchmarks import nets

        self.name = name
        self.kind, build = case_spec(name, tiny)
        param = build()
        if self.kind == "infer":
            self.net = framework.Net(param)
            self.solver = None
        else:
            self.solver = framework.get_solver(solver_param(param))
            self.net = self.solver.net
        nets.randomize_weights(self.net)
        self.inputs = make_inputs(self.net)
        self.flops = nets.conv_fc_flops(self.net) * (3 if self.kind == "train" else 1)
        self.torch = torch
        self.mirror = None
        if torch is not None:
            from benchmarks.torch_mirror import TorchMirror
            self.mirror = TorchMirror(self.net, train=self.kind == "train")
            self.tinputs = {k: torch.from_numpy(np.array(v)) for k, v in self.inputs.items()}
            if self.kind == "train":
                self.optimizer = torch.optim.SGD(self.mirror.parameters(), lr=0.01, momentum=0.9,
                                                 weight_decay=5e-4)
        if self.kind == "train":
            for k, v in self.inputs.items():
                self.net.blobs[k].data[...] = v
        # our inference as a user would run it for speed and memory: BatchNorm/Scale
        # folded into the convolutions (framework/fuse.py), memory_saving on, the batch split
        # over threads; training: a second solver from the same weights whose steps split the
        # batch over threads (framework.data_parallel.enable_training)
        self.fast_net = self.fast_solver = None
        if self.kind == "infer":
            self.fast_net = make_fast_net(self.net, param)
        else:
            self.fast_solver = make_fast_solver(self.net, param, self.inputs)

    # -- one run of each side ------------------------------------------------------
    def sides(self):
        """{side name: runner}: "ours", "ours*" (inference: folded + memory saving, batch split
        over threads), "torch"."""
        out = {"ours": self.run_ours}
        if self.fast_net is not None or self.fast_solver is not None:
            out["ours*"] = self.run_ours_fast
        if self.mirror is not None:
            out["torch"] = self.run_torch
        return out

    def run_ours(self):
        if self.kind == "infer":
            self.net.forward(**self.inputs)
        else:
            self.solver.step(1)

    def run_ours_fast(self):
        if self.fast_solver is not None:
            self.fast_solver.step(1)
        else:
            self.fast_net.forward(**self.inputs)

    def run_torch(self):
        torch = self.torch
        if self.kind == "infer":
            with torch.inference_mode():
                self.mirror(**self.tinputs)
        else:
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.mirror(**self.tinputs)[self.mirror.outputs[0]]
            loss.backward()
            self.optimizer.step()

    # -- agreement -----------------------------------------------------------------
    def check(self):
        """Agreement before timing: {"output": max rel diff} (inference), or {"loss": rel diff,
        "grad_l2": ||ours - torch|| / ||torch|| over all parameter gradients} (training)."""
        import numpy as np

        torch = self.torch
        if self.kind == "infer":
            ours = {k: v.copy() for k, v in self.net.forward(**self.inputs).items()}
            fast = self.fast_net.forward(**self.inputs)
            with torch.inference_mode():
                theirs = self.mirror(**self.tinputs)
            return {"output": max(rel_diff(ours[k], theirs[k].numpy()) for k in ours),
                    "output*": max(rel_diff(fast[k], theirs[k].numpy()) for k in ours)}
        net = self.net
        net.clear_param_diffs()
        loss = net.forward_backward()
        out = self.mirror(**self.tinputs)[self.mirror.outputs[0]]
        out.backward()

        def grad_l2(of):
            num = den = 0.0
            for (layer, i), tensor in self.mirror.params.items():
                if tensor.grad is not None:
                    blob = of.params[layer][i]
                    grad = tensor.grad.numpy().astype(np.float64)
                    ours = blob.diff.T if grad.shape != blob.shape else blob.diff
                    num += float(((ours - grad) ** 2).sum())
                    den += float((grad ** 2).sum())
            return (num / den) ** 0.5 if den else 0.0

        worst = {"loss": rel_diff(loss, out.item()), "grad_l2": grad_l2(net)}
        net.clear_param_diffs()
        if self.fast_solver is not None:
            fast = self.fast_solver.net
            fast.clear_param_diffs()
            worst["loss*"] = rel_diff(fast.forward_backward(), out.item())
            worst["grad_l2*"] = grad_l2(fast)
            fast.clear_param_diffs()
        self.optimizer.zero_grad(set_to_none=True)
        return worst


def time_case(case, repeats, gap):
    """Timed rounds, one run of every side per round, the order rotating; summary in ms.

    Ratios are taken per round (ours / torch in the same round), then their median.
    """
    clock = time.perf_counter
    sides = case.sides()
    for _ in range(2):  # warm-up: allocations, lazy initialisation, caches
        for run in sides.values():
            run()
    names = list(sides)
    runs = {name: [] for name in names}
    for i in range(repeats):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            time.sleep(gap)
            t0 = clock()
            sides[name]()
            runs[name].append((clock() - t0) * 1e3)
    result = {"repeats": repeats, "runs": runs}
    for name in names:
        key = name.replace("*", "_fast")
        median = statistics.median(runs[name])
        result[f"{key}_ms"] = median
        if len(runs[name]) >= 2:  # the first and third quartiles
            quartiles = statistics.quantiles(runs[name], n=4)
            result[f"{key}_quartiles_ms"] = [quartiles[0], quartiles[2]]
        result[f"gflops_{key}"] = case.flops / (median * 1e6)
        if "torch" in runs and name != "torch":
            result[f"ratio_{key}"] = statistics.median(a / b for a, b in zip(runs[name], runs["torch"]))
    return result


def make_fast_net(net, param):
    """A second Net for ``param`` (built as ``net``, sharing its weights), with BatchNorm/Scale
    folded into the convolutions when it has any (framework.fuse) and memory_saving on; for a
    batch of more than one image, wrapped in a framework.DataParallelNet (one replica per BLAS
    thread).  Either has ``forward(**inputs)`` returning the outputs."""
    import framework

    if any(layer.type == "BatchNorm" for layer in net.layers):
        from framework.fuse import fuse_net
        fast = fuse_net(net)
    else:
        fast = framework.Net(param)
        fast.share_trained_layers_with(net)
    fast.memory_saving = True
    batch = fast.blobs[fast.inputs[0]].shape[0]
    return framework.DataParallelNet(fast) if batch > 1 else fast


def make_fast_solver(net, param, inputs):
    """A solver for ``param`` (solver_param's settings) starting from ``net``'s weights, fed
    ``inputs``, whose steps split the batch over threads (framework.data_parallel)."""
    import framework
    from benchmarks import nets
    from framework import data_parallel

    solver = framework.get_solver(solver_param(param))
    nets.load_weights_dict(solver.net, nets.weights_dict(net))
    for k, v in inputs.items():
        solver.net.blobs[k].data[...] = v
    data_parallel.enable_training(solver.net)
    return solver


# -- memory (subprocesses) ----------------------------------------------------------

def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def _reset_peak():
    """Reset VmHWM to the current RSS (Linux clear_refs 5); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim():
    """glibc's malloc_trim(0), where available (releases free heap memory to the system)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_child(args):
    """In a fresh process: build one side of a case, run two forwards, print peak memory (JSON)."""
    import gc

    import numpy as np

    import framework  # noqa: F401  (imports counted in the baseline)
    from benchmarks import nets

    torch = None
    if args.side == "torch":
        import torch
        torch.set_num_threads(args.threads)
    base = _status_kib("VmRSS")
    if args.side != "torch":
        # NumPy reports its allocations to tracemalloc: the weights, blobs and temporaries
        import tracemalloc
        tracemalloc.start()
    weights = np.load(args.weights_file)
    kind, build = case_spec(args.memory_child, args.tiny)
    param = build()
    net = framework.Net(param)
    nets.load_weights_dict(net, weights)
    inputs = make_inputs(net)
    out = {"case": args.memory_child, "side": args.side}
    if args.side == "ours":
        run = lambda: net.forward(**inputs)  # noqa: E731
    elif args.side == "ours*":
        fast = make_fast_net(net, param)
        del net  # only the folded net's weights stay
        gc.collect()
        run = lambda: fast.forward(**inputs)  # noqa: E731
    else:
        from benchmarks.torch_mirror import TorchMirror
        mirror = TorchMirror(net)
        inputs = {k: torch.from_numpy(v) for k, v in inputs.items()}
        del net  # the torch side keeps only its own copy of the weights
        gc.collect()

        def run():
            with torch.inference_mode():
                mirror(**inputs)
    del weights
    gc.collect()
    _malloc_trim()  # hand memory freed during setup (heap fragments) back to the system
    out["setup_kib"] = _status_kib("VmRSS") - base
    reset = _reset_peak()
    if args.side != "torch":
        tracemalloc.reset_peak()
    run()
    run()
    out["peak_kib"] = (_status_kib("VmHWM") if reset else _status_kib("VmRSS")) - base
    out["peak_exact"] = reset
    if args.side != "torch":
        out["traced_peak_kib"] = tracemalloc.get_traced_memory()[1] // 1024
        tracemalloc.stop()
    print(json.dumps(out))


def measure_memory(case, args, with_torch):
    """Peak memory (MiB above the post-import baseline) of each side, via :func:`memory_child`."""
    import numpy as np

    from benchmarks import nets

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "weights.npz")
        np.savez(path, **nets.weights_dict(case.net))
        sides = ("ours", "ours*") if case.kind == "infer" else ("ours",)
        for side in sides + (("torch",) if with_torch else ()):
            cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", case.name, "--side", side,
                   "--weights-file", path, "--threads", str(args.threads)]
            if args.tiny:
                cmd.append("--tiny")
            # every large block mmap'ed, so that freed memory leaves the RSS at once and the
            # peak RSS is the peak of live memory (glibc otherwise raises its mmap threshold
            # and keeps freed blocks in a fragmented heap); the same for both sides
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"memory subprocess ({case.name}, {side}) failed:\n{proc.stderr[-2000:]}")
            results[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


# -- reporting ----------------------------------------------------------------------

def print_report(info, results, stream=sys.stdout):
    """The machine lines, then one row per case and side: ms, ratio to torch, GFLOP/s, memory."""
    w = stream.write
    w(f"Machine: {info['cpu']}, {info['cores']} cores; threads: {info['threads']}\n")
    w(f"NumPy {info['numpy']}, BLAS: {info.get('blas')}\n")
    w(f"OPENBLAS_CORETYPE: {info['OPENBLAS_CORETYPE']}\n")
    if "loadavg_start" in info:
        w(f"load average (1, 5, 15 min) at start: {info['loadavg_start']}, at end: {info.get('loadavg_end', '?')} "
          f"(other processes share these {info['cores']} cores)\n")
    if info.get("steal_share") is not None:
        w(f"CPU time stolen by the hypervisor during the run (/proc/stat steal): "
          f"{100 * info['steal_share']:.1f}% of the time used\n")
    w(f"PyTorch: {info.get('torch', 'not run: ' + info.get('torch_missing', ''))}\n")
    w("ours* = inference: the same net with BatchNorm/Scale folded into the convolutions and memory_saving\n"
      "        on, batches of more than one image split over one replica per thread (DataParallelNet);\n"
      "        training: each step's batch split over one replica per thread (data_parallel.enable_training)\n")
    w(f"{'case':<18} {'side':<6} {'median ms':>10} {'middle half':>15} {'ours/torch':>10} {'target':>7} "
      f"{'GFLOP/s':>8} {'peak MiB':>9} {'agreement with torch (rel diff)':>32}\n")
    for name, r in results.items():
        t = r["timing"]
        mem = r.get("memory", {})
        agree = r.get("agreement") or {}
        for side in t["runs"]:
            key = side.replace("*", "_fast")
            ratio = t.get(f"ratio_{key}")
            peak = mem.get(side, {}).get("peak_kib")
            if side == "torch":
                diff = ""
            elif side == "ours*":
                diff = " ".join(f"{k[:-1]} {v:.0e}" for k, v in agree.items() if k.endswith("*")) or "-"
            else:
                diff = " ".join(f"{k} {v:.0e}" for k, v in agree.items() if not k.endswith("*")) or "-"
            target = f"<= {TARGETS[name]}" if side != "torch" else ""
            quartiles = t.get(f"{key}_quartiles_ms")
            spread = f"{quartiles[0]:.1f}-{quartiles[1]:.1f}" if quartiles else "-"
            w(f"{name:<18} {side:<6} {t[key + '_ms']:10.1f} {spread:>15} {f'{ratio:.2f}' if ratio else '-':>10} "
              f"{target:>7} {t['gflops_' + key]:8.0f} {f'{peak / 1024:.0f}' if peak else '-':>9} {diff:>32}\n")
    for name, r in results.items():
        for side, m in r.get("memory", {}).items():
            traced = f", NumPy tracemalloc peak {m['traced_peak_kib'] / 1024:.0f} MiB" if "traced_peak_kib" in m else ""
            w(f"  memory {name} {side}: peak {m['peak_kib'] / 1024:.0f} MiB above the post-import RSS "
              f"(after setup {m['setup_kib'] / 1024:.0f} MiB{traced})\n")


def run_all(args):
    """Run every case in this process; return (machine info, results)."""
    torch = None
    missing = ""
    if not args.no_torch:
        try:
            import torch
            torch.set_num_threads(args.threads)
        except ImportError as exc:
            missing = f"PyTorch is not installed ({exc}); install the 'bench' extra (torch==2.13.0)"
            print(f"benchmark: {missing}: timing our side only", file=sys.stderr)
    else:
        missing = "--no-torch"
    info = machine_info(args.threads, torch)
    if missing:
        info["torch_missing"] = missing
    results = {}
    for name in args.cases:
        case = Case(name, args.tiny, torch)
        entry = {}
        if torch is not None:
            entry["agreement"] = case.check()
        repeats = args.repeat or (1 if args.tiny else REPEATS[name])
        entry["timing"] = time_case(case, repeats, 0.0 if args.tiny else args.gap)
        if not args.no_memory and name in args.memory_cases:
            entry["memory"] = measure_memory(case, args, torch is not None)
        results[name] = entry
        del case
    try:
        with open("/proc/loadavg") as f:
            info["loadavg_end"] = " ".join(f.read().split()[:3])
    except OSError:
        pass
    info["steal_share"] = steal_share(info.pop("cpu_times_start", None), read_cpu_times())
    return info, results


def main(argv=None):
    args = parse_args(argv)
    set_thread_env(args.threads)
    if args.memory_child:
        memory_child(args)
        return 0
    info, results = run_all(args)
    print(f"== environment as it is (OPENBLAS_CORETYPE={info['OPENBLAS_CORETYPE']})")
    print_report(info, results)
    report = {"as_is": {"info": info, "results": results}}
    if not args.no_blas_variants and "OPENBLAS_CORETYPE" in os.environ:
        env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "unset.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--no-blas-variants", "--json", out,
                   "--cases", ",".join(args.cases), "--threads", str(args.threads), "--gap", str(args.gap)]
            for flag in ("tiny", "no_torch", "no_memory"):
                if getattr(args, flag):
                    cmd.append("--" + flag.replace("_", "-"))
            cmd += ["--memory-cases", ",".join(args.memory_cases) or ","]
            if args.repeat:
                cmd += ["--repeat", str(args.repeat)]
            proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"the run without OPENBLAS_CORETYPE failed:\n{proc.stderr[-2000:]}")
            with open(out) as f:
                unset = json.load(f)["as_is"]
        print("\n== OPENBLAS_CORETYPE removed from the environment (subprocess)")
        print_report(unset["info"], unset["results"])
        report["coretype_unset"] = unset
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
