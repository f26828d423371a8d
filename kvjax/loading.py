"""Loading Hugging Face checkpoints (config.json + safetensors, sharded or not) without torch,
and saving/restoring converted weights with orbax-checkpoint."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from safetensors import flax as safetensors_flax
from safetensors import safe_open

from kvjax.config import ModelConfig
from kvjax.model import Model, fuse_layer, init_random, layer_shapes, split_layer, top_shapes


class CheckpointError(ValueError):
    """The checkpoint's tensors do not match its config."""


# Tensors some checkpoints carry that the forward pass recomputes or does not need.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

# kvjax's bundled model: a 4.7M-parameter byte-level Llama (GQA 8/2) trained to retrieve from
# 4K-token contexts (benchmarks/train_reference_model.py), in HF format with its tokenizer.
REFERENCE_MODEL = Path(__file__).with_name("reference_model")


def _hf_layout(cfg: ModelConfig):
    """Maps each HF tensor name to (layer index or None, our name, HF shape, transposed).

    HF linear weights are [out, in]; ours are [in, ...] with heads split out (model.layer_shapes),
    so ours = hf.T.reshape(our_shape) when `transposed`, else hf.reshape(our_shape).
    """
    E, K, Hq, Hkv, F = (cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads,
                        cfg.intermediate_size)
    layout = {
        "model.embed_tokens.weight": (None, "embed", (cfg.vocab_size, E), False),
        "model.norm.weight": (None, "final_norm", (E,), False),
    }
    if not cfg.tie_word_embeddings:
        layout["lm_head.weight"] = (None, "lm_head", (cfg.vocab_size, E), True)
    per_layer = {  # HF suffix: (our name, HF shape, transposed)
        "input_layernorm.weight": ("attn_norm", (E,), False),
        "self_attn.q_proj.weight": ("wq", (Hq * K, E), True),
        "self_attn.k_proj.weight": ("wk", (Hkv * K, E), True),
        "self_attn.v_proj.weight": ("wv", (Hkv * K, E), True),
        "self_attn.o_proj.weight": ("wo", (E, Hq * K), True),
        "self_attn.q_proj.bias": ("bq", (Hq * K,), False),
        "self_attn.k_proj.bias": ("bk", (Hkv * K,), False),
        "self_attn.v_proj.bias": ("bv", (Hkv * K,), False),
        "self_attn.o_proj.bias": ("bo", (E,), False),
        "self_attn.q_norm.weight": ("q_norm", (K,), False),
        "self_attn.k_norm.weight": ("k_norm", (K,), False),
        "post_attention_layernorm.weight": ("mlp_norm", (E,), False),
        "mlp.gate_proj.weight": ("w_gate", (F, E), True),
        "mlp.up_proj.weight": ("w_up", (F, E), True),
        "mlp.down_proj.weight": ("w_down", (E, F), True),
    }
    used = layer_shapes(cfg)
    for i in range(cfg.num_layers):
        for suffix, (name, shape, transposed) in per_layer.items():
            if name in used:
                layout[f"model.layers.{i}.{suffix}"] = (i, name, shape, transposed)
    return layout


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({path / f for f in weight_map.values()})
    elif (path / "model.safetensors").exists():
        files = [path / "model.safetensors"]
    else:
        raise CheckpointError(
            f"{path} has neither model.safetensors nor model.safetensors.index.json; kvjax loads "
            "safetensors checkpoints (convert .bin files with transformers' save_pretrained)")
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"the safetensors index names shard files that are missing: {missing}")
    return files


def load(path, dtype=None, ignore_config_keys=()) -> Model:
    """Reads an HF checkpoint directory into device arrays (the checkpoint's dtype unless `dtype`).

    Raises UnsupportedConfigError for config attributes the port does not implement and
    CheckpointError naming any missing, unexpected or mis-shaped tensor.
    """
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json: pass a Hugging Face checkpoint folder")
    cfg = ModelConfig.from_json(path / "config.json", ignore_config_keys)
    layout = _hf_layout(cfg)
    layers = [dict() for _ in range(cfg.num_layers)]
    top = {}
    seen = set()
    for file in _safetensors_files(path):
        with safe_open(str(file), framework="flax") as f:
            for name in f.keys():
                if name.endswith(_IGNORED_SUFFIXES) or (
                        name == "lm_head.weight" and cfg.tie_word_embeddings):
                    continue
                if name not in layout:
                    raise CheckpointError(
                        f"unexpected tensor {name!r} in {file.name}: the config "
                        f"({cfg.model_type}) does not call for it; check config.json")
                layer, ours, shape, transposed = layout[name]
                got = tuple(f.get_slice(name).get_shape())
                if got != shape:
                    raise CheckpointError(
                        f"tensor {name!r} has shape {got}, but config.json implies {shape}")
                array = f.get_tensor(name)
                if dtype is not None:
                    array = array.astype(dtype)
                our_shape = (layer_shapes(cfg) if layer is not None else top_shapes(cfg))[ours]
                array = (array.T if transposed else array).reshape(our_shape)
                (top if layer is None else layers[layer])[ours] = array
                seen.add(name)
    missing = [name for name in layout if name not in seen]
    if missing:
        raise CheckpointError(
            f"the checkpoint is missing {len(missing)} tensor(s) the config needs, e.g. "
            f"{missing[:5]}")
    dtype_name = jnp.dtype(top["embed"].dtype).name
    weights = top | {"layers": tuple(fuse_layer(parts) for parts in layers)}
    return Model(weights=weights, config=dataclasses.replace(cfg, dtype=dtype_name))


def save_hf(model: Model, path) -> None:
    """Writes the model as an HF checkpoint (config.json + model.safetensors) that both
    transformers and `load` read."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    layers = [split_layer(layer, model.config) for layer in model.weights["layers"]]
    for name, (layer, ours, shape, transposed) in _hf_layout(model.config).items():
        w = model.weights if layer is None else layers[layer]
        array = w[ours]
        tensors[name] = array.reshape(shape[::-1]).T if transposed else array.reshape(shape)
    safetensors_flax.save_file(tensors, str(path / "model.safetensors"),
                               metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(model.config.to_hf(), indent=1))


_CONFIG_FILE = "kvjax_config.json"


def save(model: Model, path) -> None:
    """Saves converted weights with orbax-checkpoint (plus the static config as JSON)."""
    path = Path(path).absolute()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path / "weights", model.weights, force=True)
    checkpointer.wait_until_finished()
    (path / _CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=1))


def restore(path) -> Model:
    """Restores what `save` wrote."""
    path = Path(path).absolute()
    cfg = ModelConfig.from_dict(json.loads((path / _CONFIG_FILE).read_text()))
    abstract = jax.eval_shape(lambda: init_random(cfg, jax.random.key(0)).weights)
    weights = ocp.StandardCheckpointer().restore(path / "weights", abstract)
    return Model(weights=weights, config=cfg)
