"""`dreamer4 dataset import-video`: videos without actions become unlabeled episodes.

Each MP4 / GIF / WebM file (or folder of PNG frames, in name order) becomes one episode in the
ordinary dataset format (store.py): frames fitted to the dataset's frame shape, action -1 on every
row, reward 0, is_first on row 0, is_last on the final row, never terminal, labeled false. The
episode records `has_actions: false`, `has_rewards: false`, its source file and frame rate, and the
header's `has_actions` / `has_rewards` become false (not every episode has them). The loader then
masks actions (action_mask false) and rewards (reward_mask false) for these episodes, so a world
model can pretrain on video alone and labeled Craftax episodes can be collected into the same
dataset later (`dreamer4 collect --out` the same directory adopts an imported dataset's header).

All-or-nothing: every file is read, checked and fitted before anything is written; the shards
are then written and listed in the manifest in one commit. A killed import leaves only
uncommitted shard groups, which the next import deletes; files already committed (same sha256)
are skipped, so rerunning the same command finishes the job.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from pathlib import Path

import numpy as np

from dreamer4.config import Config, save_config
from dreamer4.data import store
from dreamer4.data.collect import stratified_pick
from dreamer4.data.env import make_env
from dreamer4.data.store import DatasetError

FIT_MODES = ("resize", "pad", "letterbox")
VIDEO_SUFFIXES = (".mp4", ".gif", ".webm", ".mkv", ".mov", ".avi")
WRITER = "video"


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(path.glob("*.png")) if path.is_dir() else [path]
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _to_rgb(frames: np.ndarray, name: str) -> np.ndarray:
    """(T, H, W[, C]) of any of gray / gray+alpha / RGB / RGBA -> uint8 (T, H, W, 3)."""
    if frames.dtype != np.uint8:
        if np.issubdtype(frames.dtype, np.floating):
            frames = np.round(np.clip(frames, 0, 1) * 255)
        elif frames.dtype == np.uint16:
            frames = frames // 257
        frames = frames.astype(np.uint8)
    if frames.ndim == 3:
        frames = frames[..., None]
    if frames.ndim != 4 or frames.shape[-1] not in (1, 2, 3, 4):
        raise DatasetError(f"{name}: frames of shape {frames.shape[1:]} are not images (expected H x W x 1-4 channels)")
    c = frames.shape[-1]
    if c in (1, 2):
        frames = np.repeat(frames[..., :1], 3, axis=-1)
    return frames[..., :3]


def _decoder_reason(e: Exception) -> str:
    """One line out of a decoder error (imageio-ffmpeg appends ffmpeg's whole banner and log)."""
    text = str(e)
    head, _, log = text.partition("=== stderr ===")
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    reason = head.strip().splitlines()[0] if head.strip() else e.__class__.__name__
    errors = [ln for ln in lines if "error" in ln.lower() or "invalid" in ln.lower()]
    if errors:
        reason += f": ffmpeg says {errors[-1]!r}"
    return reason


def read_frames(path: str | Path) -> tuple[np.ndarray, float | None]:
    """(frames_THW3 uint8, frames per second or None) of a video file or a folder of PNGs."""
    import imageio.v3 as iio

    # imageio-ffmpeg starts ffmpeg with preexec_fn=os.setpgrp (keeping Ctrl+C from it), i.e. Python
    # code run between fork and exec: unsafe in a multithreaded process such as JAX's (its
    # "os.fork() ... will likely lead to a deadlock" warning; imageio-ffmpeg issue #58, a hang). This
    # variable drops that preexec_fn; ffmpeg then also receives a Ctrl+C, which stops the import anyway.
    os.environ.setdefault("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "1")
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"{p}: no such file or folder")
    try:
        if p.is_dir():
            files = sorted(p.glob("*.png"))
            if not files:
                raise DatasetError(f"{p}: folder holds no .png frames")
            imgs = [_to_rgb(np.asarray(iio.imread(f))[None], str(f))[0] for f in files]
            if len({im.shape for im in imgs}) != 1:
                raise DatasetError(f"{p}: PNG frames differ in size ({sorted({im.shape for im in imgs})})")
            return np.stack(imgs), None
        suffix = p.suffix.lower()
        if suffix not in VIDEO_SUFFIXES:
            raise DatasetError(
                f"{p}: unsupported file type {suffix!r} (expected one of {VIDEO_SUFFIXES} or a PNG folder)"
            )
        if suffix == ".gif":
            frames = np.asarray(iio.imread(p, index=None))
            meta = iio.immeta(p)
            dur = meta.get("duration")  # milliseconds per frame
            fps = 1000.0 / dur if dur else None
        else:
            frames = np.asarray(iio.imread(p, index=None, plugin="FFMPEG"))
            meta = iio.immeta(p, plugin="FFMPEG")
            fps = meta.get("fps")
        if frames.ndim == 3 and suffix == ".gif":  # a one-frame GIF comes back without the T axis
            frames = frames[None]
    except DatasetError:
        raise
    except Exception as e:  # every decoder failure is the file's fault as far as the user can tell
        raise DatasetError(f"{p}: cannot read as a video ({_decoder_reason(e)})") from None
    if frames.size == 0 or frames.shape[0] == 0:
        raise DatasetError(f"{p}: has zero frames")
    return _to_rgb(frames, str(p)), (float(fps) if fps and math.isfinite(fps) and fps > 0 else None)


def fit_frames(frames_THWC: np.ndarray, shape: tuple[int, int, int], mode: str, name: str) -> np.ndarray:
    """Fit frames to (H, W, C).

    resize:    bilinear resize to exactly H x W (aspect ratio not kept).
    pad:       centre the frames on a black H x W canvas; a frame larger than H x W cannot be fitted.
    letterbox: scale to fit inside H x W keeping the aspect ratio, then pad (centred, black).
    """
    from PIL import Image

    H, W, C = shape
    if C != 3:
        raise DatasetError(f"{name}: the dataset's frames have {C} channels; video import writes RGB (3)")
    T, h, w, _ = frames_THWC.shape
    if h < 1 or w < 1:
        raise DatasetError(f"{name}: frames of {h}x{w} pixels cannot be fitted")
    if (h, w) == (H, W):
        return frames_THWC

    def resize(x, size_hw):
        return np.stack([np.asarray(Image.fromarray(f).resize((size_hw[1], size_hw[0]), Image.BILINEAR)) for f in x])

    def pad(x):
        out = np.zeros((len(x), H, W, 3), np.uint8)
        top, left = (H - x.shape[1]) // 2, (W - x.shape[2]) // 2
        out[:, top : top + x.shape[1], left : left + x.shape[2]] = x
        return out

    if mode == "resize":
        return resize(frames_THWC, (H, W))
    if mode == "pad":
        if h > H or w > W:
            raise DatasetError(
                f"{name}: frames of {h}x{w} do not fit into the dataset's {H}x{W} frames with "
                f"--fit pad (use --fit resize or letterbox)"
            )
        return pad(frames_THWC)
    if mode == "letterbox":
        s = min(H / h, W / w)
        nh, nw = max(1, min(H, round(h * s))), max(1, min(W, round(w * s)))
        return pad(resize(frames_THWC, (nh, nw)))
    raise DatasetError(f"unknown fit mode {mode!r}; expected one of {FIT_MODES}")


def _parse_shape(text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise DatasetError(f"--frame-shape {text!r} must look like H,W,C with positive integers (e.g. 63,63,3)")
    return shape  # type: ignore[return-value]


def _new_header(cfg: Config, frame_shape) -> dict:
    _, _, spec = make_env(cfg.env.name)
    return {
        **store.env_header(spec, frame_shape),
        "seed": cfg.seed,
        "behavior_policy": "video",
        "created_by": "import-video",
        "labeled_fraction": 0.0,
        "eval_fraction": cfg.collect.eval_fraction,
        "step_convention": "row t: frame_t; action_t led into frame_t (-1 at is_first); "
        "reward_t received on arriving at frame_t",
        "shards": [],
        "writers": {},
    }


def import_videos(
    cfg: Config,
    out: str | Path,
    files: list[str],
    *,
    frame_shape: str | None = None,
    fit: str = "resize",
    fps: float | None = None,
    log=print,
) -> dict:
    """Import `files` into dataset `out` (created when missing); returns a summary."""
    if fit not in FIT_MODES:
        raise DatasetError(f"--fit {fit!r}: expected one of {FIT_MODES}")
    root = Path(out)
    want_shape = _parse_shape(frame_shape)
    store.refuse_orphaned_shards(root)
    existing = store.read_manifest(root)
    # 1. Read every file first: a file that is no video is refused before anything else is built.
    digests_now = {}
    read = []
    for f in files:
        p = Path(f)
        digests_now[f] = _file_digest(p) if p.exists() else None
        done = existing is not None and digests_now[f] in {
            e.get("sha256") for s in existing.get("shards", []) for e in s["episodes"]
        }
        read.append(None if done else read_frames(p))
    if existing is not None:
        if existing.get("format") != store.FORMAT:
            raise DatasetError(f"{store.manifest_path(root)} is not a dreamer4 dataset manifest")
        if existing["env"]["name"] != cfg.env.name:
            raise DatasetError(
                f"dataset {root} holds env.name={existing['env']['name']!r} episodes but the config "
                f"has env.name={cfg.env.name!r}"
            )
        shape = tuple(existing["frame_shape"])
        if want_shape is not None and want_shape != shape:
            raise DatasetError(f"--frame-shape {frame_shape} differs from dataset {root}'s frame shape {shape}")
        header = None
        done_digests = {e.get("sha256") for s in existing["shards"] for e in s["episodes"]}
    else:
        header = _new_header(cfg, want_shape)
        shape = tuple(header["frame_shape"])
        done_digests = set()

    # Then fit every file before writing anything.
    todo = []
    for f, got in zip(files, read):
        p = Path(f)
        d = digests_now[f]
        if d is not None and d in done_digests:
            log(f"{p}: already imported, skipped")
            continue
        frames, file_fps = got if got is not None else read_frames(p)
        frames = fit_frames(frames, shape, fit, str(p))
        todo.append((p, d, frames, file_fps or fps))
        done_digests.add(d)
    if not todo:
        log("nothing to import")
        return {"episodes": 0, "frames": 0}

    # 2. Write one shard per file (named after the import's index), then commit them together.
    A = len((existing or header)["achievement_names"])
    if existing is None:  # a new dataset gets its header first, as collect does: shard groups
        with store.locked_manifest(root) as m:  # left by a killed import are then recognisably
            if not m:  # uncommitted (and deleted by the next import), never orphans
                m.update(header)
                save_config(cfg, root)
    with store.locked_manifest(root) as m:
        if not m:
            m.update(header)
            save_config(cfg, root)
        store.write_group_json(root, {"dreamer4": "dataset; see manifest.json"})
        committed = {s["name"] for s in m["shards"]}
        sdir = root / "shards"
        if sdir.is_dir():  # leftovers of an import killed before its commit
            for q in sdir.glob(f"{WRITER}-*"):
                if q.name not in committed:
                    shutil.rmtree(q)
        mine = [s for s in m["shards"] if s["writer"] == WRITER]
        n_eps = sum(len(s["episodes"]) for s in mine)
        u = float(np.random.default_rng([cfg.seed, 0x51DE0]).random())
        new_shards = []
        for i, (p, d, frames, rate) in enumerate(todo):
            T = len(frames)
            rows = {
                "frame": frames,
                "action": np.full((T,), -1, np.int32),
                "reward": np.zeros((T,), np.float32),
                "is_first": np.arange(T) == 0,
                "is_last": np.arange(T) == T - 1,
                "is_terminal": np.zeros((T,), bool),
                "achievements": np.zeros((T, A), bool),
            }
            name = f"{WRITER}-s{len(mine) + i:06d}"
            k = n_eps + i
            entry = {
                "name": name,
                "writer": WRITER,
                "index": len(mine) + i,
                "num_frames": T,
                "episodes": [
                    {
                        "id": f"video-e{k:06d}",
                        "start": 0,
                        "length": T,
                        "return": 0.0,
                        "achievements": [],
                        "labeled": False,
                        "split": "eval" if stratified_pick(k, cfg.collect.eval_fraction, u) else "train",
                        "policy": "video",
                        "has_actions": False,
                        "has_rewards": False,
                        "source": str(p),
                        "fps": rate,
                        "sha256": d,
                    }
                ],
            }
            # The import batch lets `dataset rebuild-manifest` commit all of this import's shards or none.
            digests = store.write_shard(
                root,
                name,
                rows,
                read_chunk=cfg.collect.read_chunk_frames,
                zstd_level=cfg.collect.zstd_level,
                entry={**entry, "batch": {"first": len(mine), "count": len(todo)}},
                header=store.manifest_header(m),
            )
            new_shards.append(
                {
                    **{k2: v for k2, v in entry.items() if k2 != "episodes"},
                    "digests": digests,
                    "episodes": entry["episodes"],
                }
            )
        m["shards"].extend(new_shards)
        m["has_actions"] = False
        m["has_rewards"] = False
        m.setdefault("video_imports", []).append(
            {"files": [str(p) for p, *_ in todo], "fit": fit, "frames": int(sum(len(t[2]) for t in todo))}
        )
    summary = {"episodes": len(todo), "frames": int(sum(len(t[2]) for t in todo)), "frame_shape": list(shape)}
    log(f"imported {summary['episodes']} videos ({summary['frames']} frames, fitted to {shape} by {fit}) into {root}")
    return summary
