"""The report's scaled-merge section: is ``seed + lambda x (merged - seed)`` better?

lambda was fitted on half of the validation mixtures (:mod:`.runner.scaled`, store meta
``scaled``), so the proxy's figures over all validation mixtures flatter it. This
section judges it where it was not fitted: ``scaled`` and ``merged`` against seq on the
**held-out** validation mixtures only, with the same figures as the headline (OOD
per-domain mean, the summary row, the decision figures), and lists the fit grid.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from megablocks_ablate.ablate import analysis as an
from megablocks_ablate.ablate import decisions as dc
from megablocks_ablate.ablate import roles as rl
from megablocks_ablate.ablate.analysis import ROLE_OOD, SEQ
from megablocks_ablate.ablate.report_tables import corr_json, md_table

SCALED = "scaled"
BASELINE = "merged"


def held_out_table(table: an.ResultTable, held_out: Sequence[str]) -> an.ResultTable:
    """``table`` with seq values on the held-out mixtures only."""
    keep = set(held_out)
    values = dict(table.values)
    values[SEQ] = {
        d: {m: v for m, v in by_m.items() if m in keep}
        for d, by_m in table.values.get(SEQ, {}).items()
    }
    return dataclasses.replace(table, values=values)


def held_out_figures(
    table: an.ResultTable, held_out: Sequence[str], n_boot: int, seed: int
) -> dict[str, dict]:
    """Per proxy (merged, scaled): OOD mean and summary-row Pearson (Corr) and the
    decision summary, over the held-out validation mixtures."""
    t = held_out_table(table, held_out)
    proxies = [p for p in (BASELINE, SCALED) if p in t.values]
    rt = rl.role_table(t, "pearson", proxies=proxies, n_boot=n_boot, seed=seed)
    row = dc.summary_row(t, proxies, n_boot=n_boot, seed=seed)
    return {
        p: {
            "ood_mean": rt.figure(p, ROLE_OOD, "mean"),
            "summary": row.get(p),
            "decisions": dc.decisions(t, p),
        }
        for p in proxies
    }


def _pct(v: float) -> str:
    return "–" if math.isnan(v) else f"{100 * v:.2f}%"


def scaled_section(
    table: an.ResultTable, fit: dict | None, n_boot: int, seed: int
) -> tuple[list[str], dict | None]:
    """The section's Markdown and its summary.json entry (nothing without a fit)."""
    if not fit or SCALED not in table.values:
        return [], None
    figs = held_out_figures(table, fit.get("held_out", []), n_boot, seed)
    grid = ", ".join(
        f"{lam}: {'–' if v is None else f'{v:.3f}'}" for lam, v in fit.get("grid", {}).items()
    )
    md = [
        "",
        "## Scaled merge (beyond the paper)",
        "",
        f"`scaled` = seed + lambda x (merged - seed), lambda = **{fit['lambda']:g}**, "
        f"fitted on {len(fit.get('fit', []))} validation mixtures (the "
        f"{fit.get('objective', 'fit figure')}; grid {grid}). Judged on the other "
        f"{len(fit.get('held_out', []))}, which the fit never saw: a user should prefer "
        "it over the plain merge only where it reads better here. (Its column in the "
        "tables above includes the fit mixtures and flatters it.)",
        "",
    ]
    rows = []
    for p, f in figs.items():
        ds = f["decisions"]
        rows.append(
            [
                p,
                f["ood_mean"].fmt(),
                f["summary"].fmt(),
                f"{ds.share_top2:.0%} of {ds.n}" if ds.n else "–",
                _pct(ds.mean_regret),
            ]
        )
    md.append(
        md_table(
            ["proxy (held-out mixtures)", "OOD mean", "summary row", "pick in top 2", "regret"],
            rows,
        )
    )
    entry = {
        "lambda": fit["lambda"],
        "grid": fit.get("grid"),
        "fit": fit.get("fit"),
        "held_out": fit.get("held_out"),
        "held_out_figures": {
            p: {
                "ood_mean": corr_json(f["ood_mean"]),
                "summary": corr_json(f["summary"]),
                "decisions": f["decisions"].to_json(),
            }
            for p, f in figs.items()
        },
    }
    return md, entry
