"""Results store: idempotent inserts, resume, concurrent writers (ablate/store.py)."""

from __future__ import annotations

import multiprocessing as mp
import os
import sqlite3

import pytest

from megablocks_ablate.ablate.mixtures import Mixture, Score
from megablocks_ablate.ablate.store import Result, ResultStore, StoreError, make_provenance
from megablocks_ablate.errors import NonFiniteError

MIX = [Mixture.of({p: [f"{p}-0"], q: [f"{q}-0"]}) for p, q in [("a", "b"), ("a", "c"), ("b", "c")]]
DOMAINS = ["a", "b", "c", "wiki"]


def rows(mixture: Mixture, proxy: str = "merged", fp: str = "fp1") -> list[Result]:
    return [
        Result(
            mixture.id,
            proxy,
            d,
            Score(float(i + 1), 10, 40),
            make_provenance(
                weights={u: 0.5 for u in mixture.units},
                eval_fingerprint=fp,
                unit_hashes={u: "h" + u for u in mixture.units},
            ),
        )
        for i, d in enumerate(DOMAINS)
    ]


def test_schema_mixtures_meta_and_rows(tmp_path):
    path = str(tmp_path / "r.sqlite")
    with ResultStore(path) as s:
        assert s.add_mixtures(MIX) == 3 and s.add_mixtures(MIX) == 0
        assert list(s.mixtures().values()) == MIX
        s.set_meta("study", {"name": "x", "proxies": ["merged"]})
        assert s.get_meta("study")["name"] == "x" and s.get_meta("absent", 5) == 5
        assert s.add_results(rows(MIX[0])) == 4
        assert s._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with ResultStore(path) as s:  # reopened: everything is there
        (r,) = [r for r in s.results("merged") if r.domain == "b"]
        assert r.score == Score(2.0, 10, 40) and r.perplexity == pytest.approx(2.718281828**0.2)
        assert r.provenance["eval_fingerprint"] == "fp1" and r.provenance["code_version"]
        assert r.provenance["weights"] == {"a-0": 0.5, "b-0": 0.5}
        assert {"timestamp", "unit_hashes"} <= set(r.provenance)


def test_insert_or_ignore_and_done(tmp_path):
    with ResultStore(str(tmp_path / "r.sqlite")) as s:
        assert not s.done(MIX[0].id, "merged", DOMAINS)
        s.add_results(rows(MIX[0])[:2])
        assert s.done_domains(MIX[0].id, "merged") == {"a", "b"}
        assert not s.done(MIX[0].id, "merged", DOMAINS)
        assert s.add_results(rows(MIX[0])) == 2  # only the missing two are new
        assert s.done(MIX[0].id, "merged", DOMAINS) and not s.done(MIX[0].id, "seq", DOMAINS)
        assert s.count() == 4
        unit = [Result("a-0", "ind", d, Score(1.0, 5, 5), {}) for d in DOMAINS]
        assert s.add_unit_results(unit) == 4 and s.add_unit_results(unit) == 0
        assert s.unit_done("a-0", DOMAINS) and not s.unit_done("b-0", DOMAINS)


def test_different_eval_set_is_refused(tmp_path):
    with ResultStore(str(tmp_path / "r.sqlite")) as s:
        s.add_results(rows(MIX[0], fp="fp1"))
        with pytest.raises(StoreError, match="different evaluation set"):
            s.add_results(rows(MIX[0], fp="fp2"))
        assert s.count() == 4


def _killed_mid_batch(path: str) -> None:
    """Start a batch, write half of it, die without committing (like SIGKILL)."""
    s = ResultStore(path)
    s._db.execute("BEGIN IMMEDIATE")
    for r in rows(MIX[1])[:2]:
        s._db.execute(
            "INSERT INTO results VALUES (?, ?, ?, 1, 1, ?, ?, ?, '{}', 0)",
            (r.subject, r.proxy, r.domain, r.score.nll_sum, r.score.tokens, r.score.bytes),
        )
    os._exit(1)


def test_kill_mid_batch_loses_the_batch_only_and_resumes(tmp_path):
    path = str(tmp_path / "r.sqlite")
    with ResultStore(path) as s:
        s.add_results(rows(MIX[0]))
    p = mp.get_context("fork").Process(target=_killed_mid_batch, args=(path,))
    p.start()
    p.join(30)
    assert p.exitcode == 1
    with ResultStore(path) as s:
        assert s.count() == 4 and not s.done(MIX[1].id, "merged", DOMAINS)
        # the rerun: skip what is done, write the rest; nothing lost, nothing twice
        for m in MIX:
            if not s.done(m.id, "merged", DOMAINS):
                s.add_results(rows(m))
        assert s.count() == 12
        keys = s._db.execute("SELECT COUNT(DISTINCT mixture_id || proxy || domain) FROM results")
        assert keys.fetchone()[0] == 12


def _writer(path: str, rank: int, world: int, barrier) -> None:
    barrier.wait()
    with ResultStore(path) as s:
        s.add_mixtures(MIX)
        for i in range(40):
            # every rank also offers its neighbour's rows: overlaps must be ignored
            for m in MIX:
                for r in rows(m, proxy=f"p{i}"):
                    if hash((r.domain, i)) % world in (rank, (rank + 1) % world):
                        s.add_results([r])


def test_two_processes_write_one_store_concurrently(tmp_path):
    path = str(tmp_path / "shared.sqlite")
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_writer, args=(path, r, 2, barrier)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    with ResultStore(path) as s:
        assert s.count() == 40 * len(MIX) * len(DOMAINS)
        assert s.count("mixtures") == 3


def test_corrupt_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="cannot open results store"):
        ResultStore(str(bad))
    assert issubclass(StoreError, Exception) and sqlite3.sqlite_version


@pytest.mark.parametrize(
    "nll, fp",
    [(float("nan"), "fp1"), (float("nan"), None), (float("inf"), "fp1"), (1e6, None)],
)
def test_non_finite_score_is_refused_naming_subject_proxy_domain(tmp_path, nll, fp):
    with ResultStore(str(tmp_path / "r.sqlite")) as s:
        batch = rows(MIX[0], fp=fp or "fp1")
        if fp is None:
            batch = [Result(r.subject, r.proxy, r.domain, r.score, {}) for r in batch]
        batch[2] = Result(MIX[0].id, "merged", "c", Score(nll, 10, 40), batch[2].provenance)
        with pytest.raises(
            NonFiniteError,
            match=rf"r.sqlite: refusing a non-finite score for subject '{MIX[0].id}', "
            r"proxy 'merged', domain 'c' in results \(NLL sum",
        ):
            s.add_results(batch)
        assert s.count() == 0  # nothing of the batch is written
        unit = [Result("a-0", "ind", "wiki", Score(nll, 5, 5), {})]
        with pytest.raises(NonFiniteError, match=r"subject 'a-0', proxy 'ind', domain 'wiki'"):
            s.add_unit_results(unit)
        assert s.add_results(rows(MIX[0])) == 4 and s.count() == 4


def _legacy_store(path: str) -> None:
    """A store as an older version (or another tool) may have left it: a looser schema
    and rows with an infinite, a textual and a missing NLL sum."""
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE results (mixture_id TEXT NOT NULL, proxy TEXT NOT NULL, domain TEXT "
        "NOT NULL, perplexity REAL, bits_per_byte REAL, nll_sum REAL, tokens INTEGER NOT NULL,"
        " bytes INTEGER NOT NULL, provenance TEXT NOT NULL, created REAL NOT NULL, "
        "PRIMARY KEY (mixture_id, proxy, domain))"
    )
    db.commit()
    db.close()
    with ResultStore(path) as s:
        s.add_results(rows(MIX[0], proxy="seq") + rows(MIX[1], proxy="seq") + rows(MIX[2]))
        s.add_results(rows(MIX[0]))
        s.add_unit_results([Result("a-0", "ind", d, Score(1.0, 5, 5), {}) for d in DOMAINS])
        for mid, d, v in [(MIX[1].id, "a", float("inf")), (MIX[1].id, "b", "nan")]:
            s._db.execute(
                "INSERT INTO results VALUES (?, 'merged', ?, NULL, NULL, ?, 10, 40, '{}', 0)",
                (mid, d, v),
            )
        s._db.execute(
            "INSERT INTO results VALUES (?, 'merged', 'c', NULL, NULL, NULL, 10, 40, '{}', 0)",
            (MIX[1].id,),
        )
        s._db.execute("UPDATE unit_results SET nll_sum = ? WHERE domain = 'a'", (float("inf"),))


def test_legacy_non_finite_rows_read_as_nan_and_report_works(tmp_path, caplog):
    import math

    from megablocks_ablate.ablate import analysis as an
    from megablocks_ablate.ablate.report import write_report

    path = str(tmp_path / "r.sqlite")
    _legacy_store(path)
    with ResultStore(path) as s:
        s.add_mixtures(MIX)
        with caplog.at_level("WARNING", logger="megablocks_ablate.ablate.store"):
            got = {(r.subject, r.domain): r for r in s.results("merged")}
            s.results()
        assert [m for m in caplog.messages if "non-finite score" in m] == [
            caplog.messages[0]
        ]  # said once per store and table
        assert "3 row(s) of results" in caplog.messages[0]
        for d in ("a", "b", "c"):
            r = got[MIX[1].id, d]
            assert math.isnan(r.score.nll_sum) and math.isnan(r.perplexity)
            assert r.score.tokens == 10
        assert got[MIX[0].id, "a"].score == Score(1.0, 10, 40)  # good rows untouched
        assert math.isnan(s.scores(MIX[1].id, "merged")["b"].nll_sum)
        (unit_a,) = [r for r in s.unit_results() if r.domain == "a"]
        assert math.isnan(unit_a.score.nll_sum)
        table = an.build_table(s)
        assert MIX[1].id not in table.get("merged", "a") and MIX[0].id in table.get("merged", "a")
        summary = write_report(s, str(tmp_path / "report"), n_boot=5)
        assert (tmp_path / "report" / "report.md").exists() and summary.files


def test_read_study_table_reads_a_study_dir_and_names_a_missing_store(tmp_path):
    from study_fixtures import fill_roles_store

    from megablocks_ablate.ablate.analysis import build_table
    from megablocks_ablate.ablate.store import read_study_table

    store, mixtures, _ = fill_roles_store(str(tmp_path / "results.sqlite"))
    want = build_table(store)
    store.close()
    got = read_study_table(str(tmp_path))
    assert got.values == want.values and sorted(got.mixtures) == sorted(m.id for m in mixtures)
    with pytest.raises(StoreError, match=r"nowhere: expected a study out_dir holding .*results"):
        read_study_table(str(tmp_path / "nowhere"))


def test_drop_proxy_deletes_only_that_proxys_rows(tmp_path):
    from study_fixtures import fill_roles_store

    store, mixtures, _ = fill_roles_store(str(tmp_path / "d.sqlite"))
    before = store.count()
    macro = len(store.results("macro"))
    assert macro and store.drop_proxy("macro") == macro
    assert store.count() == before - macro and not store.results("macro")
    assert len(store.results("merged")) == macro  # the other proxies untouched
    assert store.drop_proxy("macro") == 0
    store.close()
