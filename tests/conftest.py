"""Session fixtures: one compiled collector and one small collected dataset for the whole run.

Craftax compiles slowly on CPU (~40 s per scan shape), so every test that collects uses the same
config (TEST_OVERRIDES) and the persistent JAX compilation cache is shared with subprocesses.
"""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("WANDB_MODE", "disabled")

# XLA's CPU backend tuned for compile time: the suite's time is mostly XLA compiling small
# programs that then run a few steps.
# * LLVM optimisation level 1 rather than 2: the test tokenizer's stage in ~15% less CPU time and
#   PPO's rollouts about as fast; level 0 compiled faster still but ran PPO over 10x slower.
# * The classic (LLVM IR) emitters rather than the MLIR fusion emitters: every fusion otherwise
#   goes through an MLIR pipeline of its own, and a 1-process job of the multi-host test's four
#   stages took ~30% less CPU time (126 vs 179 s, BENCHMARKS.md "Test suite time").
# They change the machine code, not the HLO; float results may differ in the last bits.
# Subprocesses inherit them; DREAMER4_TEST_XLA_OPT=2 tests at XLA's default level instead, and
# DREAMER4_TEST_XLA_FUSION_EMITTERS=1 with XLA's default emitters.
TEST_XLA_FLAGS = (
    f"--xla_backend_optimization_level={os.environ.get('DREAMER4_TEST_XLA_OPT', '1')}"
    f" --xla_cpu_use_fusion_emitters={'true' if os.environ.get('DREAMER4_TEST_XLA_FUSION_EMITTERS') == '1' else 'false'}"
)
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test subprocess with `devices` fake CPU devices (and the suite's flags)."""
    return f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={devices}"


# One compilation cache for the session and its subprocesses.
_CACHE = Path(os.environ.get("DREAMER4_TEST_JAX_CACHE", Path(__file__).parent.parent / ".pytest_cache" / "jax"))
os.environ["DREAMER4_JAX_CACHE"] = str(_CACHE)

from dreamer4.runtime.jax_setup import enable_compilation_cache  # noqa: E402

enable_compilation_cache(str(_CACHE))

import framehash_policy  # noqa: E402,F401  (registers the "framehash:" policy)

REPO = Path(__file__).parent.parent


def bench_module(name: str):
    """benchmarks/<name>.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# Parallel runs (`pytest -n 2`, pytest-xdist, as the README and .ci/run do): tests are handed to
# the workers by group, one group per module, so a module's fixtures are built once, except the
# modules that share the session's trained models (dataset -> tokenizer -> world model -> agent),
# which form one group on one worker so that chain is trained once. Groups are queued longest
# first (FIRST, by their time in a clean-clone run; BENCHMARKS.md "Test suite time"), so the two
# workers start on the two longest and the short modules fill in at the end; xdist would
# otherwise sort groups by their number of tests (its --loadscope-reorder, on by default), which
# left the 4-minute real-Slurm test, one test, for last. PPO goes first on the second worker
# because it needs no dataset: by the time that worker reaches a module that collects one, the
# first worker's collection has put its compiled program in the shared compilation cache.
# (A scheduler rather than xdist_group marks: with pytest 9, xdist 3.8's marks no longer reach
# the node ids it schedules by, and every test was scheduled on its own.)
WORLD_MODULES = ("test_agent", "test_play", "test_dynamics", "test_latent_cache", "test_preempt", "test_tokenizer")
FIRST = (
    "world",
    "test_behavior",
    "test_multihost",
    "test_slurm",
    "test_faults",
    "test_nn",
    "test_policy",
    "test_data_collect",
    "test_gpu_suite",
    "test_sampler_fused",
    "test_video_import",
)  # then every other module (each under ~20 s) in file order


def group_of(nodeid: str) -> str:
    """The group a test runs in under xdist: "world" or its module's name."""
    module = Path(nodeid.split("::", 1)[0]).stem
    return "world" if module in WORLD_MODULES else module


def pytest_collection_modifyitems(config, items):
    rank = {g: i for i, g in enumerate(FIRST)}
    items.sort(key=lambda it: rank.get(group_of(it.nodeid), len(FIRST)))  # stable: file order otherwise


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    config.option.loadscopereorder = False  # hand groups out in collection order (FIRST)
    return ByGroup(config, log)


TEST_OVERRIDES = [
    "seed=7",
    "collect.policy=framehash:none",
    'collect.mix=""',  # the presets' behaviour mix would otherwise decide every env's policy
    "collect.num_envs=4",
    "collect.num_episodes=8",
    "collect.chunk_steps=32",
    "collect.shard_frames=200",
    "collect.labeled_fraction=0.5",
    "collect.eval_fraction=0.25",
    "loader.batch_size=4",
    "loader.seq_len=8",
    "loader.window_stride=4",
]


def make_test_config(extra=()):
    from dreamer4.config import load_config

    return load_config(REPO / "configs" / "tiny.yaml", TEST_OVERRIDES + list(extra))


@pytest.fixture(scope="session")
def cfg():
    return make_test_config()


@pytest.fixture(scope="session")
def dataset(tmp_path_factory, cfg):
    """(path, raw rows) of one dataset collected in-process; raw rows are what the device produced."""
    from dreamer4.data.collect import collect

    root = tmp_path_factory.mktemp("data") / "ds"
    raw = []
    collect(cfg, root, row_sink=raw.append, log=lambda *a: None)
    return root, raw


def cli_subprocess(args, **kw):
    """Start `dreamer4 ARGS` (with the framehash policy registered) as a real subprocess."""
    import subprocess

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "framehash_policy.py"), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


TOK_OVERRIDES = [
    "tokenizer.patch_size=8",
    "tokenizer.width=32",
    "tokenizer.depth=2",
    "tokenizer.num_heads=2",
    "tokenizer.num_kv_heads=1",
    "tokenizer.time_every=2",
    "tokenizer.num_latents=4",
    "tokenizer.latent_dim=8",
    "tokenizer.eval_episodes=2",
    "tokenizer.eval_frames=4",
    "tokenizer.train.batch_size=4",
    "tokenizer.train.seq_len=4",
    "tokenizer.train.lr=3e-3",
    "tokenizer.train.warmup_steps=2",
    "tokenizer.train.log_every=2",
    "tokenizer.train.ckpt_every=4",
    "tokenizer.train.eval_every=0",
    "runtime.wandb=disabled",
]


@pytest.fixture(scope="session")
def trained_tokenizer(dataset, tmp_path_factory):
    """(run_dir, eval results) of a tiny tokenizer trained for 24 steps on the session dataset."""
    from dreamer4.tokenizer.train import train_tokenizer

    root, _ = dataset
    run = tmp_path_factory.mktemp("tok") / "run"
    results = train_tokenizer(make_test_config(TOK_OVERRIDES + ["tokenizer.train.steps=24"]), root, run)
    return run, results


@pytest.fixture(scope="session")
def world_run(dataset, trained_tokenizer, tmp_path_factory):
    """A run dir with the session tokenizer and a dynamics model trained for 8 steps (agent sizes
    of tests/test_agent.py)."""
    import shutil

    from test_agent import agent_config

    from dreamer4.dynamics.train import train_dynamics

    run = tmp_path_factory.mktemp("agent") / "run"
    shutil.copytree(trained_tokenizer[0] / "tokenizer", run / "tokenizer")
    train_dynamics(
        agent_config(["dynamics.train.steps=8", "dynamics.train.ckpt_every=8"]), dataset[0], run, evaluate=False
    )
    return run


@pytest.fixture(scope="session")
def trained_agent(world_run, dataset):
    """world_run with both agent phases trained (tests/test_agent.py; tests/test_play.py plays it).
    Session-scoped so that both share one training; test_agent continues its imagination phase."""
    from test_agent import agent_config

    from dreamer4.policy.train import train_agent

    train_agent(agent_config(), dataset[0], world_run, phase="all")
    return world_run
