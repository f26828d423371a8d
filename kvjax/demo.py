"""`kvjax demo`: a long-context retrieval prompt answered under each cache policy, side by side,
by kvjax's bundled reference model (kvjax.REFERENCE_MODEL, loaded like any HF checkpoint)."""

from transformers import AutoTokenizer

from kvjax import policies, sharing
from kvjax.eval import make_samples
from kvjax.generate import generate
from kvjax.loading import REFERENCE_MODEL, load


def run(context_tokens: int = 4096, max_new_tokens: int = 12, seed: int = 0) -> None:
    model = load(REFERENCE_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE_MODEL)
    sample = make_samples("passkey", tokenizer, context_tokens, 1, seed)[0]
    ids = tokenizer(sample.context + "\n" + sample.question).input_ids
    print(f"model: kvjax's reference model ({REFERENCE_MODEL}), a byte-level Llama trained to "
          "retrieve from 4K-token contexts")
    # KVSharer shares the layer whose cache can be replaced by a dissimilar one's at the least
    # cost, calibrated on standard-library text.
    plan = sharing.calibrate(model, sharing.stdlib_calibration_tokens(tokenizer), num_shared=1,
                             threshold=0.5, progress=False)
    shared = {i: s for i, s in enumerate(plan.sources) if s != i}
    print(f"prompt: {len(ids)} tokens, passkey {sample.answers[0]}; KVSharer plan (layer: source) "
          f"{shared}\n")
    names = ["full", *sorted(set(policies.PRESETS) - {"full"})]
    runs = {name: policies.by_name(name) for name in names}
    runs[f"kvsharer{plan.num_shared}+kivi2"] = policies.kvsharer(plan) + policies.kivi()
    runs[f"kvsharer{plan.num_shared}+minikv"] = policies.kvsharer(plan) + policies.minikv()
    print(f"{'policy':<16} {'cache MiB':>10} {'saved':>8} {'prefill ms':>11} {'decode tok/s':>13}  answer")
    for name, policy in runs.items():
        out = generate(model, ids, policy, max_new_tokens=max_new_tokens)
        s = out.stats
        answer = tokenizer.decode(out.tokens[0], skip_special_tokens=True)
        print(f"{name:<16} {s.cache_bytes / 2**20:>10.2f} {s.compression:>8.1%} "
              f"{s.prefill_seconds * 1e3:>11.1f} {s.decode_tokens_per_second:>13.1f}  {answer!r}")
