"""The report's role-separated parts: summary, headline, correlation and top-k tables.

Split from :mod:`.report` (which writes the files and the other sections). The
layout follows the paper: in-domain rows first (P1..Pk, ``ID (P1+P2)``), then each
evaluation domain over the mixtures for which it is out of domain, then the per-role
summaries (``OOD mean``, ``OOD pooled``, ``ID pooled``) and last the role-blind
``all-domain mean`` / ``all-domain pooled`` (:mod:`.roles` says why they are
secondary).

summary.json (:meth:`ReportSummary.to_json`)::

    primary         the headline proxy;  primary_reason: why (one clause)
    pooled          {proxy: {method: Corr}}: all-domain pooled (kept for compatibility)
    per_domain      {row: {method: Corr}} of the headline proxy: the ID rows (P1.., ID)
                    and each domain over its out-of-domain mixtures
    id_label        how the ID row is labelled, e.g. "ID (P1+P2)"
    roles           {proxy: {"ood": {"mean": {method: Corr}, "pooled": {...}},
                             "id":  {"row": {...}, "mean": {...}, "pooled": {...}},
                             "all": {"mean": {...}, "pooled": {...}}}}
    best_true_rank  {proxy: {"ood" | "id": {"median", "max", "n"}}} (§A.5)
    recommended     [mixture id, label, score];  files: the files written
    runner_up       {"id", "label", "margin", "close_call"}: the headline proxy's second
                    mixture by the same score, and the recommendation's margin over it

A Corr is ``{"r", "lo", "hi", "n", "mixtures"}`` (null where undefined). ``roles.id.mean``
(mean over domains of the coefficient over each domain's in-domain mixtures, often only
a few points each) is in summary.json and correlations.csv but not in the headline.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from megablocks_ablate.ablate import analysis as an
from megablocks_ablate.ablate import decisions as dc
from megablocks_ablate.ablate import roles as rl
from megablocks_ablate.ablate.analysis import ROLE_ID, ROLE_OOD
from megablocks_ablate.ablate.mixtures import ID_DOMAIN
from megablocks_ablate.utils.atomic import atomic_write_text

METHODS = ("pearson", "spearman")
# why the role-blind pooled figure is secondary (report.md and the terminal headline)
WHY_ALL_LOWER = (
    "in-domain and out-of-domain points lie on different lines: a seq model trained on "
    "a partition beats a 1/k-weighted merge on that partition's own held-out set far "
    "more than elsewhere, so pooling both regimes mixes two relationships"
)


def corr_json(x: an.Corr) -> dict:
    return {
        k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in x.__dict__.items()
    }


@dataclass
class ReportSummary:
    out_dir: str
    primary: str | None  # proxy of the headline
    pooled: dict[str, dict[str, an.Corr]] = field(default_factory=dict)  # proxy -> method
    per_domain: dict[str, dict[str, an.Corr]] = field(default_factory=dict)  # row -> method
    recommended: tuple[str, str, float] | None = None  # (mixture id, label, score)
    runner_up: tuple[str, str, float] | None = None  # (mixture id, label, margin of the pick)
    files: list[str] = field(default_factory=list)
    primary_reason: str = ""
    id_label: str = ID_DOMAIN
    # proxy -> role -> figure -> method -> Corr (figures as in RoleTable.figures)
    roles: dict[str, dict[str, dict[str, dict[str, an.Corr]]]] = field(default_factory=dict)
    ranks: dict[str, dict[str, rl.RankSummary]] = field(default_factory=dict)  # proxy -> role
    summary_row: dc.SummaryRow | None = None  # the paper's Paloma / Avg row
    decisions: dict[str, dc.DecisionSummary] = field(default_factory=dict)  # proxy ->
    scaled: dict | None = None  # the scaled merge's fit and held-out figures

    def fig(self, proxy: str, role: str, name: str, method: str) -> an.Corr:
        return self.roles.get(proxy, {}).get(role, {}).get(name, {}).get(method, an.Corr(math.nan))

    def pair(self, proxy: str, role: str, name: str, ci: bool = False) -> str:
        """``Pearson / Spearman`` of one figure."""
        return " / ".join(self.fig(proxy, role, name, m).fmt(ci=ci) for m in METHODS)

    def _role_lines(self, p: str) -> list[str]:
        po, so = (self.fig(p, ROLE_OOD, "pooled", m) for m in METHODS)
        mo, ms = (self.fig(p, ROLE_OOD, "mean", m).fmt(ci=False) for m in METHODS)
        ir, irs = (self.fig(p, ROLE_ID, "row", m).fmt() for m in METHODS)
        ip, ips = (self.fig(p, ROLE_ID, "pooled", m).fmt() for m in METHODS)
        return [
            f"{p} vs seq, out of domain: per-domain mean Pearson {mo}, Spearman {ms}; "
            f"pooled Pearson {po.fmt()}, Spearman {so.fmt()} ({po.n} points, "
            f"{po.mixtures} mixtures)",
            f"{p} vs seq, in domain: {self.id_label} Pearson {ir}, Spearman {irs}; "
            f"ID pooled Pearson {ip}, Spearman {ips}",
        ]

    def summary_line(self, p: str) -> str:
        """The summary row of proxy ``p`` in one line (or why there is none)."""
        row = self.summary_row
        if row is None:
            return ""
        if not row.domains:
            return row.missing_reason
        a, s = row.get(p, "pearson"), row.get(p, "spearman")
        lg = row.get(p, "pearson", "geom/log")
        return (
            f"{p} vs seq, summary row (mean perplexity over {', '.join(row.domains)}, "
            f"out of domain for every validation mixture): Pearson {a.fmt()}, Spearman "
            f"{s.fmt(ci=False, n=False)}; on mean log perplexity Pearson "
            f"{lg.fmt(ci=False, n=False)}"
        )

    def headline(self) -> str:
        """A few lines for the terminal: where the report is and the key figures."""
        lines = [f"report: {os.path.join(self.out_dir, 'report.md')}"]
        p = self.primary
        if p and p in self.roles:
            lines.append(f"headline proxy: {p}: {self.primary_reason}")
            if self.summary_line(p):
                lines.append(self.summary_line(p))
            lines += self._role_lines(p)
            if p in self.decisions:
                lines.append(f"{p} decisions: {self.decisions[p].fmt()}")
            for d, c in self.per_domain.items():
                label = self.id_label if d == ID_DOMAIN else d
                lines.append(
                    f"  {label:<24} Pearson {c['pearson'].fmt(ci=False):>6}  "
                    f"Spearman {c['spearman'].fmt(ci=False):>6}"
                )
            for q in self.roles:
                if q != p:
                    lines.append(
                        f"{q} vs seq (Pearson / Spearman): OOD mean "
                        f"{self.pair(q, ROLE_OOD, 'mean')}, OOD pooled "
                        f"{self.pair(q, ROLE_OOD, 'pooled')}, {self.id_label} "
                        f"{self.pair(q, ROLE_ID, 'row')}, ID pooled {self.pair(q, ROLE_ID, 'pooled')}"
                    )
            a, s = self.pooled[p]["pearson"], self.pooled[p]["spearman"]
            lines.append(
                f"secondary, all domains: {p} vs seq, pooled over domains: Pearson {a.fmt()}, "
                f"Spearman {s.fmt()} (lower when {WHY_ALL_LOWER})"
            )
        if self.recommended:
            lines.append(
                f"recommended mixture: {self.recommended[1]} ({self.recommended[0]})"
                + _runner_up_note(self.runner_up)
            )
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "primary": self.primary,
            "primary_reason": self.primary_reason,
            "pooled": {
                p: {m: corr_json(v) for m, v in by.items()} for p, by in self.pooled.items()
            },
            "per_domain": {
                d: {m: corr_json(v) for m, v in by.items()} for d, by in self.per_domain.items()
            },
            "id_label": self.id_label,
            "roles": {
                p: {
                    role: {
                        f: {m: corr_json(c) for m, c in by_m.items()} for f, by_m in figs.items()
                    }
                    for role, figs in by_role.items()
                }
                for p, by_role in self.roles.items()
            },
            "best_true_rank": {
                p: {
                    role: {"median": None if r.n == 0 else r.median, "max": r.max, "n": r.n}
                    for role, r in by_role.items()
                }
                for p, by_role in self.ranks.items()
            },
            "summary_row": self._summary_row_json(),
            "decisions": {p: d.to_json() for p, d in self.decisions.items()},
            "scaled": self.scaled,
            "recommended": list(self.recommended) if self.recommended else None,
            "runner_up": (
                {
                    "id": self.runner_up[0],
                    "label": self.runner_up[1],
                    "margin": self.runner_up[2],
                    "close_call": self.runner_up[2] < dc.CLOSE_CALL,
                }
                if self.runner_up
                else None
            ),
            "files": self.files,
        }

    def _summary_row_json(self) -> dict | None:
        row = self.summary_row
        if row is None:
            return None
        return {
            "domains": row.domains,
            "missing": row.missing_reason or None,
            "headline_variant": dc.HEADLINE_VARIANT,
            "cells": {
                v: {m: {p: corr_json(c) for p, c in by_p.items()} for m, by_p in by_m.items()}
                for v, by_m in row.cells.items()
            },
        }


# ----------------------------------------------------------------------------- helpers


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def write_csv(path: str, header: Sequence[str], rows) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


# ----------------------------------------------------------------------------- tables


def correlation_tables(table: an.ResultTable, n_boot: int, seed: int) -> dict[str, rl.RoleTable]:
    """Pearson and Spearman role tables against seq, or none without seq results."""
    if not table.seq_mixtures:
        return {}
    return {m: rl.role_table(table, m, n_boot=n_boot, seed=seed) for m in METHODS}


def write_correlations(tables: dict[str, rl.RoleTable], out_dir: str) -> str:
    """correlations.csv: one row per (method, row, role, proxy) with its interval.

    The report's rows (role ``id``, ``ood`` or ``all`` as in the table), then every
    domain over its in-domain mixtures (role ``id``) and over all mixtures (``all``).
    """
    out = []
    for method, rt in tables.items():
        keyed = [(r.key, r.role, r.cells) for r in rt.rows]
        keyed += [
            (d, role, rt.per_domain[role][d])
            for role in (ROLE_ID, rl.ROLE_ALL)
            for d in rt.per_domain[role]
        ]
        for key, role, cells in keyed:
            for p, c in cells.items():
                out.append([method, key, role, p, c.r, c.lo, c.hi, c.n, c.mixtures])
    path = os.path.join(out_dir, "correlations.csv")
    write_csv(path, ["method", "row", "role", "proxy", "r", "lo", "hi", "n", "mixtures"], out)
    return path


def summarize(
    summary: ReportSummary, table: an.ResultTable, tables: dict[str, rl.RoleTable]
) -> None:
    """Copy the per-role figures (every proxy) and the headline proxy's rows into
    ``summary``; ``pooled`` stays the all-domain pooled coefficient."""
    first = tables[METHODS[0]]
    summary.id_label = first.id_label
    for p in first.proxies:
        summary.pooled[p] = {m: tables[m].figure(p, rl.ROLE_ALL, "pooled") for m in tables}
        summary.roles[p] = {
            role: {f: {m: tables[m].figures[role][f][p] for m in tables} for f in figs}
            for role, figs in first.figures.items()
        }
    if summary.primary in first.proxies:
        shown = set(table.id_rows + [ID_DOMAIN] + table.domains)
        summary.per_domain = {
            r.key: {m: tables[m].row(r.key).cells[summary.primary] for m in tables}
            for r in first.rows
            if r.key in shown
        }


# ----------------------------------------------------------------------------- report.md


def _headline_figures(summary: ReportSummary, n_boot: int, seed: int) -> list[str]:
    """The headline proxy's OOD and ID figures, every proxy's in a table, and the
    all-domain pooled figure as a secondary line."""
    p = summary.primary or ""
    po, so = (summary.fig(p, ROLE_OOD, "pooled", m) for m in METHODS)
    mo, ms = (summary.fig(p, ROLE_OOD, "mean", m).fmt(ci=False) for m in METHODS)
    ir, irs = (summary.fig(p, ROLE_ID, "row", m).fmt() for m in METHODS)
    ip, ips = (summary.fig(p, ROLE_ID, "pooled", m).fmt() for m in METHODS)
    a, s = summary.pooled[p]["pearson"], summary.pooled[p]["spearman"]
    lower = not math.isnan(a.r) and not math.isnan(po.r) and a.r < po.r
    header = ["proxy", "OOD mean", "OOD pooled", summary.id_label, "ID pooled"]
    rows = [
        [f"**{q}**" if q == p else q]
        + [
            summary.pair(q, role, f)
            for role, f in (
                (ROLE_OOD, "mean"),
                (ROLE_OOD, "pooled"),
                (ROLE_ID, "row"),
                (ROLE_ID, "pooled"),
            )
        ]
        + [summary.pair(q, rl.ROLE_ALL, "pooled")]
        for q in summary.roles
    ]
    return [
        f"**{p} vs seq out of domain** (each domain over the mixtures not trained on "
        f"it): per-domain mean Pearson {mo}, Spearman {ms}; pooled Pearson {po.fmt()}, "
        f"Spearman {so.fmt()} ({po.n} points from {po.mixtures} mixtures).",
        "",
        f"**{p} vs seq in domain**: {summary.id_label} (each mixture's own held-out sets) "
        f"Pearson {ir}, Spearman {irs}; ID pooled (every in-domain (mixture, domain) "
        f"point) Pearson {ip}, Spearman {ips}.",
        "",
        f"95% bootstrap intervals over mixtures, {n_boot} resamples, seed {seed}. "
        "Every proxy, Pearson / Spearman:",
        "",
        md_table(header + ["all-domain pooled (secondary)"], rows),
        "",
        f"Secondary: {p} vs seq pooled over all (mixture, domain) points, in and out of "
        f"domain together: Pearson {a.fmt()}, Spearman {s.fmt()}. It "
        + ("reads lower than the per-role figures" if lower else "can read lower than either role")
        + f" because {WHY_ALL_LOWER}.",
    ]


def headline_section(
    summary: ReportSummary, table: an.ResultTable, n_boot: int, seed: int
) -> list[str]:
    """Which proxy heads the report and why, its per-role correlations, and the
    recommendation; sets ``summary.recommended``."""
    primary = summary.primary
    md = ["## Headline", ""]
    if primary:
        md += [f"Headline proxy: **{primary}**: {summary.primary_reason}.", ""]
    if primary and primary in summary.roles:
        md += _headline_figures(summary, n_boot, seed)
    else:
        md.append("No seq (validation) results yet: correlations need seq models.")
    rec = an.recommend(table, primary, table.domains) if primary else None
    if rec:
        label = table.mixtures[rec[0]].label
        summary.recommended = (rec[0], label, rec[1])
        second = dc.runner_up(table, primary, table.domains, rec[0]) if primary else None
        if second:
            summary.runner_up = (second[0], table.mixtures[second[0]].label, second[1])
        md.append("")
        md.append(
            f"**Recommended mixture** (lowest geometric-mean {primary} perplexity over "
            f"{', '.join(table.domains)}): **{label}** (`{rec[0]}`, {rec[1]:.3f})"
            + _runner_up_note(summary.runner_up)
            + "."
        )
    return md


def _runner_up_note(runner_up: tuple[str, str, float] | None) -> str:
    """``; ahead of X by 0.42%`` (and the close-call warning when under CLOSE_CALL)."""
    if runner_up is None:
        return ""
    note = f"; ahead of the runner-up {runner_up[1]} by {100 * runner_up[2]:.2f}%"
    if runner_up[2] < dc.CLOSE_CALL:
        note += (
            f" (a close call, under {100 * dc.CLOSE_CALL:g}%: where the proxy's picks most "
            "often miss; confirm it with a seq model)"
        )
    return note


def _legend(table: an.ResultTable, rt: rl.RoleTable) -> str:
    order = ", ".join(table.partition_order)
    fixed = (
        f"; {', '.join(table.fixed)}, in every validation mixture, first"
        if table.fixed and len(table.seq_mixtures) > 1
        else ""
    )
    return (
        "Rows, as in the paper's Tables 2-4: in-domain first: `P1`..`Pk` = each "
        f"validation mixture's i-th partition's held-out set (partitions in the study's "
        f"order: {order or '-'}{fixed}); `{rt.id_label}` = its own held-out sets pooled; "
        "then each evaluation domain over the mixtures for which it is **out of domain** "
        "(`-`: the domain is in-domain for every validation mixture); "
        f"`{rl.OOD_MEAN_ROW}` = mean of those per-domain coefficients; "
        f"`{rl.OOD_POOLED_ROW}` = one coefficient over every out-of-domain (mixture, "
        f"domain) point; `{rl.ID_POOLED_ROW}` = the same over every in-domain point of "
        f"the individual domains; last, role-blind and secondary: `{rl.ALL_MEAN_ROW}` "
        f"and `{rl.ALL_POOLED_ROW}` (every mixture on every domain). Columns: proxies. "
        "Cells: coefficient [95% bootstrap interval]. correlations.csv also has each "
        "domain over its in-domain mixtures (role `id`) and over all mixtures (`all`)."
    )


def correlation_sections(table: an.ResultTable, tables: dict[str, rl.RoleTable]) -> list[str]:
    """The Pearson and Spearman role tables, with a legend."""
    md = ["", "## Correlation with seq models", "", _legend(table, tables[METHODS[0]])]
    for method, rt in tables.items():
        rows = [
            [r.label] + [r.cells[p].fmt() if p in r.cells else "-" for p in rt.proxies]
            for r in rt.rows
        ]
        md += ["", f"### {method.capitalize()}", "", md_table(["eval domain"] + rt.proxies, rows)]
    return md


def rank_summaries(
    table: an.ResultTable, proxies: Sequence[str]
) -> dict[str, dict[str, rl.RankSummary]]:
    return {p: {r: rl.rank_summary(table, p, r) for r in (ROLE_OOD, ROLE_ID)} for p in proxies}


def top_k_section(table: an.ResultTable, summary: ReportSummary, top_k: int) -> list[str]:
    """Per row and proxy: top-k agreement with seq and seq's rank of the proxy's pick;
    then the §A.5 median (max) of that rank over the OOD domains and over the ID rows."""
    proxies = rl.ordered_proxies(table.proxies)
    md = [
        "",
        f"## Top-{top_k} agreement with seq",
        "",
        f"Share of the {top_k} best mixtures by seq perplexity that the proxy also puts in "
        f"its top {top_k}; in brackets, the seq rank of the proxy's first choice (1 = it "
        "is also seq's best). In-domain rows first; a domain row ranks the mixtures for "
        "which the domain is out of domain. Last, as in the paper's §A.5, the median "
        "(max, number of rows) of that true rank over the out-of-domain rows and over "
        "the in-domain rows.",
        "",
    ]
    keyed: list[tuple[str, str, str | None]] = [(k, k, None) for k in table.id_rows]
    if ID_DOMAIN in table.all_domains:
        keyed.append((ID_DOMAIN, summary.id_label, None))
    keyed += [(d, d, ROLE_OOD) for d in table.domains]
    rows = []
    for key, label, role in keyed:
        cells = []
        for p in proxies:
            a = an.top_k_agreement(table, p, key, top_k, role)
            b = an.best_true_rank(table, p, key, role)
            cells.append("-" if math.isnan(a) else f"{a:.2f} ({b})")
        rows.append([label] + cells)
    for role, label in ((ROLE_OOD, "true rank, OOD domains"), (ROLE_ID, "true rank, ID rows")):
        rows.append([f"**{label}**"] + [summary.ranks[p][role].fmt() for p in proxies])
    md.append(md_table(["eval domain"] + proxies, rows))
    return md


def summary_row_section(summary: ReportSummary, proxies: Sequence[str]) -> list[str]:
    """The paper's summary row (Paloma / Avg) of every proxy, each averaging and scale."""
    row = summary.summary_row
    md = ["", "## Summary row (the paper's Paloma / Avg row)", ""]
    if row is None or not row.domains:
        return md + [(row.missing_reason if row else dc.SummaryRow([], {}).missing_reason) + "."]
    md += [
        f"Each validation mixture's perplexity averaged over the {len(row.domains)} "
        f"domain(s) out of domain for every validation mixture ({', '.join(row.domains)}), "
        "then one coefficient over mixtures of proxy vs seq: `arith` = arithmetic mean "
        "of the perplexities, `geom` = geometric mean; `raw` = the coefficient on that "
        "mean, `log` = on its logarithm (Spearman is the same for raw and log). This is "
        "the figure to compare with the paper's Paloma rows; `OOD mean` (the mean of "
        "per-domain coefficients) is stricter, `OOD pooled` laxer. Cells: coefficient "
        "[95% bootstrap interval over mixtures] n=mixtures.",
        "",
    ]
    header = ["proxy"] + [f"{m.capitalize()} {v}" for m in METHODS for v in dc.VARIANTS]
    rows = [
        [f"**{p}**" if p == summary.primary else p]
        + [row.get(p, m, v).fmt() for m in METHODS for v in dc.VARIANTS]
        for p in proxies
    ]
    return md + [md_table(header, rows)]


def _pct(v: float) -> str:
    return "-" if math.isnan(v) else f"{100 * v:.2f}%"


def decisions_section(table: an.ResultTable, summary: ReportSummary) -> list[str]:
    """Per proxy and OOD domain (and the summary row): the pick's seq rank, top-3
    overlap, regret and margin; then each proxy's aggregate over the OOD domains."""
    proxies = [p for p in rl.ordered_proxies(table.proxies) if p in summary.decisions]
    if not proxies:
        return []
    md = [
        "",
        "## Decisions: how good is the proxy's pick under seq?",
        "",
        "Per out-of-domain domain (over the mixtures for which it is out of domain) and "
        "on the summary row: `seq rank/n` of the proxy's lowest-perplexity mixture (1 = "
        f"seq's best too; §A.5), how many of the proxy's top {dc.TOP} are in seq's top "
        f"{dc.TOP}, the regret: the seq perplexity of the pick over seq's best, "
        "minus 1, and the proxy's margin: its perplexity of its second-best mixture over "
        f"its pick's, minus 1 (**bold** under {100 * dc.CLOSE_CALL:g}%: a close call, "
        "where the proxy's order is least reliable; confirm it with a seq model). Rows "
        f"with fewer than {an.MIN_POINTS} validated mixtures are left out.",
        "",
    ]
    keys = [d for d in table.domains if any(d in _rows(summary, p) for p in proxies)]
    keys += [dc.SUMMARY_ROW] if any(summary.decisions[p].summary for p in proxies) else []
    rows = []
    for key in keys:
        cells = []
        for p in proxies:
            d = _rows(summary, p).get(key)
            cells.append(
                "-"
                if d is None
                else f"{d.seq_rank}/{d.n}, {d.top_overlap}/{dc.TOP}, {_pct(d.regret)}, "
                + (f"**{_pct(d.margin)}**" if d.close_call else _pct(d.margin))
            )
        rows.append(["**summary row**" if key == dc.SUMMARY_ROW else key] + cells)
    for label, fn in (
        ("**pick in seq's top 2 (OOD domains)**", lambda s: f"{s.share_top2:.0%} of {s.n}"),
        ("**mean regret (OOD domains)**", lambda s: _pct(s.mean_regret)),
        ("**max regret (OOD domains)**", lambda s: _pct(s.max_regret)),
        (f"**mean top-{dc.TOP} overlap**", lambda s: f"{s.mean_overlap:.2f}"),
        ("**close calls (OOD domains)**", lambda s: f"{s.close_calls} of {s.n}"),
    ):
        rows.append(
            [label] + [fn(summary.decisions[p]) if summary.decisions[p].n else "-" for p in proxies]
        )
    return md + [md_table(["row"] + proxies, rows)]


def _rows(summary: ReportSummary, proxy: str) -> dict[str, dc.Decision]:
    ds = summary.decisions[proxy]
    out = {d.row: d for d in ds.domains}
    if ds.summary:
        out[dc.SUMMARY_ROW] = ds.summary
    return out
