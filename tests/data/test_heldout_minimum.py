"""Preprocess's held-out minimum (--heldout-min-docs): every partition that can spare a
document gets a held-out set, chosen deterministically, recorded and reported."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from megablocks_ablate.cli import main as cli_main
from megablocks_ablate.data import preprocess as pp
from megablocks_ablate.data import preprocess_minimum as pmin
from megablocks_ablate.data.indexed import IndexedDataset
from megablocks_ablate.data.manifest import Manifest
from megablocks_ablate.data.partition import (
    hash_below,
    heldout_hash,
    order_value,
    partition_key,
    split_units,
)
from megablocks_ablate.data.preprocess import PreprocessConfig, run_preprocess
from megablocks_ablate.data.tokenizer import load_tokenizer
from megablocks_ablate.errors import ConfigError

# 0.01 of the tiny corpus's 100-document partitions: history 2, physics 1, biology and
# economics none (checked below); "pair" has 2 documents, "lonely" 1.
FRACTION = 0.01
UNIT_TOKENS = 2500


@pytest.fixture(scope="module")
def lines(tiny_corpus) -> list[str]:
    out = open(tiny_corpus, encoding="utf-8").read().splitlines()
    extra = [
        {"id": "lonely", "fos": "lonely", "year": 2001, "text": "A partition of one document."},
        {"id": "pair-a", "fos": "pair", "year": 2003, "text": "The first of two documents."},
        {"id": "pair-b", "fos": "pair", "year": 2002, "text": "The second of two documents."},
    ]
    for i, rec in enumerate(extra):
        out.insert(50 + 100 * i, json.dumps(rec))
    return out


def _inputs(d, lines, n_files: int) -> list[str]:
    step = -(-len(lines) // n_files)
    paths = []
    for i in range(n_files):
        p = d / f"part{i}.jsonl"
        p.write_text("\n".join(lines[i * step : (i + 1) * step]) + "\n")
        paths.append(str(p))
    return paths


def _config(inputs, out, tok, **kw) -> PreprocessConfig:
    base = dict(
        input=list(inputs),
        out=str(out),
        tokenizer=tok,
        partition_by=["fos"],
        order_by="year",
        unit_tokens=UNIT_TOKENS,
        remainder="keep",
        heldout_fraction=FRACTION,
        workers=1,
        batch_size=7,
    )
    base.update(kw)
    return PreprocessConfig.from_dict(base)


def _reference(lines: list[str], min_docs: int) -> tuple[dict, dict]:
    """Straight from the rule: per partition, the documents hashing below the fraction;
    fewer than ``min_docs`` -> add the training documents of smallest (hash, input
    position), unless that leaves none to train on. Returns ({partition: held-out
    input positions}, {partition: training input positions}), both in input order."""
    parts: dict[str, list[tuple[int, int]]] = {}
    for pos, line in enumerate(lines):
        rec = json.loads(line)
        parts.setdefault(partition_key(rec, ["fos"]), []).append((heldout_hash(rec["text"]), pos))
    held, train = {}, {}
    for key, docs in parts.items():
        h = [pos for x, pos in docs if hash_below(x, FRACTION)]
        t = sorted((x, pos) for x, pos in docs if not hash_below(x, FRACTION))
        need = min_docs - len(h)
        if need > 0 and len(t) - need >= 1:
            h += [pos for _, pos in t[:need]]
            t = t[need:]
        held[key], train[key] = sorted(h), sorted(pos for _, pos in t)
    return held, train


def _ids(path) -> list[str]:
    return [json.loads(x)["id"] for x in open(path, encoding="utf-8")]


def _unit_reference(lines, tok_path, held: dict, train: dict) -> tuple[dict, dict]:
    """({unit: training ids in unit order}, {unit: held-out ids in input order}): units
    cut in (year, input position) order, each held-out document in the unit of the
    first training document after it (the last one's when none follows)."""
    tok = load_tokenizer(tok_path)
    recs = [json.loads(x) for x in lines]
    units: dict[str, list[str]] = {}
    unit_held: dict[str, list[str]] = {}
    for key in train:
        order = lambda pos: (order_value(recs[pos], "year"), pos)
        tr = sorted(train[key], key=order)
        lengths = np.array([len(tok.encode_document(recs[p]["text"])) for p in tr])
        ranges, _, _ = split_units(lengths, UNIT_TOKENS, keep_remainder=True)
        for ui, (a, b) in enumerate(ranges):
            units[f"{key}-{ui:04d}"] = [recs[p]["id"] for p in tr[a:b]]
        for pos in held[key]:
            after = sum(order(p) < order(pos) for p in tr)
            ui = next(u for u, (a, b) in enumerate(ranges) if min(after, len(tr) - 1) < b)
            unit_held.setdefault(f"{key}-{ui:04d}", []).append(recs[pos]["id"])
    return units, unit_held


@pytest.fixture(scope="module")
def topped(tmp_path_factory, lines, sp_model_path):
    d = tmp_path_factory.mktemp("minimum")
    inputs = _inputs(d, lines, 3)
    out = d / "out"
    return run_preprocess(_config(inputs, out, sp_model_path, heldout_min_docs=3)), inputs


def test_the_fraction_alone_leaves_partitions_without_heldout(lines):
    held, _ = _reference(lines, 0)
    assert {k: len(v) for k, v in held.items()} == {
        "biology": 0,
        "physics": 1,
        "history": 2,
        "economics": 0,
        "lonely": 0,
        "pair": 0,
    }


def test_partitions_below_the_minimum_are_topped_up_by_smallest_hash(topped, lines, sp_model_path):
    m, _ = topped
    held, train = _reference(lines, 3)
    assert {k: len(v) for k, v in held.items()} == {
        "biology": 3,
        "physics": 3,
        "history": 3,
        "economics": 3,
        "lonely": 0,
        "pair": 0,  # 2 documents: holding out 3 would leave none to train on
    }
    ids = [json.loads(x)["id"] for x in lines]
    for key, positions in held.items():
        info = m.partitions[key]
        assert info["documents"] == len(train[key])
        if not positions:
            assert info["heldout"] is None and m.heldout_path(key) is None
            continue
        assert _ids(m.heldout_path(key)) == [ids[p] for p in positions]  # input order
        assert info["heldout"]["documents"] == len(positions)
        assert info["heldout"]["minimum_added"] == {"physics": 2, "history": 1}.get(key, 3)
        assert info["heldout_missing"] is None
    # the units hold exactly the remaining training documents, and the per-unit
    # held-out sets place the moved documents like any held-out document
    ref_units, ref_held = _unit_reference(lines, sp_model_path, held, train)
    assert sorted(m.units) == sorted(ref_units)
    tok = load_tokenizer(sp_model_path)
    texts = {json.loads(x)["id"]: json.loads(x)["text"] for x in lines}
    for unit, unit_ids in ref_units.items():
        with IndexedDataset(m.unit_prefix(unit)) as ds:
            assert [ds[i].tolist() for i in range(len(ds))] == [
                tok.encode_document(texts[i]) for i in unit_ids
            ]
        path = m.unit_heldout_path(unit)
        assert (_ids(path) if path else []) == ref_held.get(unit, [])
    m.verify()


def test_manifest_records_settings_counts_and_reasons(topped, lines, sp_model_path):
    m, _ = topped
    held, _ = _reference(lines, 3)
    tok = load_tokenizer(sp_model_path)
    texts = [json.loads(x)["text"] for x in lines]
    for key, positions in held.items():
        if positions:
            want = sum(len(tok.encode_document(texts[p])) for p in positions)
            assert m.partitions[key]["heldout"]["tokens"] == want
    without = m.data["heldout"]["partitions_without"]
    assert m.data["heldout"]["fraction"] == FRACTION
    assert m.data["heldout"]["min_documents"] == 3
    assert m.data["heldout"]["salt"] == 0
    assert set(without) == {"lonely", "pair"}
    assert without["lonely"].startswith("1 document: too few to hold out 3")
    assert without["pair"].startswith("2 documents: too few to hold out 3")
    assert m.partitions["pair"]["heldout_missing"] == without["pair"]
    totals = m.data["totals"]
    assert totals["documents_heldout"] == 12
    assert totals["tokens_heldout"] == sum(
        p["heldout"]["tokens"] for p in m.partitions.values() if p["heldout"]
    )


def test_default_minimum_of_one_and_the_log_names_what_is_missing(
    tmp_path, lines, sp_model_path, caplog
):
    caplog.set_level(logging.INFO, logger="megablocks_ablate.data.preprocess_minimum")
    m = run_preprocess(_config(_inputs(tmp_path, lines, 1), tmp_path / "o", sp_model_path))
    held, _ = _reference(lines, 1)
    counts = {k: (p["heldout"] or {}).get("documents", 0) for k, p in m.partitions.items()}
    assert counts == {k: len(v) for k, v in held.items()}
    assert counts["pair"] == 1 and counts["lonely"] == 0 and counts["biology"] == 1
    assert m.data["heldout"]["partitions_without"] == {
        "lonely": "1 document: too few to hold out 1 (--heldout-min-docs) and keep one to train on"
    }
    text = caplog.text
    assert "1 of 6 partition(s) have no held-out set" in text and "lonely (1 document" in text
    assert "biology (+1)" in text and "pair (+1)" in text


def test_the_choice_is_deterministic_across_files_batches_and_workers(
    tmp_path, topped, lines, sp_model_path
):
    m, _ = topped
    m2 = run_preprocess(
        _config(
            _inputs(tmp_path, lines, 1),
            tmp_path / "o",
            sp_model_path,
            heldout_min_docs=3,
            workers=2,
            batch_size=64,
        )
    )
    for key, info in m.partitions.items():
        assert m2.partitions[key]["heldout"] == info["heldout"]
    for unit, info in m.units.items():
        assert (m2.units[unit]["bin"], m2.units[unit]["heldout"]) == (info["bin"], info["heldout"])


def test_minimum_zero_keeps_the_fraction_alone(tmp_path, lines, sp_model_path):
    m = run_preprocess(
        _config(_inputs(tmp_path, lines, 1), tmp_path / "o", sp_model_path, heldout_min_docs=0)
    )
    assert {k for k, p in m.partitions.items() if p["heldout"] is None} == {
        "biology",
        "economics",
        "lonely",
        "pair",
    }
    assert "--heldout-min-docs is 0" in m.partitions["biology"]["heldout_missing"]
    m = run_preprocess(
        _config(
            _inputs(tmp_path, lines, 1),
            tmp_path / "o",
            sp_model_path,
            heldout_fraction=0.0,
            overwrite=True,
        )
    )
    assert m.data["heldout"]["partitions_without"]["biology"] == (
        "no held-out sets asked for (--heldout-fraction 0)"
    )


def test_interrupted_top_up_resumes_to_the_same_result(
    tmp_path, topped, lines, sp_model_path, monkeypatch
):
    m, _ = topped
    cfg = _config(_inputs(tmp_path, lines, 3), tmp_path / "o", sp_model_path, heldout_min_docs=3)
    real, calls = pmin.atomic_write_json, []

    def flaky(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # after the first piece's record was replaced
        real(path, data)

    monkeypatch.setattr(pmin, "atomic_write_json", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_preprocess(cfg)
    monkeypatch.undo()
    m2 = run_preprocess(cfg)
    for key, info in m.partitions.items():
        assert m2.partitions[key]["heldout"] == info["heldout"]
    for unit, info in m.units.items():
        assert (m2.units[unit]["bin"], m2.units[unit]["heldout"]) == (info["bin"], info["heldout"])


def test_cli_flag_bad_value_and_changed_settings(tmp_path, topped, lines, sp_model_path, capsys):
    assert (
        cli_main(["preprocess", "--input", "x.jsonl", "--heldout-min-docs", "4", "--print-config"])
        == 0
    )
    assert "heldout_min_docs: 4" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="heldout_min_docs: must be >= 0, got -1"):
        _config(["x"], tmp_path, sp_model_path, heldout_min_docs=-1)
    # a manifest from before the minimum existed is refused, naming the new setting
    m, inputs = topped
    old = json.loads(open(m.root + "/manifest.json").read())
    del old["config"]["heldout_min_docs"]
    old["config_hash"] = "from an older version"
    out = tmp_path / "old"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps(old))
    with pytest.raises(ConfigError, match=r"heldout_min_docs: unset -> 3"):
        pp._existing_manifest(
            _config(inputs, out, sp_model_path, heldout_min_docs=3),
            str(out / "manifest.json"),
            "new",
        )
    assert Manifest.load(str(out)).data["config_hash"] == "from an older version"
