"""Compute the mean image of a Caffe database (Caffe's ``compute_image_mean``).

    python tools/compute_image_mean.py INPUT_DB [OUTPUT_FILE] [--backend lmdb|leveldb]

Averages every Datum of INPUT_DB (raw, float or encoded) pixel by pixel, writes
the result to OUTPUT_FILE (if given) as a binary ``BlobProto`` with the legacy
dims num=1, channels, height, width, and prints the mean of each channel:

    Number of channels: 1
    mean_value channel [0]: 33.3185

The arithmetic is Caffe's: float32 sums accumulated record by record, divided
by the count in float32; the per-channel means sum in float32 pixel by pixel.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from framework.db import open_db  # noqa: E402
from framework.errors import CaffeError  # noqa: E402
from layers.data_transformer import datum_to_array, parse_datum  # noqa: E402

CHUNK = 1024


def compute_mean(db_path, backend="lmdb", log=print):
    """Return ``(mean (C, H, W) float32, count)`` over all records of the database."""
    total = None
    count = 0
    pending = []

    def flush():
        nonlocal total
        # A float32 cumulative sum along the records is the same sequence of float
        # additions as compute_image_mean.cpp's loop.
        stacked = np.concatenate([total[None], np.stack(pending).astype(np.float32)])
        total = np.cumsum(stacked, axis=0, dtype=np.float32)[-1]
        pending.clear()

    with open_db(db_path, backend, "read") as db:
        for key, value in db:
            where = f"record '{key.decode(errors='replace')}' of '{db_path}'"
            image = datum_to_array(parse_datum(value, where), where=where)
            if total is None:
                total = np.zeros(image.shape, dtype=np.float32)
            elif image.shape != total.shape:
                raise CaffeError(f"incorrect data size in {where}: {image.shape} (the first record is "
                                 f"{total.shape})")
            pending.append(image)
            count += 1
            if len(pending) == CHUNK:
                flush()
            if count % 10000 == 0:
                log(f"Processed {count} files.")
    if count == 0:
        raise CaffeError(f"database '{db_path}' is empty")
    if pending:
        flush()
    if count % 10000:
        log(f"Processed {count} files.")
    return total / np.float32(count), count


def mean_to_blobproto(mean):
    """A BlobProto with legacy dims 1 x C x H x W, as compute_image_mean writes."""
    from proto import caffe_pb2

    blob = caffe_pb2.BlobProto()
    blob.num = 1
    blob.channels, blob.height, blob.width = (int(d) for d in mean.shape)
    blob.data.extend(mean.astype(np.float32).ravel().tolist())
    return blob


def channel_means(mean):
    """Per-channel means with Caffe's float32 running sums."""
    c = mean.shape[0]
    sums = np.cumsum(mean.reshape(c, -1), axis=1, dtype=np.float32)[:, -1]
    return sums / np.float32(mean.shape[1] * mean.shape[2])


def parse_args(argv=None):
    """Command line: INPUT_DB [OUTPUT_FILE] [--backend]."""
    p = argparse.ArgumentParser(description="Compute the mean_image of a set of images given by a "
                                            "leveldb/lmdb.")
    p.add_argument("input_db")
    p.add_argument("output_file", nargs="?")
    p.add_argument("--backend", default="lmdb", choices=["lmdb", "leveldb"],
                   help="the backend {leveldb, lmdb} containing the images (default lmdb)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        mean, _ = compute_mean(args.input_db, args.backend)
    except CaffeError as e:
        print(f"compute_image_mean: {e}", file=sys.stderr)
        return 1
    if args.output_file:
        print(f"Write to {args.output_file}")
        with open(args.output_file, "wb") as f:
            f.write(mean_to_blobproto(mean).SerializeToString())
    print(f"Number of channels: {mean.shape[0]}")
    for c, value in enumerate(channel_means(mean)):
        print(f"mean_value channel [{c}]: {value:.6g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
