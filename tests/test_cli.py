"""The `tokmodel generate` command a newcomer runs first."""
from __future__ import annotations

import re
import subprocess
import sys

from tests.reference import hf_greedy

QUESTION = "What is the capital of France?"


def test_generate_streams_the_greedy_completion_and_reports_tokens_per_second(hf_model, tokenizer):
    result = subprocess.run([sys.executable, "-m", "server.cli", "generate", QUESTION, "--max-tokens", "8",
                             "--dtype", "float32"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    text, _, stats = result.stdout.rpartition("\n\n[")
    chat = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)
    expected = hf_greedy(hf_model, chat, 8)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    expected = expected[:expected.index(end) + 1] if end in expected else expected
    assert text == tokenizer.decode(expected, skip_special_tokens=True)
    assert re.match(rf"{len(expected)} tokens in [0-9.]+ s: [0-9.]+ tokens/s overall", stats), stats
