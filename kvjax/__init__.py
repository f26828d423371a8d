"""kvjax: long-context LLM inference with compressed KV caches, in JAX."""

from kvjax import policies, sharing
from kvjax.config import ModelConfig, UnsupportedConfigError
from kvjax.generate import GenerationOutput, GenerationStats, generate
from kvjax.loading import REFERENCE_MODEL, CheckpointError, load, restore, save
from kvjax.model import Model, forward, init_random

__all__ = [
    "REFERENCE_MODEL", "CheckpointError", "GenerationOutput", "GenerationStats", "Model",
    "ModelConfig", "UnsupportedConfigError", "forward", "generate", "init_random", "load",
    "policies", "restore", "save", "sharing",
]
