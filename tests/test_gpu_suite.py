"""The GPU suite (benchmarks/gpu_suite.py) in --smoke mode, so it cannot rot between device leases.

One run on CPU: every part runs at tiny sizes in its own process, except `collect`, which is made
to fail (DREAMER4_SUITE_FAIL): the others must still report numbers, and collect its reason. The
collect part itself (Craftax compilation: a minute or more on a 2-core CPU) is left out of CI.
"""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, bench_module

profile_summary = bench_module("profile_summary")
PARTS = ["env", "train_tokenizer", "train_dynamics", "imagine", "collect", "loader", "attention"]


@pytest.mark.slow
def test_smoke_suite_reports_every_part_and_survives_a_failing_one(tmp_path):
    env = dict(os.environ, DREAMER4_SUITE_FAIL="collect", PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "gpu_suite.py"),
            "--smoke",
            "--out",
            str(tmp_path),
            "--total-s",
            "600",
        ],
        check=False,
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_suite.json").read_text())
    md = (tmp_path / "gpu_suite.md").read_text()
    assert res["meta"]["smoke"] and res["meta"]["commit"]
    assert list(res["parts"]) == PARTS
    for name, part in res["parts"].items():
        if name == "collect":
            assert part["status"] == "failed" and "forced failure" in part["reason"], part
            continue
        assert part["status"] == "ok", (name, part.get("reason"), part.get("log_tail"))
    r = {k: v["results"] for k, v in res["parts"].items()}
    assert r["env"]["platform"] == "cpu" and r["env"]["peak_bf16_flops"] is None
    # device-to-host copies of a chunk's frames three ways (4 MB here), each a positive rate
    copies = {row["method"]: row for row in r["env"]["transfer"]}
    assert list(copies) == ["device_get", "copy_to_host_async", "pinned_host"], copies
    assert all("error" not in row and row["GB_per_s"] > 0 and row["MB"] > 3.9 for row in copies.values()), copies
    assert "| pinned_host | 4 |" in md
    # the fused attention kernels' check ran (on a CPU: interpreted) beside the default kernel's step
    assert r["train_tokenizer"]["attention"] == r["train_dynamics"]["attention"] == "auto"
    ((label, check),) = r["train_tokenizer"]["fused_attention_check"].items()
    assert set(check) == {"out", "dq", "dk", "dv"}, check  # no "error"
    assert all(c["max_abs_diff"] <= 0.02 * c["max_abs_ref"] for c in check.values()), check  # bf16 rounding
    assert f"fused attention vs einsum on this device (tokenizer), {label}" in md
    # the dynamics step is timed as training runs it: on cached latents (no encoder in the step)
    assert r["train_dynamics"]["latent_cache"] is True and "dynamics step: cached latents" in md
    for stage in ("train_tokenizer", "train_dynamics"):
        (row,) = r[stage]["batches"]
        assert row["step_s"] > 0 and row["tokens_per_s"] > 0 and row["compile_s"] > 0
        assert row["cost_analysis"]["flops"] > 0 and row["model_flops_per_step"] > 0
        assert row["mfu_xla"] is None  # no known peak on CPU
        ma = row["memory_analysis"]  # XLA's compiled buffers: parameters and activations are not free
        assert ma["argument_size_in_bytes"] > 0 and ma["temp_size_in_bytes"] > 0, ma
        assert row["host_transfers_in_step"].startswith("none"), row["host_transfers_in_step"]
        assert row["metrics_finite"]
        # the compiled module's static traffic (benchmarks/gpu_hlo.py), for the table
        assert row["hlo_traffic"]["kernels"] > 10 and row["hlo_traffic"]["bytes"] > 0, row["hlo_traffic"]
        assert f"static traffic of the compiled {stage[6:]} " in md
        prof = row["profile"]  # 2 steps under jax.profiler.trace, summarised (CPU: the host's XLA thunks)
        assert prof["source"] == "host-xla" and prof["steps"] == 2, prof
        assert prof["kernels_per_step"] > 10 and 0 < prof["busy_ms_per_step"] <= prof["kernel_ms_per_step"]
        assert abs(sum(prof["share"].values()) - 1) < 1e-9 and prof["share"]["matmul"] > 0
        # kernel time by the code's named scopes (forward/backward x model part x sublayer). Most
        # kernels are matched to an op (a count: ~0.8-0.86 here); the matched share of their time
        # moves with CPU load (0.45-0.92 seen: one unmatched XNNPACK fusion can take 15% alone)
        assert prof["scope_coverage_kernels"] > 0.5 and prof["scope_coverage"] > 0, prof
        assert any(k.startswith("backward: ") for k in prof["by_scope"]), prof
        # the returned trace and HLO text give the same split offline (profile_summary.py --hlo)
        offline = tmp_path / f"{stage}_offline.json"
        profile_summary.main(
            [str(tmp_path / prof["trace_file"]), "--steps", "2", "--hlo", str(tmp_path / prof["hlo_file"])]
            + ["--json", str(offline)]
        )
        again = json.loads(offline.read_text())
        assert again["kernels_per_step"] == prof["kernels_per_step"] and again["by_scope"] == prof["by_scope"]
    cases = {(x["batch"], x["K"], x["decode"]): x for x in r["imagine"]["rows"]}
    assert {(1, 1, False), (1, 4, False), (1, 64, False), (1, 4, True)} <= set(cases)
    assert all(x["frames_per_s"] > 0 and x["compile_s"] > 0 for x in cases.values())
    assert r["imagine"]["speedup_k4_over_kmax"]["batch 1: K=4 / K=64"] > 0
    rows = {(x["reads"], x["worker_count"]): x for x in r["loader"]["rows"]}
    assert rows["frames", 0]["frames_per_s"] > 0 and rows["frames", 1]["frames_per_s"] > 0
    # frames feed the tokenizer; the dynamics reads its latent cache (here a random one of the
    # same windows), so each row's ratio is over the step that reads that way
    assert rows["frames", 0]["ratio_over_train_step"] > 0 and rows["frames", 0]["ratio_over"] == "train_tokenizer"
    assert rows["latents", 0]["frames_per_s"] > 0 and rows["latents", 0]["ratio_over"] == "train_dynamics"
    assert rows["latents", 0]["read_threads"] == 2 and "| latents | 0 (2 threads) |" in md  # in-process
    assert "read_threads" not in rows["frames", 1]
    # the attention kernels alone: both tilings of the fused kernels (interpreted here) and the reference
    at = {x["impl"]: x for x in r["attention"]["rows"]}
    assert set(at) == {"binary", "single", "einsum"}, at
    assert all(x["fwd_ms"] > 0 and x["fwd_bwd_ms"] > 0 and x["fwd_bwd_compile_s"] > 0 for x in at.values()), at
    assert "| tiny | 2 40 40 2 1 16 | binary |" in md and "time of each against binary tiles" in md
    for name in PARTS:
        assert f"| {name} |" in md
    assert "| tokenizer 2x2 | host-xla |" in md and "| dynamics 2x4 | host-xla |" in md
    assert "forced failure" in md


def test_full_plan_fits_the_default_total_and_budgets_pass_unused_time_on():
    suite = bench_module("gpu_suite")
    plan = suite.full_plan("/nowhere", None)
    assert list(plan) == PARTS and sum(b for b, _ in plan.values()) <= 350
    # collect pairs the rows' copies first: same envs and commits in flight, "async" then "pinned"
    cases = plan["collect"][1]["cases"]
    assert all(copy in ("async", "pinned") for _, _, copy in cases)
    assert cases[0][:2] == cases[1][:2] and [cases[0][2], cases[1][2]] == ["async", "pinned"]
    assert suite._envs({"num_envs": 1024, "commits_in_flight": 2, "host_copy": "pinned"}) == "1024 (2, pinned)"
    assert suite._envs({"num_envs": 1024, "commits_in_flight": 2}) == "1024 (2)"  # rows before session 41
    assert suite._envs({"num_envs": 1024}) == "1024"  # before session 37
    # a part gets its own budget, or what is left beyond later parts' budgets when that is more
    assert suite.budget_now(60, left=300, reserved=200) == 100
    assert suite.budget_now(60, left=250, reserved=200) == 60
