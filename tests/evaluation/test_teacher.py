"""Perfect routing (teacher-routed generation) does what it says: every token it generates is what a teacher-forced
forward pass predicts under the routing it claims (each problem's tokens and each answer's tokens to its task's
expert), KV cache and left padding included."""
import copy

import torch

from meteora_moe import MeteoraModel
from meteora_moe.evaluation import CompositeProblem, teacher_routed_tokens
from meteora_moe.prompts import encode_with_owners, prompt_format
from suites.tinytasks import char_tokenizer
from tiny import ALL_MODULES, make_adapter, tiny_base

TOKENIZER = char_tokenizer()
PLAIN = prompt_format("plain")


def test_teacher_routed_generation_matches_a_teacher_forced_pass(tmp_path):
    base = tiny_base(vocab=len(TOKENIZER))
    adapters = {name: make_adapter(base, tmp_path / name, 4, 8, ALL_MODULES, seed=i) for i, name in enumerate("abc")}
    model = MeteoraModel.from_adapters(copy.deepcopy(base), adapters, top_k=2)
    problems = [CompositeProblem(tasks, samples, PLAIN.composite(samples)) for tasks, samples in (
        (["a", "c"], [{"prompt": "reverse: ab\n", "response": "ba"}, {"prompt": "upper: cd\n", "response": "CD"}]),
        (["b", "a", "c"], [{"prompt": "sort: dcb\n", "response": "bcd"}, {"prompt": "x: y\n", "response": "y"},
                           {"prompt": "double: ef\n", "response": "eeff"}]))]
    outputs = teacher_routed_tokens(model, TOKENIZER, problems, PLAIN, max_new_tokens=12)
    assert all(1 <= len(tokens) <= 12 for tokens in outputs)
    for problem, generated in zip(problems, outputs):
        experts = [model.expert_names.index(t) for t in problem.tasks]
        prompt, owners, _, _ = encode_with_owners(TOKENIZER, PLAIN, problem.joined.prompt, problem.joined.prompt_spans,
                                                  "", (), fill=False)
        routes = [experts[o] if o >= 0 else -1 for o in owners[:-1]] + [experts[0]]
        for j in range(len(generated) - 1):  # the position of generated token j continues the answer its text is in
            line = TOKENIZER.decode(generated[:j + 1], skip_special_tokens=True).count("\n")
            routes.append(experts[min(line, len(experts) - 1)])
        ids = torch.tensor([prompt + generated[:-1]])
        with torch.no_grad(), model.route_tokens(torch.tensor([routes])):
            predicted = model(ids).logits[0, len(prompt) - 1:].argmax(-1).tolist()
        assert predicted == generated
