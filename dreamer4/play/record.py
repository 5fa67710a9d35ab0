"""Recording play into a dataset (`dreamer4 play --record DIR`), committed per episode like `collect`.

Each recorded session of the real game becomes one labeled episode with policy `human` in the
ordinary dataset format (data/store.py), in a shard of its own, `human-sNNNNNN` (writer "human"):

1. `store.write_shard`: every array of the episode in one TensorStore transaction, then the
   shard's manifest entry and the dataset header in its group attributes (so `dataset
   rebuild-manifest` can restore it);
2. the manifest gains the shard under its file lock (atomic rename): this is the commit.

A crash therefore loses at most the episode in progress: a shard group written but not listed is
deleted when the next `dreamer4 play --record` opens the directory, exactly as a restarted
collect writer deletes its uncommitted groups. One play process records into a directory at a
time (an exclusive lock on DIR/play.lock), so shard indices never collide.

Rows follow the step convention (DESIGN.md): row 0 is the reset frame (action -1, reward 0,
is_first); row t holds the frame after action_t, the reward received on arriving there and the
achievements unlocked there; the final row is_last, is_terminal only when the game ended by death.
An episode cut by a reset or by stopping the server ends is_last, not terminal (as a time limit).
Episodes are labeled (every action is known) and go to the train split. `policy` is "human", or
"human+agent" when the run's agent chose some of the steps (their number is `agent_steps`);
`context_steps` counts the noop steps the tool played before the person could (the world model's
context), which are part of the episode.
"""

from __future__ import annotations

import fcntl
import shutil
from pathlib import Path

import numpy as np

from dreamer4.data import store
from dreamer4.data.env import EnvSpec
from dreamer4.data.store import DatasetError

WRITER = "human"
LOCK = "play.lock"


def check_target(root: str | Path, env_name: str, frame_shape, num_actions: int) -> None:
    """Refuse, before any model is loaded, a dataset of another env / frame shape / action count,
    or a directory whose shards lost their manifest."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise DatasetError(f"--record {root}: not a directory")
    store.refuse_orphaned_shards(root)
    m = store.read_manifest(root)
    if not m:
        return
    p = store.manifest_path(root)
    if m.get("format") != store.FORMAT:
        raise DatasetError(f"{p} is not a dreamer4 dataset manifest (format {m.get('format')!r})")
    env = m.get("env") or {}
    if env.get("name") != env_name:
        raise DatasetError(
            f"{p} holds {env.get('id', '?')} episodes (env.name={env.get('name')!r}), but the run plays "
            f"env.name={env_name!r}; record into a dataset of the run's env or a new directory"
        )
    if tuple(m.get("frame_shape", ())) != tuple(frame_shape) or m.get("num_actions") != num_actions:
        raise DatasetError(
            f"{p} has frame_shape={m.get('frame_shape')} and num_actions={m.get('num_actions')}, but the run "
            f"has {list(frame_shape)} and {num_actions}; record into a new directory"
        )


def new_header(spec: EnvSpec) -> dict:
    return {
        **store.env_header(spec),
        "seed": None,
        "behavior_policy": WRITER,
        "created_by": "play",
        "labeled_fraction": 1.0,
        "eval_fraction": 0.0,
        "has_actions": True,
        "has_rewards": True,
        "step_convention": "row t: frame_t; action_t led into frame_t (-1 at is_first); "
        "reward_t received on arriving at frame_t",
        "shards": [],
        "writers": {},
    }


class Recorder:
    """Appends finished episodes to dataset `root` (created when missing) as committed shards."""

    def __init__(self, root: str | Path, spec: EnvSpec, read_chunk: int, zstd_level: int, log=print):
        self.root = Path(root)
        self.spec, self.read_chunk, self.zstd_level, self.log = spec, read_chunk, zstd_level, log
        check_target(self.root, spec.name, spec.frame_shape, spec.num_actions)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.root / LOCK, "a+")
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise DatasetError(
                f"another `dreamer4 play` is recording into {self.root} ({self.root / LOCK} is locked); "
                f"stop it or record into another directory"
            ) from None
        # The header first, as collect and import-video do: a shard group left by a killed
        # recording is then recognisably uncommitted, never an orphan without a manifest.
        store.write_group_json(self.root, {"dreamer4": "dataset; see manifest.json"})
        with store.locked_manifest(self.root) as m:
            if not m:
                m.update(new_header(spec))
            mine = [s for s in m["shards"] if s["writer"] == WRITER]
            self.header = store.manifest_header(m)  # fixed once the dataset is made
        self.shards = len(mine)
        self.episodes = sum(len(s["episodes"]) for s in mine)
        sdir = self.root / "shards"
        committed = {s["name"] for s in mine}
        for g in sorted(sdir.glob(f"{WRITER}-s*")) if sdir.is_dir() else []:
            if g.name not in committed:  # written by a recording killed before its commit
                shutil.rmtree(g)
                log(f"removed {g}: an episode whose recording was interrupted before its commit")

    def commit(self, rows: dict[str, np.ndarray], agent_steps: int = 0, context_steps: int = 0) -> str:
        """Write one whole episode (rows of the store's fields) as a shard and commit it; its id."""
        T = len(rows["frame"])
        if not (rows["is_first"][0] and rows["is_last"][-1] and rows["is_first"].sum() == 1):
            raise ValueError("an episode must start with its only is_first row and end with is_last")
        name = f"{WRITER}-s{self.shards:06d}"
        ep_id = f"{WRITER}-e{self.episodes:06d}"
        achieved = np.flatnonzero(np.asarray(rows["achievements"]).any(0))
        episode = {
            "id": ep_id,
            "start": 0,
            "length": T,
            "return": float(np.asarray(rows["reward"])[1:].sum()),
            "achievements": [self.spec.achievement_names[i] for i in achieved],
            "labeled": True,
            "split": "train",
            "policy": WRITER if agent_steps == 0 else f"{WRITER}+agent",
            "agent_steps": int(agent_steps),
            "context_steps": int(context_steps),
        }
        entry = {"name": name, "writer": WRITER, "index": self.shards, "num_frames": T, "episodes": [episode]}
        digests = store.write_shard(
            self.root,
            name,
            rows,
            read_chunk=self.read_chunk,
            zstd_level=self.zstd_level,
            entry={**entry, "target_episodes": None, "final": False},
            header=self.header,
        )
        # The commit: one line appended to the manifest's log, as collect's commits are, so a
        # recording into a large collected dataset does not rewrite its whole manifest per episode.
        store.append_commit(
            self.root,
            [{**entry, "digests": digests}],
            {WRITER: {"committed_shards": self.shards + 1, "episodes": self.episodes + 1}},
        )
        self.shards += 1
        self.episodes += 1
        self.log(f"recorded {ep_id}: {T} steps, return {episode['return']:.1f} -> {self.root}")
        return ep_id

    def close(self) -> None:
        if not self._lock.closed:
            store.fold_manifest_log(self.root)  # a finished recording leaves one manifest.json
            # the lock file stays (as manifest.lock does): unlinking it could let two processes lock
            # two different files of the same name
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_UN)
            self._lock.close()
