"""Every file a command writes is claimed: `eval --out`, `index concat --out`,
`tokenizer train --out` and `study report --out` refuse an input, a file of another
kind or a user's file in one `error:` line naming it, every byte left as it was, and
replace their own earlier output only when asked (docs/reliability.md)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
from claims_fixtures import refused, snapshot

from megablocks_ablate.checkpoint import Lineage, save_model_checkpoint
from megablocks_ablate.cli import main
from megablocks_ablate.data.indexed import IndexedDataset, IndexedDatasetWriter


def _eval(model: str, eval_set: str, out, cache, *extra: str) -> int:
    argv = ["eval", "--model", model, "--eval-sets", eval_set, "--out", str(out)]
    return main([*argv, "--cache-dir", str(cache), *extra])


# ----------------------------------------------------------------------------- eval


def test_eval_refuses_its_models_weights_and_its_eval_set(tiny_ckpt, eval_set, tmp_path, capsys):
    weights = os.path.join(tiny_ckpt, "model.safetensors")
    before = snapshot(tiny_ckpt), snapshot(os.path.dirname(eval_set))
    for overwrite in ([], ["--overwrite"]):
        rc = _eval(tiny_ckpt, eval_set, weights, tmp_path / "c", *overwrite)
        refused(capsys, rc, f"--out {weights}: is inside the input {tiny_ckpt}")
        rc = _eval(tiny_ckpt, eval_set, eval_set, tmp_path / "c", *overwrite)
        refused(capsys, rc, f"--out {eval_set}: is the input {eval_set}")
        rc = _eval(tiny_ckpt, f"bio={eval_set}", eval_set, tmp_path / "c", *overwrite)
        refused(capsys, rc, f"--out {eval_set}: is the input")
    assert (snapshot(tiny_ckpt), snapshot(os.path.dirname(eval_set))) == before
    assert not (tmp_path / "c").exists()  # refused before anything was tokenized


def test_eval_refuses_other_weights_a_results_store_and_a_users_file(
    tiny_ckpt, eval_set, tmp_path, capsys
):
    from megablocks_ablate.ablate.store import ResultStore

    other = tmp_path / "other"
    save_model_checkpoint(str(other), {"w": torch.ones(3)}, {}, Lineage(kind="seed"))
    with ResultStore(str(tmp_path / "study" / "results.sqlite")) as store:
        store.set_meta("study", {"name": "s"})
    (tmp_path / "notes.json").write_text('{"my": "figures"}\n')
    before = snapshot(tmp_path)
    targets = [other / "model.safetensors", tmp_path / "study" / "results.sqlite"]
    for target in [*targets, tmp_path / "notes.json"]:
        for overwrite in ([], ["--overwrite"]):
            rc = _eval(tiny_ckpt, eval_set, target, tmp_path / "c", *overwrite)
            refused(capsys, rc, f"--out {target}: exists and is a file megablocks-ablate did not")
    rc = _eval(tiny_ckpt, eval_set, tmp_path / "study", tmp_path / "c")
    refused(capsys, rc, f"--out {tmp_path / 'study'}: is a directory")
    assert snapshot(tmp_path) == before


def test_eval_replaces_its_own_results_only_with_overwrite(tiny_ckpt, eval_set, tmp_path, capsys):
    out, cache = tmp_path / "r.json", tmp_path / "c"
    assert _eval(tiny_ckpt, eval_set, out, cache) == 0
    first = json.loads(out.read_text())
    assert first["format"] == "megablocks-ablate/eval@1"
    out.write_text(json.dumps({**first, "note": "kept until --overwrite"}))
    capsys.readouterr()
    before = out.read_bytes()
    refused(capsys, _eval(tiny_ckpt, eval_set, out, cache), f"--out {out}: holds a previous eval")
    assert out.read_bytes() == before
    assert _eval(tiny_ckpt, eval_set, out, cache, "--overwrite") == 0
    assert json.loads(out.read_text()) == first  # replaced by the same results
    assert sorted(os.listdir(tmp_path)) == ["c", "r.json"]  # no lock, no temporary left


def test_eval_checks_out_again_before_writing(tiny_ckpt, eval_set, tmp_path, capsys, monkeypatch):
    """A file that appears at --out while eval runs (another eval, a user) is not replaced."""
    from megablocks_ablate.commands import eval as eval_command

    out = tmp_path / "r.json"
    evaluate = eval_command._evaluate_model

    def meanwhile(*args, **kwargs):
        out.write_text("written by someone else meanwhile\n")
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(eval_command, "_evaluate_model", meanwhile)
    rc = _eval(tiny_ckpt, eval_set, out, tmp_path / "c")
    refused(capsys, rc, f"--out {out}: exists and is a file megablocks-ablate did not write")
    assert out.read_text() == "written by someone else meanwhile\n"


# ----------------------------------------------------------------------------- index concat


def _dataset(prefix, docs) -> str:
    with IndexedDatasetWriter(str(prefix), np.uint16) as w:
        for d in docs:
            w.add_document(d)
    return str(prefix)


def _docs(prefix) -> list[list[int]]:
    with IndexedDataset(str(prefix)) as ds:
        return [ds[i].tolist() for i in range(len(ds))]


def test_concat_refuses_an_input_and_a_dataset_it_did_not_write(tmp_path, capsys):
    a = _dataset(tmp_path / "a", [[1, 2, 3], [4]])
    b = _dataset(tmp_path / "b", [[5, 6]])
    c = _dataset(tmp_path / "c", [[7]])  # e.g. a preprocess unit
    before = snapshot(tmp_path)
    for overwrite in ([], ["--overwrite"]):
        for out in (a, a + ".idx", b + ".bin"):
            rc = main(["index", "concat", "--out", out, a, b, *overwrite])
            refused(capsys, rc, "--out ", ": is the input ")
        rc = main(["index", "concat", "--out", c, a, b, *overwrite])
        refused(capsys, rc, f"--out {c}.bin: exists and is a file megablocks-ablate did not")
    (tmp_path / "d.idx").write_bytes(b"my index\n")  # only the .idx of OUT exists: a user's
    before["d.idx"] = snapshot(tmp_path)["d.idx"]
    rc = main(["index", "concat", "--out", str(tmp_path / "d"), a, b, "--overwrite"])
    refused(capsys, rc, f"--out {tmp_path / 'd'}.idx: exists and is a file megablocks-ablate")
    assert snapshot(tmp_path) == before  # inputs, c and d.idx byte for byte; no d.bin


def test_concat_replaces_its_own_output_only_with_overwrite(tmp_path, capsys):
    a = _dataset(tmp_path / "a", [[1, 2, 3], [4]])
    b = _dataset(tmp_path / "b", [[5, 6]])
    out = str(tmp_path / "ab")
    assert main(["index", "concat", "--out", out, a, b]) == 0
    assert _docs(out) == [[1, 2, 3], [4], [5, 6]]
    capsys.readouterr()
    before = snapshot(tmp_path)
    rc = main(["index", "concat", "--out", out, b, a])
    refused(capsys, rc, f"--out {out}.bin: holds a previous index-concat output; pass --overwrite")
    assert snapshot(tmp_path) == before
    assert main(["index", "concat", "--out", out + ".idx", b, a, "--overwrite"]) == 0
    assert _docs(out) == [[5, 6], [1, 2, 3], [4]]
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith((".ab", "ab"))) == [
        ".ab.bin.megablocks-ablate.json",
        ".ab.idx.megablocks-ablate.json",
        "ab.bin",
        "ab.idx",
    ]


def test_concat_into_a_locked_output_is_refused(tmp_path, capsys):
    from megablocks_ablate.utils.output_files import output_lock

    a = _dataset(tmp_path / "a", [[1]])
    out = str(tmp_path / "ab")
    with output_lock(out, f"index concat --out {out}"):
        rc = main(["index", "concat", "--out", out, a])
    refused(capsys, rc, f"index concat --out {out} is in progress (pid {os.getpid()}")
    assert not os.path.exists(out + ".bin") and not os.path.exists(out + ".idx")


# ----------------------------------------------------------------------------- tokenizer


def _train_tokenizer(corpus: str, out, *extra: str) -> int:
    argv = ["tokenizer", "train", "--input", corpus, "--vocab-size", "400", "--out", str(out)]
    return main([*argv, "--max-documents", "100", "--threads", "1", *extra])


def test_tokenizer_train_refuses_a_users_tokenizer(tiny_corpus, sp_model_path, tmp_path, capsys):
    import shutil

    shutil.copy(sp_model_path, tmp_path / "tok.model")  # a tokenizer of the user's
    (tmp_path / "tok.vocab").write_text("my vocabulary\n")
    before = snapshot(tmp_path)
    for out in ("tok", "tok.model"):
        for overwrite in ([], ["--overwrite"]):
            rc = _train_tokenizer(tiny_corpus, tmp_path / out, *overwrite)
            refused(capsys, rc, f"--out {tmp_path / 'tok.model'}: exists and is a file")
    os.remove(tmp_path / "tok.model")  # the .vocab alone is refused just the same
    del before["tok.model"]
    rc = _train_tokenizer(tiny_corpus, tmp_path / "tok", "--overwrite")
    refused(capsys, rc, f"--out {tmp_path / 'tok.vocab'}: exists and is a file")
    assert snapshot(tmp_path) == before


def test_tokenizer_train_replaces_its_own_only_with_overwrite(tiny_corpus, tmp_path, capsys):
    out = tmp_path / "tok"
    assert _train_tokenizer(tiny_corpus, out) == 0
    capsys.readouterr()
    before = snapshot(tmp_path)
    rc = _train_tokenizer(tiny_corpus, out, "--vocab-size", "380")
    refused(capsys, rc, f"--out {out}.model: holds a previous tokenizer output; pass --overwrite")
    assert snapshot(tmp_path) == before
    assert _train_tokenizer(tiny_corpus, out, "--overwrite", "--vocab-size", "380") == 0
    from megablocks_ablate.data.tokenizer import load_tokenizer

    assert load_tokenizer(str(out) + ".model").vocab_size == 380
    assert sorted(os.listdir(tmp_path)) == [
        ".tok.model.megablocks-ablate.json",
        ".tok.vocab.megablocks-ablate.json",
        "tok.model",
        "tok.vocab",
    ]


# ----------------------------------------------------------------------------- study report


@pytest.fixture
def store_path(tmp_path) -> str:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "ablate"))
    from study_fixtures import fill_store

    store, _ = fill_store(str(tmp_path / "study" / "results.sqlite"))
    store.close()
    return str(tmp_path / "study" / "results.sqlite")


def _report(store: str, *extra: str) -> int:
    return main(["study", "report", "--store", store, "--bootstrap", "5", "--no-plots", *extra])


def test_report_refuses_a_users_report_md(store_path, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("# my own report\n")
    default = tmp_path / "study" / "report"  # report/ beside the store: a user's directory
    default.mkdir()
    (default / "report.md").write_text("# also mine\n")
    before = snapshot(tmp_path)
    rc = _report(store_path, "--out", str(mine))
    refused(capsys, rc, f"--out {mine}: exists and holds files megablocks-ablate did not write")
    rc = _report(store_path)
    refused(capsys, rc, f"{default}: exists and holds files megablocks-ablate did not write")
    rc = _report(store_path, "--out", store_path)
    refused(capsys, rc, f"--out {store_path}: is the input")
    rc = _report(store_path, "--out", str(tmp_path / "study"))
    refused(capsys, rc, "exists and holds a study output")
    assert snapshot(tmp_path) == before


def test_report_rebuilds_its_own_report_keeping_a_users_file(store_path, tmp_path, capsys):
    out = tmp_path / "rep"
    assert _report(store_path, "--out", str(out)) == 0
    first = (out / "report.md").read_text()
    (out / "notes.txt").write_text("my notes\n")
    (out / "report.md").write_text("stale\n")
    assert _report(store_path, "--out", str(out)) == 0  # rebuilding is what report is for
    assert (out / "report.md").read_text() == first
    assert (out / "notes.txt").read_text() == "my notes\n"
