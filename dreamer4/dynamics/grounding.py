"""Action grounding of the world model: paired one-step probes on held-out transitions.

Shape key: N transitions, C context steps, A candidate actions, L latents, W latent width,
H/W'/3 pixels (frames are floats in [0, 1] here).

For each held-out transition (C real context frames with their actions, then frame_t reached by
action_t) the model generates frame_t once per candidate action, from the SAME noise and the
same context, so that the candidates differ only in the action. Every decoded frame (generated,
tokenized copy, tokenizer ceiling) is decoded after the same C context latents, as imagination
decodes its stream (the tokenizer's decoder attends over time).

* identification: the share of transitions where the true action's decoded frame is the nearest
  candidate (pixel MSE) to the real frame_t. On movement transitions (true action in
  left/right/up/down and the real view moved by it, see `view_shifted`) the candidates are the five movement actions
  (noop, left, right, up, down): chance is 1/5. Ties (a model that ignores actions produces
  identical frames) give each tied candidate an equal share of the credit, so an action-blind
  model scores chance exactly, never 100%.
* paired gap: PSNR(true action) - PSNR(other action), per transition averaged over the other
  candidates, with a paired-bootstrap 95% CI over transitions.
* one-step prediction against copying the last frame: generated-latent MSE, decoded pixel MSE
  and decoded PSNR vs the copy-last-frame baseline on the same transitions (paired CI). The mean
  of per-frame PSNRs favours copying wherever little changed (a copy is exact there, a decoded
  frame is capped by the tokenizer); the pixel MSE weighs every transition by its error.
* teacher-forced next-latent error: one pass at tau = 0 (pure noise) with d = d_min against the
  context, true action vs the other candidates.

The metric functions at the top are pure numpy; `probe` runs a world model.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from dreamer4.data.store import Dataset, DatasetError
from dreamer4.dynamics.sampler import context_inputs, generate_step, prefill_context
from dreamer4.runtime.images import psnr, psnr_from_mse

# Craftax (Classic and full) action ids: 0 noop, 1 left, 2 right, 3 up, 4 down.
MOVE_CANDIDATES = (0, 1, 2, 3, 4)
MOVES = (1, 2, 3, 4)
MOVE_NAMES = {0: "noop", 1: "left", 2: "right", 3: "up", 4: "down"}


# ----------------------------------------------------------------------------- statistics


def wilson_interval(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion k/n (k may be fractional after tie credit).

    centre = (p + z^2/2n) / (1 + z^2/n),  half = z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n).
    """
    if n <= 0:
        return (float("nan"), float("nan"))
    p = k / n
    den = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (float(centre - half), float(centre + half))


def bootstrap_ci(x_N, n_boot: int = 4000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean of x_N and its percentile-bootstrap CI (resampling the N entries).

    For a paired difference pass x_N = a_N - b_N: resampling transitions keeps the pairs together.
    """
    x = np.asarray(x_N, np.float64)
    if x.size == 0:
        return (float("nan"), float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    a = (1.0 - level) / 2.0
    return (float(x.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1.0 - a)))


def tie_credit(err_NA, atol: float = 0.0) -> np.ndarray:
    """Credit of each candidate for being nearest: 1/|ties| for the minimisers of err_NA[n] (within
    atol of the minimum), else 0; every row sums to 1. Shape (N, A)."""
    err = np.asarray(err_NA, np.float64)
    is_min = err <= err.min(axis=1, keepdims=True) + atol
    return is_min / is_min.sum(axis=1, keepdims=True)


def nearest_credit(err_NA, true_col_N, atol: float = 0.0) -> np.ndarray:
    """Credit per transition for the true candidate being nearest (`tie_credit` of its column). Shape (N,)."""
    credit = tie_credit(err_NA, atol)
    return credit[np.arange(credit.shape[0]), np.asarray(true_col_N)]


def identification(err_NA, true_col_N, chance_N=None) -> dict:
    """Identification accuracy with tie credit, its Wilson 95% CI and the chance level."""
    credit = nearest_credit(err_NA, true_col_N)
    n = credit.size
    chance = float(np.mean(chance_N)) if chance_N is not None else 1.0 / np.asarray(err_NA).shape[1]
    lo, hi = wilson_interval(credit.sum(), n)
    return {"accuracy": float(credit.mean()) if n else float("nan"), "ci95": [lo, hi], "n": int(n), "chance": chance}


# ----------------------------------------------------------------------------- transitions


@dataclass
class Transitions:
    """N held-out transitions: frames_NC1HWC (C context frames + the target, uint8), actions_NC1."""

    frames: np.ndarray
    actions: np.ndarray

    def __len__(self) -> int:
        return self.frames.shape[0]


def eval_transitions(ds: Dataset, context: int, max_n: int = 2048, seed: int = 0) -> Transitions:
    """Up to max_n transitions (C + 1 consecutive rows ending at a target row t >= 1) from the eval
    split of `ds`, which keeps its actions. Sampled without replacement, in a seeded order."""
    eps = [e for e in ds.split("eval") if e.length >= context + 2]
    if not eps:
        raise DatasetError(
            f"dataset {ds.root} has no eval episode longer than {context + 1} steps "
            f"(the grounding probe needs {context} context frames and a target)"
        )
    index = [(i, t) for i, e in enumerate(eps) for t in range(max(context, 1), e.length)]
    rng = np.random.default_rng(seed)
    pick = rng.permutation(len(index))[:max_n]
    frames, actions = [], []
    cache = {}
    for j in sorted(pick):
        i, t = index[j]
        if i not in cache:
            cache[i] = ds.read(eps[i], 0, eps[i].length, ("frame", "action"))
        rows = cache[i]
        frames.append(rows["frame"][t - context : t + 1])
        actions.append(rows["action"][t - context : t + 1])
    return Transitions(np.stack(frames), np.stack(actions).astype(np.int32))


def view_shifted(
    prev_uint8_NHWC, next_uint8_NHWC, map_rows: float = 7 / 9, level: int = 24, share: float = 0.08
) -> np.ndarray:
    """(N,) bool: the map view moved between the two frames.

    Craftax frames change at every step (daylight, the status bar, the player sprite turning), so
    "any pixel differs" is always true. A move that shifts the view by one tile changes most of the
    map area (the top 7 of 9 tile rows in Classic) by a large amount; a blocked move or a noop
    changes a few pixels. On the tiny random-policy eval split, the share of map pixels changing by
    more than 24 levels is <= 0.03 for 90% of noops and >= 0.1 for ~70% of moves, so 0.08 separates them.
    """
    a = np.asarray(prev_uint8_NHWC, np.int16)
    b = np.asarray(next_uint8_NHWC, np.int16)
    rows = max(1, int(round(a.shape[1] * map_rows)))
    big = np.abs(a[:, :rows] - b[:, :rows]).max(axis=-1) > level
    return big.mean(axis=(1, 2)) > share


def shift_latents(z_NLN, actions_N, grid, map_rows: int = 7):
    """The last latents moved one tile the way each move shifts the view (content moves opposite to
    the player: left -> content one column right); rows >= map_rows (the inventory) and the revealed
    strip keep the copy. Actions 1-4 = left, right, up, down; others are copied."""
    R, C = grid
    g = np.asarray(z_NLN).reshape(len(z_NLN), R, C, -1)
    out = g.copy()
    M = map_rows
    for i, a in enumerate(np.asarray(actions_N)):
        m = g[i, :M]
        if a == 1:
            out[i, :M, 1:] = m[:, :-1]
        elif a == 2:
            out[i, :M, :-1] = m[:, 1:]
        elif a == 3:
            out[i, 1:M] = m[: M - 1]
        elif a == 4:
            out[i, : M - 1] = m[1:M]
    return out.reshape(np.shape(z_NLN))


def action_scores(
    gen_NA1HWC, real_NHWC, prev_uint8_NHWC, next_uint8_NHWC, true_a_N, candidates=MOVE_CANDIDATES
) -> dict:
    """Identification and paired-gap scores from frames generated under each candidate action.

    gen_NA1HWC: for each transition, the frame generated under each of the A candidates, then
    under the true action (column A; equal to its candidate column when the true action is one).
    real_NHWC: the real frame_t in [0, 1]; prev/next_uint8: the stored frame_{t-1}, frame_t (to see
    whether the view moved, see `view_shifted`). Movement identification uses transitions whose true
    action is a movement and whose view moved, over the five movement candidates; all-action
    identification uses every transition, over the candidates plus the true action when it is not
    among them. Ties share the credit (see `nearest_credit`).
    """
    cand = np.asarray(candidates, np.int32)
    A = len(cand)
    N = real_NHWC.shape[0]
    true_a = np.asarray(true_a_N)
    px_err = np.mean(
        (np.asarray(gen_NA1HWC, np.float64) - np.asarray(real_NHWC, np.float64)[:, None]) ** 2, axis=(2, 3, 4)
    )  # N, A+1
    sel = np.isin(true_a, MOVES) & view_shifted(prev_uint8_NHWC, next_uint8_NHWC)
    true_col = np.array([int(np.flatnonzero(cand == a)[0]) if a in cand else A for a in true_a], np.int64)
    ident_move = identification(px_err[sel][:, :A], true_col[sel])
    # which candidate's frame is nearest on those moves, whatever the truth (ties split): a model
    # whose actions were never trained still makes the candidates differ, and one of them (often
    # noop) can win on most moves, which puts identification BELOW chance without any grounding
    share = tie_credit(px_err[sel][:, :A]).mean(axis=0) if sel.any() else np.full(A, np.nan)
    extra = np.where(true_col == A, px_err[:, A], np.inf)[:, None]
    err_all = np.concatenate([px_err[:, :A], extra], 1)
    n_cand = np.where(true_col == A, A + 1, A)
    ident_all = identification(err_all, true_col, chance_N=1.0 / n_cand)
    per_action = {
        int(a): identification(err_all[true_a == a], true_col[true_a == a], chance_N=1.0 / n_cand[true_a == a])
        for a in np.unique(true_a)
    }
    # paired gap: PSNR(true) - mean PSNR(other candidates), same noise and context
    others = np.ones((N, A), bool)
    inside = true_col < A
    others[np.flatnonzero(inside), true_col[inside]] = False
    psnr_all = np.asarray(psnr_from_mse(px_err))
    gap_N = psnr_all[np.arange(N), true_col] - (psnr_all[:, :A] * others).sum(1) / others.sum(1)
    m, lo, hi = bootstrap_ci(gap_N)
    m2, lo2, hi2 = bootstrap_ci(gap_N[sel])
    return {
        "n_transitions": int(N),
        "n_movement_changed": int(sel.sum()),
        "identification_movement": ident_move,
        "identification_all": ident_all,
        "identification_per_action": per_action,
        "nearest_share_movement": {int(a): float(v) for a, v in zip(cand, share)},
        "psnr_gap_true_minus_other_db": {"mean": m, "ci95": [lo, hi]},
        "psnr_gap_true_minus_other_db_movement": {"mean": m2, "ci95": [lo2, hi2]},
        "_sel": sel,
        "_true_col": true_col,
        "_others": others,
        "_px_err": px_err,
    }


# ----------------------------------------------------------------------------- probe


def teacher_forced_latents(dyn, z_ctx_BCLN, acts_ctx_BC, mask_ctx_BC, act_B1, noise_B1LN, key, *, context_tau: float):
    """The dynamics' x-prediction of z_t (B, L, N) in one pass: the C context steps at the context
    level tau_ctx (`context_inputs`), step t pure noise (tau = 0, d = d_min) under action act_B1
    (labeled where >= 0). Its error against the real z_t is the teacher-forced next-latent error."""
    zc, tau_c, d_c = context_inputs(z_ctx_BCLN, key, context_tau, dyn.cfg.k_max)
    B = z_ctx_BCLN.shape[0]
    z = jnp.concatenate([zc, noise_B1LN], axis=1)
    tau = jnp.concatenate([tau_c, jnp.zeros((B, 1))], axis=1)
    d = jnp.concatenate([d_c, jnp.full((B, 1), 1.0 / dyn.cfg.k_max)], axis=1)
    a = jnp.concatenate([acts_ctx_BC, act_B1], axis=1)
    m = jnp.concatenate([mask_ctx_BC, act_B1 >= 0], axis=1)
    return dyn(z, tau, d, a, m)[:, -1]


def probe(
    world, trans: Transitions, K: int, key, *, context_tau: float, batch: int = 256, candidates=MOVE_CANDIDATES
) -> dict:
    """Run the paired grounding probe; returns the metrics dict (see module doc) plus per-action rows."""
    dyn = world.dynamics
    C = trans.frames.shape[1] - 1
    N = len(trans)
    cand = np.asarray(candidates, np.int32)
    decode = jax.jit(lambda z: world.decode(z))
    encode = jax.jit(lambda f: world.latents(f))

    teacher_forced = jax.jit(partial(teacher_forced_latents, dyn, context_tau=context_tau))

    gen_err, gen_px, tf_err = [], [], []  # per candidate (+ true as the last column)
    real_px, last_px, z_true, z_last, recon_px, recon_last_px = [], [], [], [], [], []
    for s in range(0, N, batch):
        f = jnp.asarray(trans.frames[s : s + batch])
        acts = jnp.asarray(trans.actions[s : s + batch])
        B = f.shape[0]
        z = encode(f)
        z_ctx, zt = z[:, :C], z[:, C]
        a_ctx = acts[:, :C]
        m_ctx = a_ctx >= 0
        kb = jax.random.fold_in(key, s)
        k_pre, k_gen, k_tf, k_tfc = jax.random.split(kb, 4)
        noise = jax.random.normal(k_tf, zt[:, None].shape, jnp.float32)
        cols = [np.full((B,), c, np.int32) for c in cand] + [np.asarray(acts[:, C])]
        e_col, px_col, tf_col = [], [], []
        # one context prefill for every candidate; a copy each, since generation may donate its cache
        cache = prefill_context(dyn, z_ctx, a_ctx, m_ctx, k_pre, max_len=C + 1, context_tau=context_tau)
        for a in cols:
            a_B1 = jnp.asarray(a)[:, None]
            z_gen, _ = generate_step(
                dyn, jax.tree.map(jnp.copy, cache), jnp.int32(C), a_B1, a_B1 >= 0, k_gen, K=K, context_tau=context_tau
            )
            e_col.append(np.asarray(jnp.mean((z_gen[:, 0] - zt) ** 2, axis=(1, 2))))
            # decoded after the true context latents, as imagination decodes its stream: the
            # tokenizer's decoder attends over time, so a frame decoded alone is a different task
            px_col.append(np.asarray(decode(jnp.concatenate([z_ctx, z_gen], axis=1))[:, C]))
            ztf = teacher_forced(z_ctx, a_ctx, m_ctx, a_B1, noise, k_tfc)
            tf_col.append(np.asarray(jnp.mean((ztf - zt) ** 2, axis=(1, 2))))
        gen_err.append(np.stack(e_col, 1))
        gen_px.append(np.stack(px_col, 1))
        tf_err.append(np.stack(tf_col, 1))
        x = np.asarray(f, np.float32) / 255.0
        real_px.append(x[:, C])
        last_px.append(x[:, C - 1])
        z_true.append(np.asarray(zt))
        z_last.append(np.asarray(z_ctx[:, -1]))
        rec = np.asarray(decode(z))  # the same context as the generated frames (causal: rec[C-1] ignores z_C)
        recon_last_px.append(rec[:, C - 1])
        recon_px.append(rec[:, C])
    gen_err, gen_px, tf_err = (np.concatenate(v) for v in (gen_err, gen_px, tf_err))
    real, last = np.concatenate(real_px), np.concatenate(last_px)
    zt_all, zl_all = np.concatenate(z_true), np.concatenate(z_last)
    rec_t, rec_last = np.concatenate(recon_px), np.concatenate(recon_last_px)
    true_a = trans.actions[:, C]
    A = len(cand)

    scores = action_scores(gen_px, real, trans.frames[:, C - 1], trans.frames[:, C], true_a, cand)
    sel, true_col, others = scores.pop("_sel"), scores.pop("_true_col"), scores.pop("_others")
    # Pixel MSE per transition: its mean is what PSNR-of-the-mean (10 log10(1 / mean MSE)) reports.
    # The mean of per-frame PSNRs is dominated by near-exact copies (copy-last reaches 40-100 dB on
    # frames where little changed; any decoded frame is capped near the tokenizer's ceiling).
    mse_gen = scores.pop("_px_err")[:, A]  # the true action's column
    mse_copy = np.mean((last - real) ** 2, axis=(1, 2, 3))
    psnr_gen = np.asarray(psnr_from_mse(mse_gen))
    psnr_copy = np.asarray(psnr_from_mse(mse_copy))
    psnr_copy_tok = np.asarray(psnr(rec_last, real))
    lat_gen = gen_err[:, A]
    lat_copy = np.mean((zl_all - zt_all) ** 2, axis=(1, 2))
    lat_mean = np.mean((zt_all - zt_all.mean(0, keepdims=True)) ** 2, axis=(1, 2))

    tf_true = tf_err[np.arange(N), true_col]
    tf_other = (tf_err[:, :A] * others).sum(1) / others.sum(1)

    def ci(x):
        m, lo, hi = bootstrap_ci(x)
        return {"mean": m, "ci95": [lo, hi]}

    return {
        "K": K,
        "context": int(C),
        **scores,
        "teacher_forced_latent_mse_true": ci(tf_true),
        "teacher_forced_latent_mse_other": ci(tf_other),
        "teacher_forced_latent_mse_true_minus_other": ci(tf_true - tf_other),
        "latent_mse_generated": ci(lat_gen),
        "latent_mse_copy_last": ci(lat_copy),
        "latent_mse_batch_mean": ci(lat_mean),
        "latent_mse_generated_minus_copy": ci(lat_gen - lat_copy),
        # where the view moved (the action decides the frame) and where it did not (copying wins)
        "latent_mse_generated_minus_copy_movement": ci(lat_gen[sel] - lat_copy[sel]),
        "latent_mse_generated_minus_copy_still": ci(lat_gen[~sel] - lat_copy[~sel]),
        "psnr_generated": ci(psnr_gen),
        "psnr_copy_last_frame": ci(psnr_copy),
        "psnr_copy_last_tokenized": ci(psnr_copy_tok),
        "psnr_tokenizer_ceiling": ci(np.asarray(psnr(rec_t, real))),
        "psnr_generated_minus_copy": ci(psnr_gen - psnr_copy),
        "psnr_generated_minus_copy_movement": ci(psnr_gen[sel] - psnr_copy[sel]),
        "pixel_mse_generated": ci(mse_gen),
        "pixel_mse_copy_last_frame": ci(mse_copy),
        "pixel_mse_generated_minus_copy": ci(mse_gen - mse_copy),
        "pixel_mse_generated_minus_copy_movement": ci(mse_gen[sel] - mse_copy[sel]),
        "pixel_mse_generated_minus_copy_still": ci(mse_gen[~sel] - mse_copy[~sel]),
        "psnr_of_mean_mse_generated": float(psnr_from_mse(mse_gen.mean())),
        "psnr_of_mean_mse_copy_last_frame": float(psnr_from_mse(mse_copy.mean())),
    }


def summary_lines(r: dict, action_names=None) -> list[str]:
    """Human-readable lines of a probe result."""

    def f(m):
        return f"{m['mean']:.4g} [{m['ci95'][0]:.4g}, {m['ci95'][1]:.4g}]"

    im = r["identification_movement"]
    ia = r["identification_all"]
    return [
        f"K={r['K']}: {r['n_transitions']} held-out transitions, {r['n_movement_changed']} movement with a view change",
        f"movement identification {im['accuracy']:.1%} (95% CI {im['ci95'][0]:.1%}-{im['ci95'][1]:.1%}, "
        f"chance {im['chance']:.0%})",
        f"all-action identification {ia['accuracy']:.1%} (95% CI {ia['ci95'][0]:.1%}-{ia['ci95'][1]:.1%}, "
        f"chance {ia['chance']:.1%})",
        "on those moves, share where each candidate's frame is nearest: "
        + ", ".join(f"{MOVE_NAMES.get(int(a), a)} {v:.0%}" for a, v in r.get("nearest_share_movement", {}).items()),
        f"paired PSNR gap true - other: {f(r['psnr_gap_true_minus_other_db'])} dB; on movement "
        f"{f(r['psnr_gap_true_minus_other_db_movement'])} dB",
        f"next-frame latent MSE: generated {f(r['latent_mse_generated'])}, copy-last {f(r['latent_mse_copy_last'])}, "
        f"batch mean {f(r['latent_mse_batch_mean'])}; generated - copy {f(r['latent_mse_generated_minus_copy'])} "
        f"(view moved {f(r['latent_mse_generated_minus_copy_movement'])}, "
        f"not {f(r['latent_mse_generated_minus_copy_still'])})",
        f"next-frame PSNR: generated {f(r['psnr_generated'])}, copy-last frame {f(r['psnr_copy_last_frame'])}, "
        f"copy-last tokenized {f(r['psnr_copy_last_tokenized'])}, tokenizer ceiling {f(r['psnr_tokenizer_ceiling'])}; "
        f"generated - copy {f(r['psnr_generated_minus_copy'])} dB",
        f"next-frame pixel MSE: generated {f(r['pixel_mse_generated'])}, copy-last frame "
        f"{f(r['pixel_mse_copy_last_frame'])}; generated - copy {f(r['pixel_mse_generated_minus_copy'])} "
        f"(view moved {f(r['pixel_mse_generated_minus_copy_movement'])}, not "
        f"{f(r['pixel_mse_generated_minus_copy_still'])}); PSNR of the mean MSE: generated "
        f"{r['psnr_of_mean_mse_generated']:.2f} dB, copy-last {r['psnr_of_mean_mse_copy_last_frame']:.2f} dB",
        f"teacher-forced latent MSE: true {f(r['teacher_forced_latent_mse_true'])}, other "
        f"{f(r['teacher_forced_latent_mse_other'])}",
    ]
