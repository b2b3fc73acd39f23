"""Memory-bound NumPy passes and GEMMs split over threads of our own.

NumPy's copies and ufuncs run on one core; BLAS uses all of them.  Large
element-wise passes (im2col, transposed copies, bias adds, normalisation,
activations) can be split along their first axis over a few threads: NumPy
releases the GIL inside each pass.  That pays only where BLAS is held to one
thread: after each multi-threaded GEMM, OpenBLAS's idle workers busy-wait on
the other cores for ~0.1 s, and a pass's share that runs there goes at about
half speed, so splitting gains nothing (see SPLIT_ALONGSIDE_BLAS).  Passes are
therefore split only inside :func:`split_over_our_threads`, whose callers hold
BLAS to one thread (framework.data_parallel); there :func:`matmul` splits large
GEMMs as well.  The thread count follows the BLAS setting
(``OPENBLAS_NUM_THREADS`` / ``OMP_NUM_THREADS``, else all cores).
"""
import contextlib
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

#: Arrays smaller than this (bytes) are processed on the calling thread alone:
#: handing a pass to another thread costs ~10-20 µs.
PARALLEL_MIN_BYTES = 1 << 20

#: os.cpu_count() reads sysfs on every call (~15-100 µs); the core count does not change.
_CPU_COUNT = os.cpu_count() or 1

_pool_lock = threading.Lock()
_pool = None
_pool_threads = None


_thread_state = threading.local()


@contextlib.contextmanager
def _flag_for_this_thread(name):
    """Within the block, ``_thread_state.<name>`` is True on this thread (restored after)."""
    previous = getattr(_thread_state, name, False)
    setattr(_thread_state, name, True)
    try:
        yield
    finally:
        setattr(_thread_state, name, previous)


def one_thread_per_pass():
    """Context: within the block, this thread's passes are not split over the shared pool: for
    callers that already run one share of the work on each core (framework.data_parallel)."""
    return _flag_for_this_thread("alone")


#: Split passes over threads also while BLAS runs multi-threaded (outside
#: :func:`split_over_our_threads`).  Off: OpenBLAS's spinning workers (module docstring) leave
#: the second share about half a core.  Measured per forward or step, unsplit / split, with
#: BLAS on 2 threads: ResNet-50 b1 (folded) 0.98-0.99, b8 0.96, training b8 1.00, LeNet
#: training 0.97, CaffeNet b10 0.99.  (Tests switch it on to check the split code paths.)
SPLIT_ALONGSIDE_BLAS = False


def copy_threads():
    """Threads for memory-bound passes: OPENBLAS_NUM_THREADS / OMP_NUM_THREADS if set, else all
    cores, inside :func:`split_over_our_threads` (or with SPLIT_ALONGSIDE_BLAS); otherwise 1, as
    inside :func:`one_thread_per_pass`."""
    state = _thread_state
    if getattr(state, "alone", False):
        return 1
    if SPLIT_ALONGSIDE_BLAS or getattr(state, "split", False):
        return _configured_threads()
    return 1


def gemm_threads():
    """Threads a GEMM called on this thread runs on, as far as this module knows: 1 inside
    :func:`one_thread_per_pass` or :func:`split_over_our_threads` (their callers hold BLAS to
    one thread), else the configured count."""
    state = _thread_state
    if getattr(state, "alone", False) or getattr(state, "split", False):
        return 1
    return _configured_threads()


def _configured_threads():
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return min(int(value), _CPU_COUNT)
    return _CPU_COUNT


def executor():
    """The shared pool (the configured thread count minus one workers; the caller is the last)
    and that thread count."""
    global _pool, _pool_threads
    threads = _configured_threads()
    with _pool_lock:
        if _pool is None or _pool_threads != threads:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max(1, threads - 1), thread_name_prefix="numpy-pass")
            _pool_threads = threads
        return _pool, threads


def split_over_our_threads():
    """Context: within the block, this thread's large passes (:func:`split_apply`) and GEMMs
    (:func:`matmul`) are split over the shared pool.  For callers that hold BLAS to one thread
    meanwhile, so that no OpenBLAS worker spins on the other cores (measured: two one-thread
    GEMM streams right after a two-thread GEMM took 79 ms instead of 43)."""
    return _flag_for_this_thread("split")


#: :func:`matmul` splits GEMMs of at least this many multiply-adds (a hand-off to the pool costs
#: ~20-50 µs, about what one core does in 2 M multiply-adds).
SPLIT_GEMM_MIN_MACS = 4 << 20


def matmul(a, b, out):
    """``np.matmul(a, b, out=out)``; inside :func:`split_over_our_threads`, a large one is split
    over the pool along the rows of ``a`` and ``out`` (``b`` is read whole by every share)."""
    rows = a.shape[-2]
    threads = copy_threads() if getattr(_thread_state, "split", False) else 1
    if threads <= 1 or rows < 2 * threads or out.size * a.shape[-1] < SPLIT_GEMM_MIN_MACS:
        return np.matmul(a, b, out=out)
    _over_pool(lambda lo, hi: np.matmul(a[..., lo:hi, :], b, out=out[..., lo:hi, :]), rows)
    return out


def split_apply(func, arrays, nbytes):
    """Run ``func(*parts)`` on slices of ``arrays`` along axis 0, in parallel when ``nbytes`` is large.

    Each part is a view, so ``func`` writes its results through ``out=`` into
    the caller's arrays; parts never overlap.
    """
    rows = arrays[0].shape[0] if arrays[0].ndim else 0
    threads = copy_threads() if nbytes >= PARALLEL_MIN_BYTES and rows > 1 else 1
    if threads <= 1:
        func(*arrays)
        return
    _over_pool(lambda lo, hi: func(*(a[lo:hi] for a in arrays)), rows)


def run_balanced(tasks, weights, threads):
    """Run the callables ``tasks`` on up to ``threads`` threads of the pool (the caller's
    included), each thread taking tasks of about equal total ``weights`` (largest first, each
    to the least loaded thread); returns when all are done, raising the first error."""
    pool, pool_threads = executor()
    threads = min(threads, pool_threads, len(tasks))
    if threads <= 1:
        for task in tasks:
            task()
        return
    shares, loads = [[] for _ in range(threads)], [0] * threads
    for i in sorted(range(len(tasks)), key=lambda i: -weights[i]):
        k = loads.index(min(loads))
        shares[k].append(tasks[i])
        loads[k] += weights[i]

    def run(share):
        for task in share:
            task()

    _on_pool(pool, [functools.partial(run, share) for share in shares])


def _over_pool(share, rows):
    """``share(lo, hi)`` over contiguous ranges of ``rows`` rows, one per thread of the pool (the
    first range on the calling thread); returns when all are done, raising the first error."""
    pool, threads = executor()
    parts = min(threads, rows)
    bounds = [rows * i // parts for i in range(parts + 1)]
    _on_pool(pool, [functools.partial(share, bounds[i], bounds[i + 1]) for i in range(parts)])


def _on_pool(pool, calls):
    """Run ``calls[1:]`` on ``pool`` and ``calls[0]`` on this thread; return when all are done,
    raising the first error."""
    futures = [pool.submit(call) for call in calls[1:]]
    calls[0]()
    for f in futures:
        f.result()


#: Bytes per block of :func:`in_blocks`: small enough that a block one pass has just
#: written is still in the core's cache for the next pass (fused bias/scale + ReLU), large
#: enough that replicas on two threads (framework.data_parallel) do not queue for the GIL
#: between blocks: the folded BatchNorm forward of a 25 MB tensor split over two threads
#: took 9.3 ms with 256 KB blocks, 7.9 with 512 KB (one thread: 12.8 either way).  With
#: 1 MB (2 MB L2 per core on the second machine of docs/benchmarks.md), the data-parallel
#: ResNet-50 training step took 0.97-0.98 of the time of 512 KB, b8 inference 0.99.
BLOCK_BYTES = 1 << 20


def in_blocks(func, arrays):
    """Call ``func(*parts)`` on consecutive slices of ``arrays`` along axis 0, each about
    BLOCK_BYTES of ``arrays[0]``, so that several passes over one slice read it from cache."""
    rows = arrays[0].shape[0]
    row_bytes = arrays[0].nbytes // max(1, rows)
    step = max(1, BLOCK_BYTES // max(1, row_bytes))
    for r in range(0, rows, step):
        func(*(a[r:r + step] for a in arrays))


#: NumPy's ufuncs run through buffers of ``np.getbufsize()`` elements (8192 by default).  When
#: an operand is broadcast along rows shorter than that (a per-channel column against
#: (N·C, H·W) planes), the iterator packs several rows into each buffer and so has to copy the
#: column out element by element on every fill (numpy issue 13307): a 56x56 bias add or
#: BatchNorm step then takes ~1.7x as long as the same pass with a scalar.  With buffers no
#: longer than one row it passes the column as a stride-0 input instead.  Below this row
#: length the per-row cost outweighs the copy (measured: 14x14 planes and larger gain,
#: 12x12 in place and 7x7 do not).
SHORT_ROW_MIN = 160


@contextlib.contextmanager
def row_broadcast(row_length):
    """Within the block, ufuncs that broadcast one value per row over rows of ``row_length``
    elements run at memory speed (see SHORT_ROW_MIN).  The setting is NumPy's per-thread
    buffer size, restored on exit; threads started inside the block need their own."""
    size = row_length // 16 * 16  # np.setbufsize wants a multiple of 16
    if row_length < SHORT_ROW_MIN or size >= np.getbufsize():
        yield
        return
    previous = np.setbufsize(size)
    try:
        yield
    finally:
        np.setbufsize(previous)


def pcopyto(dst, src):
    """``np.copyto(dst, src)`` (same shapes) split over threads along axis 0."""
    split_apply(np.copyto, (dst, src), dst.nbytes)
