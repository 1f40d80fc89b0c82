"""`study report`: a study's results store -> ``report/`` (Markdown, CSV, PNG).

Written files (all atomically)::

    report/report.md          headline, correlation tables, rankings, recommendation,
                              top-k agreement, influence, cost
    report/summary.json       the headline figures, machine-readable (keys:
                              :mod:`.report_tables`)
    report/results.csv        raw store rows (merged proxies, seq, unit models) with
                              NLL sums, tokens, bytes and provenance (+ .parquet when
                              pyarrow is installed)
    report/scores.csv         every value the tables use, derived proxies and ID included
    report/correlations.csv   Pearson and Spearman per (row, role, proxy) with 95%
                              intervals
    report/rankings.csv       per (proxy, domain): every scored mixture, ranked
    report/scatter_<proxy>.png  seq vs proxy perplexity, one colour per domain, in-domain
                              points as triangles (Figure 3)

Correlations keep in-domain and out-of-domain points apart, as the paper's tables do
(:mod:`.roles`): the headline is the headline proxy's out-of-domain per-domain mean and
pooled coefficient and its in-domain figures; the role-blind all-domain pooled
coefficient is a secondary line. The headline proxy is ``fisher`` when the study scored
it, else ``macro`` when a partition holds more than one unit, else ``merged``
(:func:`~.roles.headline_proxy`).

Every number is recomputed from the store (:func:`~.analysis.build_table`), so a
report can be rebuilt at any time, also while a study is still running.

The directory is claimed first (:func:`~megablocks_ablate.utils.outputs.claim_output_dir`,
kind ``report``): a new or empty one, or an earlier report (its marker, or for reports
older than markers its ``report.md`` + ``summary.json``), is written, rewriting the
report's own files (rebuilding is what ``study report`` is for) and keeping anything
you added beside them; a directory holding anything else (your own ``report.md``, a
study, a file) is refused, naming it, before anything is computed or written.
"""

from __future__ import annotations

import json
import math
import os
from typing import TYPE_CHECKING

from megablocks_ablate.ablate import analysis as an
from megablocks_ablate.ablate import decisions as dc
from megablocks_ablate.ablate import mixtures as mx
from megablocks_ablate.ablate import report_scaled
from megablocks_ablate.ablate import report_tables as rt
from megablocks_ablate.ablate import roles as rl
from megablocks_ablate.ablate.mixtures import ID_DOMAIN, SEQ
from megablocks_ablate.ablate.report_tables import ReportSummary, md_table, write_csv
from megablocks_ablate.utils.atomic import (
    atomic_open,
    atomic_write_json,
    atomic_write_text,
    commit_tmp,
    tmp_path_for,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "RANK_ROWS",
    "ReportSummary",
    "plot_scatter",
    "scatter_figure",
    "spec_differences",
    "write_report",
]

RANK_ROWS = 10  # mixtures listed per domain in report.md (rankings.csv has all)


# ----------------------------------------------------------------------------- helpers


def spec_differences(store, spec_dict: dict, store_file: str) -> list[str]:
    """The dotted fields in which ``spec_dict`` (a :class:`StudySpec`'s ``to_dict()``)
    differs from the spec ``store`` was written under (its ``study`` meta), its
    relative paths taken as the runner records them (relative to ``store_file``).
    Fields only one side knows (a spec of another version) are not compared; a store
    that keeps no spec gives no differences."""
    from megablocks_ablate.ablate.spec_paths import map_spec_paths
    from megablocks_ablate.utils.paths import record_path

    written = (store.get_meta("study", {}) or {}).get("spec")
    if not isinstance(written, dict):
        return []
    given = json.loads(json.dumps(spec_dict))  # a copy, tuples as lists like the meta
    map_spec_paths(given, lambda _f, p: record_path(p, store_file), os.path.exists)
    out: list[str] = []

    def walk(a, b, where: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(a.keys() & b.keys()):
                walk(a[k], b[k], f"{where}.{k}" if where else k)
        elif a != b:
            out.append(where)

    walk(given, written, "")
    return out


def _fmt(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _cost(store, table: an.ResultTable) -> mx.Cost | None:
    meta = store.get_meta("study", {}) or {}
    if "unit_tokens" not in meta:
        return None
    order = meta.get("mixtures") or list(table.mixtures)
    mixtures = [table.mixtures[i] for i in order if i in table.mixtures]
    validation = [table.mixtures[i] for i in meta.get("validation", []) if i in table.mixtures]
    return mx.study_cost(mixtures, validation, int(meta["unit_tokens"]))


# ----------------------------------------------------------------------------- files


def _raw_row(r, kind: str, mixture: str, label: str, unit: str) -> list:
    """One row of results.csv: a mixture's or a unit model's score on one domain."""
    return [
        kind,
        mixture,
        label,
        unit,
        r.proxy,
        r.domain,
        r.perplexity,
        r.bits_per_byte,
        r.score.nll_sum,
        r.score.tokens,
        r.score.bytes,
        r.created,
        json.dumps(r.provenance, sort_keys=True),
    ]


def _write_raw(store, table: an.ResultTable, out: str) -> list[str]:
    header = [
        "kind",
        "mixture_id",
        "label",
        "unit",
        "proxy",
        "domain",
        "perplexity",
        "bits_per_byte",
        "nll_sum",
        "tokens",
        "bytes",
        "created",
        "provenance",
    ]
    rows = []
    for r in store.results():
        m = table.mixtures.get(r.subject)
        rows.append(_raw_row(r, "mixture", r.subject, m.label if m else "", ""))
    for r in store.unit_results():
        rows.append(_raw_row(r, "unit", "", "", r.subject))
    files = [os.path.join(out, "results.csv")]
    write_csv(files[0], header, rows)
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return files
    cols = {h: [row[i] for row in rows] for i, h in enumerate(header)}
    path = os.path.join(out, "results.parquet")
    tmp = tmp_path_for(path)
    pq.write_table(pa.table(cols), tmp)
    commit_tmp(tmp, path)
    return files + [path]


def _write_scores(table: an.ResultTable, out: str) -> str:
    rows = []
    for proxy, by_d in table.values.items():
        for d, by_m in by_d.items():
            for mid, v in by_m.items():
                rows.append(
                    [mid, table.mixtures[mid].label if mid in table.mixtures else "", proxy, d, v]
                )
    path = os.path.join(out, "scores.csv")
    write_csv(path, ["mixture_id", "label", "proxy", "domain", "perplexity"], rows)
    return path


def scatter_figure(
    table: an.ResultTable, proxy: str, pooled: dict[str, an.Corr] | None = None
) -> Figure:
    """Seq vs proxy perplexity on every individual domain, log-log, one colour each;
    out-of-domain points are circles, in-domain ones triangles (they lie on another
    line). ``pooled`` (method -> Corr) is shown in the title, as the OOD pooled figure.

    Returns a ``matplotlib.figure.Figure`` built without pyplot (no global figure
    state, no backend switch), so a notebook can show it and a script can save it."""
    import matplotlib
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 5.2), dpi=120)
    ax = fig.subplots()
    cmap = matplotlib.colormaps["tab10" if len(table.domains) <= 10 else "tab20"]
    lo, hi = math.inf, -math.inf
    any_id = False
    for i, d in enumerate(table.domains):
        label: str | None = d  # one legend entry per domain, on its first series
        for role, marker in ((an.ROLE_OOD, "o"), (an.ROLE_ID, "^")):
            _, p, s = table.paired(proxy, d, role)
            if len(p) == 0:
                continue
            any_id |= role == an.ROLE_ID
            ax.scatter(
                p,
                s,
                s=22 if marker == "o" else 30,
                marker=marker,
                color=cmap(i % cmap.N),
                label=label,
                alpha=0.85,
                edgecolors="white",
                linewidths=0.4,
            )
            lo, hi = min(lo, p.min(), s.min()), max(hi, p.max(), s.max())
            label = None
    if math.isfinite(lo):
        ax.plot([lo, hi], [lo, hi], ls="--", lw=0.8, color="0.6", label="y = x")
        ax.set_xscale("log")
        ax.set_yscale("log")
    if any_id:
        ax.scatter([], [], marker="^", color="0.4", label="in-domain (triangles)")
    ax.set_xlabel(f"{proxy} perplexity (proxy)")
    ax.set_ylabel("seq perplexity")
    title = f"seq vs {proxy}"
    if pooled:
        title += (
            f"   OOD pooled Pearson {pooled['pearson'].fmt(ci=False)}, "
            f"Spearman {pooled['spearman'].fmt(ci=False)}"
        )
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    ax.legend(fontsize=7, loc="upper left", frameon=False, ncol=1 + len(table.domains) // 12)
    fig.tight_layout()
    return fig


def plot_scatter(
    table: an.ResultTable, proxy: str, path: str, pooled: dict[str, an.Corr] | None = None
) -> None:
    """:func:`scatter_figure` written to ``path`` as PNG (atomically)."""
    fig = scatter_figure(table, proxy, pooled)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")


# ----------------------------------------------------------------------------- report.md


def _rankings_section(table: an.ResultTable, proxy: str) -> tuple[str, list]:
    seq = table.values.get(SEQ, {})
    parts, csv_rows = [], []
    for d in table.all_domains:
        ranked = an.rank_mixtures(table, proxy, d)
        if not ranked:
            continue
        seq_d = seq.get(d, {})
        seq_rank = {
            m: i + 1 for i, (m, _) in enumerate(sorted(seq_d.items(), key=lambda kv: kv[1]))
        }
        rows = []
        for i, (mid, v) in enumerate(ranked):
            label = table.mixtures[mid].label if mid in table.mixtures else mid
            row = [i + 1, label, _fmt(v), _fmt(seq_d.get(mid)), seq_rank.get(mid, "-")]
            csv_rows.append(
                [proxy, d, i + 1, mid, label, v, seq_d.get(mid, ""), seq_rank.get(mid, "")]
            )
            if i < RANK_ROWS:
                rows.append(row)
        more = (
            f"\n\n({len(ranked) - RANK_ROWS} more in rankings.csv)"
            if len(ranked) > RANK_ROWS
            else ""
        )
        parts.append(
            f"#### {d}: recommended {rows[0][1]}\n\n"
            + md_table(["rank", "mixture", proxy, "seq", "seq rank"], rows)
            + more
        )
    return "\n\n".join(parts), csv_rows


def _intro_section(table: an.ResultTable, name: str) -> list[str]:
    """Title, and what was scored on which evaluation domains."""
    n_mix = len(table.mixtures)
    return [
        f"# Data-ablation study report: {name}",
        "",
        f"{n_mix} mixtures scored by {', '.join(table.proxies) or 'no proxy yet'}; "
        f"{len(table.seq_mixtures)} with a seq model; evaluation domains: "
        f"{', '.join(table.domains)}"
        + (
            f" + {ID_DOMAIN} (each mixture's own held-out sets, pooled) and "
            f"{', '.join(table.id_rows)} (its i-th partition's)"
            if ID_DOMAIN in table.all_domains and table.id_rows
            else ""
        )
        + ". A mixture's point on a domain is in-domain when the mixture trains on the "
        "domain's partition, else out-of-domain; the two lie on different lines, so the "
        "correlations below keep them apart.",
        "",
    ]


def _scatter_section(
    table: an.ResultTable, summary: ReportSummary, out_dir: str, files: list[str]
) -> list[str]:
    """Draw scatter_<proxy>.png per proxy (appended to ``files``) and link them."""
    md = ["", "## Seq vs proxy", ""]
    for p in rl.ordered_proxies(table.proxies):
        path = os.path.join(out_dir, f"scatter_{p}.png")
        ood = {m: summary.fig(p, an.ROLE_OOD, "pooled", m) for m in rt.METHODS}
        plot_scatter(table, p, path, ood if p in summary.roles else None)
        files.append(path)
        md.append(f"![seq vs {p}](scatter_{p}.png)")
    return md


def _rankings(table: an.ResultTable, primary: str, out_dir: str) -> tuple[list[str], str]:
    """The rankings section by ``primary``, and rankings.csv (its path)."""
    section, rank_rows = _rankings_section(table, primary)
    path = os.path.join(out_dir, "rankings.csv")
    write_csv(
        path,
        [
            "proxy",
            "domain",
            "rank",
            "mixture_id",
            "label",
            "perplexity",
            "seq_perplexity",
            "seq_rank",
        ],
        rank_rows,
    )
    return ["", f"## Rankings by {primary}", "", section], path


def _influence_section(table: an.ResultTable, primary: str) -> list[str]:
    """Per partition and domain: mean perplexity drop from adding it (empty if no pairs)."""
    influence = {d: an.partition_influence(table, primary, d) for d in table.all_domains}
    parts = sorted({p for v in influence.values() for p in v})
    if not parts:
        return []
    return [
        "",
        f"## Partition influence ({primary})",
        "",
        "Mean perplexity drop from adding the partition, over scored mixture pairs "
        "differing by it (positive = it helps).",
        "",
        md_table(
            ["partition"] + table.all_domains,
            [[p] + [_fmt(influence[d].get(p)) for d in table.all_domains] for p in parts],
        ),
    ]


def _cost_section(store, table: an.ResultTable) -> list[str]:
    """Training tokens the study costs, and those actually spent (empty without metadata)."""
    cost = _cost(store, table)
    if not cost:
        return []
    md = ["", "## Cost", "", md_table(["", "tokens / count"], an.cost_rows(cost))]
    spent = store.get_meta("spent")
    if spent:
        md += ["", "Actually trained: " + ", ".join(f"{k} {v:,}" for k, v in spent.items()) + "."]
    return md


def write_report(
    store,
    out_dir: str,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    top_k: int = 3,
    plots: bool = True,
    flag: str = "report directory",
) -> ReportSummary:
    """Write ``out_dir`` (report.md, CSVs, PNGs, summary.json) from a results store;
    a directory that is not a report of ours is refused (ConfigError naming ``flag``)."""
    from megablocks_ablate.utils.outputs import claim_output_dir

    claim_output_dir(
        out_dir, "report", reuse=True, inputs=[getattr(store, "path", None)], flag=flag
    )
    table = an.build_table(store)
    meta = store.get_meta("study", {}) or {}
    primary, reason = rl.headline_proxy(table)
    summary = ReportSummary(out_dir=out_dir, primary=primary, primary_reason=reason)
    files = _write_raw(store, table, out_dir) + [_write_scores(table, out_dir)]

    tables = rt.correlation_tables(table, n_boot, seed)
    if tables:
        files.append(rt.write_correlations(tables, out_dir))
        rt.summarize(summary, table, tables)
        proxies = tables[rt.METHODS[0]].proxies
        summary.ranks = rt.rank_summaries(table, proxies)
        summary.summary_row = dc.summary_row(table, proxies, n_boot=n_boot, seed=seed)
        summary.decisions = {p: dc.decisions(table, p) for p in proxies}

    md = _intro_section(table, meta.get("name", "study"))
    md += rt.headline_section(summary, table, n_boot, seed)
    if tables:
        md += rt.summary_row_section(summary, tables[rt.METHODS[0]].proxies)
        md += rt.decisions_section(table, summary)
        scaled_md, summary.scaled = report_scaled.scaled_section(
            table, store.get_meta("scaled"), n_boot, seed
        )
        md += scaled_md
        md += rt.correlation_sections(table, tables)
        if plots:
            md += _scatter_section(table, summary, out_dir, files)
        md += rt.top_k_section(table, summary, top_k)
    if primary:
        section, path = _rankings(table, primary, out_dir)
        files.append(path)
        md += section + _influence_section(table, primary)
    md += _cost_section(store, table)

    files.append(os.path.join(out_dir, "report.md"))
    summary.files = files
    atomic_write_text(files[-1], "\n".join(md) + "\n")
    atomic_write_json(os.path.join(out_dir, "summary.json"), summary.to_json())
    return summary
