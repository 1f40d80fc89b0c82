"""The results store: one SQLite file per study, safe to kill, resume and share.

Tables::

    mixtures(id PK, label, members JSON, k, n_units)
    results(mixture_id, proxy, domain, perplexity, bits_per_byte, nll_sum, tokens,
            bytes, provenance JSON, created; PK (mixture_id, proxy, domain))
    unit_results(unit, domain, perplexity, bits_per_byte, nll_sum, tokens, bytes,
                 provenance JSON, created; PK (unit, domain))
    meta(key PK, value JSON)

``results`` holds the merged proxies (``merged``, ``macro``, ``micro``) and the seq
models (proxy ``seq``); ``unit_results`` holds each unit model's own evaluations, from
which ``mean_ind`` and ``ind_id`` are derived at analysis time (they are averages of
perplexities, not models). NLL sums and token counts are kept so results on several
domains can be pooled exactly (a mixture's own held-out sets, :mod:`.mixtures`).

**Resume.** Rows are written with ``INSERT OR IGNORE`` on their key, a batch (e.g.
all domains of one merge) per transaction: a run killed at any moment leaves whole
batches, and its rerun skips what :meth:`ResultStore.done` reports, so nothing is
lost or duplicated. A row offered again with a different evaluation-set fingerprint
is refused rather than silently ignored, and so is a non-finite score (numbers must be
right or absent); rows with one that an older version stored read as NLL NaN.

**Sharding.** Any number of processes (ranks) may open the same file and write
concurrently: WAL journal (readers never block the writer) and a busy timeout
serialise the short write transactions. WAL needs shared memory between the writers,
so on a network filesystem (NFS, Lustre) pass ``wal=False`` (rollback journal).

**Paths.** A path a row's provenance or the ``study`` meta holds (a model's run
directory, the spec's data and outputs) is recorded relative to the store's directory
when it was given relative, absolute when given absolute (:meth:`ResultStore.record_path`,
:mod:`megablocks_ablate.utils.paths`), so a study copied elsewhere keeps its meaning;
:meth:`ResultStore.resolve_path` reads one back.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from megablocks_ablate.ablate.mixtures import Mixture, Score
from megablocks_ablate.errors import MBAError, NonFiniteError
from megablocks_ablate.utils.paths import record_path, resolve_recorded

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS mixtures (
    id TEXT PRIMARY KEY, label TEXT NOT NULL, members TEXT NOT NULL,
    k INTEGER NOT NULL, n_units INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    mixture_id TEXT NOT NULL, proxy TEXT NOT NULL, domain TEXT NOT NULL,
    perplexity REAL, bits_per_byte REAL, nll_sum REAL NOT NULL, tokens INTEGER NOT NULL,
    bytes INTEGER NOT NULL, provenance TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (mixture_id, proxy, domain));
CREATE TABLE IF NOT EXISTS unit_results (
    unit TEXT NOT NULL, domain TEXT NOT NULL,
    perplexity REAL, bits_per_byte REAL, nll_sum REAL NOT NULL, tokens INTEGER NOT NULL,
    bytes INTEGER NOT NULL, provenance TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (unit, domain));
"""


STORE_NAME = "results.sqlite"


def store_path(out_dir: str) -> str:
    """Where a study keeps its results store: ``<out_dir>/results.sqlite``."""
    return os.path.join(out_dir, STORE_NAME)


class StoreError(MBAError):
    """The results store is unusable or was offered inconsistent results."""


def code_version() -> str:
    from megablocks_ablate import __version__

    return __version__


def make_provenance(
    *,
    unit_hashes: Mapping[str, str | None] | None = None,
    weights: Mapping[str, float] | None = None,
    eval_fingerprint: str | None = None,
    **extra: Any,
) -> dict:
    """The provenance record of one evaluation (JSON-serialisable)."""
    prov: dict[str, Any] = {"code_version": code_version(), "timestamp": time.time()}
    if unit_hashes is not None:
        prov["unit_hashes"] = dict(unit_hashes)
    if weights is not None:
        prov["weights"] = dict(weights)
    if eval_fingerprint is not None:
        prov["eval_fingerprint"] = eval_fingerprint
    prov.update(extra)
    return prov


@dataclass(frozen=True)
class Result:
    """One (mixture, proxy, domain) row (or, in ``unit_results``, one (unit, domain))."""

    subject: str  # mixture id, or unit name for unit results
    proxy: str  # merged / macro / micro / seq, or "ind" for unit results
    domain: str
    score: Score
    provenance: dict = field(default_factory=dict)
    created: float = 0.0

    @property
    def perplexity(self) -> float:
        return self.score.perplexity

    @property
    def bits_per_byte(self) -> float:
        return self.score.bits_per_byte


def _num(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def finite_score(s: Score) -> bool:
    """Whether a score's NLL sum is a finite number and its perplexity (when it has
    tokens) does not overflow: the scores the store accepts."""
    try:
        return math.isfinite(float(s.nll_sum)) and (not s.tokens or math.isfinite(s.perplexity))
    except (OverflowError, TypeError, ValueError):
        return False


def _read_score(nll_sum: Any, tokens: Any, nbytes: Any) -> Score:
    """A stored score. A row from an older version with a non-finite (or non-numeric)
    NLL reads with NLL NaN: absent from rankings and correlations, never a crash."""
    s = Score(nll_sum, int(tokens or 0), int(nbytes or 0))
    return Score(float(nll_sum) if finite_score(s) else math.nan, s.tokens, s.bytes)


class ResultStore:
    """A study's results in one SQLite file (see the module docstring).

    Use as a context manager, or call :meth:`close`. One instance per process.
    """

    def __init__(self, path: str, *, timeout_s: float = 120.0, wal: bool = True):
        self.path = os.fspath(path)
        self._warned: set[str] = set()  # tables whose non-finite legacy rows were reported
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        try:
            # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so a writer takes
            # the write lock up front and waits (busy timeout) instead of failing midway.
            self._db = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None)
            self._db.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
            if wal:
                self._set_wal(timeout_s)
            self._db.execute("PRAGMA synchronous = NORMAL" if wal else "PRAGMA synchronous = FULL")
            with self._write():
                for stmt in filter(str.strip, _SCHEMA.split(";")):
                    self._db.execute(stmt)
                self._db.execute(
                    "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                    (json.dumps(SCHEMA_VERSION),),
                )
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: cannot open results store: {e}") from None
        version = self.get_meta("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: results store schema {version}, this code reads {SCHEMA_VERSION}"
            )

    # -- plumbing ------------------------------------------------------------------------
    def _set_wal(self, timeout_s: float) -> None:
        """Switch to WAL. Changing the journal mode can fail with "database is locked"
        without waiting on the busy handler when ranks open a new store at the same
        moment, so retry until the timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._db.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    class _Txn:
        def __init__(self, db: sqlite3.Connection):
            self.db = db

        def __enter__(self):
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, exc_type, exc, tb):
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")

    def _write(self) -> _Txn:
        return ResultStore._Txn(self._db)

    # -- paths ---------------------------------------------------------------------------
    def record_path(self, path: str) -> str:
        """``path`` (absolute, or relative to the working directory) as this store
        records it: relative to the store's directory when given relative."""
        return record_path(path, self.path)

    def resolve_path(self, value: str) -> str:
        """The absolute path a value this store recorded names."""
        return resolve_recorded(value, self.path)

    # -- meta ----------------------------------------------------------------------------
    def set_meta(self, key: str, value: Any) -> None:
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    # -- mixtures ------------------------------------------------------------------------
    def add_mixtures(self, mixtures: Iterable[Mixture]) -> int:
        """Record mixtures (idempotent); returns how many were new."""
        rows = [(m.id, m.label, json.dumps(m.to_json()), m.k, len(m.units)) for m in mixtures]
        with self._write() as db:
            before = db.total_changes
            db.executemany("INSERT OR IGNORE INTO mixtures VALUES (?, ?, ?, ?, ?)", rows)
            return db.total_changes - before

    def mixtures(self) -> dict[str, Mixture]:
        return {
            i: Mixture.from_json(json.loads(m))
            for i, m in self._db.execute("SELECT id, members FROM mixtures ORDER BY rowid")
        }

    # -- results -------------------------------------------------------------------------
    def add_results(self, rows: Iterable[Result]) -> int:
        """Insert mixture results in one transaction; returns how many were new.

        A row whose key exists is ignored (resume), unless its provenance carries an
        ``eval_fingerprint`` different from the stored one: then StoreError. A row whose
        score is NaN/inf (see :func:`finite_score`) raises NonFiniteError naming its
        subject, proxy and domain, and nothing of the batch is written.
        """
        return self._insert("results", "mixture_id", rows)

    def add_unit_results(self, rows: Iterable[Result]) -> int:
        """Insert unit-model results (``subject`` = unit name); see :meth:`add_results`."""
        return self._insert("unit_results", "unit", rows)

    def _refuse_non_finite(self, table: str, rows: Sequence[Result]) -> None:
        """NonFiniteError naming (subject, proxy, domain) of the first row whose score
        is NaN/inf; nothing of the batch is written."""
        for r in rows:
            if not finite_score(r.score):
                raise NonFiniteError(
                    f"{self.path}: refusing a non-finite score for subject {r.subject!r}, "
                    f"proxy {r.proxy!r}, domain {r.domain!r} in {table} (NLL sum "
                    f"{r.score.nll_sum} over {r.score.tokens} tokens): results must be right "
                    "or absent; the model's weights or its evaluation diverged"
                )

    def _insert(self, table: str, key: str, rows: Iterable[Result]) -> int:
        rows = list(rows)
        self._refuse_non_finite(table, rows)
        new = 0
        now = time.time()
        with self._write() as db:
            for r in rows:
                s = r.score
                values = (
                    [r.subject]
                    + ([r.proxy] if table == "results" else [])
                    + [
                        r.domain,
                        _num(s.perplexity),
                        _num(s.bits_per_byte),
                        float(s.nll_sum),
                        int(s.tokens),
                        int(s.bytes),
                        json.dumps(r.provenance, sort_keys=True),
                        r.created or now,
                    ]
                )
                marks = ", ".join("?" * len(values))
                cur = db.execute(f"INSERT OR IGNORE INTO {table} VALUES ({marks})", values)
                if cur.rowcount:
                    new += 1
                    continue
                self._check_same_eval(db, table, key, r)
        return new

    def _check_same_eval(self, db, table: str, key: str, r: Result) -> None:
        fp = r.provenance.get("eval_fingerprint")
        if fp is None:
            return
        where = f"{key} = ? AND domain = ?" + (" AND proxy = ?" if table == "results" else "")
        args = [r.subject, r.domain] + ([r.proxy] if table == "results" else [])
        row = db.execute(f"SELECT provenance FROM {table} WHERE {where}", args).fetchone()
        if row is None:  # not stored, and not because its key exists: a constraint
            raise StoreError(
                f"{self.path}: {table} did not accept {r.subject}/{r.proxy}/{r.domain}"
            )
        old = json.loads(row[0]).get("eval_fingerprint")
        if old is not None and old != fp:
            raise StoreError(
                f"{self.path}: {table} already holds {r.subject}/{r.proxy}/{r.domain} evaluated "
                f"on a different evaluation set (fingerprint {old} vs {fp}); use a new study "
                "directory or delete the store"
            )

    def done(self, mixture_id: str, proxy: str, domains: Sequence[str]) -> bool:
        """Whether every one of ``domains`` has a result for (mixture, proxy)."""
        return set(domains) <= self.done_domains(mixture_id, proxy)

    def done_domains(self, mixture_id: str, proxy: str) -> set[str]:
        return {
            d
            for (d,) in self._db.execute(
                "SELECT domain FROM results WHERE mixture_id = ? AND proxy = ?", (mixture_id, proxy)
            )
        }

    def drop_proxy(self, proxy: str) -> int:
        """Delete every mixture row of ``proxy`` (rows the study itself derived and must
        replace, e.g. the scaled merge's after its lambda was refitted); returns how many."""
        with self._write() as db:
            return db.execute("DELETE FROM results WHERE proxy = ?", (proxy,)).rowcount

    def scores(self, mixture_id: str, proxy: str) -> dict[str, Score]:
        """domain -> score of one (mixture, proxy)."""
        return {
            d: _read_score(n, t, b)
            for d, n, t, b in self._db.execute(
                "SELECT domain, nll_sum, tokens, bytes FROM results WHERE mixture_id = ? AND "
                "proxy = ?",
                (mixture_id, proxy),
            )
        }

    def unit_done(self, unit: str, domains: Sequence[str]) -> bool:
        got = {
            d
            for (d,) in self._db.execute("SELECT domain FROM unit_results WHERE unit = ?", (unit,))
        }
        return set(domains) <= got

    def results(self, proxy: str | None = None) -> list[Result]:
        sql = (
            "SELECT mixture_id, proxy, domain, nll_sum, tokens, bytes, provenance, created "
            "FROM results"
        )
        args: tuple = ()
        if proxy is not None:
            sql, args = sql + " WHERE proxy = ?", (proxy,)
        rows = [
            Result(m, p, d, _read_score(n, t, b), json.loads(pv), c)
            for m, p, d, n, t, b, pv, c in self._db.execute(sql + " ORDER BY rowid", args)
        ]
        self._warn_non_finite("results", rows)
        return rows

    def unit_results(self) -> list[Result]:
        rows = [
            Result(u, "ind", d, _read_score(n, t, b), json.loads(pv), c)
            for u, d, n, t, b, pv, c in self._db.execute(
                "SELECT unit, domain, nll_sum, tokens, bytes, provenance, created "
                "FROM unit_results ORDER BY rowid"
            )
        ]
        self._warn_non_finite("unit_results", rows)
        return rows

    def _warn_non_finite(self, table: str, rows: Sequence[Result]) -> None:
        """Once per table and store: say that rows from an older version hold a
        non-finite score (they read as NLL NaN)."""
        bad = [r for r in rows if math.isnan(r.score.nll_sum)]
        if bad and table not in self._warned:
            self._warned.add(table)
            r = bad[0]
            logger.warning(
                "%s: %d row(s) of %s have a non-finite score (e.g. %s/%s/%s), stored by an "
                "older version; they read as NaN and are left out of rankings and correlations",
                self.path,
                len(bad),
                table,
                r.subject,
                r.proxy,
                r.domain,
            )

    def windows(self) -> set[int]:
        """The evaluation window lengths (provenance ``max_len``) of the stored rows, both
        tables; rows from before the window was recorded are left out."""
        found: set[int] = set()
        for table in ("results", "unit_results"):
            try:  # SQLite's JSON functions (built in since 3.38, an option before)
                values = [
                    v
                    for (v,) in self._db.execute(
                        f"SELECT DISTINCT json_extract(provenance, '$.max_len') FROM {table}"
                    )
                ]
            except sqlite3.OperationalError:
                values = [
                    json.loads(p).get("max_len")
                    for (p,) in self._db.execute(f"SELECT provenance FROM {table}")
                ]
            found.update(v for v in values if isinstance(v, int) and not isinstance(v, bool))
        return found

    def count(self, table: str = "results") -> int:
        if table not in ("results", "unit_results", "mixtures"):
            raise ValueError(f"unknown table {table!r}")
        return self._db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def read_study_table(out_dir: str, proxies: Iterable[str] | None = None):
    """The analysis table (``analysis.ResultTable``) of the study whose ``out_dir`` this
    is; StoreError, naming the path, when it holds no results store."""
    # imported here: analysis reads any store, and the store does not need analysis
    from megablocks_ablate.ablate.analysis import build_table

    db = store_path(out_dir)
    if not os.path.isfile(db):
        raise StoreError(f"{out_dir}: expected a study out_dir holding {db}")
    with ResultStore(db) as store:
        return build_table(store, proxies)
