"""Evaluation of the agent in the real Craftax game and in imagination (`dreamer4 evaluate`).

Real game: `agent.eval_episodes` episodes per policy, `agent.eval_envs` of them at a time in
vmapped environments, each a jitted `lax.scan` over at most `agent.eval_max_steps` steps (an
episode still running then is cut: the KV caches hold that many steps). The agent acts from real
frames only: at step t the tokenizer encodes frame t with its KV cache (`encode_step`), the
latents, corrupted to `dynamics.context_tau` as in imagination, and the previous action (the
action that led into frame t; none at the reset frame) enter the transformer with its KV cache,
and the next action is sampled from the policy head at the agent token.

Policies side by side: the BC policy (RUN_DIR/agent_bc), the imagination-trained policy
(RUN_DIR/agent), a uniform random policy (same step cap), and the dataset's behaviour policy
(its episode statistics from the manifest, episodes NOT capped). Reported per policy: mean
return, return as % of the maximum (Craftax-Classic: +1 per achievement, so the number of
achievements; for full Craftax, whose achievements pay different rewards, the same count is
used and the % is only indicative), every achievement's success rate (% of episodes unlocking it) and the Crafter
score  S = exp(mean_i ln(1 + s_i)) - 1  with s_i the success rates in %.

Imagination: the imagination-trained policy rolled out in the world model from eval-split
contexts; its imagined return over agent.horizon steps vs the real return over the first
agent.horizon steps of its real episodes; videos of both.

Writes RUN_DIR/evaluate/: results.json, table.md, achievements.png, real_*.gif, imagined_*.gif.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreamer4.config import DynamicsSampling
from dreamer4.data.env import make_env, to_uint8
from dreamer4.data.store import Dataset
from dreamer4.dynamics.evaluate import write_video
from dreamer4.dynamics.sampler import context_inputs
from dreamer4.policy.heads import Agent
from dreamer4.policy.imagine import imagine_rollout
from dreamer4.runtime.loading import load_agent
from dreamer4.runtime.stage import StageDir, open_dataset, write_json

POLICIES = ("bc", "imagine", "random", "dataset")


def crafter_score(success_pct) -> float:
    """S = exp(mean_i ln(1 + s_i)) - 1, s_i = success rate of achievement i in percent (Crafter)."""
    s = np.asarray(success_pct, np.float64)
    return float(np.exp(np.mean(np.log1p(s))) - 1.0)


def summarize(returns, achieved_EA, lengths, names, max_return: float) -> dict:
    """Per-policy statistics from per-episode returns, achievement flags (E, A) and lengths."""
    rates = 100.0 * np.asarray(achieved_EA, np.float64).mean(0) if len(returns) else np.zeros(len(names))
    return {
        "episodes": int(len(returns)),
        "return_mean": float(np.mean(returns)),
        "return_std": float(np.std(returns)),
        "reward_pct_of_max": float(100.0 * np.mean(returns) / max_return),
        "length_mean": float(np.mean(lengths)),
        "crafter_score": crafter_score(rates),
        "achievements": {n: float(r) for n, r in zip(names, rates)},
    }


# ----------------------------------------------------------------------------- playing the real game
def _agent_act(graphdef, max_steps: int, context_tau: float):
    """(init(state, N), act(state, pstate, key, frame_NHWC, prev_action_N, t)) for an Agent's weights."""

    def init(state, N):
        agent = nnx.merge(graphdef, state)
        return {"tok": agent.world.tokenizer.init_cache(N, max_steps)["enc"], "agent": agent.init_cache(N, max_steps)}

    def act(state, pstate, key, frame_NHWC, prev_N, t):
        agent: Agent = nnx.merge(graphdef, state)
        N = frame_NHWC.shape[0]
        tok = agent.world.tokenizer
        x = frame_NHWC[:, None].astype(jnp.float32) / 255.0
        z, tok_cache = tok.encode_step(x, {"enc": pstate["tok"]}, t)
        k_ctx, k_act = jax.random.split(key)
        zc, tau, d = context_inputs(z, k_ctx, context_tau, agent.dynamics.cfg.k_max)
        mask = jnp.broadcast_to(t > 0, (N, 1))  # the reset frame has no action leading into it
        (_, h), cache = agent.step(zc, tau, d, prev_N[:, None], mask, jnp.zeros((N, 1), jnp.int32), pstate["agent"], t)
        a = jax.random.categorical(k_act, agent.policy_logits(h[:, 0])).astype(jnp.int32)
        return a, {"tok": tok_cache["enc"], "agent": cache}

    return init, act


def _random_act(num_actions: int):
    def init(state, N):
        return ()

    def act(state, pstate, key, frame_NHWC, prev_N, t):
        return jax.random.randint(key, prev_N.shape, 0, num_actions, jnp.int32), pstate

    return init, act


def make_player(env, params, policy, N: int, max_steps: int):
    """jit(play(state, key)) -> per-env return, achievements (N, A), length, rewards (T, N), frames of env 0."""
    init, act = policy
    reset_v = jax.vmap(env.reset_env, in_axes=(0, None))
    step_v = jax.vmap(env.step_env, in_axes=(0, 0, 0, None))

    def play(state, key):
        k_reset, key = jax.random.split(key)
        obs, env_state = reset_v(jax.random.split(k_reset, N), params)
        carry = dict(
            env=env_state,
            frame=to_uint8(obs),
            prev=jnp.zeros((N,), jnp.int32),
            alive=jnp.ones((N,), bool),
            ret=jnp.zeros((N,)),
            length=jnp.zeros((N,), jnp.int32),
            ach=jnp.zeros_like(env_state.achievements),
            pstate=init(state, N),
        )

        def one(carry, xs):
            t, k = xs
            k_act, k_step = jax.random.split(k)
            a, pstate = act(state, carry["pstate"], k_act, carry["frame"], carry["prev"], t)
            obs, nxt, r, done, _ = step_v(jax.random.split(k_step, N), carry["env"], a, params)
            alive = carry["alive"]
            r = jnp.where(alive, r, 0.0)
            out = dict(
                env=nxt,
                frame=to_uint8(obs),
                prev=a,
                alive=alive & ~done,
                ret=carry["ret"] + r,
                length=carry["length"] + alive,
                ach=carry["ach"] | (nxt.achievements & alive[:, None]),
                pstate=pstate,
            )
            return out, (r, carry["frame"][0])

        ts = jnp.arange(max_steps, dtype=jnp.int32)
        carry, (rewards_TN, frames_T) = jax.lax.scan(one, carry, (ts, jax.random.split(key, max_steps)))
        return carry["ret"], carry["ach"], carry["length"], rewards_TN, frames_T

    return jax.jit(play)


def play_episodes(play, state, episodes: int, N: int, seed: int):
    """Run ceil(episodes / N) batches of N episodes with `play` (make_player); numpy results."""
    rets, achs, lens, rews, video = [], [], [], [], None
    for i in range((episodes + N - 1) // N):
        ret, ach, length, rewards_TN, frames_T = jax.device_get(play(state, jax.random.PRNGKey(seed + i)))
        rets.append(ret), achs.append(ach), lens.append(length), rews.append(rewards_TN.T)
        if video is None:
            video = frames_T[: int(length[0]) + 1]
    cat = lambda xs: np.concatenate(xs)[:episodes]  # noqa: E731
    return {"returns": cat(rets), "achieved": cat(achs), "lengths": cat(lens), "rewards": cat(rews), "video": video}


# ----------------------------------------------------------------------------- imagination
def imagined_returns(agent: Agent, ds: Dataset, cfg, n: int, horizon: int, sampling: DynamicsSampling, seed: int = 0):
    """Imagined reward sums over `horizon` steps from the first context_len rows of n eval episodes,
    and the decoded imagined frames."""
    C = cfg.agent.context_len
    eps = [e for e in ds.split("eval") if e.length >= C] or [e for e in ds.episodes if e.length >= C]
    eps = eps[:n]
    rows = [ds.read(e, 0, C, ("frame",)) for e in eps]
    frames = jnp.asarray(np.stack([r["frame"] for r in rows]))
    B = frames.shape[0]

    @nnx.jit(static_argnames=("horizon", "sampling"))
    def run(agent, frames, key, horizon, sampling):
        z = agent.world.latents(frames)
        mask = jnp.zeros((B, C), bool)  # the context's actions are not needed: leave them unlabeled
        roll = imagine_rollout(
            agent, z, jnp.zeros((B, C), jnp.int32), mask, jnp.zeros((B,), jnp.int32), key, horizon, sampling
        )
        r = agent.reward_now(roll["h"])[:, 1:]
        video = agent.world.decode(jnp.concatenate([z, roll["z"]], 1))
        return r, video

    r, video = jax.device_get(run(agent, frames, jax.random.PRNGKey(seed), horizon, sampling))
    return r.sum(1), video


# ----------------------------------------------------------------------------- the command
def dataset_policy_stats(ds: Dataset, max_return: float) -> dict:
    eps = ds.episodes
    ach = np.array([[n in e.achievements for n in ds.achievement_names] for e in eps], bool)
    out = summarize(
        np.array([e.ret for e in eps]), ach, np.array([e.length for e in eps]), ds.achievement_names, max_return
    )
    out["policy"] = ds.manifest.get("behavior_policy")
    return out


def evaluate(run_dir, episodes: int | None = None, seed: int = 0, out_name: str = "evaluate") -> dict:
    agents = {"bc": load_agent(run_dir, "agent_bc"), "imagine": load_agent(run_dir, "agent")}
    _, wcfg, facts = agents["imagine"]
    cfg = StageDir(run_dir, "agent").trained_config()
    ac = cfg.agent
    E = episodes or ac.eval_episodes
    N = min(ac.eval_envs, E)
    env, params, spec = make_env(cfg.env.name)
    max_return = float(len(spec.achievement_names))
    ds = open_dataset(facts["data"], cfg)
    stage = StageDir(run_dir, out_name)
    out = stage.dir
    out.mkdir(parents=True, exist_ok=True)

    results: dict = {"episodes": E, "max_steps": ac.eval_max_steps, "max_return": max_return, "policies": {}}
    # One compiled player for both agents (same graph, weights passed as an argument).
    agent_play = make_player(
        env,
        params,
        _agent_act(nnx.graphdef(agents["imagine"][0]), ac.eval_max_steps, wcfg.dynamics.context_tau),
        N,
        ac.eval_max_steps,
    )
    random_play = make_player(env, params, _random_act(spec.num_actions), N, ac.eval_max_steps)
    played = {}
    for name in ("bc", "imagine", "random"):
        if name == "random":
            play, state = random_play, None
        else:
            play, state = agent_play, nnx.state(agents[name][0])
        p = play_episodes(play, state, E, N, seed)
        played[name] = p
        results["policies"][name] = summarize(
            p["returns"], p["achieved"], p["lengths"], spec.achievement_names, max_return
        )
        write_video(out / f"real_{name}.gif", np.repeat(np.repeat(p["video"], 4, 1), 4, 2))
    results["policies"]["dataset"] = dataset_policy_stats(ds, max_return)

    H = ac.horizon
    imagined, video = imagined_returns(agents["imagine"][0], ds, cfg, ac.eval_imagine, H, wcfg.dynamics.sampling, seed)
    real_h = played["imagine"]["rewards"][:, :H].sum(1)
    results["imagination"] = {
        "horizon": H,
        "imagined_return_mean": float(np.mean(imagined)),
        "real_return_first_h_mean": float(np.mean(real_h)),
        "rollouts": int(len(imagined)),
    }
    for i in range(min(2, video.shape[0])):
        frames = (video[i] * 255).round().astype(np.uint8)
        write_video(out / f"imagined_{i}.gif", np.repeat(np.repeat(frames, 4, 1), 4, 2))
    (out / "table.md").write_text(results_table(results))
    achievement_chart(results, out / "achievements.png")
    write_json(stage.results_path, results)  # last: the stage's commit marker
    return results


def results_table(results: dict) -> str:
    pols = [p for p in POLICIES if p in results["policies"]]
    P = results["policies"]
    lines = [
        f"Real Craftax, {results['episodes']} episodes per policy, capped at {results['max_steps']} steps "
        f"(dataset: its own episodes, uncapped).",
        "",
        "| metric | " + " | ".join(pols) + " |",
        "|---|" + "---|" * len(pols),
    ]
    for key, fmt in (
        ("return_mean", "{:.2f}"),
        ("return_std", "{:.2f}"),
        ("reward_pct_of_max", "{:.1f}%"),
        ("crafter_score", "{:.2f}"),
        ("length_mean", "{:.0f}"),
        ("episodes", "{}"),
    ):
        lines.append(f"| {key} | " + " | ".join(fmt.format(P[p][key]) for p in pols) + " |")
    for name in P[pols[0]]["achievements"]:
        lines.append(f"| {name} (%) | " + " | ".join(f"{P[p]['achievements'][name]:.0f}" for p in pols) + " |")
    im = results.get("imagination")
    if im:
        lines += [
            "",
            f"Imagination ({im['rollouts']} rollouts, {im['horizon']} steps): imagined return "
            f"{im['imagined_return_mean']:.3f} vs real return over the first {im['horizon']} steps "
            f"{im['real_return_first_h_mean']:.3f}",
        ]
    return "\n".join(lines) + "\n"


def achievement_chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pols = [p for p in POLICIES if p in results["policies"]]
    names = list(results["policies"][pols[0]]["achievements"])
    fig, ax = plt.subplots(figsize=(10, 3.8))
    w = 0.8 / len(pols)
    for i, p in enumerate(pols):
        vals = [results["policies"][p]["achievements"][n] for n in names]
        ax.bar(
            np.arange(len(names)) + i * w, vals, w, label=f"{p} (score {results['policies'][p]['crafter_score']:.2f})"
        )
    ax.set_xticks(np.arange(len(names)) + 0.4 - w / 2)
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("success rate (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
