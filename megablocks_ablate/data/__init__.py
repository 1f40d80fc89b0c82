"""Data pipeline: tokenizers, Megatron-compatible indexed binaries, preprocessing into
partitions and base units, decontamination, packed samples and mixtures."""
