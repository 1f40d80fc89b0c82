"""Training: trainer, distributed init, optimizer/schedule, and checkpoint I/O.

`checkpoint` holds the model-checkpoint contract (safetensors + config.json +
lineage.json) shared by training, merging and Hugging Face export/import.
"""
