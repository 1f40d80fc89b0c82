"""Ablation studies: study spec, runner, results store, analysis, report, demo."""
