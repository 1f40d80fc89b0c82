"""Row ``env``: what the suite runs on (GPU, torch, CUDA, Triton, flash-attn, compilers).

Fails only when torch does not import, or (outside a dry run) CUDA is not available:
then every later row would fail for the same reason, and this row says why first.
Missing optional pieces (flash-attn, transformers, nvcc, ninja) are listed, not fatal.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
import sys

from common import parser, run_row

# Imported by the package or by the rows at run time; a missing one explains a failure.
REQUIRED = ["numpy", "yaml", "safetensors", "sentencepiece", "tokenizers", "zstandard", "tqdm"]
OPTIONAL = ["triton", "flash_attn", "flash_attn_interface", "transformers", "pybind11"]
OPTIONAL += ["ninja", "psutil"]


# Imported to check they work (a flash-attn built for another torch fails here); the
# others are only looked up, since importing transformers alone takes seconds.
IMPORT_CHECKED = {"triton", "flash_attn", "flash_attn_interface", "megablocks_ablate"}
DISTRIBUTIONS = {"yaml": "pyyaml", "flash_attn": "flash-attn"}


def _version(module: str) -> str | None:
    if module not in IMPORT_CHECKED:
        if importlib.util.find_spec(module) is None:
            return None
        try:
            return importlib.metadata.version(DISTRIBUTIONS.get(module, module))
        except importlib.metadata.PackageNotFoundError:
            return "present"
    try:
        m = importlib.import_module(module)
    except Exception as e:  # a broken install is as good as absent, and says why
        return None if isinstance(e, ImportError) else f"broken: {type(e).__name__}: {e}"
    return str(getattr(m, "__version__", "present"))


def _nvcc() -> str | None:
    path = shutil.which("nvcc")
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[-1]
    except (OSError, subprocess.SubprocessError, IndexError):
        return path


def body(args) -> dict:
    import torch

    info = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "devices": [],
        "nvcc": _nvcc(),
        "modules": {m: _version(m) for m in REQUIRED + OPTIONAL},
        "env": {
            k: os.environ.get(k)
            for k in (
                "TRITON_INTERPRET",
                "MBA_KERNELS",
                "MBA_ATTENTION",
                "MBA_CE_CHUNKS",
                "CUDA_VISIBLE_DEVICES",
                "TORCH_CUDA_ARCH_LIST",
            )
        },
    }
    for i in range(info["device_count"]):
        p = torch.cuda.get_device_properties(i)
        info["devices"].append(
            {
                "name": p.name,
                "memory_gib": round(p.total_memory / 2**30, 1),
                "capability": f"{p.major}.{p.minor}",
                "sms": p.multi_processor_count,
            }
        )
    missing = [m for m in REQUIRED if info["modules"][m] is None]
    try:
        import megablocks_ablate  # noqa: F401

        info["package_import"] = "ok"
    except Exception as e:
        info["package_import"] = f"{type(e).__name__}: {e}"
    gpu = f"{info['device_count']} x {info['devices'][0]['name']}" if info["devices"] else "no GPU"
    text = f"{gpu}, torch {info['torch']} (CUDA {info['torch_cuda']})"
    out = {"key": {"name": "devices", "value": info["device_count"], "unit": "GPUs", "text": text}}
    out["details"] = info
    problems = []
    if not args.dry_run and not info["cuda_available"]:
        problems.append("torch.cuda.is_available() is False: every GPU row will fail")
    if missing:
        problems.append(f"required modules missing: {', '.join(missing)}")
    if info["package_import"] != "ok":
        problems.append(f"megablocks_ablate does not import: {info['package_import']}")
    if problems:
        out.update(status="failed", reason="; ".join(problems))
    return out


if __name__ == "__main__":
    sys.exit(run_row("env", parser(__doc__.split("\n\n")[0]), body))
