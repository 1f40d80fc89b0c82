"""Hugging Face Cohere interop: logits match transformers, export -> import is bitwise."""

import json
import os

import pytest
import torch
import transformers  # a dev dependency (pyproject [dev]): the logits test must not skip
from safetensors.torch import load_file

from megablocks_ablate.checkpoint import Lineage, load_model_checkpoint, save_model_checkpoint
from megablocks_ablate.cli import main
from megablocks_ablate.errors import ConfigError, DataFormatError, NonFiniteError
from megablocks_ablate.model import ModelConfig
from megablocks_ablate.model.hf import export_hf, import_hf

VARIANTS = {
    "tied-gqa-qknorm": [],
    "untied-mha-scaled": [
        "qk_norm=false",
        "n_kv_heads=4",
        "tie_embeddings=false",
        "logit_scale=0.25",
        "vocab_size=250",
        "vocab_multiple=1",
        "rope_theta=500",
    ],
}


def _checkpoint(path, overrides=(), seed=0, **lineage):
    torch.manual_seed(seed)
    model = ModelConfig.from_preset("tiny", list(overrides)).build()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_model_checkpoint(
        str(path),
        model.state_dict(),
        model.cfg.to_dict(),
        Lineage(kind="seed", tokens_seen=1234, **lineage),
    )
    return model


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_exported_model_logits_match_transformers(tmp_path, variant):
    model = _checkpoint(tmp_path / "ckpt", VARIANTS[variant]).eval()
    export_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    hf = transformers.CohereForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ids = torch.randint(
        0, model.cfg.vocab_size, (2, 37), generator=torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert theirs.shape == ours.shape
    assert (ours - theirs).abs().max().item() < 1e-4
    assert json.load(open(tmp_path / "hf" / "config.json"))["architectures"] == [
        "CohereForCausalLM"
    ]


def test_export_import_round_trip_is_bitwise(tmp_path):
    _checkpoint(
        tmp_path / "ckpt",
        VARIANTS["untied-mha-scaled"],
        tokenizer_fingerprint="abc",
        trained_seq_len=32,
    )
    assert main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    state, cfg, lineage = load_model_checkpoint(str(tmp_path / "back"))
    state0, cfg0, _ = load_model_checkpoint(str(tmp_path / "ckpt"))
    assert cfg == cfg0 and state.keys() == state0.keys()
    for k in state:
        assert state[k].dtype == state0[k].dtype and torch.equal(state[k], state0[k]), k
    assert lineage.kind == "imported" and lineage.tokens_seen == 1234
    assert lineage.tokenizer_fingerprint == "abc"
    assert lineage.parents == [os.path.abspath(tmp_path / "hf")]
    assert lineage.trained_seq_len == 32  # our export's record survives the round trip


def test_bf16_round_trip_and_hf_tensor_names(tmp_path):
    model = ModelConfig.from_preset("tiny").build(dtype=torch.bfloat16)
    save_model_checkpoint(
        str(tmp_path / "ckpt"), model.state_dict(), model.cfg.to_dict(), Lineage(kind="seed")
    )
    export_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert tensors["model.layers.1.self_attn.q_norm.weight"].shape == (4, 16)
    assert tensors["model.layers.1.self_attn.k_norm.weight"].shape == (2, 16)
    assert tensors["model.layers.0.mlp.gate_proj.weight"].dtype == torch.bfloat16
    assert "lm_head.weight" not in tensors  # tied
    assert json.load(open(tmp_path / "hf" / "config.json"))["torch_dtype"] == "bfloat16"
    import_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
    state, _, _ = load_model_checkpoint(str(tmp_path / "back"))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_import_of_foreign_cohere_directory(tmp_path):
    # A Cohere model saved by transformers itself (no megablocks_ablate key) imports too.
    hf_cfg = transformers.CohereConfig(
        vocab_size=200,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_qk_norm=True,
        logit_scale=0.5,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    hf = transformers.CohereForCausalLM(hf_cfg).eval()
    hf.save_pretrained(str(tmp_path / "hf"))
    import_hf(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    state, cfg, lineage = load_model_checkpoint(str(tmp_path / "ckpt"))
    cfg = ModelConfig.from_dict(cfg)
    assert cfg.padded_vocab_size == 200 and cfg.qk_norm and cfg.n_kv_heads == 2
    assert lineage.trained_seq_len == 64  # anyone else's: max_position_embeddings
    model = cfg.build().eval()
    model.load_state_dict(state)
    ids = torch.randint(0, 200, (1, 21))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() < 1e-4


def test_export_with_tokenizer(tmp_path, sp_model_path):
    _checkpoint(tmp_path / "ckpt", extra={"tokenizer": sp_model_path})
    export_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == open(sp_model_path, "rb").read()
    assert json.load(open(tmp_path / "hf" / "config.json"))["eos_token_id"] == 2


def test_bad_inputs_give_specific_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match="norm"):
        _checkpoint(tmp_path / "rms", ["norm=rmsnorm"])
        export_hf(str(tmp_path / "rms"), str(tmp_path / "hf_rms"))
    os.makedirs(tmp_path / "pickled")
    (tmp_path / "pickled" / "config.json").write_text(
        json.dumps(
            {
                "model_type": "cohere",
                "vocab_size": 8,
                "hidden_size": 8,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 8,
            }
        )
    )
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(DataFormatError, match="pickle"):
        import_hf(str(tmp_path / "pickled"), str(tmp_path / "out"))
    assert main(["export-hf", str(tmp_path / "missing"), str(tmp_path / "o")]) == 2
    assert "missing" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_exported_hf_tokenizer_loads_in_transformers(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        ["hello world physics biology"] * 20,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.save(str(tmp_path / "tok.json"))
    _checkpoint(tmp_path / "ckpt")
    assert (
        main(
            [
                "export-hf",
                str(tmp_path / "ckpt"),
                str(tmp_path / "hf"),
                "--tokenizer",
                str(tmp_path / "tok.json"),
            ]
        )
        == 0
    )
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert hf_tok("hello physics")["input_ids"] == tok.encode("hello physics").ids
    assert hf_tok.eos_token == "<|endoftext|>"
    assert (
        json.load(open(tmp_path / "hf" / "config.json"))["eos_token_id"] == hf_tok.eos_token_id == 0
    )


def test_export_refuses_non_finite_weights_naming_the_tensor(tmp_path, capsys):
    _checkpoint(tmp_path / "ckpt")
    state, config, lineage = load_model_checkpoint(str(tmp_path / "ckpt"))
    state["layers.1.in_proj.weight"][0, :2] = torch.tensor([float("nan"), float("inf")])
    save_model_checkpoint(str(tmp_path / "ckpt"), state, config, lineage)
    with pytest.raises(
        NonFiniteError,
        match=r"ckpt/model.safetensors: tensor 'layers.1.in_proj.weight' has 2 non-finite "
        r"values \(NaN/inf\); refusing to export",
    ):
        export_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()
    assert main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 2
    assert "error: " in capsys.readouterr().err and not (tmp_path / "hf").exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".hf")] == []
