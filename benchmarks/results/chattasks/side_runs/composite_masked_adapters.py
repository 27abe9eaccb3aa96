"""Perfect routing with the suite's adapters against the same 10 adapters trained with masked context
(`masked_adapters.py`), in PEFT: all 10 adapters active, each applied per token by a 0/1 mask on its lora_B
output (`context_masked_adapter.py`), every problem's tokens through its task's adapter (the template and numbers
with the problem before them), every generated token through the adapter of the answer it continues. The 40
composites per n of `composites_40.py` (0-shot, the same samples); and each adapter alone on its task's 100 eval
samples.

    cd benchmarks/results/chattasks/side_runs && python composite_masked_adapters.py MANIFEST OUT [LABEL=DIR ...]

Each LABEL=DIR names a set of retrained adapters (DIR/<task>/); OUT keeps the variants measured before.
"""
import copy
import json
import os
import re
import sys

import torch
from peft import PeftModel

from context_masked_adapter import CHAT, MASKS, mask_lora
from meteora.evaluation import composite_problems, composite_summary, load_benchmark, task_accuracy
from meteora.prompts import encode_with_owners, pad_left, position_ids
from meteora.registry import load_manifest, read_samples
from meteora.store import read_uri

LINE_NUMBER = re.compile(r"^\s*(\d+)")


@torch.no_grad()
def perfect_routing(model, bench, problems, adapter_of: dict[str, str], batch_size: int = 16) -> list[list[str]]:
    n, tokenizer = len(problems[0].tasks), bench.tokenizer
    model.base_model.set_adapter(list(adapter_of.values()))
    answers = []
    for start in range(0, len(problems), batch_size):
        part = problems[start:start + batch_size]
        rows, owners = [], []
        for problem in part:
            ids, prompt_owners, _, _ = encode_with_owners(tokenizer, CHAT, problem.joined.prompt, problem.joined.prompt_spans, "", ())
            rows.append(ids)
            owners.append(prompt_owners[:-1] + [0])  # the last prompt token predicts the first answer
        batch = pad_left(rows, tokenizer.pad_token_id)
        mask, positions = batch["attention_mask"], position_ids(batch["attention_mask"])
        for task, adapter in adapter_of.items():
            MASKS[adapter] = pad_left([[int(p.tasks[o] == task) for o in row] for p, row in zip(part, owners)], 0)["input_ids"].unsqueeze(-1).float()
        out = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        generated, done = [[] for _ in part], torch.zeros(len(part), dtype=torch.bool)
        for _ in range(16 * n):
            token = out.logits[:, -1].argmax(-1)
            for b in range(len(part)):
                if not done[b]:
                    generated[b].append(int(token[b]))
            done |= token == tokenizer.eos_token_id
            if done.all():
                break
            current = [p.tasks[_answer_index(tokenizer.decode(g, skip_special_tokens=True), n)] for p, g in zip(part, generated)]
            for task, adapter in adapter_of.items():
                MASKS[adapter] = torch.tensor([float(c == task) for c in current]).view(-1, 1, 1)
            mask = torch.cat([mask, torch.ones(len(part), 1, dtype=mask.dtype)], dim=1)
            positions = positions[:, -1:] + 1
            out = model(input_ids=token.view(-1, 1), attention_mask=mask, position_ids=positions, cache=out.cache, use_cache=True)
        MASKS.clear()
        answers += [CHAT.answers(tokenizer.decode(g, skip_special_tokens=True), n) for g in generated]
    return answers


def _answer_index(text: str, n: int) -> int:
    """Which answer (0-based) the next token continues: the last "k." line written so far (as teacher.py reads it)."""
    numbers = [int(m[1]) for m in map(LINE_NUMBER.match, text.split("\n")) if m]
    return min(max(numbers[-1] - 1, 0), n - 1) if numbers else 0


def main() -> None:
    manifest, out_path, retrained = sys.argv[1], sys.argv[2], dict(arg.split("=", 1) for arg in sys.argv[3:])
    bench = load_benchmark(load_manifest(manifest), samples=30)
    names = list(bench.adapters)
    model = PeftModel.from_pretrained(copy.deepcopy(bench.base), bench.adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(bench.adapters[name], adapter_name=name)
    variants = {"suite adapters": {t: t for t in names}}
    for k, (label, folder) in enumerate(retrained.items()):
        variants[label] = {t: f"{t}_{k}" for t in names}
        for name in names:
            model.load_adapter(f"{folder}/{name}", adapter_name=f"{name}_{k}")
    mask_lora(model)
    model.eval()
    result = json.load(open(out_path)) if os.path.exists(out_path) else {"composites_per_n": 40}
    result.setdefault("commands", []).append("cd benchmarks/results/chattasks/side_runs && python " + " ".join(sys.argv))
    for variant, adapter_of in variants.items():
        if variant in result:
            continue
        row = result.setdefault(variant, {"alone (100 eval samples)": {}})
        for n in (3, 5, 10):
            problems = composite_problems(bench.eval_sets, n, 40, CHAT)
            row[f"perfect routing, composite-{n}"] = composite_summary(problems, perfect_routing(model, bench, problems, adapter_of), bench.metrics)
            print(variant, n, row[f"perfect routing, composite-{n}"]["summed"], flush=True)
            json.dump(result, open(out_path, "w"), indent=1)
        for spec in load_manifest(manifest).adapters:
            model.base_model.set_adapter(adapter_of[spec.name])
            samples = read_samples(read_uri(spec.data["eval"]), spec.data["eval"])
            row["alone (100 eval samples)"][spec.name] = task_accuracy(model, bench.tokenizer, samples, CHAT, spec.metric)
        print(variant, row["alone (100 eval samples)"], flush=True)
        json.dump(result, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main()
