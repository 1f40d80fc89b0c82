"""Fixtures of the runner tests (tests/ablate/test_runner*.py)."""

from __future__ import annotations

import pytest
from runner_fixtures import tiny_study_spec


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    """(spec dict, data dir, finished runner) of the uninterrupted tiny study, trained
    once per session and shared by the runner tests (each writes elsewhere)."""
    from megablocks_ablate.ablate.runner import RunOptions, resolve, run_study
    from megablocks_ablate.ablate.spec import StudySpec

    root = tmp_path_factory.mktemp("study")
    spec, path = tiny_study_spec(root)
    runner = run_study(resolve(StudySpec.load(path)), RunOptions())
    return spec, root, runner
