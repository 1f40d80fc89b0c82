"""The GPU suite's rows: what each runs, needs, measures, and how long it may take.

One table, read by the runner (``suite.py``: order, arguments, time slices), the
preflight (``preflight.py``: what each row needs, so it can say before anything runs
which rows will run and which are skipped, and why) and the tests. Nothing here imports
torch or ``megablocks_ablate``.

Time: ``budget_s`` is the row's timeout in the default run (``--budget-s 480`` on one
H100, set-up and preflight included). The runner shares out what is left after the
preflight in proportion to these budgets (so a smaller ``--budget-s`` shrinks every
slice, and rerunning a few rows with ``--rows`` gives them more), and a row may also
use what the rows before it left unused. Each row runs under ``timeout``; docs/
benchmarks.md ("GPU suite rows") lists them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Imported by every row through the package (megablocks_ablate/__init__, config, utils).
PACKAGE = ["megablocks_ablate", "numpy", "yaml", "tqdm"]
# The training path: data (JSONL .zst reader, SentencePiece for the demo tokenizer),
# checkpoints (safetensors).
TRAIN = [*PACKAGE, "safetensors", "zstandard", "sentencepiece"]
EVAL = [*PACKAGE, "safetensors", "zstandard"]
PREFLIGHT_TIMEOUT_S = 45.0  # the preflight's own `timeout` (it normally takes 5-20 s)
SETUP_RESERVE_S = 10.0  # finding Python, starting the runner, writing the reports


@dataclass
class RowSpec:
    name: str
    script: str  # benchmarks/gpu/<script>
    budget_s: float  # its timeout in the default 480 s run (share of what is left)
    args: list[str] = field(default_factory=list)  # a real run's arguments
    dry_args: list[str] = field(default_factory=list)  # with --dry-run: tiny sizes
    what: str = ""  # what it measures (docs table)
    target: str = "-"  # what "met" means (docs table)
    switch: str = "-"  # options that change what it does (docs table)
    cuda: bool = True  # a real run needs torch.cuda.is_available()
    min_gpus: int = 1  # a real run needs this many visible GPUs
    modules: list[str] = field(default_factory=list)  # must import, else skipped
    optional: list[str] = field(default_factory=list)  # used when they import
    tools: list[str] = field(default_factory=list)  # commands on PATH, else skipped
    uses_ext: bool = False  # measures _C_cuda when build_ext built it (else says why not)

    @property
    def timeout_text(self) -> str:
        return f"{self.budget_s:.0f} s"


DRY_TRAIN = ["--preset", "tiny_seed", "--model-override", "vocab_size=1024", "--steps", "5"]
DRY_TRAIN += ["--skip", "2"]
# the throughput switches timed as variants of train_1.1b (each against the row's own run)
SWITCH_VARIANTS = ["--variant", "inproj_buffer:MBA_INPROJ_GRAD=buffer"]
SWITCH_VARIANTS += ["--variant", "rs_every_mb:distributed.fsdp_reduce_every_micro_batch=true"]
ROWS = [
    RowSpec(
        "env",
        "env_info.py",
        10,
        what="GPU(s), torch/CUDA, module versions, nvcc; fails when CUDA is unavailable",
        cuda=False,  # runs without CUDA too: it records the machine, and fails saying why
        min_gpus=0,
        modules=["megablocks_ablate"],
    ),
    RowSpec(
        "build_ext",
        "build_ext.py",
        55,
        what="builds `_C_cuda` from a temp dir (torch JIT `cpp_extension.load`, else one "
        "nvcc command), installs it into the package, checks a merge on the GPU",
        target="imports and merges",
        switch="`--dry-run`: nvcc build into the work dir, nothing installed",
        modules=[],
        tools=["nvcc"],
        optional=["ninja"],
    ),
    RowSpec(
        "merge_kernels",
        "merge_kernels.py",
        25,
        [],
        ["--params", "40000", "--reps", "1"],
        what="(a) CUDA and Triton merge kernels, N = 2/8 fp32 and 32 bf16 inputs of a "
        "130m-sized vector, GB/s vs the copy bandwidth; each case timed with "
        "`MBA_MERGE_VEC=off` and `auto`",
        target=">= 70 % of copy bandwidth (auto); auto >= off for 32 bf16",
        switch="`MBA_MERGE_VEC=auto|off` (default auto, both timed); CUDA half skipped (with "
        "build_ext's reason) when `_C_cuda` did not build",
        modules=PACKAGE,
        optional=["triton"],
        uses_ext=True,
    ),
    RowSpec(
        "triton_kernels",
        "triton_kernels.py",
        40,
        [],
        ["--reps", "1", "--warmup", "0"],
        what="(b) every Triton kernel, fwd and bwd, vs its PyTorch reference against fp32 "
        "truth at the 130m and 1.1b shapes (bf16), and past 2^31 elements where the free "
        "memory allows (else skipped, need and free recorded); speed at 1.1b. "
        "**Fails** on an inaccurate kernel",
        target="every kernel accurate (error <= 2x the reference's + 2^-8)",
        switch="`--presets`, `--large on/off`, `--dtype float32`",
        modules=[*PACKAGE, "triton"],
    ),
    RowSpec(
        "attention",
        "attention_backends.py",
        15,
        [],
        ["--reps", "1", "--warmup", "0"],
        what="(g) every attention backend that runs here (auto, sdpa, cudnn, flash2, fa3, "
        "math) at the 130m and 1.1b micro batches, bf16: fwd+bwd ms, error vs fp32 math; "
        "**fails** on an inaccurate one",
        target="auto >= sdpa's speed",
        switch="`MBA_ATTENTION=auto|sdpa|math|cudnn|flash2|fa3` (default auto)",
        modules=PACKAGE,
        optional=["flash_attn", "flash_attn_interface"],
    ),
    RowSpec(
        "ce_chunks",
        "ce_chunks.py",
        15,
        [],
        ["--reps", "1", "--warmup", "0"],
        what="(h) fused linear + cross-entropy, chunks and warps from the shapes vs the "
        "fixed rule, 130m x 16 and 1.1b x 4/x 8 sequences: fwd+bwd ms, both checked "
        "against fp32 full logits; **fails** when inaccurate",
        target="auto >= legacy's speed at 1.1b x 4",
        switch="`MBA_CE_CHUNKS=auto|legacy` (default auto)",
        modules=[*PACKAGE, "triton"],
    ),
    RowSpec(
        "train_130m",
        "train_step.py",
        30,
        ["--name", "train_130m", "--preset", "130m_seed", "--data-cache", "{workdir}/data"],
        ["--name", "train_130m", *DRY_TRAIN, "--data-cache", "{workdir}/data"],
        what="(c) tokens/s and MFU of `train()` from `130m_seed` as it is (seq 2048, bf16), "
        "12 steps x 2 micro batches",
        switch="`--override`, `--variant NAME:KEY=VALUE` (`KEY` = `MBA_*`: environment)",
        modules=TRAIN,
        optional=["triton", "flash_attn"],
    ),
    RowSpec(
        "train_1.1b",
        "train_step.py",
        100,
        ["--name", "train_1.1b", "--preset", "1.1b_seed", "--target-mfu", "0.45"]
        + [*SWITCH_VARIANTS, "--variant-steps", "8", "--data-cache", "{workdir}/data"],
        ["--name", "train_1.1b", *DRY_TRAIN, "--override", "distributed.parallel=fsdp"]
        + ["--variant", "ac_full:activation_checkpointing=full", *SWITCH_VARIANTS]
        + ["--variant-steps", "4", "--target-mfu", "0.45", "--data-cache", "{workdir}/data"],
        what="(c) the same from `1.1b_seed` (micro batch 4 x 2): FSDP2 in a one-rank NCCL "
        "group (device cuda:0); variants `inproj_buffer` (one in-projection gradient "
        "buffer) and `rs_every_mb` (reduce-scatter per micro batch): tokens/s and peak "
        "memory against the row's own run",
        target="MFU >= 45 %; each variant's tokens/s >= the default's",
        switch="`MBA_INPROJ_GRAD=autograd|buffer`, `distributed.fsdp_reduce_every_micro_batch`"
        "; `--override`, `--variant NAME:KEY=VALUE` (`KEY` = `MBA_*`: environment)",
        modules=TRAIN,
        optional=["triton", "flash_attn"],
    ),
    RowSpec(
        "train_1.1b_compile",
        "train_step.py",
        45,
        ["--name", "train_1.1b_compile", "--preset", "1.1b_seed", "--model-override"]
        + ["compile=true", "--skip", "4", "--variant", "compile_init:MBA_COMPILE_ORDER=model_init"]
        + ["--baseline-row", "train_1.1b", "--data-cache", "{workdir}/data"],
        ["--name", "train_1.1b_compile", *DRY_TRAIN, "--model-override", "compile=true"]
        + ["--override", "distributed.parallel=fsdp", "--variant"]
        + ["compile_init:MBA_COMPILE_ORDER=model_init", "--variant-steps", "4"]
        + ["--baseline-row", "train_1.1b", "--data-cache", "{workdir}/data"],
        what="(c) `1.1b_seed` with `compile=true`: blocks compiled before `fully_shard` "
        "(default) and at model build (`compile_init` variant) against eager `train_1.1b`",
        target="tokens/s >= eager's",
        switch="`compile=true`, `MBA_COMPILE_ORDER=before_shard|model_init` (default before_shard)",
        modules=TRAIN,
        optional=["triton", "flash_attn"],
    ),
    RowSpec(
        "train_1.1b_mb8",
        "train_step.py",
        25,
        ["--name", "train_1.1b_mb8", "--preset", "1.1b_seed_mb8", "--accum", "1"]
        + ["--baseline-row", "train_1.1b", "--baseline-variant", "mb4:micro_batch=4"]
        + ["--data-cache", "{workdir}/data"],
        ["--name", "train_1.1b_mb8", *DRY_TRAIN, "--override", "distributed.parallel=fsdp"]
        + ["--micro-batch", "16", "--accum", "1", "--baseline-row", "train_1.1b"]
        + ["--baseline-variant", "mb8:micro_batch=8", "--data-cache", "{workdir}/data"],
        what="(c) `1.1b_seed_mb8`: micro batch 8 x 1 against `train_1.1b`'s 4 x 2 (same "
        "tokens per optimizer step, same suite run): tokens/s, MFU, peak memory",
        target="tokens/s >= micro batch 4's",
        switch="preset `1.1b_seed_mb8` (or `micro_batch=8`); default stays 4",
        modules=TRAIN,
        optional=["triton", "flash_attn"],
    ),
    RowSpec(
        "eval",
        "eval_rate.py",
        35,
        [],
        ["--presets", "tiny", "--tokens", "3000", "--rounds", "1", "--batch-tokens", "1024"],
        what="(d) `evaluate()` tokens/s, 130m and 1.1b, bf16; vs transformers' Cohere "
        "model (weights loaded strictly) when it imports: **fails** when the mean NLL "
        "differs by > 2^-8 relative (bf16) or fp32 per-token NLL by > 1e-3 max / 1e-4 RMS",
        target="ours >= transformers",
        switch="`--transformers auto/on/off`, `--check-tokens`",
        modules=EVAL,
        optional=["transformers"],
    ),
    RowSpec(
        "merge_eval",
        "merge_eval.py",
        20,
        [],
        ["--preset", "tiny", "--units", "3", "--mixtures", "3", "--eval-tokens", "2000"]
        + ["--batch-tokens", "1024"],
        what="(e) the study runner's in-memory merge-eval rate: 8 units of 130m on the GPU, "
        "merge + evaluate per mixture",
        modules=EVAL,
        optional=["triton"],
    ),
    RowSpec(
        "nccl",
        "nccl_allreduce.py",
        10,
        [],
        ["--sizes-mb", "1", "--reps", "2"],
        what="(f) NCCL all-reduce bus bandwidth over every GPU (one process per GPU)",
        switch="`--dry-run`: gloo, 2 CPU processes",
        min_gpus=2,
    ),
]
BY_NAME = {r.name: r for r in ROWS}
TOTAL_BUDGET_S = sum(r.budget_s for r in ROWS)  # 425: + preflight + set-up = 480


def skipped_when(r: RowSpec) -> str:
    """When the preflight skips ``r`` in a real run (docs table)."""
    why = []
    if r.cuda:
        why.append("no CUDA")
    if r.min_gpus > 1:
        why.append(f"< {r.min_gpus} GPUs")
    if "nvcc" in r.tools:
        why.append("no nvcc or Python.h")
    extra = [m for m in r.modules if m not in PACKAGE]
    if extra:
        why.append(f"{' or '.join(extra)} not importable")
    return "; ".join(why) or "never"


def docs_table() -> str:
    """The Markdown table of docs/benchmarks.md ("GPU suite rows"): ``python rows.py``."""
    lines = [
        "| row | what it measures | target | switch | skipped when | timeout |",
        "|---|---|---|---|---|---:|",
    ]
    for r in ROWS:
        lines.append(
            f"| `{r.name}` | {r.what} | {r.target} | {r.switch} | {skipped_when(r)} "
            f"| {r.timeout_text} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(docs_table())
