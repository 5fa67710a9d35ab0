import numpy as np
import pytest

from dreamer4.runtime.images import image_grid, psnr, ssim


def test_psnr_worked_values():
    x = np.zeros((4, 4, 3), np.float32)
    assert float(psnr(x, x + 0.1)) == pytest.approx(20.0, abs=1e-4)  # mse 0.01 -> 20 dB
    assert float(psnr(x, x + 0.01)) == pytest.approx(40.0, abs=1e-3)


def test_ssim_worked_values():
    rng = np.random.default_rng(0)
    x = rng.random((2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(ssim(x, x)), 1.0, atol=1e-5)
    # constant images a, b: variances vanish, SSIM = (2ab + C1) / (a^2 + b^2 + C1), C1 = 1e-4
    a, b = np.full((1, 16, 16, 1), 0.2, np.float32), np.full((1, 16, 16, 1), 0.4, np.float32)
    assert float(ssim(a, b)[0]) == pytest.approx((2 * 0.2 * 0.4 + 1e-4) / (0.04 + 0.16 + 1e-4), rel=1e-4)
    # noise lowers it
    assert float(ssim(x, np.clip(x + rng.normal(0, 0.2, x.shape), 0, 1)).mean()) < 0.9


def test_image_grid_layout():
    rows = [np.zeros((3, 4, 5, 3)), np.ones((2, 4, 5, 3))]
    g = image_grid(rows, pad=1)
    assert g.shape == (2 * 5 + 1, 3 * 6 + 1, 3) and g.dtype == np.uint8
    assert g[1, 1].tolist() == [0, 0, 0] and g[6, 1].tolist() == [255, 255, 255]
