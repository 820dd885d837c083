"""Calibration images for vision models: scikit-learn's bundled handwritten digits.

``sklearn.datasets.load_digits`` ships 1797 8x8 grey images (values 0-16) inside the package,
so no download is needed. They are scaled to [0, 1], resized bilinearly to the model's image
size, repeated over its channels and normalized with its processor's mean and std. The same
fixed held-out rule as the text (every fifth image) keeps held-out images out of calibration.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from .text import split_heldout

__all__ = ["digit_indices", "digits_pixel_values"]


@lru_cache(maxsize=1)
def _digits() -> torch.Tensor:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("vision calibration needs scikit-learn (pip install scikit-learn) for "
                          "its bundled load_digits images") from e
    images = load_digits().images                      # (1797, 8, 8), values 0..16
    return torch.as_tensor(images, dtype=torch.float32).div_(16.0).unsqueeze(1)  # (N, 1, 8, 8)


def digit_indices() -> tuple[list[int], list[int]]:
    """(calibration, held-out) indices into the digits set, by the fixed held-out rule."""
    return split_heldout(list(range(_digits().shape[0])))


def digits_pixel_values(indices: list[int], image_size: int | tuple[int, int], num_channels: int,
                        mean: float | tuple = 0.5, std: float | tuple = 0.5) -> torch.Tensor:
    """Digits ``indices`` as a normalized float32 batch ``(len(indices), num_channels, H, W)``."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    x = _digits()[torch.as_tensor(indices, dtype=torch.long)]                  # (B, 1, 8, 8)
    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)   # (B, 1, H, W)
    x = x.expand(-1, num_channels, -1, -1)                                     # (B, C, H, W)
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
    return ((x - mean_t) / std_t).contiguous()
