"""`kvjax.generate`: prefill a batch of prompts, then decode on the device in one while_loop."""

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import policies, sharing
from kvjax.cache import cache_bytes, dense_bf16_bytes
from kvjax.model import Model, decode_step, prefill
from kvjax.sampling import Sampling, sample

PAD = -1  # marks the slots after a row's EOS in the device-side output buffer
_BUCKET = 64  # prompt lengths (and, in the caches, capacities) are rounded up to this


@dataclasses.dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int  # real prompt tokens over all rows
    generated_tokens: int  # tokens returned over all rows (EOS included)
    cache_bytes: int  # bytes the cache allocates on the device
    dense_bf16_cache_bytes: int  # an uncompressed bf16 cache of the same capacity
    compile_seconds: float
    prefill_seconds: float
    decode_seconds: float

    @property
    def compression(self) -> float:
        """Fraction of the bf16 full cache saved (negative when larger, e.g. a float32 cache)."""
        return 1.0 - self.cache_bytes / self.dense_bf16_cache_bytes

    @property
    def decode_tokens_per_second(self) -> float:
        return self.generated_tokens / max(self.decode_seconds, 1e-9)


@dataclasses.dataclass(frozen=True)
class GenerationOutput:
    tokens: list[list[int]]  # generated ids per row, up to and including its EOS
    stats: GenerationStats


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _prompt_rows(tokens, vocab_size: int) -> list[np.ndarray]:
    """Validates a prompt (ids, a 2-D array, or a list of id lists) into 1-D int rows."""
    if isinstance(tokens, (np.ndarray, jax.Array)) and np.ndim(tokens) in (1, 2):
        arr = np.asarray(tokens)
        rows = [arr] if arr.ndim == 1 else list(arr)
    elif isinstance(tokens, (list, tuple)) and tokens and all(
            isinstance(t, (int, np.integer)) for t in tokens):
        rows = [np.asarray(tokens)]
    elif isinstance(tokens, (list, tuple)):
        rows = [np.asarray(r) for r in tokens]
    else:
        raise TypeError("tokens must be a list of token ids, a list of such lists, or a 1-D/2-D "
                        f"integer array; got {type(tokens).__name__}")
    if not rows:
        raise ValueError("the prompt batch is empty: pass at least one prompt")
    for i, row in enumerate(rows):
        if row.ndim != 1 or row.size == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        if not np.issubdtype(row.dtype, np.integer):
            raise TypeError(f"prompt {i} has dtype {row.dtype}; token ids must be integers")
        bad = np.flatnonzero((row < 0) | (row >= vocab_size))
        if bad.size:
            raise ValueError(
                f"token id {int(row[bad[0]])} at prompt {i}, position {int(bad[0])} is outside "
                f"the vocabulary [0, {vocab_size}); check that the tokenizer matches the model")
    return [row.astype(np.int32) for row in rows]


def _eos_ids(eos_token_id, model: Model) -> tuple[int, ...]:
    if eos_token_id is None:
        return model.config.eos_token_ids
    if isinstance(eos_token_id, (int, np.integer)):
        return (int(eos_token_id),)
    return tuple(int(t) for t in eos_token_id)


@functools.partial(jax.jit, static_argnames="selection", donate_argnames="cache")
def _prefill(model, cache, tokens, lengths, selection):
    return prefill(model, cache, tokens, lengths, selection)


@functools.partial(jax.jit, static_argnames=("num_tokens", "sampling", "eos_ids"),
                   donate_argnames="cache")
def _decode(model, cache, logits, positions, key, *, num_tokens, sampling, eos_ids):
    """Samples the first token from the prefill logits, then decodes until every row has
    num_tokens tokens or has produced an EOS. Returns the tokens [B, num_tokens] (PAD after EOS)
    and the cache."""
    eos = jnp.asarray(eos_ids or (PAD,), jnp.int32)
    first = sample(logits, jax.random.fold_in(key, 0), sampling)
    out = jnp.full((first.shape[0], num_tokens), PAD, jnp.int32).at[:, 0].set(first)

    def not_finished(state):
        step, _, _, _, _, done = state
        return (step < num_tokens) & ~jnp.all(done)

    def step_fn(state):
        step, cache, tokens, positions, out, done = state
        logits, cache = decode_step(model, cache, tokens, positions)
        new = sample(logits, jax.random.fold_in(key, step), sampling)
        out = out.at[:, step].set(jnp.where(done, PAD, new))
        tokens = jnp.where(done, tokens, new)  # finished rows idle on their last token
        done = done | jnp.isin(new, eos)
        return step + 1, cache, tokens, positions + 1, out, done

    state = (jnp.int32(1), cache, first, positions, out, jnp.isin(first, eos))
    _, cache, _, _, out, _ = jax.lax.while_loop(not_finished, step_fn, state)
    return out, cache


@functools.partial(jax.jit, donate_argnames="cache")
def _extend(model, cache, logits, tokens, lengths, positions):
    """Appends row b's first lengths[b] of tokens [B, Q] to the cache at positions[b] onwards,
    one decode step each (uncompressed, like generated tokens). Returns the logits after each
    row's last appended token (`logits` where it has none), the cache, and the log-probability
    [B, Q] that the logits before each token gave it (teacher forcing: perplexity)."""
    def step(carry, i):
        cache, logits = carry
        logprob = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, i, None], axis=1)[:, 0]
        active = i < lengths  # [B]: rows whose tokens are not over
        new_logits, cache = decode_step(model, cache, tokens[:, i], positions + i, active)
        return (cache, jnp.where(active[:, None], new_logits, logits)), logprob

    (cache, logits), logprobs = jax.lax.scan(step, (cache, logits), jnp.arange(tokens.shape[1]))
    return logits, cache, logprobs.T


def _padded(rows) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ids -> right-padded [B, T] (T rounded up to _BUCKET) and lengths [B]."""
    lengths = np.array([len(r) for r in rows], np.int32)
    padded = np.zeros((len(rows), _round_up(int(lengths.max()), _BUCKET)), np.int32)
    for i, row in enumerate(rows):
        padded[i, :len(row)] = row
    return padded, lengths


def generate(model: Model, tokens, policy: policies.Policy | None = None, *,
             max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, eos_token_id=None,
             context=None) -> GenerationOutput:
    """Generates up to max_new_tokens tokens for each prompt.

    tokens: one prompt (a list or 1-D array of ids), or a batch (a list of id lists of any
    lengths, or a 2-D array). Rows are independent: each equals its own single-row run.
    context: prompts compressed on their own, before any question is seen (question-agnostic
    mode, the kvpress convention): the policy selects and quantizes each context, then each row
    of `tokens` (a question) is appended to its context's cache uncompressed, and generation
    follows. One context is shared by every question (compressed once, its cache copied for
    each), or there is one context per question.
    eos_token_id: an id or ids that end a row; None uses the checkpoint's, () disables stopping.
    Greedy by default; temperature > 0 samples, optionally within top_k / top_p.
    """
    if not isinstance(model, Model):
        raise TypeError(f"generate expects the Model returned by kvjax.load, got {type(model)}")
    cfg = model.config
    if model.kv_sources is not None:
        raise ValueError("pass the model kvjax.load returned; a sharing plan is applied by "
                         "the policy: kvjax.policies.kvsharer(plan)")
    policy = policy or policies.full()
    if policy.sharing is not None:
        model = sharing.apply(model, policy.sharing)
    sampling = Sampling(float(temperature), int(top_k), float(top_p))
    sampling.validate(cfg.vocab_size)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    rows = _prompt_rows(tokens, cfg.vocab_size)
    questions = None
    if context is not None:
        questions, rows = rows, _prompt_rows(context, cfg.vocab_size)
        if len(rows) not in (1, len(questions)):
            raise ValueError(f"got {len(rows)} contexts for {len(questions)} questions: pass one "
                             "context shared by every question, or one context per question")
    padded, lengths = _padded(rows)
    q_max = 0 if questions is None else max(len(q) for q in questions)
    total = int(lengths.max()) + q_max + max_new_tokens
    if total > cfg.max_position_embeddings:
        raise ValueError(
            f"the longest prompt ({lengths.max() + q_max} tokens) plus max_new_tokens "
            f"({max_new_tokens}) is {total}, beyond the model's {cfg.max_position_embeddings} "
            "positions: shorten the prompt or lower max_new_tokens")
    if cfg.sliding_window is not None and total > cfg.sliding_window:
        raise ValueError(
            f"{total} tokens exceed the model's sliding window of {cfg.sliding_window}; kvjax "
            "computes full attention, which equals sliding-window attention only within the "
            "window: shorten the prompt or lower max_new_tokens")

    appends = q_max + max_new_tokens - 1  # the last sampled token is never written to the cache
    cache = policy.allocate(cfg, len(rows), int(lengths.max()), appends,
                            model.weights["embed"].dtype)
    tokens_d, lengths_d = jnp.asarray(padded), jnp.asarray(lengths)
    key = jax.random.key(seed)
    decode_kwargs = dict(num_tokens=max_new_tokens, sampling=sampling, eos_ids=_eos_ids(eos_token_id, model))

    t0 = time.perf_counter()
    prefill_fn = _prefill.lower(model, cache, tokens_d, lengths_d,
                                selection=policy.selection).compile()
    compile_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    logits, cache = jax.block_until_ready(prefill_fn(model, cache, tokens_d, lengths_d))
    prefill_seconds = time.perf_counter() - t0
    positions = lengths_d
    if questions is not None:  # each question appended to its compressed context
        q_tokens, q_lengths = (jnp.asarray(a) for a in _padded(questions))
        B = len(questions)
        if len(rows) == 1:  # one shared context: its cache copied for each question
            cache, logits = jax.tree.map(lambda x: jnp.repeat(x, B, axis=0), (cache, logits))
        positions = jnp.broadcast_to(lengths_d, (B,))
        t0 = time.perf_counter()
        extend_fn = _extend.lower(model, cache, logits, q_tokens, q_lengths, positions).compile()
        compile_seconds += time.perf_counter() - t0
        t0 = time.perf_counter()
        logits, cache, _ = jax.block_until_ready(
            extend_fn(model, cache, logits, q_tokens, q_lengths, positions))
        prefill_seconds += time.perf_counter() - t0
        positions = positions + q_lengths
    allocated = cache_bytes(cache)

    t0 = time.perf_counter()
    decode_fn = _decode.lower(model, cache, logits, positions, key, **decode_kwargs).compile()
    compile_seconds += time.perf_counter() - t0
    t0 = time.perf_counter()
    out, cache = jax.block_until_ready(decode_fn(model, cache, logits, positions, key))
    decode_seconds = time.perf_counter() - t0

    out = np.asarray(out)
    generated = [row[row != PAD].tolist() for row in out]
    stats = GenerationStats(
        prompt_tokens=int(lengths.sum()) + sum(len(q) for q in questions or ()),
        generated_tokens=sum(len(g) for g in generated),
        cache_bytes=allocated,
        dense_bf16_cache_bytes=dense_bf16_bytes(
            cfg, len(generated), _round_up(int(lengths.max()) + appends, _BUCKET)),
        compile_seconds=compile_seconds,
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
    )
    return GenerationOutput(tokens=generated, stats=stats)


def continuation_logprobs(model: Model, context, continuation,
                          policy: policies.Policy | None = None) -> np.ndarray:
    """log p(continuation[i] | context, continuation[:i]) for each i, float32 [len(continuation)],
    with the context prefilled (and compressed) under `policy` and the continuation teacher-forced
    through decode steps, as generated tokens would be: perplexity under a cache policy."""
    policy = policy or policies.full()
    cfg = model.config
    if policy.sharing is not None:
        model = sharing.apply(model, policy.sharing)
    (context,), (continuation,) = (_prompt_rows([row], cfg.vocab_size) for row in (context, continuation))
    if len(context) + len(continuation) > cfg.max_position_embeddings:
        raise ValueError(f"context and continuation ({len(context) + len(continuation)} tokens) "
                         f"exceed the model's {cfg.max_position_embeddings} positions")
    padded, lengths = _padded([context])
    cache = policy.allocate(cfg, 1, len(context), len(continuation), model.weights["embed"].dtype)
    logits, cache = _prefill(model, cache, jnp.asarray(padded), jnp.asarray(lengths),
                             selection=policy.selection)
    q_tokens, q_lengths = _padded([continuation])
    _, _, logprobs = _extend(model, cache, logits, jnp.asarray(q_tokens), jnp.asarray(q_lengths),
                             jnp.asarray(lengths))
    return np.asarray(logprobs[0, :len(continuation)])
