"""Prompt formats: how {"prompt", "response"} samples become tokens, for training, generation and composites.

    plain   <bos> prompt response <eos>                         any causal LM (the embedded tinytasks' format)
    chat    the tokenizer's chat template around one user message holding the prompt, then response <eos>:
            how adapters of instruct models are trained (manifest `prompt_format: chat`)
A composite asks n problems in one prompt and answers them in order:
    plain   the prompts one after the other; the answers one per line
    chat    the MeteoRA paper's protocol: the problems numbered in one user message ("1. ...", "2. ..."), the
            answers numbered the same way, one per line; optionally few-shot (earlier user/assistant turns)
Each problem's text is a span, so every token can be told which problem it belongs to (gate-training labels),
through the offsets of a fast tokenizer, whatever its vocabulary.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["FORMATS", "Composite", "PromptFormat", "chat_ids", "composite", "encode_with_owners", "fill_owners",
           "prompt_format"]

FORMATS = ("plain", "chat")
NUMBERED = re.compile(r"^\s*(\d+)[.)]\s?(.*)$")  # an answer line "3. text" (or "3) text")
LINE_NUMBER = re.compile(r"^\s*(\d+)")  # a line being written that starts "3" already continues answer 3


@dataclass(frozen=True)
class Composite:
    """n problems asked in one prompt. spans: (start, end) of problem i's text in `prompt` and of answer i in
    `response`."""

    prompt: str
    response: str
    prompt_spans: tuple[tuple[int, int], ...]
    response_spans: tuple[tuple[int, int], ...]

    def sample(self) -> dict:
        return {"prompt": self.prompt, "response": self.response}


@dataclass(frozen=True)
class PromptFormat:
    name: str  # "plain" | "chat"

    @property
    def numbered(self) -> bool:
        return self.name == "chat"

    def render(self, tokenizer, prompt: str, shots: tuple[tuple[str, str], ...] = ()) -> str:
        """The text the model reads before the response (chat: the template, with `shots` as earlier turns)."""
        if self.name == "plain" or not getattr(tokenizer, "chat_template", None):
            return "".join(p + r + "\n" for p, r in shots) + prompt
        turns = [m for p, r in shots for m in ({"role": "user", "content": p}, {"role": "assistant", "content": r})]
        messages = turns + [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def prompt_ids(self, tokenizer, prompt: str, shots: tuple[tuple[str, str], ...] = ()) -> list[int]:
        """Token ids of render(prompt): <bos> first in the plain format, the template's own tokens in chat."""
        bos = [tokenizer.bos_token_id] if self.name == "plain" and tokenizer.bos_token_id is not None else []
        return bos + tokenizer(self.render(tokenizer, prompt, shots), add_special_tokens=False)["input_ids"]

    def completion_ids(self, tokenizer, text: str) -> list[int]:
        """A raw completion prompt (OpenAI's /v1/completions): <bos> text in plain, the text alone in chat."""
        return self.prompt_ids(tokenizer, text) if self.name == "plain" else tokenizer(text, add_special_tokens=False)["input_ids"]

    def composite(self, samples: list[dict]) -> Composite:
        """Several samples as one: the prompts in order (numbered in chat), the answers one per line. A composite
        of one sample is that sample, as it is asked alone."""
        if len(samples) == 1:
            return _joined([samples[0]["prompt"]], "", [samples[0]["response"]])
        if self.numbered:
            prompts = [f"{i}. {s['prompt'].strip()}" for i, s in enumerate(samples, 1)]
            answers = [f"{i}. {s['response']}" for i, s in enumerate(samples, 1)]
            return _joined(prompts, "\n", answers)
        return _joined([s["prompt"] for s in samples], "", [s["response"] for s in samples])

    def next_answer(self, written: str, n: int) -> int:
        """Which of a composite's n answers (0-based) the next token of its response belongs to, from the response
        written so far: the line being written, the next one once a line ends (chat: by the number last written).
        Gate training labels every response token with this (meteora_moe.training.gate_batch)."""
        lines = written.split("\n")
        if not self.numbered:
            return min(len(lines) - 1, n - 1)
        numbers = [int(m[1]) for m in map(LINE_NUMBER.match, lines) if m]
        return min(max(numbers[-1] - 1 + written.endswith("\n"), 0), n - 1) if numbers else 0

    def answers(self, response: str, n: int) -> list[str]:
        """The n answers of a composite's response ("" for a missing one): by line, or by number in chat."""
        lines = response.split("\n")
        if not self.numbered or n == 1:  # a composite of one sample is that sample, unnumbered
            return (lines + [""] * n)[:n]
        found = {}
        for line in lines:
            match = NUMBERED.match(line)
            if match and 1 <= int(match[1]) <= n:
                found.setdefault(int(match[1]), match[2])
        return [found.get(i, "") for i in range(1, n + 1)]


def prompt_format(name: str) -> PromptFormat:
    if name not in FORMATS:
        raise ValueError(f"prompt format {name!r} is unknown: use one of {list(FORMATS)}")
    return PromptFormat(name)


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Chat messages [{role, content}] as the prompt of the assistant's reply: the tokenizer's chat template, or
    without one the contents one per line in the plain format."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return PromptFormat("plain").prompt_ids(tokenizer, "".join(m["content"] + "\n" for m in messages))


def composite(samples: list[dict]) -> dict:
    """The plain format's composite of several samples, as a sample."""
    return PromptFormat("plain").composite(samples).sample()


def encode_with_owners(tokenizer, fmt: PromptFormat, prompt: str, spans, response: str, answer_spans,
                       shots: tuple[tuple[str, str], ...] = (), fill: bool = True) -> tuple[list[int], list[int], list[int], list[int]]:
    """(prompt ids, their owners, response ids + <eos>, their owners): the owner of a token is the index of the
    problem whose span holds its first character. Scaffolding (template, <bos>, few-shot turns) is -1, or with
    `fill` belongs to the problem before it (the first, at the start); <eos> to the last answer."""
    rendered = fmt.render(tokenizer, prompt, shots)
    found = rendered.rfind(prompt.strip())  # the final user message (a template may trim its whitespace)
    if found < 0:
        raise ValueError("the chat template does not keep the user message's text: its tokens cannot be labelled")
    start = found - (len(prompt) - len(prompt.lstrip()))
    ids, owners = _owned(tokenizer, rendered, [(start + a, start + b) for a, b in spans])
    if fmt.name == "plain" and tokenizer.bos_token_id is not None:
        ids, owners = [tokenizer.bos_token_id] + ids, [-1] + owners
    answer_ids, answer_owners = _owned(tokenizer, response, answer_spans)
    answer_owners += [-1]
    return ids, fill_owners(owners) if fill else owners, answer_ids + [tokenizer.eos_token_id], fill_owners(answer_owners) if fill else answer_owners


def _joined(prompts: list[str], separator: str, answers: list[str]) -> Composite:
    return Composite(separator.join(prompts), "\n".join(answers), _spans(prompts, separator), _spans(answers, "\n"))


def _spans(parts: list[str], separator: str) -> tuple[tuple[int, int], ...]:
    spans, position = [], 0
    for part in parts:
        spans.append((position, position + len(part)))
        position += len(part) + len(separator)
    return tuple(spans)


def _owned(tokenizer, text: str, spans) -> tuple[list[int], list[int]]:
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    owners = [next((i for i, (a, b) in enumerate(spans) if a <= start < b), -1) for start, _ in encoded["offset_mapping"]]
    return encoded["input_ids"], owners


def fill_owners(owners: list[int]) -> list[int]:
    """Tokens outside every span take the owner before them (the first owner at the start; 0 when none)."""
    first = next((o for o in owners if o >= 0), 0)
    filled, current = [], first
    for owner in owners:
        current = owner if owner >= 0 else current
        filled.append(current)
    return filled
