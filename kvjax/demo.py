"""`kvjax demo`: a long-context retrieval prompt answered under each cache policy, side by side.

Until the trained reference model ships with the package, the demo runs a small random-weight
Llama-architecture model written to a local folder in HF format (through the same loader as any
checkpoint), so its answers are not meaningful: it shows the pipeline, the memory and the speed.
"""

import tempfile
from pathlib import Path

import jax

from kvjax import policies, sharing
from kvjax.config import ModelConfig
from kvjax.eval import make_samples
from kvjax.generate import generate
from kvjax.loading import load, save_hf
from kvjax.model import init_random
from kvjax.tokenizer import VOCAB_SIZE, byte_tokenizer

DEMO_CONFIG = ModelConfig(
    model_type="llama", vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=688,
    num_layers=4, num_heads=8, num_kv_heads=2, head_dim=32, max_position_embeddings=8192,
    rope_theta=500000.0, eos_token_ids=(258,), dtype="float32")


def random_checkpoint(path: Path) -> Path:
    """Writes the demo model (random weights, byte tokenizer) as an HF checkpoint at `path`."""
    save_hf(init_random(DEMO_CONFIG, jax.random.key(0)), path)
    byte_tokenizer().save_pretrained(path)
    return path


def run(context_tokens: int = 2048, max_new_tokens: int = 16) -> None:
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="kvjax-demo-") as folder:
        path = random_checkpoint(Path(folder))
        model = load(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    sample = make_samples("passkey", tokenizer, context_tokens, 1)[0]
    ids = tokenizer(sample.context + "\n" + sample.question).input_ids
    passkey = sample.answers[0]
    print("model: a random-weight Llama (4 layers, GQA 8/2) written as an HF checkpoint; its "
          "answers are not meaningful until the trained reference model ships")
    # KVSharer needs a plan: calibrated on standard-library text (any plan is as good as another
    # for random weights, hence threshold -1).
    plan = sharing.calibrate(model, sharing.stdlib_calibration_tokens(tokenizer), num_shared=1,
                             threshold=-1.0, progress=False)
    shared = {i: s for i, s in enumerate(plan.sources) if s != i}
    print(f"prompt: {len(ids)} tokens, passkey {passkey}; KVSharer plan (layer: source) {shared}\n")
    runs = {name: policies.by_name(name) for name in sorted(policies.PRESETS)}
    runs["kvsharer1+kivi2"] = policies.kvsharer(plan) + policies.kivi()
    runs["kvsharer1+minikv"] = policies.kvsharer(plan) + policies.minikv()
    print(f"{'policy':<16} {'cache MiB':>10} {'vs bf16':>8} {'prefill ms':>11} {'decode tok/s':>13}  answer")
    for name, policy in runs.items():
        out = generate(model, ids, policy, max_new_tokens=max_new_tokens)
        s = out.stats
        answer = tokenizer.decode(out.tokens[0], skip_special_tokens=True)
        print(f"{name:<16} {s.cache_bytes / 2**20:>10.2f} {s.compression:>+8.1%} "
              f"{s.prefill_seconds * 1e3:>11.1f} {s.decode_tokens_per_second:>13.1f}  {answer!r}")
