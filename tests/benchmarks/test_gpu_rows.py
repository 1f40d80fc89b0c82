"""The GPU suite's pieces that can be checked without a GPU (benchmarks/gpu/).

* what every row hands to torch.distributed: built by ``common.process_group_args``
  (NCCL + an indexed ``device_id`` on CUDA, gloo on CPU), checked here for exactly the
  arguments a CUDA row passes; a scan of the sources fails on a bare ``"cuda"`` device
  and on any torch.distributed call site this file does not cover;
* the preflight's RUN/SKIP decisions on made-up machines (one H100, no CUDA, missing
  modules, no nvcc, nvcc/torch CUDA majors that differ), and its real run on this one;
* the extension build's commands (temp dir, no setup.py), the rows' ``timeout``
  wrapping, the budgets and the docs table of them.

The whole dry run is tests/test_gpu_suite.py (integration).
"""

from __future__ import annotations

import io
import os
import re
import sys
import tokenize

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GPU_DIR = os.path.join(ROOT, "benchmarks", "gpu")
if GPU_DIR not in sys.path:
    sys.path.insert(0, GPU_DIR)

import build_ext  # noqa: E402
import common  # noqa: E402
import nccl_allreduce  # noqa: E402
import preflight  # noqa: E402
import rows  # noqa: E402
import suite  # noqa: E402
import train_step  # noqa: E402

assert common.__file__.startswith(GPU_DIR), common.__file__

SOURCES = sorted(os.path.join(GPU_DIR, f) for f in os.listdir(GPU_DIR) if f.endswith(".py"))


def _torch_accepts_device_id(kwargs: dict) -> None:
    """torch.distributed.init_process_group's own sanity check of ``device_id`` (torch
    2.13, distributed_c10d.py), short of needing the device to exist."""
    dev = kwargs.get("device_id")
    if dev is None:
        return
    assert isinstance(dev, torch.device)
    assert dev.type != "cpu", "gloo rows pass no device_id"
    assert dev.index is not None, "torch refuses a device_id without an index"


# ---- devices and process groups -----------------------------------------------------


def test_process_group_args_cuda_is_nccl_with_an_indexed_device():
    pg = common.process_group_args("cuda", 0)
    assert pg.backend == "nccl"
    assert pg.device == torch.device("cuda", 0) and pg.device.index == 0
    assert pg.device_id == torch.device("cuda", 0) and pg.device_type == "cuda"
    kw = pg.init_kwargs(rank=0, world_size=1, init_method="tcp://127.0.0.1:1")
    assert kw == {
        "backend": "nccl",
        "rank": 0,
        "world_size": 1,
        "init_method": "tcp://127.0.0.1:1",
        "device_id": torch.device("cuda", 0),
    }
    _torch_accepts_device_id(kw)
    assert common.process_group_args("cuda", 3).device_id == torch.device("cuda", 3)


def test_process_group_args_cpu_is_gloo_without_device_id():
    pg = common.process_group_args("cpu")
    assert (pg.backend, pg.device, pg.device_id) == ("gloo", torch.device("cpu"), None)
    kw = pg.init_kwargs(rank=1, world_size=2)
    assert kw == {"backend": "gloo", "rank": 1, "world_size": 2}
    with pytest.raises(ValueError):
        common.process_group_args("mps")
    with pytest.raises(ValueError):
        common.process_group_args("cuda", -1)


def test_row_device_is_always_indexed(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert common.row_device(dry_run=False) == "cuda:0"
    assert common.row_device(dry_run=True) == "cpu"
    assert common.row_device(dry_run=False, device="cuda") == "cuda:0"
    assert common.row_device(dry_run=False, device="cuda:1") == "cuda:1"
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert common.row_device(dry_run=False) == "cuda:2"
    assert torch.device(common.row_device(dry_run=False)).index == 2


def test_train_row_one_rank_group_passes_nccl_and_cuda0(monkeypatch):
    """Exactly what train_1.1b (FSDP2) hands init_process_group on a GPU machine."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    dev = torch.device(common.row_device(dry_run=False))  # the row's args.device
    kw = train_step.one_rank_group_kwargs(dev, 29500)
    assert kw["backend"] == "nccl" and kw["device_id"] == torch.device("cuda", 0)
    assert (kw["rank"], kw["world_size"]) == (0, 1)
    assert kw["init_method"] == "tcp://127.0.0.1:29500"
    _torch_accepts_device_id(kw)
    # a bare "cuda" handed in by hand still gets an index
    assert train_step.one_rank_group_kwargs(torch.device("cuda"), 1)["device_id"].index == 0
    cpu = train_step.one_rank_group_kwargs(torch.device("cpu"), 1)  # the dry run
    assert cpu["backend"] == "gloo" and "device_id" not in cpu


def test_train_row_really_inits_its_group_on_cpu():
    """The dry run's path end to end: the kwargs init a one-rank gloo group."""
    import torch.distributed as dist

    class Cfg:
        class distributed:
            parallel = "fsdp"

    assert not dist.is_initialized()
    with train_step._one_rank_group(Cfg, torch.device("cpu")) as made:
        assert made and dist.get_backend() == "gloo" and dist.get_world_size() == 1
    assert not dist.is_initialized()


@pytest.mark.parametrize("rank", [0, 1, 7])
def test_nccl_row_worker_args(rank):
    pg = nccl_allreduce.worker_group_args("nccl", rank)
    assert pg.backend == "nccl" and pg.device == torch.device("cuda", rank)
    _torch_accepts_device_id(pg.init_kwargs(rank, 8))
    cpu = nccl_allreduce.worker_group_args("gloo", rank)
    assert cpu.backend == "gloo" and cpu.device == torch.device("cpu")
    assert "device_id" not in cpu.init_kwargs(rank, 2)


def _tokens(path: str) -> list[tokenize.TokenInfo]:
    with open(path, encoding="utf-8") as f:
        src = f.read()
    return [
        t
        for t in tokenize.generate_tokens(io.StringIO(src).readline)
        if t.type not in (tokenize.NL, tokenize.COMMENT)
    ]


# Calls that take "cuda" as a device *type* or a string, not as a device.
TYPE_CALLS = {"process_group_args", "init_device_mesh", "startswith", "join"}


def _enclosing_call(toks: list[tokenize.TokenInfo], i: int) -> str | None:
    """The name of the call whose parentheses hold token ``i`` (None: not in a call)."""
    depth = 0
    for j in range(i - 1, -1, -1):
        s = toks[j].string
        if s in (")", "]", "}"):
            depth += 1
        elif s in ("(", "[", "{"):
            if depth == 0:
                before = toks[j - 1] if j else None
                if s == "(" and before is not None and before.type == tokenize.NAME:
                    return before.string
                return None
            depth -= 1
    return None


def _bare_cuda_devices(path: str) -> list[str]:
    """Places where the string "cuda" is used as a whole device (no index). Allowed: a
    comparison (``x.type == "cuda"``), a dict key or subscript, an argument followed by
    more (``torch.device("cuda", i)``), or an argument of a call that takes a device
    type or a string (``process_group_args("cuda", rank)``, ``os.path.join``)."""
    toks = _tokens(path)
    bad = []
    for i, t in enumerate(toks):
        if t.type != tokenize.STRING or t.string.strip("\"'") != "cuda":
            continue
        prev = toks[i - 1].string if i else ""
        nxt = toks[i + 1].string if i + 1 < len(toks) else ""
        if nxt in (",", ":") or prev in ("==", "!=", "in") or (prev, nxt) == ("[", "]"):
            continue
        if _enclosing_call(toks, i) in TYPE_CALLS:
            continue
        bad.append(f"{os.path.basename(path)}:{t.start[0]}: {t.line.strip()}")
    return bad


def test_no_gpu_row_source_uses_a_bare_cuda_device():
    bad = [b for path in SOURCES for b in _bare_cuda_devices(path)]
    assert not bad, (
        "a device without an index (use common.row_device / process_group_args):\n" + "\n".join(bad)
    )
    for path in SOURCES:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        assert not re.search(r"torch\.device\(\s*(type\s*=\s*)?[\"']cuda[\"']\s*\)", text), path


def test_the_guard_catches_what_it_should(tmp_path):
    p = tmp_path / "x.py"
    p.write_text(
        'a = torch.device("cuda")\n'
        'b = args.device or ("cpu" if dry else "cuda")\n'
        'c = dict(device_id="cuda")\n'
        'd = x.to("cuda")\n'
        'e = "cuda"\n'
        'ok1 = torch.device("cuda", rank)\n'
        'ok2 = dev.type == "cuda"\n'
        'ok3 = d.startswith("cuda")\n'
        'ok4 = os.path.join("csrc", "cuda")\n'
        'ok5 = info["cuda"]\n'
        'ok6 = process_group_args("cuda" if nccl else "cpu", rank)\n'
        'ok7 = {"cuda": 1}\n'
    )
    assert [b.split(":")[1] for b in _bare_cuda_devices(str(p))] == ["1", "2", "3", "4", "5"]


# Every torch.distributed call in the GPU rows that takes a backend or a device, and the
# test above that checks what it gets. A new call site fails here until it is covered.
COVERED_CALLS = {
    ("train_step.py", "init_process_group"): "test_train_row_one_rank_group_passes_nccl_and_cuda0",
    ("nccl_allreduce.py", "init_process_group"): "test_nccl_row_worker_args",
}
DIST_CALLS = ("init_process_group", "new_group", "init_device_mesh", "DeviceMesh", "new_subgroups")


def test_every_distributed_call_site_is_covered_and_uses_process_group_args():
    found = {}
    for path in SOURCES:
        if os.path.basename(path) == "common.py":
            continue
        toks = _tokens(path)
        for i, t in enumerate(toks[:-1]):
            if t.type == tokenize.NAME and t.string in DIST_CALLS and toks[i + 1].string == "(":
                if i and toks[i - 1].string == "def":
                    continue
                key = (os.path.basename(path), t.string)
                found[key] = found.get(key, 0) + 1
                if t.string == "init_process_group":
                    # its only argument: **<ProcessGroupArgs>.init_kwargs(...) or **kwargs of
                    # a function that returns them
                    args = "".join(x.string for x in toks[i + 2 : i + 8])
                    assert args.startswith("**"), (key, t.line)
                    assert "init_kwargs" in t.line or "group_kwargs" in t.line, (key, t.line)
    assert set(found) == set(COVERED_CALLS), found
    assert all(n == 1 for n in found.values()), found
    for name in COVERED_CALLS.values():
        assert callable(globals()[name])


# ---- preflight ------------------------------------------------------------------------


def _info(**over) -> dict:
    """A made-up machine: one H100, every module, nvcc 12.8 matching torch 12.8."""
    mods = {
        m: {"importable": True, "version": "1", "error": None}
        for r in rows.ROWS
        for m in [*r.modules, *r.optional]
        if m != "ninja"
    }
    info = {
        "python": {"version": "3.12.0", "executable": "/usr/bin/python3"},
        "torch": {"importable": True, "version": "2.13.0", "cuda_build": "12.8", "nccl": True},
        "cuda": {
            "available": True,
            "device_count": 1,
            "driver_cuda": "12.8",
            "why_not": None,
            "devices": [
                {"index": 0, "name": "NVIDIA H100 80GB HBM3", "capability": "9.0"}
                | {"total_gib": 79.1, "free_gib": 78.5}
            ],
        },
        "nvcc": {
            "path": "/usr/local/cuda/bin/nvcc",
            "version": "12.8",
            "major": 12,
            "torch_cuda_major": 12,
            "matches_torch": True,
            "cuda_home": "/usr/local/cuda",
        },
        "ninja": {"path": "/usr/bin/ninja", "version": "1.11.1"},
        "python_h": True,
        "setuptools": "68.0.0",
        "timeout_cmd": "/usr/bin/timeout",
        "modules": mods,
    }
    for k, v in over.items():
        info[k] = v
    return info


def _by_row(decisions):
    return {d["row"]: d for d in decisions}


def test_one_h100_runs_every_row_but_nccl():
    info = _info()
    d = _by_row(preflight.decide(info, rows.ROWS, dry_run=False))
    assert [n for n, x in d.items() if not x["run"]] == ["nccl"]
    assert d["nccl"]["reason"] == "1 CUDA device visible, needs 2"
    screen = preflight.render(info, list(d.values()), dry_run=False)
    assert "NVIDIA H100 80GB HBM3 (sm 9.0): 78.5 of 79.1 GiB free" in screen
    assert "major matches torch CUDA 12.8" in screen
    assert "=> 12 of 13 rows will run, 1 skipped" in screen
    assert len(screen.splitlines()) <= 50  # one screen


def test_no_cuda_skips_every_gpu_row_and_the_dry_run_runs_them():
    cuda = {"available": False, "device_count": 0, "devices": [], "why_not": "CPU-only build"}
    info = _info(cuda=cuda)
    d = _by_row(preflight.decide(info, rows.ROWS, dry_run=False))
    assert [n for n, x in d.items() if x["run"]] == ["env"]
    assert all(x["reason"] == "no CUDA: CPU-only build" for n, x in d.items() if n != "env")
    assert "no CUDA: CPU-only build: GPU rows skipped" in preflight.render(
        info, list(d.values()), False
    )
    dry = _by_row(preflight.decide(info, rows.ROWS, dry_run=True))
    assert all(x["run"] for x in dry.values())


def test_missing_modules_skip_only_the_rows_that_import_them():
    info = _info()
    for m in ("triton", "sentencepiece", "flash_attn"):
        info["modules"][m] = {"importable": False, "version": None, "error": "No module"}
    d = _by_row(preflight.decide(info, rows.ROWS, dry_run=False))
    assert not d["triton_kernels"]["run"] and "triton" in d["triton_kernels"]["reason"]
    assert not d["train_130m"]["run"] and "sentencepiece" in d["train_130m"]["reason"]
    assert (
        d["merge_kernels"]["run"] and "no triton: reference kernels" in d["merge_kernels"]["notes"]
    )
    assert d["eval"]["run"] and d["merge_eval"]["run"] and d["build_ext"]["run"]
    assert d["train_130m"]["optional"] == {"triton": False, "flash_attn": False}


def test_build_ext_needs_nvcc_and_python_h_and_warns_on_a_cuda_major_mismatch():
    info = _info()
    info["nvcc"] = {**info["nvcc"], "path": None, "version": None, "major": None}
    d = _by_row(preflight.decide(info, rows.ROWS, dry_run=False))
    assert not d["build_ext"]["run"] and "nvcc not on PATH" in d["build_ext"]["reason"]
    assert d["merge_kernels"]["run"]
    assert any("CUDA kernel is not measured" in n for n in d["merge_kernels"]["notes"])

    d = _by_row(preflight.decide(_info(python_h=False), rows.ROWS, dry_run=False))
    assert not d["build_ext"]["run"] and "Python.h" in d["build_ext"]["reason"]

    info = _info()
    info["nvcc"] = {**info["nvcc"], "version": "13.0", "major": 13, "matches_torch": False}
    info["ninja"] = {"path": None, "version": None}
    d = _by_row(preflight.decide(info, rows.ROWS, dry_run=False))
    notes = " ".join(d["build_ext"]["notes"])
    assert d["build_ext"]["run"] and "majors differ" in notes and "no ninja" in notes
    assert "DIFFERS" in preflight.render(info, list(d.values()), False)


def test_no_torch_skips_everything():
    info = _info(torch={"importable": False, "version": None, "cuda_build": None, "error": "x"})
    d = preflight.decide(info, rows.ROWS, dry_run=True)
    assert not any(x["run"] for x in d) and all("torch does not import" in x["reason"] for x in d)


def test_preflight_runs_here_and_writes_json(tmp_path, capsys):
    path = str(tmp_path / "preflight.json")
    assert preflight.main(["--json", path, "--rows", "env,build_ext,nccl"]) == 0
    screen = capsys.readouterr().out
    import json

    with open(path, encoding="utf-8") as f:
        res = json.load(f)
    assert [r["row"] for r in res["rows"]] == ["env", "build_ext", "nccl"]
    assert res["torch"]["version"] == torch.__version__
    assert "GPU suite preflight" in screen and "rows (real run):" in screen
    if not torch.cuda.is_available():
        assert "no CUDA" in screen and "GPU rows skipped" in screen
        assert [r["run"] for r in res["rows"]] == [True, False, False]


# ---- build, timeouts, budgets ---------------------------------------------------------


def test_arch_flags():
    assert build_ext.arch_flags("9.0") == [
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]
    assert build_ext.arch_flags("8.0;9.0a") == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_90a,code=compute_90a",
    ]
    with pytest.raises(ValueError):
        build_ext.arch_flags("sm90")


def test_the_build_works_on_a_copy_in_a_temp_dir_without_setup_py(tmp_path):
    sources = build_ext.copy_sources(str(tmp_path / "src"))
    assert [os.path.basename(s) for s in sources] == ["merge.cu", "module.cpp"]
    assert os.path.isfile(tmp_path / "src" / "registry.h")
    out = str(tmp_path / "out" / "_C_cuda.so")
    cmd = build_ext.nvcc_command("nvcc", sources, out, "9.0")
    assert cmd[0] == "nvcc" and "-shared" in cmd and cmd[-2:] == ["-o", out]
    assert all(not c.startswith(ROOT) for c in cmd if c.endswith((".cu", ".cpp")))
    includes = [c[2:] for c in cmd if c.startswith("-I")]
    assert any(os.path.isfile(os.path.join(d, "pybind11", "pybind11.h")) for d in includes)
    assert any(os.path.isfile(os.path.join(d, "Python.h")) for d in includes)
    text = build_ext.JIT + " ".join(cmd)
    assert "setup.py" not in text and "pyproject" not in text and "setuptools" not in text
    assert "load(" in build_ext.JIT and "build_directory=build" in build_ext.JIT


def test_every_row_runs_under_its_own_timeout(tmp_path):
    class Args:
        dry_run = False
        ext_status = "failed: nvcc exit code 1"

    spec = rows.BY_NAME["merge_kernels"]
    cmd = suite.row_command(spec, Args, str(tmp_path), str(tmp_path / "r.json"), 35.04)
    if cmd[0].endswith("timeout"):
        assert cmd[1:6] == ["-k", "5", "-s", "TERM", "35.0"] and cmd[6] == sys.executable
    assert cmd[cmd.index("--ext-status") + 1] == Args.ext_status
    cmd = suite.row_command(rows.BY_NAME["eval"], Args, str(tmp_path), "r.json", 10)
    assert "--ext-status" not in cmd  # only the row that measures the extension


def test_budgets_fit_eight_minutes_and_build_comes_before_the_timed_rows():
    names = [r.name for r in rows.ROWS]
    assert names[:2] == ["env", "build_ext"]
    assert rows.TOTAL_BUDGET_S + rows.PREFLIGHT_TIMEOUT_S + rows.SETUP_RESERVE_S <= 480
    assert all(r.budget_s > 0 and r.what for r in rows.ROWS)


def test_docs_table_lists_every_row_with_its_timeout():
    with open(os.path.join(ROOT, "docs", "benchmarks.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("## GPU suite rows", 1)[1].split("\n## ", 1)[0]
    for r in rows.ROWS:
        line = next((x for x in section.splitlines() if x.startswith(f"| `{r.name}` |")), None)
        assert line is not None, r.name
        assert line.rstrip().endswith(f"| {r.budget_s:.0f} s |"), line


# ---- switch rows: environment variants and the baseline of the same suite run -----------


def test_variant_items_split_into_environment_and_config(monkeypatch):
    from megablocks_ablate.kernels import dispatch

    env, rest = train_step._split_env(
        ["MBA_ATTENTION=sdpa", "micro_batch=8", "MBA_CE_CHUNKS=legacy"]
    )
    assert env == {"MBA_ATTENTION": "sdpa", "MBA_CE_CHUNKS": "legacy"} and rest == ["micro_batch=8"]
    monkeypatch.delenv("MBA_ATTENTION", raising=False)
    dispatch.set_attention_backend(None)
    with train_step._environment({"MBA_ATTENTION": "math"}):
        assert dispatch.configured_attention() == "math"  # re-read for this run
        assert train_step._attention_impl(torch.device("cpu")) == "math (MBA_ATTENTION=math)"
    assert "MBA_ATTENTION" not in os.environ and dispatch.configured_attention() == "auto"


def test_mb8_row_compares_with_the_1_1b_row_of_the_same_run(tmp_path):
    spec = rows.BY_NAME["train_1.1b_mb8"]
    assert spec.args[spec.args.index("--preset") + 1] == "1.1b_seed_mb8"
    assert spec.args[spec.args.index("--baseline-row") + 1] == "train_1.1b"
    # same tokens per optimizer step as train_1.1b (4 x 2): 8 x 1
    assert spec.args[spec.args.index("--accum") + 1] == "1"
    names = [r.name for r in rows.ROWS]
    assert names.index("train_1.1b") < names.index("train_1.1b_mb8")
    import json

    base = {"status": "ok", "dry_run": False, "details": {"tokens_per_s": 1000.0}}
    base["details"].update(micro_batch=4, grad_accum=2, mfu=0.4, peak_memory_gib=20.0)
    (tmp_path / "train_1.1b.json").write_text(json.dumps(base))
    me = str(tmp_path / "train_1.1b_mb8.json")
    got = train_step.baseline_from_row(me, "train_1.1b", dry_run=False)
    assert got["source"] == "row train_1.1b" and got["tokens_per_s"] == 1000.0
    assert got["micro_batch"] == 4 and got["peak_memory_gib"] == 20.0
    assert train_step.baseline_from_row(me, "train_1.1b", dry_run=True) is None  # other mode
    base["status"] = "failed"
    (tmp_path / "train_1.1b.json").write_text(json.dumps(base))
    assert train_step.baseline_from_row(me, "train_1.1b", dry_run=False) is None
    assert train_step.baseline_from_row(me, "nope", dry_run=False) is None


def test_each_switch_has_its_row_and_the_docs_name_it():
    switches = {
        "attention": "MBA_ATTENTION",
        "ce_chunks": "MBA_CE_CHUNKS",
        "train_1.1b_mb8": "1.1b_seed_mb8",
    }
    with open(os.path.join(ROOT, "docs", "benchmarks.md"), encoding="utf-8") as f:
        text = f.read()
    for row, switch in switches.items():
        assert switch in rows.BY_NAME[row].switch, row
        assert switch in text.split("## GPU suite rows", 1)[1], switch
