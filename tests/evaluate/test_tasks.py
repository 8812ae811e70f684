"""The offline lm-eval tasks run end to end on a tiny local checkpoint with the Hub switched off."""

import json

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

from polypythia.evaluate.downstream import TASK_NAMES, TASKS_DIR, TaskError, evaluate_checkpoint  # noqa: E402

ITEMS = 40  # of 200 per task: keeps the test quick


def save_byte_tokenizer(folder) -> int:
    """A byte-level BPE with no merges (256 byte tokens + end of text); returns its vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {char: i for i, char in enumerate(sorted(byte_chars))}
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")
    wrapped.save_pretrained(folder)
    return len(vocab)


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    folder = tmp_path_factory.mktemp("checkpoint")
    vocab_size = save_byte_tokenizer(folder)
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        rotary_pct=0.25,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        max_position_embeddings=512,
    )
    GPTNeoXForCausalLM(config).save_pretrained(folder)
    return folder


def test_shipped_items_are_well_formed():
    for line in (TASKS_DIR / "stdlib_next_line.jsonl").read_text().splitlines():
        item = json.loads(line)
        assert len(item["choices"]) == 4 and 0 <= item["answer"] < 4
    for line in (TASKS_DIR / "stdlib_cloze.jsonl").read_text().splitlines():
        item = json.loads(line)
        assert item["target"] and item["context"]


@pytest.mark.slow
def test_random_model_runs_offline_at_about_chance(checkpoint_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    results = evaluate_checkpoint(checkpoint_dir, batch_size=32, limit_items=ITEMS)
    assert set(results) == set(TASK_NAMES)
    next_line = results["polypythia_stdlib_next_line"]
    assert next_line.predictions.shape == (ITEMS,) and set(next_line.predictions) <= {0, 1, 2, 3}
    answers = np.array(
        [json.loads(row)["answer"] for row in (TASKS_DIR / "stdlib_next_line.jsonl").read_text().splitlines()][:ITEMS]
    )
    assert next_line.accuracy == pytest.approx(np.mean(next_line.predictions == answers))
    assert 0.05 < next_line.accuracy < 0.6  # untrained: about chance (0.25)
    cloze = results["polypythia_stdlib_cloze"]
    assert cloze.accuracy == pytest.approx(cloze.predictions.mean())


def test_unknown_task_is_refused(checkpoint_dir):
    with pytest.raises(TaskError, match="Unknown task"):
        evaluate_checkpoint(checkpoint_dir, tasks=("arc_easy",))
