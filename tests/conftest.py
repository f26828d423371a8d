"""Tiny random transformers models, built and saved locally (nothing is downloaded)."""

import jax
import numpy as np
import pytest
import torch
import transformers

# On the GPU, JAX's float32 dots at default precision may round like TF32 (about 1e-3), where
# the tests' float32 and float64 references and tolerances assume exact float32 dots, as on the
# CPU. There the suite runs at full float32 precision, as a user wanting float32 accuracy would
# (jax.default_matmul_precision; the Pallas kernels' float32 dots follow it).
if jax.default_backend() == "gpu":
    jax.config.update("jax_default_matmul_precision", "highest")

# Each family and feature the port must cover; sizes are awkward on purpose.
FAMILIES = {
    "llama_gqa2": ("llama", dict(num_attention_heads=4, num_key_value_heads=2)),
    "llama_mha_llama3_rope": ("llama", dict(
        num_attention_heads=4, num_key_value_heads=4,
        rope_parameters={"rope_type": "llama3", "rope_theta": 100.0, "factor": 4.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16})),
    "llama_gqa4_tied": ("llama", dict(num_attention_heads=8, num_key_value_heads=2,
                                      tie_word_embeddings=True)),
    "llama_mqa_bias": ("llama", dict(num_attention_heads=4, num_key_value_heads=1,
                                     attention_bias=True)),
    "mistral": ("mistral", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=512)),
    "qwen2_bias": ("qwen2", dict(num_attention_heads=6, num_key_value_heads=2, hidden_size=72)),
    "qwen3_norms": ("qwen3", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24)),
}

_CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
}


def build_hf_model(model_type: str, seed: int = 0, **overrides):
    """A float32 random transformers model; larger init than HF's default keeps logits apart."""
    config_cls, model_cls = _CLASSES[model_type]
    kwargs = dict(vocab_size=113, hidden_size=64, intermediate_size=88, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  initializer_range=0.08, rms_norm_eps=1e-5, eos_token_id=None, bos_token_id=None,
                  pad_token_id=None, tie_word_embeddings=False)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).to(torch.float32).eval()
    return model


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """family name -> (folder of the saved checkpoint, the transformers model). Built once."""
    built = {}

    def get(name):
        if name not in built:
            model_type, overrides = FAMILIES[name]
            hf = build_hf_model(model_type, **overrides)
            path = tmp_path_factory.mktemp(name)
            # One family is saved sharded, so the index path of the loader is exercised.
            hf.save_pretrained(path, max_shard_size="40KB" if name == "llama_gqa2" else "1GB")
            built[name] = (path, hf)
        return built[name]

    return get


@pytest.fixture
def rng():
    return np.random.default_rng()
