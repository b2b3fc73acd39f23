"""Regenerate ``proto/caffe_pb2.py`` from ``proto/caffe.proto``.

Usage (from anywhere; paths are relative to this repository):

    python tools/regen_proto.py            # rewrite proto/caffe_pb2.py
    python tools/regen_proto.py --check    # exit 1 if proto/caffe_pb2.py is stale

The compiler is ``grpc_tools.protoc`` (``pip install grpcio-tools``), run as
``python -m grpc_tools.protoc``.  ``--check`` compiles into a temporary
directory and compares the embedded schema (the serialized
``FileDescriptorProto``) with the committed module, so a different protoc
release that only changes the generated boilerplate is not reported as stale;
pass ``--strict`` to compare the whole text instead.
"""
import argparse
import ast
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTO_DIR = os.path.join(ROOT, "proto")
PROTO_FILE = "caffe.proto"
MODULE_FILE = "caffe_pb2.py"

_DESCRIPTOR_RE = re.compile(r"AddSerializedFile\((b'(?:[^'\\]|\\.)*')\)", re.S)


def parse_args(argv=None):
    """Command-line options: ``--check`` and ``--strict``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if the committed module is stale")
    parser.add_argument("--strict", action="store_true",
                        help="with --check, compare the full generated text")
    return parser.parse_args(argv)


def generate(out_dir, proto_dir=PROTO_DIR):
    """Compile ``caffe.proto`` from ``proto_dir`` into ``out_dir``; return the module text.

    Raises RuntimeError with protoc's output when compilation fails.
    """
    cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_dir}",
           f"--python_out={out_dir}", os.path.join(proto_dir, PROTO_FILE)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"protoc failed ({' '.join(cmd)}):\n{result.stdout}{result.stderr}")
    with open(os.path.join(out_dir, MODULE_FILE), encoding="utf-8") as f:
        return f.read()


def serialized_descriptor(module_text):
    """The schema bytes embedded in a generated ``*_pb2.py`` text (None if absent)."""
    match = _DESCRIPTOR_RE.search(module_text)
    return ast.literal_eval(match.group(1)) if match else None


def is_stale(committed_text, fresh_text, strict=False):
    """True when the committed module does not match freshly generated code."""
    if strict:
        return committed_text != fresh_text
    committed = serialized_descriptor(committed_text)
    return committed is None or committed != serialized_descriptor(fresh_text)


def main(argv=None):
    """Regenerate (default) or check (``--check``) ``proto/caffe_pb2.py``; return the exit code."""
    args = parse_args(argv)
    target = os.path.join(PROTO_DIR, MODULE_FILE)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(tmp)
    if args.check:
        try:
            with open(target, encoding="utf-8") as f:
                committed = f.read()
        except FileNotFoundError:
            print(f"{target} is missing; run: python tools/regen_proto.py", file=sys.stderr)
            return 1
        if is_stale(committed, fresh, strict=args.strict):
            print(f"{target} is stale; run: python tools/regen_proto.py", file=sys.stderr)
            return 1
        print(f"{target} is up to date")
        return 0
    tmp_target = target + ".tmp"
    with open(tmp_target, "w", encoding="utf-8") as f:
        f.write(fresh)
    os.replace(tmp_target, target)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
