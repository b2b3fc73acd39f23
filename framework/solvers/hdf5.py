"""HDF5 snapshots (``snapshot_format: HDF5``) in Caffe's layout, via h5py.

Weights, ``<prefix>_iter_N.caffemodel.h5`` (net.cpp ToHDF5 / CopyTrainedLayersFromHDF5)::

    /data/<layer name>/<j>    float32 dataset shaped like the layer's j-th blob
    /diff/<layer name>/<j>    (only with snapshot_diff) the blob's diff

Every layer gets a group, blobs or not; a blob shared from an earlier layer is
written only under its owner (diffs are written for every layer).

Solver state, ``<prefix>_iter_N.solverstate.h5`` (SGDSolver::SnapshotSolverStateToHDF5)::

    /iter, /current_step      int32 datasets of shape (1,)  (hdf5_save_int)
    /learned_net              scalar fixed-length C string  (hdf5_save_string)
    /history/<i>              float32 dataset per history blob

Files are written to a temporary name in the same folder and renamed into place.
"""
import os
import tempfile

import numpy as np

from ..errors import WeightsError


def _h5py():
    try:
        import h5py
    except ImportError:
        raise WeightsError("HDF5 snapshots need the h5py package (pip install h5py)") from None
    return h5py


def _atomic_h5(path, write):
    """Run ``write(h5file)`` on a temporary file, then move it to ``path``."""
    h5py = _h5py()
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            write(f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _save_string(group, name, text):
    """A scalar, NUL-terminated fixed-length string dataset (H5LTmake_dataset_string)."""
    h5py = _h5py()
    raw = text.encode("utf-8")
    tid = h5py.h5t.C_S1.copy()
    tid.set_size(len(raw) + 1)
    tid.set_strpad(h5py.h5t.STR_NULLTERM)
    space = h5py.h5s.create(h5py.h5s.SCALAR)
    dset = h5py.h5d.create(group.id, name.encode(), tid, space)
    dset.write(h5py.h5s.ALL, h5py.h5s.ALL, np.array(raw + b"\0", dtype=f"S{len(raw) + 1}"), mtype=tid)


def _load_string(dataset):
    value = dataset[()]
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0]
    if isinstance(value, bytes):
        value = value.split(b"\0", 1)[0].decode("utf-8")
    return str(value)


def _load_int(dataset):
    return int(np.asarray(dataset[()]).reshape(-1)[0])


def save_net_hdf5(net, path, write_diff=False):
    """Write ``net``'s parameters to ``path`` in Caffe's .caffemodel.h5 layout."""

    def write(f):
        data = f.create_group("data")
        diff = f.create_group("diff") if write_diff else None
        seen = set()
        for name, layer in zip(net.layer_names, net.layers):
            layer_data = data.create_group(name)
            layer_diff = diff.create_group(name) if write_diff else None
            for j, blob in enumerate(layer.blobs):
                if id(blob) not in seen:  # only the owner of a shared param is saved
                    layer_data.create_dataset(str(j), data=np.asarray(blob.data, dtype=np.float32))
                    seen.add(id(blob))
                if write_diff:
                    layer_diff.create_dataset(str(j), data=np.asarray(blob.diff, dtype=np.float32))

    _atomic_h5(os.fspath(path), write)


def load_net_hdf5(net, path):
    """Copy weights from a .caffemodel.h5 into same-named layers (CopyTrainedLayersFromHDF5)."""
    h5py = _h5py()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"weights file not found: {path}")
    layers = dict(zip(net.layer_names, net.layers))
    owners = {}
    for name, layer in zip(net.layer_names, net.layers):
        for blob in layer.blobs:
            owners.setdefault(id(blob), name)
    with h5py.File(path, "r") as f:
        if "data" not in f:
            raise WeightsError(f"{path}: no /data group: not a Caffe .caffemodel.h5 file")
        for name, group in f["data"].items():
            layer = layers.get(name)
            if layer is None:
                continue
            if len(group) > len(layer.blobs):
                raise WeightsError(f"{path}: Incompatible number of blobs for layer {name}")
            for j, blob in enumerate(layer.blobs):
                key = str(j)
                if key not in group:
                    if owners[id(blob)] != name:
                        continue  # weight-shared in the target net: fine
                    raise WeightsError(f"{path}: Incompatible number of blobs for layer {name}")
                values = np.asarray(group[key][()], dtype=blob.dtype)
                if values.shape != blob.shape:
                    raise WeightsError(f"{path}: cannot copy param {j} of layer '{name}': shape mismatch "
                                       f"(file {values.shape}, net {blob.shape})")
                blob.data[...] = values


def save_solver_state_hdf5(path, iteration, learned_net, current_step, history):
    """Write a .solverstate.h5 in Caffe's layout."""

    def write(f):
        f.create_dataset("iter", data=np.array([iteration], dtype=np.int32))
        _save_string(f, "learned_net", learned_net)
        f.create_dataset("current_step", data=np.array([current_step], dtype=np.int32))
        group = f.create_group("history")
        for i, h in enumerate(history):
            group.create_dataset(str(i), data=np.asarray(h, dtype=np.float32))

    _atomic_h5(os.fspath(path), write)


def read_solver_state_hdf5(path):
    """Read a .solverstate.h5: ``{"iter", "learned_net" (or None), "current_step", "history": [arrays]}``."""
    h5py = _h5py()
    path = os.fspath(path)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise WeightsError(f"{path}: cannot open as HDF5 solver state ({exc})") from None
    with f:
        try:
            state = {"iter": _load_int(f["iter"]),
                     "learned_net": _load_string(f["learned_net"]) if "learned_net" in f else None,
                     "current_step": _load_int(f["current_step"]) if "current_step" in f else 0}
            group = f["history"]
            state["history"] = [np.asarray(group[str(i)][()], dtype=np.float32) for i in range(len(group))]
        except KeyError as exc:
            raise WeightsError(f"{path}: not a Caffe HDF5 solver state (missing {exc})") from None
    return state
