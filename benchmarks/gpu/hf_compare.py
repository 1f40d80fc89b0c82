"""Our model against transformers' on the same weights: strict loading and the stated
tolerances of the eval row (plain functions, CPU-testable; no GPU needed).

**Loading.** Our weights go into ``CohereForCausalLM`` with ``strict=True``: every key
the HF model has is filled and nothing is left over. With tied embeddings HF still
lists ``lm_head.weight`` (the same tensor as ``model.embed_tokens.weight``), so the
embedding is given under that name too; after loading the tie must still hold and
every HF tensor must equal ours bit for bit. A name, shape or tie that does not match
is a failure naming the keys, never a silently random tensor.

**Tolerances.** Two checks, each a failure when exceeded:

* bf16 (the timed run, both models bf16): the mean NLL over every scored token,
  ``|ours - theirs| / theirs <= 2^-8`` (3.9e-3, one bf16 rounding step of the mean
  itself). Each side sums fp32 per-token losses whose bf16 rounding errors are
  zero-mean, so over >= 10^4 tokens the means agree far more closely (measured on CPU:
  6e-6 for the 2-layer demo model); a gap of a bf16 step is systematic: a wrong weight
  mapping, a missing norm, a wrong tie or vocabulary. In fp32 (the CPU dry run) 1e-5.
* fp32 per token (both models upcast to fp32 on the same weights, TF32 off, the first
  batches up to ``check_tokens``): ``max |nll_ours - nll_theirs| <= 1e-3`` nats and
  RMS ``<= 1e-4``. Random-init models are nearly uniform, so the mean NLL barely moves
  when attention or RoPE is wrong (skipping RoPE changed the demo model's mean by 3e-5
  relative); the per-token losses do (RMS 3.4e-3), while fp32 rounding differs by
  < 1e-6 (RMS 3e-7, max 1e-6 on the demo model; 6.8e-7 / 1.9e-6 on the 12-layer 130m).
  The bf16 per-token differences are recorded beside them, not judged: already for
  130m on CPU they reach 6.2e-3 RMS / 2.3e-2 max, more than a missing RoPE moves them,
  so only fp32 can tell a bug from rounding.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

MEAN_REL_TOL = {"bfloat16": 2.0**-8, "float16": 2.0**-10, "float32": 1e-5}
TOKEN_MAX_TOL = 1e-3  # nats, fp32 per-token check
TOKEN_RMS_TOL = 1e-4


def hf_state_dict(ours_state: dict, cfg) -> dict:
    """Our state dict in HF names, plus ``lm_head.weight`` when the embeddings are tied
    (HF lists the tied head as its own key), ready for ``strict=True``."""
    from megablocks_ablate.model.hf import to_hf_state_dict

    sd = dict(to_hf_state_dict(ours_state, cfg))
    if cfg.tie_embeddings and "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return sd


def load_strict(hf, state: dict) -> None:
    """``hf.load_state_dict(state, strict=True)``, then the checks of the module doc.
    Raises ``ValueError`` naming what does not match."""
    import torch

    try:
        hf.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = " ".join(str(e).split())[:400]
        raise ValueError(f"transformers refused our weights (strict=True): {first}") from None
    own = hf.state_dict()
    differ = [
        k for k, v in state.items() if not torch.equal(own[k].to(v.dtype), v.to(own[k].device))
    ]
    if differ:
        raise ValueError(f"after strict loading {len(differ)} HF tensor(s) differ: {differ[:5]}")
    tied = getattr(hf.config, "tie_word_embeddings", False)
    if tied and hf.lm_head.weight.data_ptr() != hf.model.embed_tokens.weight.data_ptr():
        raise ValueError("tie_word_embeddings: lm_head.weight is no longer the embedding")


def hf_model(cfg, ours, device, dtype):
    """``CohereForCausalLM`` of ``cfg`` (SDPA attention) holding ``ours``' weights, strictly."""
    from transformers import CohereConfig, CohereForCausalLM

    from megablocks_ablate.model.hf import to_hf_config

    fields = {
        k: v
        for k, v in to_hf_config(cfg).items()
        if k not in ("architectures", "model_type", "torch_dtype")
    }
    hf = CohereForCausalLM(CohereConfig(**fields, attn_implementation="sdpa"))
    load_strict(hf, hf_state_dict(ours.state_dict(), cfg))
    return hf.to(device=device, dtype=dtype).eval()


def judge_mean(nll_ours: float, n_ours: int, nll_hf: float, n_hf: int, dtype: str) -> dict:
    """The mean-NLL check: same scored tokens, relative difference within the tolerance."""
    tol = MEAN_REL_TOL[dtype]
    mean_ours = nll_ours / n_ours if n_ours else math.nan
    mean_hf = nll_hf / n_hf if n_hf else math.nan
    rel = abs(mean_ours - mean_hf) / abs(mean_hf) if mean_hf else math.inf
    ok = n_ours == n_hf and n_ours > 0 and math.isfinite(rel) and rel <= tol
    why = None
    if n_ours != n_hf:
        why = f"scored tokens differ: ours {n_ours}, transformers {n_hf}"
    elif not ok:
        why = (
            f"mean NLL ours {mean_ours:.6f} vs transformers {mean_hf:.6f}: relative "
            f"difference {rel:.2e} > {tol:.2e} ({dtype})"
        )
    return {
        "dtype": dtype,
        "mean_nll_ours": mean_ours,
        "mean_nll_transformers": mean_hf,
        "tokens": n_ours,
        "rel_diff": rel,
        "tolerance": tol,
        "ok": ok,
        "why": why,
    }


def token_stats(ours, theirs) -> dict:
    """max and RMS of the per-token NLL difference (any array-likes of equal length)."""
    import torch

    a = torch.as_tensor(ours, dtype=torch.float64).flatten()
    b = torch.as_tensor(theirs, dtype=torch.float64).flatten()
    if a.shape != b.shape or a.numel() == 0:
        return {"tokens": int(a.numel()), "max_abs": math.inf, "rms": math.inf}
    d = a - b
    if not bool(torch.isfinite(d).all()):
        return {"tokens": int(a.numel()), "max_abs": math.inf, "rms": math.inf}
    return {
        "tokens": int(a.numel()),
        "max_abs": float(d.abs().max()),
        "rms": float(d.pow(2).mean().sqrt()),
    }


def judge_tokens(ours, theirs) -> dict:
    """The fp32 per-token check (tolerances in the module doc)."""
    s = token_stats(ours, theirs)
    ok = s["max_abs"] <= TOKEN_MAX_TOL and s["rms"] <= TOKEN_RMS_TOL
    why = None
    if not ok:
        why = (
            f"fp32 per-token NLL differs from transformers': max {s['max_abs']:.2e} "
            f"(<= {TOKEN_MAX_TOL:.0e}), RMS {s['rms']:.2e} (<= {TOKEN_RMS_TOL:.0e}) nats "
            f"over {s['tokens']} tokens"
        )
    return {**s, "max_tol": TOKEN_MAX_TOL, "rms_tol": TOKEN_RMS_TOL, "ok": ok, "why": why}


def per_token(ours, hf, batches: Iterable, device, autocast_dtype=None) -> tuple:
    """Per-token NLL of both models on ``batches`` (scored tokens only, fp64 on CPU):
    ours through ``per_token_nll`` (the fused loss, as ``evaluate()``), transformers'
    through its logits and ``cross_entropy``."""
    import contextlib

    import torch
    import torch.nn.functional as F

    a, b = [], []
    cast = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if autocast_dtype is not None and device.type == "cuda"
        else contextlib.nullcontext()
    )
    with torch.inference_mode():
        for batch in batches:
            inputs, labels = batch.inputs_and_labels(device)
            keep = labels != -100
            with cast:
                mine = ours.per_token_nll(inputs, labels)
            logits = hf(input_ids=inputs).logits
            theirs = F.cross_entropy(
                logits.flatten(0, 1).float(), labels.flatten(), reduction="none"
            ).view(labels.shape)
            a.append(mine[keep].double().cpu())
            b.append(theirs[keep].double().cpu())
    return torch.cat(a), torch.cat(b)


def fp32_token_check(cfg, ours, hf, batches, device) -> dict:
    """:func:`judge_tokens` on fp32 copies of both models (same weights, upcast; fp32
    matmuls at "highest" precision, i.e. no TF32), on ``batches``."""
    import copy

    import torch

    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        ours32 = cfg.build(device=device, dtype=torch.float32).eval()
        ours32.load_state_dict({k: v.float() for k, v in ours.state_dict().items()})
        hf32 = copy.deepcopy(hf).float().eval()
        a, b = per_token(ours32, hf32, batches, device)
    finally:
        torch.set_float32_matmul_precision(previous)
    del ours32, hf32
    return judge_tokens(a, b)
