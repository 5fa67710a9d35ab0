"""`dreamer4 dataset import-video`: generated GIF / MP4 / PNG folders round-trip into the dataset
format as unlabeled episodes; bad files are rejected naming the file, with nothing written."""

import warnings

import imageio.v3 as iio
import jax
import numpy as np
import pytest
from conftest import REPO, make_test_config

from dreamer4.data.store import Dataset, DatasetError, read_manifest, verify
from dreamer4.data.video import fit_frames, import_videos

SHAPE = (32, 40, 3)


def _palette_frames(T=6, shape=SHAPE):
    """Frames made of 8 flat colours in blocks: exactly representable in a GIF palette."""
    H, W, _ = shape
    colours = np.array(
        [
            [0, 0, 0],
            [255, 0, 0],
            [0, 255, 0],
            [0, 0, 255],
            [255, 255, 0],
            [255, 0, 255],
            [0, 255, 255],
            [255, 255, 255],
        ],
        np.uint8,
    )
    yy, xx = np.mgrid[:H, :W]
    return np.stack([colours[((yy // 8) + (xx // 8) + t) % 8] for t in range(T)])


def _smooth_frames(T=8, shape=SHAPE):
    """Smooth gradients that move: friendly to a lossy codec."""
    H, W, _ = shape
    yy, xx = np.mgrid[:H, :W].astype(np.float32)
    out = []
    for t in range(T):
        r = 128 + 100 * np.sin((xx + 2 * t) / 9.0)
        g = 128 + 100 * np.cos((yy - t) / 7.0)
        b = 128 + 60 * np.sin((xx + yy) / 11.0)
        out.append(np.stack([r, g, b], -1))
    return np.clip(np.round(np.stack(out)), 0, 255).astype(np.uint8)


def _cfg():
    return make_test_config(["collect.eval_fraction=0.5"])


def _psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / max(mse, 1e-12))


def test_gif_png_mp4_round_trip(tmp_path, monkeypatch):
    jax.numpy.zeros(1).block_until_ready()  # JAX's threads run: forking with Python code is unsafe now
    monkeypatch.setenv("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "1")  # for this test's own mp4 writer
    gif_frames = _palette_frames()
    gif = tmp_path / "clip.gif"
    iio.imwrite(gif, gif_frames, duration=100, loop=0)  # 100 ms per frame = 10 fps
    png_dir = tmp_path / "pngs"
    png_dir.mkdir()
    png_frames = _smooth_frames(5)
    for i, f in enumerate(png_frames):
        iio.imwrite(png_dir / f"{i:04d}.png", f)
    mp4_frames = _smooth_frames(12)
    mp4 = tmp_path / "clip.mp4"
    iio.imwrite(
        mp4,
        mp4_frames,
        plugin="FFMPEG",
        fps=15,
        codec="libx264",
        quality=10,
        macro_block_size=8,
        output_params=["-pix_fmt", "yuv444p"],
    )

    root = tmp_path / "ds"
    cfg = _cfg()
    monkeypatch.delenv("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = import_videos(cfg, root, [str(gif), str(png_dir), str(mp4)], frame_shape="32,40,3", log=lambda *a: None)
    # ffmpeg was started without Python code between fork and exec (JAX warns of a deadlock otherwise)
    assert not [w for w in caught if "os.fork()" in str(w.message)]
    assert s["episodes"] == 3 and s["frames"] == 6 + 5 + 12
    m = read_manifest(root)
    assert m["has_actions"] is False and m["has_rewards"] is False and m["frame_shape"] == [32, 40, 3]
    eps = [e for sh in m["shards"] for e in sh["episodes"]]
    assert [e["fps"] for e in eps][0] == pytest.approx(10.0)
    assert eps[1]["fps"] is None and eps[2]["fps"] == pytest.approx(15.0)
    assert all(not e["labeled"] and not e["has_actions"] and not e["has_rewards"] for e in eps)
    assert verify(root) == ([], [])

    ds = Dataset.open(root, env_name=cfg.env.name, hide_unlabeled_actions=False)
    by_src = {e.id: e for e in ds.episodes}
    rows = [
        ds.read(e, 0, e.length, ("frame", "action", "reward", "is_first", "is_last", "is_terminal"))
        for e in by_src.values()
    ]
    np.testing.assert_array_equal(rows[0]["frame"], gif_frames)  # palette-safe GIF: exact
    np.testing.assert_array_equal(rows[1]["frame"], png_frames)  # PNG: lossless
    assert rows[2]["frame"].shape == mp4_frames.shape and _psnr(rows[2]["frame"], mp4_frames) > 30.0
    for r in rows:
        T = len(r["frame"])
        assert (r["action"] == -1).all() and (r["reward"] == 0).all() and not r["is_terminal"].any()
        assert r["is_first"].tolist() == [True] + [False] * (T - 1)
        assert r["is_last"].tolist() == [False] * (T - 1) + [True]

    # Rerunning the same import is a no-op (resumable: committed files are skipped).
    assert import_videos(cfg, root, [str(gif)], log=lambda *a: None)["episodes"] == 0
    assert len(read_manifest(root)["shards"]) == 3


def test_loader_masks_actions_and_rewards_of_videos(tmp_path):
    from dreamer4.data.loader import make_loader

    cfg = make_test_config(["collect.eval_fraction=0.5"])
    clips = []
    for i in range(4):
        p = tmp_path / f"c{i}.gif"
        iio.imwrite(p, _palette_frames(10, (63, 63, 3)), duration=50)
        clips.append(str(p))
    # Default frame shape: the config's env (Craftax-Classic, 63x63x3); identical content is fine.
    root = tmp_path / "ds"
    import_videos(cfg, root, clips[:1], log=lambda *a: None)
    for i, c in enumerate(clips[1:]):  # distinct bytes per file (else skipped as already imported)
        iio.imwrite(c, _palette_frames(10 + i + 1, (63, 63, 3)), duration=50)
    import_videos(cfg, root, clips[1:], log=lambda *a: None)
    batch = next(iter(make_loader(root, cfg, "train", num_epochs=1, batch_size=2, seq_len=8)))
    assert batch["frames"].shape == (2, 8, 63, 63, 3)
    assert not batch["action_mask"].any() and (batch["actions"] == -1).all()
    assert not batch["reward_mask"].any()


def test_fit_modes():
    x = np.full((2, 10, 20, 3), 200, np.uint8)
    p = fit_frames(x, (16, 24, 3), "pad", "x")
    assert p.shape == (2, 16, 24, 3) and p[:, 3:13, 2:22].min() == 200 and p[:, :3].max() == 0
    lb = fit_frames(x, (16, 16, 3), "letterbox", "x")  # 10x20 -> 8x16, padded top and bottom by 4
    assert lb.shape == (2, 16, 16, 3) and lb[:, 4:12].min() == 200 and lb[:, :4].max() == 0
    assert fit_frames(x, (5, 7, 3), "resize", "x").shape == (2, 5, 7, 3)
    with pytest.raises(DatasetError, match="do not fit"):
        fit_frames(x, (8, 8, 3), "pad", "x")


def test_bad_files_rejected_and_nothing_written(tmp_path):
    good = tmp_path / "good.gif"
    iio.imwrite(good, _palette_frames(), duration=100)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video at all" * 10)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    big = tmp_path / "big.gif"
    iio.imwrite(big, _palette_frames(3, (48, 48, 3)), duration=100)
    cfg = _cfg()
    root = tmp_path / "ds"
    cases = [
        (junk, "junk.mp4: cannot read"),
        (empty_dir, "no .png frames"),
        (tmp_path / "missing.gif", "missing.gif: no such file"),
        (tmp_path / "notes.txt", "unsupported"),
    ]
    (tmp_path / "notes.txt").write_text("hi")
    for bad, msg in cases:
        with pytest.raises(DatasetError, match=msg):
            import_videos(cfg, root, [str(good), str(bad)], frame_shape="32,40,3", log=lambda *a: None)
        assert not root.exists(), f"{bad} left something behind"
    with pytest.raises(DatasetError, match="big.gif: frames of 48x48 do not fit"):
        import_videos(cfg, root, [str(good), str(big)], frame_shape="32,40,3", fit="pad", log=lambda *a: None)
    assert not root.exists()
    # Into an existing dataset: a failing import leaves its manifest and shards untouched.
    import_videos(cfg, root, [str(good)], frame_shape="32,40,3", log=lambda *a: None)
    before = (root / "manifest.json").read_text()
    with pytest.raises(DatasetError, match="junk.mp4"):
        import_videos(cfg, root, [str(big), str(junk)], log=lambda *a: None)
    assert (root / "manifest.json").read_text() == before
    assert sorted(p.name for p in (root / "shards").iterdir() if p.is_dir()) == ["video-s000000"]


@pytest.mark.slow
def test_cli_import_video_error_exit(tmp_path):
    import subprocess
    import sys

    junk = tmp_path / "junk.webm"
    junk.write_bytes(b"\x00" * 64)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "dreamer4.cli",
            "dataset",
            "import-video",
            "--config",
            str(REPO / "configs" / "tiny.yaml"),
            "--out",
            str(tmp_path / "ds"),
            str(junk),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert r.returncode == 2 and "error:" in r.stderr and "junk.webm" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "ds").exists()


@pytest.mark.slow
def test_tokenizer_trains_on_video_only_dataset(tmp_path):
    """A dataset of imported videos alone is enough for the tokenizer stage (no actions needed)."""
    from conftest import TOK_OVERRIDES

    from dreamer4.pipelines.dataset import dataset_stats
    from dreamer4.tokenizer.train import train_tokenizer

    cfg = make_test_config(["collect.eval_fraction=0.5"] + TOK_OVERRIDES + ["tokenizer.train.steps=4"])
    files = []
    for i in range(4):
        p = tmp_path / f"v{i}.gif"
        iio.imwrite(p, _palette_frames(12 + i, (63, 63, 3)), duration=50)
        files.append(str(p))
    root = tmp_path / "ds"
    import_videos(cfg, root, files, log=lambda *a: None)
    s = dataset_stats(str(root))
    assert s["episodes"] == 4 and s["policies"] == ["video"] and s["has_actions"] is False
    assert s["splits"]["eval"]["episodes"] == 2 and s["splits"]["train"]["labeled_episodes"] == 0
    results = train_tokenizer(cfg, root, tmp_path / "run")
    assert np.isfinite(results["eval_psnr"])


@pytest.mark.slow
def test_collect_adds_labeled_play_to_a_video_dataset(tmp_path):
    """Pretrain-on-video first, add labeled Craftax play later: collect adopts the imported header."""
    from dreamer4.data.collect import collect

    cfg = make_test_config()  # the session's collect config (compiled collector in the cache)
    clip = tmp_path / "v.gif"
    iio.imwrite(clip, _palette_frames(20, (63, 63, 3)), duration=50)
    root = tmp_path / "ds"
    import_videos(cfg, root, [str(clip)], log=lambda *a: None)
    collect(cfg, root, log=lambda *a: None)
    m = read_manifest(root)
    assert m["has_actions"] is False and m["collect_config"]["policy"] == "framehash:none"
    ds = Dataset.open(root, env_name=cfg.env.name)
    video = [e for e in ds.episodes if e.policy == "video"]
    played = [e for e in ds.episodes if e.policy != "video"]
    assert len(video) == 1 and not video[0].has_actions and len(played) == cfg.collect.num_episodes
    assert any(e.labeled for e in played) and all(e.has_actions for e in played)
    assert verify(root)[0] == []
    # Rerunning collect finds its writer complete and leaves the video shard alone.
    collect(cfg, root, log=lambda *a: None)
    assert read_manifest(root)["shards"] == m["shards"]
