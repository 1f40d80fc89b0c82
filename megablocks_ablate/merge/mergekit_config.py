"""mergekit ``linear`` configs, read as they are, merged with mergekit's arithmetic.

What is read (mergekit 0.1.5's names and defaults)::

    merge_method: linear
    models:
      - model: ./models/a            # a Hugging Face model directory
        parameters: {weight: 1.0}
      - model: ./models/b
        parameters: {weight: 0.5}
    parameters: {normalize: true}    # default true; a top-level weight is every model's default
    dtype: bfloat16                  # float32 | bfloat16 | float16: inputs are rounded to it
    out_dtype: bfloat16              # optional: the output's dtype (default: dtype)

Decisions (docs/merging.md): a relative ``model`` path is resolved against the config
file's directory (mergekit resolves it against the working directory, or as a Hugging
Face hub name, which we never download); every other key and form is refused with one
line naming it: other merge methods, ``slices``, ``modules``, ``base_model``,
``tokenizer_source``/``tokenizer``, ``chat_template``, per-tensor weights (lists,
gradients, ``filter`` conditions), LoRA (``model+lora``) and ``float64``.
"""

from __future__ import annotations

import math
import os
from typing import Any

from megablocks_ablate.errors import ConfigError
from megablocks_ablate.merge.hf_inputs import is_hf_model_dir
from megablocks_ablate.merge.hf_merge import LABEL_TO_NAME, HFMergePlan
from megablocks_ablate.merge.hf_stream import MERGEKIT, Arithmetic, fp32_sum

DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_TOP = ("merge_method", "models", "parameters", "dtype", "out_dtype")
_WHY = {
    "slices": "slices (layer ranges) are not supported; list whole models under models:",
    "modules": "modules are not supported; list whole models under models:",
    "base_model": "linear takes no base_model here (mergekit would merge it as one more input "
    "only with a weight: list it under models:)",
    "tokenizer_source": "the tokenizer is always the first model's (tokenizers must match)",
    "tokenizer": "the tokenizer is always the first model's (tokenizers must match)",
    "chat_template": "the chat template is the first model's",
}


def is_mergekit_config(d: Any) -> bool:
    """Whether a parsed YAML document is a mergekit config (it names a merge_method)."""
    return isinstance(d, dict) and "merge_method" in d


def _weight(value: Any, where: str) -> float:
    """A scalar weight (mergekit also reads numeric strings such as YAML's ``1e-3``)."""
    if isinstance(value, list):
        kind = "filter conditions" if any(isinstance(v, dict) for v in value) else "gradients"
        raise ConfigError(f"{where}: per-tensor weights ({kind}) are not supported; give a number")
    if isinstance(value, dict):
        raise ConfigError(f"{where}: per-tensor weights (filter conditions) are not supported")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{where}: weight must be finite, got {value}")
    return float(value)


def _dtype(d: dict, key: str, where: str) -> str | None:
    value = d.get(key)
    if value is None:
        return None
    name = value.removeprefix("torch.") if isinstance(value, str) else value
    if name not in DTYPES:
        raise ConfigError(
            f"{where}: {key}: expected one of {', '.join(DTYPES)}, got {value!r}"
            + (" (float64 is not supported)" if name == "float64" else "")
        )
    return DTYPES[name]


def _params(value: Any, where: str, allowed: tuple[str, ...]) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{where}.{unknown[0]}: not a parameter of the linear method here "
            f"(allowed: {', '.join(allowed)})"
        )
    return value


def _model_path(entry: Any, where: str, base_dir: str) -> tuple[str, str]:
    """(path as written, resolved directory) of one ``models`` entry's ``model``."""
    model = entry.get("model")
    if not isinstance(model, str) or not model:
        raise ConfigError(f"{where}.model: expected a model directory, got {model!r}")
    path = model if os.path.isabs(model) else os.path.join(base_dir, model)
    if not os.path.isdir(path):
        if "+" in model:
            raise ConfigError(
                f"{where}.model: {model!r}: LoRA adapters (model+lora) are not supported"
            )
        raise ConfigError(
            f"{where}.model: {model!r} is not a directory (relative paths are resolved "
            f"against the config's directory {base_dir}; Hugging Face hub names are not "
            "downloaded: download the model with --local-dir and give that directory)"
        )
    if not is_hf_model_dir(path):
        kind = (
            "megablocks-ablate checkpoint"
            if os.path.exists(os.path.join(path, "lineage.json"))
            else "directory without config.json"
        )
        raise ConfigError(
            f"{where}.model: {path} is a {kind}, not a Hugging Face model (a mergekit config "
            "merges Hugging Face models: export-hf ours, or write a merge spec)"
        )
    return model, path


def plan_from_mergekit(d: Any, source: str, dtype: str | None = None) -> HFMergePlan:
    """The merge a parsed mergekit config asks for (``source``: its file, whose directory
    relative model paths are resolved against); ``dtype`` (fp32/bf16/fp16, the
    ``--dtype`` option) overrides its output dtype."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    for key in d:
        if key in _WHY:
            raise ConfigError(f"{source}: {key}: not supported: {_WHY[key]}")
        if key not in _TOP:
            raise ConfigError(
                f"{source}: unknown key {key!r}; a linear config has {', '.join(_TOP)}"
            )
    if d.get("merge_method") != "linear":
        raise ConfigError(
            f"{source}: merge_method: {d.get('merge_method')!r} is not supported (only linear)"
        )
    models = d.get("models")
    if not isinstance(models, list) or not models:
        raise ConfigError(f"{source}: models: expected a non-empty list of {{model, parameters}}")
    top = _params(d.get("parameters"), f"{source}: parameters", ("weight", "normalize"))
    normalize = top.get("normalize", True)
    if not isinstance(normalize, bool):
        raise ConfigError(
            f"{source}: parameters.normalize: expected true or false, got {normalize!r}"
        )
    default = _weight(top["weight"], f"{source}: parameters.weight") if "weight" in top else None
    base_dir = os.path.dirname(os.path.abspath(source))
    labels, paths, weights = [], [], []
    for i, entry in enumerate(models):
        where = f"{source}: models[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(
                f"{where}: expected {{model: DIR, parameters: {{weight: W}}}}, got {entry!r}"
            )
        unknown = sorted(set(entry) - {"model", "parameters"})
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: not supported (model and parameters only)")
        label, path = _model_path(entry, where, base_dir)
        params = _params(entry.get("parameters"), f"{where}.parameters", ("weight",))
        if "weight" in params:
            w = _weight(params["weight"], f"{where}.parameters.weight")
        elif default is not None:
            w = default
        else:
            raise ConfigError(
                f"{where}.parameters.weight: missing (linear needs a weight per model)"
            )
        labels.append(label)
        paths.append(path)
        weights.append(w)
    if not any(weights):
        raise ConfigError(f"{source}: all weights are zero")
    divisor = fp32_sum(weights) if normalize else None
    if divisor is not None and (divisor == 0.0 or not math.isfinite(divisor)):
        raise ConfigError(
            f"{source}: the weights sum to {divisor} in fp32; cannot normalize (set "
            "normalize: false)"
        )
    merge_dtype = _dtype(d, "dtype", source)
    out_dtype = LABEL_TO_NAME[dtype] if dtype else _dtype(d, "out_dtype", source)
    arith = Arithmetic(MERGEKIT, weights, divisor, merge_dtype, out_dtype)
    return HFMergePlan(paths, labels, weights, arith, source, normalize)
