"""Evaluation without downloads: RULER-style retrieval tasks generated on the fly, perplexity
under a cache policy, and LongBench from local jsonl files.

Every task sample is a context and a question. By default they are one prompt; in
question-agnostic mode (kvpress's convention) the policy compresses the context before the
question is seen, which is the honest setting for SnapKV-like methods that score from the last
queries. Samples are deterministic per (task, length, seed, index). A RULER sample scores the
fraction of its answers found in the output (case-insensitive string match, as RULER does); a
LongBench sample the best token F1 over its reference answers.
"""

import collections
import dataclasses
import json
import random
import re
import string
import sysconfig
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kvjax import policies
from kvjax.generate import continuation_logprobs, generate
from kvjax.model import Model

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@dataclasses.dataclass(frozen=True)
class Sample:
    task: str
    context: str  # compressed before the question in question-agnostic mode
    question: str
    answers: tuple[str, ...]  # RULER: all should appear in the output; LongBench: any one


def _word(rng: random.Random) -> str:
    """A pronounceable made-up key (no word the model could know beforehand)."""
    return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(3))


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _haystack(needles: list[str], question: str, length: int, tokenizer, rng) -> str:
    """Filler around the needles (in order, at random depths) so that context plus question
    take about `length` tokens (at most one filler sentence fewer)."""
    fixed = len(tokenizer(" ".join(needles) + "\n" + question).input_ids)
    unit = len(tokenizer(FILLER + " ").input_ids) - len(tokenizer("").input_ids)
    count = (length - fixed) // unit
    if count < 1:
        raise ValueError(f"a length of {length} tokens leaves no room for filler around the "
                         f"{fixed} tokens of needles and question: use at least {fixed + unit}")
    depths = sorted(rng.randint(0, count) for _ in needles)
    parts = [FILLER] * count
    for depth, needle in reversed(list(zip(depths, needles))):
        parts.insert(depth, needle)
    return " ".join(parts)


def passkey(length, tokenizer, rng) -> Sample:
    key = _number(rng, 5)
    question = "What is the pass key? The pass key is"
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    return Sample("passkey", _haystack([needle], question, length, tokenizer, rng), question, (key,))


def _magic(key, value):
    return f"One of the special magic numbers for {key} is: {value}."


def _ask(keys) -> str:
    names = " and ".join(keys)
    plural = "s" if len(keys) > 1 else ""
    verb = "are" if len(keys) > 1 else "is"
    return (f"What {verb} the special magic number{plural} for {names} mentioned in the provided "
            f"text? The special magic number{plural} for {names} mentioned in the provided text "
            f"{verb}")


def niah_single(length, tokenizer, rng) -> Sample:
    key, value = _word(rng), _number(rng, 7)
    question = _ask([key])
    return Sample("niah_single", _haystack([_magic(key, value)], question, length, tokenizer, rng),
                  question, (value,))


def niah_multikey(length, tokenizer, rng, num_keys=4) -> Sample:
    keys = list(dict.fromkeys(_word(rng) for _ in range(num_keys)))
    values = [_number(rng, 7) for _ in keys]
    asked = rng.randrange(len(keys))
    question = _ask([keys[asked]])
    needles = [_magic(k, v) for k, v in zip(keys, values)]
    return Sample("niah_multikey", _haystack(needles, question, length, tokenizer, rng), question,
                  (values[asked],))


def niah_multivalue(length, tokenizer, rng, num_values=4) -> Sample:
    key = _word(rng)
    values = [_number(rng, 7) for _ in range(num_values)]
    question = (f"What are all the special magic numbers for {key} mentioned in the provided "
                f"text? The special magic numbers for {key} mentioned in the provided text are")
    needles = [_magic(key, v) for v in values]
    return Sample("niah_multivalue", _haystack(needles, question, length, tokenizer, rng),
                  question, tuple(values))


def niah_multiquery(length, tokenizer, rng, num_keys=4, num_asked=2) -> Sample:
    keys = list(dict.fromkeys(_word(rng) for _ in range(num_keys)))
    values = [_number(rng, 7) for _ in keys]
    asked = sorted(rng.sample(range(len(keys)), min(num_asked, len(keys))))
    question = _ask([keys[i] for i in asked])
    needles = [_magic(k, v) for k, v in zip(keys, values)]
    return Sample("niah_multiquery", _haystack(needles, question, length, tokenizer, rng),
                  question, tuple(values[i] for i in asked))


def variable_tracking(length, tokenizer, rng, hops=4) -> Sample:
    names = list(dict.fromkeys("".join(rng.choice(string.ascii_uppercase) for _ in range(5))
                               for _ in range(hops + 1)))
    value = _number(rng, 5)
    needles = [f"VAR {names[0]} = {value}."]
    needles += [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    question = (f"Find all variables that are assigned the value {value} in the text above. "
                f"Answer: According to the chain(s) of variable assignment in the text above, "
                f"{len(names)} variables are assigned the value {value}, they are:")
    return Sample("variable_tracking", _haystack(needles, question, length, tokenizer, rng),
                  question, tuple(names))


TASKS = {f.__name__: f for f in (passkey, niah_single, niah_multikey, niah_multivalue,
                                 niah_multiquery, variable_tracking)}


def make_samples(task: str, tokenizer, length: int, num_samples: int, seed: int = 0) -> list[Sample]:
    """`num_samples` samples of a RULER-style task of about `length` tokens, the same for the
    same arguments."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    return [TASKS[task](length, tokenizer, random.Random(f"{task}/{length}/{seed}/{i}"))
            for i in range(num_samples)]


def ruler_score(sample: Sample, output: str) -> float:
    """Fraction of the sample's answers that appear in the output (case-insensitive)."""
    text = output.lower()
    return sum(a.lower() in text for a in sample.answers) / len(sample.answers)


def _normalized_words(text: str) -> list[str]:
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def f1_score(sample: Sample, output: str) -> float:
    """The best token F1 of the output against any reference answer (SQuAD / LongBench QA)."""
    got = _normalized_words(output)
    best = 0.0
    for answer in sample.answers:
        want = _normalized_words(answer)
        common = sum((collections.Counter(got) & collections.Counter(want)).values())
        if common:
            precision, recall = common / len(got), common / len(want)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def load_longbench(path) -> list[Sample]:
    """A LongBench jsonl file (fields context, input, answers, dataset), read locally."""
    samples = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = {"context", "input", "answers"} - row.keys()
        if missing:
            raise ValueError(f"{path}:{number} lacks {sorted(missing)}: not a LongBench jsonl line")
        samples.append(Sample(row.get("dataset", Path(path).stem), row["context"],
                              f"Question: {row['input']}\nAnswer:", tuple(row["answers"])))
    return samples


def run_samples(model: Model, tokenizer, samples: list[Sample], policy: policies.Policy,
                agnostic: bool = False, max_new_tokens: int = 32, scorer=ruler_score,
                progress: bool = True, batch_size: int = 1) -> dict:
    """Generates an answer to each sample under the policy, `batch_size` samples a batch (rows
    are independent: the answers do not depend on it), and scores it. Returns the mean score,
    the compression of the first batch's cache, and each sample's output."""
    rows, compression = [], None
    batches = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    for batch in tqdm(batches, desc=samples[0].task if samples else "", disable=not progress):
        contexts = [tokenizer(s.context).input_ids for s in batch]
        questions = [tokenizer("\n" + s.question, add_special_tokens=False).input_ids
                     for s in batch]
        if agnostic:
            out = generate(model, questions, policy, context=contexts,
                           max_new_tokens=max_new_tokens)
        else:
            out = generate(model, [c + q for c, q in zip(contexts, questions)], policy,
                           max_new_tokens=max_new_tokens)
        compression = out.stats.compression if compression is None else compression
        for sample, context, question, tokens in zip(batch, contexts, questions, out.tokens):
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            rows.append({"output": text, "answers": list(sample.answers),
                         "score": scorer(sample, text),
                         "prompt_tokens": len(context) + len(question)})
    return {"score": float(np.mean([r["score"] for r in rows])) if rows else float("nan"),
            "compression": compression, "samples": rows}


def stdlib_text(max_chars: int, skip_chars: int = 0) -> str:
    """Held-out text every Python has: the standard library's source from `skip_chars` on (the
    calibration and training text come from its beginning)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "".join(p.read_text(errors="ignore") for p in sorted(stdlib.glob("*.py"))[-40:])
    if len(text) < skip_chars + max_chars:
        raise ValueError(f"the standard library's last files hold only {len(text)} characters")
    return text[skip_chars:skip_chars + max_chars]


def perplexity(model: Model, ids, policy: policies.Policy | None = None,
               context_tokens: int | None = None) -> float:
    """exp(mean negative log-likelihood) of ids[context_tokens:] given the tokens before them,
    with the first context_tokens (default: half) prefilled and compressed under the policy."""
    ids = list(ids)
    context_tokens = len(ids) // 2 if context_tokens is None else context_tokens
    if not 0 < context_tokens < len(ids):
        raise ValueError(f"context_tokens={context_tokens} must leave tokens on both sides of "
                         f"{len(ids)} tokens")
    logprobs = continuation_logprobs(model, ids[:context_tokens], ids[context_tokens:], policy)
    return float(np.exp(-np.mean(logprobs, dtype=np.float64)))
