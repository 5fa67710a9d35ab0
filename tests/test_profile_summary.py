"""benchmarks/profile_summary.py: the breakdown of a step's device time that the GPU suite reports."""

import gzip

import jax
import jax.numpy as jnp
import pytest
from conftest import bench_module

ps = bench_module("profile_summary")


@pytest.mark.parametrize(
    "name, kind",
    [  # kernel names as CUDA libraries and XLA:GPU name them
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_cublas", "matmul"),
        ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "matmul"),
        ("gemm_fusion_dot_general_7", "matmul"),
        ("cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8", "matmul"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64", "attention"),
        ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", "collective"),
        ("input_reduce_fusion_12", "reduction"),
        ("loop_multiply_fusion_3", "elementwise"),
        ("wrapped_transpose_5", "copy"),
        ("loop_dynamic_update_slice_fusion", "copy"),
        ("Memcpy DtoD", "copy"),
        ("rng_bit_generator_kernel", "other"),
    ],
)
def test_categorize_names_the_kind_of_known_kernels(name, kind):
    assert ps.categorize(name) == kind


def _ev(name, start, dur, module="jit_step"):
    return {"name": name, "start_ns": float(start), "dur_ns": float(dur), "hlo_op": name, "module": module}


def test_summarize_worked_example():
    # two steps of a 10 us wall step; per step a 4 us GEMM and, overlapping it on another stream by
    # 1 us, a 2 us fusion; one tiny event of another program that must not count
    events = []
    for step in range(2):
        t = step * 10_000
        events += [_ev("nvjet_gemm", t, 4_000), _ev("loop_add_fusion", t + 3_000, 2_000)]
    events.append(_ev("fold_in", 50_000, 500, module="jit_fold_in"))
    s = ps.summarize(events, steps=2, wall_ms=0.010, model_flops=8e6)
    assert s["module"] == "jit_step"
    assert s["kernels_per_step"] == 2
    assert s["kernel_ms_per_step"] == pytest.approx(0.006)  # 4 + 2 us
    assert s["busy_ms_per_step"] == pytest.approx(0.005)  # union: [0, 4) u [3, 5) = 5 us
    assert s["idle_share"] == pytest.approx(0.5)  # 1 - 5 / 10
    assert s["span_ms_per_step"] == pytest.approx(
        0.0075
    )  # [0, 15) us over 2 steps: the last one's idle tail is not in it
    assert s["share"]["matmul"] == pytest.approx(4 / 6) and s["share"]["elementwise"] == pytest.approx(2 / 6)
    assert sum(s["share"].values()) == pytest.approx(1.0)
    assert s["matmul_tflops_if_all_model_flops"] == pytest.approx(8e6 / 4e-6 / 1e12)  # 2 TFLOP/s
    assert s["top"][0]["name"] == "nvjet_gemm" and s["top"][0]["calls_per_step"] == 1
    assert s["other_modules_ms_per_step"] == {"jit_fold_in": pytest.approx(0.00025)}
    # only the GEMM's op is known: 4 of 6 us matched, 1 of 2 kernels
    s = ps.summarize(events, steps=2, op_names={"nvjet_gemm": "jit(step_fn)/jvp(encoder)/mlp/dot_general"})
    assert s["scope_coverage"] == pytest.approx(4 / 6) and s["scope_coverage_kernels"] == pytest.approx(1 / 2)
    assert s["by_scope"] == {"forward: encoder/mlp": pytest.approx(0.004), "unmatched": pytest.approx(0.002)}
    with pytest.raises(ValueError, match="steps must be >= 1"):
        ps.summarize(events, steps=0)


def test_leaves_drop_an_event_that_encloses_others():
    outer = _ev("while.3", 0, 10)
    inner = [_ev("dot.1", 1, 3), _ev("add.2", 5, 2)]
    assert [e["name"] for e in ps.leaves([outer, *inner, _ev("copy.4", 12, 1)])] == ["dot.1", "add.2", "copy.4"]


def test_leaves_keep_kernels_that_only_overlap():
    # Hopper's programmatic dependent launch: each kernel starts 1 ns before the last one ends.
    # None contains another, so all count (the first version dropped every one but the last).
    chain = [_ev("nvjet_gemm", 0, 10), _ev("loop_add_fusion", 9, 5), _ev("nvjet_gemm", 13, 4)]
    assert [e["start_ns"] for e in ps.leaves(chain)] == [0, 9, 13]
    # a container that starts with its first child is still a container
    assert [e["name"] for e in ps.leaves([_ev("while.1", 0, 10), _ev("dot.2", 0, 4), _ev("add.3", 4, 6)])] == [
        "dot.2",
        "add.3",
    ]


def test_a_real_cpu_trace_counts_each_call_once(tmp_path):
    def body(i, x):
        return jnp.tanh(x @ x) + i

    f = jax.jit(lambda x: jax.lax.fori_loop(0, 3, body, x).sum())
    x = jnp.ones((64, 64))
    f(x).block_until_ready()
    path = ps.profile_calls(lambda i: f(x + i), 4, tmp_path)
    events, source = ps.read_events(path)
    assert source == "host-xla"  # no device plane on CPU
    gz = tmp_path / "t.xplane.pb.gz"  # the GPU suite returns its traces gzipped
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert ps.read_events(gz) == (events, source)
    s = ps.summarize(events, steps=4, wall_ms=1.0)
    assert s["kernels_per_step"] >= 2 and s["kernel_ms_per_step"] > 0
    assert not any(t["name"].startswith("while") for t in s["top"])  # the loop encloses its body: a parent
    assert s["busy_ms_per_step"] <= s["kernel_ms_per_step"] + 1e-9
    lines = s["ms_per_step_by_line"]  # the host threads that ran XLA's thunks
    assert lines and all(k.startswith("/host:CPU ") for k in lines)
    assert sum(lines.values()) == pytest.approx(s["kernel_ms_per_step"])
    assert all(t["calls_per_step"] in (1, 3) for t in s["top"])  # once per call, or once per loop trip
    assert "| " + path.name + " |" in "\n".join(ps.markdown([(path.name, s)]))


def test_scope_of_reads_phase_part_and_sublayer():
    assert ps.scope_of("jit(step_fn)/jvp(frozen_encoder)/encoder/space_attention/reduce_sum") == (
        "forward: frozen_encoder/space_attention"
    )
    assert ps.scope_of("jit(step_fn)/transpose(jvp(dynamics))/mlp/mul") == "backward: dynamics/mlp"
    assert ps.scope_of("jit(step_fn)/optimizer/mul") == "optimizer"
    assert ps.scope_of("jit(step_fn)/jvp()/jit(_threefry_split)/sample_tau_d") == "forward: other/other"


def test_kernel_time_is_split_by_the_code_named_scopes(tmp_path):
    def fn(x):
        with jax.named_scope("encoder"):
            with jax.named_scope("mlp"):
                h = jnp.tanh(x @ x)
        with jax.named_scope("optimizer"):  # a second matmul: its own kernel, not fused with the first
            return (jnp.cos(h) @ x).sum()

    x = jnp.ones((96, 96))
    compiled = jax.jit(fn).lower(x).compile()
    names = ps.hlo_op_names(compiled.as_text())
    assert any("encoder/mlp" in v for v in names.values()), list(names.values())[:5]
    path = ps.profile_calls(lambda i: compiled(x + i), 3, tmp_path)
    events, source = ps.read_events(path)
    s = ps.summarize(events, steps=3, source=source, op_names=names)
    assert s["scope_coverage"] > 0.5, s
    assert "forward: encoder/mlp" in s["by_scope"], s["by_scope"]
    assert sum(s["by_scope"].values()) == pytest.approx(s["kernel_ms_per_step"])
