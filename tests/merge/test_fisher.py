"""Fisher-weighted merging (merge/fisher.py): the rule against its definition, the
empirical Fisher against per-sequence gradients computed by hand, and the file format's
checks."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megablocks_ablate.errors import DataFormatError, NonFiniteError
from megablocks_ablate.merge import fisher as fm


def _rand(seed: int, shape=(3, 4)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_equal_fishers_give_the_plain_average():
    seed = {"w": _rand(0), "b": _rand(1, (4,))}
    deltas = [{k: _rand(10 + i) for k in ("w",)} | {"b": _rand(20 + i, (4,))} for i in range(3)]
    f = {"w": torch.full((3, 4), 0.3), "b": torch.full((4,), 2.0)}
    w = [0.2, 0.5, 0.3]
    out = fm.fisher_merge(seed, deltas, [f, f, f], w, eps=0.01)
    for k in seed:
        plain = seed[k] + sum(wi * d[k] for d, wi in zip(deltas, w))
        torch.testing.assert_close(out[k], plain)


def test_merge_matches_the_elementwise_formula():
    seed = {"w": _rand(0)}
    deltas = [{"w": _rand(1)}, {"w": _rand(2)}]
    fishers = [{"w": _rand(3).abs()}, {"w": _rand(4).abs()}]
    w, eps = [0.25, 0.75], 0.1
    floor = eps * (fishers[0]["w"].mean() + fishers[1]["w"].mean()) / 2
    g = [wi * (f["w"] + floor) for f, wi in zip(fishers, w)]
    expect = seed["w"] + (g[0] * deltas[0]["w"] + g[1] * deltas[1]["w"]) / (g[0] + g[1])
    torch.testing.assert_close(fm.fisher_merge(seed, deltas, fishers, w, eps)["w"], expect)


def test_power_sharpens_the_fisher():
    seed = {"w": _rand(0)}
    deltas = [{"w": _rand(1)}, {"w": _rand(2)}]
    fishers = [{"w": _rand(3).abs()}, {"w": _rand(4).abs()}]
    w, eps = [0.5, 0.5], 0.01
    squared = [{"w": f["w"].square()} for f in fishers]
    torch.testing.assert_close(
        fm.fisher_merge(seed, deltas, fishers, w, eps, power=2.0)["w"],
        fm.fisher_merge(seed, deltas, squared, w, eps)["w"],
    )
    with pytest.raises(ValueError, match="power"):
        fm.fisher_merge(seed, deltas, fishers, w, eps, power=0.0)


def test_the_unit_whose_data_cares_keeps_its_move():
    """Where only unit 0's Fisher is large, the merge keeps unit 0's displacement (not
    half of it); where both are equal, it is the plain average."""
    seed = {"w": torch.zeros(2)}
    deltas = [{"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([-1.0, 3.0])}]
    fishers = [{"w": torch.tensor([1e4, 1.0])}, {"w": torch.tensor([0.0, 1.0])}]
    out = fm.fisher_merge(seed, deltas, fishers, [0.5, 0.5], eps=1e-6)["w"]
    assert out[0].item() == pytest.approx(1.0, abs=1e-3)
    assert out[1].item() == pytest.approx(2.0, abs=1e-3)


def test_scale_free_and_buffers_plain():
    seed = {"w": _rand(0), "buf": torch.ones(2)}
    deltas = [{"w": _rand(1), "buf": torch.ones(2)}, {"w": _rand(2), "buf": 3 * torch.ones(2)}]
    fishers = [{"w": _rand(3).abs()}, {"w": _rand(4).abs()}]
    a = fm.fisher_merge(seed, deltas, fishers, [0.5, 0.5], 0.01)
    scaled = [{"w": 7.0 * f["w"]} for f in fishers]
    b = fm.fisher_merge(seed, deltas, scaled, [0.5, 0.5], 0.01)
    torch.testing.assert_close(a["w"], b["w"])
    torch.testing.assert_close(a["buf"], torch.full((2,), 3.0))  # no Fisher: plain average


def test_all_zero_fisher_falls_back_to_the_average():
    seed = {"w": torch.zeros(3)}
    deltas = [{"w": torch.ones(3)}, {"w": 3 * torch.ones(3)}]
    zero = {"w": torch.zeros(3)}
    out = fm.fisher_merge(seed, deltas, [zero, zero], [0.5, 0.5], 0.01)["w"]
    torch.testing.assert_close(out, torch.full((3,), 2.0))


@pytest.mark.parametrize(
    "weights, eps, match",
    [([0.5, 0.6], 0.01, "sum to 1"), ([1.0, 0.0], 0.01, "positive"), ([0.5, 0.5], 0.0, "eps")],
)
def test_merge_refuses_bad_arguments(weights, eps, match):
    seed = {"w": torch.zeros(2)}
    d = [{"w": torch.ones(2)}, {"w": torch.ones(2)}]
    with pytest.raises(ValueError, match=match):
        fm.fisher_merge(seed, d, d, weights, eps)


class _TinyLM(torch.nn.Module):
    """Embedding + linear head; ``model(inputs, labels)`` is the mean token loss."""

    def __init__(self, vocab: int = 11, dim: int = 5):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = torch.nn.Parameter(torch.randn(vocab, dim, generator=g))
        self.head = torch.nn.Parameter(torch.randn(vocab, dim, generator=g))

    def forward(self, inputs, labels):
        logits = self.embed[inputs] @ self.head.T
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())


def test_empirical_fisher_is_the_mean_squared_per_sequence_gradient():
    model = _TinyLM()
    seqs = [
        torch.randint(0, 11, (7,), generator=torch.Generator().manual_seed(i)) for i in range(5)
    ]
    expect = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for s in seqs:
        model.zero_grad()
        model(s[None, :-1], s[None, 1:]).backward()
        for n, p in model.named_parameters():
            expect[n] += p.grad.square() / len(seqs)
    got = fm.empirical_fisher(model, iter(seqs), batch=1)
    for n in expect:
        torch.testing.assert_close(got[n], expect[n])
    # batch 2 over 5 sequences: batches of 2, 2, 1, each its mean loss's gradient squared
    expect2 = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for group in (seqs[0:2], seqs[2:4], seqs[4:5]):
        model.zero_grad()
        t = torch.stack(group)
        model(t[:, :-1], t[:, 1:]).backward()
        for n, p in model.named_parameters():
            expect2[n] += p.grad.square() / 3
    got2 = fm.empirical_fisher(model, seqs, batch=2)
    for n in expect2:
        torch.testing.assert_close(got2[n], expect2[n])
    assert all(p.grad is None for p in model.parameters())  # leaves no gradients behind


def test_empirical_fisher_stops_on_a_non_finite_loss():
    model = _TinyLM()
    with torch.no_grad():
        model.head[0, 0] = math.inf
    seqs = [torch.zeros(4, dtype=torch.long)]
    with pytest.raises(NonFiniteError, match="batch 0"):
        fm.empirical_fisher(model, seqs)
    with pytest.raises(ValueError, match="no sequences"):
        fm.empirical_fisher(_TinyLM(), [])


def test_file_round_trip_and_checks(tmp_path):
    f = {"w": _rand(0).abs(), "b": _rand(1, (4,)).abs()}
    shapes = {k: v.shape for k, v in f.items()}
    path = fm.fisher_path(str(tmp_path), 512, 1)
    assert path.endswith("fisher-s512-b1.safetensors")
    fm.save_fisher(path, f, {"model_sha256": "abc", "sequences": 512})
    assert fm.read_fisher_meta(path)["sequences"] == 512
    got = fm.load_fisher(path, "abc", shapes)
    for k in f:
        torch.testing.assert_close(got[k], f[k])
    with pytest.raises(DataFormatError, match="other weights .*not abc2"):
        fm.load_fisher(path, "abc2", shapes)
    with pytest.raises(DataFormatError, match="missing"):
        fm.load_fisher(path, "abc", {**shapes, "extra": torch.Size([1])})
    with pytest.raises(DataFormatError, match="shape"):
        fm.load_fisher(path, "abc", {"w": torch.Size([4, 3]), "b": torch.Size([4])})
    # a safetensors file that is not ours, and a file that is not safetensors
    from safetensors.torch import save_file

    other = str(tmp_path / "other.safetensors")
    save_file(f, other, metadata={"format": "pt"})
    assert fm.read_fisher_meta(other) is None
    with pytest.raises(DataFormatError, match="not a Fisher file"):
        fm.load_fisher(other, "abc", shapes)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}")
    assert fm.read_fisher_meta(str(junk)) is None
    with pytest.raises(NonFiniteError, match="w"):
        fm.save_fisher(str(tmp_path / "bad.safetensors"), {"w": -f["w"]}, {"model_sha256": "a"})
    assert not (tmp_path / "bad.safetensors").exists()
    assert json.loads(json.dumps(fm.read_fisher_meta(path)))["model_sha256"] == "abc"
