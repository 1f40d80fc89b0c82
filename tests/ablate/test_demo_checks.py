"""`demo` checks every option before its first write (DemoSettings.validate): a bad value
ends in exit 2 and one ``error:`` line, its --out is not created, and a previous demo's
files there keep every byte."""

from __future__ import annotations

import os

import pytest

from megablocks_ablate.ablate.demo import DemoSettings, study_spec
from megablocks_ablate.cli import main as cli_main
from megablocks_ablate.errors import ConfigError
from megablocks_ablate.utils.outputs import claim_output_dir

# (arguments, text the error line names); the first three are refused by argparse
BAD = [
    (["--k", "0"], "argument --k: expected an integer >= 1, got 0"),
    (["--unit-tokens", "abc"], "argument --unit-tokens: expected a count"),
    (["--heldout-fraction", "1"], "argument --heldout-fraction: expected a number in [0, 1)"),
    (["--preset", "huge"], "--preset huge: no train preset huge_seed, huge_unit, huge_seq"),
    (["--k", "9"], "--k 9: the demo has 8 partition(s), fewer than k=9"),
    (
        ["--max-partitions", "2", "--k", "3"],
        "--k 3: the demo has 2 partition(s) (--max-partitions), fewer",
    ),
    (["--builtin", "manpages", "--k", "9"], "--k 9: the demo has 8 partition(s)"),
    (["--n-seq", "29"], "--n-seq 29: more seq validation models than the 28 2-subsets"),
    (["foo=bar"], "unknown field foo for TrainConfig"),
    (["seq_len=abc"], "seq_len: expected an integer, got 'abc'"),
    (["model_overrides=[d_model=abc]"], "d_model: expected an integer, got 'abc'"),
    (["model_overrides=[max_seq_len=8]"], "exceeds the max_seq_len=8 of model"),
    (["noequals"], "override 'noequals': expected key=value"),
    (["--corpus", "/nonexistent/c.jsonl"], "--corpus: no such file: /nonexistent/c.jsonl"),
    (["--seed-corpus", "/nonexistent/s.jsonl"], "--seed-corpus: no such file"),
    (["--eval-extra", "/nonexistent/e.jsonl"], "--eval-extra /nonexistent/e.jsonl: no such"),
]


def _demo(argv: list[str], capsys) -> tuple[int, str]:
    try:
        rc = cli_main(["demo", *argv])
    except SystemExit as e:  # argparse's refusal
        rc = int(e.code or 0)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    return rc, errors[0]


def _snapshot(root) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
        for d, _, files in os.walk(root)
        for f in files
    }


@pytest.mark.parametrize("args,expected", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_option_refused_before_out_is_created(tmp_path, capsys, args, expected):
    out = tmp_path / "demo"
    rc, line = _demo(["--out", str(out), *args], capsys)
    assert rc == 2 and expected in line
    assert not out.exists()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("args,expected", BAD[3:9], ids=[" ".join(a) for a, _ in BAD[3:9]])
def test_bad_option_leaves_a_previous_demo_untouched(tmp_path, capsys, args, expected):
    out = tmp_path / "demo"
    kind = "demo-manpages" if "manpages" in args else "demo"
    claim_output_dir(str(out), kind)
    (out / "corpus.jsonl").write_bytes(b'{"text": "kept", "domain": "docs"}\n')
    (out / "tokenizer.model").write_bytes(bytes(range(256)))
    (out / "data").mkdir()
    (out / "data" / "manifest.json").write_text('{"units": []}\n')
    before = _snapshot(out)
    rc, line = _demo(["--out", str(out), *args], capsys)
    assert rc == 2 and expected in line
    assert _snapshot(out) == before


def test_out_claimed_by_someone_else_is_refused_first(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc, line = _demo(["--out", str(out)], capsys)
    assert rc == 2 and "files megablocks-ablate did not write (notes.txt)" in line
    assert os.listdir(out) == ["notes.txt"]


def test_validate_resolves_the_configs_the_study_will_use_and_writes_nothing(tmp_path):
    out = tmp_path / "demo"
    s = DemoSettings(out=str(out), unit_tokens="32k", unit_passes=3, seed_tokens="4.2M")
    configs = s.validate()
    assert set(configs) == {"seed", "unit", "seq"}
    assert configs["seed"].train_tokens == 4_200_000
    assert configs["unit"].train_tokens == 96_000  # 3 passes x 32k
    assert configs["seed"].out_dir == os.path.join(str(out), "seed")
    assert not out.exists()
    # the study spec applies the same overrides
    spec = study_spec(s, "d", "sd", partitions={p: [f"{p}-0000"] for p in "abc"})
    assert spec["unit"]["overrides"] == ["train_tokens=96000"]
    assert spec["seed"]["overrides"][-1] == "train_tokens=4.2M"


def test_validate_counts_and_partitions_from_the_api(tmp_path):
    out = str(tmp_path / "demo")
    with pytest.raises(ConfigError, match=r"--heldout-fraction: expected a number in \[0, 1\)"):
        DemoSettings(out=out, heldout_fraction=1.0).validate()
    with pytest.raises(ConfigError, match="--seed-tokens: expected a count >= 1"):
        DemoSettings(out=out, seed_tokens="0").validate()
    with pytest.raises(ConfigError, match="--k: expected an integer >= 1, got 0"):
        DemoSettings(out=out, k=0).validate()
    # a user corpus's partitions are known only from --max-partitions before preprocess
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "x", "domain": "a"}\n')
    DemoSettings(out=out, corpus=str(corpus), k=5).validate()
    with pytest.raises(ConfigError, match="--k 5: the demo has 4 partition"):
        DemoSettings(out=out, corpus=str(corpus), k=5, max_partitions=4).validate()
    # demo --proportions validates blends, not k-subsets: n_seq is not checked there
    s = DemoSettings(out=out, max_partitions=4)
    with pytest.raises(ConfigError, match="--n-seq 12: more seq validation models than the 6"):
        s.validate()
    s.validate(check_n_seq=False)
    assert not os.path.exists(out)
