"""`megablocks-ablate eval` and tools/eval_perplexity.py (commands/eval.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import pytest

from megablocks_ablate.cli import main
from megablocks_ablate.evaluate import EvalSuite, evaluate
from megablocks_ablate.model.loading import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_eval_command_writes_results(tiny_checkpoint, eval_dir, sp_model_path, tmp_path, capsys):
    out = tmp_path / "res" / "results.json"
    cache = str(tmp_path / "cache")
    rc = main(
        [
            "eval",
            "--model",
            tiny_checkpoint,
            "--eval-sets",
            eval_dir,
            "--out",
            str(out),
            "--cache-dir",
            cache,
            "--stride",
            "16",
        ]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["format"] == "megablocks-ablate/eval@1"
    assert data["settings"]["stride"] == 16 and data["settings"]["world_size"] == 1
    got = data["models"][tiny_checkpoint]["results"]
    # the same numbers as the library call with the lineage's tokenizer
    model, _ = load_model(tiny_checkpoint)
    ref = evaluate(model, EvalSuite.load(eval_dir, sp_model_path, cache_dir=cache), stride=16)
    assert set(got) == {"bio", "cs", "mixed"}
    for d, r in ref.items():
        assert got[d]["perplexity"] == r.perplexity
        assert got[d]["bits_per_byte"] == r.bits_per_byte
        assert got[d]["tokens"] == r.tokens and got[d]["documents"] == r.documents
    assert data["eval_sets"]["mixed"]["empty_documents"] == 1
    assert "bio" in capsys.readouterr().out


def test_tool_script_same_as_command(tiny_checkpoint, eval_dir, tmp_path):
    spec = importlib.util.spec_from_file_location(
        "eval_perplexity", os.path.join(ROOT, "tools", "eval_perplexity.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "r.json"
    two = str(tmp_path / "second")
    shutil.copytree(tiny_checkpoint, two)
    rc = tool.main(
        [
            "--model",
            tiny_checkpoint,
            "--model",
            two,
            "--eval-sets",
            f"{eval_dir}/bio.jsonl",
            "--out",
            str(out),
            "--cache-dir",
            str(tmp_path / "c"),
        ]
    )
    assert rc == 0
    models = json.loads(out.read_text())["models"]
    assert models[tiny_checkpoint]["results"] == models[two]["results"]
    assert list(models[two]["results"]) == ["bio"]


def _with_lineage(src: str, dst: str, **changes) -> str:
    shutil.copytree(src, dst)
    path = os.path.join(dst, "lineage.json")
    with open(path) as f:
        lineage = json.load(f)
    lineage.update(changes)
    with open(path, "w") as f:
        json.dump(lineage, f)
    return dst


def test_refuses_tokenizer_other_than_the_models(tiny_checkpoint, eval_dir, tmp_path, capsys):
    other = _with_lineage(tiny_checkpoint, str(tmp_path / "other"), tokenizer_fingerprint="ab" * 32)
    rc = main(
        [
            "eval",
            "--model",
            other,
            "--eval-sets",
            eval_dir,
            "--out",
            str(tmp_path / "r.json"),
            "--cache-dir",
            str(tmp_path / "c"),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "tokenizer fingerprint" in err and "abababab" in err and other in err
    assert not (tmp_path / "r.json").exists()


def test_missing_tokenizer_and_bad_inputs_are_clear_errors(
    tiny_checkpoint, eval_dir, tmp_path, capsys
):
    none = _with_lineage(tiny_checkpoint, str(tmp_path / "none"), extra={})
    out = str(tmp_path / "r.json")
    assert main(["eval", "--model", none, "--eval-sets", eval_dir, "--out", out]) == 2
    assert "pass --tokenizer" in capsys.readouterr().err
    assert (
        main(["eval", "--model", str(tmp_path / "nope"), "--eval-sets", eval_dir, "--out", out])
        == 2
    )
    assert "checkpoint directory does not exist" in capsys.readouterr().err
    assert (
        main(
            [
                "eval",
                "--model",
                tiny_checkpoint,
                "--eval-sets",
                str(tmp_path / "x.jsonl"),
                "--out",
                out,
                "--cache-dir",
                str(tmp_path / "c"),
            ]
        )
        == 2
    )
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # refused by argparse, before anything runs
        main(
            [
                "eval",
                "--model",
                tiny_checkpoint,
                "--eval-sets",
                eval_dir,
                "--out",
                out,
                "--stride",
                "0",
            ]
        )
    assert e.value.code == 2
    assert "argument --stride: expected an integer >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--eval-sets", eval_dir, "--out", out])  # --model is required


def test_nan_model_is_an_error_naming_model_and_domain(tiny_checkpoint, eval_dir, tmp_path, capsys):
    from megablocks_ablate.checkpoint import load_model_checkpoint, save_model_checkpoint

    state, config, lineage = load_model_checkpoint(tiny_checkpoint)
    state["norm.weight"][3] = float("nan")  # a diverged model: every logit is NaN
    bad = str(tmp_path / "diverged")
    save_model_checkpoint(bad, state, config, lineage)
    out = tmp_path / "r.json"
    args = ["--eval-sets", eval_dir, "--out", str(out), "--cache-dir", str(tmp_path / "c")]
    assert main(["eval", "--model", tiny_checkpoint, "--model", bad, *args]) == 2
    err = capsys.readouterr().err
    assert f"error: {bad}: non-finite evaluation result on domains 'bio' (NLL sum nan" in err
    assert "'cs'" in err and "'mixed'" in err and "Traceback" not in err
    assert not out.exists()  # nothing half-right is written, not even the good model


def test_results_json_is_standard_json(tiny_checkpoint, eval_dir, tmp_path):
    from megablocks_ablate.commands.eval import json_text
    from megablocks_ablate.errors import NonFiniteError

    out = tmp_path / "r.json"
    args = ["--eval-sets", eval_dir, "--out", str(out), "--cache-dir", str(tmp_path / "c")]
    assert main(["eval", "--model", tiny_checkpoint, *args]) == 0

    def strict(token):
        raise AssertionError(f"non-standard JSON token {token}")

    json.loads(out.read_text(), parse_constant=strict)
    obj = {"models": {"m": {"results": {"bio": {"perplexity": float("inf")}}}}, "x": [1.0]}
    with pytest.raises(
        NonFiniteError,
        match=r"r.json: not written: \['models'\]\['m'\]\['results'\]\['bio'\]\['perplexity'\]"
        r" is inf",
    ):
        json_text(obj, "r.json")
    with pytest.raises(NonFiniteError, match=r"\['x'\]\[1\] is nan"):
        json_text({"x": [1.0, float("nan")]}, "r.json")
    assert json.loads(json_text({"x": [1.0, 2]}, "r.json")) == {"x": [1.0, 2]}


def _eval(models, eval_dir, tmp_path, *extra) -> tuple[int, dict | None]:
    out = tmp_path / "r.json"
    args = ["eval", "--eval-sets", f"{eval_dir}/bio.jsonl", "--out", str(out)]
    args += ["--cache-dir", str(tmp_path / "c"), *extra]
    for m in models:
        args += ["--model", m]
    rc = main(args)
    return rc, (json.loads(out.read_text()) if out.exists() else None)


def test_merged_checkpoint_finds_its_tokenizer(tiny_checkpoint, eval_dir, sp_model_path, tmp_path):
    from megablocks_ablate.merge.file_merge import merge_checkpoints
    from megablocks_ablate.merge.spec import MergeSpec

    b = str(tmp_path / "b")
    shutil.copytree(tiny_checkpoint, b)
    spec = MergeSpec.from_dict(
        {"checkpoints": {"a": tiny_checkpoint, "b": b}, "uniform": True}, source="t.yaml"
    )
    merged = str(tmp_path / "merged")
    lineage = merge_checkpoints(spec, merged, allow_different_seed=True, show_progress=False)
    # the inputs' record (an old bare path here), now in the {"path", "fingerprint"} form
    assert lineage.extra["tokenizer"] == {
        "path": sp_model_path,
        "fingerprint": lineage.tokenizer_fingerprint,
    }
    rc, data = _eval([merged], eval_dir, tmp_path)
    assert rc == 0 and data["tokenizer"]["fingerprint"] == lineage.tokenizer_fingerprint
    assert data["tokenizer"]["path"] == sp_model_path


def test_old_merged_checkpoint_finds_tokenizer_through_parents(
    tiny_checkpoint, eval_dir, sp_model_path, tmp_path
):
    old = _with_lineage(
        tiny_checkpoint, str(tmp_path / "old"), kind="merged", extra={}, parents=[tiny_checkpoint]
    )
    rc, data = _eval([old], eval_dir, tmp_path)
    assert rc == 0 and data["tokenizer"]["path"] == sp_model_path


def test_later_models_record_serves_when_the_first_has_none(tiny_checkpoint, eval_dir, tmp_path):
    none = _with_lineage(tiny_checkpoint, str(tmp_path / "none"), extra={})
    rc, data = _eval([none, tiny_checkpoint], eval_dir, tmp_path)
    assert rc == 0 and set(data["models"]) == {none, tiny_checkpoint}


def test_tokenizer_override_is_fingerprint_checked(
    tiny_checkpoint, eval_dir, tiny_corpus, tmp_path, capsys
):
    from megablocks_ablate.data.tokenizer import train_sentencepiece

    other = train_sentencepiece([tiny_corpus], str(tmp_path / "other"), 400)
    rc, data = _eval([tiny_checkpoint], eval_dir, tmp_path, "--tokenizer", other)
    assert rc == 2 and data is None
    err = capsys.readouterr().err
    assert "tokenizer fingerprint" in err and other in err and tiny_checkpoint in err


def test_out_naming_a_directory_is_a_clear_error(tiny_checkpoint, eval_dir, tmp_path, capsys):
    d = tmp_path / "results"
    d.mkdir()
    (d / "keep.txt").write_text("mine")
    rc = main(["eval", "--model", tiny_checkpoint, "--eval-sets", str(eval_dir), "--out", str(d)])
    assert rc == 2 and f"--out {d}: is a directory" in capsys.readouterr().err
    assert os.listdir(d) == ["keep.txt"]
