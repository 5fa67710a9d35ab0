"""Online PPO in Craftax, jitted end to end: `dreamer4 train-behavior --config CFG --run RUN_DIR`.

One call of the compiled `update` does a whole PPO iteration on the device: a `lax.scan` of
`num_steps` steps over `num_envs` vmapped envs (policy sampling, env step, reset of finished envs),
GAE, then `update_epochs` passes of `num_minibatches` shuffled minibatch updates. The host loop
around it only logs, checkpoints and counts.

This is online RL, so it does not use the dataset-driven `train()` of runtime/train_loop.py; it
shares that loop's host-side core (`runtime.host_loop.HostLoop`: metric flush, finite check before
every checkpoint, so a non-finite loss never overwrites a good checkpoint, log and checkpoint
cadence) and its runtime pieces: orbax checkpoints (`Checkpointer`), `MetricLogger`, the stage
contract (`StageDir`).

RUN_DIR/behavior/ holds config.yaml, checkpoints/<update>/, metrics.jsonl and eval.json. A
checkpoint holds the whole runner: parameters, optimizer state, env states, frame stacks, PRNG
key, episode accumulators and the update count, so a killed run resumes exactly where its last
checkpoint left it (the continuation is the same as an uninterrupted run's, up to float
reassociation on another device count). A SIGTERM, SIGUSR1 or SIGINT stops it after the current
update with a checkpoint of that update (the host loop; exit code 75), and RUN_DIR/behavior/lock
keeps a second job off the stage (runtime/lock.py).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dreamer4.behavior import ppo
from dreamer4.behavior.model import ActorCritic, push_frame
from dreamer4.config import BehaviorConfig, Config, save_config, to_dict
from dreamer4.data.env import EnvSpec, make_env, strong_types, to_uint8
from dreamer4.runtime.checkpoint import Checkpointer
from dreamer4.runtime.distributed import is_main_process
from dreamer4.runtime.host_loop import HostLoop
from dreamer4.runtime.lock import stage_lock
from dreamer4.runtime.logging import MetricLogger
from dreamer4.runtime.stage import StageDir

STAGE = "behavior"


def make_optimizer(b: BehaviorConfig) -> optax.GradientTransformation:
    """Adam with global-norm clipping; the learning rate decays linearly to 0 over the updates."""
    per_update = b.update_epochs * b.num_minibatches
    total = b.num_updates

    def lr(count):
        if not b.anneal_lr:
            return b.lr
        return b.lr * (1.0 - (count // per_update) / total)

    return optax.chain(optax.clip_by_global_norm(b.max_grad_norm), optax.adam(lr, eps=1e-5))


def build_model(b: BehaviorConfig, spec_frame_shape, num_actions: int, seed: int) -> ActorCritic:
    return ActorCritic(tuple(spec_frame_shape), num_actions, b, rngs=nnx.Rngs(seed))


def _select(mask_N, a, b):
    """Per-env choice between two pytrees whose leaves have a leading env axis."""
    return jax.tree.map(lambda x, y: jnp.where(mask_N.reshape(mask_N.shape + (1,) * (x.ndim - 1)), x, y), a, b)


class PPO:
    """The compiled pieces of one PPO run: `init(key)`, `update(runner)`, `evaluate(params, key, random)`."""

    def __init__(self, cfg: Config, env, env_params, spec: EnvSpec):
        self.cfg, self.b = cfg, cfg.behavior
        self.env, self.env_params, self.spec = env, env_params, spec
        model = build_model(self.b, spec.frame_shape, spec.num_actions, cfg.seed)
        self.graphdef, self.params0 = nnx.split(model)
        self.tx = make_optimizer(self.b)
        self.reset_v = jax.vmap(env.reset_env, in_axes=(0, None))
        self.step_v = jax.vmap(env.step_env, in_axes=(0, 0, 0, None))
        self.update = jax.jit(self._update, donate_argnums=(0,))
        self.evaluate = jax.jit(self._evaluate, static_argnums=(3, 4))

    # -- model ---------------------------------------------------------------------------------

    def apply(self, params, stack_NHWCK):
        return nnx.merge(self.graphdef, params)(stack_NHWCK)

    # -- runner --------------------------------------------------------------------------------

    def init(self, key):
        """The whole state of a run at update 0: fresh envs, fresh parameters and optimizer."""
        N = self.b.num_envs
        k_env, key = jax.random.split(key)
        obs, env_state = self.reset_v(jax.random.split(k_env, N), self.env_params)
        frame = to_uint8(obs)
        stack = push_frame(
            jnp.zeros(frame.shape[:3] + (frame.shape[3] * self.b.frame_stack,), jnp.uint8), frame, jnp.ones((N,), bool)
        )
        params = jax.tree.map(jnp.copy, self.params0)  # the update donates its input buffers
        runner = dict(
            params=params,
            opt_state=self.tx.init(params),
            env_state=env_state,
            stack=stack,
            key=key,
            ep_return=jnp.zeros((N,), jnp.float32),
            ep_length=jnp.zeros((N,), jnp.int32),
            update=jnp.zeros((), jnp.int32),
        )
        return strong_types(runner)  # the types update returns: one compilation of update, not two

    def _env_step(self, params, env_state, stack, key):
        """Sample actions from the policy, step every env, reset those that finished."""
        N = self.b.num_envs
        k_act, k_step, k_reset = jax.random.split(key, 3)
        logits_NA, value_N = self.apply(params, stack)
        action_N = jax.random.categorical(k_act, logits_NA).astype(jnp.int32)
        logp_N = ppo.categorical_log_prob(logits_NA, action_N)
        obs, next_state, reward_N, done_N, _ = self.step_v(
            jax.random.split(k_step, N), env_state, action_N, self.env_params
        )
        achievements_N = next_state.achievements.sum(-1)
        # World generation is costly: run the batched reset only when some env finished.
        reset_obs, reset_state = jax.lax.cond(
            jnp.any(done_N),
            lambda: self.reset_v(jax.random.split(k_reset, N), self.env_params),
            lambda: (obs, next_state),
        )
        obs = jnp.where(done_N[:, None, None, None], reset_obs, obs)
        env_state = _select(done_N, reset_state, next_state)
        new_stack = push_frame(stack, to_uint8(obs), done_N)
        step = dict(
            stack=stack, action=action_N, logp=logp_N, value=value_N, reward=reward_N.astype(jnp.float32), done=done_N
        )
        return env_state, new_stack, step, achievements_N

    def _update(self, runner):
        b = self.b
        N, T = b.num_envs, b.num_steps
        params = runner["params"]

        def rollout_step(carry, _):
            env_state, stack, key, ep_ret, ep_len = carry
            key, k = jax.random.split(key)
            env_state, stack, step, ach_N = self._env_step(params, env_state, stack, k)
            ep_ret = ep_ret + step["reward"]
            ep_len = ep_len + 1
            done = step["done"]
            finished = dict(
                ret=jnp.where(done, ep_ret, 0.0),
                len=jnp.where(done, ep_len, 0),
                ach=jnp.where(done, ach_N, 0),
                n=done.astype(jnp.int32),
            )
            ep_ret = jnp.where(done, 0.0, ep_ret)
            ep_len = jnp.where(done, 0, ep_len)
            return (env_state, stack, key, ep_ret, ep_len), (step, finished)

        key, k_roll, k_perm = jax.random.split(runner["key"], 3)
        carry0 = (runner["env_state"], runner["stack"], k_roll, runner["ep_return"], runner["ep_length"])
        (env_state, stack, _, ep_ret, ep_len), (traj_T, fin_T) = jax.lax.scan(rollout_step, carry0, None, length=T)
        _, last_value_N = self.apply(params, stack)
        adv_TN, ret_TN = ppo.gae(traj_T["reward"], traj_T["value"], traj_T["done"], last_value_N, b.gamma, b.gae_lambda)

        flat = dict(
            stack=traj_T["stack"],
            action=traj_T["action"],
            logp=traj_T["logp"],
            value=traj_T["value"],
            adv=adv_TN,
            ret=ret_TN,
        )
        flat = jax.tree.map(lambda x: x.reshape((T * N,) + x.shape[2:]), flat)
        M = b.num_minibatches

        def loss_fn(p, mb):
            logits_NA, value_N = self.apply(p, mb["stack"])
            return ppo.ppo_loss(
                logits_NA,
                value_N,
                mb["action"],
                mb["logp"],
                mb["value"],
                mb["adv"],
                mb["ret"],
                clip_eps=b.clip_eps,
                vf_coef=b.vf_coef,
                ent_coef=b.ent_coef,
            )

        def minibatch_step(state, mb):
            p, opt_state = state
            (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, mb)
            updates, opt_state = self.tx.update(grads, opt_state, p)
            p = optax.apply_updates(p, updates)
            return (p, opt_state), dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))

        def epoch(state, k):
            perm = jax.random.permutation(k, T * N)
            mbs = jax.tree.map(lambda x: x[perm].reshape((M, -1) + x.shape[1:]), flat)
            return jax.lax.scan(minibatch_step, state, mbs)

        (params, opt_state), losses = jax.lax.scan(
            epoch, (params, runner["opt_state"]), jax.random.split(k_perm, b.update_epochs)
        )
        n_fin = fin_T["n"].sum()
        metrics = {k: v.mean() for k, v in losses.items()}
        metrics.update(
            episodes=n_fin,
            episode_return=fin_T["ret"].sum() / jnp.maximum(n_fin, 1),
            episode_length=fin_T["len"].sum() / jnp.maximum(n_fin, 1),
            episode_achievements=fin_T["ach"].sum() / jnp.maximum(n_fin, 1),
            reward_per_step=traj_T["reward"].mean(),
            value_mean=traj_T["value"].mean(),
        )
        runner = dict(
            params=params,
            opt_state=opt_state,
            env_state=env_state,
            stack=stack,
            key=key,
            ep_return=ep_ret,
            ep_length=ep_len,
            update=runner["update"] + 1,
        )
        return runner, metrics

    # -- evaluation ----------------------------------------------------------------------------

    def _evaluate(self, params, key, use_random, num_envs: int, horizon: int):
        """Return and achievements of the first `horizon` steps of `num_envs` episodes.

        Every env starts from a reset seeded by `key`, so the trained policy and the uniform
        random one (`use_random=True`) play the same worlds. Rewards after an episode's end are
        not counted. Returns per-env (return_N, achievements_N, ended_N).
        """
        N, A = num_envs, self.spec.num_actions
        k_env, key = jax.random.split(key)
        obs, env_state = self.reset_v(jax.random.split(k_env, N), self.env_params)
        frame = to_uint8(obs)
        stack = push_frame(
            jnp.zeros(frame.shape[:3] + (frame.shape[3] * self.b.frame_stack,), jnp.uint8), frame, jnp.ones((N,), bool)
        )

        def step(carry, k):
            env_state, stack, alive, ret, ach = carry
            k_act, k_rand, k_step = jax.random.split(k, 3)
            logits_NA, _ = self.apply(params, stack)
            action = jnp.where(
                use_random, jax.random.randint(k_rand, (N,), 0, A), jax.random.categorical(k_act, logits_NA)
            ).astype(jnp.int32)
            obs, env_state, reward, done, _ = self.step_v(
                jax.random.split(k_step, N), env_state, action, self.env_params
            )
            ret = ret + jnp.where(alive, reward, 0.0)
            ach = jnp.where(alive, env_state.achievements.sum(-1), ach)
            alive = alive & ~done
            stack = push_frame(stack, to_uint8(obs), jnp.zeros((N,), bool))
            return (env_state, stack, alive, ret, ach), None

        carry = (env_state, stack, jnp.ones((N,), bool), jnp.zeros((N,)), jnp.zeros((N,), jnp.int32))
        (_, _, alive, ret, ach), _ = jax.lax.scan(step, carry, jax.random.split(key, horizon))
        return ret, ach, ~alive


# ---------------------------------------------------------------------------------------------
# Checkpoint layout: {"params": nnx.State, "rest": [leaves of everything else]}. The rest is
# stored as a flat list because env states are Craftax dataclasses and optimizer states are
# optax namedtuples; the tree structure is rebuilt from a freshly traced runner on restore.


def _to_saved(runner: dict) -> dict:
    rest = {k: v for k, v in runner.items() if k != "params"}
    return {"params": runner["params"], "rest": jax.tree.leaves(rest)}


def _from_saved(saved: dict, like: dict) -> dict:
    rest_like = {k: v for k, v in like.items() if k != "params"}
    rest = jax.tree.unflatten(jax.tree.structure(rest_like), saved["rest"])
    return {"params": saved["params"], **rest}


def abstract_runner(ppo_fns: PPO, seed: int) -> dict:
    """Shapes and dtypes of a runner, traced (not run) so that a restore knows its target."""
    return jax.eval_shape(ppo_fns.init, jax.random.PRNGKey(seed))


def checkpoint_meta(cfg: Config, spec: EnvSpec, update: int) -> dict:
    b = cfg.behavior
    return {
        "step": update,
        "stage": STAGE,
        "env_steps": update * b.num_envs * b.num_steps,
        "env": spec.name,
        "frame_shape": list(spec.frame_shape),
        "num_actions": spec.num_actions,
        "config": to_dict(cfg),
    }


def evaluate_vs_random(ppo_fns: PPO, params, seed: int) -> dict:
    """Mean return / achievements over `eval_steps` from the same seeded resets, trained vs random."""
    b = ppo_fns.b
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 0xE7A1)
    out = {}
    for name, use_random in (("policy", False), ("random", True)):
        ret, ach, ended = jax.device_get(
            ppo_fns.evaluate(params, key, jnp.asarray(use_random), b.eval_envs, b.eval_steps)
        )
        out[f"eval_{name}_return"] = float(np.mean(ret))
        out[f"eval_{name}_achievements"] = float(np.mean(ach))
        out[f"eval_{name}_episodes_ended"] = float(np.mean(ended))
    out["eval_envs"], out["eval_steps"] = b.eval_envs, b.eval_steps
    return out


def train_behavior(cfg: Config, run_dir: str | Path, log=print) -> dict:
    """Train (or finish training) the PPO behaviour policy of RUN_DIR; returns the final metrics.
    A SIGTERM/SIGUSR1/SIGINT (runtime/preempt.py) stops it with a checkpoint: `Preempted`."""
    stage = StageDir(run_dir, STAGE)
    stage.check_network(cfg)
    stage.dir.mkdir(parents=True, exist_ok=True)
    # one writer per stage directory (runtime/lock.py)
    with stage_lock(stage.lock_path, STAGE, log=log):
        return _train_behavior(cfg, stage, log)


def _train_behavior(cfg: Config, stage: StageDir, log) -> dict:
    b = cfg.behavior
    stage_dir = stage.dir
    if is_main_process():
        save_config(cfg, stage_dir)
    env, env_params, spec = make_env(cfg.env.name)
    fns = PPO(cfg, env, env_params, spec)
    total = b.num_updates
    ckpt = Checkpointer(stage.checkpoints, keep=b.keep_checkpoints)
    logger = MetricLogger(stage_dir, STAGE, to_dict(cfg), mode=cfg.runtime.wandb, project=cfg.runtime.wandb_project)
    like = abstract_runner(fns, cfg.seed)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _to_saved(like))
    found = ckpt.restore_latest_good(target, log=lambda m: log(f"[{STAGE}] {m}"))
    if found is None:
        runner = fns.init(jax.random.PRNGKey(cfg.seed))
        logger.truncate_after(0)
    else:
        _, saved, meta = found
        runner = _from_saved(saved, like)
        logger.truncate_after(int(meta["step"]))  # drop lines the killed run logged after this checkpoint
        log(f"[{STAGE}] resumed from update {int(meta['step'])} ({meta['env_steps']} env steps) in {ckpt.directory}")
    # One placement for a fresh and a restored runner (a restore returns arrays committed to a
    # device, init does not): the update compiles to the same program either way, so a resumed run
    # finds it in the compilation cache instead of compiling it again.
    runner = jax.device_put(runner, jax.local_devices()[0])
    update = int(runner["update"])
    steps_per_update = b.num_envs * b.num_steps

    def on_nonfinite(u: int, m: dict) -> None:
        raise FloatingPointError(
            f"[{STAGE}] PPO loss became non-finite at update {u} "
            f"({ {k: float(v) for k, v in m.items()} }); the last good checkpoint is update "
            f"{ckpt.latest_step()} in {ckpt.directory} (not overwritten)"
        )

    def summarize(host: list[dict], updates: int, seconds: float) -> dict:
        # Episode statistics are weighted by the episodes that ended in each update.
        n = np.array([m["episodes"] for m in host], float)
        means = {k: float(np.mean([m[k] for m in host])) for k in host[0] if not k.startswith("episode")}
        for k in ("episode_return", "episode_length", "episode_achievements"):
            if n.sum() > 0:
                means[k] = float(np.sum([m[k] * w for m, w in zip(host, n)]) / n.sum())
        means["episodes"] = float(n.sum())
        means["env_steps"] = float(loop.pending[-1][0] * steps_per_update)
        means["env_steps_per_s"] = updates * steps_per_update / seconds
        return means

    loop = HostLoop(
        STAGE,
        total=total,
        initial=update,
        unit="update",
        log_every=b.log_every,
        ckpt_every=b.ckpt_every,
        ckpt=ckpt,
        logger=logger,
        save_state=lambda u: (_to_saved(runner), checkpoint_meta(cfg, spec, u)),
        summarize=summarize,
        on_nonfinite=on_nonfinite,
        progress=lambda m: {"ret": m.get("episode_return", float("nan")), "sps": m["env_steps_per_s"]},
    )
    try:
        while update < total:
            runner, metrics = fns.update(runner)
            update += 1
            loop.record(update, metrics)  # checkpoints and raises Preempted after a signal
        loop.finish(update)
        results = evaluate_vs_random(fns, runner["params"], cfg.seed)
        results.update(update=update, env_steps=update * steps_per_update, complete=True)
        logger.log(
            update, {k: v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        )
        stage.write_results({**results, "train": loop.last})
        return {**loop.last, **results}
    finally:
        loop.close()
