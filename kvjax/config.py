"""Static model configuration for the Llama family, read from a Hugging Face config.json.

The port covers Llama 2/3.x (llama3 rope scaling, tied or untied embeddings, optional attention
bias), Mistral, Qwen2 (q/k/v bias) and Qwen3 (q/k RMSNorm, explicit head_dim). Every attribute of
config.json is either used, known not to change the forward pass, or rejected: a checkpoint whose
math this port does not implement fails at load time instead of generating quietly wrong text.
"""

import dataclasses
import json
import math
from pathlib import Path

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# Attributes that do not change inference math (training knobs, bookkeeping, tokenizer ids).
_INERT_KEYS = frozenset({
    "architectures", "transformers_version", "dtype", "torch_dtype", "initializer_range",
    "use_cache", "pad_token_id", "bos_token_id", "attention_dropout", "_name_or_path",
    "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id",
    "problem_type", "chunk_size_feed_forward", "is_encoder_decoder", "tokenizer_class",
    "pretraining_tp",  # splits the matmuls during training; the product is the same
    "max_window_layers",  # only read when use_sliding_window is true, which is rejected
    "model_type", "eos_token_id",
})

# Attributes this port reads (checked below).
_HANDLED_KEYS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "tie_word_embeddings", "rope_theta", "rope_scaling", "rope_parameters", "attention_bias",
    "mlp_bias", "sliding_window", "use_sliding_window", "layer_types",
})


class UnsupportedConfigError(ValueError):
    """config.json asks for math this port does not implement."""


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hashable, static description of a Llama-family decoder."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Llama3RopeScaling | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    # Mistral's sliding window: the port computes full attention, which is exact only while the
    # whole sequence fits in the window; generate() refuses longer sequences.
    sliding_window: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "float32"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedConfigError(
                f"num_attention_heads={self.num_heads} must be a multiple of "
                f"num_key_value_heads={self.num_kv_heads}")

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA group size g)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, hf: dict, ignore_keys=()) -> "ModelConfig":
        """Builds the config from a parsed config.json, rejecting math the port does not do."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedConfigError(
                f"model_type {model_type!r} is not supported; kvjax ports {SUPPORTED_MODEL_TYPES}")
        unknown = sorted(set(hf) - _INERT_KEYS - _HANDLED_KEYS - set(ignore_keys))
        if unknown:
            raise UnsupportedConfigError(
                f"config.json has attributes the {model_type} port does not handle: {unknown}. "
                "If you are sure they do not change the forward pass, pass "
                f"ignore_config_keys={unknown} to kvjax.load")
        if hf.get("hidden_act", "silu") != "silu":
            raise UnsupportedConfigError(
                f"hidden_act={hf['hidden_act']!r} is not supported; the port implements 'silu'")
        if hf.get("mlp_bias", False):
            raise UnsupportedConfigError("mlp_bias=true is not supported by the port")
        if hf.get("use_sliding_window", False):
            raise UnsupportedConfigError(
                "use_sliding_window=true is not supported: the port computes full attention")
        layer_types = hf.get("layer_types") or []
        if any(t != "full_attention" for t in layer_types):
            raise UnsupportedConfigError(
                f"layer_types {sorted(set(layer_types))} is not supported: only full_attention")
        rope_theta, rope_scaling = _parse_rope(hf)

        num_heads = hf["num_attention_heads"]
        attention_bias = bool(hf.get("attention_bias", False))
        # Qwen2 always has q/k/v bias and no o bias; Llama and Qwen3 put attention_bias on all four.
        qkv_bias = model_type == "qwen2" or attention_bias
        o_bias = model_type != "qwen2" and attention_bias
        sliding_window = hf.get("sliding_window") if model_type == "mistral" else None
        eos = hf.get("eos_token_id")
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            max_position_embeddings=hf["max_position_embeddings"],
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            qk_norm=model_type == "qwen3",
            sliding_window=sliding_window,
            eos_token_ids=eos_ids,
            dtype=hf.get("dtype") or hf.get("torch_dtype") or "float32",
        )

    @classmethod
    def from_json(cls, path, ignore_keys=()) -> "ModelConfig":
        return cls.from_hf(json.loads(Path(path).read_text()), ignore_keys)

    def to_hf(self) -> dict:
        """The config.json that transformers (and `from_hf`) read back as this config."""
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {"rope_type": "llama3", "rope_theta": self.rope_theta,
                    **dataclasses.asdict(self.rope_scaling)}
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[self.model_type]
        hf = {
            "architectures": [arch], "model_type": self.model_type,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps, "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings, "dtype": self.dtype,
            "eos_token_id": list(self.eos_token_ids) or None,
        }
        if self.model_type in ("llama", "qwen3"):
            hf["attention_bias"] = self.o_bias
        if self.model_type == "mistral":
            hf["sliding_window"] = self.sliding_window
        return hf

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = Llama3RopeScaling(**d["rope_scaling"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)


def _parse_rope(hf: dict) -> tuple[float, Llama3RopeScaling | None]:
    """Reads rope settings from `rope_parameters` (transformers 5) or `rope_scaling` (older)."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return rope_theta, None
    if rope_type != "llama3":
        raise UnsupportedConfigError(
            f"rope type {rope_type!r} is not supported; the port implements 'default' and 'llama3'")
    if params.get("attention_factor", 1.0) != 1.0:
        raise UnsupportedConfigError("llama3 rope with attention_factor != 1 is not supported")
    scaling = Llama3RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )
    if not math.isfinite(scaling.factor) or scaling.high_freq_factor <= scaling.low_freq_factor:
        raise UnsupportedConfigError(f"invalid llama3 rope scaling {scaling}")
    return rope_theta, scaling
