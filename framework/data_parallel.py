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

For nets fed through Input blobs whose first axis is the batch.  While they run,
NumPy's BLAS is held to one thread in the whole process (threadpoolctl); other
BLAS work elsewhere meanwhile only loses speed.

Training: :class:`DataParallelTraining` (``enable_training(net)``) does the same
for ``net.forward_backward()`` (what solvers call): the replicas' BatchNorm
layers take their batch statistics over the whole batch (per-channel sums
exchanged between the threads), their losses are weighted by their share of the
images, and their parameter gradients are added into the net's, so a step
computes the whole batch's numbers, float32 round-off apart.
"""
import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import random
from .blob import Blob
from .errors import NetError
from .net import _is_released, _release


def _blas_threads():
    from layers.parallel import _configured_threads
    return _configured_threads()


class _OnThreads:
    """Runs ``task(rank)`` for ranks 0..parts-1, rank 0 on the calling thread and the others on
    a pool, with BLAS held to one thread and our passes unsplit (each thread has its share)."""

    def __init__(self, threads):
        from threadpoolctl import ThreadpoolController

        self.threads = max(1, int(threads or _blas_threads()))
        self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="net-replica") \
            if self.threads > 1 else None
        self._blas = ThreadpoolController()

    @contextlib.contextmanager
    def blas_on_one_thread(self):
        """Within the block, BLAS is held to one thread (process-wide), and this thread's large
        passes and GEMMs (:func:`layers.parallel.matmul`) are split over our pool instead, so
        that no OpenBLAS worker is left spinning when the replicas next start."""
        from layers.parallel import split_over_our_threads

        with self._blas.limit(limits=1, user_api="blas"), split_over_our_threads():
            yield

    def run(self, task, parts):
        """[task(0), ..., task(parts - 1)]; the first error raised (BrokenBarrierError last)."""
        from layers.parallel import one_thread_per_pass

        def alone(rank):
            with one_thread_per_pass():
                return task(rank)

        with self._blas.limit(limits=1, user_api="blas"):
            futures = [self._pool.submit(alone, rank) for rank in range(1, parts)]
            results, errors = [], []
            for get in [lambda: alone(0)] + [f.result for f in futures]:
                try:
                    results.append(get())
                except threading.BrokenBarrierError as e:
                    errors.append(e)
                except BaseException as e:
                    errors.insert(0, e)
        if errors:
            raise errors[0]
        return results


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
        from .net import Net

        self.net = net
        self._threads = _OnThreads(threads)
        self.threads = self._threads.threads
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
        self.tail_start, self._tail_inputs = _fully_connected_tail(net)

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
        head = self.replicas[0]
        end = head.layer_names[self.tail_start - 1] if self.tail_start else None
        wanted = list(blobs or [])
        if end is not None:
            early = [b for b in wanted if head._producer_index(b) < self.tail_start]
            keep = self._tail_inputs + [b for b in early if b not in self._tail_inputs]

        def run(k):
            piece = {name: a[bounds[k]:bounds[k + 1]] for name, a in arrays.items()}
            if end is None:
                return self.replicas[k].forward(blobs=blobs, **piece)
            return self.replicas[k].forward(blobs=keep, end=end, **piece)

        results = self._threads.run(run, parts)
        joined = {name: np.concatenate([r[name] for r in results]) for name in results[0]}
        if end is None:
            return joined
        # the fully connected tail once over the whole batch, its GEMMs split over the cores by
        # rows of the weights: they are read once instead of once per replica.  BLAS stays on
        # one thread: a multi-threaded GEMM here would leave an OpenBLAS worker spinning into
        # the next forward's replicas (CaffeNet b10 called back to back: 142 -> 104 ms).
        for name in self._tail_inputs:
            head.blobs[name].reshape(joined[name].shape)
            head.blobs[name].data[...] = joined[name]
        head._keep_blobs = set(wanted)
        with self._threads.blas_on_one_thread():
            head.forward_from_to(self.tail_start, len(head.layers) - 1)
        out = {name: np.array(head.blobs[name].data) for name in self.outputs}
        out.update({name: joined[name] if name in joined else np.array(head.blobs[name].data) for name in wanted})
        return out

    @staticmethod
    def _copies(outputs):
        return {name: np.array(value) for name, value in outputs.items()}


#: Layer types that may follow the first InnerProduct in a fully connected tail.
_TAIL_TYPES = {"InnerProduct", "ReLU", "Dropout", "Softmax", "Sigmoid", "TanH", "Flatten", "Reshape",
               "Split", "Concat", "Eltwise", "Scale", "Bias", "Power", "ArgMax", "Silence"}


def _fully_connected_tail(net):
    """(index of the first layer of the net's fully connected tail, the blobs it reads from the
    layers before it), or (None, []): the tail starts at an InnerProduct after which only
    per-image element-wise and fully connected layers follow (CaffeNet's fc6 ... prob)."""
    start = None
    for i in range(len(net.layers) - 1, -1, -1):
        kind = net.layers[i].type
        if kind not in _TAIL_TYPES:
            break
        if kind == "InnerProduct":
            start = i
    if not start:
        return None, []
    reads = []
    for i in range(start, len(net.layers)):
        for name in net._bottom_name_lists[i]:
            if net._producer_index(name) < start and name not in reads:
                reads.append(name)
    return start, reads


#: Layer types that read or make a batch of data (run once per step on the net itself).
_DATA_LAYERS = {"Data", "ImageData", "HDF5Data", "MemoryData", "DummyData", "WindowData"}


def _replica_param(net, threads, sources=()):
    """``net``'s definition (automatic Split layers removed; the replica adds its own) in the
    phase it was built in, its Input blobs holding 1/threads of the batch (rounded up), so the
    replicas' blobs start at their share's size (``forward`` reshapes them to each slice); the
    data layers at ``sources`` become Input layers of their tops."""
    from .fuse import _strip_auto_splits

    param = _strip_auto_splits(net.param)
    param.state.phase = net.phase
    names = [layer.name for layer in param.layer]
    for i in sources:
        layer = param.layer[names.index(net.layer_names[i])]
        tops = list(layer.top)
        layer.Clear()
        layer.name, layer.type = net.layer_names[i], "Input"
        layer.top.extend(tops)
        for top in tops:
            layer.input_param.shape.add().dim.extend(net.blobs[top].shape)
    for layer in param.layer:
        if layer.type == "Input":
            for shape in layer.input_param.shape:
                if len(shape.dim):
                    shape.dim[0] = -(-shape.dim[0] // threads)
    return param


# -- training -----------------------------------------------------------------------

class _AllSum:
    """Totals of one small array over ``parties`` threads, the same numbers on each: every
    thread adds the parts in rank order.  Two sets of slots, used in turn, so one wait per
    call suffices (a thread can refill a set only after all have read it)."""

    def __init__(self, parties):
        self.parties = parties
        self._slots = [[None] * parties, [None] * parties]
        self._turn = [0] * parties
        self._arrived = [0] * parties   # calls each rank has reached
        self._broken = False
        self._cond = threading.Condition()

    def all_sum(self, rank, partial):
        slots = self._slots[self._turn[rank]]
        self._turn[rank] ^= 1
        slots[rank] = partial
        self._wait(rank)
        total = slots[0].copy()
        for part in slots[1:]:
            total += part
        return total

    def _wait(self, rank):
        """Until every rank has reached this call (or one has failed: BrokenBarrierError)."""
        with self._cond:
            self._arrived[rank] += 1
            target = self._arrived[rank]
            self._cond.notify_all()
            while min(self._arrived) < target:
                if self._broken:
                    raise threading.BrokenBarrierError
                self._cond.wait()

    def abort(self):
        """Make every waiting thread raise BrokenBarrierError (one replica failed)."""
        with self._cond:
            self._broken = True
            self._cond.notify_all()

    def reset(self):
        self._turn = [0] * self.parties
        self._arrived = [0] * self.parties
        self._broken = False


#: Loss layers whose normalizer is proportional to the batch (mode -> True) or 1 (False):
#: a replica's loss and gradients then count ``images / batch`` (or 1) of the whole batch's.
_BATCH_PROPORTIONAL_LOSSES = ("SoftmaxWithLoss", "EuclideanLoss")


def _loss_share_rule(layer):
    """True: the layer's loss is a mean over the batch; False: a sum; raises otherwise."""
    from layers.loss import BATCH_SIZE, FULL, NONE, VALID

    if layer.type == "EuclideanLoss":
        return True
    if layer.type == "SoftmaxWithLoss":
        if layer.normalization == NONE:
            return False
        if layer.normalization in (FULL, BATCH_SIZE) or (layer.normalization == VALID
                                                         and layer.ignore_label is None):
            return True
    raise NetError(f"layer '{layer.name}' ({layer.type}) has a loss that DataParallelTraining cannot "
                   f"split over the batch: supported are {', '.join(_BATCH_PROPORTIONAL_LOSSES)} "
                   f"(SoftmaxWithLoss without ignore_label, unless normalization is BATCH_SIZE or NONE)")


class DataParallelTraining:
    """``net.forward_backward()`` with the batch split over ``threads`` replicas of ``net``.

    The replicas share ``net``'s parameter values (not its gradients: each has its own
    diffs, added into ``net``'s after the step).  The batch comes from ``net``'s data layers
    (Data, ImageData, HDF5Data, ...: run on ``net`` itself, once per step, then their tops
    are split) and Input blobs (as a solver or the caller sets them); ``net``'s scalar
    outputs get the batch's values, its other blobs are not computed.  Other layers without
    bottoms and losses not averaged over the batch are refused, naming the layer.  Batches
    smaller than ``threads`` run on ``net`` itself.  Use :func:`enable_training`.

    Random layers (Dropout) draw from one generator per replica, seeded at each step in rank
    order from a generator seeded from the global one (``framework.set_random_seed``) when the
    replicas are built: runs are repeatable for a given seed and thread count (their draws
    differ from a one-thread run's; data layers draw from the global generator as before).

    ``net``'s own activation blobs (all but its inputs, data-layer tops and outputs) are not
    computed and their arrays are freed meanwhile (they read as zeros); a forward of ``net``
    itself, as a solver's last display does, gets them back for its layers.
    """

    def __init__(self, net, threads=None):
        from .net import Net

        self.net = net
        self._threads = _OnThreads(threads)
        self.threads = self._threads.threads
        self._sources = []  # data layers, run on ``net``
        for i, (layer, bottoms) in enumerate(zip(net.layers, net._bottom_name_lists)):
            if bottoms or layer.type == "Input":
                continue
            if layer.type not in _DATA_LAYERS:
                raise NetError(f"layer '{layer.name}' ({layer.type}) has no bottoms and is not a data layer: "
                               f"DataParallelTraining cannot tell how to split its tops over the batch")
            self._sources.append(i)
        self._fed = list(net.inputs) + [name for i in self._sources for name in net._top_name_lists[i]]
        if not self._fed:
            raise NetError(f"net '{net.name}' has no input blobs or data layers for DataParallelTraining to split")
        param = _replica_param(net, self.threads, self._sources)
        self.replicas = [Net(param) for _ in range(self.threads)]
        self._shared = {}  # id(net blob) -> (net blob, [its stand-in in each replica])
        for replica in self.replicas:
            own = {}
            for layer, source in zip(replica.layers, net.layers):
                for j, blob in enumerate(source.blobs):
                    if id(blob) not in own:
                        own[id(blob)] = Blob(blob.shape, dtype=blob.dtype)
                        self._shared.setdefault(id(blob), (blob, []))[1].append(own[id(blob)])
                    layer.blobs[j] = own[id(blob)]
            replica._collect_params()
        self._sync = _AllSum(self.threads)
        self._seeder = np.random.default_rng(int(random.rng().integers(2 ** 63)))  # replica streams
        self._loss_rules = {}
        for rank, replica in enumerate(self.replicas):
            for i, layer in enumerate(replica.layers):
                if layer.type == "BatchNorm":
                    layer.stats_sync = (self._sync, rank)
                if any(layer.loss_weights):
                    self._loss_rules[i] = _loss_share_rule(layer)
        self._base_loss_weights = {i: list(self.replicas[0].layers[i].loss_weights) for i in self._loss_rules}
        # net's own activations are not computed while the replicas run: their arrays are freed
        # (read-only zero stand-ins, as in memory-saving mode); a forward of net itself gives
        # its tops arrays again (Net.forward_from_to), the next split step frees them again
        self._freed = [blob for name, blob in net.blobs.items()
                       if name not in self._fed and name not in net.outputs and blob.data.size]
        for blob in self._freed:
            _release(blob)

    def restore_activations(self):
        """Give ``net``'s freed activation blobs writable (zero) arrays again."""
        for blob in self._freed:
            if _is_released(blob):
                blob.data = np.zeros(blob.shape, dtype=blob.dtype)

    def forward_backward(self):
        """One forward and backward of the whole batch (read by ``net``'s data layers, or in its
        Input blobs); returns the loss and adds the parameter gradients into ``net``'s diffs (as
        Net.forward_backward)."""
        net = self.net
        for i in self._sources:  # the next batch, read once
            net.forward_from_to(i, i)
        batch = net.blobs[self._fed[0]].shape[0]
        if any(net.blobs[name].shape[:1] != (batch,) for name in self._fed):
            raise NetError(f"the inputs of net '{net.name}' need the same batch size on axis 0 to be "
                           f"split over threads (got {[(n, net.blobs[n].shape) for n in self._fed]})")
        if batch < self.threads:
            return _plain_forward_backward(net, skip=self._sources)
        for blob in self._freed:  # again, if net ran on its own since (Net.forward_from_to)
            if not _is_released(blob):
                _release(blob)
        bounds = [batch * k // self.threads for k in range(self.threads + 1)]
        shares = [(bounds[k + 1] - bounds[k]) / batch for k in range(self.threads)]
        for rank, replica in enumerate(self.replicas):
            for name in self._fed:
                part = net.blobs[name].data[bounds[rank]:bounds[rank + 1]]
                replica.blobs[name].reshape(part.shape)
                replica.blobs[name].data[...] = part
            for i, mean_over_batch in self._loss_rules.items():
                factor = shares[rank] if mean_over_batch else 1.0
                replica.layers[i].loss_weights = [w * factor for w in self._base_loss_weights[i]]
        for blob, stand_ins in self._shared.values():
            for stand_in in stand_ins:
                stand_in.share_data(blob)  # the solver may have replaced an array
            stand_ins[0].share_diff(blob)  # the first replica adds straight into net's gradients
        self._sync.reset()
        shared = list(self._shared.values())
        # one random stream per replica, seeded in rank order: the draws do not depend on
        # which thread reaches its Dropout first (and the global stream, which data layers
        # draw from, is not touched: the same data as a one-thread run)
        seeds = self._seeder.integers(2 ** 63, size=self.threads)

        def run(rank):
            try:
                if rank:
                    for _, stand_ins in shared:
                        if stand_ins[rank].has_diff:
                            stand_ins[rank].diff[...] = 0
                with random.thread_generator(np.random.default_rng(int(seeds[rank]))):
                    return self.replicas[rank].forward_backward()
            except BaseException:
                self._sync.abort()  # the others would wait for it at the next exchange
                raise

        losses = self._threads.run(run, self.threads)

        def add_gradients(rank):  # the other replicas' gradients, parameters shared out by rank
            for blob, stand_ins in shared[rank::self.threads]:
                for stand_in in stand_ins[1:]:
                    if stand_in.has_diff:
                        blob.diff[...] += stand_in.diff

        self._threads.run(add_gradients, self.threads)
        self._gather_outputs(shares)
        return float(sum(losses))

    def _gather_outputs(self, shares):
        """``net``'s scalar outputs: losses summed as weighted, others averaged by share."""
        net = self.net
        for name in net.outputs:
            values = [r.blobs[name].data for r in self.replicas]
            if any(v.size != 1 for v in values) or net.blobs[name].data.size != 1:
                continue
            i = net._producer_index(name)
            if i in self._loss_rules and not self._loss_rules[i]:
                total = sum(float(v.reshape(-1)[0]) for v in values)
            else:
                total = sum(f * float(v.reshape(-1)[0]) for f, v in zip(shares, values))
            net.blobs[name].data[...] = total


def _plain_forward_backward(net, skip=()):
    """The net's own forward_backward, bypassing its DataParallelTraining; the data layers in
    ``skip`` have already run."""
    loss = 0.0
    start = 0
    for i in sorted(skip) + [len(net.layers)]:
        if start < i:
            loss += net.forward_from_to(start, i - 1)
        start = i + 1
    net.backward_from_to(len(net.layers) - 1, 0)
    return loss


def enable_training(net, threads=None):
    """Make ``net.forward_backward()`` (and so a solver's step) split each batch over
    ``threads`` replicas (default: the BLAS thread count); returns the
    :class:`DataParallelTraining`.  ``disable_training(net)`` undoes it."""
    net.data_parallel = DataParallelTraining(net, threads) if (threads or _blas_threads()) > 1 else None
    return net.data_parallel


def disable_training(net):
    """Undo :func:`enable_training`: ``net.forward_backward()`` runs on ``net`` itself again."""
    if net.data_parallel is not None:
        net.data_parallel.restore_activations()
    net.data_parallel = None
