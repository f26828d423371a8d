"""The `kvjax` command end to end on CPU."""

import re

import pytest

import kvjax
from kvjax.cli import main
from kvjax.tokenizer import VOCAB_SIZE, byte_tokenizer
from tests.conftest import build_hf_model


@pytest.fixture(scope="module")
def checkpoint_with_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli")
    build_hf_model("llama", vocab_size=VOCAB_SIZE).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def test_generate_command_matches_library(checkpoint_with_tokenizer, capsys):
    path = checkpoint_with_tokenizer
    main(["generate", "--model", str(path), "--prompt", "Hello kvjax", "--max-new-tokens", "7"])
    printed = capsys.readouterr().out
    expected = kvjax.generate(kvjax.load(path), list(b"Hello kvjax"), max_new_tokens=7).tokens[0]
    text = byte_tokenizer().decode(expected, skip_special_tokens=True)
    assert printed.startswith(text)
    assert re.search(r"cache: [\d.]+ MiB allocated", printed)


def test_generate_command_reports_bad_input(checkpoint_with_tokenizer):
    with pytest.raises(SystemExit, match="max_new_tokens must be >= 1"):
        main(["generate", "--model", str(checkpoint_with_tokenizer), "--prompt", "x",
              "--max-new-tokens", "0"])


def test_demo_runs(capsys):
    main(["demo", "--context-tokens", "300", "--max-new-tokens", "7"])
    printed = capsys.readouterr().out
    passkey = re.search(r"prompt: \d+ tokens, passkey (\d{5})", printed).group(1)
    assert re.search(rf"^full\s+.*'\s*{passkey}", printed, re.M)  # the bundled model retrieves
    for policy in ("full", "kivi2", "k4v2", "minikv", "snapkv", "h2o", "streaming",
                   "kvsharer1\\+kivi2", "kvsharer1\\+minikv"):
        assert re.search(rf"^{policy}\s+[\d.]+", printed, re.M)


def test_calibrate_then_generate_with_the_plan(checkpoint_with_tokenizer, tmp_path, capsys):
    path, plan_path = checkpoint_with_tokenizer, tmp_path / "plan.json"
    main(["calibrate", "--model", str(path), "--num-shared", "1", "--threshold", "-1",
          "--prompts", "4", "--prompt-tokens", "16", "--out", str(plan_path)])
    assert re.search(r"shared 1 of 3 layers", capsys.readouterr().out)
    plan = kvjax.sharing.SharingPlan.load(plan_path)
    main(["generate", "--model", str(path), "--prompt", "Hello", "--max-new-tokens", "5",
          "--plan", str(plan_path), "--policy", "k8v4"])
    printed = capsys.readouterr().out
    expected = kvjax.generate(kvjax.load(path), list(b"Hello"),
                              kvjax.policies.kvsharer(plan) + kvjax.policies.hetero(8, 4),
                              max_new_tokens=5).tokens[0]
    assert printed.startswith(byte_tokenizer().decode(expected, skip_special_tokens=True))
    with pytest.raises(SystemExit, match=r"num_shared must be in \[1, 2\]"):
        main(["calibrate", "--model", str(path), "--num-shared", "3", "--out", str(plan_path)])
