"""The `kvjax` command: `kvjax demo` (the main job), `kvjax generate`, `kvjax calibrate`."""

import argparse
import sys

from kvjax import policies


def _print_stats(stats) -> None:
    print(f"cache: {stats.cache_bytes / 2**20:.2f} MiB allocated "
          f"({stats.compression:+.1%} vs a bf16 full cache) | prefill {stats.prefill_seconds * 1e3:.1f} ms "
          f"| decode {stats.decode_tokens_per_second:.1f} tok/s | compile {stats.compile_seconds:.1f} s")


def cmd_generate(args) -> None:
    from transformers import AutoTokenizer

    import kvjax

    model = kvjax.load(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompt_ids = tokenizer(args.prompt).input_ids
    policy = policies.by_name(args.policy)
    if args.plan:
        policy = policies.kvsharer(kvjax.sharing.SharingPlan.load(args.plan)) + policy
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


def cmd_demo(args) -> None:
    from kvjax import demo

    demo.run(context_tokens=args.context_tokens, max_new_tokens=args.max_new_tokens)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="kvjax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text from a Hugging Face checkpoint")
    gen.add_argument("--model", required=True, help="checkpoint folder (config.json, safetensors, tokenizer)")
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
    cal.add_argument("--model", required=True, help="checkpoint folder (config.json, safetensors, tokenizer)")
    cal.add_argument("--num-shared", type=int, required=True, help="layers to share")
    cal.add_argument("--threshold", type=float, default=0.5,
                     help="minimum cosine similarity of the final hidden states")
    cal.add_argument("--prompts", type=int, default=30, help="calibration prompts (stdlib source)")
    cal.add_argument("--prompt-tokens", type=int, default=64)
    cal.add_argument("--out", required=True, help="where to write the plan (JSON)")
    cal.set_defaults(func=cmd_calibrate)

    dem = sub.add_parser("demo", help="compare cache policies on a long-context retrieval prompt")
    dem.add_argument("--context-tokens", type=int, default=2048)
    dem.add_argument("--max-new-tokens", type=int, default=16)
    dem.set_defaults(func=cmd_demo)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        sys.exit(f"kvjax {args.command}: error: {err}")


if __name__ == "__main__":
    main()
