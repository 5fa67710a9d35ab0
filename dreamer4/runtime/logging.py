"""Metrics and images: wandb (offline by default) plus files in the stage directory.

Every metric line is appended to STAGE_DIR/metrics.jsonl and every image is written as a PNG under
STAGE_DIR/images/, so a run can be read without wandb. Only JAX process 0 logs. Tests set
WANDB_MODE=disabled (or runtime.wandb=disabled).

A resumed stage calls `truncate_after(step)` with the step of the checkpoint it continues from:
lines logged after that checkpoint (by the run that was killed) are dropped, so metrics.jsonl
never repeats a step. A full disk is one `DiskFullError` (runtime/faults.py).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np

from dreamer4.runtime.distributed import is_main_process
from dreamer4.runtime.faults import disk_guard


class MetricLogger:
    def __init__(
        self, stage_dir: str | Path, stage: str, config: dict, mode: str = "offline", project: str = "dreamer4"
    ):
        self.dir = Path(stage_dir)
        self.enabled = is_main_process()
        self.run = None
        if not self.enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "images").mkdir(exist_ok=True)
        mode = os.environ.get("WANDB_MODE", mode)
        if mode != "disabled":
            import wandb

            id_file = self.dir / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            self.run = wandb.init(
                project=project,
                name=f"{self.dir.parent.name}/{stage}",
                id=run_id,
                resume="allow",
                dir=str(self.dir),
                mode=mode,
                config=config,
                settings=wandb.Settings(silent=True),
            )

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        line = json.dumps({"step": int(step), **clean}) + "\n"
        with disk_guard(self.dir, len(line), "metrics.jsonl"), open(self.dir / "metrics.jsonl", "a") as f:
            f.write(line)
        if self.run is not None:
            self.run.log(clean, step=int(step))

    def log_image(self, step: int, name: str, image_HWC: np.ndarray) -> Path | None:
        """Write a uint8 image as PNG (and to wandb); returns the file path."""
        if not self.enabled:
            return None
        import imageio.v3 as iio

        path = self.dir / "images" / f"{name}_{int(step):07d}.png"
        image = np.asarray(image_HWC, np.uint8)
        with disk_guard(path.parent, image.nbytes, f"image {path.name}", cleanup=[path]):
            iio.imwrite(path, image)
        if self.run is not None:
            import wandb

            self.run.log({name: wandb.Image(str(path))}, step=int(step))
        return path

    def log_video(self, step: int, name: str, path: str | Path) -> None:
        """Send a video file already written to the stage dir (GIF/MP4) to wandb too."""
        if self.run is not None:
            import wandb

            self.run.log({name: wandb.Video(str(path))}, step=int(step))

    def truncate_after(self, step: int) -> int:
        """Drop metrics.jsonl lines of steps after `step` (a resume from that checkpoint); returns how many."""
        p = self.dir / "metrics.jsonl"
        if not self.enabled or not p.exists():
            return 0
        lines = p.read_text().splitlines(keepends=True)
        keep = []
        for line in lines:
            try:
                if int(json.loads(line)["step"]) > step:
                    continue
            except (ValueError, KeyError, TypeError):  # a line cut short by the kill
                continue
            keep.append(line if line.endswith("\n") else line + "\n")
        if len(keep) != len(lines):
            tmp = p.with_name(p.name + ".tmp")
            with disk_guard(self.dir, sum(map(len, keep)), "metrics.jsonl", cleanup=[tmp]):
                tmp.write_text("".join(keep))
                os.replace(tmp, p)
        return len(lines) - len(keep)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def read_metrics(stage_dir: str | Path) -> list[dict]:
    p = Path(stage_dir) / "metrics.jsonl"
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
