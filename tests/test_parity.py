"""The Flax port against transformers' PyTorch models: logits and greedy generation."""

import numpy as np
import pytest
import torch

import kvjax
from tests.conftest import FAMILIES


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(checkpoints, family, rng):
    path, hf = checkpoints(family)
    model = kvjax.load(path)
    for batch, length in [(2, 37), (1, 13)]:
        tokens = rng.integers(0, model.config.vocab_size, (batch, length))
        with torch.no_grad():
            ref = hf(torch.tensor(tokens)).logits.numpy()
        ours = np.asarray(kvjax.forward(model, tokens))
        assert ours.shape == ref.shape
        np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_generation_matches_transformers(checkpoints, family, rng):
    path, hf = checkpoints(family)
    model = kvjax.load(path)
    prompt = rng.integers(0, model.config.vocab_size, 29)
    with torch.no_grad():
        # An explicit mask: otherwise transformers masks prompt tokens equal to pad_token_id.
        ref = hf.generate(torch.tensor(prompt[None]), attention_mask=torch.ones(1, len(prompt)),
                          max_new_tokens=24, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
    out = kvjax.generate(model, prompt.tolist(), kvjax.policies.full(), max_new_tokens=24)
    assert out.tokens[0] == ref


def test_config_is_read_as_intended(checkpoints):
    cfgs = {name: kvjax.load(checkpoints(name)[0]).config for name in FAMILIES}
    assert cfgs["llama_gqa4_tied"].group_size == 4 and cfgs["llama_gqa4_tied"].tie_word_embeddings
    assert cfgs["llama_mqa_bias"].num_kv_heads == 1 and cfgs["llama_mqa_bias"].o_bias
    assert cfgs["llama_mha_llama3_rope"].rope_scaling.factor == 4.0
    assert cfgs["qwen2_bias"].qkv_bias and not cfgs["qwen2_bias"].o_bias
    assert cfgs["qwen3_norms"].qk_norm and cfgs["qwen3_norms"].head_dim == 24
    assert cfgs["mistral"].sliding_window == 512
