"""Compile every Triton kernel to a CUDA binary (sm_90) without a GPU.

The interpreter that the other kernel tests use accepts some programs the real
compiler rejects (types of loop-carried values, constexpr misuse); this runs the real
pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin, ptxas ships with triton) in a
subprocess, where TRITON_INTERPRET is unset.
"""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration  # compiles kernels for sm_90 in a subprocess

pytest.importorskip("triton")  # optional dependency; the interpreter tests need it too

SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from megablocks_ablate.kernels import cross_entropy as ce, norm, rope, swiglu

def compile_(fn, sig, consts):
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
    assert k.asm["cubin"], fn

t = "*bf16"
for is_ln in (True, False):
    compile_(norm._norm_fwd_kernel, {"X": t, "W": t, "Y": t, "Mean": "*fp32", "Rstd": "*fp32", "N": "i32",
             "w_rows": "i32", "eps": "fp32", "IS_LN": "constexpr", "BLOCK": "constexpr"},
             {"IS_LN": is_ln, "BLOCK": 1024})
    compile_(norm._norm_bwd_kernel, {"X": t, "W": t, "DY": t, "DX": t, "DW_partial": "*fp32", "Mean": "*fp32",
             "Rstd": "*fp32", "n_rows": "i32", "N": "i32", "w_rows": "i32", "n_programs": "i32",
             "IS_LN": "constexpr", "BLOCK": "constexpr"}, {"IS_LN": is_ln, "BLOCK": 2048})
compile_(rope._rope_kernel, {"X": t, "Y": t, "Cos": "*fp32", "Sin": "*fp32", "T": "i32", "H": "i32",
         "stride_b": "i32", "stride_t": "i32", "stride_h": "i32", "ystride_b": "i32", "ystride_t": "i32",
         "ystride_h": "i32", "sign": "fp32", "HALF": "constexpr",
         "BLOCK_H": "constexpr", "BLOCK_D": "constexpr"}, {"HALF": 64, "BLOCK_H": 32, "BLOCK_D": 64})
compile_(swiglu._swiglu_fwd_kernel, {"GU": t, "OUT": t, "M": "i32", "stride_row": "i32", "BLOCK": "constexpr"},
         {"BLOCK": 1024})
compile_(swiglu._swiglu_bwd_kernel, {"GU": t, "DOUT": t, "DGU": t, "M": "i32", "stride_row": "i32",
         "stride_drow": "i32", "BLOCK": "constexpr"}, {"BLOCK": 1024})
for grad in (False, True):
    compile_(ce._ce_chunk_kernel, {"Logits": t, "Labels": "*i64", "Nll": "*fp32", "V": "i32", "stride_row": "i32",
             "scale": "fp32", "ignore_index": "i32", "GRAD": "constexpr", "BLOCK": "constexpr"},
             {"GRAD": grad, "BLOCK": 4096})
print("compiled")
"""


def test_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
