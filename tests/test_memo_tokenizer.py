"""The training loop's MemoTokenizer gives exactly the tokenizer's tensors, from ids stored once per caption."""

from __future__ import annotations

import random

import pytest
import torch

from pipeline.students.preprocess import MemoTokenizer, TextTokenizer


@pytest.fixture(scope="module")
def minilm():
    return TextTokenizer.from_dir("minilm", 12)


def _captions(n: int, rng: random.Random) -> list[str]:
    words = "a red apple dog on the bicycle in rain flag of a country grinning face with smiling eyes".split()
    # lengths from 1 word to well past max_len tokens (truncated), some repeated within a batch
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 20))) for _ in range(n)]


def test_memo_batches_equal_the_tokenizers_own(minilm):
    rng = random.Random(0)
    pool = _captions(40, rng)
    memo = MemoTokenizer(minilm)
    for _ in range(30):
        batch = [rng.choice(pool) for _ in range(rng.randint(1, 16))]
        got, want = memo(batch), minilm(batch)
        assert set(got) == set(want) == {"input_ids", "attention_mask"}
        for key in want:
            assert torch.equal(got[key], want[key]), key
    assert len(memo._ids) <= len(pool)  # each caption stored once


def test_over_its_limit_it_tokenizes_as_the_tokenizer_does(minilm):
    memo = MemoTokenizer(minilm, limit=3)
    batch = ["one", "two words", "three more words", "four"]
    assert torch.equal(memo(batch)["input_ids"], minilm(batch)["input_ids"]) and memo._ids == {}
    assert torch.equal(memo(batch[:2])["attention_mask"], minilm(batch[:2])["attention_mask"])
    assert len(memo._ids) == 2


def test_open_clip_tokens_and_bad_input_go_to_the_tokenizer():
    oc = TextTokenizer("open_clip", 16)
    assert torch.equal(MemoTokenizer(oc)(["a cat", "a dog"])["input_ids"], oc(["a cat", "a dog"])["input_ids"])
    from pipeline.common.errors import PipelineError

    with pytest.raises(PipelineError, match="captions must be strings"):
        MemoTokenizer(TextTokenizer.from_dir("minilm", 12))(["fine", 3])
