"""Image quality metrics and image grids shared by the evaluation of every stage.

Images are floats in [0, 1], shape (..., H, W, C).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def psnr_from_mse(mse):
    """PSNR = 10 log10(1 / MSE) for images in [0, 1]; an MSE under 1e-10 (an exact copy) counts as 1e-10.
    NumPy in, NumPy out at its precision (the probe's statistics run in float64); jax otherwise."""
    xp = np if isinstance(mse, (np.ndarray, np.floating, float)) else jnp
    return 10.0 * xp.log10(1.0 / xp.maximum(mse, 1e-10))


def psnr(x_HWC, y_HWC, axes=(-3, -2, -1)):
    """PSNR = 10 log10(1 / MSE) for images in [0, 1], per image (reduced over `axes`)."""
    return psnr_from_mse(jnp.mean((jnp.asarray(x_HWC, jnp.float32) - jnp.asarray(y_HWC, jnp.float32)) ** 2, axis=axes))


def _gaussian_window(size: int = 11, sigma: float = 1.5):
    x = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
    g = jnp.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _blur(x_NHW, w):
    """Separable 'valid' Gaussian filtering over H and W."""
    k = w.shape[0]
    x = x_NHW[:, None]  # N, 1, H, W
    kh = w.reshape(1, 1, k, 1)
    kw = w.reshape(1, 1, 1, k)
    x = jax.lax.conv_general_dilated(x, kh, (1, 1), "VALID")
    x = jax.lax.conv_general_dilated(x, kw, (1, 1), "VALID")
    return x[:, 0]


def ssim(x_BHWC, y_BHWC, window: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03):
    """Structural similarity (Wang et al. 2004) per image, Gaussian window, averaged over channels.

    SSIM = ((2 mu_x mu_y + C1)(2 s_xy + C2)) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2)),
    C1 = (k1 L)^2, C2 = (k2 L)^2 with L = 1; local statistics under the Gaussian window.
    """
    x = jnp.asarray(x_BHWC, jnp.float32)
    y = jnp.asarray(y_BHWC, jnp.float32)
    lead = x.shape[:-3]
    H, W, C = x.shape[-3:]
    x = jnp.moveaxis(x.reshape((-1, H, W, C)), -1, 1).reshape(-1, H, W)
    y = jnp.moveaxis(y.reshape((-1, H, W, C)), -1, 1).reshape(-1, H, W)
    w = _gaussian_window(window, sigma)
    c1, c2 = k1**2, k2**2
    mx, my = _blur(x, w), _blur(y, w)
    sxx = _blur(x * x, w) - mx**2
    syy = _blur(y * y, w) - my**2
    sxy = _blur(x * y, w) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    per = s.mean(axis=(-2, -1)).reshape((-1, C)).mean(-1)
    return per.reshape(lead)


def image_grid(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
    """Stack rows of images (each (N, H, W, C) floats in [0,1] or uint8) into one uint8 grid."""
    rows = [np.asarray(r) for r in rows]
    rows = [(np.clip(r, 0, 1) * 255).round().astype(np.uint8) if r.dtype != np.uint8 else r for r in rows]
    n = max(r.shape[0] for r in rows)
    H, W, C = rows[0].shape[1:]
    grid = np.full((len(rows) * (H + pad) + pad, n * (W + pad) + pad, C), 255, np.uint8)
    for i, r in enumerate(rows):
        for j in range(r.shape[0]):
            y, x = pad + i * (H + pad), pad + j * (W + pad)
            grid[y : y + H, x : x + W] = r[j]
    return grid
