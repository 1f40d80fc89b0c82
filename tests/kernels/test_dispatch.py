"""The single backend switch: MBA_KERNELS parsing and per-tensor choice."""

import pytest
import torch

from megablocks_ablate.errors import ConfigError
from megablocks_ablate.kernels import dispatch


@pytest.fixture(autouse=True)
def _restore_backend():
    yield
    dispatch.set_backend(None)


def test_env_selects_backend(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.setenv("MBA_KERNELS", "reference")
    dispatch.set_backend(None)
    assert dispatch.configured_backend() == "reference" and not dispatch.use_triton(cpu)
    monkeypatch.setenv("MBA_KERNELS", "auto")
    dispatch.set_backend(None)
    assert not dispatch.use_triton(cpu)  # auto: Triton only for CUDA tensors
    monkeypatch.setenv("MBA_KERNELS", "triton")
    dispatch.set_backend(None)
    assert dispatch.use_triton(cpu)  # the test session runs with TRITON_INTERPRET=1


def test_bad_env_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("MBA_KERNELS", "fast")
    dispatch.set_backend(None)
    with pytest.raises(ConfigError, match="MBA_KERNELS"):
        dispatch.configured_backend()


def test_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with dispatch.kernel_backend("triton"):
        with pytest.raises(ConfigError, match="TRITON_INTERPRET"):
            dispatch.use_triton(torch.zeros(1))


def test_context_manager_restores(monkeypatch):
    monkeypatch.setenv("MBA_KERNELS", "reference")
    dispatch.set_backend(None)
    with dispatch.kernel_backend("triton"):
        assert dispatch.configured_backend() == "triton"
    assert dispatch.configured_backend() == "reference"


def test_ops_route_to_the_chosen_implementation(monkeypatch):
    calls = []
    monkeypatch.setattr(
        dispatch._swiglu, "swiglu_triton", lambda x: calls.append("triton") or x[..., :1]
    )
    monkeypatch.setattr(
        dispatch._swiglu, "swiglu_reference", lambda x: calls.append("ref") or x[..., :1]
    )
    x = torch.randn(2, 4)
    with dispatch.kernel_backend("triton"):
        dispatch.swiglu(x)
    with dispatch.kernel_backend("reference"):
        dispatch.swiglu(x)
    assert calls == ["triton", "ref"]
