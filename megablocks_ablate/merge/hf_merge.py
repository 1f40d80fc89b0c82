"""``merge`` of Hugging Face model directories into a Hugging Face model directory.

A linear merge is per tensor, so HF models are merged by HF tensor name straight from
their safetensors files (sharded or not), with no conversion to our checkpoint format
and back. What to merge comes from a merge spec whose checkpoints are HF directories
(:func:`plan_from_spec`, our arithmetic) or from a mergekit ``linear`` config
(:mod:`.mergekit_config`, mergekit's arithmetic; see :mod:`.hf_stream`).

The output directory (written staged, appearing whole) holds:

* ``model.safetensors``: every tensor, one file (loadable by transformers at any size;
  we do not shard);
* ``config.json`` from the first input, its ``torch_dtype`` (and ``dtype``) set to the
  output dtype; an export of ours also carries a merged lineage under
  ``megablocks_ablate`` (so ``import-hf`` of the merge knows its seed and units);
* the first input's tokenizer and generation files (:data:`COPIED_FILES`);
* ``merge_provenance.json``: the config file and its sha256, each input's path, weight
  as written, weight applied and the sha256 of each of its weight files (through the
  hash cache of :mod:`megablocks_ablate.utils.verify`), normalize and dtypes;
* the marker ``.megablocks-ablate.json`` (kind ``hf-merge``, its files), so that
  ``--overwrite`` replaces exactly these files.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

from megablocks_ablate.errors import ConfigError
from megablocks_ablate.merge.hf_inputs import OUR_KEY, HFModel, check_hf_inputs
from megablocks_ablate.merge.hf_stream import MERGEKIT, OURS, Arithmetic, stream_hf_merge

log = logging.getLogger(__name__)

OUTPUT_KIND = "hf-merge"
PROVENANCE_FILE = "merge_provenance.json"
PROVENANCE_FORMAT = "megablocks-ablate/hf-merge@1"
COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
_DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
LABEL_TO_NAME = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}  # --dtype / spec dtype


@dataclass
class HFMergePlan:
    """A linear merge of HF model directories: inputs in fold order and the arithmetic."""

    paths: list[str]
    labels: list[str]  # unit names (a spec) or the paths as written (a mergekit config)
    given_weights: list[float]  # as written, for the record
    arithmetic: Arithmetic
    source: str  # the spec or config file
    normalize: bool
    extra: dict = field(default_factory=dict)  # recorded in the provenance

    def applied_weights(self) -> dict[str, float]:
        return dict(zip(self.labels, self.arithmetic.applied_weights()))


def plan_from_spec(spec, dtype: str | None = None) -> HFMergePlan:
    """Our arithmetic (the spec's weight vector, fp32 accumulation, one rounding) over
    the spec's checkpoints, which are HF directories. Units of weight 0 are not read;
    ``by_tokens`` without counts reads the token counts our exports record."""
    tokens = None
    if spec.needs_tokens():
        tokens = {u: _recorded_tokens(p, spec.source, u) for u, p in spec.checkpoints.items()}
    weights = {u: w for u, w in spec.weights(tokens).items() if w != 0.0}
    label = dtype or spec.dtype
    arith = Arithmetic(OURS, list(weights.values()), out_dtype=_name(label))
    return HFMergePlan(
        [spec.checkpoints[u] for u in weights],
        list(weights),
        list(weights.values()),
        arith,
        spec.source,
        spec.normalize,
        {"dtype": label or "inputs"},
    )


def _name(label: str | None) -> str | None:
    return LABEL_TO_NAME[label] if label else None


def _recorded_tokens(path: str, source: str, unit: str) -> int:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            lineage = (json.load(f).get(OUR_KEY) or {}).get("lineage") or {}
    except (OSError, ValueError, AttributeError):
        lineage = {}
    tokens = lineage.get("tokens_seen") if isinstance(lineage, dict) else None
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens <= 0:
        raise ConfigError(
            f"{source}: checkpoints.{unit}: by_tokens needs the tokens each model was trained "
            f"on, and {path} (a Hugging Face model) records none: give them as "
            "by_tokens: {unit: tokens}"
        )
    return tokens


def open_inputs(plan: HFMergePlan, allow_different_seed: bool = False) -> list[HFModel]:
    """Open and check every input (nothing is read but headers, configs, non-float
    tensors and tokenizer files); refusals name the directory and tensor."""
    seen: dict[str, str] = {}
    for label, path in zip(plan.labels, plan.paths):
        real = os.path.realpath(path)
        if real in seen:
            raise ConfigError(f"{plan.source}: {label} and {seen[real]} are the same model {path}")
        seen[real] = label
    models: list[HFModel] = []
    try:
        for path in plan.paths:
            models.append(HFModel.open(path))
        check_hf_inputs(models, allow_different_seed)
    except BaseException:
        for m in models:
            m.close()
        raise
    return models


def merge_hf(
    plan: HFMergePlan,
    out_dir: str,
    *,
    allow_different_seed: bool = False,
    show_progress: bool = True,
) -> dict:
    """Merge ``plan``'s HF models into the HF model directory ``out_dir`` (see the
    module docstring); returns the provenance record written beside the weights."""
    from concurrent.futures import ThreadPoolExecutor

    from megablocks_ablate.checkpoint import staged_checkpoint_dir
    from megablocks_ablate.utils.outputs import write_marker

    models = open_inputs(plan, allow_different_seed)
    pool = ThreadPoolExecutor(1, thread_name_prefix="merge-hash")
    try:
        # the inputs' hashes (for the record) are read beside the merge, on another core
        hashes = pool.submit(_input_hashes, models)
        with staged_checkpoint_dir(out_dir) as tmp:
            path = os.path.join(tmp, "model.safetensors")
            with open(path, "wb", buffering=0) as f:
                dtypes = stream_hf_merge(f, models, plan.arithmetic, show_progress=show_progress)
            provenance = _provenance(plan, models, hashes.result())
            floats = {d for d in dtypes.values() if d in _DTYPE_NAMES}
            provenance["output_dtypes"] = sorted(_DTYPE_NAMES[d] for d in floats)
            config = _output_config(plan, models, floats, out_dir)
            _write_json(os.path.join(tmp, "config.json"), config)
            _copy_side_files(models[0].path, tmp)
            _write_json(os.path.join(tmp, PROVENANCE_FILE), provenance)
            write_marker(tmp, OUTPUT_KIND, os.listdir(tmp))
    finally:
        pool.shutdown(cancel_futures=True)
        for m in models:
            m.close()
    return provenance


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _copy_side_files(src: str, dst: str) -> None:
    import shutil

    for name in COPIED_FILES:
        path = os.path.join(src, name)
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(dst, name))


def _input_hashes(models: list[HFModel]) -> list[dict[str, str]]:
    """Per input, {weight file relative to it: sha256} (through the hash cache)."""
    from megablocks_ablate.utils.verify import file_sha256

    return [{os.path.relpath(p, m.path): file_sha256(p) for p in m.files} for m in models]


def _provenance(plan: HFMergePlan, models: list[HFModel], hashes: list[dict]) -> dict:
    from megablocks_ablate import __version__
    from megablocks_ablate.utils.hashing import sha256_file

    arith = plan.arithmetic
    inputs = []
    for label, m, given, applied, files in zip(
        plan.labels, models, plan.given_weights, arith.applied_weights(), hashes
    ):
        inputs.append(
            {
                "name": label,
                "path": os.path.abspath(m.path),
                "weight": given,
                "applied_weight": applied,
                "sha256": files,
            }
        )
    return {
        "format": PROVENANCE_FORMAT,
        "tool": f"megablocks-ablate {__version__}",
        "method": "linear",
        "arithmetic": arith.semantics,
        "config": {"path": os.path.abspath(plan.source), "sha256": sha256_file(plan.source)},
        "architecture": models[0].architecture,
        "normalize": plan.normalize,
        "merge_dtype": _DTYPE_NAMES.get(arith.merge_dtype or ""),
        "out_dtype": _DTYPE_NAMES.get(arith.out_dtype or ""),
        "divisor": arith.divisor,
        "inputs": inputs,
        **plan.extra,
    }


def _output_config(plan: HFMergePlan, models: list[HFModel], floats: set[str], out: str) -> dict:
    """The first input's config.json, with the output dtype and (for exports of ours)
    a merged lineage in place of the first input's."""
    config = json.loads(json.dumps(models[0].config))
    if len(floats) == 1:
        name = _DTYPE_NAMES[next(iter(floats))]
        keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
        config.update(dict.fromkeys(keys, name))
    ours = config.get(OUR_KEY)
    if isinstance(ours, dict):
        ours.pop("lineage", None)
        lineage = _merged_lineage(plan, models, out)
        if lineage is not None:
            ours["lineage"] = lineage
    return config


def _merged_lineage(plan: HFMergePlan, models: list[HFModel], out: str) -> dict | None:
    """The lineage of the merge when every input is an export of ours that records one."""
    from megablocks_ablate.checkpoint import Lineage, merged_seq_len
    from megablocks_ablate.errors import DataFormatError

    lineages = {}
    for label, m in zip(plan.labels, models):
        record = m.recorded_lineage()
        if record is None:
            return None
        try:
            where = os.path.join(m.path, "config.json")
            lineages[label] = Lineage.from_dict(record, where, recorded_in=where)
        except DataFormatError as e:
            log.warning("%s: its lineage is not carried into the merge (%s)", m.path, e)
            return None
    seeds = {lin.seed_hash for lin in lineages.values()}
    fingerprints = {lin.tokenizer_fingerprint for lin in lineages.values()}
    merged = Lineage(
        kind="merged",
        seed_hash=seeds.pop() if len(seeds) == 1 else None,
        units=list(plan.labels),
        weights=plan.arithmetic.applied_weights(),
        tokens_seen=sum(lin.tokens_seen for lin in lineages.values()),
        tokenizer_fingerprint=fingerprints.pop() if len(fingerprints) == 1 else None,
        parents=[os.path.abspath(m.path) for m in models],
        extra={"merge_spec": plan.source, "arithmetic": plan.arithmetic.semantics},
        trained_seq_len=merged_seq_len(lineages, plan.source),
    )
    return merged.to_dict(recorded_in=os.path.join(out, "config.json"))


def describe(plan: HFMergePlan) -> str:
    """One line for the command's output."""
    shown = ", ".join(f"{u}={w:.4g}" for u, w in plan.applied_weights().items())
    how = "mergekit linear" if plan.arithmetic.semantics == MERGEKIT else "linear"
    return f"{len(plan.paths)} Hugging Face models ({how}: {shown})"
