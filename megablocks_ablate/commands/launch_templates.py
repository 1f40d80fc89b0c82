"""`megablocks-ablate launch-templates`: write the launch templates to a directory.

    megablocks-ablate launch-templates --out launch/
    launch/torchrun_single_node.sh 130m_seed data.manifest=data/ out_dir=runs/seed
    sbatch launch/slurm_multi_node.sbatch 130m_seed data.manifest=/shared/data out_dir=/shared/runs/seed

The torchrun, mpirun and Slurm templates ship inside the package
(``megablocks_ablate/templates/launch/``; a checkout links them from ``tools/launch/``),
so a pip install has them too. Each takes a train config (a preset name or a YAML path)
and ``key=value`` overrides; edit the ``#SBATCH`` lines and the site-specific exports for
your cluster (docs/training.md). A pool of unit models on one machine needs no template:
``megablocks-ablate train-pool``.

``--out`` must be a new or empty directory, or an earlier copy written by this command:
that one is refused unless ``--overwrite``, which replaces the templates (your edits to
them too) and keeps every other file there. A directory holding files of yours, or a
file of yours named like a template, is refused before anything is written.
"""

from __future__ import annotations

import argparse
import os

KIND = "launch-templates"  # the output kind recorded in the directory's marker
# file -> what it launches (the files in megablocks_ablate/templates/launch/)
TEMPLATES = {
    "torchrun_single_node.sh": "one node, all its GPUs (DDP, or FSDP2 by an override)",
    "torchrun_multi_node.sh": "several nodes: run it on every node with NODE_RANK set",
    "mpirun.sh": "under MPI (mpiexec; the [mpi] extra)",
    "slurm_multi_node.sbatch": "Slurm: one seed or seq model over N nodes x G GPUs (srun)",
    "slurm_unit_array.sbatch": "Slurm: the unit-model pool as a job array, one unit per task",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "launch-templates",
        help="write the torchrun, mpirun and Slurm launch templates to a directory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--out",
        required=True,
        help="directory to write them to (new or empty, or an earlier copy with --overwrite)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the templates of an earlier copy in --out (other files there are kept)",
    )
    p.set_defaults(func=run)


def read_templates() -> dict[str, bytes]:
    """The shipped templates' bytes, by file name (from the installed package data)."""
    import importlib.resources

    from megablocks_ablate.errors import MBAError

    folder = importlib.resources.files("megablocks_ablate") / "templates" / "launch"
    try:
        return {name: folder.joinpath(name).read_bytes() for name in TEMPLATES}
    except OSError as e:
        raise MBAError(
            f"launch template {os.path.basename(str(e.filename or ''))}: missing from the "
            f"installed package ({folder}); reinstall megablocks-ablate"
        ) from None


def _check_names(out: str, earlier_copy: bool) -> None:
    """Refuse a template name in ``out`` that is not a plain file this command wrote."""
    from megablocks_ablate.errors import ConfigError
    from megablocks_ablate.utils.outputs import own_files

    own = (own_files(out) or set()) if earlier_copy else set()
    for name in TEMPLATES:
        path = os.path.join(out, name)
        if not os.path.lexists(path):
            continue
        if name not in own or os.path.islink(path) or not os.path.isfile(path):
            raise ConfigError(
                f"--out {out}: {name} exists and was not written by launch-templates; "
                "nothing was changed: move it or choose another --out"
            )


def write_templates(out: str, overwrite: bool = False) -> list[str]:
    """Write every template to ``out`` (claimed as a ``launch-templates`` output, see the
    module docstring), executable; returns the paths written. Everything is checked
    before the first write."""
    from megablocks_ablate.utils.atomic import atomic_open
    from megablocks_ablate.utils.outputs import check_output_dir, claim_output_dir, write_marker

    sources = read_templates()
    earlier_copy = check_output_dir(out, KIND, overwrite=overwrite)
    _check_names(out, earlier_copy)
    claim_output_dir(out, KIND, overwrite=overwrite)
    # recorded as ours before they are written: an interrupted copy can be overwritten
    write_marker(out, KIND, TEMPLATES)
    written = []
    for name, data in sources.items():
        path = os.path.join(out, name)
        with atomic_open(path, "wb") as f:
            f.write(data)
            mode = os.fstat(f.fileno()).st_mode & 0o777
            os.fchmod(f.fileno(), mode | (mode & 0o444) >> 2)  # x wherever r (the umask's)
        written.append(path)
    return written


def run(args: argparse.Namespace) -> int:
    for path in write_templates(args.out, overwrite=args.overwrite):
        print(f"{path}  {TEMPLATES[os.path.basename(path)]}")
    return 0
