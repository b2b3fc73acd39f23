#!/usr/bin/env bash
# The main job, end to end (Caffe's examples/mnist/create_mnist.sh + train_lenet.sh, then `caffe test`):
# convert the bundled digits to LMDB, train LeNet, and score the final snapshot on the 1,000 test digits.
# Run from anywhere; everything it writes goes to examples_out/ in the project root.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p examples_out

for split in train:train t10k:test; do
    prefix=${split%%:*}
    db=examples_out/mnist_${split##*:}_lmdb
    if [ ! -e "$db" ]; then
        python tools/convert_mnist.py "data/mnist/$prefix-images-idx3-ubyte.gz" \
            "data/mnist/$prefix-labels-idx1-ubyte.gz" "$db.partial"
        mv "$db.partial" "$db"   # a half-converted database never passes for a finished one
    fi
done

python tools/train.py --solver models/lenet/lenet_solver.prototxt "$@"
python tools/test.py --model models/lenet/lenet_train_test.prototxt \
    --weights examples_out/lenet_iter_2000.caffemodel --iterations 10
