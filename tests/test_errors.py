"""Bad input fails with a message that says what to change."""

import dataclasses
import json
import shutil

import pytest
from safetensors.numpy import load_file, save_file

import kvjax


@pytest.fixture(scope="module")
def llama(checkpoints):
    path, _ = checkpoints("llama_mha_llama3_rope")
    return path, kvjax.load(path)


def test_token_ids_outside_vocabulary(llama):
    _, model = llama
    with pytest.raises(ValueError, match=r"token id 113 at prompt 0, position 2 is outside the vocabulary \[0, 113\)"):
        kvjax.generate(model, [1, 2, 113], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"token id -1 at prompt 1, position 0"):
        kvjax.generate(model, [[1, 2], [-1]], max_new_tokens=2)


def test_empty_prompts(llama):
    _, model = llama
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        kvjax.generate(model, [[1, 2], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt batch is empty"):
        kvjax.generate(model, [], max_new_tokens=2)


def test_prompt_beyond_model_positions(llama):
    _, model = llama
    with pytest.raises(ValueError, match=r"plus max_new_tokens \(60\) is 260, beyond the model's 256 positions"):
        kvjax.generate(model, [1] * 200, max_new_tokens=60)


def test_bad_generation_arguments(llama):
    _, model = llama
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        kvjax.generate(model, [1, 2], max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p must be in"):
        kvjax.generate(model, [1, 2], temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        kvjax.generate(model, [1, 2], temperature=-1.0)
    with pytest.raises(ValueError, match="unknown policy 'kivi9'"):
        kvjax.policies.by_name("kivi9")


def test_mistral_beyond_sliding_window(checkpoints):
    model = kvjax.load(checkpoints("mistral")[0])
    small_window = model.replace(config=dataclasses.replace(model.config, sliding_window=40))
    assert len(kvjax.generate(small_window, [1] * 30, max_new_tokens=10).tokens[0]) == 10
    with pytest.raises(ValueError, match="41 tokens exceed the model's sliding window of 40"):
        kvjax.generate(small_window, [1] * 33, max_new_tokens=8)


def _copy_with_config(src, tmp_path, **changes):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("changes, message", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}, "rope type 'yarn' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"mlp_bias": True}, "mlp_bias=true is not supported"),
    ({"use_sliding_window": True}, "use_sliding_window=true is not supported"),
    ({"attn_logit_softcapping": 50.0}, r"does not handle: \['attn_logit_softcapping'\]"),
    ({"model_type": "gemma2"}, "model_type 'gemma2' is not supported"),
])
def test_unsupported_config_attributes(llama, tmp_path, changes, message):
    path = _copy_with_config(llama[0], tmp_path, **changes)
    with pytest.raises(kvjax.UnsupportedConfigError, match=message):
        kvjax.load(path)


def test_unknown_attribute_can_be_declared_inert(llama, tmp_path):
    path = _copy_with_config(llama[0], tmp_path, my_training_note="x")
    assert kvjax.load(path, ignore_config_keys=["my_training_note"]).config.num_layers == 3


def _rewrite_weights(src, tmp_path, edit):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_checkpoint_missing_a_tensor(llama, tmp_path):
    path = _rewrite_weights(llama[0], tmp_path,
                            lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(kvjax.CheckpointError, match=r"missing 1 tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        kvjax.load(path)


def test_checkpoint_tensor_of_wrong_shape(llama, tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:32]
    path = _rewrite_weights(llama[0], tmp_path, edit)
    with pytest.raises(kvjax.CheckpointError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(32, 64\), but config\.json implies \(64, 64\)"):
        kvjax.load(path)


def test_checkpoint_with_unexpected_tensor(llama, tmp_path):
    def edit(t):
        t["model.layers.0.mlp.up_proj.bias"] = t["model.norm.weight"]
    path = _rewrite_weights(llama[0], tmp_path, edit)
    with pytest.raises(kvjax.CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.mlp\.up_proj\.bias'"):
        kvjax.load(path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        kvjax.load(tmp_path)
