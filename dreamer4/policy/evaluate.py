"""Evaluation of the agent in the real Craftax game and in imagination (`dreamer4 evaluate`).

Real game: `agent.eval_episodes` episodes per policy, `agent.eval_envs` of them at a time in
vmapped environments, each a jitted `lax.scan` over at most `agent.eval_max_steps` steps (an
episode still running then is cut; the KV caches hold that many steps, or the models' time
window as a ring). The agent acts from real
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
import scipy.stats
from flax import nnx

from dreamer4.config import DynamicsSampling
from dreamer4.data.env import make_env, to_uint8
from dreamer4.data.store import Dataset
from dreamer4.dynamics.evaluate import write_video
from dreamer4.dynamics.sampler import context_inputs
from dreamer4.policy.heads import Agent
from dreamer4.policy.imagine import imagine_rollout, imagined_reward_cont
from dreamer4.policy.losses import expected_return
from dreamer4.runtime.loading import load_agent
from dreamer4.runtime.stage import StageDir, open_dataset, write_json

POLICIES = ("bc", "imagine", "random", "dataset")


def crafter_score(success_pct) -> float:
    """S = exp(mean_i ln(1 + s_i)) - 1, s_i = success rate of achievement i in percent (Crafter)."""
    s = np.asarray(success_pct, np.float64)
    return float(np.exp(np.mean(np.log1p(s))) - 1.0)


def mean_ci(x, level: float = 0.95) -> dict:
    """Mean of x and its Student-t confidence interval: mean -+ t_{(1+level)/2, n-1} s / sqrt(n), with s
    the sample standard deviation (ddof 1). For a paired difference pass x = a - b."""
    x = np.asarray(x, np.float64).ravel()
    n = int(x.size)
    if n < 2:
        m = float(x.mean()) if n else float("nan")
        return {"mean": m, "ci95": [float("nan"), float("nan")], "n": n}
    half = float(scipy.stats.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / np.sqrt(n))
    m = float(x.mean())
    return {"mean": m, "ci95": [m - half, m + half], "n": n}


def summarize(returns, achieved_EA, lengths, names, max_return: float) -> dict:
    """Per-policy statistics from per-episode returns, achievement flags (E, A) and lengths."""
    rates = 100.0 * np.asarray(achieved_EA, np.float64).mean(0) if len(returns) else np.zeros(len(names))
    return {
        "episodes": int(len(returns)),
        "return_mean": float(np.mean(returns)),
        "return_ci95": mean_ci(returns)["ci95"],
        "return_std": float(np.std(returns)),
        "reward_pct_of_max": float(100.0 * np.mean(returns) / max_return),
        "length_mean": float(np.mean(lengths)),
        "crafter_score": crafter_score(rates),
        "achievements": {n: float(r) for n, r in zip(names, rates)},
    }


# ----------------------------------------------------------------------------- playing the real game
def agent_act(graphdef, max_steps: int, context_tau: float):
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


def random_act(num_actions: int):
    def init(state, N):
        return ()

    def act(state, pstate, key, frame_NHWC, prev_N, t):
        return jax.random.randint(key, prev_N.shape, 0, num_actions, jnp.int32), pstate

    return init, act


def agent_or_random_act(graphdef, max_steps: int, context_tau: float, num_actions: int):
    """agent_act and random_act as one policy whose state is (agent weights, use_random): the
    traced flag picks the branch (`lax.cond`), so one compiled player serves the agents and the
    random baseline. The random branch draws from the same key as random_act: the same actions."""
    init_agent, agent = agent_act(graphdef, max_steps, context_tau)
    _, uniform = random_act(num_actions)

    def init(state, N):
        return init_agent(state[0], N)

    def act(state, pstate, key, frame_NHWC, prev_N, t):
        weights, use_random = state
        return jax.lax.cond(
            use_random,
            lambda: uniform(None, pstate, key, frame_NHWC, prev_N, t),
            lambda: agent(weights, pstate, key, frame_NHWC, prev_N, t),
        )

    return init, act


def make_player(env, params, policy, N: int, max_steps: int, context: int = 1):
    """jit(play(state, key)) -> per-env return, achievements (N, A), length, rewards (T, N), frames of env 0,
    and the first `context` frames of every env (C, N, H, W, 3) with the actions into them (C, N)
    (row 0: the reset frame, action 0 unlabeled): the starting states of imagined rollouts."""
    init, act = policy
    C = max(1, min(context, max_steps))
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
            ctx=jnp.zeros((C,) + obs.shape, jnp.uint8).at[0].set(to_uint8(obs)),
            ctx_act=jnp.zeros((C, N), jnp.int32),
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
                # frame t + 1 and the action into it, while t + 1 is a context row
                ctx=jnp.where(t + 1 < C, carry["ctx"].at[jnp.minimum(t + 1, C - 1)].set(to_uint8(obs)), carry["ctx"]),
                ctx_act=jnp.where(t + 1 < C, carry["ctx_act"].at[jnp.minimum(t + 1, C - 1)].set(a), carry["ctx_act"]),
            )
            return out, (r, carry["frame"][0])

        ts = jnp.arange(max_steps, dtype=jnp.int32)
        carry, (rewards_TN, frames_T) = jax.lax.scan(one, carry, (ts, jax.random.split(key, max_steps)))
        return carry["ret"], carry["ach"], carry["length"], rewards_TN, frames_T, carry["ctx"], carry["ctx_act"]

    return jax.jit(play)


def play_episodes(play, state, episodes: int, N: int, seed: int):
    """Run ceil(episodes / N) batches of N episodes with `play` (make_player); numpy results. Batch i
    resets from PRNGKey(seed + i), so every policy played with the same seed starts from the same
    worlds: differences between policies can be taken per episode (paired)."""
    rets, achs, lens, rews, ctxs, acts, video = [], [], [], [], [], [], None
    for i in range((episodes + N - 1) // N):
        out = jax.device_get(play(state, jax.random.PRNGKey(seed + i)))
        ret, ach, length, rewards_TN, frames_T, ctx_CN, act_CN = out
        rets.append(ret), achs.append(ach), lens.append(length), rews.append(rewards_TN.T)
        ctxs.append(np.moveaxis(ctx_CN, 0, 1)), acts.append(act_CN.T)
        if video is None:
            video = frames_T[: int(length[0]) + 1]
    cat = lambda xs: np.concatenate(xs)[:episodes]  # noqa: E731
    return {
        "returns": cat(rets),
        "achieved": cat(achs),
        "lengths": cat(lens),
        "rewards": cat(rews),
        "context_frames": cat(ctxs),
        "context_actions": cat(acts),
        "video": video,
    }


# ----------------------------------------------------------------------------- imagination
def imagined_returns(
    agent: Agent, frames_BCHWC, actions_BC, horizon: int, sampling: DynamicsSampling, cfg, seed: int = 0
):
    """Imagined reward sums over `horizon` steps of the agent's own rollouts from the given real
    starts (C frames and the actions into them; row 0 unlabeled), with the same reward and
    continuation as training (policy/train.py: imagined_reward_cont), and the decoded frames."""
    B, C = actions_BC.shape
    mask = np.ones((B, C), bool)
    mask[:, 0] = False

    @nnx.jit(static_argnames=("horizon", "sampling"))
    def run(agent, frames, actions, mask, key, horizon, sampling):
        z = agent.world.latents(frames)
        roll = imagine_rollout(agent, z, actions, mask, jnp.zeros((B,), jnp.int32), key, horizon, sampling)
        r, c = imagined_reward_cont(agent, roll, z[:, -1], cfg)
        video = agent.world.decode(jnp.concatenate([z, roll["z"]], 1))
        return expected_return(r, c), video

    r, video = jax.device_get(
        run(
            agent, jnp.asarray(frames_BCHWC), jnp.asarray(actions_BC), mask, jax.random.PRNGKey(seed), horizon, sampling
        )
    )
    return r, video


def imagined_vs_real(imagined_B, real_B) -> dict:
    """Imagined vs real return over the same horizon from the same starting states: means, the
    paired difference with its 95% CI and the Pearson correlation across starts."""
    imagined_B, real_B = np.asarray(imagined_B, np.float64), np.asarray(real_B, np.float64)
    ok = imagined_B.std() > 0 and real_B.std() > 0 and len(real_B) > 1
    return {
        "imagined_return_mean": float(imagined_B.mean()),
        "real_return_mean": float(real_B.mean()),
        "imagined_minus_real": mean_ci(imagined_B - real_B),
        "correlation": float(np.corrcoef(imagined_B, real_B)[0, 1]) if ok else float("nan"),
        "rollouts": int(len(real_B)),
    }


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
    # One compiled player for both agents and the random baseline (same graph, weights and the
    # use-random flag passed as arguments).
    C, H = ac.context_len, ac.horizon
    play = make_player(
        env,
        params,
        agent_or_random_act(
            nnx.graphdef(agents["imagine"][0]), ac.eval_max_steps, wcfg.dynamics.context_tau, spec.num_actions
        ),
        N,
        ac.eval_max_steps,
        context=C,
    )
    played = {}
    for name in ("bc", "imagine", "random"):
        weights = nnx.state(agents["imagine" if name == "random" else name][0])
        state = (weights, jnp.asarray(name == "random"))
        print(f"[evaluate] {name}: {E} episodes in the real game ({N} at a time, cut at {ac.eval_max_steps} steps)")
        p = play_episodes(play, state, E, N, seed)
        played[name] = p
        results["policies"][name] = summarize(
            p["returns"], p["achieved"], p["lengths"], spec.achievement_names, max_return
        )
        write_video(out / f"real_{name}.gif", np.repeat(np.repeat(p["video"], 4, 1), 4, 2))
    results["policies"]["dataset"] = dataset_policy_stats(ds, max_return)
    # Same seed => same starting worlds for every policy: per-episode (paired) differences.
    results["comparisons"] = {
        f"{a}_minus_{b}": mean_ci(played[a]["returns"] - played[b]["returns"])
        for a, b in (("imagine", "bc"), ("bc", "random"), ("imagine", "random"))
    }

    # Imagined vs real return of the imagination-trained policy from the same real starting states:
    # the first C frames of its real episodes, then H steps imagined / played.
    n_im = min(ac.eval_imagine, E)
    if n_im > 0 and ac.eval_max_steps >= C + H:
        p = played["imagine"]
        starts = np.flatnonzero(p["lengths"] >= C)[:n_im]  # episodes still running after the context
        if len(starts):
            imagined, video = imagined_returns(
                agents["imagine"][0],
                p["context_frames"][starts],
                p["context_actions"][starts],
                H,
                wcfg.dynamics.sampling,
                cfg,
                seed,
            )
            real_h = p["rewards"][starts, C - 1 : C - 1 + H].sum(1)  # transitions into frames C .. C+H-1
            results["imagination"] = {"horizon": H, "context": C, **imagined_vs_real(imagined, real_h)}
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
    lines.append(
        "| return 95% CI | "
        + " | ".join(_ci_text(P[p]["return_ci95"]) if "return_ci95" in P[p] else "" for p in pols)
        + " |"
    )
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
    comps = results.get("comparisons", {})
    if comps:
        lines += ["", "Paired differences of real return (same starting worlds; mean, 95% CI):", ""]
        lines += [
            f"- {k.replace('_minus_', ' - ')}: {c['mean']:+.3f} {_ci_text(c['ci95'])} (n={c['n']})"
            for k, c in comps.items()
        ]
    im = results.get("imagination")
    if im:
        d = im["imagined_minus_real"]
        lines += [
            "",
            f"Imagination vs real game from the same {im['rollouts']} starts ({im['context']} real frames, then "
            f"{im['horizon']} steps): imagined return {im['imagined_return_mean']:.3f}, real "
            f"{im['real_return_mean']:.3f}; imagined - real {d['mean']:+.3f} {_ci_text(d['ci95'])}; "
            f"correlation across starts {im['correlation']:.2f}",
        ]
    return "\n".join(lines) + "\n"


def _ci_text(ci) -> str:
    return f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"


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
