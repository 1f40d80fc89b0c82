"""Preprocess end to end against a brute-force reference built from the same rules."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from megablocks_ablate.cli import main as cli_main
from megablocks_ablate.corpora.synthetic import write_corpus
from megablocks_ablate.data import preprocess as pp
from megablocks_ablate.data.indexed import IndexedDataset
from megablocks_ablate.data.manifest import Manifest
from megablocks_ablate.data.partition import is_heldout, order_value, partition_key, split_units
from megablocks_ablate.data.preprocess import PreprocessConfig, run_preprocess
from megablocks_ablate.data.tokenizer import load_tokenizer
from megablocks_ablate.errors import ConfigError, DataFormatError

UNIT_TOKENS = 3000
PLANTED = (
    "the enzyme pathway of the membrane receptor is a signal for the immune host "
    "and the viral genome sequence was not observed in these data"
)


@pytest.fixture(scope="module")
def corpus_with_plant(tmp_path_factory, tiny_corpus):
    """tiny corpus + one document containing an evaluation paragraph, + an eval file."""
    d = tmp_path_factory.mktemp("plant")
    path = d / "corpus.jsonl"
    lines = open(tiny_corpus, encoding="utf-8").read().splitlines()
    planted = {
        "id": "planted",
        "fos": "biology",
        "year": 2000,
        "text": "An innocent first paragraph.\n" + PLANTED.upper() + "\nA last line.",
    }
    short = {
        "id": "short-overlap",
        "fos": "biology",
        "year": 2001,
        "text": "the enzyme pathway of the membrane",
    }  # < 13 words: kept
    lines.insert(7, json.dumps(planted))
    lines.insert(9, json.dumps(short))
    path.write_text("\n".join(lines) + "\n")
    eval_path = d / "eval.jsonl"
    eval_path.write_text(json.dumps({"text": "Some eval intro.\n  " + PLANTED + "  \nend"}) + "\n")
    return str(path), str(eval_path)


def _config(corpus, out, tok, eval_path=None, **kw):
    base = dict(
        input=[corpus],
        out=str(out),
        tokenizer=tok,
        partition_by=["fos"],
        order_by="year",
        unit_tokens=UNIT_TOKENS,
        heldout_fraction=0.1,
        eval=[eval_path] if eval_path else [],
        workers=1,
        batch_size=32,
    )
    base.update(kw)
    return PreprocessConfig.from_dict(base)


def _reference_units(corpus, tok_path, eval_dropped_ids):
    """Brute force: apply partition/held-out/order/unit rules document by document."""
    tok = load_tokenizer(tok_path)
    parts: dict[str, list] = {}
    heldout: dict[str, list] = {}
    for pos, line in enumerate(open(corpus, encoding="utf-8")):
        rec = json.loads(line)
        key = partition_key(rec, ["fos"])
        if is_heldout(rec["text"], 0.1, 0):
            heldout.setdefault(key, []).append(rec["id"])
            continue
        if rec["id"] in eval_dropped_ids:
            continue
        parts.setdefault(key, []).append((order_value(rec, "year"), pos, rec))
    units = {}
    for key, docs in parts.items():
        docs.sort(key=lambda t: (t[0], t[1]))
        toks = [tok.encode_document(r["text"]) for _, _, r in docs]
        ranges, _, _ = split_units(np.array([len(t) for t in toks]), UNIT_TOKENS)
        for i, (a, b) in enumerate(ranges):
            units[f"{key}-{i:04d}"] = toks[a:b]
    return units, heldout


@pytest.fixture(scope="module")
def done(tmp_path_factory, corpus_with_plant, sp_model_path):
    corpus, eval_path = corpus_with_plant
    out = tmp_path_factory.mktemp("pp") / "out"
    m = run_preprocess(_config(corpus, out, sp_model_path, eval_path))
    return m, corpus, eval_path, out


def test_units_match_brute_force_reference(done, sp_model_path):
    m, corpus, _, _ = done
    ref_units, ref_heldout = _reference_units(corpus, sp_model_path, {"planted"})
    assert sorted(m.units) == sorted(ref_units)
    for name, docs in ref_units.items():
        with IndexedDataset(m.unit_prefix(name)) as ds:
            assert len(ds) == len(docs)
            for i, d in enumerate(docs):
                assert ds[i].tolist() == d
        assert m.units[name]["tokens"] == sum(len(d) for d in docs)
    for key, ids in ref_heldout.items():
        path = m.heldout_path(key)
        got = [json.loads(x)["id"] for x in open(path, encoding="utf-8")]
        assert got == ids
        assert m.partitions[key]["heldout"]["documents"] == len(ids)


def test_units_have_equal_token_counts_and_year_order(done):
    m, *_ = done
    for key, units in m.partition_units().items():
        prev_last = None
        for u in units:
            info = m.units[u]
            with IndexedDataset(m.unit_prefix(u)) as ds:
                assert UNIT_TOKENS <= info["tokens"] < UNIT_TOKENS + int(ds.sequence_lengths.max())
                assert ds.num_tokens == info["tokens"]
            assert info["order_first"] <= info["order_last"]
            if prev_last is not None:
                assert prev_last <= info["order_first"]
            prev_last = info["order_last"]
        assert m.partitions[key]["leftover_tokens"] < UNIT_TOKENS


def test_manifest_records_drops_hashes_and_tokenizer(done, sp_model_path):
    m, *_ = done
    assert m.partitions["biology"]["contaminated"] == 1  # the planted document only
    assert m.data["totals"]["documents_contaminated"] == 1
    assert m.data["decontamination"]["eval_paragraphs"] >= 1
    assert m.tokenizer_fingerprint == load_tokenizer(sp_model_path).fingerprint
    assert m.data["dtype"] == "uint16"
    m.verify(check_hashes=True)
    t = m.data["totals"]
    assert t["documents_read"] == 402
    assert t["documents_read"] == t["documents_train"] + t["documents_heldout"] + 1
    assert t["tokens_train"] == t["tokens_in_units"] + t["tokens_leftover"]
    out = done[3]
    assert not os.path.exists(os.path.join(out, pp.TMP_DIR))


def test_two_workers_and_compressed_inputs_give_identical_units(done, tmp_path, sp_model_path):
    m1, corpus, eval_path, _ = done
    gz = str(tmp_path / "c.jsonl.gz")
    zst = str(tmp_path / "c.jsonl.zst")
    import gzip

    import zstandard

    raw = open(corpus, "rb").read()
    with gzip.open(gz, "wb") as f:
        f.write(raw)
    with open(zst, "wb") as f:
        f.write(zstandard.ZstdCompressor().compress(raw))
    m2 = run_preprocess(_config(gz, tmp_path / "w2", sp_model_path, eval_path, workers=2))
    m3 = run_preprocess(_config(zst, tmp_path / "z", sp_model_path, eval_path))
    for m in (m2, m3):
        assert sorted(m.units) == sorted(m1.units)
        for u in m1.units:
            assert m.units[u]["bin"] == m1.units[u]["bin"]
            assert m.units[u]["idx"] == m1.units[u]["idx"]


def test_rerun_is_a_no_op_and_other_settings_are_refused(done, sp_model_path):
    m, corpus, eval_path, out = done
    mtime = os.path.getmtime(os.path.join(out, "manifest.json"))
    again = run_preprocess(_config(corpus, out, sp_model_path, eval_path))
    assert again.data == m.data
    assert os.path.getmtime(os.path.join(out, "manifest.json")) == mtime
    with pytest.raises(ConfigError, match="other settings"):
        run_preprocess(_config(corpus, out, sp_model_path, eval_path, unit_tokens=999))


def test_interrupted_run_resumes_keeping_finished_units(done, tmp_path, sp_model_path, monkeypatch):
    m1, corpus, eval_path, _ = done
    out = tmp_path / "resume"
    cfg = _config(corpus, out, sp_model_path, eval_path)
    real_write = pp._write_unit
    calls = []

    def flaky(prefix, *a, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(prefix)
        return real_write(prefix, *a, **k)

    monkeypatch.setattr(pp, "_write_unit", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_preprocess(cfg)
    assert not os.path.exists(out / "manifest.json")
    # only complete units are present under their final names; no temp files there
    present = sorted(os.listdir(out / "units"))
    assert all(not f.startswith(".") for f in present) and len(present) == 4
    first_mtime = os.path.getmtime(calls[0] + ".bin")
    written = []
    monkeypatch.setattr(
        pp,
        "_write_unit",
        lambda prefix, *a, **k: written.append(prefix) or real_write(prefix, *a, **k),
    )
    m2 = run_preprocess(cfg)
    assert calls[0] not in written and calls[1] not in written  # kept, not redone
    assert os.path.getmtime(calls[0] + ".bin") == first_mtime
    assert {u: (v["bin"], v["idx"]) for u, v in m2.units.items()} == {
        u: (v["bin"], v["idx"]) for u, v in m1.units.items()
    }


def test_bad_lines_error_names_file_and_line_or_are_counted(tmp_path, tiny_corpus, sp_model_path):
    lines = open(tiny_corpus, encoding="utf-8").read().splitlines()[:50]
    lines.insert(3, "{not json")
    lines.insert(10, json.dumps({"title": "no text"}))
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe broken utf8\n")
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:4: invalid JSON"):
        run_preprocess(_config(str(bad), tmp_path / "e", sp_model_path))
    assert not os.path.exists(tmp_path / "e" / "manifest.json")
    m = run_preprocess(
        _config(str(bad), tmp_path / "s", sp_model_path, on_bad_line="skip", unit_tokens=None)
    )
    assert m.data["totals"]["bad_lines"] == {"invalid_json": 1, "missing_text": 1, "bad_utf8": 1}
    assert m.data["totals"]["documents_read"] == 50
    assert m.data["totals"]["lines_read"] == 53


def test_cli_preprocess(tmp_path, tiny_corpus, sp_model_path, capsys):
    out = tmp_path / "cli"
    rc = cli_main(
        [
            "preprocess",
            "--input",
            tiny_corpus,
            "--tokenizer",
            sp_model_path,
            "--partition-by",
            "fos",
            "--unit-tokens",
            "4k",
            "--out",
            str(out),
            "batch_size=64",
        ]
    )
    assert rc == 0
    m = Manifest.load(str(out))
    assert m.data["config"]["unit_tokens"] == 4000 and m.data["config"]["batch_size"] == 64
    assert set(m.partitions) == {"biology", "physics", "history", "economics"}
    rc = cli_main(
        [
            "preprocess",
            "--input",
            str(tmp_path / "missing*.jsonl"),
            "--tokenizer",
            sp_model_path,
            "--out",
            str(tmp_path / "x"),
        ]
    )
    assert rc == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # refused by argparse, before anything runs
        cli_main(
            [
                "preprocess",
                "--input",
                tiny_corpus,
                "--tokenizer",
                sp_model_path,
                "--out",
                str(tmp_path / "y"),
                "--workers",
                "0",
            ]
        )
    assert e.value.code == 2
    assert "--workers: expected an integer >= 1, got 0" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "y")


@pytest.mark.integration
def test_ctrl_c_leaves_nothing_half_written(tmp_path, sp_model_path):
    """A real SIGINT mid-run: exit 130, no manifest, only complete files under final names."""
    import signal
    import subprocess
    import sys
    import time

    corpus = write_corpus(str(tmp_path / "big.jsonl"), n_docs=30000, seed=5)
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "megablocks_ablate",
        "preprocess",
        "--input",
        corpus,
        "--tokenizer",
        sp_model_path,
        "--partition-by",
        "fos",
        "--unit-tokens",
        "20k",
        "--out",
        str(out),
        "--workers",
        "2",
        "batch_size=64",
    ]
    # A suite started in the background (`cmd &`) inherits SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler: give the child the default disposition.
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 60
    while not (out / pp.TMP_DIR / "files").exists() and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    assert proc.poll() is None, "preprocess finished before the signal: enlarge the corpus"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()[-500:]
    assert b"interrupted" in err
    assert not (out / "manifest.json").exists()
    for sub in ("units", "heldout"):
        for f in os.listdir(out / sub) if (out / sub).exists() else []:
            assert not f.startswith("."), f"temporary file left under a final dir: {f}"
    # the stage-1 directory of the interrupted input file was removed, not left partial
    assert not any((out / pp.TMP_DIR / "files").glob("*/p0.bin"))


# --- results that are probably not what the user meant --------------------------------


def _nothing_left(out) -> None:
    """A refused run leaves no manifest, no units or held-out files and no temp state."""
    assert not os.path.exists(out / "manifest.json")
    for sub in ("units", "heldout", pp.TMP_DIR):
        assert not os.path.exists(out / sub), sub


def test_order_field_absent_from_every_document(tmp_path, tiny_corpus, sp_model_path, capsys):
    """--order-by yaer (misspelt): refused in one line, nothing left; year is accepted."""
    out = tmp_path / "o"
    with pytest.raises(ConfigError) as exc:
        run_preprocess(_config(tiny_corpus, out, sp_model_path, order_by="yaer"))
    msg = str(exc.value)
    assert msg.startswith(f"--order-by yaer: no document of {tiny_corpus} has a field 'yaer'")
    assert "the first document has fields: fos, id, text, year" in msg
    _nothing_left(out)
    args = ["preprocess", "--input", tiny_corpus, "--tokenizer", sp_model_path]
    assert cli_main(args + ["--order-by", "yaer", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --order-by yaer: ") and err.count("\n") == 1
    _nothing_left(out)
    assert cli_main(args + ["--order-by", "year", "--out", str(out)]) == 0


@pytest.fixture(scope="module")
def partition_tokens(tmp_path_factory, tiny_corpus, sp_model_path) -> dict[str, int]:
    """Training tokens per partition of the tiny corpus under ``_config`` settings."""
    out = tmp_path_factory.mktemp("sizes") / "out"
    m = run_preprocess(_config(tiny_corpus, out, sp_model_path, unit_tokens=None))
    return {k: p["tokens"] for k, p in m.partitions.items()}


def test_partition_field_absent_from_every_document(tmp_path, tiny_corpus, sp_model_path, capsys):
    out = tmp_path / "o"
    for fields, missing in ((["field_of_study"], "field_of_study"), (["fos", "venue"], "venue")):
        with pytest.raises(ConfigError) as exc:
            run_preprocess(_config(tiny_corpus, out, sp_model_path, partition_by=fields))
        msg = str(exc.value)
        assert msg.startswith(f"--partition-by {missing}: no document of {tiny_corpus} has")
        assert "would land in partition 'NA'" in msg and "--allow-missing-partition" in msg
        assert "the first document has fields: fos, id, text, year" in msg
        _nothing_left(out)
    args = ["preprocess", "--input", tiny_corpus, "--tokenizer", sp_model_path]
    args += ["--partition-by", "field_of_study", "--out", str(out)]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --partition-by field_of_study: ") and err.count("\n") == 1
    assert cli_main(args + ["--allow-missing-partition"]) == 0
    m = Manifest.load(str(out))
    assert set(m.partitions) == {"NA"} and m.data["config"]["allow_missing_partition"]


def test_zero_base_units_is_an_error(tmp_path, tiny_corpus, sp_model_path, partition_tokens):
    too_big = max(partition_tokens.values()) + 1
    out = tmp_path / "o"
    with pytest.raises(ConfigError) as exc:
        run_preprocess(_config(tiny_corpus, out, sp_model_path, unit_tokens=too_big))
    msg = str(exc.value)
    assert msg.startswith(f"no base units: --unit-tokens {too_big:,} is more than any partition")
    for key, n in partition_tokens.items():
        assert f"{key}: {n:,}" in msg
    assert "4 partitions" in msg and "lower --unit-tokens or pass --remainder keep" in msg
    _nothing_left(out)
    m = run_preprocess(
        _config(tiny_corpus, out, sp_model_path, unit_tokens=too_big, remainder="keep")
    )
    assert len(m.units) == 4 and all(u["partial"] for u in m.units.values())


def test_dropping_most_tokens_as_remainder_is_an_error(
    tmp_path, tiny_corpus, sp_model_path, partition_tokens
):
    sizes = sorted(partition_tokens.values())
    unit = sizes[-2] + 1  # only the largest partition fills a unit: most tokens dropped
    assert unit <= sizes[-1] and sum(sizes[:-1]) > sum(sizes) / 2
    out = tmp_path / "o"
    with pytest.raises(ConfigError) as exc:
        run_preprocess(_config(tiny_corpus, out, sp_model_path, unit_tokens=unit))
    msg = str(exc.value)
    total = sum(sizes)
    assert re.match(rf"[\d,]+ of {total:,} training tokens \(\d+%\) would be dropped", msg)
    assert f"smaller than --unit-tokens {unit:,}" in msg
    assert "lower --unit-tokens or pass --remainder keep" in msg
    _nothing_left(out)
    m = run_preprocess(_config(tiny_corpus, out, sp_model_path, unit_tokens=unit, remainder="keep"))
    assert m.data["totals"]["tokens_in_units"] == total


def test_empty_corpus_is_an_error(tmp_path, sp_model_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    out = tmp_path / "o"
    with pytest.raises(
        DataFormatError,
        match=rf"^no documents to preprocess: the input\(s\) {re.escape(str(empty))} hold no JSONL documents",
    ):
        run_preprocess(_config(str(empty), out, sp_model_path))
    _nothing_left(out)
    junk = tmp_path / "junk.jsonl"
    junk.write_text("{not json\n[1, 2]\n")
    args = ["preprocess", "--input", str(junk), "--input", str(empty), "--tokenizer"]
    args += [sp_model_path, "--on-bad-line", "skip", "--out", str(out)]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: no documents to preprocess: the input(s) {junk}, {empty} ")
    assert "(2 bad lines skipped by --on-bad-line skip)" in err and err.count("\n") == 1


@pytest.mark.parametrize("ext", ["jsonl.gz", "jsonl.zst"])
def test_truncated_compressed_input_is_a_one_line_error(tmp_path, sp_model_path, capsys, ext):
    full = write_corpus(str(tmp_path / f"full.{ext}"), n_docs=300, seed=2)
    data = open(full, "rb").read()
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFormatError, match="truncated or corrupt compressed stream") as exc:
        run_preprocess(_config(str(cut), tmp_path / "a", sp_model_path))
    assert str(exc.value).startswith(f"{cut}: ")
    assert not os.path.exists(tmp_path / "a" / "manifest.json")
    args = ["preprocess", "--input", str(cut), "--tokenizer", sp_model_path]
    assert cli_main(args + ["--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {cut}: truncated") and err.count("\n") == 1


def test_out_that_is_a_file_or_under_a_file(tmp_path, tiny_corpus, sp_model_path, capsys):
    afile = tmp_path / "taken.txt"
    afile.write_text("keep me")
    args = ["preprocess", "--input", tiny_corpus, "--tokenizer", sp_model_path, "--out"]
    assert cli_main(args + [str(afile)]) == 2
    err = capsys.readouterr().err
    assert (
        err == f"error: out: {afile} is an existing file, not a directory; choose another --out\n"
    )
    under = afile / "sub" / "data"
    assert cli_main(args + [str(under)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: out: cannot create directory {under} ({afile} is a file); choose another --out\n"
    )
    assert afile.read_text() == "keep me"


@pytest.mark.parametrize("value", ["abc", "-5", "1.5x"])
def test_bad_unit_tokens_says_what_a_count_looks_like(
    tmp_path, tiny_corpus, sp_model_path, capsys, value
):
    args = ["preprocess", "--input", tiny_corpus, "--tokenizer", sp_model_path]
    args += ["--out", str(tmp_path / "o"), "--unit-tokens", value]
    with pytest.raises(SystemExit) as e:  # refused by argparse, before anything runs
        cli_main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (
        "megablocks-ablate preprocess: error: argument --unit-tokens: expected a count "
        f"like 32000, 32k or 1.5M (>= 1), got {value!r}"
    )
    assert not os.path.exists(tmp_path / "o")


# --- per-unit held-out sets (paper §5.1: a unit's in-domain eval is its own held-out data) --

UH_FRACTION = 0.2
UH_UNIT_TOKENS = 2500


def _year_lines(tiny_corpus, year_of) -> list[str]:
    """The tiny corpus with ``year`` replaced by ``year_of(line position)`` (None: drop it)."""
    out = []
    for pos, line in enumerate(open(tiny_corpus, encoding="utf-8").read().splitlines()):
        rec = json.loads(line)
        rec.pop("year")
        if year_of(pos) is not None:
            rec["year"] = year_of(pos)
        out.append(json.dumps(rec))
    return out


def _write_split(d, lines, n_files=3) -> list[str]:
    """Write ``lines`` as ``n_files`` consecutive input files (input order = line order)."""
    paths, step = [], -(-len(lines) // n_files)
    for i in range(n_files):
        p = d / f"part{i}.jsonl"
        p.write_text("\n".join(lines[i * step : (i + 1) * step]) + "\n")
        paths.append(str(p))
    return paths


def _uh_config(inputs, out, tok, **kw):
    base = dict(heldout_fraction=UH_FRACTION, unit_tokens=UH_UNIT_TOKENS, batch_size=7)
    base.update(kw)
    cfg = _config(inputs[0], out, tok, **base)
    cfg.input = list(inputs)
    return cfg


def _reference_unit_heldout(lines, tok_path, order_by, unit_tokens, keep):
    """Brute force, straight from the rule: per partition, put every document (training
    and held-out) in one order, (order key, input position); cut the training ones into
    units; a held-out document goes to the unit of the first training document after it
    (the last training document's when none follows), none when that one is in a dropped
    remainder. Returns ({unit: [lines, input order]}, {partition: lines in no unit})."""
    tok = load_tokenizer(tok_path)
    parts: dict[str, list] = {}
    for pos, line in enumerate(lines):
        rec = json.loads(line)
        held = is_heldout(rec["text"], UH_FRACTION, 0)
        parts.setdefault(partition_key(rec, ["fos"]), []).append(
            (order_value(rec, order_by), pos, held, rec, line)
        )
    units: dict[str, list] = {}
    nowhere: dict[str, list] = {}
    for key, docs in parts.items():
        docs.sort(key=lambda t: (t[0], t[1]))
        train = [t for t in docs if not t[2]]
        lengths = np.array([len(tok.encode_document(t[3]["text"])) for t in train])
        ranges, _, _ = split_units(lengths, unit_tokens, keep_remainder=keep)
        unit_at = {i: ui for ui, (a, b) in enumerate(ranges) for i in range(a, b)}
        seen, placed = 0, []
        for _, pos, held, _, line in docs:
            if not held:
                seen += 1
                continue
            ui = unit_at.get(min(seen, len(train) - 1))
            placed.append((pos, line, ui))
        for _pos, line, ui in sorted(placed):  # files keep the input order
            if ui is None:
                nowhere.setdefault(key, []).append(line)
            else:
                units.setdefault(f"{key}-{ui:04d}", []).append(line)
    return units, nowhere


def _file_lines(path) -> list[str]:
    return open(path, encoding="utf-8").read().splitlines()


@pytest.mark.parametrize(
    "order_by,year_of,remainder",
    [
        ("year", lambda pos: pos, "drop"),  # increasing keys
        # ties across unit boundaries, strings after numbers, missing keys last
        (
            "year",
            lambda pos: "late" if pos % 13 == 0 else (None if pos % 17 == 0 else pos // 9),
            "drop",
        ),
        ("year", lambda pos: (400 - pos) // 5, "keep"),  # decreasing: order != input order
        (None, lambda pos: pos, "drop"),  # input order
    ],
    ids=["increasing", "ties-strings-missing", "decreasing-keep", "input-order"],
)
def test_unit_heldout_matches_brute_force_reference(
    tmp_path, tiny_corpus, sp_model_path, order_by, year_of, remainder
):
    lines = _year_lines(tiny_corpus, year_of)
    inputs = _write_split(tmp_path, lines)
    m = run_preprocess(
        _uh_config(inputs, tmp_path / "o", sp_model_path, order_by=order_by, remainder=remainder)
    )
    ref_units, ref_nowhere = _reference_unit_heldout(
        lines, sp_model_path, order_by, UH_UNIT_TOKENS, remainder == "keep"
    )
    assert sorted(m.units) == sorted(set(m.units) | set(ref_units))  # no unknown unit
    for u in m.units:
        path = m.unit_heldout_path(u)
        if u not in ref_units:
            assert path is None and m.units[u]["heldout"] is None
            continue
        assert _file_lines(path) == ref_units[u]
        assert m.units[u]["heldout"]["documents"] == len(ref_units[u])
        assert path == os.path.join(m.root, "heldout", "units", u + ".jsonl")
    for key, p in m.partitions.items():
        assert p["heldout_leftover_documents"] == len(ref_nowhere.get(key, []))
    if remainder == "drop":  # the fixture does exercise the remainder rule
        assert sum(len(v) for v in ref_nowhere.values()) > 0
    else:
        assert not ref_nowhere


def test_unit_heldout_partitions_the_partition_set_within_order_ranges(
    tmp_path, tiny_corpus, sp_model_path
):
    """Keys increase with input position: each held-out document lies in its unit's
    stretch (after the previous unit's last key, at most its own last key), and the
    units' files plus the remainder's documents are exactly the partition's set."""
    from collections import Counter

    inputs = _write_split(tmp_path, _year_lines(tiny_corpus, lambda pos: pos))
    m = run_preprocess(_uh_config(inputs, tmp_path / "o", sp_model_path))
    checked_leftover = 0
    for key, units in m.partition_units().items():
        part = _file_lines(m.heldout_path(key))
        got: Counter = Counter()
        prev_last = -1
        for u in units:
            info = m.units[u]
            mine = _file_lines(m.unit_heldout_path(u)) if info["heldout"] else []
            got.update(mine)
            years = [json.loads(x)["year"] for x in mine]
            assert all(prev_last < y <= info["order_last"] for y in years), (u, years)
            assert years == sorted(years)  # the partition file's (input) order
            prev_last = info["order_last"]
        rest = Counter(part) - got
        assert not (got - Counter(part))  # nothing held out beyond the partition's set
        assert sum(rest.values()) == m.partitions[key]["heldout_leftover_documents"]
        assert all(json.loads(x)["year"] > prev_last for x in rest.elements())
        assert m.partitions[key]["leftover_documents"] > 0 or not rest
        checked_leftover += sum(rest.values())
    assert checked_leftover > 0
    t = m.data["totals"]
    assert t["documents_heldout"] == sum(p["heldout"]["documents"] for p in m.partitions.values())


def test_one_unit_per_partition_gets_the_partition_file_byte_for_byte(
    tmp_path, tiny_corpus, sp_model_path
):
    m = run_preprocess(_config(tiny_corpus, tmp_path / "o", sp_model_path, unit_tokens=None))
    for key, (unit,) in m.partition_units().items():
        with open(m.heldout_path(key), "rb") as a, open(m.unit_heldout_path(unit), "rb") as b:
            assert a.read() == b.read()
        assert m.units[unit]["heldout"]["sha256"] == m.partitions[key]["heldout"]["sha256"]


def test_unit_heldout_hashes_recorded_and_verified(done):
    import hashlib

    m, *_ = done
    with_heldout = [u for u in m.units if m.units[u].get("heldout")]
    assert len(with_heldout) >= 4
    for u in with_heldout:
        rec = m.units[u]["heldout"]
        data = open(m.unit_heldout_path(u), "rb").read()
        assert rec["sha256"] == hashlib.sha256(data).hexdigest()
        assert rec["documents"] == data.count(b"\n")
    m.verify()


def test_verify_catches_a_changed_or_missing_unit_heldout_file(tmp_path, done):
    import shutil

    m0, *_, out = done
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    m = Manifest.load(str(copy))
    u = next(u for u in m.units if m.units[u].get("heldout"))
    path = m.unit_heldout_path(u)
    with open(path, "ab") as f:
        f.write(b'{"text": "smuggled in"}\n')
    with pytest.raises(DataFormatError, match=rf"sha256 .* for held-out set of unit '{u}'"):
        m.verify()
    m.verify(units=[u])  # training's subset check leaves held-out files out ...
    with pytest.raises(DataFormatError, match="held-out set of unit"):
        m.verify(units=[u], heldout=True)  # ... unless asked
    os.unlink(path)
    with pytest.raises(DataFormatError, match=rf"missing \(held-out set of unit '{u}'"):
        m.verify(check_hashes=False)


def test_manifest_without_unit_heldout_still_loads(tmp_path, done):
    m, *_ = done
    data = json.loads(json.dumps(m.data))
    for info in data["units"].values():
        del info["heldout"]
    for info in data["partitions"].values():
        del info["heldout_leftover_documents"]
    old = Manifest(data=data, root=m.root)
    old.save(str(tmp_path / "manifest.json"))
    loaded = Manifest.load(str(tmp_path / "manifest.json"))
    assert all(loaded.unit_heldout_path(u) is None for u in loaded.units)
    assert loaded.heldout_path("biology") is None or os.path.isabs(loaded.heldout_path("biology"))
    with pytest.raises(DataFormatError, match="unknown unit 'nope'"):
        loaded.unit_heldout_path("nope")


def test_overwrite_replaces_unit_heldout_files_only(tmp_path, tiny_corpus, sp_model_path):
    import subprocess
    import sys

    out = tmp_path / "o"
    m1 = run_preprocess(_config(tiny_corpus, out, sp_model_path, unit_tokens=2000))
    old_files = {
        os.path.basename(m1.unit_heldout_path(u)) for u in m1.units if m1.units[u]["heldout"]
    }
    (out / "heldout" / "units" / "my-notes.txt").write_text("keep me")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    host = socket.gethostname().split(".")[0]
    stale = out / "heldout" / "units" / f".x-0000.jsonl.{host}-{dead.pid}.abc123.tmp"
    stale.write_text("half")
    m2 = run_preprocess(_config(tiny_corpus, out, sp_model_path, unit_tokens=5000, overwrite=True))
    new_files = {
        os.path.basename(m2.unit_heldout_path(u)) for u in m2.units if m2.units[u]["heldout"]
    }
    assert old_files - new_files  # the fixture does drop some units
    assert set(os.listdir(out / "heldout" / "units")) == new_files | {"my-notes.txt"}
    m2.verify()
    # with the user's file gone, a further overwrite leaves no empty directory behind
    os.unlink(out / "heldout" / "units" / "my-notes.txt")
    run_preprocess(_config(tiny_corpus, out, sp_model_path, heldout_fraction=0.0, overwrite=True))
    assert not os.path.exists(out / "heldout")


def test_resume_retokenizes_an_older_stage1_file_without_heldout_slots(
    tmp_path, tiny_corpus, sp_model_path, monkeypatch
):
    from megablocks_ablate.data import preprocess_stage1 as st1

    lines = _year_lines(tiny_corpus, lambda pos: pos)
    inputs = _write_split(tmp_path, lines)
    out = tmp_path / "o"
    cfg = _uh_config(inputs, out, sp_model_path)

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pp, "_stage2", stop)
    with pytest.raises(KeyboardInterrupt):
        run_preprocess(cfg)
    done_json = out / pp.TMP_DIR / "files" / "00001" / "done.json"
    rec = json.loads(done_json.read_text())
    del rec["format"]  # as an older stage 1 wrote it
    done_json.write_text(json.dumps(rec))
    monkeypatch.undo()
    redone = []
    real = st1._tokenize_file
    monkeypatch.setattr(
        st1,
        "_tokenize_file",
        lambda c, pool, path, *a: redone.append(path) or real(c, pool, path, *a),
    )
    m = run_preprocess(cfg)
    assert redone == [inputs[1]]
    ref_units, _ = _reference_unit_heldout(lines, sp_model_path, "year", UH_UNIT_TOKENS, False)
    assert {u: _file_lines(m.unit_heldout_path(u)) for u in ref_units} == ref_units
