"""Public seeds: Llama and GPT-NeoX (Pythia) checkpoints through import -> train -> merge
-> export, on our one Transformer shaped by the family fields of ModelConfig.

Each case builds a tiny random model with transformers (fp32, eval, fixed seed; every
parameter perturbed so that norms and biases are not at their init), saves it as
safetensors, imports it (logits equal transformers' to 1e-4), trains two unit models
from it for a few steps, merges them with the streaming file merge, exports the merge
and loads it with ``AutoModelForCausalLM`` (logits equal ours to 1e-4).
"""

import json
import os

import pytest
import torch
import transformers  # a dev dependency (pyproject [dev]): these tests must not skip

from megablocks_ablate.checkpoint import (
    Lineage,
    load_model_checkpoint,
    model_hash,
    save_model_checkpoint,
)
from megablocks_ablate.cli import main
from megablocks_ablate.errors import ConfigError, DataFormatError
from megablocks_ablate.kernels.dispatch import kernel_backend
from megablocks_ablate.merge.file_merge import merge_checkpoints
from megablocks_ablate.merge.spec import MergeSpec
from megablocks_ablate.model import ModelConfig
from megablocks_ablate.model.hf import export_hf, hf_family, import_hf
from megablocks_ablate.model.loading import load_model

VOCAB = 200  # not a multiple of 128: the imported model keeps it unpadded

CASES = {
    "llama-tied-gqa": (
        transformers.LlamaConfig,
        dict(num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-5),
    ),
    "llama-untied-gqa": (
        transformers.LlamaConfig,
        dict(
            num_key_value_heads=2,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        ),
    ),
    "llama-bias-mha": (
        transformers.LlamaConfig,
        dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True),
    ),
    "neox-rotary-0.25": (
        transformers.GPTNeoXConfig,
        dict(
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.25,
            }
        ),
    ),
    "neox-rotary-1.0": (
        transformers.GPTNeoXConfig,
        dict(
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1000.0,
                "partial_rotary_factor": 1.0,
            }
        ),
    ),
    "neox-sequential-0.5": (
        transformers.GPTNeoXConfig,
        dict(
            use_parallel_residual=False,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
            },
        ),
    ),
}


def _hf_model(case: str) -> transformers.PreTrainedModel:
    cls, extra = CASES[case]
    hf_cfg = cls(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        **extra,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():  # a tied output projection is perturbed once
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _ids(seed: int, shape=(2, 37)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def _train_unit(seed_dir: str, out_dir: str, seed: int, steps: int = 3) -> None:
    """A few AdamW steps from the seed on random tokens, saved as a unit model."""
    model, lineage = load_model(seed_dir)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (4, 17), generator=g)
        loss = model(ids[:, :-1], labels=ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_model_checkpoint(
        out_dir,
        {k: v.detach() for k, v in model.state_dict().items()},
        model.cfg.to_dict(),
        Lineage(
            kind="unit",
            seed_hash=model_hash(seed_dir),
            units=[f"u{seed}"],
            weights=[1.0],
            tokens_seen=steps * 4 * 16,
            tokenizer_fingerprint=lineage.tokenizer_fingerprint,
        ),
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_train_merge_export(tmp_path, case):
    hf = _hf_model(case)
    hf.save_pretrained(str(tmp_path / "hf"), safe_serialization=True)
    assert os.path.isfile(tmp_path / "hf" / "model.safetensors")

    # import: our logits are transformers'
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "seed")]) == 0
    seed, lineage = load_model(str(tmp_path / "seed"))
    assert lineage.kind == "imported"
    ids = _ids(3)
    with torch.no_grad():
        assert _max_diff(seed(ids), hf(ids).logits) < 1e-4
    arch = hf.config.architectures[0]
    assert hf_family(seed.cfg) == arch

    # two unit models from the imported seed, merged 0.3 / 0.7
    units = {}
    for i in (1, 2):
        units[f"u{i}"] = str(tmp_path / "pool" / f"u{i}")
        _train_unit(str(tmp_path / "seed"), units[f"u{i}"], seed=i)
    spec = MergeSpec.from_dict(
        {"checkpoints": units, "weights": {"u1": 0.3, "u2": 0.7}}, source="test.yaml"
    )
    merge_checkpoints(spec, str(tmp_path / "merged"), show_progress=False)
    merged, _ = load_model(str(tmp_path / "merged"))
    s1 = load_model_checkpoint(units["u1"])[0]
    s2 = load_model_checkpoint(units["u2"])[0]
    s0 = seed.state_dict()
    for name, t in merged.state_dict().items():
        torch.testing.assert_close(t, 0.3 * s1[name] + 0.7 * s2[name])
        assert not torch.equal(t, s0[name]) or "norm" in name, name  # training moved it

    # export: transformers loads the same family and its logits are ours
    assert main(["export-hf", str(tmp_path / "merged"), str(tmp_path / "out")]) == 0
    hf_cfg = json.load(open(tmp_path / "out" / "config.json"))
    assert hf_cfg["architectures"] == [arch]
    assert hf_cfg["model_type"] == hf.config.model_type
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert type(back) is type(hf)
    ids = _ids(4, (3, 29))
    with torch.no_grad():
        assert _max_diff(merged(ids), back(ids).logits) < 1e-4

    # and the export reads back bitwise
    import_hf(str(tmp_path / "out"), str(tmp_path / "again"))
    again = load_model_checkpoint(str(tmp_path / "again"))[0]
    assert again.keys() == merged.state_dict().keys()
    assert all(torch.equal(again[k], v) for k, v in merged.state_dict().items())


def test_exported_tensor_names_are_the_families(tmp_path):
    from safetensors.torch import load_file

    for case, names in {
        "llama-untied-gqa": ["model.layers.1.post_attention_layernorm.weight", "lm_head.weight"],
        "neox-rotary-0.25": [
            "gpt_neox.embed_in.weight",
            "embed_out.weight",
            "gpt_neox.final_layer_norm.bias",
            "gpt_neox.layers.0.attention.query_key_value.bias",
            "gpt_neox.layers.0.mlp.dense_h_to_4h.bias",
        ],
    }.items():
        _hf_model(case).save_pretrained(str(tmp_path / case / "hf"))
        import_hf(str(tmp_path / case / "hf"), str(tmp_path / case / "ckpt"))
        export_hf(str(tmp_path / case / "ckpt"), str(tmp_path / case / "out"))
        tensors = load_file(str(tmp_path / case / "out" / "model.safetensors"))
        assert all(n in tensors for n in names), sorted(tensors)


def test_old_style_pythia_config_json(tmp_path):
    """A Pythia config.json as on the hub (rotary_pct, rotary_emb_base, no rope_parameters)."""
    hf = _hf_model("neox-rotary-0.25")
    hf.save_pretrained(str(tmp_path / "hf"))
    path = tmp_path / "hf" / "config.json"
    cfg = json.load(open(path))
    cfg.pop("rope_parameters", None)
    cfg.update(rotary_pct=0.25, rotary_emb_base=10000, transformers_version="4.24.0")
    path.write_text(json.dumps(cfg))
    import_hf(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    model, _ = load_model(str(tmp_path / "ckpt"))
    assert (model.cfg.rotary_fraction, model.cfg.rotary_dim, model.cfg.rope_theta) == (
        0.25,
        4,
        10000.0,
    )
    ids = _ids(5)
    with torch.no_grad():
        assert _max_diff(model(ids), hf(ids).logits) < 1e-4


def test_unsupported_architecture_is_a_config_error(tmp_path, capsys):
    os.makedirs(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(
        json.dumps({"architectures": ["MistralForCausalLM"], "model_type": "mistral"})
    )
    with pytest.raises(ConfigError) as e:
        import_hf(str(tmp_path / "hf"), str(tmp_path / "out"))
    msg = str(e.value)
    assert "MistralForCausalLM" in msg
    for arch in ("CohereForCausalLM", "LlamaForCausalLM", "GPTNeoXForCausalLM"):
        assert arch in msg
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "out2")]) == 2
    assert "MistralForCausalLM" in capsys.readouterr().err


def test_unsupported_variants_are_refused(tmp_path):
    hf = _hf_model("llama-tied-gqa")
    hf.save_pretrained(str(tmp_path / "hf"))
    path = tmp_path / "hf" / "config.json"
    cfg = json.load(open(path))
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}
    path.write_text(json.dumps(cfg))
    with pytest.raises(DataFormatError, match="rope_type 'llama3'"):
        import_hf(str(tmp_path / "hf"), str(tmp_path / "out"))
    # a config no family fits cannot be exported, and says which field is in the way
    with pytest.raises(ConfigError, match="rope_layout: LlamaForCausalLM needs"):
        hf_family(
            ModelConfig.from_preset(
                "tiny", ["block=sequential", "norms_per_block=2", "norm=rmsnorm", "qk_norm=false"]
            )
        )
    with pytest.raises(ConfigError, match="norm_bias: GPTNeoXForCausalLM needs"):
        hf_family(ModelConfig.from_preset("tiny", ["mlp=gelu"]))


def test_family_fields_keep_default_configs_identical():
    cfg = ModelConfig.from_preset("tiny")
    d = cfg.to_dict()
    for name in ("block", "norms_per_block", "norm_bias", "mlp", "bias", "rotary_fraction"):
        assert name not in d  # checkpoints and run keys are what they were
    assert ModelConfig.from_dict(d) == cfg
    neox = cfg.replace(["mlp=gelu", "bias=true", "rotary_fraction=0.5"])
    assert neox.to_dict()["mlp"] == "gelu" and ModelConfig.from_dict(neox.to_dict()) == neox
    with pytest.raises(ConfigError, match="norms_per_block: sequential"):
        ModelConfig.from_preset("tiny", ["block=sequential"])
    with pytest.raises(ConfigError, match="norm_bias"):
        ModelConfig.from_preset("tiny", ["norm=rmsnorm", "norm_bias=true"])
    with pytest.raises(ConfigError, match="rotary_fraction"):
        ModelConfig.from_preset("tiny", ["rotary_fraction=0.1"])  # 16 * 0.1 -> 1 channel


@pytest.mark.parametrize(
    "overrides",
    [
        ["mlp=gelu", "bias=true", "norm_bias=true", "norms_per_block=2", "rotary_fraction=0.5"],
        ["block=sequential", "norms_per_block=2", "norm=rmsnorm", "rope_layout=half"],
    ],
)
def test_param_count_and_kernels_match_reference(overrides):
    """num_params() counts the family's parameters; Triton (interpreter) == reference."""
    cfg = ModelConfig.from_preset("tiny", overrides)
    torch.manual_seed(0)
    model = cfg.build()
    assert model.num_params() == cfg.num_params()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids, labels = _ids(1, (2, 13)), _ids(2, (2, 13))
    results = {}
    for backend in ("reference", "triton"):
        model.zero_grad()
        with kernel_backend(backend):
            loss = model(ids, labels=labels)
            loss.backward()
        results[backend] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (loss_r, grads_r), (loss_t, grads_t) = results["reference"], results["triton"]
    assert abs(loss_t - loss_r) < 1e-5
    for name, g in grads_r.items():
        assert (grads_t[name] - g).abs().max().item() <= 1e-4 * (g.abs().max().item() + 1e-12)
