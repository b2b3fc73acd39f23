"""pycaffe's ``caffe.Classifier``: a TEST-phase Net that classifies images.

    clf = framework.Classifier("deploy.prototxt", "weights.caffemodel",
                               image_dims=(256, 256), mean=np.array([104, 117, 123]),
                               raw_scale=255, channel_swap=(2, 1, 0))
    scores = clf.predict([framework.io.load_image("cat.jpg")])   # (1, classes)

``predict`` resizes each image (H×W×K, e.g. from ``load_image``) to
``image_dims``, takes the 10 crops of ``framework.io.oversample`` (or the
centre crop), preprocesses each crop with a :class:`framework.io.Transformer`
(transpose to K×H×W, channel swap, raw_scale, mean, input_scale), runs the net
and, with oversampling, averages the scores of each image's 10 crops.
"""
import numpy as np

from .errors import CaffeError
from .io import Transformer, oversample as _oversample, resize_image
from .net import TEST, Net


class Classifier(Net):
    """A Net (TEST phase) with pycaffe's image preprocessing and ``predict``.

    model_file       -- deploy prototxt with one 4-D input (N×K×H×W); its H×W is the crop size
    pretrained_file  -- .caffemodel weights (None: keep the fillers' values)
    image_dims       -- (H, W) images are resized to before cropping (default: the crop size)
    mean             -- per-channel (K,) vector or (K, H, W) array subtracted after raw_scale
    input_scale      -- multiplies the input after the mean subtraction
    raw_scale        -- multiplies the raw image (e.g. 255 for images loaded in [0, 1])
    channel_swap     -- channel order, e.g. (2, 1, 0) for RGB images into a BGR net
    """

    def __init__(self, model_file, pretrained_file=None, image_dims=None, mean=None,
                 input_scale=None, raw_scale=None, channel_swap=None):
        super().__init__(model_file, TEST, weights=pretrained_file)
        if not self.inputs:
            raise CaffeError(f"net '{self.name}' has no input blob to classify images with")
        if not self.outputs:
            raise CaffeError(f"net '{self.name}' has no output blob")
        in_ = self.inputs[0]
        shape = self.blobs[in_].shape
        if len(shape) != 4:
            raise CaffeError(f"Classifier needs a 4-D N x K x H x W input; input '{in_}' of "
                             f"net '{self.name}' has shape {tuple(shape)}")
        self.transformer = Transformer({in_: shape})
        self.transformer.set_transpose(in_, (2, 0, 1))
        if mean is not None:
            self.transformer.set_mean(in_, mean)
        if input_scale is not None:
            self.transformer.set_input_scale(in_, input_scale)
        if raw_scale is not None:
            self.transformer.set_raw_scale(in_, raw_scale)
        if channel_swap is not None:
            self.transformer.set_channel_swap(in_, channel_swap)

        self.crop_dims = np.array(shape[2:])
        if image_dims is None or len(image_dims) == 0:
            image_dims = self.crop_dims
        image_dims = tuple(int(d) for d in image_dims)
        if len(image_dims) != 2 or min(image_dims) <= 0:
            raise CaffeError(f"image_dims must be two positive sizes (H, W), got {image_dims}")
        if image_dims[0] < self.crop_dims[0] or image_dims[1] < self.crop_dims[1]:
            raise CaffeError(f"image_dims {image_dims[0]}x{image_dims[1]} are smaller than the "
                             f"net's input {self.crop_dims[0]}x{self.crop_dims[1]}")
        self.image_dims = image_dims
        self.batch_size = max(int(shape[0]), 1)

    def center_crop_box(self):
        """(y0, x0, y1, x1) of the centre crop of an ``image_dims`` image (pycaffe's int cast)."""
        centre = np.array(self.image_dims, dtype=np.float64) / 2.0
        box = np.tile(centre, 2) + np.concatenate([-self.crop_dims / 2.0, self.crop_dims / 2.0])
        return tuple(int(v) for v in box)

    def predict(self, inputs, oversample=True):
        """Class scores (N, classes) of the first output for N images (H×W×K each).

        oversample -- True (default): average over the 4 corner + centre crops
                      and their mirrors; False: the centre crop only.
        The crops run through the net in batches of the net's input batch size.
        """
        if len(inputs) == 0:
            raise CaffeError("predict: no input images")
        channels = np.asarray(inputs[0]).shape[2]
        resized = np.zeros((len(inputs), self.image_dims[0], self.image_dims[1], channels),
                           dtype=np.float32)
        for ix, image in enumerate(inputs):
            image = np.asarray(image)
            if image.ndim != 3 or image.shape[2] != channels:
                raise CaffeError(f"predict: image {ix} has shape {image.shape}; expected "
                                 f"H x W x {channels} like image 0")
            resized[ix] = resize_image(image, self.image_dims)

        if oversample:
            crops = _oversample(resized, self.crop_dims)
        else:
            y0, x0, y1, x1 = self.center_crop_box()
            crops = resized[:, y0:y1, x0:x1, :]

        in_ = self.inputs[0]
        caffe_in = np.zeros((crops.shape[0], crops.shape[3], crops.shape[1], crops.shape[2]),
                            dtype=np.float32)
        for ix, crop in enumerate(crops):
            caffe_in[ix] = self.transformer.preprocess(in_, crop)
        predictions = self._forward_batches(in_, caffe_in)

        if oversample:
            predictions = predictions.reshape((len(predictions) // 10, 10, -1)).mean(1)
        return predictions

    def _forward_batches(self, in_, caffe_in):
        """Run ``caffe_in`` through the net in chunks (pycaffe's forward_all); first output."""
        out_name = self.outputs[0]
        outs = []
        for start in range(0, len(caffe_in), self.batch_size):
            out = self.forward(**{in_: caffe_in[start:start + self.batch_size]})
            outs.append(np.array(out[out_name]))  # copy: the blob is reused by the next chunk
        return np.concatenate(outs)
