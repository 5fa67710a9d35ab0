"""Typed, frozen configuration: a YAML preset plus dotted command-line overrides.

    cfg = load_config("configs/tiny.yaml", ["collect.num_envs=8", "seed=3"])

A preset is a delta over another (`base: base.yaml`, resolved by `read_preset`). Every key is
checked against the dataclasses below: an unknown key or a value of the wrong type is one
`ConfigError` naming the key and what was expected. Each stage's config is made of parts: the
network (`.net`, all a model receives and all a resume compares), sampling, training and
evaluation. `save_config` writes the resolved config into an output directory so that every
artefact says how it was made.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A user-caused configuration problem; the message names the key and what was expected."""


@dataclass(frozen=True)
class EnvConfig:
    # "classic" = Craftax-Classic (Crafter rules, 63x63 frames), "full" = Craftax (130x110 frames).
    name: Literal["classic", "full"] = "classic"


@dataclass(frozen=True)
class CollectConfig:
    # Behaviour policy spec: "random", "sticky", "walk" (a move half the time), or "NAME:CHECKPOINT" for a
    # registered learned policy.
    policy: str = "random"
    # Probability that the sticky policy repeats its previous action.
    sticky_repeat_prob: float = 0.8
    num_envs: int = 16
    # Episodes in the whole dataset (split across writers).
    num_episodes: int = 48
    # Environment steps per jitted lax.scan call; results do not depend on it.
    chunk_steps: int = 64
    # A shard is committed once its episodes hold at least this many frames (whole episodes only).
    shard_frames: int = 1024
    # Frames per zarr read chunk inside a shard (the unit the loader decodes).
    read_chunk_frames: int = 4
    zstd_level: int = 3
    # Commits (shard write + resume state + manifest entry) that may run at once, each on its own
    # thread; they still enter the manifest in order. 1: the next commit waits for the last. Two
    # collected 6% faster than one on a 2-core CPU, where one commit left half a core idle
    # (BENCHMARKS.md, "Session 37"); each costs one more shard of host memory.
    commits_in_flight: int = 2
    # How a chunk's rows reach the host. "async": `copy_to_host_async` as the chunk is dispatched,
    # into pageable memory (a GPU copies that way at ~1.7 GB/s: the third lease's H200, slower than
    # the device steps). "pinned": `device_put` into the device's pinned host memory, which a GPU's
    # copy engine writes directly (not yet timed on a GPU). On a CPU "async" copies nothing.
    host_copy: str = "async"
    # Share of train episodes whose actions training code may see; the rest is unlabeled video.
    labeled_fraction: float = 0.1
    # Share of episodes held out for evaluation (their actions are kept for evaluation only).
    eval_fraction: float = 0.1
    # Probability that any behaviour policy's action is replaced by a uniformly random one.
    epsilon: float = 0.0
    # Mixture of behaviour policies, "SPEC=WEIGHT,SPEC=WEIGHT" (e.g. "ppo:runs/a=0.5,random=0.5");
    # each env is assigned one for the whole collection, deterministically from the seed.
    # Empty: every env uses `policy`.
    mix: str = ""


@dataclass(frozen=True)
class LoaderConfig:
    batch_size: int = 8
    seq_len: int = 16
    # Distance between window starts inside an episode (seq_len = no overlap).
    window_stride: int = 8
    # Windows of labeled train episodes are listed this many times per epoch (1 = their natural
    # share): with 10% labeled episodes, 9 makes about half of all windows carry actions.
    labeled_repeat: int = 1
    shuffle: bool = True
    # grain worker processes; 0 reads in the main process.
    worker_count: int = 0
    # The same for a latent cache's reads (the dynamics' default input): a batch of latents is one
    # TensorStore read of a few ms, and handing it over from a worker process cost more than that
    # (BENCHMARKS.md, "Session 36"), so by default they are read in the main process.
    latent_worker_count: int = 0
    # Threads reading in the main process (where the worker count is 0); the batches stay in order.
    read_threads: int = 2
    # Batches prefetched per worker (grain's worker_buffer_size).
    worker_buffer_size: int = 2


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation loop shared by every training stage (runtime/train_loop.py)."""

    steps: int = 2000
    batch_size: int = 8  # global batch (split over processes and devices)
    seq_len: int = 8
    lr: float = 3e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    log_every: int = 25
    eval_every: int = 500  # 0 = only at the end
    ckpt_every: int = 250
    keep_checkpoints: int = 3
    # "bf16" = bf16 compute with fp32 parameters and optimizer state.
    precision: Literal["fp32", "bf16"] = "fp32"
    # dtype of the transformer's residual stream between layers: "fp32", or "compute" (= the
    # precision above: with bf16, half the bytes of every residual add, norm and their gradients
    # move through memory; BENCHMARKS.md, "GPU suite", says what it was measured to do)
    residual: Literal["fp32", "compute"] = "fp32"


def _part(cfg: Any, cls: type) -> Any:
    """The fields of `cls` (one part of a stage config) read off the stage config `cfg`."""
    return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


# Each stage's config is the union of its parts: the network (the only part a model receives and the
# only part compared when a stage resumes), sampling, training and evaluation. YAML keys stay flat
# under the stage (`tokenizer.width`, `tokenizer.train.steps`, `tokenizer.eval_frames`); the parts
# are views (`cfg.tokenizer.net`, `.training`, `.evaluation`).


@dataclass(frozen=True)
class TokenizerNet:
    """Causal tokenizer network (Dreamer 4 sec. 3.1): patches + latent tokens, tanh bottleneck."""

    patch_size: int = 8
    width: int = 128
    depth: int = 4  # layers in the encoder and again in the decoder
    num_heads: int = 4
    num_kv_heads: int = 2
    mlp_ratio: float = 4.0
    time_every: int = 4  # a time-attention layer every this many layers
    # Context length (the paper's): time attention sees the last time_window frames; 0 = all.
    # <= train.seq_len leaves training as it is and keeps longer inference (the latent cache's
    # windows, the agent's episodes) inside what the model was trained on; KV caches become rings.
    time_window: int = 0
    num_latents: int = 16  # latent tokens per frame
    latent_dim: int = 16  # bottleneck width per latent token
    # "learned": L learned latent tokens read the patches (the paper's design; latents are not
    # spatial). "patch": one latent per patch, read off the patch token itself (L = P), so a
    # view shift in pixels is a shift of latents across token positions (BENCHMARKS.md, issue 12).
    latent_layout: str = "learned"
    logit_cap: float = 50.0  # attention logit soft-cap; 0 = off (then GPU attention may run cuDNN's fused kernel)


@dataclass(frozen=True)
class TokenizerTraining:
    mask_prob_max: float = 0.9  # per-image patch drop probability p ~ U(0, mask_prob_max) (MAE)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass(frozen=True)
class TokenizerEvaluation:
    # Held-out evaluation: episodes of the eval split and frames per episode.
    eval_episodes: int = 4
    eval_frames: int = 16


@dataclass(frozen=True)
class TokenizerConfig(TokenizerEvaluation, TokenizerTraining, TokenizerNet):
    """Causal tokenizer (Dreamer 4 sec. 3.1): network, MAE training, held-out evaluation."""

    @property
    def net(self) -> TokenizerNet:
        return _part(self, TokenizerNet)

    @property
    def training(self) -> TokenizerTraining:
        return _part(self, TokenizerTraining)

    @property
    def evaluation(self) -> TokenizerEvaluation:
        return _part(self, TokenizerEvaluation)


@dataclass(frozen=True)
class DynamicsNet:
    """Block-causal axial transformer (Dreamer 4 sec. 3.2)."""

    width: int = 128
    depth: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    mlp_ratio: float = 4.0
    time_every: int = 4  # a time-attention layer every this many layers
    # Context length, as the tokenizer's: the paper trains on batches longer than the context
    # ("to prevent ... always seeing a start frame": its "Sequence length" paragraph); 0 = all past frames.
    time_window: int = 0
    logit_cap: float = 50.0  # attention logit soft-cap; 0 = off (then GPU attention may run cuDNN's fused kernel)
    # Tokenizer latents (L per frame) are grouped into S_z spatial tokens (L % S_z == 0).
    spatial_tokens: int = 8
    # 2-D RoPE in space attention over the spatial tokens' (row, column) on the tokenizer's patch
    # grid: needs tokenizer.latent_layout=patch. A view shift is then one relative offset.
    space_rope: bool = False
    # Its base: frequencies base^(-4j/H) per axis. 10000 leaves one useful frequency for a 9x9 grid
    # (1, 0.1, 0.01, ... rad per tile at head width 16); 10 gives 1, 0.56, 0.32, 0.18.
    space_rope_base: float = 10000.0
    # Also add the labeled action's embedding to every spatial token (as Genie adds its actions to
    # the video tokens), so each position reads the action in its first layer, not only through
    # the action token's attention. Unlabeled steps add nothing.
    action_broadcast: bool = False
    # Time layers attend over the (2r+1) x (2r+1) neighbourhood of each spatial token's grid cell
    # in past and present steps (r = this radius; 0 = own position only, the paper's axial time
    # attention), with a learned per-neighbour logit bias read from the query token. Needs
    # tokenizer.latent_layout=patch. A one-tile view shift is then one attention hop.
    time_neighbourhood: int = 0
    register_tokens: int = 4
    k_max: int = 64  # finest step size d_min = 1 / k_max (a power of two); sizes the tau/d embeddings


@dataclass(frozen=True)
class DynamicsSampling:
    sample_steps: int = 4  # K sampling steps per generated frame
    # Signal level of past frames during generation (tau = 1 clean). The paper "slightly corrupts"
    # the context "to tau_ctx = 0.1"; read as a signal level that would be 90% noise, so we take it
    # as 10% noise: tau = 0.9 (on the k_max grid it rounds to the nearest level the model learned).
    context_tau: float = 0.9


@dataclass(frozen=True)
class DynamicsTraining:
    """Shortcut forcing (sec. 3.2) on sequences and single images."""

    single_image_share: float = 0.3  # share of each batch trained as single images (start frames)
    short_seq_len: int = 0  # > 0: alternate batches of this length with train.seq_len
    # Training distribution of (tau, d) per step, see dynamics/shortcut.py::sample_tau_d. 0 / true
    # is the paper's recipe; the tiny preset departs from it (BENCHMARKS.md, "Action grounding").
    flow_share: float = 0.0  # > 0: share of entries with d = d_min (flow targets), else d uniform
    context_prob: float = 0.0  # share of entries drawn as near-clean history (tau >= context_tau)
    ramp_weight: bool = True  # w(tau) = 0.9 tau + 0.1 on every entry's loss
    # Encode every training window once with the frozen tokenizer (RUN_DIR/latents, data/latents.py)
    # and train on those latents, instead of encoding each batch's frames in every step. Same
    # latents; the step no longer runs the encoder (a quarter of the classic step's FLOPs).
    latent_cache: bool = True
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass(frozen=True)
class DynamicsEvaluation:
    # Open-loop evaluation: C context frames, H generated frames, E held-out episodes.
    eval_context: int = 4
    eval_horizon: int = 8
    eval_episodes: int = 4
    # `dream`: open-loop windows (CIs over windows), and held-out transitions of the paired
    # action-grounding probe (dynamics/grounding.py).
    eval_windows: int = 32
    eval_transitions: int = 512


@dataclass(frozen=True)
class DynamicsConfig(DynamicsEvaluation, DynamicsTraining, DynamicsSampling, DynamicsNet):
    """Dynamics: network, sampling (generation), shortcut-forcing training, open-loop evaluation."""

    @property
    def net(self) -> DynamicsNet:
        return _part(self, DynamicsNet)

    @property
    def sampling(self) -> DynamicsSampling:
        return _part(self, DynamicsSampling)

    @property
    def training(self) -> DynamicsTraining:
        return _part(self, DynamicsTraining)

    @property
    def evaluation(self) -> DynamicsEvaluation:
        return _part(self, DynamicsEvaluation)


@dataclass(frozen=True)
class BehaviorNet:
    """The PPO actor-critic: a CNN over stacked frames."""

    frame_stack: int = 2  # the policy sees the last K frames, stacked on channels
    conv_channels: tuple[int, ...] = (16, 32)  # 8x8/4, then 4x4/2, then 3x3/1 convolutions
    hidden: int = 512


@dataclass(frozen=True)
class BehaviorTraining:
    """PPO as in the Craftax baselines (Matthews et al. 2024, Craftax_Baselines ppo.py)."""

    total_steps: int = 1_000_000  # environment steps over the whole run
    num_envs: int = 64
    num_steps: int = 64  # rollout length per env and update
    update_epochs: int = 4
    num_minibatches: int = 8
    lr: float = 2.0e-4
    anneal_lr: bool = True  # linear decay to 0 over the run
    gamma: float = 0.99
    gae_lambda: float = 0.8
    clip_eps: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 1.0
    log_every: int = 1  # updates
    ckpt_every: int = 50  # updates
    keep_checkpoints: int = 5  # several stages of training make a skill spread for `collect --mix`


@dataclass(frozen=True)
class BehaviorEvaluation:
    # Final evaluation: trained policy vs uniform random from the same env seeds, fixed horizon.
    eval_envs: int = 16
    eval_steps: int = 256


@dataclass(frozen=True)
class BehaviorConfig(BehaviorEvaluation, BehaviorTraining, BehaviorNet):
    """PPO behaviour policy trained online in Craftax (`dreamer4 train-behavior`).

    Defaults follow the Craftax baselines' PPO (Matthews et al. 2024, Craftax_Baselines ppo.py).
    """

    @property
    def net(self) -> BehaviorNet:
        return _part(self, BehaviorNet)

    @property
    def training(self) -> BehaviorTraining:
        return _part(self, BehaviorTraining)

    @property
    def evaluation(self) -> BehaviorEvaluation:
        return _part(self, BehaviorEvaluation)

    @property
    def num_updates(self) -> int:
        return self.total_steps // (self.num_envs * self.num_steps)


@dataclass(frozen=True)
class AgentNet:
    """Agent tokens + policy/reward/value heads in the world model (Dreamer 4 sec. 3.3)."""

    num_tasks: int = 1  # task 0 = maximise the game's reward
    mtp: int = 8  # multi-token prediction length L of the policy and reward heads
    head_hidden: int = 256  # MLP width of each head
    num_bins: int = 255  # two-hot bins (uniform in symlog space on [-20, 20])


@dataclass(frozen=True)
class AgentTraining:
    # Phase bc: behaviour cloning + reward model (MTP) while the video loss continues.
    bc_weight: float = 1.0
    reward_weight: float = 1.0
    video_weight: float = 1.0
    # Divide the video, BC and reward terms each by a running RMS estimate (paper sec. 3), so the
    # video loss (raw ~0.01) keeps its weight next to the BC and reward losses (raw ~2-3 nats).
    loss_norm: bool = True
    # Which transformer pass the policy and agent-token reward heads read in phase bc: "context" =
    # frames at dynamics.context_tau, the level the agent acts at (imagination, real game); "train"
    # = the shortcut-forcing pass at random noise levels (the paper's reading, one pass cheaper).
    head_signal: Literal["context", "train"] = "context"
    cont_weight: float = 1.0  # weight of the continuation (not-terminal) loss of the state heads
    bc: TrainConfig = field(default_factory=TrainConfig)
    # Phase imagine: RL in the world model, transformer frozen.
    context_len: int = 4  # dataset steps that start each imagined rollout (one rollout per context)
    horizon: int = 16  # imagined steps per rollout
    gamma: float = 0.997
    lam: float = 0.95
    pmpo_alpha: float = 0.5
    pmpo_beta: float = 0.3
    # Imagined rewards from "state": the state heads r(z_{t-1}, z_t), which never read an action
    # token (a policy cannot earn reward by choosing an action the reward model likes, only by
    # changing the world); "token": the paper's agent-token reward head (distance 0), which also
    # reads the same-step action; "none": every reward 0, a control run that shows what imagination
    # training does to the policy without any reward signal.
    reward_source: Literal["state", "token", "none"] = "state"
    continuation: bool = True  # imagined episodes end where the state heads predict death
    # Imagination steps at the start that train only the value head, so that the advantage sign
    # PMPO uses carries information once the policy starts to move (critic lag, BENCHMARKS.md).
    critic_warmup: int = 0
    # PMPO uses only the advantage's sign: subtract the batch mean of (R - v) so a value that still
    # lags its returns (every advantage > 0) does not turn PMPO into "raise whatever was sampled".
    center_advantages: bool = True
    imagine: TrainConfig = field(default_factory=TrainConfig)


@dataclass(frozen=True)
class AgentEvaluation:
    # Evaluation in the real environment.
    eval_episodes: int = 32  # per policy
    eval_envs: int = 16  # episodes run in parallel
    eval_max_steps: int = 1000  # episodes are cut at this many steps (the KV cache holds them all)
    eval_imagine: int = 4  # rollouts for imagined-vs-real returns and videos


@dataclass(frozen=True)
class AgentConfig(AgentEvaluation, AgentTraining, AgentNet):
    """Agent: heads (network), BC + imagination training, evaluation in the real game."""

    @property
    def net(self) -> AgentNet:
        return _part(self, AgentNet)

    @property
    def training(self) -> AgentTraining:
        return _part(self, AgentTraining)

    @property
    def evaluation(self) -> AgentEvaluation:
        return _part(self, AgentEvaluation)


@dataclass(frozen=True)
class RuntimeConfig:
    # Devices on the "fsdp" mesh axis (parameters sharded over it); 0 = all devices.
    fsdp: int = 0
    wandb: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "dreamer4"


@dataclass(frozen=True)
class Config:
    seed: int = 0
    env: EnvConfig = field(default_factory=EnvConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    dynamics: DynamicsConfig = field(default_factory=DynamicsConfig)
    behavior: BehaviorConfig = field(default_factory=BehaviorConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


# ---------------------------------------------------------------------------------------------
# Building a Config from nested dicts, with checked types.


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check (and for strings from the command line, parse) `value` against type `tp`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key '{key}': got {value!r}, expected one of {list(choices)}")
        return value
    if origin in (types.UnionType, typing.Union):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}': got {value!r}, expected {tp}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': got {value!r}, expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': got {value!r}, expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': got {value!r}, expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}': got {value!r}, expected a string")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': got {value!r}, expected a list")
        (elem,) = typing.get_args(tp)[:1]
        return tuple(_coerce(f"{key}[{i}]", v, elem) for i, v in enumerate(value))
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {data!r}")
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}'; valid keys here: {', '.join(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, data[f.name], f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _coerce(prefix + f.name, data[f.name], tp)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cls: Any = Config
    node = data
    for i, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(cls)}
        if part not in names:
            where = ".".join(parts[:i]) or "<root>"
            raise ConfigError(f"unknown config key '{dotted}'; valid keys under {where}: {', '.join(names)}")
        tp = typing.get_type_hints(cls)[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                raise ConfigError(
                    f"config key '{dotted}' is a section; set one of its keys: "
                    + ", ".join(f.name for f in dataclasses.fields(tp))
                )
            node[part] = value
        else:
            if not dataclasses.is_dataclass(tp):
                raise ConfigError(f"config key '{'.'.join(parts[: i + 1])}' is not a section")
            node = node.setdefault(part, {})
            cls = tp


def parse_override(text: str) -> tuple[str, Any]:
    """`key.sub=value` -> (key, value), the value parsed as YAML (so 3, 0.5, true, [1,2] work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _merge(base: dict, delta: dict) -> dict:
    """`base` with `delta` laid over it: mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for k, v in delta.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_preset(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """A preset file as a nested dict, its `base:` chain resolved.

    A preset may start with `base: OTHER.yaml` (relative to its own directory): it is then that
    preset with this file's keys laid over it (a named delta, as in dreamerv3's configs.yaml).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist (presets live in configs/)")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"config file {p}: 'base' must name another preset file, got {base!r}")
    bp = (p.parent / base).resolve()
    if bp in _seen or bp == p.resolve():
        raise ConfigError(f"config file {p}: 'base: {base}' makes a cycle of presets")
    return _merge(read_preset(bp, _seen + (p.resolve(),)), data)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    data: dict = read_preset(path) if path is not None else {}
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
    return from_dict(data)


def validate(cfg: Config) -> None:
    """Cross-field checks a type cannot express."""
    for ok, key, what in range_checks(cfg):  # first: the checks below divide by some of these
        if not ok:
            raise ConfigError(f"config key '{key}' {what}")
    c = cfg.collect
    checks = [
        (c.num_envs >= 1, "collect.num_envs", "must be >= 1"),
        (c.num_episodes >= 1, "collect.num_episodes", "must be >= 1"),
        (c.chunk_steps >= 1, "collect.chunk_steps", "must be >= 1"),
        (c.shard_frames >= 1, "collect.shard_frames", "must be >= 1"),
        (c.read_chunk_frames >= 1, "collect.read_chunk_frames", "must be >= 1"),
        (0.0 <= c.labeled_fraction <= 1.0, "collect.labeled_fraction", "must be in [0, 1]"),
        (0.0 <= c.eval_fraction < 1.0, "collect.eval_fraction", "must be in [0, 1)"),
        (0.0 <= c.sticky_repeat_prob < 1.0, "collect.sticky_repeat_prob", "must be in [0, 1)"),
        (1 <= c.zstd_level <= 22, "collect.zstd_level", "must be in [1, 22]"),
        (c.commits_in_flight >= 1, "collect.commits_in_flight", "must be >= 1"),
        (c.host_copy in ("async", "pinned"), "collect.host_copy", f"must be 'async' or 'pinned', got {c.host_copy!r}"),
        (cfg.loader.batch_size >= 1, "loader.batch_size", "must be >= 1"),
        (cfg.loader.seq_len >= 1, "loader.seq_len", "must be >= 1"),
        (cfg.loader.window_stride >= 1, "loader.window_stride", "must be >= 1"),
        (cfg.loader.labeled_repeat >= 1, "loader.labeled_repeat", "must be >= 1"),
        (cfg.loader.worker_count >= 0, "loader.worker_count", "must be >= 0"),
        (cfg.loader.latent_worker_count >= 0, "loader.latent_worker_count", "must be >= 0"),
        (cfg.loader.read_threads >= 1, "loader.read_threads", "must be >= 1"),
        (
            cfg.tokenizer.width % cfg.tokenizer.num_heads == 0,
            "tokenizer.width",
            "must be divisible by tokenizer.num_heads",
        ),
        (
            cfg.tokenizer.num_heads % cfg.tokenizer.num_kv_heads == 0,
            "tokenizer.num_heads",
            "must be divisible by tokenizer.num_kv_heads",
        ),
        (0.0 <= cfg.tokenizer.mask_prob_max < 1.0, "tokenizer.mask_prob_max", "must be in [0, 1)"),
        (cfg.tokenizer.train.steps >= 1, "tokenizer.train.steps", "must be >= 1"),
        (cfg.tokenizer.train.ckpt_every >= 1, "tokenizer.train.ckpt_every", "must be >= 1"),
        (
            cfg.dynamics.k_max >= 1 and cfg.dynamics.k_max & (cfg.dynamics.k_max - 1) == 0,
            "dynamics.k_max",
            "must be a power of two",
        ),
        (
            1 <= cfg.dynamics.sample_steps <= cfg.dynamics.k_max
            and cfg.dynamics.sample_steps & (cfg.dynamics.sample_steps - 1) == 0,
            "dynamics.sample_steps",
            "must be a power of two <= dynamics.k_max",
        ),
        (0.0 <= cfg.dynamics.single_image_share < 1.0, "dynamics.single_image_share", "must be in [0, 1)"),
        (
            0.0 <= cfg.dynamics.context_tau <= 1.0,
            "dynamics.context_tau",
            "must be a signal level in [0, 1] (1 = clean)",
        ),
        (cfg.dynamics.width % cfg.dynamics.num_heads == 0, "dynamics.width", "must be divisible by dynamics.num_heads"),
        (
            cfg.dynamics.num_heads % cfg.dynamics.num_kv_heads == 0,
            "dynamics.num_heads",
            "must be divisible by dynamics.num_kv_heads",
        ),
        (cfg.agent.num_tasks >= 1, "agent.num_tasks", "must be >= 1"),
        (cfg.agent.mtp >= 1, "agent.mtp", "must be >= 1"),
        (cfg.agent.num_bins >= 3, "agent.num_bins", "must be >= 3"),
        (cfg.agent.context_len >= 1, "agent.context_len", "must be >= 1"),
        (cfg.agent.horizon >= 1, "agent.horizon", "must be >= 1"),
        (0.0 < cfg.agent.gamma <= 1.0, "agent.gamma", "must be in (0, 1]"),
        (0.0 <= cfg.agent.lam <= 1.0, "agent.lam", "must be in [0, 1]"),
        (0.0 <= cfg.agent.pmpo_alpha <= 1.0, "agent.pmpo_alpha", "must be in [0, 1]"),
        (cfg.agent.pmpo_beta >= 0.0, "agent.pmpo_beta", "must be >= 0"),
        (cfg.agent.eval_envs >= 1, "agent.eval_envs", "must be >= 1"),
        (cfg.agent.eval_max_steps >= 2, "agent.eval_max_steps", "must be >= 2"),
    ]
    for prefix, net in (("tokenizer", cfg.tokenizer), ("dynamics", cfg.dynamics)):
        head = net.width // net.num_heads
        checks += [
            (
                net.time_every <= net.depth,
                f"{prefix}.time_every",
                f"must be <= {prefix}.depth ({net.depth}): with {net.time_every} no layer attends across time",
            ),
            (
                head % 2 == 0,
                f"{prefix}.num_heads",
                f"gives heads of width {head} ({prefix}.width / num_heads): rotary embeddings need an even width",
            ),
        ]
    dy, ag = cfg.dynamics, cfg.agent
    n_img = int(round(dy.train.batch_size * dy.single_image_share))
    checks += [
        (
            not dy.space_rope or (dy.width // dy.num_heads) % 4 == 0,
            "dynamics.space_rope",
            f"needs heads of a width divisible by 4 (dynamics.width / num_heads = {dy.width // dy.num_heads})",
        ),
        (
            dy.train.seq_len == 1 or n_img < dy.train.batch_size,
            "dynamics.single_image_share",
            f"leaves no sequences in a batch of dynamics.train.batch_size={dy.train.batch_size} "
            f"({n_img} single images)",
        ),
        (
            ag.critic_warmup < ag.imagine.steps,
            "agent.critic_warmup",
            f"must be < agent.imagine.steps ({ag.imagine.steps}): the policy learns only after the warm-up",
        ),
    ]
    # TrainConfig keys the agent's phases do not read: refused rather than silently ignored.
    unused = {
        "precision": "the agent runs at dynamics.train.precision",
        "residual": "the agent runs with dynamics.train.residual",
        "seq_len": "imagination starts from agent.context_len real frames",
    }
    default = TrainConfig()
    for section, t, keys in (("agent.bc", ag.bc, ("precision", "residual")), ("agent.imagine", ag.imagine, unused)):
        checks += [
            (getattr(t, k) == getattr(default, k), f"{section}.{k}", f"is not used ({unused[k]}); leave it out")
            for k in keys
        ]
    b = cfg.behavior
    checks += [
        (0.0 <= c.epsilon <= 1.0, "collect.epsilon", "must be in [0, 1]"),
        (b.num_envs >= 1 and b.num_steps >= 1, "behavior.num_envs", "and behavior.num_steps must be >= 1"),
        (
            b.num_minibatches >= 1 and (b.num_envs * b.num_steps) % b.num_minibatches == 0,
            "behavior.num_minibatches",
            "must divide behavior.num_envs * behavior.num_steps",
        ),
        (
            b.total_steps >= b.num_envs * b.num_steps,
            "behavior.total_steps",
            "must be at least one update (behavior.num_envs * behavior.num_steps)",
        ),
        (b.frame_stack >= 1, "behavior.frame_stack", "must be >= 1"),
        (1 <= len(b.conv_channels) <= 3, "behavior.conv_channels", "must list 1 to 3 channel counts"),
        (b.ckpt_every >= 1 and b.log_every >= 1, "behavior.ckpt_every", "and behavior.log_every must be >= 1"),
    ]
    for ok, key, what in checks:
        if not ok:
            raise ConfigError(f"config key '{key}' {what}")


# ---------------------------------------------------------------------------------------------
# Valid ranges: values of the right type that no stage can run with (issue 14). One table;
# every entry names the key the user sets. Device-count divisibility is checked where the mesh is
# known (runtime/train_loop.py), sequence lengths vs episode lengths where the dataset is opened
# (data/loader.py); both errors name the stage's key.


def _pos(x) -> bool:
    return x >= 1


def _train_ranges(prefix: str, t: TrainConfig) -> list[tuple[bool, str, str]]:
    return [
        (_pos(t.steps), f"{prefix}.steps", f"must be >= 1 (got {t.steps})"),
        (_pos(t.batch_size), f"{prefix}.batch_size", f"must be >= 1 (got {t.batch_size})"),
        (_pos(t.seq_len), f"{prefix}.seq_len", f"must be >= 1 (got {t.seq_len})"),
        (t.lr > 0, f"{prefix}.lr", f"must be > 0 (got {t.lr})"),
        (t.warmup_steps >= 0, f"{prefix}.warmup_steps", f"must be >= 0 (got {t.warmup_steps})"),
        (t.weight_decay >= 0, f"{prefix}.weight_decay", f"must be >= 0 (got {t.weight_decay})"),
        (t.grad_clip > 0, f"{prefix}.grad_clip", f"must be > 0 (got {t.grad_clip})"),
        (_pos(t.log_every), f"{prefix}.log_every", f"must be >= 1 (got {t.log_every})"),
        (t.eval_every >= 0, f"{prefix}.eval_every", f"must be >= 0 (0 = only at the end; got {t.eval_every})"),
        (_pos(t.ckpt_every), f"{prefix}.ckpt_every", f"must be >= 1 (got {t.ckpt_every})"),
        (_pos(t.keep_checkpoints), f"{prefix}.keep_checkpoints", f"must be >= 1 (got {t.keep_checkpoints})"),
    ]


def range_checks(cfg: Config) -> list[tuple[bool, str, str]]:
    """(ok, key, what is expected) for every bounded field and relation not checked above."""
    tk, dy, ag, b, lo = cfg.tokenizer, cfg.dynamics, cfg.agent, cfg.behavior, cfg.loader
    checks = [(lo.worker_buffer_size >= 1, "loader.worker_buffer_size", "must be >= 1")]
    for prefix, net in (("tokenizer", tk), ("dynamics", dy)):
        for name in ("width", "depth", "num_heads", "num_kv_heads", "time_every"):
            v = getattr(net, name)
            checks.append((_pos(v), f"{prefix}.{name}", f"must be >= 1 (got {v})"))
        checks.append((net.mlp_ratio > 0, f"{prefix}.mlp_ratio", f"must be > 0 (got {net.mlp_ratio})"))
        checks.append((net.logit_cap >= 0, f"{prefix}.logit_cap", f"must be >= 0, 0 = off (got {net.logit_cap})"))
        checks.append(
            (net.time_window >= 0, f"{prefix}.time_window", f"must be >= 0, 0 = all frames (got {net.time_window})")
        )
    for name in ("patch_size", "num_latents", "latent_dim", "eval_episodes", "eval_frames"):
        v = getattr(tk, name)
        checks.append((_pos(v), f"tokenizer.{name}", f"must be >= 1 (got {v})"))
    checks.append(
        (
            tk.latent_layout in ("learned", "patch"),
            "tokenizer.latent_layout",
            f"must be 'learned' or 'patch' (got {tk.latent_layout!r})",
        )
    )
    checks += _train_ranges("tokenizer.train", tk.train)
    checks += _train_ranges("dynamics.train", dy.train)
    checks += [
        (
            _pos(dy.spatial_tokens) and tk.num_latents % max(dy.spatial_tokens, 1) == 0,
            "dynamics.spatial_tokens",
            f"({dy.spatial_tokens}) must divide tokenizer.num_latents ({tk.num_latents}) and be >= 1",
        ),
        (dy.register_tokens >= 0, "dynamics.register_tokens", f"must be >= 0 (got {dy.register_tokens})"),
        (dy.space_rope_base > 1, "dynamics.space_rope_base", f"must be > 1 (got {dy.space_rope_base})"),
        (
            not dy.space_rope or tk.latent_layout == "patch",
            "dynamics.space_rope",
            "needs tokenizer.latent_layout=patch (latents on the patch grid)",
        ),
        (dy.time_neighbourhood >= 0, "dynamics.time_neighbourhood", f"must be >= 0 (got {dy.time_neighbourhood})"),
        (
            dy.time_neighbourhood == 0 or tk.latent_layout == "patch",
            "dynamics.time_neighbourhood",
            "needs tokenizer.latent_layout=patch (latents on the patch grid)",
        ),
        (
            0 <= dy.short_seq_len <= dy.train.seq_len,
            "dynamics.short_seq_len",
            f"must be 0 (off) or in [1, dynamics.train.seq_len={dy.train.seq_len}] (got {dy.short_seq_len})",
        ),
        (_pos(dy.eval_context), "dynamics.eval_context", f"must be >= 1 (got {dy.eval_context})"),
        (_pos(dy.eval_horizon), "dynamics.eval_horizon", f"must be >= 1 (got {dy.eval_horizon})"),
        (_pos(dy.eval_episodes), "dynamics.eval_episodes", f"must be >= 1 (got {dy.eval_episodes})"),
        (_pos(dy.eval_windows), "dynamics.eval_windows", f"must be >= 1 (got {dy.eval_windows})"),
        (_pos(dy.eval_transitions), "dynamics.eval_transitions", f"must be >= 1 (got {dy.eval_transitions})"),
        (0.0 <= dy.flow_share < 1.0, "dynamics.flow_share", f"must be in [0, 1) (got {dy.flow_share})"),
        (0.0 <= dy.context_prob < 1.0, "dynamics.context_prob", f"must be in [0, 1) (got {dy.context_prob})"),
    ]
    checks += [
        (_pos(ag.head_hidden), "agent.head_hidden", f"must be >= 1 (got {ag.head_hidden})"),
        (_pos(ag.eval_episodes), "agent.eval_episodes", f"must be >= 1 (got {ag.eval_episodes})"),
        (ag.eval_imagine >= 0, "agent.eval_imagine", f"must be >= 0 (got {ag.eval_imagine})"),
    ]
    checks.append((ag.critic_warmup >= 0, "agent.critic_warmup", f"must be >= 0 (got {ag.critic_warmup})"))
    for w in ("bc_weight", "reward_weight", "video_weight", "cont_weight"):
        v = getattr(ag, w)
        checks.append((v >= 0, f"agent.{w}", f"must be >= 0 (got {v})"))
    checks += _train_ranges("agent.bc", ag.bc)
    checks += _train_ranges("agent.imagine", ag.imagine)
    checks += [
        (_pos(b.update_epochs), "behavior.update_epochs", f"must be >= 1 (got {b.update_epochs})"),
        (b.lr > 0, "behavior.lr", f"must be > 0 (got {b.lr})"),
        (0 < b.gamma <= 1, "behavior.gamma", f"must be in (0, 1] (got {b.gamma})"),
        (0 <= b.gae_lambda <= 1, "behavior.gae_lambda", f"must be in [0, 1] (got {b.gae_lambda})"),
        (b.clip_eps > 0, "behavior.clip_eps", f"must be > 0 (got {b.clip_eps})"),
        (b.ent_coef >= 0 and b.vf_coef >= 0, "behavior.ent_coef", "and behavior.vf_coef must be >= 0"),
        (b.max_grad_norm > 0, "behavior.max_grad_norm", f"must be > 0 (got {b.max_grad_norm})"),
        (all(c >= 1 for c in b.conv_channels), "behavior.conv_channels", "must all be >= 1"),
        (_pos(b.hidden), "behavior.hidden", f"must be >= 1 (got {b.hidden})"),
        (_pos(b.keep_checkpoints), "behavior.keep_checkpoints", f"must be >= 1 (got {b.keep_checkpoints})"),
        (_pos(b.eval_envs) and _pos(b.eval_steps), "behavior.eval_envs", "and behavior.eval_steps must be >= 1"),
        (cfg.runtime.fsdp >= 0, "runtime.fsdp", f"must be >= 0 (0 = all devices; got {cfg.runtime.fsdp})"),
    ]
    return checks


def save_config(cfg: Config, directory: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config into `directory` (atomically)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)
    return path
