"""Orbax round trip, HF export, and bf16 checkpoints."""

import numpy as np
import torch

import kvjax
from kvjax.loading import save_hf
from tests.conftest import build_hf_model


def test_orbax_round_trip_gives_identical_logits(checkpoints, tmp_path, rng):
    model = kvjax.load(checkpoints("qwen3_norms")[0])
    kvjax.save(model, tmp_path / "orbax")
    restored = kvjax.restore(tmp_path / "orbax")
    assert restored.config == model.config
    tokens = rng.integers(0, model.config.vocab_size, (2, 19))
    np.testing.assert_array_equal(np.asarray(kvjax.forward(restored, tokens)),
                                  np.asarray(kvjax.forward(model, tokens)))


def test_hf_export_loads_in_transformers(checkpoints, tmp_path, rng):
    """save_hf writes files that transformers reads to the same logits."""
    from transformers import AutoModelForCausalLM

    model = kvjax.load(checkpoints("llama_gqa4_tied")[0])
    save_hf(model, tmp_path / "export")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32)
    tokens = rng.integers(0, model.config.vocab_size, (1, 23))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(kvjax.forward(model, tokens)), ref, atol=1e-4, rtol=0)
    assert kvjax.load(tmp_path / "export").config == model.config


def test_bf16_checkpoint_loads_in_bf16(tmp_path, rng):
    hf = build_hf_model("llama", seed=1).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    model = kvjax.load(tmp_path)
    assert model.weights["embed"].dtype == np.dtype("bfloat16") and model.config.dtype == "bfloat16"
    tokens = rng.integers(0, model.config.vocab_size, (1, 17))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.float().numpy()
    ours = np.asarray(kvjax.forward(model, tokens))
    # bf16 rounding differs between the two stacks: compare relative to the logit scale.
    assert np.abs(ours - ref).max() < 0.05 * np.abs(ref).max()
