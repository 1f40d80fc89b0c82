"""Training: seed, unit and seq models, single process or data parallel, exact resume.

* ``config``: :class:`TrainConfig` (YAML presets in ``configs/train/``).
* ``trainer``: :func:`train`, the loop (DDP / FSDP2, grad accumulation, bf16 on CUDA).
* ``data``: the data spec (unit, weighted units, partition mixture) -> MixtureDataset.
* ``optim``: AdamW and the warmup + cosine/linear decay schedule.
* ``distributed``: one init for torchrun, mpiexec (mpi4py) and Slurm.
* ``checkpoint``: the model-checkpoint contract (safetensors + config.json + lineage.json)
  shared by training, merging and Hugging Face export/import.
* ``state``: resumable checkpoints (optimizer, RNG, trainer state) around it.
* ``metrics``: JSONL metrics, TensorBoard / W&B when installed.
* ``pool``: the local launcher training one unit model per device.
"""
