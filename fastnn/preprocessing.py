"""How raw images become network inputs: one object for the data set, the model and the CLI."""

from __future__ import annotations

from dataclasses import astuple, dataclass

import numpy as np


@dataclass(frozen=True)
class Preprocessing:
    """Network input = raw pixel * ``scale`` + ``shift``.

    pixel_max: the range of the raw pixels that scale and shift were derived for:
    255 for 0..255 pixels (scale 1/255 by default), 1 for images already in [0, 1].
    uint8 pixels are always 0..255 and are rescaled to that range first.
    """

    scale: float = 1.0 / 255.0
    shift: float = 0.0
    pixel_max: float = 255.0

    def uint8_affine(self) -> tuple[float, float]:
        """``(a, c)`` with network input = uint8 pixel * a + c (what the gather kernel applies)."""
        return self.scale * self.pixel_max / 255.0, self.shift

    def network_inputs(self, x, dtype=np.float32) -> np.ndarray:
        """What the network sees for a model input ``x`` (N, D) (host arrays).

        uint8 pixels are preprocessed; float arrays are network inputs already and
        are used as given (the rule of ``MLP.fit``, ``predict`` and ``evaluate``).
        """
        x = np.asarray(x)
        if x.dtype != np.uint8:
            return x.astype(dtype, copy=False)
        a, c = self.uint8_affine()
        return (x.astype(np.float64) * a + c).astype(dtype, copy=False)

    def from_raw(self, images, dtype=np.float32, pixel_max: float | None = None) -> np.ndarray:
        """Raw images (N, D) in any form -> network inputs, as the training images were made.

        uint8 pixels are 0..255; float images are in ``pixel_max`` units when it is
        given, else 0..1 when none exceeds 1 and 0..255 otherwise.
        """
        x = np.asarray(images)
        if x.dtype == np.uint8:
            in_max = 255.0
        elif pixel_max is not None:
            in_max = float(pixel_max)
        else:
            in_max = 255.0 if x.size and x.max() > 1 else 1.0
        x = x.astype(np.float64) * (self.pixel_max / in_max)
        return (x * self.scale + self.shift).astype(dtype)

    def astuple(self) -> tuple[float, float, float]:
        return astuple(self)

    def to_config(self) -> dict:
        """The keys a saved model holds."""
        return {"input_scale": self.scale, "input_shift": self.shift, "pixel_max": self.pixel_max}

    @classmethod
    def from_config(cls, cfg: dict) -> Preprocessing:
        return cls(float(cfg["input_scale"]), float(cfg["input_shift"]), float(cfg.get("pixel_max", 255.0)))
