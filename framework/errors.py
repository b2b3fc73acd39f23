"""Exception types that carry Caffe-style context (file, line, layer, blob)."""


class CaffeError(Exception):
    """Base class for every error the framework raises on bad input."""


class PrototxtError(CaffeError):
    """A text-format protobuf file could not be parsed (message names file, line, column)."""


class NetError(CaffeError):
    """The net definition is inconsistent (bad wiring, unknown blob, duplicate top...)."""


class LayerError(CaffeError):
    """A layer's parameters or bottoms are invalid; the message names the layer."""

    def __init__(self, layer_name, layer_type, message):
        self.layer_name = layer_name
        self.layer_type = layer_type
        super().__init__(f"layer '{layer_name}' (type {layer_type}): {message}")


class WeightsError(CaffeError):
    """A weights file does not fit the net or is not a weights file."""
