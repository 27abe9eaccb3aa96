"""Exact match generates no further than an answer could still score: the longest reference (in tokens) plus a
margin, and the answers are the full-length ones cut there."""
from meteora_moe.evaluation import answer_budget, composite_problems, composite_shots, generate_answers
from meteora_moe.prompts import prompt_format
from suites.tinytasks import char_tokenizer
from tiny import tiny_base

TOKENIZER = char_tokenizer()  # one token per character
PLAIN = prompt_format("plain")
SAMPLES = [{"prompt": "reverse: abc\n", "response": "cba"}, {"prompt": "double: abcd\n", "response": "aabbccdd"}]


def test_exact_match_generates_up_to_the_longest_reference_and_a_margin():
    assert answer_budget(TOKENIZER, SAMPLES, "exact_match", margin=4) == 8 + 4
    assert answer_budget(TOKENIZER, SAMPLES, "contains", most=24) == 24  # a longer answer may still score
    assert answer_budget(TOKENIZER, [{"prompt": "p", "response": "x" * 40}], "exact_match", most=24) == 24


def test_capped_answers_are_the_full_length_ones_cut():
    model, prompts = tiny_base(vocab=len(TOKENIZER)), [s["prompt"] for s in SAMPLES]
    full = generate_answers(model, TOKENIZER, prompts, PLAIN)
    budget = answer_budget(TOKENIZER, SAMPLES, "exact_match")
    capped = generate_answers(model, TOKENIZER, prompts, PLAIN, max_new_tokens=budget)
    assert capped == [answer[:budget] for answer in full] and max(map(len, full)) > budget


def test_worked_composites_never_hand_over_a_question_s_answer():
    eval_sets = {task: [{"prompt": f"{task} {i}\n", "response": f"{task}{i}"} for i in range(6)] for task in "abcd"}
    questions = composite_problems(eval_sets, 3, 5, PLAIN)
    asked = {s["response"] for question in questions for s in question.samples}
    shots = composite_shots(eval_sets, 3, 20, PLAIN, questions)
    assert len(shots) == 20 and not asked & {answer for _, response in shots for answer in response.split("\n")}
    chat = prompt_format("chat")
    assert chat.answers("42", 1) == ["42"] and chat.answers("1. 4\n2. 2", 2) == ["4", "2"]  # one problem: unnumbered
