"""KVSharer: calibrated cross-layer KV sharing (methods.md section 5).

Calibration runs a few prompts through the model, averages each layer's post-RoPE K and V over
the prompts, and measures every pair of layers i > j by
    d(i, j) = (mean ||K_i - K_j|| + mean ||V_i - V_j||) / 2    (L2 over the head dim, mean over
                                                                 heads and positions).
It then tries pairs most dissimilar first (the paper's finding; equal distances in increasing
(i, j)): layer i would attend over layer j's cache (over j's own source if j is shared, and the
layers reading i follow it there). A trial is kept when the cosine similarity between the final
hidden states of the original and the modified model, per token and averaged over the prompts,
stays at or above the threshold. The search stops at `num_shared` shared layers.

A plan records the model it was made for; `apply` refuses any other. A shared layer keeps only
its query projection, stores nothing and attends over its source's cache slot directly.
"""

import dataclasses
import hashlib
import json
import sysconfig
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from kvjax.model import Model, forward_prompt, fuse_layer, split_layer

_KV_ONLY = ("wk", "wv", "bk", "bv", "k_norm")  # what a shared layer no longer needs


@dataclasses.dataclass(frozen=True)
class SharingPlan:
    """Layer -> source layer (itself when it keeps its own cache), and how it was found."""

    sources: tuple[int, ...]
    model_id: str  # model_fingerprint() of the model calibrated
    threshold: float = 0.0
    distances: tuple[tuple[int, int, float], ...] = ()  # (i, j, d) for every pair i > j
    trials: tuple[tuple[int, int, float, bool], ...] = ()  # (i, j, similarity, kept) in order

    def __post_init__(self):
        object.__setattr__(self, "sources", tuple(int(s) for s in self.sources))
        L = len(self.sources)
        for i, s in enumerate(self.sources):
            if not 0 <= s < L:
                raise ValueError(f"layer {i} reads layer {s}, outside the model's {L} layers: "
                                 "the plan is out of range")
            if s > i or self.sources[s] != s:
                raise ValueError(
                    f"layer {i} reads layer {s}, which is not an earlier layer keeping its own "
                    "cache: a plan must point each shared layer at an earlier stored layer (this "
                    "one is cyclic or chained; calibrate() makes valid plans)")

    def check_layers(self, num_layers: int) -> None:
        if len(self.sources) != num_layers:
            raise ValueError(f"the sharing plan covers {len(self.sources)} layers, the model has "
                             f"{num_layers}: it was made for another model")

    @property
    def num_shared(self) -> int:
        return sum(s != i for i, s in enumerate(self.sources))

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def load(cls, path) -> "SharingPlan":
        d = json.loads(Path(path).read_text())
        return cls(sources=tuple(d["sources"]), model_id=d["model_id"],
                   threshold=d["threshold"], distances=tuple(map(tuple, d["distances"])),
                   trials=tuple(map(tuple, d["trials"])))


def model_fingerprint(model: Model) -> str:
    """Identity of a model's config and weights: a hash of the config and of the exact bytes of
    a few weights of every layer (no float arithmetic, so the same on every device)."""
    if model.kv_sources is not None:
        raise ValueError("fingerprint the original model, not one with a sharing plan applied")
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    w = model.weights
    samples = [w["embed"][:2]] + [layer["wqkv"][0, :, :2] for layer in w["layers"]]
    for x in samples:
        h.update(np.asarray(x, np.float32).tobytes())
    return h.hexdigest()[:16]


def apply(model: Model, plan: SharingPlan) -> Model:
    """The model with the plan's shared layers stripped of their K/V projections."""
    cfg = model.config
    plan.check_layers(cfg.num_layers)
    if plan.model_id != model_fingerprint(model):
        raise ValueError(f"the plan was made for model {plan.model_id}, not this one "
                         f"({model_fingerprint(model)}): calibrate a plan for this model")
    layers = []
    for i, layer in enumerate(model.weights["layers"]):
        if plan.sources[i] != i:
            parts = split_layer(layer, cfg)
            layer = fuse_layer({n: x for n, x in parts.items() if n not in _KV_ONLY})
        layers.append(layer)
    return Model(weights=model.weights | {"layers": tuple(layers)}, config=cfg,
                 kv_sources=plan.sources)


@jax.jit
def capture_kv(model: Model, tokens):
    """Each layer's post-RoPE K and V over tokens [N, T], averaged over the N prompts, float32:
    k, v [L, Hkv, T, K]."""
    lengths = jnp.full(tokens.shape[:1], tokens.shape[1], jnp.int32)
    _, layer_kv, _ = forward_prompt(model, tokens, lengths)
    k = jnp.stack([kv[0].astype(jnp.float32).mean(0) for kv in layer_kv])
    v = jnp.stack([kv[1].astype(jnp.float32).mean(0) for kv in layer_kv])
    return k, v


def layer_distances(k, v) -> np.ndarray:
    """d [L, L] (float64; only i > j filled) from averaged k, v [L, Hkv, T, K]."""
    k, v = np.asarray(k, np.float64), np.asarray(v, np.float64)
    L = k.shape[0]
    d = np.zeros((L, L))
    for i in range(L):
        for j in range(i):
            d[i, j] = (np.linalg.norm(k[i] - k[j], axis=-1).mean()
                       + np.linalg.norm(v[i] - v[j], axis=-1).mean()) / 2
    return d


@jax.jit
def _final_hidden(model: Model, tokens, kv_sources):
    lengths = jnp.full(tokens.shape[:1], tokens.shape[1], jnp.int32)
    hidden, _, _ = forward_prompt(model, tokens, lengths, kv_sources)
    return hidden.astype(jnp.float32)  # [N, T, E]


@jax.jit
def _mean_cosine(a, b):
    cos = (a * b).sum(-1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1) + 1e-30)
    return cos.mean()


def similarity_fn(model: Model, tokens):
    """sources -> mean cosine similarity of the final hidden states (per token, over the
    prompts) of the model attending as `sources` says, to the original model's. One compile."""
    tokens = jnp.asarray(tokens)
    original = _final_hidden(model, tokens, jnp.arange(model.config.num_layers))

    def similarity(sources) -> float:
        hidden = _final_hidden(model, tokens, jnp.asarray(sources, jnp.int32))
        return float(_mean_cosine(hidden, original))
    return similarity


def share(sources, i: int, j: int) -> tuple[int, ...]:
    """sources with layer i reading j's cache (j's source if j is shared), and every layer that
    read i following it."""
    root = sources[j]
    return tuple(root if layer == i or s == i else s for layer, s in enumerate(sources))


def calibrate(model: Model, calibration_tokens, num_shared: int, threshold: float = 0.5,
              progress: bool = True) -> SharingPlan:
    """Finds up to num_shared layers to share (see the module docstring).

    calibration_tokens: prompts of equal length ([N, T] ids; the authors used 30 x 64).
    """
    L = model.config.num_layers
    if not 0 < num_shared < L:
        raise ValueError(f"num_shared must be in [1, {L - 1}] for a {L}-layer model (at least "
                         f"one layer keeps its cache), got {num_shared}")
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
    tokens = _calibration_batch(calibration_tokens, model.config.vocab_size)
    d = layer_distances(*capture_kv(model, tokens))
    pairs = sorted(((i, j) for i in range(L) for j in range(i)), key=lambda p: (-d[p], p))
    similarity = similarity_fn(model, tokens)
    sources, trials = tuple(range(L)), []
    bar = tqdm(pairs, desc="KVSharer calibration", disable=not progress)
    for i, j in bar:
        if sum(s != n for n, s in enumerate(sources)) == num_shared:
            break
        if sources[i] != i:  # already shared
            continue
        candidate = share(sources, i, j)
        sim = similarity(candidate)
        trials.append((i, j, sim, sim >= threshold))
        if sim >= threshold:
            sources = candidate
        bar.set_postfix(shared=sum(s != n for n, s in enumerate(sources)), last_cos=f"{sim:.3f}")
    bar.close()
    plan = SharingPlan(sources=sources, model_id=model_fingerprint(model), threshold=threshold,
                       distances=tuple((i, j, float(d[i, j])) for i, j in pairs),
                       trials=tuple(trials))
    if plan.num_shared < num_shared:
        warnings.warn(f"only {plan.num_shared} of {num_shared} layers could be shared at "
                      f"threshold {threshold}: lower the threshold to share more", stacklevel=2)
    return plan


def _calibration_batch(tokens, vocab_size: int):
    try:
        arr = np.asarray(tokens)
    except ValueError:  # ragged rows
        arr = np.asarray([], np.float32)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError("calibration_tokens must be N prompts of equal length T: an integer "
                         f"array [N, T]; got shape {arr.shape} of {arr.dtype}")
    if arr.min() < 0 or arr.max() >= vocab_size:
        raise ValueError(f"calibration token ids must be in [0, {vocab_size}): check that the "
                         "tokenizer matches the model")
    return jnp.asarray(arr, jnp.int32)


def stdlib_calibration_tokens(tokenizer, num_prompts: int = 30, length: int = 64) -> np.ndarray:
    """[num_prompts, length] ids of consecutive chunks of the Python standard library's source
    (text every Python installation has), for calibrating without a dataset."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    ids: list[int] = []
    for path in sorted(stdlib.glob("*.py")):
        ids += tokenizer(path.read_text(errors="ignore")).input_ids
        if len(ids) >= num_prompts * length:
            break
    if len(ids) < num_prompts * length:
        raise ValueError(f"the standard library gave only {len(ids)} tokens")
    return np.asarray(ids[:num_prompts * length], np.int32).reshape(num_prompts, length)
