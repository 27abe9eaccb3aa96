"""Can an adapter learn to read a context that other experts wrote? MeteoRA routes each problem of a composite
through its own expert, so the expert answering problem i reads keys and values computed under the others'
(composite_gold_prefix.py: at n=10 that alone costs 2.1 of the oracle's 9.5). The suite trains every adapter
with all tokens of its composites through itself. Here one task's adapter is trained again by the suite's recipe
and items in two ways, in one plain loop (batches of 16, the recipe's steps and lr, fp32):
    control   LoRA on every token, as the suite trains (the loop's own baseline)
    masked    in composite items, LoRA only on the tokens of its own problem and its own answer; the other
              problems, their answers and the template through the base alone (singles: every token)
and each is measured, with the suite's adapter, on its task's lines of the bench's composites (0-shot, 40 per
n, the earlier answers given): teacher-routed (every problem's and earlier answer's tokens through the suite's
adapter of that problem, the template with the problem before it, the answer through the adapter measured), and
forced (the adapter measured on every token); and alone on its task's 100 eval samples. LoRA is applied per
token by a forward hook on each adapter's lora_B that multiplies its output by a 0/1 mask.

    cd benchmarks/results/chattasks/side_runs && python context_masked_adapter.py CHECKPOINT_MANIFEST OUT TASK
"""
import copy
import json
import random
import sys
import tempfile
import time

import torch
from peft import PeftModel

from meteora.evaluation import METRICS, composite_problems, load_benchmark, task_accuracy
from meteora.prompts import PromptFormat, encode_with_owners, pad_left, pad_right, position_ids
from meteora.registry import load_manifest, read_samples
from meteora.store import read_uri
from suites.chattasks import ChatTasksConfig, lora
from suites.chattasks.items import adapter_items, task_data

CHAT = PromptFormat("chat")
MASKS: dict[str, torch.Tensor] = {}  # adapter name -> [B, S, 1] of 0/1: where its LoRA applies (absent: everywhere)


def mask_lora(model) -> None:
    for module in list(model.modules()):
        if isinstance(getattr(module, "lora_B", None), torch.nn.ModuleDict):
            for name, b in module.lora_B.items():
                b.register_forward_hook(lambda _m, _a, out, name=name: out * MASKS[name] if name in MASKS else out)


def encode(tokenizer, item: lora.Item, masked: bool | str) -> tuple[list[int], list[int], list[int]]:
    """lora.encode_item's (ids, labels) and the LoRA mask of a composite item: masked=True, its own problem and
    answer only; "other problems", every token but the other problems' text in the user message."""
    joined = CHAT.composite(item.samples)
    prompt, prompt_owners, response, response_owners = encode_with_owners(
        tokenizer, CHAT, joined.prompt, joined.prompt_spans, joined.response, joined.response_spans, item.shots)
    labels = [-100] * len(prompt) + [t if o == item.own else -100 for t, o in zip(response, response_owners)]
    if not masked or len(item.samples) == 1:
        return prompt + response, labels, [1] * (len(prompt) + len(response))
    if masked == "other problems":
        _, unfilled, _, _ = encode_with_owners(tokenizer, CHAT, joined.prompt, joined.prompt_spans, "", (), item.shots, fill=False)
        return prompt + response, labels, [int(o in (-1, item.own)) for o in unfilled] + [1] * len(response)
    return prompt + response, labels, [int(o == item.own) for o in prompt_owners + response_owners]


def train(base, tokenizer, config: ChatTasksConfig, task: str, masked: bool | str):
    index = config.tasks.index(task)
    recipe = config.recipes[index]
    model = lora.lora_model(base, recipe.rank, recipe.targets, recipe.rslora, config.seed + index)
    mask_lora(model)
    encoded = [encode(tokenizer, item, masked) for item in adapter_items(task_data(config), config)[task]]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=recipe.steps, pct_start=0.1,
                                                   anneal_strategy="linear")
    rng = random.Random(config.seed + index)
    model.train()
    for _ in range(recipe.steps):
        rows = rng.sample(encoded, config.batch)
        batch = pad_right([r[0] for r in rows], tokenizer.pad_token_id)
        labels = pad_right([r[1] for r in rows], -100)["input_ids"]
        MASKS["default"] = pad_right([r[2] for r in rows], 0)["input_ids"].unsqueeze(-1).float()
        start = int((labels != -100).int().argmax(1).min()) - 1
        out = model(**batch, logits_to_keep=labels.shape[1] - start)
        loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, start + 1:].flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    MASKS.clear()
    return model.eval()


def _prefix(problem, i: int) -> str:
    return "".join(f"{k + 1}. {s['response']}\n" for k, s in enumerate(problem.samples[:i])) + f"{i + 1}."


@torch.no_grad()
def in_context(model, bench, task: str, adapter: str, n: int, routed: bool, max_new_tokens: int = 32) -> float:
    """Exact match on task's lines of the bench's composite-n prompts, earlier answers given; `adapter` answers."""
    tokenizer, names = bench.tokenizer, list(bench.adapters)
    asked = [(p, p.tasks.index(task)) for p in composite_problems(bench.eval_sets, n, 40, CHAT) if task in p.tasks]
    rows, owners = [], []
    for problem, i in asked:
        ids, prompt_owners, _, _ = encode_with_owners(tokenizer, CHAT, problem.joined.prompt, problem.joined.prompt_spans, "", ())
        prefix = _prefix(problem, i)
        starts = [0] + [j + 1 for j, char in enumerate(prefix) if char == "\n"]  # line k: answer k; its "\n" too
        encoded = tokenizer(prefix, add_special_tokens=False, return_offsets_mapping=True)
        rows.append(ids + encoded["input_ids"])
        owners.append(prompt_owners[:-1] + [0] + [max(k for k, a in enumerate(starts) if a <= o) for o, _ in encoded["offset_mapping"]])
    batch = pad_left(rows, tokenizer.pad_token_id)
    mask, positions = batch["attention_mask"], position_ids(batch["attention_mask"])

    def token_mask(on) -> torch.Tensor:  # [B, S, 1]: 1 where on(the task of the token's problem)
        return pad_left([[int(on(p.tasks[o])) for o in row] for (p, _), row in zip(asked, owners)], 0)["input_ids"].unsqueeze(-1).float()

    others = [name for name in names if name != task]
    for name in others:
        MASKS[name] = token_mask(lambda owner, name=name: routed and owner == name)
    MASKS[adapter] = token_mask(lambda owner: not routed or owner == task)
    model.base_model.set_adapter(others + [adapter])
    out = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    generated = []
    for _ in range(max_new_tokens):
        token = out.logits[:, -1].argmax(-1)
        generated.append(token)
        for name in MASKS:
            MASKS[name] = torch.full((len(asked), 1, 1), float(name == adapter))
        mask = torch.cat([mask, torch.ones(len(asked), 1, dtype=mask.dtype)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=token.view(-1, 1), attention_mask=mask, position_ids=positions, cache=out.cache, use_cache=True)
    MASKS.clear()
    texts = tokenizer.batch_decode([r[:r.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in r else r
                                    for r in torch.stack(generated, 1).tolist()], skip_special_tokens=True)
    metric = METRICS[bench.metrics[task]]
    return sum(metric(CHAT.answers(_prefix(p, i) + t, n)[i], p.samples[i]["response"]) for (p, i), t in zip(asked, texts)) / len(asked)


def main() -> None:
    manifest, out_path, task = sys.argv[1], sys.argv[2], sys.argv[3]
    bench = load_benchmark(load_manifest(manifest), samples=30)
    spec = next(s for s in load_manifest(manifest).adapters if s.name == task)
    full_eval = read_samples(read_uri(spec.data["eval"]), spec.data["eval"])  # all 100
    config, result = ChatTasksConfig(), {"command": "cd benchmarks/results/chattasks/side_runs && python " + " ".join(sys.argv)}
    names = list(bench.adapters)
    model = PeftModel.from_pretrained(copy.deepcopy(bench.base), bench.adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(bench.adapters[name], adapter_name=name)
    with tempfile.TemporaryDirectory() as tmp:
        for variant, masked in (("control", False), ("masked", True)):
            started = time.perf_counter()
            trained = train(bench.base, bench.tokenizer, config, task, masked)
            trained.save_pretrained(f"{tmp}/{variant}")
            result[f"{variant} train_seconds"] = round(time.perf_counter() - started, 1)
            model.load_adapter(f"{tmp}/{variant}", adapter_name=f"{task}_{variant}")
            del trained
    mask_lora(model)
    model.eval()
    for adapter in (task, f"{task}_control", f"{task}_masked"):
        model.base_model.set_adapter(adapter)
        row = {"alone (100 eval samples)": task_accuracy(model, bench.tokenizer, full_eval, CHAT, bench.metrics[task])}
        for n in (5, 10):
            row[f"composite-{n} teacher-routed"] = in_context(model, bench, task, adapter, n, routed=True)
            row[f"composite-{n} forced"] = in_context(model, bench, task, adapter, n, routed=False)
        result[adapter] = {k: round(v, 3) for k, v in row.items()}
        print(adapter, result[adapter], flush=True)
        json.dump(result, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main()
