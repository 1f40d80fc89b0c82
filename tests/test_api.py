"""megablocks_ablate.api: the notebook API reads what the report computes, and its data
helper refuses data smaller than one batch.

The synthetic study comes from tests/ablate/study_fixtures.py (six partitions, all
pairs as mixtures, eight with seq models, two evaluation-only domains).
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megablocks_ablate import api
from megablocks_ablate.ablate import analysis as an
from megablocks_ablate.ablate import decisions as dc
from megablocks_ablate.ablate.mixtures import ID_DOMAIN, SEQ
from megablocks_ablate.ablate.store import ResultStore, StoreError, read_study_table
from megablocks_ablate.data.indexed import IndexedDatasetWriter
from megablocks_ablate.data.manifest import MANIFEST_FORMAT
from megablocks_ablate.data.mixture import MixtureDataset
from megablocks_ablate.errors import DataFormatError, MBAError

pd = pytest.importorskip("pandas")
N_BOOT = 50


def _study_fixtures():
    """tests/ablate/study_fixtures.py (pytest puts tests/ablate on sys.path only when it
    collects a test there): the module already imported, else loaded from its file."""
    if "study_fixtures" not in sys.modules:
        path = Path(__file__).parent / "ablate" / "study_fixtures.py"
        spec = importlib.util.spec_from_file_location("study_fixtures", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["study_fixtures"] = module
        spec.loader.exec_module(module)
    return sys.modules["study_fixtures"]


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory) -> Path:
    """A study out_dir holding the synthetic study's results.sqlite."""
    out = tmp_path_factory.mktemp("api") / "study"
    store, _ = _study_fixtures().fill_store(str(out / "results.sqlite"))
    store.close()
    return out


@pytest.fixture(scope="module")
def study(study_dir):
    return api.open_study(study_dir)


@pytest.fixture(scope="module")
def table(study_dir):
    return read_study_table(str(study_dir))


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-12, abs=1e-12)


# ----------------------------------------------------------------------------- the docs' example


def _docs_example() -> str:
    """The first Python block under "## Example" in docs/api.md."""
    text = (Path(__file__).parents[1] / "docs" / "api.md").read_text(encoding="utf-8")
    section = text.split("## Example", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_docs_example(study_dir, monkeypatch):
    """docs/api.md's example, executed as written there (from the study's parent)."""
    monkeypatch.chdir(study_dir.parent)
    ns: dict = {"io": io}
    exec(compile(_docs_example(), "docs/api.md", "exec"), ns)

    assert len(ns["ood"]) > 0 and 0.9 < ns["pooled"] <= 1.0
    assert ns["picks"].iloc[-1]["row"] == "summary"
    assert str(ns["rec"]).startswith(ns["rec"].label)
    assert ns["fig"].axes[0].collections


# ----------------------------------------------------------------------------- opening


def test_open_study_takes_a_spec_an_out_dir_or_the_store(study_dir, tmp_path, monkeypatch):
    spec = study_dir.parent / "study.yaml"
    spec.write_text(
        "name: t\ndata: data\nout_dir: study\nseed: {checkpoint: seed}\n"
        "unit: {config: paperlike_unit}\nmixtures: {k_subsets: 2}\n"
    )
    monkeypatch.chdir(tmp_path)  # out_dir is not under the working directory: found beside
    paths = [spec, study_dir, study_dir / "results.sqlite", str(study_dir)]
    opened = [api.open_study(p) for p in paths]
    assert {s.path for s in opened} == {str(study_dir / "results.sqlite")}
    assert opened[0].name == "synthetic" and "15 mixtures, 8 with seq" in repr(opened[0])


def test_open_study_errors_are_one_line(study_dir, tmp_path):
    cases = [
        (tmp_path / "nowhere", api.StudyNotFoundError, "no such file or directory"),
        (tmp_path, api.StudyNotFoundError, "without results.sqlite"),
    ]
    spec = tmp_path / "s.yaml"
    spec.write_text(
        "data: d\nout_dir: never_ran\nseed: {checkpoint: s}\nunit: {config: u}\n"
        "mixtures: {k_subsets: 2}\n"
    )
    # out_dir is relative to the spec: named resolved
    where = tmp_path / "never_ran"
    cases.append((spec, api.StudyNotFoundError, f"no results store for out_dir '{where}'"))
    for path, err, words in cases:
        with pytest.raises(err, match=words) as e:
            api.open_study(path)
        msg = str(e.value)
        assert isinstance(e.value, MBAError) and "\n" not in msg
        assert "run `megablocks-ablate study run" in msg

    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as con:
        con.execute("CREATE TABLE t (x)")
    with pytest.raises(StoreError, match="not a megablocks-ablate results store"):
        api.open_study(other)
    with sqlite3.connect(other) as con:  # left as it was: no store tables added
        assert [n for (n,) in con.execute("SELECT name FROM sqlite_master")] == ["t"]
    (tmp_path / "junk.sqlite").write_text("not a database")
    with pytest.raises(StoreError, match="not a results store"):
        api.open_study(tmp_path / "junk.sqlite")


def test_importing_the_api_is_cheap():
    code = (
        "import sys, megablocks_ablate.api; "
        "print(sorted(m for m in ('torch', 'pandas', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- tables


def test_rows_hold_every_value_with_its_role(study, table, study_dir):
    df = study.rows()
    assert list(df.columns) == api.ROW_COLUMNS
    assert len(df) == sum(len(by_m) for by_d in table.values.values() for by_m in by_d.values())
    assert set(df.role) == {an.ROLE_ID, an.ROLE_OOD}
    for r in df.itertuples():
        assert r.perplexity == table.values[r.proxy][r.domain][r.mixture_id]
        assert r.role == table.role(r.mixture_id, r.domain)
        seq = table.get(SEQ, r.domain).get(r.mixture_id)
        assert (math.isnan(r.seq_perplexity) and seq is None) or r.seq_perplexity == seq
    # a+b trains on a's partition: in domain there, out of domain on an extra domain
    ab = df[(df.label == "a+b") & (df.proxy == "merged")].set_index("domain")
    assert ab.loc["a", "role"] == "id" and ab.loc["wiki", "role"] == "ood"
    assert ab.loc[ID_DOMAIN, "role"] == "id" and ab.loc[ID_DOMAIN, "derived"]

    stored = study.rows(derived=False)
    with ResultStore(str(study_dir / "results.sqlite")) as store:
        assert len(stored) == store.count("results")
    assert (stored.tokens == _study_fixtures().TOKENS).all() and not stored.derived.any()
    assert df[df.derived].tokens.isna().all()
    assert set(df[df.derived].proxy) >= {"mean_ind", "ind_id"}

    merged = study.rows("merged")
    assert set(merged.proxy) == {"merged"}
    assert len(merged) == sum(len(v) for v in table.values["merged"].values())
    mixtures = study.mixtures()
    assert len(mixtures) == 15 and mixtures.has_seq.sum() == 8
    assert mixtures.set_index("label").loc["a+c", "n_units"] == 3


def test_correlations_are_the_analysis_figures(study, table):
    for method in ("pearson", "spearman"):
        df = study.correlations(method, n_boot=N_BOOT)
        assert list(df.columns) == api.CORRELATION_COLUMNS and set(df.method) == {method}
        cells = {(r.section, r.row, r.role, r.proxy): r for r in df.itertuples()}
        for p in table.proxies:
            expected = {
                ("table", "OOD pooled", "ood", p): an.pooled_correlation(
                    table, p, method, role=an.ROLE_OOD, n_boot=N_BOOT
                )
            }
            expected[("table", ID_DOMAIN, "id", p)] = an.correlate(
                table, p, ID_DOMAIN, method, n_boot=N_BOOT
            )
            for d in table.domains:
                for section, role in (("table", "ood"), ("per-domain", "id")):
                    expected[(section, d, role, p)] = an.correlate(
                        table, p, d, method, role=role, n_boot=N_BOOT
                    )
                expected[("per-domain", d, "all", p)] = an.correlate(
                    table, p, d, method, n_boot=N_BOOT
                )
            for key, c in expected.items():
                got = cells[key]
                assert (got.n, got.mixtures) == (c.n, c.mixtures), key
                for a, b in ((got.r, c.r), (got.lo, c.lo), (got.hi, c.hi)):
                    assert same(a, b), key
    one = study.correlations(proxy="merged", n_boot=N_BOOT)
    assert set(one.proxy) == {"merged"}
    assert list(one[one.section == "table"].row[:3]) == ["P1", "P2", ID_DOMAIN]
    with pytest.raises(api.StudyQueryError, match="method 'kendall'"):
        study.correlations("kendall")


def test_summary_row_and_decisions_are_the_decision_figures(study, table):
    expected = dc.summary_row(table, study.proxies, n_boot=N_BOOT, seed=0)
    df = study.summary_row(n_boot=N_BOOT)
    assert df.attrs["domains"] == ["wiki", "code"] == expected.domains
    for r in df.itertuples():
        c = expected.get(r.proxy, r.method, r.variant)
        assert same(r.r, c.r) and same(r.lo, c.lo) and r.n == c.n
    assert len(df) == len(study.proxies) * 2 * len(dc.VARIANTS)

    for p in study.proxies:
        ds = dc.decisions(table, p)
        got = study.decisions(p)
        want = ds.domains + ([ds.summary] if ds.summary else [])
        assert list(got.columns) == api.DECISION_COLUMNS
        assert len(got) == len(want)
        for r, d in zip(got.itertuples(), want):
            assert (r.row, r.n, r.pick, r.seq_best, r.seq_rank, r.top_overlap) == (
                d.row,
                d.n,
                d.pick,
                d.seq_best,
                d.seq_rank,
                d.top_overlap,
            )
            assert r.regret == d.regret and r.pick_label == table.mixtures[d.pick].label
        aggregate = got.attrs["aggregate"]
        assert aggregate["n_domains"] == ds.n and got.attrs["proxy"] == p
    assert study.decisions().attrs["proxy"] == study.headline_proxy == "macro"


def test_recommendation_is_the_reports(study, table):
    rec = study.recommendation()
    mid, value = an.recommend(table, "macro", table.domains)
    assert (rec.mixture_id, rec.perplexity, rec.proxy) == (mid, value, "macro")
    assert rec.label == table.mixtures[mid].label and rec.domains == tuple(table.domains)
    on_wiki = study.recommendation("merged", ["wiki"])
    assert on_wiki.mixture_id == an.recommend(table, "merged", ["wiki"])[0]
    with pytest.raises(api.StudyQueryError, match="'nope'"):
        study.recommendation("nope")
    with pytest.raises(api.StudyQueryError, match=r"domains \['zz'\]"):
        study.recommendation(domains=["zz"])


def test_scatter_is_a_figure_of_every_paired_point(study, table):
    from matplotlib.figure import Figure

    fig = study.scatter("merged")
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    points = sum(len(c.get_offsets()) for c in ax.collections)
    assert points == sum(len(table.paired("merged", d)[0]) for d in table.domains) > 0
    assert "OOD pooled Pearson" in ax.get_title()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []  # not registered with pyplot: no leak, no double display


def test_without_seq_models_correlations_say_why(tmp_path):
    store, _ = _study_fixtures().fill_store(str(tmp_path / "results.sqlite"), n_seq=0)
    store.close()
    study = api.open_study(tmp_path)
    assert len(study.rows()) > 0 and study.recommendation() is not None
    for call in (study.correlations, study.decisions, study.summary_row, study.scatter):
        with pytest.raises(api.StudyQueryError, match="no seq"):
            call()


# ----------------------------------------------------------------------------- data


SEQ_LEN = 16


def _data_dir(root: Path, docs: int) -> Path:
    """A preprocess output of two partitions, one unit each, ``docs`` documents of 20
    tokens per unit."""
    units, partitions = {}, {}
    rng = np.random.default_rng(0)
    for p in ("bio", "cs"):
        unit = f"{p}-0000"
        with IndexedDatasetWriter(str(root / "units" / unit), np.uint16) as w:
            for _ in range(docs):
                w.add_document(rng.integers(3, 500, size=20).astype(np.uint16))
        units[unit] = {"partition": p, "prefix": f"units/{unit}", "tokens": 20 * docs}
        partitions[p] = {"units": [unit]}
    manifest = {
        "format": MANIFEST_FORMAT,
        "tokenizer": {"fingerprint": "x"},
        "partitions": partitions,
        "units": units,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_mixture_data_refuses_data_smaller_than_one_batch(tmp_path):
    (tmp_path / "units").mkdir()
    data = _data_dir(tmp_path, docs=10)  # 200 tokens per unit: 12 samples of 17 each
    mix = api.mixture_data(data, "bio,cs", seq_len=SEQ_LEN, global_batch=8)
    assert len(mix) == 24 and len(list(mix.batches(8))) == 3
    assert mix.weights.tolist() == [0.5, 0.5]
    with pytest.raises(DataFormatError) as e:
        api.mixture_data(data, ["bio", "cs"], seq_len=SEQ_LEN, global_batch=32)
    msg = str(e.value)
    for words in ("bio, cs", "400 tokens", "24 samples", "17 tokens", "global batch of 32"):
        assert words in msg
    assert "size=32" in msg and "\n" not in msg
    big = api.mixture_data(data, "bio", seq_len=SEQ_LEN, global_batch=32, size=64)
    assert len(list(big.batches(32))) == 2  # the unit repeats for more epochs
    by_tokens = api.mixture_data(data, "bio,cs", seq_len=SEQ_LEN, global_batch=8, weights="tokens")
    assert by_tokens.weights.tolist() == [0.5, 0.5]
    with pytest.raises(DataFormatError, match=r"partitions \['chem'\] not in the manifest"):
        api.mixture_data(data, "bio,chem", seq_len=SEQ_LEN, global_batch=8)
    with pytest.raises(DataFormatError, match="no sample of seq_len"):
        api.mixture_data(data, "bio", seq_len=512, global_batch=1)


def test_mixture_dataset_batches_refuse_a_mixture_smaller_than_one_batch(tmp_path):
    """The README's MixtureDataset snippet: batches() used to yield nothing at all."""
    (tmp_path / "units").mkdir()
    data = _data_dir(tmp_path, docs=10)
    mix = MixtureDataset({"bio": str(data / "units" / "bio-0000")}, seq_len=SEQ_LEN)
    assert len(mix) == 12  # one epoch: (200 - 1) // 16 samples
    with pytest.raises(DataFormatError, match="holds 12 samples .* one global batch of 13"):
        next(mix.batches(global_batch=13))
    assert len(list(mix.batches(global_batch=12))) == 1
    assert list(mix.batches(global_batch=12, consumed_samples=12)) == []  # exhausted: no error
