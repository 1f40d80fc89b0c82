"""The decoder: config presets (:mod:`.config`), one module for every family
(:mod:`.transformer`: parallel or sequential blocks by config), and the exact Hugging
Face mappings for Cohere, Llama and GPT-NeoX (:mod:`.hf`)."""

from megablocks_ablate.model.config import ModelConfig

__all__ = ["ModelConfig"]
