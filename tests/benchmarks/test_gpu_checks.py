"""The GPU suite's correctness checks, run on CPU (benchmarks/gpu/kernel_checks.py,
hf_compare.py and the rows that use them): each passes the real kernels and models at
tiny shapes (Triton interpreter) and reports a deliberately wrong one as a failure --
the row's JSON says failed with the numbers and the row exits 1."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GPU_DIR = os.path.join(ROOT, "benchmarks", "gpu")
for _p in (GPU_DIR, os.path.join(ROOT, "benchmarks")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import attention_backends  # noqa: E402
import ce_chunks  # noqa: E402
import common  # noqa: E402
import hf_compare  # noqa: E402
import kernel_checks as kc  # noqa: E402
import triton_kernels as tk  # noqa: E402

from megablocks_ablate.kernels import dispatch  # noqa: E402

CPU = torch.device("cpu")
BF16 = torch.bfloat16


def _by_name(cases):
    return {c.name: c for c in cases}


# ---- kernel_checks: the plain judgement ------------------------------------------------


def test_judge_flags_a_wrong_output_a_wrong_gradient_nan_and_shape():
    t = torch.linspace(-1, 1, 50)
    truth = kc.Result(t, [t * 2])
    ref = kc.Result(t + 1e-4, [t * 2 + 1e-4])
    good = kc.judge(kc.Result(t + 2e-4, [t * 2]), ref, truth, 1e-5)
    assert good["accurate"] and good["fwd_err_kernel"] == pytest.approx(2e-4, rel=1e-3)
    assert not kc.judge(kc.Result(t * 1.01, [t * 2]), ref, truth, 1e-5)["accurate"]
    bad_bwd = kc.judge(kc.Result(t, [t * 2.1]), ref, truth, 1e-5)
    assert not bad_bwd["accurate"] and bad_bwd["fwd_err_kernel"] == 0
    nan = t.clone()
    nan[3] = math.nan
    assert kc.judge(kc.Result(nan, [t * 2]), ref, truth, 1e-5)["fwd_err_kernel"] == math.inf
    assert kc.rel_err(t[:-1], t) == math.inf
    assert kc.judge(kc.Result(t, []), ref, truth, 1e-5)["bwd_err_kernel"] == math.inf


def test_tiny_kernels_are_accurate_and_a_wrong_one_is_not():
    cases = _by_name(tk.make_cases(tk.preset_shapes("tiny"), BF16, CPU))
    for name in ("rmsnorm", "swiglu", "linear_cross_entropy", "merge (8 inputs)"):
        res = kc.check(cases[name], BF16)
        assert res["accurate"], (name, res)
        assert res["tolerance"] == 2.0**-8
    sw = cases["swiglu"]
    real = sw.kernel
    sw.kernel = lambda x: real(x) * 1.03  # forward 3 % off
    res = kc.check(sw, BF16)
    assert not res["accurate"] and res["fwd_err_kernel"] > 0.02

    class HalfGrad(torch.autograd.Function):  # right forward, gradient halved
        @staticmethod
        def forward(ctx, x):
            return x

        @staticmethod
        def backward(ctx, g):
            return g * 0.5

    sw.kernel = lambda x: HalfGrad.apply(real(x))
    res = kc.check(sw, BF16)
    assert res["fwd_err_kernel"] <= 2 * res["fwd_err_reference"] + 2.0**-8
    assert not res["accurate"] and res["bwd_err_kernel"] > 0.3


def _wrapping(kernel, bad_from):
    """A kernel whose output rows from ``bad_from`` on repeat the first rows: what an
    int32 offset that wraps past 2^31 elements does."""

    def fn(*xs):
        y = kernel(*xs)
        return torch.cat([y[:bad_from], y[: y.shape[0] - bad_from]])

    return fn


def test_large_check_catches_a_wrap_at_the_boundary():
    limit = 1 << 12
    s = tk.preset_shapes("tiny")
    spec = next(x for x in tk.large_specs(s, BF16, CPU, limit) if x.name == "rmsnorm")
    assert spec.rows * s["d"] > limit and spec.boundaries == [limit // s["d"]]
    case = spec.build()
    good = kc.check_large(case, spec, BF16)
    assert good["accurate"] and good["windows"][0]["rows"] == [0, 8]
    case.kernel = _wrapping(case.kernel, spec.boundaries[0])
    bad = kc.check_large(case, spec, BF16)
    assert not bad["accurate"]
    first, *past = bad["windows"]
    assert first["rows"] == [0, 8] and first["fwd_err_kernel"] < 0.01  # its output is right
    assert past and all(not w["accurate"] and w["fwd_err_kernel"] > 0.1 for w in past)


def test_every_large_spec_passes_the_limit_and_runs_at_a_small_one():
    for spec in tk.large_specs(tk.preset_shapes("1.1b"), BF16, CPU):
        assert spec.elements > kc.INT32_LIMIT, spec.name
        assert spec.boundaries and max(spec.boundaries) < spec.rows
    small = tk.large_specs(tk.preset_shapes("tiny"), BF16, CPU, 1 << 12)
    for spec in small[:2] + small[-2:]:  # norm, norm, cross-entropy, merge: quick here
        res = kc.check_large(spec.build(), spec, BF16)
        assert res["accurate"], (spec.name, res)


def test_large_checks_are_planned_from_the_computed_need_and_the_free_memory():
    specs = tk.large_specs(tk.preset_shapes("1.1b"), BF16, CPU)
    gib = 1 << 30
    need = {s.name: s.need_bytes for s in specs}
    # layernorm at 1.1b: x, y, upstream and dx of 2^20 + 64 rows x 2048 in bf16
    assert need["layernorm"] == 4 * (2**20 + 64) * 2048 * 2
    h100 = kc.plan_large(specs, 79 * gib)
    assert all(p["run"] for p in h100), h100  # an idle H100 runs them all
    small = {p["kernel"]: p for p in kc.plan_large(specs, 16 * gib)}
    assert not small["layernorm"]["run"]
    assert small["layernorm"]["reason"] == "needs 19.4 GiB, 16.0 GiB free"
    assert small["linear_cross_entropy"]["run"]
    assert all(not p["run"] and p["reason"] for p in kc.plan_large(specs, None))


def test_windows_cover_the_ends_and_each_boundary():
    spec = kc.LargeSpec("x", 0, 100, [50, 97], lambda: None, window=8)
    assert [(w.start, w.stop) for w in kc.windows(spec)] == [(0, 8), (46, 54), (92, 100)]
    assert kc.boundary_rows(100, [10, 100], limit=500) == [5, 50]


def _args(**kw):
    return type("A", (), {"dtype": "bfloat16", "reps": 1, **kw})


def test_triton_row_fails_loudly_on_an_inaccurate_kernel_and_not_on_a_skip():
    ok = {"kernel": "rmsnorm", "fwd_err_kernel": 1e-3, "fwd_err_reference": 1e-3}
    checks = {
        "presets": {"tiny": [{**ok, "accurate": True}]},
        "large": [{"kernel": "swiglu", "run": False, "reason": "needs 24 GiB", "accurate": None}],
    }
    res = tk.summarize(checks, [], ["tiny"], _args(), 1 << 13)
    assert res.get("status") is None and res["met"] and "1 large skipped" in res["key"]["text"]
    checks["presets"]["tiny"].append({"kernel": "rope", "accurate": False, "fwd_err_kernel": 0.5})
    checks["large"].append({"kernel": "swiglu", "run": True, "accurate": False})
    res = tk.summarize(checks, [], ["tiny"], _args(), 1 << 13)
    assert res["status"] == "failed" and not res["met"]
    assert res["reason"] == "inaccurate: tiny: rope; large: swiglu"
    assert res["details"]["checks"]["tiny"][1]["fwd_err_kernel"] == 0.5  # the numbers stay


def test_a_failed_row_writes_its_json_and_exits_1(tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", ["x", "--out", str(out), "--dry-run"])

    def body(args):
        return {"status": "failed", "reason": "inaccurate: rope", "details": {"err": 0.5}}

    assert common.run_row("triton_kernels", common.parser("x"), body) == 1
    row = json.loads(out.read_text())
    assert row["status"] == "failed" and row["details"]["err"] == 0.5
    monkeypatch.setattr(sys, "argv", ["x", "--out", str(out), "--dry-run"])
    assert common.run_row("triton_kernels", common.parser("x"), lambda a: {"key": {}}) == 0


def test_the_runner_keeps_a_failed_rows_own_reason(tmp_path):
    import rows
    import suite

    script = tmp_path / "fake_row.py"
    script.write_text(
        "import json, sys\n"
        "out = sys.argv[sys.argv.index('--out') + 1]\n"
        "json.dump({'row': 'fake', 'status': 'failed', 'reason': 'inaccurate: x',"
        " 'details': {'err': 1.0}}, open(out, 'w'))\n"
        "sys.exit(1)\n"
    )
    spec = rows.RowSpec("fake", str(script), 10)

    class Args:
        dry_run = True
        out = str(tmp_path / "out")
        ext_status = None

    for d in ("rows", "logs"):
        os.makedirs(os.path.join(Args.out, d))
    rec = suite.run_one(spec, Args, str(tmp_path / "work"), suite.child_env(True), 30)
    assert rec["status"] == "failed" and rec["exit_code"] == 1
    assert rec["reason"] == "inaccurate: x" and rec["details"] == {"err": 1.0}


# ---- attention and cross-entropy rows ------------------------------------------------------


def test_attention_row_on_cpu_and_a_wrong_backend(monkeypatch):
    run = attention_backends.run_preset("tiny", torch.float32, CPU, 1, 0)
    b = run["backends"]
    assert all(b[n]["accurate"] for n in ("auto", "sdpa", "math"))
    assert b["auto"]["runs"] == "sdpa"
    for n in ("cudnn", "flash2", "fa3"):
        assert not b[n]["available"] and f"MBA_ATTENTION={n}" in b[n]["reason"]
    assert attention_backends.summarize([run]).get("status") is None

    real = dispatch.attention

    def wrong_sdpa(q, k, v):  # "sdpa" attends one position too far back
        out = real(q, k, v)
        return out.roll(1, dims=1) if dispatch.configured_attention() == "sdpa" else out

    monkeypatch.setattr(dispatch, "attention", wrong_sdpa)
    run = attention_backends.run_preset("tiny", torch.float32, CPU, 1, 0)
    assert not run["backends"]["sdpa"]["accurate"] and run["backends"]["math"]["accurate"]
    res = attention_backends.summarize([run])
    assert res["status"] == "failed" and res["reason"] == "inaccurate: tiny sdpa"


def test_ce_chunks_row_checks_both_chunkings_and_fails_a_wrong_one(monkeypatch):
    from megablocks_ablate.kernels import cross_entropy as ce

    run = ce_chunks.run_shape("tiny", BF16, CPU, 1, 0)
    assert run["modes"]["auto"]["num_warps"] == 8 and run["modes"]["legacy"]["num_warps"] == 4
    assert all(m["accurate"] for m in run["modes"].values())
    assert run["auto_vs_legacy"]["loss_rel"] < 1e-6
    real = ce._ce_chunk_triton

    def bad_with_8_warps(logits, labels, scale, ignore_index, grad, num_warps=4):
        nll = real(logits, labels, scale, ignore_index, grad, num_warps=num_warps)
        return nll * 1.05 if num_warps == 8 else nll

    monkeypatch.setattr(ce, "_ce_chunk_triton", bad_with_8_warps)
    run = ce_chunks.run_shape("tiny", BF16, CPU, 1, 0)
    assert run["modes"]["legacy"]["accurate"] and not run["modes"]["auto"]["accurate"]
    res = ce_chunks.summarize([run])
    assert res["status"] == "failed" and res["reason"] == "inaccurate: tiny auto"


# ---- the eval row: strict loading and the loss tolerances ----------------------------------


def test_judge_mean_and_tokens_state_their_tolerances():
    ok = hf_compare.judge_mean(10.0 * 1000, 1000, 10.001 * 1000, 1000, "bfloat16")
    assert ok["ok"] and ok["tolerance"] == 2.0**-8 and ok["why"] is None
    bad = hf_compare.judge_mean(10.1 * 1000, 1000, 10.0 * 1000, 1000, "bfloat16")
    assert not bad["ok"] and "relative difference 1.00e-02 > 3.91e-03 (bfloat16)" in bad["why"]
    assert not hf_compare.judge_mean(1.0, 10, 1.0, 11, "float32")["ok"]
    assert not hf_compare.judge_mean(1e5, 10, 1e5 * (1 + 2e-5), 10, "float32")["ok"]
    a = torch.rand(500) * 10
    assert hf_compare.judge_tokens(a, a + 1e-6)["ok"]
    b = a.clone()
    b[7] += 0.01
    res = hf_compare.judge_tokens(a, b)
    assert not res["ok"] and res["max_abs"] == pytest.approx(0.01, rel=1e-3)
    assert "max 1.00e-02 (<= 1e-03)" in res["why"]
    assert not hf_compare.judge_tokens(a, a + 2e-4)["ok"]  # a small bias everywhere: RMS
    assert not hf_compare.judge_tokens(a, a[:-1])["ok"]


def _tiny_models():
    from megablocks_ablate.model import ModelConfig

    cfg = ModelConfig.from_preset("tiny")
    torch.manual_seed(0)
    ours = cfg.build().eval()
    return cfg, ours


def test_strict_loading_names_what_does_not_match():
    pytest.importorskip("transformers")
    from transformers import CohereConfig, CohereForCausalLM

    from megablocks_ablate.model.hf import to_hf_config

    cfg, ours = _tiny_models()
    hf = hf_compare.hf_model(cfg, ours, CPU, torch.float32)  # tied head given, tie kept
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    fields = {
        k: v
        for k, v in to_hf_config(cfg).items()
        if k not in ("architectures", "model_type", "torch_dtype")
    }
    fresh = CohereForCausalLM(CohereConfig(**fields))
    state = hf_compare.hf_state_dict(ours.state_dict(), cfg)
    missing = {k: v for k, v in state.items() if not k.endswith("layers.1.mlp.down_proj.weight")}
    with pytest.raises(ValueError, match=r"strict=True.*layers\.1\.mlp\.down_proj\.weight"):
        hf_compare.load_strict(fresh, missing)
    with pytest.raises(ValueError, match="rotary_extra"):
        hf_compare.load_strict(fresh, {**state, "model.rotary_extra": torch.zeros(1)})


def test_eval_row_passes_our_model_and_fails_a_broken_one(monkeypatch):
    pytest.importorskip("transformers")
    import eval_rate

    args = type("A", (), {"tokens": 1500, "rounds": 1, "batch_tokens": 512})
    args.check_tokens = 600
    good = eval_rate.run_preset("tiny", CPU, torch.float32, args, with_hf=True)
    assert good["checks_ok"] and good["strict_load"], good
    assert good["checks"]["mean_nll"]["rel_diff"] < 1e-6
    assert good["checks"]["per_token_fp32"]["max_abs"] < 1e-4
    assert eval_rate.summarize([good], True).get("status") is None

    real = dispatch.rope
    monkeypatch.setattr(dispatch, "rope", lambda x, cos, sin, layout="interleaved": x)  # no RoPE
    bad = eval_rate.run_preset("tiny", CPU, torch.float32, args, with_hf=True)
    monkeypatch.setattr(dispatch, "rope", real)
    assert not bad["checks_ok"] and not bad["checks"]["per_token_fp32"]["ok"]
    res = eval_rate.summarize([bad], True)
    assert res["status"] == "failed" and res["reason"].startswith("loss check: tiny: ")
    assert "fp32 per-token NLL differs" in res["reason"]
    assert res["details"]["runs"][0]["checks"]["per_token_fp32"]["rms"] > 1e-3  # the numbers


def _drop_the_final_norm(monkeypatch):
    """hf_compare.hf_state_dict without ``model.norm.weight``: a strict load must refuse."""
    real = hf_compare.hf_state_dict

    def drop_a_norm(state, cfg):
        sd = real(state, cfg)
        sd.pop("model.norm.weight")
        return sd

    monkeypatch.setattr(hf_compare, "hf_state_dict", drop_a_norm)


def test_eval_row_fails_when_the_strict_load_refuses(monkeypatch):
    pytest.importorskip("transformers")
    import eval_rate

    _drop_the_final_norm(monkeypatch)
    args = type("A", (), {"tokens": 500, "rounds": 1, "batch_tokens": 512, "check_tokens": 100})
    r = eval_rate.run_preset("tiny", CPU, torch.float32, args, with_hf=True)
    assert r["strict_load"] is False and "model.norm.weight" in r["failures"][0]
    res = eval_rate.summarize([r], True)
    assert res["status"] == "failed" and "not timed (load refused)" in res["key"]["text"]


def test_cpu_benchmarks_load_transformers_strictly(monkeypatch):
    """benchmarks/eval.py and model_step.py compare against transformers through the same
    strict load as the GPU row: a key that does not map is refused, never left random."""
    pytest.importorskip("transformers")
    import eval as bench_eval  # benchmarks/eval.py
    import model_step

    cfg, ours = _tiny_models()
    hf = bench_eval.hf_model(cfg, ours, CPU, torch.float32)
    assert torch.equal(hf.model.norm.weight, ours.norm.weight)
    _drop_the_final_norm(monkeypatch)
    for build in (
        lambda: bench_eval.hf_model(cfg, ours, CPU, torch.float32),
        lambda: model_step._hf_model(cfg, ours),
    ):
        with pytest.raises(ValueError, match=r"strict=True.*model\.norm\.weight"):
            build()


def test_the_report_shows_a_failed_checks_figures_under_its_reason():
    import report

    checks = {
        "presets": {"tiny": [{"kernel": "rope", "accurate": False, "fwd_err_kernel": 0.5}]},
        "large": [],
    }
    checks["presets"]["tiny"][0].update(fwd_err_reference=1e-3)
    row = {
        "row": "triton_kernels",
        "dry_run": True,
        **tk.summarize(checks, [], ["tiny"], _args(), 8),
    }
    assert row["status"] == "failed"
    meta = {"command": "x", "date": "d", "elapsed_s": 1.0, "budget_s": 2.0, "dry_run": True}
    rows_ = {"triton_kernels": row}
    md = report.markdown(meta, report.summary_rows(rows_), rows_)
    section = md.split("## GPU Triton kernels", 1)[1].split("\n## ", 1)[0]
    assert "**Failed: inaccurate: tiny: rope**" in section
    assert "| tiny | rope | 5.0e-01 / 1.0e-03 | - | NO |" in section
