"""The bundled reference model: transformers reads the shipped files to kvjax's logits, the files
are within the package's size limits, and a small sample of its retrieval is checked on CPU."""

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import kvjax
from kvjax import eval as evaluation
from kvjax import policies


def test_files_fit_the_package_limits():
    sizes = {p.name: p.stat().st_size for p in kvjax.REFERENCE_MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= sizes.keys()
    assert max(sizes.values()) < 16 * 2**20 and sum(sizes.values()) < 25e6


def test_transformers_loads_the_shipped_files_to_the_same_logits(rng):
    hf = AutoModelForCausalLM.from_pretrained(kvjax.REFERENCE_MODEL, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(kvjax.REFERENCE_MODEL)
    model = kvjax.load(kvjax.REFERENCE_MODEL, dtype="float32")
    ids = tokenizer("def square(x):\n    return x * x\n\nprint(square(").input_ids
    ids += rng.integers(0, 256, 37).tolist()  # and bytes no text has
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].numpy()
    got = np.asarray(kvjax.forward(model, np.array([ids], np.int32)))[0]
    np.testing.assert_allclose(got, expected, atol=2e-3, rtol=2e-3)
    assert (got.argmax(-1) == expected.argmax(-1)).mean() > 0.99


def test_it_retrieves_and_batching_changes_no_answer():
    """At 1K tokens: passkey and single needle, whole and question-agnostic under kivi2, each
    sample right; four samples a batch give the answers each gives alone."""
    model = kvjax.load(kvjax.REFERENCE_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(kvjax.REFERENCE_MODEL)
    for task in ("passkey", "niah_single"):
        samples = evaluation.make_samples(task, tokenizer, 1024, 4, seed=5)
        for policy, agnostic in ((policies.full(), False), (policies.kivi(), True)):
            batched = evaluation.run_samples(model, tokenizer, samples, policy, agnostic,
                                             max_new_tokens=10, progress=False, batch_size=4)
            assert batched["score"] == 1.0, batched["samples"]
            alone = evaluation.run_samples(model, tokenizer, samples[:2], policy, agnostic,
                                           max_new_tokens=10, progress=False)
            assert [r["output"] for r in alone["samples"]] == [
                r["output"] for r in batched["samples"][:2]]
