"""How well does a BC policy predict the next action at the signal level it acts at?

    python benchmarks/bc_probe.py --run RUN [--run RUN2 ...] [--stage agent_bc] [--n 512] [--context 8]
        [--out FILE.json]

On held-out windows (the eval split, whose actions the dataset keeps; dynamics/grounding.py's
eval_transitions): C + 1 real frames are encoded, corrupted to a signal level tau (every row),
passed with their actions through the agent, and the policy's distance-1 head at row t predicts
the action into row t + 1 (rows 0..C-1). Reported per tau (the acting level
`dynamics.context_tau`, 0.5, and pure noise 0.0): next-action accuracy, NLL (nats), and the
baselines "copy the previous action" and the uniform NLL ln(A). A head trained on frames at random
noise levels (agent.head_signal = train) but acting at tau_ctx reads inputs unlike its training
ones; this shows what that costs. Paired across runs: the same windows and the same noise.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreamer4.dynamics.grounding import eval_transitions, wilson_interval
from dreamer4.dynamics.shortcut import corrupt
from dreamer4.runtime.jax_setup import enable_compilation_cache
from dreamer4.runtime.loading import load_agent
from dreamer4.runtime.stage import StageDir, open_dataset


def probe(agent, frames_NTHWC, actions_NT, tau: float, key, batch: int = 64) -> dict:
    """Accuracy / NLL of the distance-1 policy head at signal level tau, over rows 0..T-2."""
    k_max = agent.dynamics.cfg.k_max

    @nnx.jit
    def logits_of(agent, frames, actions, key):
        z = agent.world.latents(frames)
        B, T = actions.shape
        tau_BT = jnp.full((B, T), tau, jnp.float32)
        zc = corrupt(z, jax.random.normal(key, z.shape), tau_BT)
        d = jnp.full((B, T), 1.0 / k_max, jnp.float32)
        _, h = agent(zc, tau_BT, d, actions, jnp.ones((B, T), bool), jnp.zeros((B, T), jnp.int32))
        return jax.nn.log_softmax(agent.policy_logits(h[:, :-1]), -1)

    hits, nll = [], []
    for i in range(0, len(actions_NT), batch):
        f, a = jnp.asarray(frames_NTHWC[i : i + batch]), jnp.asarray(actions_NT[i : i + batch])
        logp = np.asarray(logits_of(agent, f, a, jax.random.fold_in(key, i)))
        tgt = np.asarray(a[:, 1:])
        hits.append(logp.argmax(-1) == tgt)
        nll.append(-np.take_along_axis(logp, tgt[..., None], -1)[..., 0])
    hits, nll = np.concatenate(hits).ravel(), np.concatenate(nll).ravel()
    return {
        "accuracy": float(hits.mean()),
        "accuracy_ci95": list(wilson_interval(float(hits.sum()), hits.size)),
        "nll": float(nll.mean()),
        "n": int(hits.size),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", required=True, type=Path)
    ap.add_argument("--stage", default="agent_bc")
    ap.add_argument("--n", type=int, default=512, help="held-out windows")
    ap.add_argument("--context", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    enable_compilation_cache()

    res = {"runs": {}}
    trans = None
    for run in args.run:
        agent, wcfg, facts = load_agent(run, args.stage)
        if trans is None:  # the same windows for every run
            cfg = StageDir(run, args.stage).trained_config()
            ds = open_dataset(facts["data"], cfg)
            trans = eval_transitions(ds, args.context, args.n, args.seed)
            a = trans.actions
            res["copy_previous_action"] = float((a[:, 1:-1] == a[:, 2:]).mean())  # rows whose previous is in view
            res["uniform_nll"] = math.log(facts["num_actions"])
            res["windows"] = int(len(a))
        taus = (wcfg.dynamics.context_tau, 0.5, 0.0)
        res["runs"][str(run)] = {
            f"tau={t:g}": probe(agent, trans.frames, trans.actions, t, jax.random.PRNGKey(args.seed)) for t in taus
        }
    lines = [
        f"Next-action prediction of the {args.stage} policy on {res['windows']} held-out windows of "
        f"{args.context + 1} rows; copy-previous-action accuracy {res['copy_previous_action']:.3f}, "
        f"uniform NLL {res['uniform_nll']:.3f}",
        "",
        "| run | signal level | accuracy [95% CI] | NLL |",
        "|---|---|---|---|",
    ]
    for run, r in res["runs"].items():
        for t, p in r.items():
            lo, hi = p["accuracy_ci95"]
            lines.append(f"| {run} | {t} | {p['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | {p['nll']:.3f} |")
    print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
        print(f"written {args.out}")


if __name__ == "__main__":
    main()
