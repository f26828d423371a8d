"""kvjax.eval: task generators (deterministic, answerable from the context), scorers, the
LongBench loader, perplexity against transformers, and `kvjax eval` end to end."""

import json
import re

import numpy as np
import pytest
import torch

import kvjax
from kvjax import eval as evaluation
from kvjax import policies
from kvjax.cli import main
from kvjax.tokenizer import VOCAB_SIZE, byte_tokenizer
from tests.conftest import build_hf_model


@pytest.mark.parametrize("task", sorted(evaluation.TASKS))
@pytest.mark.parametrize("length", [700, 1500])
def test_tasks_are_deterministic_answerable_and_sized(task, length):
    tok = byte_tokenizer()
    samples = evaluation.make_samples(task, tok, length, 3, seed=5)
    assert samples == evaluation.make_samples(task, tok, length, 3, seed=5)
    assert samples != evaluation.make_samples(task, tok, length, 3, seed=6)
    assert len({s.answers for s in samples}) == 3  # samples differ from one another
    for s in samples:
        tokens = len(tok(s.context + "\n" + s.question).input_ids)
        assert length - 120 <= tokens <= length, tokens  # within one filler sentence or so
        for answer in s.answers:
            assert answer in s.context and answer not in s.question
            assert evaluation.ruler_score(s, f"... {answer.lower()} ...") == 1 / len(s.answers)
        assert evaluation.ruler_score(s, " ".join(s.answers)) == 1.0
        assert evaluation.ruler_score(s, "no idea") == 0.0
    with pytest.raises(ValueError, match="leaves no room for filler"):
        evaluation.make_samples(task, tok, 100, 1)


def test_variable_tracking_chain_leads_to_the_value():
    s = evaluation.make_samples("variable_tracking", byte_tokenizer(), 800, 1, seed=1)[0]
    assign = dict(re.findall(r"VAR (\w+) = (VAR \w+|\d+)\.", s.context))
    value = re.search(r"assigned the value (\d+)", s.question).group(1)

    def resolve(name):
        target = assign[name]
        return resolve(target[4:]) if target.startswith("VAR ") else target
    assert sorted(n for n in assign if resolve(n) == value) == sorted(s.answers)


def test_f1_score():
    s = evaluation.Sample("qa", "", "", ("The Eiffel Tower", "tower"))
    assert evaluation.f1_score(s, "the eiffel tower!") == 1.0
    assert evaluation.f1_score(s, "a tall tower") == pytest.approx(2 * 0.5 * 1 / 1.5)  # vs "tower"
    assert evaluation.f1_score(s, "Paris") == 0.0


def test_load_longbench(tmp_path):
    good = tmp_path / "qa.jsonl"
    good.write_text(json.dumps({"context": "c", "input": "q?", "answers": ["a"], "dataset": "hotpotqa"})
                    + "\n\n")
    (sample,) = evaluation.load_longbench(good)
    assert sample == evaluation.Sample("hotpotqa", "c", "Question: q?\nAnswer:", ("a",))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "c"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1 lacks \['answers', 'input'\]"):
        evaluation.load_longbench(bad)


def test_perplexity_matches_transformers(checkpoints, rng):
    path, hf = checkpoints("llama_gqa2")
    model = kvjax.load(path)
    ids = rng.integers(0, model.config.vocab_size, 70).tolist()
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].double()
    logprobs = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    expected = float(torch.exp(-logprobs[29:].mean()))  # tokens 30.. given those before
    assert evaluation.perplexity(model, ids, context_tokens=30) == pytest.approx(expected, rel=1e-4)
    # Compressing the context changes it; the result stays finite.
    compressed = evaluation.perplexity(model, ids, policies.h2o(heavy=4, recent=4), context_tokens=30)
    assert np.isfinite(compressed) and compressed != pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="must leave tokens on both sides"):
        evaluation.perplexity(model, ids, context_tokens=70)


def test_eval_command(tmp_path, capsys):
    checkpoint = tmp_path / "model"
    build_hf_model("llama", vocab_size=VOCAB_SIZE, max_position_embeddings=1024).save_pretrained(checkpoint)
    byte_tokenizer().save_pretrained(checkpoint)
    out = tmp_path / "result.json"
    longbench = tmp_path / "lb.jsonl"
    longbench.write_text(json.dumps({"context": "Alice went to Paris.", "input": "Where?",
                                     "answers": ["Paris"]}) + "\n")
    main(["eval", "--model", str(checkpoint), "--policy", "snapkv", "--tasks",
          "passkey,niah_multiquery", "--length", "700", "--samples", "2", "--agnostic",
          "--max-new-tokens", "4", "--longbench", str(longbench), "--perplexity-tokens", "64",
          "--out", str(out)])
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["policy"] == "snapkv" and result["question_agnostic"]
    assert set(result["tasks"]) == {"passkey", "niah_multiquery", f"longbench:{longbench}"}
    for task in result["tasks"].values():
        scores = [s["score"] for s in task["samples"]]
        assert task["score"] == pytest.approx(np.mean(scores))
        assert all(0 <= s <= 1 for s in scores)
    assert len(result["tasks"]["passkey"]["samples"]) == 2
    assert np.isfinite(result["perplexity"])
    assert re.search(r"^passkey\s+score [\d.]+", printed, re.M)


def test_training_batches_are_deterministic_and_mask_the_answers():
    from benchmarks import train_reference_model as train
    text = b"def f(x):\n    return x\n" * 400
    tokens, mask = train.batch(3, 0, 8192, text, task_share=1.0)
    again, _ = train.batch(3, 0, 8192, text, task_share=1.0)
    np.testing.assert_array_equal(tokens, again)
    assert tokens.shape[0] * tokens.shape[1] <= 8192 and tokens.shape[1] in train.LENGTHS
    for row, m in zip(tokens, mask):
        assert set(np.unique(m)) == {0, 2}  # task rows: loss on the answer only
        answer = row[m == 2]
        assert answer[-1] == train.EOS and (m == 2).sum() >= 2
        first = np.flatnonzero(m)[0]  # the answer follows the question and is in the context
        assert answer[0] == ord(" ")  # the prompt ends with the question, as kvjax.eval asks
        assert bytes(answer[1:-1].tolist()).decode().split(", ")[0] in bytes(
            row[:first].tolist()).decode()
    lm_tokens, lm_mask = train.batch(4, 0, 8192, text, task_share=0.0)
    assert (lm_mask == 1).all() and bytes(lm_tokens[0].tolist()) in text
