from pathlib import Path

import pytest
import yaml

from dreamer4.config import Config, ConfigError, load_config, save_config

REPO = Path(__file__).parent.parent


@pytest.mark.parametrize("preset", ["tiny", "grounded", "classic", "full"])
def test_presets_load(preset):
    cfg = load_config(REPO / "configs" / f"{preset}.yaml")
    assert isinstance(cfg, Config)
    assert cfg.env.name == ("full" if preset == "full" else "classic")


def test_grounded_preset_builds_a_neighbourhood_dynamics_on_the_tile_grid():
    from dreamer4.runtime.loading import build_dynamics, build_tokenizer

    cfg = load_config(REPO / "configs" / "grounded.yaml")
    assert cfg.collect.policy == "walk" and cfg.collect.mix == ""  # a mix would override the policy
    tok = build_tokenizer(cfg, (63, 63, 3))
    assert tok.latent_grid == (9, 9)  # one latent per 7x7 tile
    dyn = build_dynamics(cfg, cfg, 17, seed=0, latent_grid=tok.latent_grid)
    time_blocks = [b for b in dyn.transformer.blocks if b.kind == "time"]
    assert time_blocks and all(len(b.neighbours[0]) == 9 for b in time_blocks)


def test_dotted_overrides_are_typed():
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        ["collect.num_envs=3", "collect.labeled_fraction=0.25", "loader.shuffle=false", "seed=9"],
    )
    assert cfg.collect.num_envs == 3 and cfg.collect.labeled_fraction == 0.25
    assert cfg.loader.shuffle is False and cfg.seed == 9
    # ints are accepted where floats are expected
    assert load_config(None, ["collect.labeled_fraction=1"]).collect.labeled_fraction == 1.0


def test_unknown_key_names_valid_choices():
    with pytest.raises(ConfigError, match=r"unknown config key 'collect.num_env'.*num_envs"):
        load_config(None, ["collect.num_env=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'colect.num_envs'.*collect"):
        load_config(None, ["colect.num_envs=3"])


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("collect:\n  num_envs: 2\n  bogus: 1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'collect.bogus'"):
        load_config(p)


def test_wrong_types_and_choices():
    with pytest.raises(ConfigError, match=r"'collect.num_envs'.*expected an integer"):
        load_config(None, ["collect.num_envs=abc"])
    with pytest.raises(ConfigError, match=r"'collect.num_envs'.*expected an integer"):
        load_config(None, ["collect.num_envs=2.5"])
    with pytest.raises(ConfigError, match=r"'env.name'.*'classic', 'full'"):
        load_config(None, ["env.name=minecraft"])
    with pytest.raises(ConfigError, match=r"'loader.shuffle'.*true or false"):
        load_config(None, ["loader.shuffle=3"])
    with pytest.raises(ConfigError, match=r"'collect.labeled_fraction' must be in \[0, 1\]"):
        load_config(None, ["collect.labeled_fraction=1.5"])
    with pytest.raises(ConfigError, match=r"'collect.commits_in_flight' must be >= 1"):
        load_config(None, ["collect.commits_in_flight=0"])
    with pytest.raises(ConfigError, match=r"'collect.host_copy' must be 'async' or 'pinned', got 'pinnned'"):
        load_config(None, ["collect.host_copy=pinnned"])
    with pytest.raises(ConfigError, match=r"'collect' is a section"):
        load_config(None, ["collect=3"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such/file.yaml")


@pytest.mark.parametrize(
    "override, message",
    [
        # no layer would attend across time; the model would still build and train
        ("dynamics.time_every=5", r"'dynamics.time_every' must be <= dynamics.depth \(4\)"),
        ("tokenizer.time_every=3", r"'tokenizer.time_every' must be <= tokenizer.depth \(2\)"),
        # RoPE's error came at the first trace, without the key
        ("tokenizer.width=12", r"'tokenizer.num_heads' gives heads of width 3"),
        # every sample a single image: the dynamics would never see a sequence
        ("dynamics.single_image_share=0.95", r"'dynamics.single_image_share' leaves no sequences .*batch_size=8"),
        # the policy would never learn
        ("agent.critic_warmup=500", r"'agent.critic_warmup' must be < agent.imagine.steps \(500\)"),
        # keys of the shared TrainConfig that the agent's phases do not read
        (
            "agent.imagine.seq_len=16",
            r"'agent.imagine.seq_len' is not used \(imagination starts from agent.context_len",
        ),
        ("agent.bc.precision=bf16", r"'agent.bc.precision' is not used \(the agent runs at dynamics.train.precision"),
    ],
)
def test_values_no_stage_would_run_as_meant_are_refused_naming_the_key(override, message):
    load_config(REPO / "configs" / "tiny.yaml")  # the preset itself is fine
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "configs" / "tiny.yaml", [override])


def test_a_space_rope_needs_heads_of_a_width_divisible_by_4():
    rope = ["dynamics.space_rope=true", "dynamics.num_heads=4"]  # grounded: latents on the patch grid
    load_config(REPO / "configs" / "grounded.yaml", rope + ["dynamics.width=64"])  # heads of 16
    with pytest.raises(ConfigError, match=r"'dynamics.space_rope' needs heads of a width divisible by 4 .*= 18\)"):
        load_config(REPO / "configs" / "grounded.yaml", rope + ["dynamics.width=72"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["collect.num_envs=5"])
    path = save_config(cfg, tmp_path)
    assert load_config(path) == cfg
    assert yaml.safe_load(path.read_text())["collect"]["num_envs"] == 5


def test_stage_configs_are_partitioned_into_parts():
    """Every key of a stage config is in exactly one part (network / sampling / training / evaluation)."""
    import dataclasses

    cfg = load_config(REPO / "configs" / "tiny.yaml")
    for name in ("tokenizer", "dynamics", "agent", "behavior"):
        stage = getattr(cfg, name)
        parts = [getattr(stage, p) for p in ("net", "sampling", "training", "evaluation") if hasattr(stage, p)]
        keys = [f.name for part in parts for f in dataclasses.fields(part)]
        assert sorted(keys) == sorted(f.name for f in dataclasses.fields(stage)), name
        assert len(keys) == len(set(keys)), name
    assert (
        cfg.dynamics.net.width == cfg.dynamics.width and cfg.dynamics.sampling.context_tau == cfg.dynamics.context_tau
    )


def test_presets_are_deltas_over_one_base(tmp_path):
    base = yaml.safe_load((REPO / "configs" / "base.yaml").read_text())
    assert "base" not in base
    for preset in ("tiny", "classic", "full"):
        assert yaml.safe_load((REPO / "configs" / f"{preset}.yaml").read_text())["base"] == "base.yaml"
    assert load_config(REPO / "configs" / "classic.yaml") == load_config(REPO / "configs" / "base.yaml")
    # a delta changes only what it names; nested sections merge key by key
    (tmp_path / "d.yaml").write_text(f"base: {REPO / 'configs' / 'tiny.yaml'}\ntokenizer:\n  train:\n    steps: 7\n")
    d, t = load_config(tmp_path / "d.yaml"), load_config(REPO / "configs" / "tiny.yaml")
    assert d.tokenizer.train.steps == 7 and d.tokenizer.train.lr == t.tokenizer.train.lr
    assert d.dynamics == t.dynamics
    # the saved, resolved config has no base and loads by itself
    saved = save_config(d, tmp_path / "out")
    assert "base" not in yaml.safe_load(saved.read_text()) and load_config(saved) == d
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "loop.yaml")
