"""Convert a set of images to a Caffe database of Datums (Caffe's ``convert_imageset``).

    python tools/convert_imageset.py [FLAGS] ROOTFOLDER/ LISTFILE DB_NAME

LISTFILE has one ``path label`` per line (split at the last space); each image
is read from ROOTFOLDER + path (plain concatenation, as Caffe: end ROOTFOLDER
with '/').  Images are stored as raw BGR (or gray) uint8 Datums, or encoded
(``--encoded``: the original file bytes when no conversion is needed, else
re-encoded as ``--encode_type``).  Keys are ``"%08d_%s" % (line index, path)``;
records are committed 1,000 at a time.  Unreadable images are reported and
skipped, as in Caffe.  DB_NAME must not exist yet.

Flags (Caffe's): --gray, --shuffle, --backend {lmdb,leveldb} (default lmdb),
--resize_width, --resize_height (both > 0 to resize; bilinear),
--check_size (all raw Datums must have one size), --encoded, --encode_type
(png, jpg, ...; implies --encoded).
"""
import argparse
import io
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


from framework import random as framework_random  # noqa: E402
from framework.db import open_db  # noqa: E402
from framework.errors import CaffeError  # noqa: E402
from layers.data_transformer import array_to_datum, read_image  # noqa: E402

_PIL_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "bmp": "BMP", "tif": "TIFF", "tiff": "TIFF",
                "ppm": "PPM", "pgm": "PPM", "webp": "WEBP"}


def read_list(path):
    """The ``(path, label)`` pairs of a list file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise CaffeError(f"cannot open list file '{path}': {e.strerror}") from None
    lines = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        name, sep, label = line.rpartition(" ")
        try:
            lines.append((name, int(label)))
        except ValueError:
            raise CaffeError(f"line {number} of '{path}' is not 'path label': {line!r}") from None
        if not sep:
            raise CaffeError(f"line {number} of '{path}' is not 'path label': {line!r}")
    return lines


def _extension(name):
    return name.rsplit(".", 1)[1].lower() if "." in name else ""


def _matches_extension(name, encoding):
    """io.cpp matchExt: the file's extension is the wanted encoding (jpg also matches jpeg)."""
    ext, enc = _extension(name), encoding.lower()
    return ext == enc or (enc == "jpg" and ext == "jpeg")


def encode_image(image, encoding):
    """Encode an ``(H, W, C)`` BGR/gray uint8 image as ``encoding`` bytes (Pillow)."""
    from PIL import Image

    fmt = _PIL_FORMATS.get(encoding.lower())
    if fmt is None:
        raise CaffeError(f"unsupported encode_type '{encoding}' (known: {', '.join(sorted(_PIL_FORMATS))})")
    pil = Image.fromarray(image[:, :, 0]) if image.shape[2] == 1 else Image.fromarray(image[:, :, ::-1])
    buf = io.BytesIO()
    pil.save(buf, format=fmt)
    return buf.getvalue()


def image_to_datum(path, label, height, width, is_color, encoding):
    """io.cpp ReadImageToDatum: a raw or encoded Datum for one image file."""
    from proto import caffe_pb2

    image = read_image(path, height, width, is_color)
    if encoding:
        datum = caffe_pb2.Datum()
        if (image.shape[2] == 3) == is_color and not height and not width and _matches_extension(path, encoding):
            with open(path, "rb") as f:
                datum.data = f.read()  # the original file, untouched (ReadFileToDatum)
        else:
            datum.data = encode_image(image, encoding)
        datum.label = label
        datum.encoded = True
        return datum
    # CVMatToDatum sets encoded = false explicitly.
    return array_to_datum(image.transpose(2, 0, 1), label, encoded_false=True)


def convert_imageset(root, list_file, db_path, gray=False, shuffle=False, backend="lmdb", resize_width=0,
                     resize_height=0, check_size=False, encoded=False, encode_type="", log=print,
                     warn=lambda msg: print(msg, file=sys.stderr)):
    """Write the listed images to a new database; returns the number of records written."""
    lines = read_list(list_file)
    if shuffle:
        log("Shuffling data")
        order = framework_random.rng().permutation(len(lines))
        lines = [lines[i] for i in order]
    log(f"A total of {len(lines)} images.")
    if encode_type and not encoded:
        log("encode_type specified, assuming encoded=true.")
    height, width = max(0, resize_height), max(0, resize_width)
    if (height > 0) != (width > 0):
        warn("resize needs both --resize_height and --resize_width; images keep their size")
        height = width = 0
    count = 0
    data_size = None
    with open_db(db_path, backend, mode="new") as db:
        txn = db.transaction()
        for line_id, (name, label) in enumerate(lines):
            enc = encode_type
            if encoded and not enc:
                enc = _extension(name)  # guess the encoding from the file name
                if not enc:
                    warn(f"Failed to guess the encoding of '{name}'")
            try:
                datum = image_to_datum(root + name, label, height, width, not gray, enc)
            except CaffeError as e:
                warn(str(e))  # convert_imageset.cpp skips images it cannot read
                continue
            if check_size and not datum.encoded:
                size = datum.channels * datum.height * datum.width
                if data_size is None:
                    data_size = size
                elif len(datum.data) != data_size:
                    raise CaffeError(f"incorrect data field size {len(datum.data)} for '{name}' "
                                     f"(expected {data_size})")
            txn.put(b"%08d_" % line_id + name.encode(), datum.SerializeToString())
            count += 1
            if count % 1000 == 0:
                txn.commit()
                log(f"Processed {count} files.")
        if count % 1000:
            txn.commit()
            log(f"Processed {count} files.")
    return count


def parse_args(argv=None):
    """Command line: ROOTFOLDER/ LISTFILE DB_NAME and Caffe's flags."""
    p = argparse.ArgumentParser(description="Convert a set of images to the leveldb/lmdb format used as "
                                            "input for Caffe.")
    p.add_argument("root_folder", help="prefix of every listed path (end it with '/')")
    p.add_argument("list_file", help="text file with one 'path label' per line")
    p.add_argument("db_name", help="output database (must not exist)")
    p.add_argument("--gray", action="store_true", help="treat images as grayscale ones")
    p.add_argument("--shuffle", action="store_true", help="randomly shuffle the order of images and their labels")
    p.add_argument("--backend", default="lmdb", choices=["lmdb", "leveldb"],
                   help="the backend {lmdb, leveldb} for storing the result (default lmdb)")
    p.add_argument("--resize_width", type=int, default=0, help="width images are resized to")
    p.add_argument("--resize_height", type=int, default=0, help="height images are resized to")
    p.add_argument("--check_size", action="store_true",
                   help="check that all the datum have the same size")
    p.add_argument("--encoded", action="store_true", help="store the encoded image in the datum")
    p.add_argument("--encode_type", default="", help="what type to encode the image as ('png', 'jpg', ...)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        convert_imageset(args.root_folder, args.list_file, args.db_name, gray=args.gray, shuffle=args.shuffle,
                         backend=args.backend, resize_width=args.resize_width,
                         resize_height=args.resize_height, check_size=args.check_size,
                         encoded=args.encoded or bool(args.encode_type), encode_type=args.encode_type)
    except CaffeError as e:
        print(f"convert_imageset: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
