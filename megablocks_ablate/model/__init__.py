"""The parallel-block decoder: config presets (:mod:`.config`), the module
(:mod:`.transformer`) and the exact Hugging Face Cohere mapping (:mod:`.hf`)."""

from megablocks_ablate.model.config import ModelConfig

__all__ = ["ModelConfig"]
