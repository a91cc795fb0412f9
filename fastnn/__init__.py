"""fastnn: a small, fast, correct MLP trainer for MNIST-like data on NumPy and CuPy.

    import fastnn
    model = fastnn.MLP([784, 128, 64, 10], activation="relu", device="auto")
    history = fastnn.fit(model, x_train, y_train, validation_split=0.1)  # as `fastnn train`: Adam, cosine, 20 epochs
    # or, e.g.: fastnn.fit(model, x_train, y_train, epochs=10, lr=0.1, optimizer="momentum", lr_schedule="constant")
    print(model.evaluate(x_test, y_test))  # the test set, once, at the end

    stack = fastnn.ModelStack([784, 128, 64, 10], seeds=range(16))  # 16 models, trained at once
    fastnn.fit_many(stack, x_train, y_train, lr=np.geomspace(3e-4, 3e-3, 16), validation_split=0.1)
    best = stack.model(stack.best())
"""

from . import datasets
from .backends import NumpyOps, Ops, cuda_status, get_ops, set_tf32
from .diagnose import EpochMonitor, Finding, diagnose
from .errors import ConfigError, DataError, DeviceError, DivergedError, FastnnError
from .gradcheck import GradReport, check_gradients, gradcheck
from .loop import train_epoch, train_step
from .lrfind import lr_find
from .model import MLP
from .optim import SGD, Adam, Momentum, Optimizer, make_optimizer
from .preprocessing import Preprocessing
from .stack import ModelStack, fit_many
from .train import fit

__version__ = "0.1.0"

__all__ = [
    "MLP", "Preprocessing", "fit", "train_epoch", "train_step", "datasets", "ModelStack", "fit_many",
    "diagnose", "Finding", "EpochMonitor", "gradcheck", "check_gradients", "GradReport", "lr_find",
    "Ops", "NumpyOps", "get_ops", "cuda_status", "set_tf32",
    "Optimizer", "SGD", "Momentum", "Adam", "make_optimizer",
    "FastnnError", "ConfigError", "DataError", "DeviceError", "DivergedError",
]
