"""A Python API for notebooks: a study's results as pandas DataFrames and matplotlib figures.

::

    from megablocks_ablate import api

    study = api.open_study("configs/studies/demo.yaml")  # or demo_out/study, or its results.sqlite
    study.rows()              # every (mixture, proxy, domain) perplexity, with its role
    study.correlations()      # proxy vs seq, the report's rows (in-domain / out-of-domain)
    study.summary_row()       # the paper's summary (Paloma / Avg) row
    study.decisions()         # how good each proxy pick is under seq
    study.recommendation()    # the mixture the headline proxy recommends
    study.scatter()           # seq vs proxy, a matplotlib Figure

Every number is the one ``megablocks-ablate study report`` writes: the DataFrames are
built from the same :mod:`.ablate.analysis`, :mod:`.ablate.roles` and
:mod:`.ablate.decisions` calls, and the figure by :func:`.ablate.report.scatter_figure`.
:func:`open_study` reads the results store once (a snapshot: call
:meth:`StudyResults.refresh` while a study is still running). :func:`mixture_data` is the
README's ``MixtureDataset`` snippet as one call, refusing data smaller than one batch.

pandas is needed for the DataFrames (``pip install 'megablocks-ablate[notebook]'``); it
and matplotlib are imported on first use, and nothing here imports torch. See
docs/api.md.
"""

from __future__ import annotations

import math
import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from megablocks_ablate.ablate import analysis as an
from megablocks_ablate.ablate import decisions as dc
from megablocks_ablate.ablate import roles as rl
from megablocks_ablate.ablate.mixtures import ID_DOMAIN, SEQ
from megablocks_ablate.ablate.store import STORE_NAME, ResultStore, StoreError
from megablocks_ablate.errors import DataFormatError, MBAError

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from megablocks_ablate.data.mixture import MixtureDataset

__all__ = [
    "MissingDependencyError",
    "Recommendation",
    "StudyNotFoundError",
    "StudyQueryError",
    "StudyResults",
    "mixture_data",
    "open_study",
    "store_for",
]

ROW_COLUMNS = [
    "mixture_id",
    "label",
    "k",
    "proxy",
    "domain",
    "role",
    "perplexity",
    "seq_perplexity",
    "tokens",
    "derived",
]
CORRELATION_COLUMNS = [
    "method",
    "section",
    "row",
    "label",
    "role",
    "proxy",
    "r",
    "lo",
    "hi",
    "n",
    "mixtures",
    "per",
]
DECISION_COLUMNS = [
    "row",
    "n",
    "pick",
    "pick_label",
    "seq_best",
    "seq_best_label",
    "seq_rank",
    "top_overlap",
    "regret",
    "margin",
]
RUN_FIRST = "run `megablocks-ablate study run SPEC` first"


class StudyNotFoundError(MBAError, FileNotFoundError):
    """:func:`open_study` found no results store at, or named by, the path."""


class StudyQueryError(MBAError, ValueError):
    """A question the study's results cannot answer: an unknown proxy, or correlations
    before any seq (validation) model was scored."""


class MissingDependencyError(MBAError, ImportError):
    """An optional package (pandas) is not installed."""


def _pandas() -> Any:
    try:
        import pandas
    except ImportError:
        raise MissingDependencyError(
            "pandas is needed for the study DataFrames: pip install "
            "'megablocks-ablate[notebook]' (or pandas)"
        ) from None
    return pandas


# ----------------------------------------------------------------------------- opening


def _spec_store(spec: str) -> str:
    """The results store of a study spec: its ``out_dir``, relative to the spec's own
    directory (as ``megablocks-ablate study report SPEC`` reads it; see
    :mod:`megablocks_ablate.ablate.spec_paths`), so a notebook may run anywhere."""
    from megablocks_ablate.ablate.spec import StudySpec

    out_dir = os.path.expanduser(StudySpec.load(spec).out_dir)
    candidates = [os.path.abspath(out_dir)]
    for d in dict.fromkeys(candidates):
        if os.path.isfile(os.path.join(d, STORE_NAME)):
            return os.path.join(d, STORE_NAME)
    looked = " or ".join(os.path.join(d, STORE_NAME) for d in dict.fromkeys(candidates))
    raise StudyNotFoundError(
        f"{spec}: no results store for out_dir {out_dir!r} (looked for {looked}): "
        f"{RUN_FIRST.replace('SPEC', spec)}"
    )


def store_for(path: str | os.PathLike) -> str:
    """The results store ``path`` names: a study spec (``.yaml`` / ``.yml``), a study
    ``out_dir`` (holding ``results.sqlite``) or the store file itself;
    :class:`StudyNotFoundError` (one line, naming what was looked for) otherwise."""
    given = os.fspath(path)
    p = os.path.expanduser(given)
    if os.path.isdir(p):
        db = os.path.join(p, STORE_NAME)
        if os.path.isfile(db):
            return db
        raise StudyNotFoundError(
            f"{given}: a directory without {STORE_NAME}: not a study out_dir, or the study "
            f"has not scored anything yet ({RUN_FIRST})"
        )
    if not os.path.exists(p):
        raise StudyNotFoundError(
            f"{given}: no such file or directory (give a study spec YAML, a study out_dir "
            f"or its {STORE_NAME}; {RUN_FIRST})"
        )
    if p.endswith((".yaml", ".yml")):
        return _spec_store(p)
    return p


def _check_store_file(db: str) -> None:
    """StoreError unless ``db`` is a results store, checked read-only (opening any
    SQLite file as a :class:`ResultStore` would add the store's tables to it)."""
    uri = "file:" + os.path.abspath(db).replace("?", "%3f").replace("#", "%23") + "?mode=ro"
    try:
        con = sqlite3.connect(uri, uri=True)
        try:
            tables = {n for (n,) in con.execute("SELECT name FROM sqlite_master")}
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        raise StoreError(f"{db}: not a results store ({e})") from None
    if not {"meta", "mixtures", "results"} <= tables:
        raise StoreError(
            f"{db}: not a megablocks-ablate results store (no meta, mixtures and results tables)"
        )


def open_study(path: str | os.PathLike, *, proxies: Sequence[str] | None = None) -> StudyResults:
    """Open a study's results: ``path`` is a study spec YAML, a study ``out_dir`` or a
    ``results.sqlite``. ``proxies`` limits the proxies read (default: the study's).

    A relative ``out_dir`` in a spec is taken relative to the working directory, as the
    command line does, and else relative to the spec's directory. Errors
    (:class:`StudyNotFoundError`, :class:`~.ablate.store.StoreError`,
    :class:`~.errors.ConfigError` for a broken spec) are :class:`~.errors.MBAError`
    with a one-line message.
    """
    return StudyResults(store_for(path), proxies=proxies)


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Recommendation:
    """The mixture with the lowest geometric-mean proxy perplexity over ``domains``
    (:func:`~.ablate.analysis.recommend`, as in the report's headline)."""

    mixture_id: str
    label: str
    proxy: str
    perplexity: float  # geometric mean over ``domains``
    domains: tuple[str, ...]

    def __str__(self) -> str:
        return (
            f"{self.label} ({self.mixture_id}): lowest geometric-mean {self.proxy} "
            f"perplexity {self.perplexity:.3f} over {', '.join(self.domains)}"
        )


class StudyResults:
    """One study's results, read from its store (see the module docstring).

    Attributes: ``path`` (the store), ``name``, ``meta`` (the study meta the runner
    wrote), ``table`` (the :class:`~.ablate.analysis.ResultTable` every method uses),
    ``proxies`` (in the paper's order), ``domains`` (individual evaluation domains),
    ``headline_proxy`` and ``headline_reason`` (the report's headline proxy and why).
    """

    def __init__(self, store: str, *, proxies: Sequence[str] | None = None):
        self.path = os.path.abspath(store)
        self._wanted = list(proxies) if proxies is not None else None
        self.refresh()

    def refresh(self) -> StudyResults:
        """Read the store again (new results of a running study); returns ``self``."""
        _check_store_file(self.path)
        with ResultStore(self.path) as store:
            self.table = an.build_table(store, self._wanted)
            self.meta: dict = store.get_meta("study", {}) or {}
            self._tokens = {(r.subject, r.proxy, r.domain): r.score.tokens for r in store.results()}
        self.name: str = self.meta.get("name", "study")
        self.proxies = rl.ordered_proxies(self.table.proxies)
        self.domains = list(self.table.domains)
        self.headline_proxy, self.headline_reason = rl.headline_proxy(self.table)
        self._role_tables: dict[tuple[str, int, int], rl.RoleTable] = {}
        return self

    def __repr__(self) -> str:
        t = self.table
        return (
            f"StudyResults({self.name!r}: {len(t.mixtures)} mixtures, "
            f"{len(t.seq_mixtures)} with seq, proxies {', '.join(self.proxies) or '-'}, "
            f"domains {', '.join(self.domains) or '-'}; {self.path})"
        )

    # -- checks ------------------------------------------------------------------------
    def _proxy(self, proxy: str | None) -> str:
        """``proxy``, or the headline proxy; StudyQueryError for one not in the study."""
        if proxy is None:
            if self.headline_proxy is None:
                raise StudyQueryError(f"{self.path}: no proxy has results yet ({RUN_FIRST})")
            return self.headline_proxy
        if proxy not in self.table.proxies:
            raise StudyQueryError(
                f"proxy {proxy!r} has no results in {self.path} (it has: "
                f"{', '.join(self.proxies) or 'none'})"
            )
        return proxy

    def _need_seq(self, what: str) -> None:
        if not self.table.seq_mixtures:
            raise StudyQueryError(
                f"{self.path}: no seq (validation) results yet, so no {what}: they compare "
                "proxies with seq models (give validation: in the spec and run the study)"
            )

    def _label(self, mixture_id: str) -> str:
        m = self.table.mixtures.get(mixture_id)
        return m.label if m else mixture_id

    # -- tables ------------------------------------------------------------------------
    def mixtures(self) -> pd.DataFrame:
        """One row per mixture: ``mixture_id``, ``label``, ``k`` (partitions),
        ``n_units``, ``partitions`` (a tuple of names) and ``has_seq`` (a seq model was
        scored)."""
        seq = set(self.table.seq_mixtures)
        records = [
            (mid, m.label, m.k, len(m.units), m.names, mid in seq)
            for mid, m in self.table.mixtures.items()
        ]
        columns = ["mixture_id", "label", "k", "n_units", "partitions", "has_seq"]
        return _pandas().DataFrame.from_records(records, columns=columns)

    def rows(self, proxy: str | None = None, *, derived: bool = True) -> pd.DataFrame:
        """Every perplexity the analysis uses (the report's scores.csv), one row each.

        Columns: ``mixture_id``, ``label``, ``k``, ``proxy`` (``seq`` for the seq
        models), ``domain`` (an evaluation domain, ``ID`` = the mixture's own held-out
        sets pooled, or ``P1``.. = its i-th partition's), ``role`` (``"id"``: the
        mixture trains on the domain's partition, else ``"ood"``), ``perplexity``,
        ``seq_perplexity`` (NaN without a seq model), ``tokens`` (evaluated tokens of a
        stored row; ``<NA>`` where ``derived``) and ``derived`` (True for ``mean_ind``,
        ``ind_id`` and the pooled ``ID`` / ``P`` rows). ``proxy`` keeps one proxy;
        ``derived=False`` keeps only the rows stored as evaluated.
        """
        if proxy is not None and proxy != SEQ:
            proxy = self._proxy(proxy)
        t = self.table
        seq = t.values.get(SEQ, {})
        order = [p for p in self.proxies + [SEQ] if p in t.values and proxy in (None, p)]
        keys = t.domains + t.id_rows + [ID_DOMAIN]
        records = []
        for p in order:
            by_domain = t.values[p]
            for d in [k for k in keys if k in by_domain]:
                for mid in [m for m in t.mixtures if m in by_domain[d]]:
                    tokens = self._tokens.get((mid, p, d)) if d in t.domains else None
                    if tokens is None and not derived:
                        continue
                    seq_v = seq.get(d, {}).get(mid, math.nan)
                    m = t.mixtures[mid]
                    records.append(
                        (mid, m.label, m.k, p, d, t.role(mid, d), by_domain[d][mid], seq_v)
                        + (tokens, tokens is None)
                    )
        df = _pandas().DataFrame.from_records(records, columns=ROW_COLUMNS)
        df["tokens"] = df["tokens"].astype("Int64")
        return df

    def _role_table(self, method: str, n_boot: int, seed: int) -> rl.RoleTable:
        if method not in an.CORRELATIONS:
            raise StudyQueryError(f"method {method!r}: expected one of {sorted(an.CORRELATIONS)}")
        key = (method, n_boot, seed)
        if key not in self._role_tables:
            self._role_tables[key] = rl.role_table(self.table, method, n_boot=n_boot, seed=seed)
        return self._role_tables[key]

    def correlations(
        self,
        method: str = "pearson",
        *,
        proxy: str | None = None,
        n_boot: int = 1000,
        seed: int = 0,
    ) -> pd.DataFrame:
        """Proxy vs seq correlations, as correlations.csv (:func:`~.ablate.roles.role_table`).

        ``section`` ``"table"``: the report's rows in order: the in-domain rows (``P1``..,
        ``ID``), each domain over the mixtures for which it is out of domain (role
        ``ood``), ``OOD mean``, ``OOD pooled``, ``ID pooled``, ``all-domain mean`` and
        ``all-domain pooled``; ``"per-domain"``: each domain over its in-domain mixtures
        (role ``id``) and over all mixtures (``all``). Columns ``r``, ``lo`` / ``hi``
        (95% bootstrap interval, ``n_boot`` resamples of mixtures, ``seed``), ``n`` and
        what it counts, ``per`` (``points``: (mixture, domain) points; ``domains``: a
        mean over that many per-domain coefficients), and ``mixtures``. ``proxy`` keeps
        one proxy.
        """
        self._need_seq("correlations")
        keep = None if proxy is None else self._proxy(proxy)
        rt = self._role_table(method, n_boot, seed)
        keyed = [("table", r.key, r.label, r.role, r.cells) for r in rt.rows]
        keyed += [
            ("per-domain", d, d, role, rt.per_domain[role][d])
            for role in (an.ROLE_ID, rl.ROLE_ALL)
            for d in rt.per_domain[role]
        ]
        records = [
            (
                method,
                section,
                key,
                label,
                role,
                p,
                c.r,
                c.lo,
                c.hi,
                c.n,
                c.mixtures,
                c.per or "points",
            )
            for section, key, label, role, cells in keyed
            for p, c in cells.items()
            if keep in (None, p)
        ]
        return _pandas().DataFrame.from_records(records, columns=CORRELATION_COLUMNS)

    def summary_row(self, *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
        """The paper's summary (Paloma / Avg) row (:func:`~.ablate.decisions.summary_row`):
        one row per (proxy, method, variant) with ``r``, ``lo``, ``hi``, ``n``
        (mixtures). ``variant``: ``arith`` / ``geom`` mean over the summary domains, the
        coefficient on the ``raw`` mean or its ``log``; ``arith/raw`` is the headline.
        ``.attrs``: ``domains`` (the summary domains) and ``missing`` (why there is no
        row; the frame is then empty)."""
        self._need_seq("summary row")
        row = dc.summary_row(self.table, self.proxies, n_boot=n_boot, seed=seed)
        records = [
            (p, method, variant, c.r, c.lo, c.hi, c.n)
            for variant, by_method in row.cells.items()
            for method, by_proxy in by_method.items()
            for p, c in by_proxy.items()
            if row.domains
        ]
        columns = ["proxy", "method", "variant", "r", "lo", "hi", "n"]
        df = _pandas().DataFrame.from_records(records, columns=columns)
        df.attrs.update(domains=list(row.domains), missing=row.missing_reason)
        return df

    def decisions(self, proxy: str | None = None) -> pd.DataFrame:
        """How good ``proxy``'s pick (default: the headline proxy) is under seq
        (:func:`~.ablate.decisions.decisions`): one row per out-of-domain domain (over the
        mixtures for which it is OOD) and a last ``summary`` row, with ``n`` mixtures,
        the ``pick`` and ``seq_best`` (ids and labels), the pick's ``seq_rank`` (1 =
        seq's best), ``top_overlap`` (of the top 3), ``regret`` (seq perplexity of the
        pick / seq's best - 1) and ``margin`` (the proxy's perplexity of its second-best /
        of its pick - 1; under 1%: a close call). ``.attrs``: ``proxy`` and ``aggregate``
        (share in seq's top 2, median rank, mean top-3 overlap, mean and max regret, close
        calls over the domains)."""
        self._need_seq("decisions")
        p = self._proxy(proxy)
        ds = dc.decisions(self.table, p)
        rows = ds.domains + ([ds.summary] if ds.summary else [])
        records = [
            (d.row, d.n, d.pick, self._label(d.pick), d.seq_best, self._label(d.seq_best))
            + (d.seq_rank, d.top_overlap, d.regret, d.margin)
            for d in rows
        ]
        df = _pandas().DataFrame.from_records(records, columns=DECISION_COLUMNS)
        aggregate = {
            k: v for k, v in ds.to_json().items() if k not in ("ood_domains", "summary_row")
        }
        df.attrs.update(proxy=p, aggregate=aggregate)
        return df

    def recommendation(
        self, proxy: str | None = None, domains: Sequence[str] | None = None
    ) -> Recommendation | None:
        """The mixture ``proxy`` (default: the headline proxy) ranks best over
        ``domains`` (default: every individual domain), as the report recommends; None
        when no mixture is scored on all of them."""
        p = self._proxy(proxy)
        doms = list(domains) if domains is not None else self.domains
        unknown = [d for d in doms if d not in self.table.all_domains + self.table.id_rows]
        if unknown:
            raise StudyQueryError(
                f"domains {unknown} not in {self.path} (it has: {', '.join(self.domains)})"
            )
        rec = an.recommend(self.table, p, doms)
        if rec is None:
            return None
        return Recommendation(rec[0], self._label(rec[0]), p, rec[1], tuple(doms))

    def scatter(self, proxy: str | None = None) -> Figure:
        """Seq vs ``proxy`` (default: the headline proxy) perplexity, the report's
        ``scatter_<proxy>.png`` as a ``matplotlib.figure.Figure`` (not registered with
        pyplot: a notebook shows it as a cell's value; ``fig.savefig(path)`` saves it)."""
        from megablocks_ablate.ablate.report import scatter_figure

        self._need_seq("scatter plot")
        p = self._proxy(proxy)
        pooled = {
            m: an.pooled_correlation(self.table, p, m, role=an.ROLE_OOD, n_boot=0)
            for m in an.CORRELATIONS
        }
        return scatter_figure(self.table, p, pooled)


# ----------------------------------------------------------------------------- data


def _unit_weights(manifest: Any, names: list[str], weights: str) -> dict[str, float]:
    """Unit -> weight of the partitions ``names``: ``"macro"`` (every partition an equal
    share, split equally inside: the seq models' blend) or ``"tokens"`` (the units'
    natural proportions)."""
    from megablocks_ablate.data.mixture import partition_balanced_weights, token_weighted

    units = manifest.partition_units()
    unknown = [p for p in names if p not in units]
    if unknown or not names:
        raise DataFormatError(
            f"{manifest.root}: partitions {unknown or names} not in the manifest (it has: "
            f"{', '.join(units)})"
        )
    if weights == "macro":
        return partition_balanced_weights({p: units[p] for p in names})
    if weights == "tokens":
        return token_weighted(
            {u: int(manifest.units[u]["tokens"]) for p in names for u in units[p]}
        )
    raise DataFormatError(f"weights: expected 'macro' or 'tokens', got {weights!r}")


def mixture_data(
    data: str | os.PathLike,
    partitions: str | Sequence[str],
    *,
    seq_len: int,
    global_batch: int,
    weights: str = "macro",
    size: int | None = None,
    seed: int = 1234,
    cache_dir: str | None = None,
) -> MixtureDataset:
    """The training stream of a mixture of ``partitions`` (names, or ``"a,b,c"``) of the
    preprocess output ``data``: a :class:`~.data.mixture.MixtureDataset` over their
    units weighted ``"macro"`` (each partition an equal share, as the seq models train)
    or ``"tokens"`` (natural proportions), ``size`` samples of ``seq_len + 1`` tokens
    (default one epoch of the units), checked to hold one global batch of
    ``global_batch`` samples.

    Data smaller than one batch is refused with a :class:`~.errors.DataFormatError`
    naming the sizes (``batches()`` drops a final partial batch, so it would yield
    nothing); pass a larger ``size`` (units repeat for more epochs) or a smaller batch.
    Then ``for batch in mix.batches(global_batch, dp_rank=rank, dp_world=world)``.
    """
    from megablocks_ablate.data.manifest import Manifest
    from megablocks_ablate.data.mixture import MixtureDataset

    manifest = Manifest.load(os.fspath(data))
    names = partitions.split(",") if isinstance(partitions, str) else list(partitions)
    names = [n.strip() for n in names if n.strip()]
    w = _unit_weights(manifest, names, weights)
    live = {u: float(v) for u, v in w.items() if v > 0}
    tokens = sum(int(manifest.units.get(u, {}).get("tokens", 0)) for u in live)
    where = (
        f"{os.fspath(data)}: partitions {', '.join(names)} ({len(live)} units, {tokens:,} tokens)"
    )
    try:
        mix = MixtureDataset(
            {u: manifest.unit_prefix(u) for u in live},
            live,
            size=size,
            seq_len=seq_len,
            seed=seed,
            cache_dir=cache_dir,
        )
        mix.check_batch_fits(global_batch)
    except DataFormatError as e:
        raise DataFormatError(f"{where}: {e}") from None
    return mix
