"""The `kvjax` command: `kvjax demo` (the main job), `generate`, `calibrate`, `eval`."""

import argparse
import json
import sys

from kvjax import policies
from kvjax.eval import TASKS
from kvjax.loading import REFERENCE_MODEL

MODEL_HELP = "checkpoint folder (config.json, safetensors, tokenizer); default: the bundled model"


def _print_stats(stats) -> None:
    print(f"cache: {stats.cache_bytes / 2**20:.2f} MiB allocated "
          f"({stats.compression:.1%} saved against a bf16 full cache) "
          f"| prefill {stats.prefill_seconds * 1e3:.1f} ms "
          f"| decode {stats.decode_tokens_per_second:.1f} tok/s "
          f"| compile {stats.compile_seconds:.1f} s")


def _policy(args) -> policies.Policy:
    """--policy, with --plan's layers shared when given."""
    from kvjax.sharing import SharingPlan

    policy = policies.by_name(args.policy)
    if args.plan:
        policy = policies.kvsharer(SharingPlan.load(args.plan)) + policy
    return policy


def cmd_generate(args) -> None:
    from transformers import AutoTokenizer

    import kvjax

    model = kvjax.load(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompt_ids = tokenizer(args.prompt).input_ids
    policy = _policy(args)
    out = kvjax.generate(model, prompt_ids, policy,
                         max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print(tokenizer.decode(out.tokens[0], skip_special_tokens=True))
    _print_stats(out.stats)


def cmd_calibrate(args) -> None:
    from transformers import AutoTokenizer

    import kvjax

    model = kvjax.load(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokens = kvjax.sharing.stdlib_calibration_tokens(tokenizer, args.prompts, args.prompt_tokens)
    plan = kvjax.sharing.calibrate(model, tokens, args.num_shared, args.threshold)
    plan.save(args.out)
    shared = {i: s for i, s in enumerate(plan.sources) if s != i}
    print(f"shared {plan.num_shared} of {len(plan.sources)} layers (layer: source) {shared}; "
          f"{len(plan.trials)} trials; plan written to {args.out}")


def cmd_eval(args) -> None:
    import jax
    from transformers import AutoTokenizer

    import kvjax
    from kvjax import eval as evaluation

    model = kvjax.load(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    policy = _policy(args)
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "model": args.model, "policy": policy.name, "length": args.length,
              "samples": args.samples, "seed": args.seed, "question_agnostic": args.agnostic,
              "tasks": {}}
    for task in filter(None, args.tasks.split(",")):
        samples = evaluation.make_samples(task, tokenizer, args.length, args.samples, args.seed)
        result["tasks"][task] = evaluation.run_samples(model, tokenizer, samples, policy,
                                                       args.agnostic, args.max_new_tokens)
    for path in args.longbench or ():
        samples = evaluation.load_longbench(path)[:args.samples]
        result["tasks"][f"longbench:{path}"] = evaluation.run_samples(
            model, tokenizer, samples, policy, args.agnostic, args.max_new_tokens,
            scorer=evaluation.f1_score)
    if args.perplexity_tokens:
        ids = tokenizer(evaluation.stdlib_text(8 * args.perplexity_tokens)).input_ids
        result["perplexity"] = evaluation.perplexity(model, ids[:args.perplexity_tokens], policy)
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    for name, task in result["tasks"].items():
        compression = f"{task['compression']:.1%}" if task["compression"] is not None else "n/a"
        print(f"{name:<24} score {task['score']:.3f}  cache {compression} saved vs bf16")
    if "perplexity" in result:
        print(f"{'perplexity':<24} {result['perplexity']:.3f}")
    if args.out:
        print(f"written to {args.out}")


def cmd_demo(args) -> None:
    from kvjax import demo

    demo.run(context_tokens=args.context_tokens, max_new_tokens=args.max_new_tokens,
             seed=args.seed)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="kvjax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text from a Hugging Face checkpoint")
    gen.add_argument("--model", default=str(REFERENCE_MODEL), help=MODEL_HELP)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--policy", default="full", choices=sorted(policies.PRESETS))
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--plan", help="a KVSharer plan (kvjax calibrate) to share layers' caches")
    gen.set_defaults(func=cmd_generate)

    cal = sub.add_parser("calibrate", help="find layers that can share a cache (KVSharer)")
    cal.add_argument("--model", default=str(REFERENCE_MODEL), help=MODEL_HELP)
    cal.add_argument("--num-shared", type=int, required=True, help="layers to share")
    cal.add_argument("--threshold", type=float, default=0.5,
                     help="minimum cosine similarity of the final hidden states")
    cal.add_argument("--prompts", type=int, default=30, help="calibration prompts (stdlib source)")
    cal.add_argument("--prompt-tokens", type=int, default=64)
    cal.add_argument("--out", required=True, help="where to write the plan (JSON)")
    cal.set_defaults(func=cmd_calibrate)

    ev = sub.add_parser("eval", help="score a policy on generated retrieval tasks, perplexity, LongBench")
    ev.add_argument("--model", default=str(REFERENCE_MODEL), help=MODEL_HELP)
    ev.add_argument("--policy", default="full", choices=sorted(policies.PRESETS))
    ev.add_argument("--plan", help="a KVSharer plan (kvjax calibrate) to share layers' caches")
    ev.add_argument("--tasks", default="passkey,niah_single",
                    help="comma separated, of: " + ", ".join(sorted(TASKS)))
    ev.add_argument("--length", type=int, default=1024, help="tokens per task sample")
    ev.add_argument("--samples", type=int, default=10, help="samples per task (and per LongBench file)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--agnostic", action="store_true",
                    help="compress the context before the question is seen")
    ev.add_argument("--max-new-tokens", type=int, default=32)
    ev.add_argument("--longbench", nargs="*", help="local LongBench jsonl files")
    ev.add_argument("--perplexity-tokens", type=int, default=0,
                    help="also the perplexity of this many held-out stdlib tokens (second half)")
    ev.add_argument("--out", help="write the JSON result here")
    ev.set_defaults(func=cmd_eval)

    dem = sub.add_parser("demo", help="compare cache policies on a long-context retrieval prompt")
    dem.add_argument("--context-tokens", type=int, default=4096)
    dem.add_argument("--max-new-tokens", type=int, default=12)
    dem.add_argument("--seed", type=int, default=0, help="which passkey prompt")
    dem.set_defaults(func=cmd_demo)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        sys.exit(f"kvjax {args.command}: error: {err}")


if __name__ == "__main__":
    main()
