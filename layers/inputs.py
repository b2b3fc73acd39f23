"""Input layers that read nothing from disk: Input and DummyData."""
from framework.fillers import fill
from framework.layer import Layer, register_layer


def _shapes_per_top(layer, shapes, num_top, field):
    """One BlobShape for all tops or one per top (input_layer.cpp / dummy_data_layer.cpp)."""
    if len(shapes) not in (1, num_top):
        raise layer.error(f"must specify '{field}' once or once per top blob: {num_top} tops vs. "
                          f"{len(shapes)} shapes")
    result = []
    for i in range(num_top):
        dims = tuple(shapes[0 if len(shapes) == 1 else i].dim)
        if any(d < 0 for d in dims):
            raise layer.error(f"{field} for top {i} has a negative dim: {dims}")
        result.append(dims)
    return result


@register_layer("Input")
class InputLayer(Layer):
    """Net inputs: the caller writes the tops (``net.blobs['data'].data[...] = x``).

    input_param.shape: none (tops keep whatever shape they have), one shape for
    every top, or one per top.  Forward does nothing, so tops keep what the
    caller wrote; reshape does nothing either, so the caller may reshape the
    tops and then reshape the net.
    """

    exact_num_bottom_blobs = 0
    min_top_blobs = 1

    def setup(self, bottom, top):
        shapes = self.layer_param.input_param.shape
        if len(shapes) == 0:
            return
        for t, shape in zip(top, _shapes_per_top(self, shapes, len(top), "input_param.shape")):
            t.reshape(shape)

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        pass

    def backward(self, top, propagate_down, bottom):
        pass


@register_layer("DummyData")
class DummyDataLayer(Layer):
    """Tops filled by fillers: useful for tests and for shaping nets without data.

    dummy_data_param:
      data_filler -- none (constant 0), one for every top, or one per top;
      shape       -- one for all tops or one per top; or the legacy
                     num/channels/height/width (each given once or once per top).
    As in dummy_data_layer.cpp, tops with a constant filler are filled once at
    setup and never again; tops with any other filler are refilled on every
    forward (and not at setup).
    """

    exact_num_bottom_blobs = 0
    min_top_blobs = 1

    def setup(self, bottom, top):
        from proto import caffe_pb2

        p = self.layer_param.dummy_data_param
        num_top = len(top)
        fillers = list(p.data_filler)
        if len(fillers) not in (0, 1, num_top):
            raise self.error(f"number of data fillers must be 0, 1 or equal to the number of "
                             f"tops: {num_top}; you specified {len(fillers)} data fillers")
        if not fillers:
            fillers = [caffe_pb2.FillerParameter(type="constant", value=0)]
        self.fillers = [fillers[0 if len(fillers) == 1 else i] for i in range(num_top)]
        self.refill = [f.type != "constant" for f in self.fillers]

        legacy = [("num", p.num), ("channels", p.channels), ("height", p.height), ("width", p.width)]
        if any(len(values) for _, values in legacy):
            if len(p.shape):
                raise self.error("both shape and legacy num/channels/height/width were specified")
            for name, values in legacy:
                if len(values) not in (1, num_top):
                    raise self.error(f"must specify '{name}' once, or once per top blob "
                                     f"({num_top}); specified {len(values)}")
            shapes = [tuple(values[0 if len(values) == 1 else i] for _, values in legacy)
                      for i in range(num_top)]
        else:
            shapes = _shapes_per_top(self, p.shape, num_top, "dummy_data_param.shape")
        for t, shape, filler, refill in zip(top, shapes, self.fillers, self.refill):
            t.reshape(shape)
            if not refill:  # constant tops are filled once, here
                fill(t, filler)

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        for t, filler, refill in zip(top, self.fillers, self.refill):
            if refill:
                fill(t, filler)

    def backward(self, top, propagate_down, bottom):
        pass
