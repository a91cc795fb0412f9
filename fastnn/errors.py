"""The exceptions fastnn raises on purpose. Each names the thing that is wrong."""


class FastnnError(Exception):
    """Base class of every error fastnn raises deliberately."""


class ConfigError(FastnnError, ValueError):
    """A bad argument: an unknown activation, loss, optimizer or device name, a bad size."""


class DataError(FastnnError, ValueError):
    """Bad input data or a bad file: wrong shape, labels out of range, NaN, truncated file."""


class DeviceError(FastnnError, RuntimeError):
    """The requested device cannot be used (CuPy missing, no CUDA device)."""


class DivergedError(FastnnError, ArithmeticError):
    """Training produced a non-finite loss. ``.history`` holds the epochs before it."""

    def __init__(self, message, history):
        super().__init__(message)
        self.history = history
