"""The files ``study export --out`` and ``study optimize --out`` write, claimed like every
output (docs/reliability.md): an input of the study, a user's file or another kind of
output is refused in one line naming it, and one writer at a time writes each."""

from __future__ import annotations

import os

EXPORT_KIND = "study-export"


def study_inputs(spec_arg: str, study) -> list[str | None]:
    """What a study command reads, which its --out must not be or be inside: the spec
    file, the study's data (preprocess output) and its results store."""
    from megablocks_ablate.ablate.store import store_path

    return [
        spec_arg if os.path.isfile(spec_arg) else None,
        study.manifest_dir,
        store_path(study.spec.out_dir),
    ]


def write_export(out: str, text: str, overwrite: bool, inputs: list[str | None]) -> None:
    """``text`` as the ``study export`` file ``out``: claimed (a user's file, another
    kind of output, an input refused; an earlier export only with ``overwrite``), one
    writer at a time, written whole or not at all."""
    from megablocks_ablate.utils.output_files import (
        check_output_file,
        output_lock,
        staged_output_files,
    )

    check_output_file(out, EXPORT_KIND, overwrite=overwrite, inputs=inputs)  # touches nothing
    with output_lock(out, f"study export --out {out}"):
        staged = staged_output_files([out], EXPORT_KIND, overwrite=overwrite, inputs=inputs)
        with staged as (tmp,):  # checked again, holding the lock
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)


def check_optimize_out(out: str, inputs: list[str | None]) -> None:
    """A ``study optimize`` result replaces only an earlier result (it is recomputed
    from the store: no --overwrite needed, as for ``study report``); an input, a user's
    file or another kind of output is refused, naming it. Touches nothing."""
    from megablocks_ablate.ablate.runner.propose import check_result_file
    from megablocks_ablate.utils.outputs import check_not_an_input

    check_not_an_input(out, inputs)
    check_result_file(out)
