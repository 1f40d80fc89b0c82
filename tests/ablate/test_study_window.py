"""A study's evaluation window: the trained length by default, refusals before any work,
and a store that holds rows of another window (ablate/runner/scoring.py, commands/study.py).

No training here: a minimal preprocess output (manifest and held-out files) is enough
for the spec to resolve; the end-to-end provenance checks are in test_runner.py.
"""

from __future__ import annotations

import os

import pytest
import yaml
from study_fixtures import write_manifest_dir

from megablocks_ablate.ablate.mixtures import Mixture, Score
from megablocks_ablate.ablate.runner import resolve
from megablocks_ablate.ablate.runner.scoring import check_store_window, study_window
from megablocks_ablate.ablate.spec import StudySpec
from megablocks_ablate.ablate.store import Result, ResultStore, make_provenance
from megablocks_ablate.cli import main
from megablocks_ablate.errors import ConfigError


@pytest.fixture()
def data_dir(tmp_path) -> str:
    return write_manifest_dir(tmp_path / "data", {"bio": 1, "cs": 1, "math": 1})


def _spec(data_dir: str, unit_overrides=(), validation=None) -> dict:
    spec = {
        "data": data_dir,
        "out_dir": os.path.join(data_dir, "..", "study"),
        "seed": {"config": "tiny_seed"},
        "unit": {"config": "tiny_unit", "overrides": list(unit_overrides)},
        "mixtures": {"k_subsets": 2},
    }
    if validation:
        spec["validation"] = validation
    return spec


def _study(spec: dict):
    return resolve(StudySpec.from_dict(spec))


def test_the_default_window_is_the_shortest_trained_length(data_dir):
    assert study_window(_study(_spec(data_dir))) == 64  # tiny_unit's seq_len
    seq = {"mixtures": [["bio", "cs"]], "train": {"config": "tiny_seq"}}
    study = _study(_spec(data_dir, ["seq_len=32"], seq))  # units at 32, seq models at 64
    assert study_window(study) == 32
    assert study_window(study, 16) == 16
    with pytest.raises(ConfigError) as e:
        study_window(study, 64)
    assert str(e.value) == (
        "--max-len 64 exceeds the 32 tokens each unit model (unit.config) was trained at; "
        "pass --beyond-trained-context to score untrained positions"
    )
    assert study_window(study, 64, beyond=True) == 64
    with pytest.raises(ConfigError, match="--max-len 128 exceeds the max_seq_len=64"):
        study_window(study, 128, beyond=True)


def test_a_seq_len_beyond_the_model_is_a_spec_error(data_dir):
    with pytest.raises(ConfigError, match=r"unit.config: seq_len: 128 exceeds the max_seq_len=64"):
        _study(_spec(data_dir, ["seq_len=128", "global_batch_tokens=1024"]))


def _store_with_window(path: str, window: int | None) -> None:
    m = Mixture.of({"bio": ["bio-0000"]})
    extra = {} if window is None else {"max_len": window}
    with ResultStore(path) as store:
        store.add_mixtures([m])
        store.add_results(
            [Result(m.id, "macro", "bio", Score(10.0, 5, 20), make_provenance(**extra))]
        )
        store.add_unit_results([Result("bio-0000", "ind", "bio", Score(9.0, 5, 20), {})])


def test_a_store_of_another_window_is_refused(tmp_path):
    path = str(tmp_path / "results.sqlite")
    check_store_window(path, 64)  # no store yet: nothing to compare with
    _store_with_window(path, None)  # rows from before the window was recorded
    with ResultStore(path) as store:
        assert store.windows() == set()
    check_store_window(path, 64)
    os.remove(path)
    _store_with_window(path, 32)
    with ResultStore(path) as store:
        assert store.windows() == {32}
    check_store_window(path, 32)
    with pytest.raises(ConfigError, match=r"holds scores evaluated in 32-token windows, but this"):
        check_store_window(path, 64)


@pytest.mark.parametrize("action", ["run", "search", "optimize"])
def test_commands_refuse_a_longer_window_before_any_work(data_dir, tmp_path, action, capsys):
    path = tmp_path / "study.yaml"
    spec = _spec(data_dir, ["seq_len=32"])
    path.write_text(yaml.safe_dump(spec))
    extra = {"run": [], "search": ["--k", "2"], "optimize": []}[action]
    rc = main(["study", action, str(path), *extra, "--max-len", "64"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "error: --max-len 64 exceeds the 32 tokens each unit model (unit.config) was trained "
        "at; pass --beyond-trained-context to score untrained positions"
    )
    assert not os.path.exists(spec["out_dir"])  # nothing written


def test_dry_run_names_the_window(data_dir):
    from megablocks_ablate.ablate.runner import RunOptions, dry_run

    study = _study(_spec(data_dir, ["seq_len=32"]))
    # the seed is not trained yet: the plan stops there, the window is known anyway
    assert dry_run(study, RunOptions()).endswith("window: 32 tokens (the trained length)")
    text = dry_run(study, RunOptions(max_len=64, beyond_trained_context=True))
    assert text.endswith("window: 64 tokens (--max-len)")
