"""The embedded demo pair: loads with transformers, writes Python, and matches metrics.json."""

import ast
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "specray" / "assets" / "demo"
PROMPTS = [
    "class Stack:",
    "import os\n\n\ndef read_lines(path):\n",
    pytest.param("def fibonacci(n):", marks=pytest.mark.xfail(
        strict=True, reason="the shipped target (held-out loss 4.24) repeats itself greedily and its docstring "
                            "does not close within 64 tokens; strict, so a better target makes this test fail "
                            "until it is moved up")),
]


def load_script():
    """tools/train_demo_pair.py as a module (it holds the evaluation helpers)."""
    spec = importlib.util.spec_from_file_location("train_demo_pair", REPO / "tools" / "train_demo_pair.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pair():
    """(target, draft, tokenizer) as shipped, in fp32."""
    torch.set_num_threads(1)
    return load_script().load_pair(DEMO)


def longest_parsing_prefix(text: str) -> str | None:
    """The longest cut of text at a line boundary that ast.parse accepts, or None."""
    lines = text.splitlines(keepends=True)
    for n in range(len(lines), 0, -1):
        candidate = "".join(lines[:n])
        try:
            ast.parse(candidate)
        except SyntaxError:
            continue
        return candidate
    return None


def test_files_and_configs():
    total = 0
    for member in ("target", "draft"):
        folder = DEMO / member
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (folder / name).is_file(), folder / name
        total += sum(f.stat().st_size for f in folder.iterdir())
        config = json.loads((folder / "config.json").read_text())
        assert config["dtype"] == "bfloat16"
        assert config["eos_token_id"] == config["bos_token_id"] == 0
        assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == (
            "PreTrainedTokenizerFast"
        )
    assert total <= 25 * 2**20


def test_load_with_auto_classes():
    tok = AutoTokenizer.from_pretrained(DEMO / "target")
    assert len(tok) == 8192 and tok.eos_token == "<|endoftext|>"
    assert tok.decode(tok("    x = {'a': 1}\n\n\tpass  \n")["input_ids"]) == "    x = {'a': 1}\n\n\tpass  \n"
    target = AutoModelForCausalLM.from_pretrained(DEMO / "target")
    draft = AutoModelForCausalLM.from_pretrained(DEMO / "draft")
    assert target.config.vocab_size == draft.config.vocab_size == len(tok)
    assert 6e6 <= target.num_parameters() <= 10e6
    assert draft.num_parameters() <= 2e6


def test_tokenizer_round_trips_held_out_module(pair):
    _, _, tok = pair
    text = Path(load_script().stdlib_files()[1][0]).read_text(encoding="utf-8")
    assert tok.decode(tok(text)["input_ids"]) == text


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_completion_is_python(pair, prompt):
    target, _, tok = pair
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    out = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=64)
    text = prompt + tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    text = text[:text.rfind("\n") + 1]  # the last line may be cut mid-statement: drop it
    parsed = longest_parsing_prefix(text)
    assert parsed is not None and parsed.startswith(prompt), text
    body = parsed[len(prompt):]
    assert body.strip() and body.endswith("\n"), text  # at least one full line beyond the prompt


def test_agreement_matches_metrics(pair):
    target, draft, tok = pair
    script = load_script()
    metrics = json.loads((DEMO / "metrics.json").read_text())
    figures = script.evaluate_pair(target, draft, script.heldout_tokens(tok), max_tokens=4096)
    assert figures["n_tokens"] == 4096
    assert abs(figures["greedy_agreement"] - metrics["greedy_agreement"]) <= 0.03
    assert abs(figures["target_loss"] - metrics["target"]["held_out_loss"]) <= 0.3
