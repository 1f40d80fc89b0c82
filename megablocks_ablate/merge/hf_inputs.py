"""Hugging Face model directories as merge inputs, read without conversion.

A merge input is a Hugging Face model directory when it holds a ``config.json`` and
no ``lineage.json`` (our checkpoints always have one): a ``config.json`` whose
``architectures`` (or, without it, ``model_type``) names a supported family, and its
weights as one ``model.safetensors`` or the shards a ``model.safetensors.index.json``
lists (each inside the directory, :func:`~megablocks_ablate.model.hf_files.shard_files`).

:class:`HFModel` maps every tensor of the directory, whichever shard holds it, with
the interface the streaming merge needs (dtype names, shapes, raw addresses, byte
views, page release) and imports no torch. :func:`check_hf_inputs` refuses, before any
weight is read and naming the directory and the tensor, inputs that must not be
averaged tensor by tensor: another architecture, another set of tensor names, another
shape, a non-float tensor that differs, a different tokenizer file, or (for exports of
our checkpoints, which record it) another seed without ``allow_different_seed``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

from megablocks_ablate.checkpoint import MappedSafetensors
from megablocks_ablate.errors import ConfigError, DataFormatError

log = logging.getLogger(__name__)

# Hugging Face architecture -> model_type: the families import-hf/export-hf map
# (megablocks_ablate.model.hf.FAMILIES, which imports torch; a test keeps the two equal).
HF_FAMILIES = {
    "CohereForCausalLM": "cohere",
    "LlamaForCausalLM": "llama",
    "GPTNeoXForCausalLM": "gpt_neox",
}
OUR_KEY = "megablocks_ablate"  # our export's record in config.json (model/hf.py)
HF_CONFIG = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files that define the vocabulary: they must be identical in every input (when both
# have them), as a tokenizer fingerprint must be for our checkpoints.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt")
# Config keys that differ between copies of one architecture without meaning anything
# for the weights (not compared).
_NOISE_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", OUR_KEY}
FLOAT_DTYPES = ("F32", "BF16", "F16")  # averaged; any other dtype must be identical


def is_hf_model_dir(path: str) -> bool:
    """Whether ``path`` is a Hugging Face model directory (``config.json``, no
    ``lineage.json``) rather than one of our checkpoints."""
    return os.path.isfile(os.path.join(path, HF_CONFIG)) and not os.path.exists(
        os.path.join(path, "lineage.json")
    )


def hf_architecture(config: dict, where: str) -> str:
    """The supported architecture an HF ``config.json`` names, else ConfigError."""
    archs = config.get("architectures") or []
    if not isinstance(archs, list):
        archs = [archs]
    for arch in archs:
        if arch in HF_FAMILIES:
            return str(arch)
    by_type = {t: a for a, t in HF_FAMILIES.items()}
    if not archs and config.get("model_type") in by_type:
        return by_type[config["model_type"]]
    name = archs[0] if archs else config.get("model_type")
    raise ConfigError(
        f"{where}: unsupported architecture {name!r} (model_type="
        f"{config.get('model_type')!r}); merge reads Hugging Face models of "
        f"{', '.join(HF_FAMILIES)}"
    )


def _read_config(path: str) -> dict:
    where = os.path.join(path, HF_CONFIG)
    try:
        with open(where, encoding="utf-8") as f:
            config = json.load(f)
    except OSError as e:
        raise DataFormatError(f"{where}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataFormatError(f"{where}: invalid JSON ({e})") from None
    if not isinstance(config, dict):
        raise DataFormatError(f"{where}: expected a JSON object")
    return config


def weight_files(path: str) -> list[str]:
    """The safetensors files of an HF model directory: ``model.safetensors``, else the
    shards its index lists (each checked to lie inside the directory)."""
    from megablocks_ablate.model.hf_files import shard_files

    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(os.path.join(path, INDEX_FILE)):
        return shard_files(path)
    if os.path.isfile(os.path.join(path, "pytorch_model.bin")):
        raise DataFormatError(
            f"{path}: only pickle weights (pytorch_model.bin); convert them to safetensors "
            "first (we never unpickle untrusted files)"
        )
    raise DataFormatError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")


@dataclass
class HFModel:
    """One Hugging Face model directory, its config and every tensor memory-mapped."""

    path: str
    config: dict
    architecture: str
    files: list[str]
    _maps: list[MappedSafetensors] = field(default_factory=list, repr=False)
    _where: dict[str, MappedSafetensors] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path: str) -> HFModel:
        if not os.path.isdir(path):
            raise ConfigError(
                f"{path}: not a directory (Hugging Face hub names are not downloaded: "
                "download the model, e.g. `hf download NAME --local-dir DIR`, and pass DIR)"
            )
        config = _read_config(path)
        arch = hf_architecture(config, os.path.join(path, HF_CONFIG))
        model = cls(path, config, arch, weight_files(path))
        for file in model.files:
            m = MappedSafetensors(file)
            model._maps.append(m)
            for name in m.names:
                if name in model._where:
                    raise DataFormatError(
                        f"{file}: tensor {name!r} is also in {model._where[name].path}; "
                        "each tensor must be in one shard"
                    )
                model._where[name] = m
        model._check_index()
        return model

    def _check_index(self) -> None:
        """Every tensor the index lists is in the shard it names."""
        index = os.path.join(self.path, INDEX_FILE)
        if os.path.isfile(os.path.join(self.path, SINGLE_FILE)):
            return  # model.safetensors is read; an index beside it is not used
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]  # checked by shard_files
        for name, shard in weight_map.items():
            m = self._where.get(name)
            if m is None or os.path.realpath(m.path) != os.path.realpath(
                os.path.join(self.path, shard)
            ):
                raise DataFormatError(f"{index}: lists tensor {name!r} in {shard}, which lacks it")

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def map_of(self, name: str) -> MappedSafetensors:
        return self._where[name]

    def dtype_name(self, name: str) -> str:
        return self._where[name].dtype_name(name)

    def shape(self, name: str) -> list[int]:
        return self._where[name].shape(name)

    def numel(self, name: str) -> int:
        return self._where[name].numel(name)

    def close(self) -> None:
        for m in self._maps:
            m.close()

    def recorded_lineage(self) -> dict | None:
        """The lineage our export recorded in config.json (None: not our export)."""
        ours = self.config.get(OUR_KEY)
        lineage = ours.get("lineage") if isinstance(ours, dict) else None
        return lineage if isinstance(lineage, dict) else None


def _same_bytes(a: HFModel, b: HFModel, name: str) -> bool:
    with a.map_of(name).view(name) as x, b.map_of(name).view(name) as y:
        return x == y


def _file_digest(path: str) -> str:
    from megablocks_ablate.utils.verify import file_sha256

    return file_sha256(path)


def check_hf_inputs(models: list[HFModel], allow_different_seed: bool = False) -> None:
    """Refuse inputs that cannot be averaged tensor by tensor (see the module docstring);
    every message names the directory and the tensor or file. Reads no weights except
    non-float tensors (compared byte for byte) and tokenizer files (hashed)."""
    from megablocks_ablate.merge.file_merge import check_tensors

    ref = models[0]
    for m in models[1:]:
        if m.architecture != ref.architecture:
            raise ConfigError(
                f"{m.path}: architecture {m.architecture}, {ref.path} is {ref.architecture}; "
                "only models of one architecture can be averaged"
            )
    check_tensors(models, same_bytes=_same_bytes)
    for m in models[1:]:
        _check_tokenizers(ref, m)
        _warn_config_difference(ref, m)
    _check_seeds(models, allow_different_seed)


def _check_tokenizers(ref: HFModel, m: HFModel) -> None:
    for name in TOKENIZER_FILES:
        a, b = os.path.join(ref.path, name), os.path.join(m.path, name)
        if os.path.isfile(a) and os.path.isfile(b) and _file_digest(a) != _file_digest(b):
            raise ConfigError(
                f"{b}: differs from {a}; models with different tokenizers cannot be averaged"
            )


def _warn_config_difference(ref: HFModel, m: HFModel) -> None:
    keys = sorted((set(ref.config) | set(m.config)) - _NOISE_KEYS)
    for k in keys:
        if ref.config.get(k, "<missing>") != m.config.get(k, "<missing>"):
            log.warning(
                "%s: config.json %s is %r, %s has %r (merged anyway: the tensors match; the "
                "output takes %s's config)",
                m.path,
                k,
                m.config.get(k, "<missing>"),
                ref.path,
                ref.config.get(k, "<missing>"),
                ref.path,
            )
            return


def _check_seeds(models: list[HFModel], allow_different_seed: bool) -> None:
    """Exports of our checkpoints record the seed they continue from: refuse different
    ones (as for our checkpoints). Other models record nothing, so nothing is checked."""
    seeds = {}
    for m in models:
        lineage = m.recorded_lineage()
        if lineage is not None:
            seeds[m.path] = lineage.get("seed_hash")
    known = {s for s in seeds.values() if s}
    if len(known) > 1 and not allow_different_seed:
        shown = ", ".join(f"{p}: {(s or 'unknown')[:12]}" for p, s in seeds.items())
        raise ConfigError(
            f"the models do not all continue from the same seed ({shown}); averaging models "
            "from different seeds is usually meaningless (pass --allow-different-seed to "
            "merge anyway)"
        )
