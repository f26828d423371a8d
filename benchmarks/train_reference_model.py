"""Trains kvjax's bundled reference model: a small byte-level Llama (GQA) that really retrieves
from long contexts, on text every Python installation has plus synthetic retrieval tasks.

Data, generated on the fly and deterministic per (seed, step):
- language modelling on windows of the standard library's source (all its files but the last 40,
  which kvjax.eval.stdlib_text holds out for perplexity);
- kvjax.eval's retrieval tasks (passkey, needles, variable tracking) with fresh seeds, the loss
  on the answer only: context, question, then the answers and </s>.
Each step draws one sequence length (256 ... 4096 tokens) and fills a fixed token budget.

A run stops before --minutes (device calls last at most 10 minutes), saves its state with
orbax, and the next run resumes from it. At the end of a run the model is exported in HF format
(config.json, model.safetensors in bf16, the byte tokenizer) to --export, and the passkey and
single-needle accuracy at the trained length are measured with kvjax.eval.

    python -m benchmarks.train_reference_model --workdir /tmp/ref --minutes 9.4 --total-steps 23000 \
        --export kvjax/reference_model

The shipped model's runs, step by step, are in benchmarks/RESULTS.md.
"""

import argparse
import dataclasses
import json
import random
import sysconfig
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from benchmarks.common import environment, write_result
from kvjax import eval as evaluation
from kvjax import policies
from kvjax.config import ModelConfig
from kvjax.loading import save_hf
from kvjax.model import Model, forward_prompt, init_random, unembed
from kvjax.tokenizer import SPECIAL_TOKENS, VOCAB_SIZE, byte_tokenizer

PAD, EOS = 256 + SPECIAL_TOKENS.index("<pad>"), 256 + SPECIAL_TOKENS.index("</s>")
CONFIG = ModelConfig(
    model_type="llama", vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=768,
    num_layers=6, num_heads=8, num_kv_heads=2, head_dim=32, max_position_embeddings=8192,
    rope_theta=100000.0, eos_token_ids=(EOS,), dtype="bfloat16")
LENGTHS = (256, 512, 1024, 2048, 4096)


@dataclasses.dataclass
class Encoded:
    input_ids: list[int]


class ByteIds:
    """The byte tokenizer's ids without its Python overhead: id = byte (no special tokens)."""

    def __call__(self, text, add_special_tokens=True):
        return Encoded(list(text.encode()))


def stdlib_training_text() -> bytes:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return b"".join(p.read_bytes() for p in sorted(stdlib.glob("*.py"))[:-40])


def task_row(rng: random.Random, length: int):
    """A retrieval sample of about `length` bytes: ids and a mask on the answer and </s>."""
    task = rng.choice(sorted(evaluation.TASKS))
    try:
        sample = evaluation.TASKS[task](length - 64, ByteIds(), rng)
    except ValueError:  # too short for this task's needles: the passkey fits every length
        sample = evaluation.passkey(length - 64, ByteIds(), rng)
    # As kvjax.eval asks: the prompt ends with the question, the answer begins with its space.
    prompt = list((sample.context + "\n" + sample.question).encode())
    answer = list((" " + ", ".join(sample.answers)).encode()) + [EOS]
    return prompt + answer, [0] * len(prompt) + [1] * len(answer)


def batch(step: int, seed: int, tokens_per_step: int, text: bytes, task_share: float):
    """tokens [B, T] int32 and loss mask [B, T] float32 for one step (T drawn per step): 1 on
    language-modelling targets, 2 on answer targets."""
    rng = random.Random(f"{seed}/{step}")
    T = rng.choice(LENGTHS)
    B = max(1, tokens_per_step // T)
    tokens = np.full((B, T), PAD, np.int32)
    mask = np.zeros((B, T), np.float32)
    for b in range(B):
        if rng.random() < task_share:
            ids, m = task_row(rng, T)
            ids, m = ids[-T:], [2 * x for x in m[-T:]]
        else:
            start = rng.randrange(len(text) - T)
            ids, m = list(text[start:start + T]), [1] * T
        tokens[b, :len(ids)], mask[b, :len(m)] = ids, m
    return tokens, mask


def causal_attention(q, k, v, lengths):
    """Differentiable causal GQA attention, [B, H, T, K] layouts. On the GPU cuDNN's fused
    kernel: jax's default (XLA) writes the [B, H, T, T] scores to memory."""
    implementation = "cudnn" if jax.default_backend() == "gpu" else None
    out = jax.nn.dot_product_attention(*(x.transpose(0, 2, 1, 3) for x in (q, k, v)),
                                       is_causal=True, implementation=implementation)
    return out.transpose(0, 2, 1, 3)


def loss_fn(weights, tokens, mask):
    """Mean next-token cross-entropy over the text targets (mask 1) plus the mean over the answer
    targets (mask 2), so that a few answer bytes per long row are not drowned out by the text;
    bf16 compute, float32 weights. Returns (loss, (text loss, answer loss))."""
    model = Model(jax.tree.map(lambda w: w.astype(jnp.bfloat16), weights), CONFIG)
    lengths = jnp.full(tokens.shape[:1], tokens.shape[1], jnp.int32)
    hidden, _, _ = forward_prompt(model, tokens, lengths, attention=causal_attention)
    logits = unembed(model, hidden[:, :-1])  # float32 [B, T-1, V]
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1)[..., 0]
    parts = tuple(-(logp * w).sum() / jnp.maximum(w.sum(), 1.0)
                  for w in ((mask[:, 1:] == 1), (mask[:, 1:] == 2)))
    return parts[0] + parts[1], parts


def schedule(total_steps: int, lr: float, warmup: int = 500, decay_share: float = 0.2):
    """Warmup, constant, then a linear decay to lr/10 over the last `decay_share` of the steps
    (warmup-stable-decay): until the decay starts, a later run may still move total_steps."""
    decay = max(1, int(total_steps * decay_share))
    stable = max(0, total_steps - decay - warmup)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr),
         optax.linear_schedule(lr, lr / 10, decay)], [warmup, warmup + stable])


def optimizer(total_steps: int, lr: float):
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule(total_steps, lr), b1=0.9, b2=0.95, weight_decay=0.1))


def export(weights, path: Path) -> None:
    """HF format in bf16 (each file well under 16 MiB), loadable by transformers and kvjax.load."""
    model = Model(jax.tree.map(lambda w: w.astype(jnp.bfloat16), weights), CONFIG)
    save_hf(model, path)
    byte_tokenizer().save_pretrained(path)


def accuracy(path: Path, length: int, samples: int) -> dict:
    """Passkey and single-needle accuracy of the exported model at `length` (full cache)."""
    from kvjax.loading import load
    model, tokenizer = load(path), byte_tokenizer()
    result = {}
    for task in ("passkey", "niah_single"):
        rows = evaluation.make_samples(task, tokenizer, length, samples, seed=12345)
        result[task] = evaluation.run_samples(model, tokenizer, rows, policies.full(),
                                              max_new_tokens=12, progress=False)["score"]
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True, help="checkpoints; a later run resumes")
    parser.add_argument("--minutes", type=float, default=8.0, help="stop (and save) before this")
    parser.add_argument("--total-steps", type=int, default=20000, help="of the whole schedule")
    parser.add_argument("--tokens-per-step", type=int, default=32768)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--task-share", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--export", help="write the model in HF format here at the end")
    parser.add_argument("--eval-samples", type=int, default=20)
    parser.add_argument("--eval-length", type=int, default=4096)
    args = parser.parse_args()
    start = time.perf_counter()
    workdir = Path(args.workdir).absolute()
    text = stdlib_training_text()
    opt = optimizer(args.total_steps, args.lr)
    weights = jax.tree.map(lambda w: w.astype(jnp.float32),
                           init_random(CONFIG, jax.random.key(args.seed), jnp.float32).weights)
    state = {"weights": weights, "opt": opt.init(weights), "step": jnp.int32(0)}
    checkpointer = ocp.StandardCheckpointer()
    log_path = workdir / "log.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else []
    if (workdir / "state").exists():
        state = checkpointer.restore(workdir / "state", jax.eval_shape(lambda: state))
        print(f"resumed at step {int(state['step'])}", flush=True)

    @jax.jit
    def train_step(state, tokens, mask):
        (_, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["weights"], tokens,
                                                                      mask)
        updates, opt_state = opt.update(grads, state["opt"], state["weights"])
        return {"weights": optax.apply_updates(state["weights"], updates), "opt": opt_state,
                "step": state["step"] + 1}, jnp.stack(parts)

    deadline = start + 60 * args.minutes - 90  # room to save, export and evaluate
    step = int(state["step"])
    window = []
    while step < args.total_steps and time.perf_counter() < deadline:
        tokens, mask = batch(step, args.seed, args.tokens_per_step, text, args.task_share)
        state, loss = train_step(state, tokens, mask)
        step += 1
        window.append(loss)
        if step % 100 == 0 or step == args.total_steps:
            text_loss, answer_loss = np.mean(jax.device_get(window), axis=0)
            log.append({"step": step, "text_loss": float(text_loss),
                        "answer_loss": float(answer_loss), "seconds": time.perf_counter() - start})
            print(log[-1], flush=True)
            window = []
    checkpointer.save(workdir / "state", state, force=True)
    checkpointer.wait_until_finished()
    log_path.write_text(json.dumps(log))
    record = {**environment(), "config": CONFIG.to_dict(), "args": vars(args), "step": step,
              "parameters": sum(int(np.prod(w.shape)) for w in jax.tree.leaves(state["weights"])),
              "log": log}
    if args.export:
        export(state["weights"], Path(args.export))
        record["accuracy"] = accuracy(Path(args.export), args.eval_length, args.eval_samples)
        print(record["accuracy"], flush=True)
    write_result("reference_model_training", record)


if __name__ == "__main__":
    main()
