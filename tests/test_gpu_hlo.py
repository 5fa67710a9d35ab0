"""benchmarks/gpu_hlo.py: the memory traffic per kernel of an optimized module (read offline)."""

import gzip
import json

import jax
import jax.numpy as jnp
from conftest import bench_module

gh = bench_module("gpu_hlo")

# A hand-written module in XLA:GPU's printed form: a transpose fusion (its body is not a kernel),
# a free bitcast, a reduction (its reducer is not a kernel either), a Pallas (Triton) kernel and a
# cuBLAS GEMM (in an attention scope: still a matmul).
MODULE = """HloModule m, entry_computation_layout={(bf16[4,8]{1,0}, f32[8,16]{1,0})->f32[4,16]{1,0}}

%fused_transpose (p0: bf16[4,8]) -> bf16[8,4] {
  %p0 = bf16[4,8]{1,0} parameter(0)
  ROOT %t = bf16[8,4]{1,0} transpose(%p0), dimensions={1,0}
}

%add_reducer (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

ENTRY %main (a: bf16[4,8], b: f32[8,16]) -> f32[4,16] {
  %a = bf16[4,8]{1,0} parameter(0)
  %b = f32[8,16]{1,0} parameter(1)
  %loop_transpose_fusion.3 = bf16[8,4]{1,0} fusion(%a), kind=kLoop, calls=%fused_transpose, metadata={op_name="jit(f)/attn/transpose"}
  %bc = bf16[32]{0} bitcast(%loop_transpose_fusion.3)
  %zero = f32[] constant(0)
  %colsum = f32[16]{0} reduce(%b, %zero), dimensions={0}, to_apply=%add_reducer, metadata={op_name="jit(f)/reduce_sum"}
  %pallas_call.2 = bf16[4,8]{1,0} custom-call(%a), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(f)/space_attention/capped_attention_fwd/pallas_call"}
  ROOT %gemm.1 = f32[4,16]{1,0} custom-call(%a, %b), custom_call_target="__cublas$gemm", metadata={op_name="jit(f)/space_attention/dot_general"}
}
"""


def test_counts_operand_and_output_bytes_of_each_kernel():
    ks = {k["name"]: k for k in gh.kernels(MODULE)}
    # parameters, constant, bitcast, fusion body and reducer: no kernels
    assert set(ks) == {"loop_transpose_fusion.3", "colsum", "pallas_call.2", "gemm.1"}
    assert ks["pallas_call.2"]["kind"] == "attention" and ks["pallas_call.2"]["bytes"] == 128
    # transpose: reads a (4*8 bf16 = 64 B), writes 8*4 bf16 (64 B)
    assert ks["loop_transpose_fusion.3"]["bytes"] == 128 and ks["loop_transpose_fusion.3"]["kind"] == "copy"
    # GEMM: reads a (64 B) and b (8*16 f32 = 512 B), writes 4*16 f32 (256 B)
    assert ks["gemm.1"]["bytes"] == 832 and ks["gemm.1"]["kind"] == "matmul"
    # reduction: reads b (512 B) and the scalar init (4 B), writes 16 f32 (64 B)
    assert ks["colsum"]["bytes"] == 580 and ks["colsum"]["kind"] == "reduction"
    s = gh.summarize(list(ks.values()))
    assert s["bytes"] == 1668 and s["non_matmul_bytes"] == 836
    assert s["top_copy_scopes"] == {"attn/transpose": {"kernels": 1, "bytes": 128}}
    assert gh.shape_bytes("(f32[2,3]{1,0}, pred[5]{0})") == 29


def test_reads_a_real_compiled_module_and_writes_json(tmp_path):
    """The parser keeps up with the printed form of this jax's XLA (a CPU module here) and the
    --from-hlo path writes the summary."""
    text = jax.jit(lambda x, w: jnp.tanh(x @ w).T).lower(jnp.ones((8, 16)), jnp.ones((16, 4))).compile().as_text()
    ks = gh.kernels(text)
    assert ks and all(k["bytes"] > 0 for k in ks)
    assert sum(k["bytes"] for k in ks) >= 4 * (8 * 16 + 16 * 4 + 8 * 4)  # at least reads both inputs, writes the output
    f = tmp_path / "hlo.txt.gz"
    f.write_bytes(gzip.compress(MODULE.encode()))
    out = tmp_path / "s.json"
    gh.main(["--from-hlo", str(f), "--out", str(out)])
    assert json.loads(out.read_text())["results"][str(f)]["bytes"] == 1668


def test_kernel_ptx_counts_a_kernels_threads_instructions_and_branches():
    """benchmarks/kernel_ptx.py's count of a (hand-written) Triton kernel's PTX: threads from
    .reqntid, instructions (predicated ones too; not labels, directives or declarations), branches."""
    kp = bench_module("kernel_ptx")
    ptx = """//
.version 8.7
.target sm_90a
.visible .entry capped_attention_fwd(
	.param .u64 .ptr .global .align 1 capped_attention_fwd_param_0
)
.reqntid 128, 1, 1
{
	.reg .pred 	%p<3>;
	.reg .b32 	%r<9>;
	ld.param.b64 	%rd1, [capped_attention_fwd_param_0];
	mov.u32 	%r1, %tid.x;
	@%p1 ld.global.b32 { %r2 }, [ %rd1 + 0 ];
	ex2.approx.f32 	%r3, %r2;
$L__BB0_1:
	@!%p2 bra 	$L__BB0_1;
	ret;
}
"""
    assert kp.count_ptx(ptx) == {"threads": 128, "instructions": 6, "branches": 1}
