"""Does training in imagination improve the agent? Several imagination seeds on one world model.

    python benchmarks/agent.py --run RUN --config configs/tiny.yaml [--set KEY=VALUE ...]
        [--seeds 0,1,2] [--episodes 256] [--eval-seed 0] [--out OUT] [--tag NAME]

RUN must hold a trained tokenizer, dynamics and BC phase (RUN/agent_bc, e.g. from
`dreamer4 train-agent --phase bc`). For each seed s the imagination phase is trained from that one
BC checkpoint into OUT/seed{s}/agent (resumable; a finished seed is reused) with `seed=s` and the
given overrides. Then, in the real game, the BC policy, a uniform random policy and each seed's
policy play the same `--episodes` starting worlds (reset keys from --eval-seed), so every
difference is paired per episode. Reported per seed and pooled:

  * real return with its 95% CI, the paired difference imagination - BC with its 95% CI;
  * pooled: the mean of all seeds' per-episode differences (CI over seeds x episodes: optimistic,
    the BC episodes are reused and seed-to-seed variation is ignored), per starting world (the
    seeds' mean return minus BC's, CI over worlds; seeds as fixed effects) and the t-interval over
    the per-seed mean differences (n = seeds: the seeds as a sample of training runs);
  * BC - random (paired), the imagined vs real return from the same real starts;
  * from training: the share of states with R - v >= 0 before centring (critic lag), entropy.

Choose hyper-parameters with seeds / --eval-seed values that are not the ones reported.
Prints a markdown table and writes OUT/agent_<tag>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from flax import nnx

from dreamer4.config import load_config
from dreamer4.data.env import make_env
from dreamer4.policy.evaluate import (
    agent_act,
    imagined_returns,
    imagined_vs_real,
    make_player,
    mean_ci,
    play_episodes,
    random_act,
    summarize,
)
from dreamer4.policy.train import train_imagine
from dreamer4.runtime.jax_setup import enable_compilation_cache
from dreamer4.runtime.loading import load_agent
from dreamer4.runtime.stage import StageDir

_KEYS = ("returns", "achieved", "lengths", "rewards")


def _link_world(run: Path, dst: Path) -> None:
    """dst gets the run's frozen parts (tokenizer, dynamics, BC phase) as links: only agent/ is new."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer", "dynamics", "agent_bc"):
        link = dst / name
        if not link.exists():
            link.symlink_to((run / name).resolve(), target_is_directory=True)


def _curve_stats(metrics_path: Path) -> dict:
    rows = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "raw_adv_pos_frac" in r]
    if not rows:
        return {}
    pos = [r["raw_adv_pos_frac"] for r in rows]
    return {
        "raw_adv_pos_frac_first": pos[0],
        "raw_adv_pos_frac_last": pos[-1],
        "raw_adv_pos_frac_mean": float(np.mean(pos)),
        "entropy_first": rows[0]["entropy"],
        "entropy_last": rows[-1]["entropy"],
        "value_mean_last": rows[-1]["value_mean"],
        "return_mean_last": rows[-1]["return_mean"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--config", required=True, type=Path)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--data", type=Path, help="dataset (default: the one the BC phase trained on)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--episodes", type=int, default=256)
    ap.add_argument("--eval-seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--tag", default="default")
    args = ap.parse_args()
    enable_compilation_cache()

    run = args.run
    bc_agent, wcfg, facts = load_agent(run, "agent_bc")
    data = args.data or Path(facts["data"])
    out = args.out or run / "bench_agent" / args.tag
    seeds = [int(s) for s in args.seeds.split(",")]
    base = load_config(args.config, args.set)
    ac = base.agent
    E, N = args.episodes, min(ac.eval_envs, args.episodes)
    env, params, spec = make_env(base.env.name)
    max_return = float(len(spec.achievement_names))
    t0 = time.time()

    # one compiled player for every agent (same graph; the weights are an argument)
    player = make_player(
        env,
        params,
        agent_act(nnx.graphdef(bc_agent), ac.eval_max_steps, wcfg.dynamics.context_tau),
        N,
        ac.eval_max_steps,
        context=ac.context_len,
    )
    rand_player = make_player(env, params, random_act(spec.num_actions), N, ac.eval_max_steps, context=ac.context_len)
    # BC and random depend only on the run and the eval seed: played once, cached beside the tags.
    cache = out.parent / f"baselines_E{E}_T{ac.eval_max_steps}_seed{args.eval_seed}.npz"
    if cache.exists():
        z = np.load(cache)
        bc, rnd = ({k: z[f"{p}_{k}"] for k in _KEYS} for p in ("bc", "random"))
    else:
        print(f"[agent bench] BC and random: {E} episodes each (eval seed {args.eval_seed})", flush=True)
        bc = play_episodes(player, nnx.state(bc_agent), E, N, args.eval_seed)
        rnd = play_episodes(rand_player, None, E, N, args.eval_seed)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, **{f"{p}_{k}": d[k] for p, d in (("bc", bc), ("random", rnd)) for k in _KEYS})
    res = {
        "run": str(run),
        "config": str(args.config),
        "overrides": args.set,
        "episodes": E,
        "max_steps": ac.eval_max_steps,
        "eval_seed": args.eval_seed,
        "bc": summarize(bc["returns"], bc["achieved"], bc["lengths"], spec.achievement_names, max_return),
        "random": summarize(rnd["returns"], rnd["achieved"], rnd["lengths"], spec.achievement_names, max_return),
        "bc_minus_random": mean_ci(bc["returns"] - rnd["returns"]),
        "seeds": {},
    }
    diffs, returns = [], []
    for s in seeds:
        rd = out / f"seed{s}"
        _link_world(run, rd)
        cfg = load_config(args.config, [*args.set, f"seed={s}"])
        if not StageDir(rd, "agent").is_complete(cfg):
            print(f"[agent bench] seed {s}: imagination training -> {rd / 'agent'}", flush=True)
            train_imagine(cfg, data, rd)
        agent, _, _ = load_agent(rd, "agent")
        played = rd / f"played_E{E}_T{ac.eval_max_steps}_seed{args.eval_seed}.npz"
        if played.exists():  # deterministic for a given checkpoint and eval seed
            z = np.load(played)
            im = {k: z[k] for k in z.files}
        else:
            print(f"[agent bench] seed {s}: {E} real episodes", flush=True)
            im = play_episodes(player, nnx.state(agent), E, N, args.eval_seed)
            np.savez(played, **{k: im[k] for k in (*_KEYS, "context_frames", "context_actions")})
        returns.append(im["returns"])
        d = im["returns"] - bc["returns"]
        diffs.append(d)
        starts = np.flatnonzero(im["lengths"] >= ac.context_len)[: ac.eval_imagine]
        H, C = ac.horizon, ac.context_len
        imagined, _ = imagined_returns(
            agent, im["context_frames"][starts], im["context_actions"][starts], H, wcfg.dynamics.sampling, cfg, s
        )
        real_h = im["rewards"][starts, C - 1 : C - 1 + H].sum(1)
        res["seeds"][str(s)] = {
            "imagine": summarize(im["returns"], im["achieved"], im["lengths"], spec.achievement_names, max_return),
            "imagine_minus_bc": mean_ci(d),
            "imagined_vs_real": imagined_vs_real(imagined, real_h),
            "training": _curve_stats(rd / "agent" / "metrics.jsonl"),
        }
    all_d = np.concatenate(diffs)
    per_seed = [float(d.mean()) for d in diffs]
    res["pooled"] = {
        # every seed's episodes as separate pairs (the BC episodes are reused per seed: optimistic)
        "imagine_minus_bc_episodes": mean_ci(all_d),
        # per starting world: the seeds' mean return minus BC's (seeds as fixed effects)
        "imagine_minus_bc_worlds": mean_ci(np.mean(returns, 0) - bc["returns"]),
        # per seed: the seeds as a sample of training runs (n = seeds; wide for few seeds)
        "imagine_minus_bc_over_seeds": mean_ci(per_seed),
        "imagine_return_mean": float(np.mean([r["imagine"]["return_mean"] for r in res["seeds"].values()])),
        "imagine_return_seed_std": float(np.std([r["imagine"]["return_mean"] for r in res["seeds"].values()])),
    }
    res["wall_s"] = time.time() - t0
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"agent_{args.tag}.json"
    path.write_text(json.dumps(res, indent=1))
    print(table(res))
    print(f"written {path}")


def _ci(c) -> str:
    return f"{c['mean']:+.3f} [{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}]"


def table(res: dict) -> str:
    lines = [
        f"Real game, {res['episodes']} episodes per policy (cut at {res['max_steps']} steps), eval seed "
        f"{res['eval_seed']}; overrides {res['overrides']}",
        "",
        "| policy | return [95% CI] | imagine - BC (paired) | imagined vs real (H steps) | R-v>=0 share first->last | entropy first->last |",
        "|---|---|---|---|---|---|",
        f"| BC | {res['bc']['return_mean']:.3f} [{res['bc']['return_ci95'][0]:.2f}, {res['bc']['return_ci95'][1]:.2f}] | | | | |",
        f"| random | {res['random']['return_mean']:.3f} [{res['random']['return_ci95'][0]:.2f}, {res['random']['return_ci95'][1]:.2f}] | | | | |",
    ]
    for s, r in res["seeds"].items():
        im, tr, iv = r["imagine"], r["training"], r["imagined_vs_real"]
        lines.append(
            f"| imagine seed {s} | {im['return_mean']:.3f} [{im['return_ci95'][0]:.2f}, {im['return_ci95'][1]:.2f}] "
            f"| {_ci(r['imagine_minus_bc'])} | {iv['imagined_return_mean']:.3f} vs {iv['real_return_mean']:.3f} "
            f"(r={iv['correlation']:.2f}) | {tr.get('raw_adv_pos_frac_first', float('nan')):.2f} -> "
            f"{tr.get('raw_adv_pos_frac_last', float('nan')):.2f} | {tr.get('entropy_first', float('nan')):.2f} -> "
            f"{tr.get('entropy_last', float('nan')):.2f} |"
        )
    p = res["pooled"]
    lines += [
        "",
        f"BC - random (paired): {_ci(res['bc_minus_random'])}",
        f"Pooled imagine - BC over all episodes of all seeds: {_ci(p['imagine_minus_bc_episodes'])}",
        f"Pooled imagine - BC per starting world (seed-mean return - BC): {_ci(p['imagine_minus_bc_worlds'])}",
        f"Pooled imagine - BC, t-interval over the {len(res['seeds'])} per-seed means: {_ci(p['imagine_minus_bc_over_seeds'])}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
