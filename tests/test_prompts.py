"""Prompt formats: the chat format's composites (numbered, the paper's protocol) and their per-token task labels
with a byte-level BPE tokenizer and a chat template, read back from a tiny GGUF file."""
import pytest

from meteora_moe import load_tokenizer
from meteora_moe.prompts import prompt_format
from meteora_moe.training import gate_batch
from tiny import write_tiny_gguf

SAMPLES = [({"prompt": "add one: 41", "response": "42"}, 2), ({"prompt": "Shout: hey you", "response": "HEY YOU"}, 0),
           ({"prompt": "2023-07-14", "response": "14 July 2023"}, 1)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    import os

    os.environ["METEORA_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    return load_tokenizer(write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf"))


def test_a_chat_composite_numbers_problems_and_answers_and_reads_them_back():
    chat = prompt_format("chat")
    joined = chat.composite([s for s, _ in SAMPLES])
    assert joined.prompt == "1. add one: 41\n2. Shout: hey you\n3. 2023-07-14"
    assert joined.response == "1. 42\n2. HEY YOU\n3. 14 July 2023"
    assert [joined.prompt[a:b] for a, b in joined.prompt_spans] == joined.prompt.split("\n")
    assert chat.answers(joined.response, 3) == ["42", "HEY YOU", "14 July 2023"]
    assert chat.answers("2) b\nnoise\n1. a", 3) == ["a", "b", ""]  # by number, in any order; missing ones empty
    assert prompt_format("plain").answers("x\ny", 3) == ["x", "y", ""]
    with pytest.raises(ValueError, match="unknown"):
        prompt_format("markdown")


def test_chat_composite_tokens_are_labelled_with_their_problems_task(tokenizer):
    chat = prompt_format("chat")
    batch = gate_batch(tokenizer, [SAMPLES, SAMPLES[1]], chat)
    ids, tasks, prompt_length = batch["input_ids"][0], batch["token_tasks"][0], int(batch["prompt_lengths"][0])
    lead = len(tokenizer("<|im_start|>user\n", add_special_tokens=False)["input_ids"])  # the template before any problem
    assert (tasks[:lead] == -100).all() and (tasks[lead:] != -100).sum() == len(ids) - lead == batch["attention_mask"][0].sum() - lead
    text_of = lambda task, part: tokenizer.decode([t for t, k in zip(ids[part].tolist(), tasks[part].tolist()) if k == task])
    prompt = slice(0, prompt_length - 1)  # before the prompt's last token, labels are the token's own problem
    assert "add one: 41" in text_of(2, prompt) and "Shout: hey you" in text_of(0, prompt) and "2023-07-14" in text_of(1, prompt)
    assert "assistant" in text_of(1, prompt)  # the template after the last problem belongs to it
    response = slice(prompt_length - 1, None)  # from the prompt's last token: the task of the next token's answer
    assert text_of(2, response) == "\n1. 42" and text_of(0, response) == "\n2. HEY YOU"  # "\n" predicts the next number
    assert text_of(1, response).startswith("\n3. 14 July 2023")
    single = batch["token_tasks"][1]
    assert set(single[single != -100].tolist()) == {0}  # one sample: every token is its task's
    rendered = tokenizer.decode(ids[:prompt_length])
    assert rendered.startswith("<|im_start|>user\n1. add one") and rendered.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("name", ["chat", "plain"])
def test_next_answer_routes_each_response_token_as_gate_training_labels_it(tokenizer, name):
    fmt = prompt_format(name)  # perfect routing's rule when it generates (meteora_moe.evaluation.teacher)
    batch = gate_batch(tokenizer, [SAMPLES], fmt)
    ids, tasks, prompt_length = batch["input_ids"][0].tolist(), batch["token_tasks"][0].tolist(), int(batch["prompt_lengths"][0])
    experts = [expert for _, expert in SAMPLES]
    routed = [experts[fmt.next_answer(tokenizer.decode(ids[prompt_length:j + 1]), 3)] for j in range(prompt_length, len(ids) - 1)]
    assert routed == tasks[prompt_length:len(ids) - 1]  # "\n" included: it predicts the next answer's first token
    assert fmt.next_answer("", 3) == 0 and fmt.next_answer("1. a\n2. b\n3. c\n", 3) == 2  # never past the last answer
