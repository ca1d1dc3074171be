"""Incremental detokenization: never a broken character, the same text as decoding all at once."""
from __future__ import annotations

from engine.detokenizer import IncrementalDetokenizer

TEXTS = ["Hello, world!", "naïve café — 東京タワー 🌍🚀 done", "  leading spaces\nand\ttabs", "😀😃😄 emoji run"]


def test_incremental_text_equals_full_decode_and_never_shows_a_broken_character(tokenizer):
    prompt = tokenizer.encode("Say:")
    for text in TEXTS:
        ids = tokenizer.encode(text)
        detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=True, stop=[])
        for token_id in ids:
            detok.add_token(token_id)
            assert "\ufffd" not in detok.text
        assert detok.text == tokenizer.decode(ids, skip_special_tokens=True)


def test_special_tokens_are_skipped_or_kept_as_asked(tokenizer):
    ids = tokenizer.encode("Hi") + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    for skip, expected in ((True, "Hi"), (False, "Hi<|im_end|>")):
        detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=skip, stop=[])
        for token_id in ids:
            detok.add_token(token_id)
        assert detok.text == expected


def test_text_that_may_start_a_stop_string_is_held_back(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True, stop=["STOP here"])
    for token_id in tokenizer.encode("abc ST"):
        detok.add_token(token_id)
    assert detok.visible_text(finished=False) == "abc "
    assert detok.visible_text(finished=True) == "abc ST"
