"""Small generated data sources for running real Caffe train/test nets in tests.

Real training prototxts name data that is not here (``examples/mnist/mnist_train_lmdb``,
``data/ilsvrc12/imagenet_mean.binaryproto``, ...).  This module writes tiny stand-ins of
the right shapes and rewrites a net's data layers to read them:

- :class:`DatumDB` — an LMDB or LevelDB of ``Datum`` records (raw uint8 C×H×W, or
  PNG-encoded as ``convert_imageset --encoded`` writes), labels in ``[0, classes)``;
- :class:`ImageList` — PNG files plus a ``path label`` list for ImageData;
- :class:`HDF5Files` — ``.h5`` files (and the list file naming them) for HDF5Data,
  one dataset per top name;
- :class:`MeanFile` — a ``mean.binaryproto`` (1×C×H×W BlobProto).

:class:`FixtureFactory` maps each original path of a net to a spec, generates each
fixture once into a folder (normally pytest's ``tmp_path``) and returns its path;
:func:`rewrite_data_layers` points every data layer of a ``NetParameter`` (current
``layer`` or legacy V1 ``layers``) at those fixtures and shrinks the batch sizes.
"""
import os
import re
from dataclasses import dataclass

import numpy as np

from framework.db import open_db
from framework.io import save_mean_file
from layers.data_transformer import array_to_datum

# Data layer types whose sources get rewritten (V2 names and the V1 enum names).
DATUM_DB_TYPES = ("Data", "DATA")
IMAGE_LIST_TYPES = ("ImageData", "IMAGE_DATA")
HDF5_TYPES = ("HDF5Data", "HDF5_DATA")


@dataclass(frozen=True)
class DatumDB:
    """An LMDB / LevelDB of ``num`` Datums of ``channels × height × width`` uint8 pixels."""
    channels: int
    height: int
    width: int
    classes: int
    backend: str = "lmdb"
    num: int = 5
    encoded: bool = False


@dataclass(frozen=True)
class ImageList:
    """``num`` PNG images of ``height × width`` (colour or gray) and a ``path label`` list file."""
    height: int
    width: int
    classes: int
    num: int = 3
    color: bool = True


@dataclass(frozen=True)
class HDF5Files:
    """``files`` HDF5 files of ``rows`` rows each; ``datasets`` is ``((name, row_shape, classes), ...)``.

    A dataset with ``classes`` > 0 holds integer labels in ``[0, classes)`` (stored as
    float, as Caffe's HDF5 examples do); ``classes`` = 0 means gaussian float data.
    """
    datasets: tuple
    rows: int = 7
    files: int = 2


@dataclass(frozen=True)
class MeanFile:
    """A ``channels × height × width`` mean image (values near 120, as a real image mean)."""
    channels: int
    height: int
    width: int


def _slug(path):
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", path).strip("_") or "source"


def write_datum_db(path, spec, seed=0):
    """Write the :class:`DatumDB` ``spec`` at ``path``; keys are ``%08d`` as convert_imageset writes."""
    rng = np.random.default_rng(seed)
    shape = (spec.num, spec.channels, spec.height, spec.width)
    images = rng.integers(0, 256, size=shape, dtype=np.uint8)
    labels = np.arange(spec.num) % spec.classes  # every record's label is a valid class
    with open_db(path, spec.backend, mode="new") as db:
        txn = db.transaction()
        for i in range(spec.num):
            if spec.encoded:
                datum = _encoded_datum(images[i], int(labels[i]))
            else:
                datum = array_to_datum(images[i], label=int(labels[i]))
            txn.put(f"{i:08d}".encode(), datum.SerializeToString())
        txn.commit()
    return path


def _encoded_datum(chw, label):
    """A Datum holding a PNG of the C×H×W uint8 BGR image (convert_imageset --encoded)."""
    import io

    from PIL import Image

    from proto import caffe_pb2
    hwc = chw.transpose(1, 2, 0)
    img = Image.fromarray(hwc[:, :, ::-1] if hwc.shape[2] == 3 else hwc[:, :, 0])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    datum = caffe_pb2.Datum(data=buf.getvalue(), label=label, encoded=True)
    return datum


def write_image_list(folder, spec, seed=0):
    """Write :class:`ImageList` images into ``folder``; returns the list file's path (absolute paths)."""
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(spec.num):
        channels = 3 if spec.color else 1
        pixels = rng.integers(0, 256, size=(spec.height, spec.width, channels), dtype=np.uint8)
        image = Image.fromarray(pixels if spec.color else pixels[:, :, 0])
        path = os.path.join(folder, f"img{i:03d}.png")
        image.save(path)
        lines.append(f"{path} {i % spec.classes}")
    list_path = os.path.join(folder, "list.txt")
    with open(list_path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return list_path


def write_hdf5_files(folder, spec, seed=0):
    """Write :class:`HDF5Files` into ``folder``; returns the path of the list file naming them."""
    import h5py
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(spec.files):
        path = os.path.join(folder, f"part{k}.h5")
        with h5py.File(path, "w") as f:
            for name, row_shape, classes in spec.datasets:
                if classes:
                    values = (np.arange(spec.rows) + k) % classes
                    f.create_dataset(name, data=values.reshape((spec.rows,) + tuple(row_shape)).astype(np.float32))
                else:
                    f.create_dataset(name, data=rng.standard_normal((spec.rows,) + tuple(row_shape)).astype(np.float32))
        paths.append(path)
    list_path = os.path.join(folder, "list.txt")
    with open(list_path, "w", encoding="utf-8") as f:
        f.write("\n".join(paths) + "\n")
    return list_path


def write_mean_file(path, spec, seed=0):
    """Write the :class:`MeanFile` ``spec`` as a binaryproto at ``path``."""
    rng = np.random.default_rng(seed)
    mean = rng.uniform(100.0, 140.0, size=(spec.channels, spec.height, spec.width)).astype(np.float32)
    save_mean_file(path, mean)
    return path


class FixtureFactory:
    """Generates the fixture standing in for each original path, once, under ``root``.

    ``specs`` maps an original path as the prototxt writes it (``source`` or
    ``mean_file``) to a :class:`DatumDB`, :class:`ImageList`, :class:`HDF5Files` or
    :class:`MeanFile`.  ``path_for(original)`` returns the generated fixture's path.
    """

    def __init__(self, root, specs):
        self.root = os.fspath(root)
        self.specs = dict(specs)
        self._made = {}

    def path_for(self, original):
        if original in self._made:
            return self._made[original]
        if original not in self.specs:
            raise KeyError(f"no fixture spec for '{original}' (known: {sorted(self.specs)})")
        spec = self.specs[original]
        target = os.path.join(self.root, _slug(original))
        seed = len(self._made)
        if isinstance(spec, DatumDB):
            path = write_datum_db(target, spec, seed)
        elif isinstance(spec, ImageList):
            path = write_image_list(target, spec, seed)
        elif isinstance(spec, HDF5Files):
            path = write_hdf5_files(target, spec, seed)
        elif isinstance(spec, MeanFile):
            path = write_mean_file(target + ".binaryproto", spec, seed)
        else:
            raise TypeError(f"unknown fixture spec {spec!r}")
        self._made[original] = path
        return path


def data_layers(net_param):
    """The data layers (V2 ``layer`` and V1 ``layers``) of a NetParameter."""
    kinds = DATUM_DB_TYPES + IMAGE_LIST_TYPES + HDF5_TYPES
    found = []
    for layer in list(net_param.layer) + list(net_param.layers):
        type_name = layer.type if isinstance(layer.type, str) else layer.DESCRIPTOR.fields_by_name[
            "type"].enum_type.values_by_number[layer.type].name
        if type_name in kinds:
            found.append((type_name, layer))
    return found


def rewrite_data_layers(net_param, factory, batch_size):
    """Point every data layer of ``net_param`` (in place) at ``factory``'s fixtures.

    Sources and mean files are replaced by generated ones, batch sizes set to
    ``batch_size``, ImageData's ``root_folder`` cleared (the list holds absolute
    paths).  Returns the number of data layers rewritten.
    """
    layers = data_layers(net_param)
    for type_name, layer in layers:
        if type_name in DATUM_DB_TYPES:
            param = layer.data_param
            spec = factory.specs.get(param.source)
            wanted = "lmdb" if param.backend == param.LMDB else "leveldb"
            if isinstance(spec, DatumDB) and spec.backend != wanted:
                raise ValueError(f"layer '{layer.name}' reads '{param.source}' as {wanted}, "
                                 f"but its fixture spec is {spec.backend}")
        elif type_name in IMAGE_LIST_TYPES:
            param = layer.image_data_param
            param.root_folder = ""
        else:
            param = layer.hdf5_data_param
        param.source = factory.path_for(param.source)
        param.batch_size = batch_size
        if layer.transform_param.HasField("mean_file"):
            layer.transform_param.mean_file = factory.path_for(layer.transform_param.mean_file)
    return len(layers)
