"""The file merge's streaming core: the raw C++ kernel path (``merge_raw``) with its
fused NaN/inf flag, chunk boundaries, dtypes, unaligned inputs, the torch fallback,
and errors from the background writer."""

from __future__ import annotations

import io
import os

import pytest
import torch
from merge_fixtures import write_family

from megablocks_ablate import _ext
from megablocks_ablate.checkpoint import (
    Lineage,
    load_model_checkpoint,
    write_checkpoint_meta,
)
from megablocks_ablate.checkpoint.safetensors_io import SafetensorsStreamWriter
from megablocks_ablate.kernels.dispatch import kernel_backend
from megablocks_ablate.merge import file_merge
from megablocks_ablate.merge.file_merge import merge_checkpoints
from megablocks_ablate.merge.kernels import merge_into, merge_raw
from megablocks_ablate.merge.spec import MergeSpec

NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
DTYPES = list(NAMES)
pytestmark = pytest.mark.skipif(_ext.cpp is None, reason="needs the C++ extension")


def _raw(out: torch.Tensor, xs: list[torch.Tensor], ws: list[float]) -> bool:
    return merge_raw(
        out.data_ptr(), NAMES[out.dtype], [x.data_ptr() for x in xs],
        [NAMES[x.dtype] for x in xs], ws, out.numel(),
    )  # fmt: skip


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 4095, 4097, 12_345])
def test_merge_raw_equals_reference_bitwise(out_dtype, n):
    g = torch.Generator().manual_seed(n)
    xs = [torch.randn(n, generator=g).to(DTYPES[i % 3]) for i in range(5)]  # mixed dtypes
    ws = [0.3, -0.2, 0.5, 0.25, 0.15]
    got = torch.empty(n, dtype=out_dtype)
    assert _raw(got, xs, ws) is True
    want = merge_into(torch.empty(n, dtype=out_dtype), xs, ws, backend="reference")
    assert torch.equal(got, want)


@pytest.mark.parametrize("out_dtype", DTYPES)
def test_merge_raw_flags_non_finite_anywhere(out_dtype):
    n = 4096 * 3 + 5
    for where in (0, 4095, 4096, n - 1):  # block edges and the tail
        for bad in (float("nan"), float("inf"), -float("inf")):
            x = torch.randn(n)
            x[where] = bad
            assert _raw(torch.empty(n, dtype=out_dtype), [torch.randn(n), x], [0.5, 0.5]) is False
            # a zero weight means the input is not read at all
            assert _raw(torch.empty(n, dtype=out_dtype), [torch.randn(n), x], [1, 0]) is True
    big = torch.full((n,), 60000.0)  # finite in fp16, but 2 * 60000 is not
    assert _raw(torch.empty(n, dtype=torch.float16), [big, big], [1, 1]) is False
    assert _raw(torch.empty(n, dtype=out_dtype), [big, big], [0.5, 0.5]) is True


def test_merge_raw_refuses_bad_arguments():
    x = torch.randn(8)
    with pytest.raises(ValueError, match="every weight is zero"):
        _raw(torch.empty(8), [x, x], [0.0, 0.0])
    with pytest.raises(ValueError, match="weight 1 is inf"):
        _raw(torch.empty(8), [x, x], [1.0, float("inf")])
    with pytest.raises(TypeError, match="dtype 'F64'"):
        merge_raw(torch.empty(8).data_ptr(), "F64", [x.data_ptr()], ["F32"], [1.0], 8)
    with pytest.raises(ValueError, match="2 inputs but 1 weights"):
        _raw(torch.empty(8), [x, x], [1.0])


def _spec(ckpts, **mixture) -> MergeSpec:
    return MergeSpec.from_dict({"checkpoints": ckpts, **mixture}, source="test.yaml")


def _reference(ckpts, ws, dtype=None):
    """Per tensor, the reference kernel's weighted sum (the C++ kernel is bitwise equal)."""
    states = [load_model_checkpoint(p)[0] for p in ckpts.values()]
    out = {}
    for k, v in states[0].items():
        o = torch.empty(v.shape, dtype=dtype or v.dtype)
        out[k] = merge_into(o, [s[k] for s in states], ws, backend="reference")
    return out


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out", [None, "fp32", "bf16", "fp16"])
def test_file_merge_equals_reference_at_any_chunking(tmp_path, in_dtype, out):
    _, ckpts = write_family(str(tmp_path / "fam"), dtype=in_dtype)
    spec = _spec(ckpts, weights={"cs_0": 1, "cs_1": 2, "bio_0": 5})
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(out)
    want = _reference(ckpts, [1 / 8, 2 / 8, 5 / 8], dt)
    for chunk in (1, 7, 240, 4097, file_merge.CHUNK):  # 240: up.weight exactly, 20 x 12
        d = str(tmp_path / f"m{chunk}")
        merge_checkpoints(spec, d, dtype=out, chunk=chunk, show_progress=False)
        got = load_model_checkpoint(d)[0]
        assert set(got) == set(want)
        assert all(torch.equal(got[k], want[k]) for k in want), chunk


def test_torch_fallback_path_is_bitwise_equal(family, tmp_path):
    _, ckpts = family
    spec = _spec(ckpts, uniform=True)
    merge_checkpoints(spec, str(tmp_path / "raw"), chunk=7, show_progress=False)
    with kernel_backend("reference"):
        merge_checkpoints(spec, str(tmp_path / "ref"), chunk=7, show_progress=False)
    a, b = (load_model_checkpoint(str(tmp_path / d))[0] for d in ("raw", "ref"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _unaligned_checkpoint(d: str, tensors: dict[str, torch.Tensor]) -> None:
    """A hand-made safetensors file whose data section starts at an odd offset."""
    os.makedirs(d)
    aligned = io.BytesIO()
    w = SafetensorsStreamWriter(aligned, [(k, t.dtype, list(t.shape)) for k, t in tensors.items()])
    n = int.from_bytes(aligned.getvalue()[:8], "little")
    raw = aligned.getvalue()[8 : 8 + n].rstrip()
    raw += b" " * ((len(raw) % 2) ^ 1)  # odd length: the data starts at an odd offset
    with open(os.path.join(d, "model.safetensors"), "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name in w.order:
            f.write(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    lin = Lineage(kind="unit", seed_hash="0" * 64, units=["u"], weights=[1.0], tokens_seen=1)
    write_checkpoint_meta(d, {"hidden": 3}, lin)


def test_unaligned_inputs_and_integer_tensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    units = {}
    for i in range(2):
        t = {
            "a": torch.randn(3001, generator=g),
            "b": torch.randn(17, generator=g).bfloat16(),
            "steps": torch.arange(5, dtype=torch.int64),
        }
        _unaligned_checkpoint(str(tmp_path / f"u{i}"), t)
        units[f"u{i}"] = (str(tmp_path / f"u{i}"), t)
    spec = _spec({u: p for u, (p, _) in units.items()}, uniform=True)
    merge_checkpoints(spec, str(tmp_path / "m"), chunk=1000, show_progress=False)
    got = load_model_checkpoint(str(tmp_path / "m"))[0]
    (_, t0), (_, t1) = units.values()
    for k in ("a", "b"):
        want = merge_into(torch.empty_like(t0[k]), [t0[k], t1[k]], [0.5, 0.5], backend="reference")
        assert torch.equal(got[k], want)
    assert torch.equal(got["steps"], t0["steps"])


def test_writer_error_stops_the_merge_and_leaves_nothing(family, tmp_path, monkeypatch):
    _, ckpts = family
    calls = []
    write = SafetensorsStreamWriter.write_bytes

    def failing(self, data):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        write(self, data)

    monkeypatch.setattr(SafetensorsStreamWriter, "write_bytes", failing)
    out = str(tmp_path / "merged")
    with pytest.raises(OSError, match="No space left"):
        merge_checkpoints(_spec(ckpts, uniform=True), out, chunk=7, show_progress=False)
    assert not os.path.exists(out)
    assert [p for p in os.listdir(tmp_path) if p.startswith(".merged")] == []


def test_kernel_threads_leave_a_core_to_the_writer():
    n = file_merge.kernel_threads()
    assert 1 <= n <= 8 and n <= max(1, (os.cpu_count() or 1) - 1)


def test_benchmark_output_agreement_helper(tmp_path):
    """benchmarks/merge.py --vs-mergekit compares the two tools' outputs with this."""
    import importlib.util

    from safetensors.torch import save_file

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location("bench_merge", f"{root}/benchmarks/merge.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    a = {"x": torch.zeros(3, 2), "y": torch.ones(4), "only_a": torch.zeros(1)}
    b = {"x": torch.zeros(3, 2), "y": torch.tensor([1.0, 1.0, 1.5, 1.0])}
    save_file(a, str(tmp_path / "a.safetensors"))
    os.makedirs(tmp_path / "shards")
    save_file({"x": b["x"]}, str(tmp_path / "shards" / "model-00001-of-00002.safetensors"))
    save_file({"y": b["y"]}, str(tmp_path / "shards" / "model-00002-of-00002.safetensors"))
    got = bench.compare_outputs(str(tmp_path / "a.safetensors"), str(tmp_path / "shards"))
    assert got["tensors_compared"] == 2 and got["only_in_first"] == ["only_a"]
    assert got["max_abs_diff"] == 0.5 and got["max_abs_diff_tensor"] == "y"
