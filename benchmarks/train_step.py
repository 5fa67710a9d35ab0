"""Training-step benchmark: step time, tokens/s and model FLOPs utilisation (MFU).

    python benchmarks/train_step.py --stage tokenizer|dynamics [--config configs/classic.yaml] [--batch 64] [--seq-len 16]

Dynamics FLOPs count the trained forward+backward (6N per token), the two half-step forwards of
the bootstrap target (4N) and, with `dynamics.latent_cache: false` only, the frozen tokenizer's
encoder forward (2N); with the cache (the default) the step is fed latents, as in training.

Uses the real compiled train step of the shared runtime (runtime/train_loop.py) on random uint8
frames of the preset's frame size. FLOPs per step = 6 x (matmul parameters x the tokens that pass
through them) + attention (3 x 4 x queries x keys x width per layer, causal time layers counted
at half), over the device's peak dense bf16 rate. On CPU only the step time is meaningful; MFU is
reported only for GPUs with a known peak. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from dreamer4.config import load_config
from dreamer4.nn.module_jit import module_jit
from dreamer4.runtime.jax_setup import enable_compilation_cache
from dreamer4.runtime.loading import TRAINABLE, build_dynamics, build_tokenizer
from dreamer4.runtime.mesh import global_batch, make_mesh
from dreamer4.runtime.train_loop import compile_train_step, place_train_state

# Dense bf16 peak FLOP/s (no sparsity) by device kind substring.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "TPU v5p": 459e12, "TPU v4": 275e12}
FRAME_SHAPES = {"classic": (63, 63, 3), "full": (130, 110, 3)}


def peak_flops(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    for k, v in PEAK_BF16.items():
        if k.lower() in kind.lower():
            return v
    return None


def _matmul_params(module) -> int:
    """Parameters of the 2-D weight matrices (each costs 6 FLOPs per token in training)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)) if x.ndim == 2)


def _attention_flops(transformer, B, T, S, D) -> float:
    f = 0.0
    for kind in transformer.kinds:
        if kind == "space":
            f += 4.0 * S * S * D * B * T
        else:
            f += 4.0 * T * T * D * B * S / 2  # causal
    return 3.0 * f  # forward + backward


def tokenizer_case(cfg, batch, seq_len):
    from dreamer4.tokenizer.train import tokenizer_loss

    shape = FRAME_SHAPES[cfg.env.name]
    model = build_tokenizer(cfg, shape)
    tc = cfg.tokenizer
    P, L, D = model.num_patches, tc.num_latents, tc.width
    S = P + L
    frames = B_T = batch * seq_len
    X = tc.patch_size**2 * shape[2]
    dense = 6.0 * (_matmul_params(model.encoder) + _matmul_params(model.decoder)) * B_T * S
    dense += 6.0 * (2 * X * D * B_T * P + 2 * tc.latent_dim * D * B_T * L)
    attn = _attention_flops(model.encoder, batch, seq_len, S, D) + _attention_flops(model.decoder, batch, seq_len, S, D)
    rng = np.random.default_rng(0)
    data = {"frames": rng.integers(0, 256, (batch, seq_len) + shape, dtype=np.uint8)}
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return model, tokenizer_loss, data, dense + attn, 2 * B_T * S, n_params, frames


def dynamics_case(cfg, batch, seq_len):
    from dreamer4.dynamics.model import WorldModel, encode_frames
    from dreamer4.dynamics.train import make_dynamics_loss

    shape = FRAME_SHAPES[cfg.env.name]
    tok = build_tokenizer(cfg, shape)
    dyn = build_dynamics(cfg, cfg, 17, latent_grid=tok.latent_grid)
    world = WorldModel(tok, dyn)
    dc, tc = cfg.dynamics, cfg.tokenizer
    S = dyn.num_tokens
    n_img = int(round(batch * dc.single_image_share))
    B_T = batch * seq_len
    n_dyn = _matmul_params(dyn)
    # one trained forward+backward (6N) and two half-step forwards for the bootstrap target (4N)
    dense = 10.0 * n_dyn * B_T * S
    attn_seq = _attention_flops(dyn.transformer, batch - n_img, seq_len, S, dc.width)
    attn_img = _attention_flops(dyn.transformer, n_img * seq_len, 1, S, dc.width)
    attn = (attn_seq + attn_img) * 10.0 / 6.0
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (batch, seq_len) + shape, dtype=np.uint8)
    if dc.latent_cache:  # the step reads cached latents (dynamics/latent_cache.py): no encoder in it
        z = jax.eval_shape(lambda f: encode_frames(tok, f), jax.ShapeDtypeStruct(frames.shape, np.uint8))
        seen = {"latents": rng.uniform(-1, 1, z.shape).astype(z.dtype)}
    else:  # the frozen tokenizer's encoder forward on the frames, inside the step
        dense += 2.0 * _matmul_params(tok.encoder) * B_T * (tok.num_patches + tc.num_latents)
        seen = {"frames": frames}
    data = {
        **seen,
        "actions": rng.integers(0, 17, (batch, seq_len)).astype(np.int32),
        "action_mask": rng.random((batch, seq_len)) < 0.1,
    }
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(dyn, nnx.Param)))
    return world, make_dynamics_loss(cfg), data, dense + attn, B_T * S, n_params, B_T


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", choices=["tokenizer", "dynamics"], default="tokenizer")
    ap.add_argument("--config", default="configs/classic.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--batch", type=int, default=None, help="global batch (default: the preset's)")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument(
        "--encoder-share",
        action="store_true",
        help="dynamics: also time the frozen tokenizer's encoder forward alone on the same frames "
        "(what precomputed latents would save)",
    )
    ap.add_argument("--json", default="bench_out/train_step.json")
    args = ap.parse_args()
    enable_compilation_cache()
    cfg = load_config(args.config, args.overrides)
    tc = cfg.tokenizer.train if args.stage == "tokenizer" else cfg.dynamics.train
    batch, seq_len = args.batch or tc.batch_size, args.seq_len or tc.seq_len
    case = tokenizer_case if args.stage == "tokenizer" else dynamics_case
    model, loss_fn, data, flops, tokens, n_params, frames = case(cfg, batch, seq_len)
    trainable = nnx.Param
    if args.stage == "dynamics":
        trainable = TRAINABLE["dynamics"]
    encoder_s = None
    if args.encoder_share and args.stage == "dynamics" and "frames" not in data:
        ap.error("--encoder-share times the encoder the step runs: add --set dynamics.latent_cache=false")
    if args.encoder_share and args.stage == "dynamics":  # before the step donates the model's arrays
        encode = module_jit(lambda world, f: world.latents(f))
        frames_dev = jax.device_put(data["frames"])
        jax.block_until_ready(encode(model, frames_dev))  # compile
        t0 = time.time()
        for _ in range(args.steps):
            z = encode(model, frames_dev)
        jax.block_until_ready(z)
        encoder_s = (time.time() - t0) / args.steps
    mesh = make_mesh(cfg.runtime.fsdp)
    graphdef, state, shardings = place_train_state(model, tc, mesh, trainable)
    step = compile_train_step(graphdef, loss_fn, shardings, mesh, trainable)
    gb = global_batch(mesh, data)
    key = jax.random.PRNGKey(0)
    t0 = time.time()
    state, m = step(state, gb, key)
    jax.block_until_ready(m)
    compile_s = time.time() - t0
    for _ in range(2):
        state, m = step(state, gb, key)
    jax.block_until_ready(m)
    t0 = time.time()
    for i in range(args.steps):
        state, m = step(state, gb, jax.random.fold_in(key, i))
    jax.block_until_ready(m)
    dt = (time.time() - t0) / args.steps
    dev = jax.devices()[0]
    peak = peak_flops(dev)
    n_dev = len(jax.devices())
    res = {
        "stage": args.stage,
        "config": args.config,
        "overrides": args.overrides,
        "device": dev.device_kind,
        "num_devices": n_dev,
        "precision": tc.precision,
        "batch": batch,
        "seq_len": seq_len,
        "params": n_params,
        "step_s": dt,
        "compile_s": compile_s,
        "frames_per_s": frames / dt,
        "tokens_per_s": tokens / dt,
        "model_flops_per_step": flops,
        "achieved_tflops": flops / dt / 1e12,
        "mfu": (flops / dt / (peak * n_dev)) if peak else None,
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.stage == "dynamics":
        res["latent_cache"] = cfg.dynamics.latent_cache
    if encoder_s is not None:
        res["frozen_encoder_forward_s"] = encoder_s
        res["frozen_encoder_share_of_step"] = encoder_s / dt
    print(
        f"\n{'stage':12} {'device':22} {'params':>10} {'batch':>9} {'step ms':>9} {'frames/s':>10} "
        f"{'tokens/s':>11} {'TFLOP/s':>8} {'MFU':>6}"
    )
    mfu = f"{res['mfu']:.1%}" if res["mfu"] is not None else "n/a"
    print(
        f"{args.stage:12} {dev.device_kind[:22]:22} {n_params / 1e6:>9.1f}M {batch:>4}x{seq_len:<4} "
        f"{dt * 1e3:>9.1f} {res['frames_per_s']:>10.0f} {res['tokens_per_s']:>11.0f} "
        f"{res['achieved_tflops']:>8.2f} {mfu:>6}"
    )
    if encoder_s is not None:
        print(f"frozen encoder forward alone: {encoder_s * 1e3:.1f} ms = {encoder_s / dt:.1%} of the step")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
