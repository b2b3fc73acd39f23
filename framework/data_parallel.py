"""Inference with the batch split over threads: one replica of the net per core.

NumPy runs element-wise passes on one core, and OpenBLAS's idle workers spin on
the others for a while after each multi-threaded GEMM, so a net's memory-bound
layers cannot simply be split over threads (see docs/benchmarks.md).  Splitting
the *batch* instead gives each core a whole net to run: every replica shares the
original net's weights, runs its slice of the images with single-threaded BLAS,
and no thread waits on another until the outputs are gathered.  ResNet-50 at
batch 8 on two cores: 474 -> 355 ms (folded, memory-saving nets).  The outputs
are the whole batch's up to float32 round-off: a slice may take another GEMM
layout or BLAS blocking than the whole batch.

    fast = framework.DataParallelNet(net)          # threads: the BLAS thread count
    probs = fast.forward(data=batch)["prob"]

Inference only, for nets fed through Input blobs whose first axis is the batch.
While ``forward`` runs, NumPy's BLAS is held to one thread in the whole process
(threadpoolctl); run other BLAS work elsewhere meanwhile at a loss of speed only.
"""
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .errors import NetError


def _blas_threads():
    from layers.parallel import copy_threads
    return copy_threads()


class DataParallelNet:
    """``threads`` replicas of the built ``net`` sharing its weights, each forwarding a slice of
    the batch on its own thread: ``net`` itself and ``threads - 1`` new Nets whose blobs start at
    1/threads of its batch.  ``memory_saving`` (default on) is set on every replica, ``net``
    included (see ``Net.memory_saving``).

    ``forward(**inputs)`` splits each input along axis 0 into contiguous slices, one per
    replica, and returns {output: array} with the replicas' outputs joined back in order, as
    ``Net.forward`` would for the whole batch.  A batch of one runs on the first replica alone
    with BLAS threads as they are.
    """

    def __init__(self, net, threads=None, memory_saving=True):
        from threadpoolctl import ThreadpoolController

        from .net import Net

        self.net = net
        self.threads = max(1, int(threads or _blas_threads()))
        if not net.inputs:
            raise NetError(f"net '{net.name}' has no input blobs: DataParallelNet splits the inputs "
                           f"given to forward(), so data layers cannot be used")
        # ``net`` itself is the first replica (its blobs take the first slice's shapes)
        self.replicas = [net]
        param = _replica_param(net, self.threads)
        for _ in range(self.threads - 1):
            replica = Net(param)
            replica.share_trained_layers_with(net)
            self.replicas.append(replica)
        for replica in self.replicas:
            replica.memory_saving = memory_saving
        self.outputs = list(self.replicas[0].outputs)
        self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="net-replica") \
            if self.threads > 1 else None
        self._blas = ThreadpoolController()

    def forward(self, blobs=None, **inputs):
        """Run every replica on its slice of ``inputs``; return {output (and blobs): array}."""
        unknown = [name for name in inputs if name not in self.net.inputs]
        if unknown:
            raise NetError(f"forward() got {unknown}, which are not inputs of net '{self.net.name}' "
                           f"(inputs: {', '.join(self.net.inputs)})")
        arrays = {name: np.asarray(value) for name, value in inputs.items()}
        sizes = {name: a.shape[0] if a.ndim else None for name, a in arrays.items()}
        if len(set(sizes.values())) > 1 or None in sizes.values():
            raise NetError(f"forward() inputs of net '{self.net.name}' need the same batch size on "
                           f"axis 0 to be split over threads (got {sizes})")
        batch = next(iter(sizes.values())) if sizes else 0
        parts = min(self.threads, batch)
        if parts <= 1:
            return self._copies(self.replicas[0].forward(blobs=blobs, **arrays))
        bounds = [batch * i // parts for i in range(parts + 1)]

        def run(k):
            from layers.parallel import one_thread_per_pass
            with one_thread_per_pass():
                piece = {name: a[bounds[k]:bounds[k + 1]] for name, a in arrays.items()}
                return self.replicas[k].forward(blobs=blobs, **piece)

        with self._blas.limit(limits=1, user_api="blas"):
            futures = [self._pool.submit(run, k) for k in range(1, parts)]
            results = [run(0)] + [f.result() for f in futures]
        return {name: np.concatenate([r[name] for r in results]) for name in results[0]}

    @staticmethod
    def _copies(outputs):
        return {name: np.array(value) for name, value in outputs.items()}


def _replica_param(net, threads):
    """``net``'s definition (automatic Split layers removed; the replica adds its own) in the
    phase it was built in, its Input blobs holding 1/threads of the batch (rounded up), so the
    replicas' blobs start at their share's size (``forward`` reshapes them to each slice)."""
    from .fuse import _strip_auto_splits

    param = _strip_auto_splits(net.param)
    param.state.phase = net.phase
    for layer in param.layer:
        if layer.type == "Input":
            for shape in layer.input_param.shape:
                if len(shape.dim):
                    shape.dim[0] = -(-shape.dim[0] // threads)
    return param
