"""`merge` of Hugging Face model directories (merge/hf_merge.py, merge/hf_stream.py):
equal to mergekit's linear arithmetic (a mergekit config) and to ours (a merge spec),
on tiny transformers models of every supported family, written as a loadable HF model
with its provenance.

Equality with mergekit is checked against a torch restatement of mergekit 0.1.5's
linear method (hf_fixtures.mergekit_linear; mergekit itself is not installed here,
benchmarks/merge.py --vs-mergekit --hf-inputs runs it): **bitwise** where every
product w_i·x_i and the weight sum are exact in fp32 (weights that are powers of two:
mergekit's addcmul_ is a fused multiply-add, our kernel is not, and with exact
products the two round the same), and **within fp32 rounding** (a per-element bound
of a few ulps of Σ|w_i·x_i| / Σw) for other weights; for bf16 outputs within one bf16
rounding step where the fp32 results straddle it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
import yaml
from hf_fixtures import (
    mergekit_config,
    mergekit_linear,
    read_hf_weights,
    same_bits,
    write_hf_models,
)

from megablocks_ablate.cli import main
from megablocks_ablate.kernels.merge_reference import merge_into_reference
from megablocks_ablate.utils.hashing import sha256_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXACT = [1.0, 1.0, 1.0]  # normalised by 3: the division path (not a power of two)
POW2 = [0.5, 0.5, 1.0]  # powers of two, weight sum 2: the scaled-weights path
GENERAL = [0.3, 0.5, 1.1]  # inexact products: mergekit's FMA rounds differently


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, list[str]]:
    """Three fp32 models of each family (Llama saved in shards), and three bf16 Llama."""
    root = str(tmp_path_factory.mktemp("hf"))
    out = {f: write_hf_models(root, f, shard=f == "llama") for f in ("cohere", "llama", "gpt_neox")}
    out["llama_bf16"] = write_hf_models(os.path.join(root, "bf16"), "llama", dtype=torch.bfloat16)
    return out


def _merge(spec: str, out: str, *extra: str) -> None:
    assert main(["merge", "--spec", spec, "--out", out, *extra]) == 0


def _fp32_bound(xs, weights, ref) -> torch.Tensor:
    """Per-element bound of both computations' rounding: 2(N+1) ulps of Σ|w_i x_i| / |Σw|."""
    total = abs(sum(weights))
    mag = sum(abs(w) * x.double().abs() for w, x in zip(weights, xs)) / total
    return 2 * (len(xs) + 1) * 2.0**-24 * mag + ref.double().abs() * 2.0**-24


@pytest.mark.parametrize("family", ["cohere", "llama", "gpt_neox"])
@pytest.mark.parametrize("weights", [EXACT, POW2, GENERAL], ids=["equal", "pow2", "general"])
def test_mergekit_config_matches_mergekit_fp32(families, family, weights, tmp_path):
    models = families[family]
    cfg = mergekit_config(tmp_path / "mk.yaml", models, weights, dtype="float32")
    _merge(cfg, str(tmp_path / "out"))
    ours = read_hf_weights(str(tmp_path / "out"))
    inputs = [read_hf_weights(m) for m in models]
    assert set(ours) == set(inputs[0])
    differing = 0
    for name, got in ours.items():
        xs = [sd[name] for sd in inputs]
        ref = mergekit_linear(xs, weights)
        assert got.dtype == torch.float32 and got.shape == ref.shape
        if weights is GENERAL:
            err = (got.double() - ref.double()).abs()
            assert (err <= _fp32_bound(xs, weights, ref)).all(), name
            differing += int((got != ref).sum())
        else:
            assert same_bits(got, ref), name
    if weights is GENERAL:  # the FMA does show: the comparison is not vacuous
        assert differing > 0


@pytest.mark.parametrize(
    "top, weights",
    [
        ({"dtype": "bfloat16"}, EXACT),  # fp32 inputs rounded to bf16 first, as mergekit does
        ({"dtype": "bfloat16"}, GENERAL),
        ({"dtype": "float32", "out_dtype": "bfloat16"}, POW2),
        ({"dtype": "float16", "parameters": {"normalize": False}}, [0.5, 0.25, 0.25]),
        ({"dtype": "bfloat16", "out_dtype": "float32"}, EXACT),
    ],
    ids=["bf16-equal", "bf16-general", "fp32-to-bf16", "fp16-unnormalised", "bf16-to-fp32"],
)
def test_mergekit_dtypes(families, top, weights, tmp_path):
    models = families["llama"]
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    cfg = mergekit_config(tmp_path / "mk.yaml", models, weights, **top)
    _merge(cfg, str(tmp_path / "out"))
    ours = read_hf_weights(str(tmp_path / "out"))
    inputs = [read_hf_weights(m) for m in models]
    normalize = top.get("parameters", {}).get("normalize", True)
    out_dtype = names.get(top.get("out_dtype", ""))
    for name, got in ours.items():
        ref = mergekit_linear(
            [sd[name] for sd in inputs], weights, normalize, names[top["dtype"]], out_dtype
        )
        assert got.dtype == ref.dtype, name
        if weights is GENERAL:  # within one bf16 rounding step where fp32 results straddle it
            xs = [sd[name] for sd in inputs]
            err = (got.double() - ref.double()).abs()
            step = ref.double().abs() * 2.0**-7  # one bf16 step (8 significant bits)
            assert (err <= _fp32_bound(xs, weights, ref) + step).all(), name
            assert float((got != ref).float().mean()) < 0.01, name
        else:
            assert same_bits(got, ref), name
    config = json.load(open(tmp_path / "out" / "config.json"))
    want = top.get("out_dtype", top["dtype"])
    assert config["dtype"] == want  # transformers 5 writes "dtype"; it is kept current


def test_bf16_and_mixed_dtype_inputs_are_promoted_like_mergekit(families, tmp_path):
    bf16 = families["llama_bf16"]
    cfg = mergekit_config(tmp_path / "a.yaml", bf16, EXACT)  # no dtype: the inputs' (bf16)
    _merge(cfg, str(tmp_path / "a"))
    got = read_hf_weights(str(tmp_path / "a"))
    inputs = [read_hf_weights(m) for m in bf16]
    for name, t in got.items():
        assert same_bits(t, mergekit_linear([sd[name] for sd in inputs], EXACT)), name
    # bf16 with fp16 inputs: torch promotes to fp32, and so does the merge
    mixed = write_hf_models(
        str(tmp_path / "mixed"), "llama", n=2, dtypes=[torch.bfloat16, torch.float16]
    )
    cfg = mergekit_config(tmp_path / "b.yaml", mixed, [1.0, 1.0])
    _merge(cfg, str(tmp_path / "b"))
    got = read_hf_weights(str(tmp_path / "b"))
    inputs = [read_hf_weights(m) for m in mixed]
    for name, t in got.items():
        ref = mergekit_linear([sd[name] for sd in inputs], [1.0, 1.0])
        assert ref.dtype == torch.float32 and same_bits(t, ref), name


@pytest.mark.parametrize("family", ["cohere", "gpt_neox"])
def test_spec_of_hf_directories_uses_our_arithmetic(families, family, tmp_path):
    """A merge spec naming HF directories: the spec's normalised weights, fp32
    accumulation in input order, one rounding (bitwise the PyTorch reference)."""
    models = families[family]
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "checkpoints": {f"u{i}": m for i, m in enumerate(models)},
                "weights": {"u0": 0.3, "u1": 0.5, "u2": 1.1},
                "dtype": "bf16",
            }
        )
    )
    _merge(str(spec), str(tmp_path / "out"))
    got = read_hf_weights(str(tmp_path / "out"))
    inputs = [read_hf_weights(m) for m in models]
    ws = [w / 1.9 for w in (0.3, 0.5, 1.1)]
    for name, t in got.items():
        ref = torch.empty(t.shape, dtype=torch.bfloat16)
        merge_into_reference(ref.view(-1), [sd[name].reshape(-1) for sd in inputs], ws)
        assert same_bits(t, ref), name


def test_output_is_a_loadable_hf_model_with_provenance(families, tmp_path):
    models = families["llama"]  # sharded inputs
    cfg = mergekit_config(tmp_path / "mk.yaml", models, POW2, dtype="float32")
    out = tmp_path / "out"
    _merge(cfg, str(out))
    assert sorted(os.listdir(out)) == sorted(
        [
            ".megablocks-ablate.json",
            "config.json",
            "generation_config.json",
            "merge_provenance.json",
            "model.safetensors",
            "tokenizer.json",
        ]
    )
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        assert torch.isfinite(merged(ids).logits).all()
    prov = json.load(open(out / "merge_provenance.json"))
    assert prov["arithmetic"] == "mergekit-linear" and prov["normalize"] is True
    assert prov["config"]["sha256"] == sha256_file(cfg)
    assert [i["weight"] for i in prov["inputs"]] == POW2
    assert [i["applied_weight"] for i in prov["inputs"]] == [w / 2.0 for w in POW2]
    first = prov["inputs"][0]
    assert first["path"] == os.path.abspath(models[0]) and len(first["sha256"]) > 1  # shards
    for rel, digest in first["sha256"].items():
        assert digest == sha256_file(os.path.join(models[0], rel))
    # a second merge into it needs --overwrite, which replaces only what the merge wrote
    (out / "notes.txt").write_text("mine")
    assert main(["merge", "--spec", cfg, "--out", str(out)]) == 2
    _merge(cfg, str(out), "--overwrite")
    assert (out / "notes.txt").read_text() == "mine"


def test_print_weights_of_a_mergekit_config(families, tmp_path, capsys):
    cfg = mergekit_config(tmp_path / "mk.yaml", families["cohere"], [1.0, 3.0, 4.0])
    assert main(["merge", "--spec", cfg, "--print-weights"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert list(shown.values()) == [0.125, 0.375, 0.5]
    assert not (tmp_path / "out").exists()


def test_reference_kernels_merge_the_same(families, tmp_path):
    """MBA_KERNELS=reference (torch ops, no C++ kernel) gives the same bytes."""
    cfg = mergekit_config(tmp_path / "mk.yaml", families["gpt_neox"], GENERAL, dtype="bfloat16")
    _merge(cfg, str(tmp_path / "cpp"))
    env = dict(os.environ, MBA_KERNELS="reference")
    code = (
        "import sys; from megablocks_ablate.cli import main; "
        f"sys.exit(main(['merge', '--spec', {cfg!r}, '--out', {str(tmp_path / 'ref')!r}]))"
    )
    subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, check=True)
    a, b = read_hf_weights(str(tmp_path / "cpp")), read_hf_weights(str(tmp_path / "ref"))
    assert a.keys() == b.keys() and all(same_bits(a[k], b[k]) for k in a)


def test_hf_merge_imports_no_torch(families, tmp_path):
    """The HF path keeps the file merge's start-up: no torch, numpy only for a divisor
    that is not a power of two."""
    cfg = mergekit_config(tmp_path / "mk.yaml", families["llama"], POW2)
    code = (
        "import sys; from megablocks_ablate.cli import main; "
        f"rc = main(['merge', '--spec', {cfg!r}, '--out', {str(tmp_path / 'o')!r}]); "
        "print(sorted({m.split('.')[0] for m in sys.modules})); sys.exit(rc)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    loaded = set(eval(r.stdout.strip().splitlines()[-1]))
    assert not loaded & {"torch", "numpy", "transformers"}, loaded & {"torch", "numpy"}


def test_nan_input_is_refused_naming_the_model_and_tensor(families, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    src = families["cohere"][1]
    for name in os.listdir(src):
        data = open(os.path.join(src, name), "rb").read()
        (bad / name).write_bytes(data)
    state = load_file(str(bad / "model.safetensors"))
    state["model.norm.weight"][3] = float("nan")
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    models = [families["cohere"][0], str(bad)]
    cfg = mergekit_config(tmp_path / "mk.yaml", models, [1.0, 1.0])
    assert main(["merge", "--spec", cfg, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: tensor 'model.norm.weight' has 1 non-finite values" in err
    assert not (tmp_path / "out").exists()


def test_families_table_is_model_hf_s():
    from megablocks_ablate.merge.hf_inputs import HF_FAMILIES
    from megablocks_ablate.model.hf import FAMILIES

    assert HF_FAMILIES == FAMILIES


def test_by_tokens_reads_the_counts_our_exports_record(families, tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    models = families["gpt_neox"][:2]
    spec.write_text(
        yaml.safe_dump({"checkpoints": {"a": models[0], "b": models[1]}, "by_tokens": True})
    )
    assert main(["merge", "--spec", str(spec), "--print-weights"]) == 2
    err = capsys.readouterr().err
    assert "checkpoints.a: by_tokens needs the tokens" in err and "records none" in err
    exports = []
    for i, (m, tokens) in enumerate(zip(models, (100, 300))):
        d = tmp_path / f"export{i}"
        d.mkdir()
        for name in os.listdir(m):
            (d / name).write_bytes(open(os.path.join(m, name), "rb").read())
        cfg = json.load(open(d / "config.json"))
        cfg["megablocks_ablate"] = {"lineage": {"kind": "unit", "tokens_seen": tokens}}
        (d / "config.json").write_text(json.dumps(cfg))
        exports.append(str(d))
    spec.write_text(
        yaml.safe_dump({"checkpoints": {"a": exports[0], "b": exports[1]}, "by_tokens": True})
    )
    assert main(["merge", "--spec", str(spec), "--print-weights"]) == 0
    assert json.loads(capsys.readouterr().out) == {"a": 0.25, "b": 0.75}
