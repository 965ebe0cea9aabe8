"""Errors the server answers with; the transport maps each to one gRPC status code."""


class ServingError(Exception):
    """A request the server cannot serve; the message is safe to show to the client."""


class InvalidInput(ServingError, ValueError):
    """A request's tensors do not fit the model (name, datatype, shape, size or values): INVALID_ARGUMENT."""
