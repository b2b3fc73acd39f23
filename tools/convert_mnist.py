"""Convert MNIST IDX files to a Caffe database of Datums (Caffe's ``convert_mnist_data``).

    python tools/convert_mnist.py IMAGES LABELS OUT_DB [--backend lmdb|leveldb]

IMAGES / LABELS are IDX files (``*-idx3-ubyte`` / ``*-idx1-ubyte``), gzipped or
not.  Each digit becomes a ``Datum`` with channels 1, height and width from the
image header, the raw uint8 pixels in ``data`` and the label, stored under the
key ``"%08d" % index`` in file order; records are committed 1,000 at a time.
OUT_DB must not exist yet.  The records are byte-identical to Caffe's.
"""
import argparse
import gzip
import os
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from framework.db import open_db  # noqa: E402
from framework.errors import CaffeError  # noqa: E402

IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049  # convert_mnist_data.cpp


def read_idx(path, expected_magic):
    """Read an IDX file (optionally gzipped) as a uint8 array shaped by its header."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise CaffeError(f"cannot read '{path}': {e.strerror}") from None
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 8:
        raise CaffeError(f"'{path}' is too short to be an IDX file")
    magic = struct.unpack(">I", raw[:4])[0]
    if magic != expected_magic:
        kind = "image" if expected_magic == IMAGE_MAGIC else "label"
        raise CaffeError(f"incorrect {kind} file magic in '{path}': {magic} (expected {expected_magic})")
    ndim = magic & 0xFF
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    body = raw[4 + 4 * ndim:]
    count = int(np.prod(dims))
    if len(body) < count:
        raise CaffeError(f"'{path}' is truncated: its header promises {count} bytes, it holds {len(body)}")
    return np.frombuffer(body, dtype=np.uint8, count=count).reshape(dims)


def convert_dataset(image_path, label_path, db_path, backend="lmdb", log=print):
    """Write the digits of ``image_path`` with the labels of ``label_path`` to a new database."""
    from proto import caffe_pb2

    images = read_idx(image_path, IMAGE_MAGIC)
    labels = read_idx(label_path, LABEL_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise CaffeError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    num, rows, cols = images.shape
    log(f"A total of {num} items.")
    log(f"Rows: {rows} Cols: {cols}")
    datum = caffe_pb2.Datum()
    datum.channels, datum.height, datum.width = 1, rows, cols
    with open_db(db_path, backend, mode="new") as db:
        txn = db.transaction()
        for i in range(num):
            datum.data = images[i].tobytes()
            datum.label = int(labels[i])
            txn.put(b"%08d" % i, datum.SerializeToString())
            if (i + 1) % 1000 == 0:
                txn.commit()
        txn.commit()
    log(f"Processed {num} files.")
    return num


def parse_args(argv=None):
    """Command line: input_image_file input_label_file output_db_file [--backend]."""
    p = argparse.ArgumentParser(description="Convert the MNIST dataset to the lmdb/leveldb format "
                                            "used by Caffe to load data.")
    p.add_argument("input_image_file")
    p.add_argument("input_label_file")
    p.add_argument("output_db_file")
    p.add_argument("--backend", default="lmdb", choices=["lmdb", "leveldb"],
                   help="the backend for storing the result (default lmdb)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        convert_dataset(args.input_image_file, args.input_label_file, args.output_db_file, args.backend)
    except CaffeError as e:
        print(f"convert_mnist: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
