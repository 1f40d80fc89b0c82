"""`study run` end to end on a tiny study: results, registry reuse, resume after kills.

One tiny study (synthetic corpus, 3 partitions of one unit each, all pairs as mixtures,
2 seq validations, tiny model) is run once uninterrupted; the other tests compare
against its store: a merged row equals a merge made by hand from the checkpoints and
evaluated directly, the report equals a recomputation from the store, and runs killed
(SIGKILL) during training and during merge-eval, then rerun, end with exactly the same
rows, none lost or duplicated.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from runner_fixtures import rows, write_spec

from megablocks_ablate.ablate import mixtures as mx
from megablocks_ablate.ablate.runner import RunOptions, StudyRunner, dry_run, resolve
from megablocks_ablate.ablate.spec import StudySpec
from megablocks_ablate.ablate.store import ResultStore

pytestmark = pytest.mark.integration  # whole studies: training, kills, 2 ranks


def test_store_holds_every_mixture_proxy_domain(base):
    spec, root, runner = base
    study = runner.study
    path = os.path.join(spec["out_dir"], "results.sqlite")
    got = rows(path)
    domains = sorted(study.eval_sets)
    assert len(domains) == 3 and len(study.mixtures) == 3
    for m in study.mixtures:
        for p in ("merged", "macro", "micro"):
            assert sorted(d for (t, s, q, d) in got if t == "r" and s == m.id and q == p) == domains
    seq = {s for (t, s, q, d) in got if q == mx.SEQ}
    assert seq == {m.id for m in study.validation}
    assert {s for (t, s, q, d) in got if t == "u"} == set(study.used_units)
    assert len(got) == 3 * 3 * 3 + 2 * 3 + 3 * 3
    with ResultStore(path) as store:
        assert store.get_meta("study")["mixtures"] == [m.id for m in study.mixtures]
        assert store.get_meta("study")["partitions_without_heldout"] == study.without_heldout()
        spent = store.get_meta("spent")
    assert spent["unit-model tokens"] == 3 * 6144  # 6 steps of 1024 tokens each
    assert spent["seq-model tokens"] == 2 * 12288
    # every row records its window: tiny_unit's and tiny_seq's trained length, 64
    with ResultStore(path) as store:
        provs = [r.provenance for r in store.results() + store.unit_results()]
        assert store.windows() == {64}
    assert {(p["max_len"], p["stride"], p["trained_seq_len"]) for p in provs} == {(64, None, 64)}


def test_a_run_in_another_window_is_refused_naming_both(base, capsys):
    from megablocks_ablate.cli import main

    spec, root, runner = base
    store = os.path.join(spec["out_dir"], "results.sqlite")
    before = rows(store)
    assert main(["study", "run", str(root / "study.yaml"), "--max-len", "32"]) == 2
    err = capsys.readouterr().err
    assert "holds scores evaluated in 64-token windows, but this run scores in 32-token" in err
    assert "Traceback" not in err and rows(store) == before


def test_merged_row_equals_a_merge_evaluated_by_hand(base):
    """The in-memory pool merge + evaluation equals averaging the checkpoints' tensors."""
    from megablocks_ablate.checkpoint import load_model_checkpoint
    from megablocks_ablate.evaluate import evaluate
    from megablocks_ablate.model.loading import load_model

    spec, root, runner = base
    m = runner.study.mixtures[1]
    plan = runner.plan()
    dirs = {j.name: j.entry.model_dir for j in plan.units}
    model, _ = load_model(dirs[m.units[0]])
    states = [load_model_checkpoint(dirs[u])[0] for u in m.units]
    avg = {k: sum(s[k] for s in states) / len(states) for k in states[0]}
    model.load_state_dict(avg, strict=True)
    suite = runner.scorer().suite
    direct = evaluate(model, suite)
    with ResultStore(os.path.join(spec["out_dir"], "results.sqlite")) as store:
        stored = {r.domain: r.score for r in store.results("merged") if r.subject == m.id}
    for d, r in direct.items():
        assert stored[d].tokens == r.tokens
        assert math.isclose(stored[d].nll_sum, r.nll_sum, rel_tol=1e-5)


def test_report_equals_recomputation_from_store(base, tmp_path):
    from megablocks_ablate.ablate.report import write_report

    spec, root, runner = base
    with ResultStore(os.path.join(spec["out_dir"], "results.sqlite")) as store:
        summary = write_report(store, str(tmp_path / "report"), n_boot=50, plots=False)
        res = store.results()
    ppl = {(r.subject, r.proxy, r.domain): r.perplexity for r in res}
    seq_ids = sorted({r.subject for r in res if r.proxy == mx.SEQ})
    pts = [
        (ppl[(m, "merged", d)], ppl[(m, mx.SEQ, d)])
        for m in seq_ids
        for d in runner.study.eval_sets
    ]
    x, y = np.array(pts).T
    assert summary.pooled["merged"]["pearson"].n == len(pts) == 6
    assert summary.pooled["merged"]["pearson"].r == pytest.approx(
        np.corrcoef(x, y)[0, 1], abs=1e-12
    )
    assert (tmp_path / "report" / "report.md").is_file()


def test_dry_run_and_one_new_unit_trains_one_model(base, tmp_path, capsys):
    spec, root, runner = base
    study = runner.study
    out = dry_run(study, RunOptions())
    assert "unit models: 3 exist, 0 to train" in out and "3 of 3 merges done" in out
    assert out.endswith("window: 64 tokens (the trained length)")
    # a fourth partition: its unit is the only model to train
    from megablocks_ablate.data.manifest import Manifest

    parts = Manifest.load(spec["data"]).partition_units()
    new = next(p for p in parts if p not in spec["partitions"])
    bigger = dict(spec["partitions"], **{new: [parts[new][0]]})
    path = write_spec(str(tmp_path / "more.yaml"), spec, partitions=bigger)
    plan = StudyRunner(resolve(StudySpec.load(path)), RunOptions()).plan()
    assert [j.name for j in plan.missing()] == [parts[new][0]]


def _cli(spec_path: str, *extra: str, env_extra: dict | None = None) -> subprocess.Popen:
    env = dict(os.environ, MBA_NO_PROGRESS="1", **(env_extra or {}))
    return subprocess.Popen(
        [sys.executable, "-m", "megablocks_ablate", "study", "run", spec_path, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "the run never reached the kill point"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("phase", ["training", "merge-eval"])
def test_kill_and_rerun_loses_and_duplicates_nothing(base, tmp_path, phase):
    spec, root, runner = base
    out = str(tmp_path / "study")
    seed_ckpt = os.path.join(str(root), "seed", "final")  # share the seed: kill the pool
    path = write_spec(str(tmp_path / "s.yaml"), spec, out_dir=out, seed={"checkpoint": seed_ckpt})
    store = os.path.join(out, "results.sqlite")
    if phase == "training":
        # killed once a unit model has written a step checkpoint (mid-run)
        def ready():
            pool = os.path.join(out, "pool")
            return os.path.isdir(pool) and any(
                os.path.isdir(os.path.join(pool, d, "checkpoints"))
                and os.listdir(os.path.join(pool, d, "checkpoints"))
                for d in os.listdir(pool)
            )

        proc = _cli(path, env_extra={"MBA_TRAIN_STEP_DELAY": "0.3"})
    else:
        # models from the base study's registry: only evaluation runs; killed after 1 merge
        def ready():
            if not os.path.isfile(store):
                return False
            with ResultStore(store) as s:
                return s.count("results") >= 3 * 3 + 2 * 3  # seq rows + one merge's rows

        proc = _cli(path, "--registry", spec["out_dir"], env_extra={"MBA_MERGE_EVAL_DELAY": "3"})
    _kill_when(proc, ready)
    before = rows(store) if os.path.isfile(store) else {}
    extra = ("--registry", spec["out_dir"]) if phase == "merge-eval" else ()
    done = _cli(path, *extra)
    log = done.communicate()[0]
    assert done.returncode == 0, log
    after = rows(store)
    expected = rows(os.path.join(spec["out_dir"], "results.sqlite"))
    assert set(before) <= set(after)  # nothing lost
    assert set(after) == set(expected)  # nothing missing, no extra row
    for k, (nll, tok) in expected.items():  # bitwise the same models
        assert after[k][1] == tok and after[k][0] == pytest.approx(nll, rel=1e-9), k
    if phase == "merge-eval":
        assert "training 0" in log and len(before) < len(expected)


def test_spec_error_stops_before_any_work(base, tmp_path, capsys):
    from megablocks_ablate.cli import main

    spec, root, runner = base
    out = str(tmp_path / "never")
    path = write_spec(
        str(tmp_path / "bad.yaml"),
        spec,
        out_dir=out,
        mixtures={"explicit": [[next(iter(spec["partitions"])), "nonexistent"]]},
    )
    rc = main(["study", "run", path])
    assert rc != 0
    assert "mixtures.explicit[0]: unknown partition 'nonexistent'" in capsys.readouterr().err
    assert not os.path.exists(out)


def _torchrun_study(path: str, *extra: str) -> subprocess.CompletedProcess:
    """`study run` under torchrun x 2 (gloo, one thread each); asserts success."""
    env = dict(os.environ, MBA_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "megablocks_ablate",
            "study",
            "run",
            path,
            *extra,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("placement", ["auto", "sharded"])
def test_two_ranks_shard_the_evaluation_into_one_store(base, tmp_path, placement):
    """torchrun x 2 (gloo), the same rows as one process. ``auto`` (the pool fits each
    rank): mixtures split over ranks. ``sharded``: both ranks hold half the pool's rows
    and score every mixture in lockstep, rank 0 writing (fp32 rows: equal merges)."""
    spec, root, runner = base
    out = str(tmp_path / "study")
    path = write_spec(
        str(tmp_path / "s.yaml"),
        spec,
        out_dir=out,
        seed={"checkpoint": os.path.join(str(root), "seed", "final")},
    )
    proc = _torchrun_study(path, "--registry", spec["out_dir"], "--pool-placement", placement)
    after, expected = (
        rows(os.path.join(out, "results.sqlite")),
        rows(os.path.join(spec["out_dir"], "results.sqlite")),
    )
    assert set(after) == set(expected)
    for k, (nll, tok) in expected.items():
        assert after[k][1] == tok and after[k][0] == pytest.approx(nll, rel=1e-9), k
    log = proc.stdout + proc.stderr
    assert "evaluated on rank 0" in log
    assert ("sharded pool: 1 groups of 2 ranks" in log) == (placement == "sharded")
    with ResultStore(os.path.join(out, "results.sqlite")) as store:
        provs = {r.provenance["pool"]["placement"] for r in store.results("merged")}
    assert provs == {"resident" if placement == "auto" else "sharded"}


def test_export_mixture_as_train_blend_and_megatron_data_path(base, tmp_path, capsys):
    from megablocks_ablate.cli import main
    from megablocks_ablate.train.config import DataConfig

    spec, root, runner = base
    path = write_spec(str(tmp_path / "s.yaml"), spec)
    a, b = list(spec["partitions"])[:2]
    assert main(["study", "export", path, "--mixture", f"{a},{b}"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)["data"]
    weights = data["weights"]
    units_a, units_b = runner.study.partitions[a], runner.study.partitions[b]
    assert sum(weights[u] for u in units_a) == pytest.approx(0.5)
    assert sum(weights[u] for u in units_b) == pytest.approx(0.5)
    DataConfig.from_dict(data)  # a valid data section of a train config
    assert main(["study", "export", path, "--mixture", f"{a},{b}", "--format", "megatron"]) == 0
    fields = capsys.readouterr().out.split()
    assert len(fields) == 2 * (len(units_a) + len(units_b))
    assert sum(float(w) for w in fields[::2]) == pytest.approx(1.0)
    assert all(os.path.exists(p + ".idx") for p in fields[1::2])
    assert main(["study", "export", path, "--mixture", f"{a},nope"]) == 2
    assert "unknown partition 'nope'" in capsys.readouterr().err


def test_two_ranks_train_the_pool_with_ddp(base, tmp_path):
    """torchrun x 2 trains unit and seq models data-parallel inside the runner's process
    group (the trainer must not tear it down) and scores like one process."""
    spec, root, runner = base
    out = str(tmp_path / "study2")
    path = write_spec(
        str(tmp_path / "s.yaml"),
        spec,
        out_dir=out,
        seed={"checkpoint": os.path.join(str(root), "seed", "final")},
    )
    _torchrun_study(path)
    after, expected = (
        rows(os.path.join(out, "results.sqlite")),
        rows(os.path.join(spec["out_dir"], "results.sqlite")),
    )
    assert set(after) == set(expected)
    for k, (nll, tok) in expected.items():  # same global batch: DDP differs by rounding only
        assert after[k][1] == tok and after[k][0] == pytest.approx(nll, rel=1e-4), k


def test_search_reads_scored_mixtures_and_scores_new_ones(base, tmp_path, capsys):
    """Beam search over the tiny study: k=2 mixtures come from the store, the singletons
    it needs on the way are merged and evaluated, stored, and read back on a rerun."""
    from megablocks_ablate.cli import main

    spec, root, runner = base
    out = str(tmp_path / "study")
    shutil.copytree(spec["out_dir"], out)  # a finished study: pool, seq and store
    path = write_spec(str(tmp_path / "s.yaml"), spec, out_dir=out)
    store_path = os.path.join(out, "results.sqlite")
    before = rows(store_path)
    assert main(["study", "search", path, "--k", "2", "--proxy", "macro", "--beam", "2"]) == 0
    text = capsys.readouterr().out
    after = rows(store_path)
    names = list(spec["partitions"])
    assert set(before) < set(after)  # the 1-partition mixtures were added
    singles = {k for k in set(after) - set(before)}
    assert {k[1] for k in singles} == {
        mx.Mixture.of({p: runner.study.partitions[p]}).id for p in names
    }
    # the best pair is the k=2 mixture with the lowest geometric-mean macro perplexity
    store = ResultStore(store_path)
    domains = list(runner.study.eval_sets)

    def gmean(m):
        sc = store.scores(m.id, "macro")
        return float(np.exp(np.mean([np.log(sc[d].perplexity) for d in domains])))

    pairs = [m for m in runner.study.mixtures if m.k == 2]
    best = min(pairs, key=gmean)
    store.close()
    assert f"best 2-mixture by macro: {best.label}" in text
    assert f"6 mixtures scored, {len(names)} of them merged and evaluated now" in text
    assert main(["study", "search", path, "--k", "2", "--proxy", "macro", "--beam", "2"]) == 0
    assert rows(store_path) == after  # nothing new to score


def test_optimize_scores_blends_by_weighted_merges_and_exports_the_best(base, tmp_path, capsys):
    """`study optimize`: every point is a proportion mixture in the store, scored as the
    weighted merge of the unit models (checked by hand for the best), the best point is
    the lowest objective seen, the exports carry its shares, a rerun merges nothing."""
    import json

    from megablocks_ablate.checkpoint import load_model_checkpoint
    from megablocks_ablate.cli import main
    from megablocks_ablate.evaluate import evaluate
    from megablocks_ablate.model.loading import load_model

    spec, root, runner = base
    out = str(tmp_path / "study")
    shutil.copytree(spec["out_dir"], out)
    path = write_spec(str(tmp_path / "s.yaml"), spec, out_dir=out)
    domain = next(iter(runner.study.eval_sets))
    result_file = str(tmp_path / "opt.json")
    argv = ["study", "optimize", path, "--budget", "5", "--domains", domain, "--out", result_file]
    assert main(argv) == 0
    text = capsys.readouterr().out
    res = json.load(open(result_file))
    points = res["search"]["path"] + [res["regression_point"]]
    assert res["search"]["calls"] == 5 and "budget" in res["search"]["stop_reason"]
    best = min(points, key=lambda p: p["objective"])
    assert res["best"]["objective"] == best["objective"]
    assert points[0]["blend"] == pytest.approx(
        {p: 1 / 3 for p in runner.study.partitions}, abs=1e-5
    )
    m = mx.Mixture.of({p: runner.study.partitions[p] for p in best["blend"]}, best["blend"])
    assert res["best"]["mixture_id"] == m.id and "best blend by macro" in text
    with ResultStore(os.path.join(out, "results.sqlite")) as store:
        stored = store.mixtures()
        assert m.id in stored and stored[m.id] == m
        scores = store.scores(m.id, "macro")
    assert scores[domain].perplexity == pytest.approx(best["objective"], rel=1e-12)
    # the weighted merge, by hand: sum_u w_u * theta_u with w_u = share of u's partition
    dirs = {j.name: j.entry.model_dir for j in runner.plan().units}
    w = mx.proxy_weights(m, "macro")
    model, _ = load_model(dirs[m.units[0]])
    states = {u: load_model_checkpoint(dirs[u])[0] for u in w}
    model.load_state_dict(
        {k: sum(w[u] * s[k] for u, s in states.items()) for k in states[m.units[0]]}
    )
    direct = evaluate(model, runner.scorer().suite)
    assert math.isclose(scores[domain].nll_sum, direct[domain].nll_sum, rel_tol=1e-5)
    # exports: the blend's unit weights, as `study export --mixture a=...` prints them
    assert res["export"]["train"]["data"]["weights"] == pytest.approx(w)
    shares = ",".join(f"{p}={v}" for p, v in m.proportions.items())
    assert main(["study", "export", path, "--mixture", shares, "--format", "megatron"]) == 0
    assert capsys.readouterr().out.strip() == res["export"]["megatron"]
    before = rows(os.path.join(out, "results.sqlite"))
    assert main(argv) == 0
    assert json.load(open(result_file))["merged_now"] == 0
    assert rows(os.path.join(out, "results.sqlite")) == before
    # --out naming a file we did not write: refused before any merge, left as it was
    user_file = tmp_path / "notes.json"
    user_file.write_text('{"mine": true}\n')
    assert main([*argv[:-1], str(user_file)]) == 2
    assert "is not a `study optimize` result" in capsys.readouterr().err
    assert user_file.read_text() == '{"mine": true}\n'


def test_a_corrupted_pool_model_is_refused(base, tmp_path, capsys):
    """A unit model whose bytes changed after training stops the study, naming it."""
    from megablocks_ablate.cli import main

    spec, root, runner = base
    out = str(tmp_path / "copy")
    shutil.copytree(spec["out_dir"], out, ignore=shutil.ignore_patterns("results.sqlite*"))
    path = write_spec(str(tmp_path / "s.yaml"), spec, out_dir=out)
    victim = sorted(os.listdir(os.path.join(out, "pool")))[0]
    weights = os.path.join(out, "pool", victim, "final", "model.safetensors")
    data = bytearray(open(weights, "rb").read())
    data[-3] ^= 0x01  # one bit of one weight; same size
    open(weights, "wb").write(bytes(data))
    assert main(["study", "run", path]) == 2
    err = capsys.readouterr().err
    assert weights in err and "differs from the" in err and "train it again" in err


def test_concurrent_runs_refuse_or_share_models(base, tmp_path):
    """A second `study run` of the same study is refused while the first runs; a study
    sharing its registry waits for each model in training and trains each model once."""
    from megablocks_ablate.cli import main

    spec, root, runner = base
    seed_ckpt = os.path.join(str(root), "seed", "final")
    out_a = str(tmp_path / "a")
    path_a = write_spec(
        str(tmp_path / "a.yaml"), spec, out_dir=out_a, seed={"checkpoint": seed_ckpt}
    )
    path_b = write_spec(
        str(tmp_path / "b.yaml"), spec, out_dir=str(tmp_path / "b"), seed={"checkpoint": seed_ckpt}
    )
    first = _cli(path_a, env_extra={"MBA_TRAIN_STEP_DELAY": "0.3"})
    lock = os.path.join(out_a, ".study-run.lock")
    deadline = time.time() + 60
    while not os.path.exists(lock):
        assert first.poll() is None and time.time() < deadline, first.stdout.read()
        time.sleep(0.05)
    assert main(["study", "run", path_a]) == 2  # same study: refused, nothing done
    second = _cli(path_b, "--registry", out_a)  # shares A's pool: waits per model
    log_a, log_b = first.communicate(timeout=300)[0], second.communicate(timeout=300)[0]
    assert first.returncode == 0 and second.returncode == 0, log_a + log_b
    trained = [
        line.split(": done,")[0] for line in (log_a + log_b).splitlines() if ": done," in line
    ]
    assert len(trained) == len(set(trained)) == 5  # 3 unit + 2 seq models, each once


def test_a_diverged_unit_model_stops_the_study_naming_it(base, tmp_path, capsys):
    from megablocks_ablate.cli import main

    spec, root, runner = base
    seed_ckpt = os.path.join(str(root), "seed", "final")
    unit = dict(spec["unit"])
    unit["overrides"] = [
        *unit["overrides"],
        "optimizer.lr=1e6",
        "schedule.warmup_steps=0",
        "schedule.warmup_fraction=0",
    ]
    path = write_spec(
        str(tmp_path / "s.yaml"),
        spec,
        out_dir=str(tmp_path / "study"),
        seed={"checkpoint": seed_ckpt},
        unit=unit,
    )
    assert main(["study", "run", path]) == 2
    err = capsys.readouterr().err
    first = next(iter(spec["partitions"].values()))[0]
    assert "unit model 1/" in err and f"({first})" in err and "diverged" in err
    assert "nan_policy" in err and "models already trained are kept" in err
    assert not os.path.exists(os.path.join(str(tmp_path / "study"), "results.sqlite"))
