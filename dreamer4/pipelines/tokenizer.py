"""`dreamer4 train-tokenizer`: train the causal tokenizer of RUN_DIR on DATASET_DIR."""

from __future__ import annotations

from dreamer4.config import Config
from dreamer4.runtime.distributed import log0
from dreamer4.tokenizer.train import train_tokenizer


def run_train_tokenizer(cfg: Config, data: str, run: str) -> dict:
    results = train_tokenizer(cfg, data, run)
    log0(f"tokenizer: held-out PSNR {results['eval_psnr']:.2f} dB (mean-frame baseline "
          f"{results['eval_psnr_mean_frame_baseline']:.2f} dB), SSIM {results['eval_ssim']:.3f}; "
          f"grid in {run}/tokenizer/images/")
    return results
