"""`study report`: a study's results store -> ``report/`` (Markdown, CSV, PNG).

Written files (all atomically)::

    report/report.md          headline, correlation tables, rankings, recommendation,
                              top-k agreement, influence, cost
    report/summary.json       the headline figures, machine-readable
    report/results.csv        raw store rows (merged proxies, seq, unit models) with
                              NLL sums, tokens, bytes and provenance (+ .parquet when
                              pyarrow is installed)
    report/scores.csv         every value the tables use, derived proxies and ID included
    report/correlations.csv   Pearson and Spearman per (row, proxy) with 95% intervals
    report/rankings.csv       per (proxy, domain): every scored mixture, ranked
    report/scatter_<proxy>.png  seq vs proxy perplexity, one colour per domain (Figure 3)

Every number is recomputed from the store (:func:`~.analysis.build_table`), so a
report can be rebuilt at any time, also while a study is still running.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from megablocks_ablate.ablate import analysis as an
from megablocks_ablate.ablate import mixtures as mx
from megablocks_ablate.ablate.mixtures import ID_DOMAIN, SEQ
from megablocks_ablate.utils.atomic import (
    atomic_open,
    atomic_write_json,
    atomic_write_text,
    commit_tmp,
    tmp_path_for,
)

RANK_ROWS = 10  # mixtures listed per domain in report.md (rankings.csv has all)


@dataclass
class ReportSummary:
    out_dir: str
    primary: str | None  # proxy of the headline
    pooled: dict[str, dict[str, an.Corr]] = field(default_factory=dict)  # proxy -> method -> Corr
    per_domain: dict[str, dict[str, an.Corr]] = field(default_factory=dict)  # domain -> method
    recommended: tuple[str, str, float] | None = None  # (mixture id, label, score)
    files: list[str] = field(default_factory=list)

    def headline(self) -> str:
        """A few lines for the terminal: where the report is and the key figures."""
        lines = [f"report: {os.path.join(self.out_dir, 'report.md')}"]
        if self.primary and self.primary in self.pooled:
            p, s = self.pooled[self.primary]["pearson"], self.pooled[self.primary]["spearman"]
            lines.append(
                f"{self.primary} vs seq, pooled over domains: Pearson {p.fmt()}, "
                f"Spearman {s.fmt()} ({p.n} points, {p.mixtures} mixtures)"
            )
            for d, c in self.per_domain.items():
                lines.append(
                    f"  {d:<24} Pearson {c['pearson'].fmt(ci=False):>6}  "
                    f"Spearman {c['spearman'].fmt(ci=False):>6}"
                )
        for proxy, c in self.pooled.items():
            if proxy != self.primary:
                lines.append(
                    f"{proxy} vs seq, pooled: Pearson {c['pearson'].fmt(ci=False)}, "
                    f"Spearman {c['spearman'].fmt(ci=False)}"
                )
        if self.recommended:
            lines.append(f"recommended mixture: {self.recommended[1]} ({self.recommended[0]})")
        return "\n".join(lines)

    def to_json(self) -> dict:
        def c(x: an.Corr) -> dict:
            return {
                k: (None if isinstance(v, float) and math.isnan(v) else v)
                for k, v in x.__dict__.items()
            }

        return {
            "primary": self.primary,
            "pooled": {p: {m: c(v) for m, v in by.items()} for p, by in self.pooled.items()},
            "per_domain": {
                d: {m: c(v) for m, v in by.items()} for d, by in self.per_domain.items()
            },
            "recommended": list(self.recommended) if self.recommended else None,
            "files": self.files,
        }


# ----------------------------------------------------------------------------- helpers


def _md_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _write_csv(path: str, header: Sequence[str], rows) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _fmt(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _primary(table: an.ResultTable) -> str | None:
    for p in ("merged", "macro", "micro", "mean_ind", "ind_id"):
        if p in table.proxies:
            return p
    return None


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
    _write_csv(files[0], header, rows)
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
    _write_csv(path, ["mixture_id", "label", "proxy", "domain", "perplexity"], rows)
    return path


def plot_scatter(
    table: an.ResultTable, proxy: str, path: str, pooled: dict[str, an.Corr] | None = None
) -> None:
    """Seq vs proxy perplexity on every individual domain, log-log, one colour each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.2), dpi=120)
    cmap = plt.get_cmap("tab10" if len(table.domains) <= 10 else "tab20")
    lo, hi = math.inf, -math.inf
    for i, d in enumerate(table.domains):
        _, p, s = table.paired(proxy, d)
        if len(p) == 0:
            continue
        ax.scatter(
            p,
            s,
            s=22,
            color=cmap(i % cmap.N),
            label=d,
            alpha=0.85,
            edgecolors="white",
            linewidths=0.4,
        )
        lo, hi = min(lo, p.min(), s.min()), max(hi, p.max(), s.max())
    if math.isfinite(lo):
        ax.plot([lo, hi], [lo, hi], ls="--", lw=0.8, color="0.6", label="y = x")
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel(f"{proxy} perplexity (proxy)")
    ax.set_ylabel("seq perplexity")
    title = f"seq vs {proxy}"
    if pooled:
        title += (
            f"   pooled Pearson {pooled['pearson'].fmt(ci=False)}, "
            f"Spearman {pooled['spearman'].fmt(ci=False)}"
        )
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    ax.legend(fontsize=7, loc="upper left", frameon=False, ncol=1 + len(table.domains) // 12)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


# ----------------------------------------------------------------------------- report.md


def _corr_section(ct: an.CorrelationTable, title: str) -> str:
    rows = [
        [r] + [ct.cells[r][p].fmt() if p in ct.cells[r] else "-" for p in ct.proxies]
        for r in ct.rows
    ]
    return f"### {title}\n\n" + _md_table(["eval domain"] + ct.proxies, rows)


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
            + _md_table(["rank", "mixture", proxy, "seq", "seq rank"], rows)
            + more
        )
    return "\n\n".join(parts), csv_rows


def _correlation_tables(
    table: an.ResultTable, n_boot: int, seed: int
) -> dict[str, an.CorrelationTable]:
    """Pearson and Spearman tables against seq, or none without seq results."""
    if not table.seq_mixtures:
        return {}
    return {
        m: an.correlation_table(table, m, n_boot=n_boot, seed=seed) for m in ("pearson", "spearman")
    }


def _write_correlations(tables: dict[str, an.CorrelationTable], out_dir: str) -> str:
    """correlations.csv: one row per (method, row, proxy) with its interval."""
    corr_rows = []
    for method, ct in tables.items():
        for r in ct.rows:
            for p, c in ct.cells[r].items():
                corr_rows.append([method, r, p, c.r, c.lo, c.hi, c.n, c.mixtures])
    path = os.path.join(out_dir, "correlations.csv")
    _write_csv(path, ["method", "row", "proxy", "r", "lo", "hi", "n", "mixtures"], corr_rows)
    return path


def _summarize_correlations(
    summary: ReportSummary, table: an.ResultTable, tables: dict[str, an.CorrelationTable]
) -> None:
    """Copy the pooled (per proxy) and the primary proxy's per-domain figures into ``summary``."""
    for p in table.proxies:
        summary.pooled[p] = {m: tables[m].cells[an.POOLED_ROW][p] for m in tables}
    if summary.primary:
        summary.per_domain = {
            d: {m: tables[m].cells[d][summary.primary] for m in tables} for d in table.all_domains
        }


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
            f" + {ID_DOMAIN} (each mixture's own held-out sets, pooled)"
            if ID_DOMAIN in table.all_domains
            else ""
        )
        + ".",
        "",
    ]


def _headline_section(
    summary: ReportSummary, table: an.ResultTable, n_boot: int, seed: int
) -> list[str]:
    """The primary proxy's pooled correlations (others in brief), and the recommendation;
    sets ``summary.recommended``."""
    primary = summary.primary
    md = ["## Headline", ""]
    if primary and primary in summary.pooled:
        p, s = summary.pooled[primary]["pearson"], summary.pooled[primary]["spearman"]
        md.append(
            f"**{primary} vs seq, pooled over the evaluation domains: Pearson {p.fmt()}, "
            f"Spearman {s.fmt()}** ({p.n} points from {p.mixtures} mixtures; 95% "
            f"bootstrap intervals over mixtures, {n_boot} resamples, seed {seed})."
        )
        others = [
            f"{q}: Pearson {c['pearson'].fmt(ci=False)}, Spearman {c['spearman'].fmt(ci=False)}"
            for q, c in summary.pooled.items()
            if q != primary
        ]
        if others:
            md.append("")
            md.append("Other proxies, pooled: " + "; ".join(others) + ".")
    else:
        md.append("No seq (validation) results yet: correlations need seq models.")
    rec = an.recommend(table, primary, table.domains) if primary else None
    if rec:
        label = table.mixtures[rec[0]].label
        summary.recommended = (rec[0], label, rec[1])
        md.append("")
        md.append(
            f"**Recommended mixture** (lowest geometric-mean {primary} perplexity over "
            f"{', '.join(table.domains)}): **{label}** (`{rec[0]}`, {rec[1]:.3f})."
        )
    return md


def _correlation_sections(tables: dict[str, an.CorrelationTable]) -> list[str]:
    """The Pearson and Spearman tables, with a legend."""
    md = [
        "",
        "## Correlation with seq models",
        "",
        "Rows: evaluation domains; `ID` = each mixture's own held-out sets pooled; "
        f"`{an.MEAN_ROW}` = mean of the per-domain coefficients; `{an.POOLED_ROW}` = one "
        "coefficient over all (mixture, domain) points of the individual domains. "
        "Columns: proxies. Cells: coefficient [95% bootstrap interval].",
        "",
    ]
    md.append(_corr_section(tables["pearson"], "Pearson"))
    md.append("")
    md.append(_corr_section(tables["spearman"], "Spearman"))
    return md


def _scatter_section(
    table: an.ResultTable, summary: ReportSummary, out_dir: str, files: list[str]
) -> list[str]:
    """Draw scatter_<proxy>.png per proxy (appended to ``files``) and link them."""
    md = ["", "## Seq vs proxy", ""]
    for p in table.proxies:
        path = os.path.join(out_dir, f"scatter_{p}.png")
        plot_scatter(table, p, path, summary.pooled.get(p))
        files.append(path)
        md.append(f"![seq vs {p}](scatter_{p}.png)")
    return md


def _top_k_section(table: an.ResultTable, top_k: int) -> list[str]:
    """Per domain and proxy: top-k agreement with seq and seq's rank of the proxy's pick."""
    md = [
        "",
        f"## Top-{top_k} agreement with seq",
        "",
        f"Share of the {top_k} best mixtures by seq perplexity that the proxy also puts in "
        "its top {k}; in brackets, the seq rank of the proxy's first choice (1 = it is also "
        "seq's best).".replace("{k}", str(top_k)),
        "",
    ]
    rows = []
    for d in table.all_domains:
        cells = []
        for p in table.proxies:
            a, b = an.top_k_agreement(table, p, d, top_k), an.best_true_rank(table, p, d)
            cells.append("-" if math.isnan(a) else f"{a:.2f} ({b})")
        rows.append([d] + cells)
    md.append(_md_table(["eval domain"] + table.proxies, rows))
    return md


def _rankings(table: an.ResultTable, primary: str, out_dir: str) -> tuple[list[str], str]:
    """The rankings section by ``primary``, and rankings.csv (its path)."""
    section, rank_rows = _rankings_section(table, primary)
    path = os.path.join(out_dir, "rankings.csv")
    _write_csv(
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
        _md_table(
            ["partition"] + table.all_domains,
            [[p] + [_fmt(influence[d].get(p)) for d in table.all_domains] for p in parts],
        ),
    ]


def _cost_section(store, table: an.ResultTable) -> list[str]:
    """Training tokens the study costs, and those actually spent (empty without metadata)."""
    cost = _cost(store, table)
    if not cost:
        return []
    md = ["", "## Cost", "", _md_table(["", "tokens / count"], an.cost_rows(cost))]
    spent = store.get_meta("spent")
    if spent:
        md += ["", "Actually trained: " + ", ".join(f"{k} {v:,}" for k, v in spent.items()) + "."]
    return md


def write_report(
    store, out_dir: str, *, n_boot: int = 1000, seed: int = 0, top_k: int = 3, plots: bool = True
) -> ReportSummary:
    """Write ``out_dir`` (report.md, CSVs, PNGs, summary.json) from a results store."""
    os.makedirs(out_dir, exist_ok=True)
    table = an.build_table(store)
    meta = store.get_meta("study", {}) or {}
    primary = _primary(table)
    summary = ReportSummary(out_dir=out_dir, primary=primary)
    files = _write_raw(store, table, out_dir) + [_write_scores(table, out_dir)]

    tables = _correlation_tables(table, n_boot, seed)
    if tables:
        files.append(_write_correlations(tables, out_dir))
        _summarize_correlations(summary, table, tables)

    md = _intro_section(table, meta.get("name", "study"))
    md += _headline_section(summary, table, n_boot, seed)
    if tables:
        md += _correlation_sections(tables)
        if plots:
            md += _scatter_section(table, summary, out_dir, files)
        md += _top_k_section(table, top_k)
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
