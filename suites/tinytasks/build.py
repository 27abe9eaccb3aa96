"""Building the embedded benchmark: a tiny base model, one PEFT adapter per task, baselines, data, manifest.

    base     a tiny Llama (char-level tokenizer saved beside it) trained to echo its input and to do 13 held-out
             "format" tasks (never benchmark tasks), in single and composite prompts: it knows the format and
             learns to carry the instruction to every answer token, so the task is visible to the gates; it
             cannot do the benchmark's tasks. An auxiliary loss makes this explicit, as in a real LLM whose early
             residual stream holds the instruction: a linear head on the input of every layer that adapters
             target predicts the first characters of the current problem's instruction at every token after the
             instruction word (prompt and answer); the heads are discarded, the base stays a plain Llama
    adapters one PEFT LoRA per task, trained on that task only, in single prompts and in composites of 2-3
             problems (of its task, or one of its among format problems the base does, so it keeps the composite
             format and answers its own line wherever it stands); mixed ranks, one on attention modules
             only; none on the first two layers: a gate sees its Linear's input, and a one-layer residual stream
             cannot tell which problem of a composite is being answered (at layer 1's q/k/v no gate could tell
             the task), a two-layer one can
    lora-b   one LoRA trained on all tasks' data together, balanced (the paper's LoRA-B)
    merged   the uniform average of all adapters, as one PEFT adapter (peft's add_weighted_adapter, "cat")
    data     train / eval JSONL per task;  build_report.json: accuracies measured at build time
    manifest.yaml  an AdapterManifest (README.md, "Registering adapters") over all of it, written last: it marks a complete build
Everything goes to <out>/tinytasks-<key>/ where key hashes the build settings, so a second run with the same
settings finds the manifest and returns at once.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import random
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from meteora_moe.evaluation import accuracy_per_task
from meteora_moe.batching import training_batch
from meteora_moe.prompts import PromptFormat, composite

from ..assets import cached_build, progress, write_manifest, write_task_data
from ..baselines import merged_adapter
from .char_tokenizer import char_tokenizer
from .tasks import ALL_TASKS, DEFAULT_TASKS, prompt, split_samples

BUILD_VERSION = 6  # bump when the recipe or the manifest changes, so cached builds are not reused (6: baselines)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_MODULES = ATTENTION + ["gate_proj", "up_proj", "down_proj"]
ECHO_ALPHABET = "abcdefghijklmnopABCDEFGHIJKLMNOP0123456789"  # every character an answer may hold
PLAIN = PromptFormat("plain")  # <s> prompt response </s>, composites one answer per line


@dataclass(frozen=True)
class TinyTasksConfig:
    tasks: tuple[str, ...] = tuple(DEFAULT_TASKS)
    ranks: tuple[int, ...] = (8, 8, 4, 16, 16, 4, 8, 8)  # per task, cycled
    attention_only: tuple[str, ...] = ("length",)  # tasks whose adapter targets only q/k/v/o
    base_tasks: tuple[str, ...] = ("first", "last", "firsttwo", "lasttwo", "dropfirst", "droplast", "repeat", "mirror",
                                   "odds", "swapends", "digitsum", "maxdigit", "mindigit")  # format tasks the base learns besides echo
    hidden: int = 128
    layers: int = 5
    adapter_first_layer: int = 2  # adapters target layers adapter_first_layer .. layers - 1
    base_steps: int = 800
    instruction_loss: float = 1.0  # weight of the base's auxiliary loss (0: none): predict the current instruction
    instruction_chars: int = 3  # ... its first characters, from the input of every adapted layer
    adapter_steps: int = 400
    lora_b_steps: int = 600
    lora_b_rank: int = 16
    batch: int = 64
    n_train: int = 2000
    n_eval: int = 100
    seed: int = 0

    def __post_init__(self):
        unknown = [t for t in self.tasks + self.base_tasks if t not in ALL_TASKS]
        if unknown or len(set(self.tasks)) != len(self.tasks) or len(self.tasks) < 2:
            raise ValueError(f"tasks must be 2+ distinct names from {sorted(ALL_TASKS)}; got {list(self.tasks)}")
        if not 0 <= self.adapter_first_layer < self.layers:
            raise ValueError(f"adapter_first_layer must be in [0, {self.layers}), got {self.adapter_first_layer}")
        if set(self.tasks) & set(self.base_tasks):
            raise ValueError(f"the base model must not learn benchmark tasks: {sorted(set(self.tasks) & set(self.base_tasks))}")
        if not self.ranks or any(rank < 1 for rank in self.ranks):
            raise ValueError(f"ranks must be one or more positive integers, got {list(self.ranks)}")
        if set(self.attention_only) - set(ALL_TASKS):
            raise ValueError(f"attention_only names unknown tasks {sorted(set(self.attention_only) - set(ALL_TASKS))}")

    def key(self) -> str:
        return hashlib.sha256(json.dumps([BUILD_VERSION, asdict(self)], sort_keys=True).encode()).hexdigest()[:12]

    def adapter_shape(self, index: int) -> tuple[int, list[str]]:
        task = self.tasks[index]
        return self.ranks[index % len(self.ranks)], ATTENTION if task in self.attention_only else ALL_MODULES


def build(out_uri: str | None = None, config: TinyTasksConfig = TinyTasksConfig()) -> str:
    """Build (or find) the benchmark under out_uri (default: the cache); returns the manifest's URI."""
    return cached_build(out_uri, "tinytasks", config.key(), functools.partial(_build_into, config=config))


def _build_into(out: Path, uri: str, config: TinyTasksConfig) -> None:
    started = time.perf_counter()
    tokenizer = char_tokenizer()
    data = {task: split_samples(task, config.n_train, config.n_eval, config.seed) for task in config.tasks}
    write_task_data(out, data)
    base = _train_base(tokenizer, config)
    base.save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")
    pools = {task: _own_task_pools(data[task][0], random.Random(f"{config.seed}:{task}"), config.base_tasks)
             for task in config.tasks}
    for index, task in enumerate(progress(config.tasks, "tinytasks: training one adapter per task")):
        rank, targets = config.adapter_shape(index)
        _train_lora(base, tokenizer, pools[task], rank, targets, config.adapter_steps, config, seed=index).save_pretrained(out / "adapters" / task)
    mixed = [[s for task in config.tasks for s in pools[task][i]] for i in range(2)]  # the union of the adapters' data
    _train_lora(base, tokenizer, mixed, config.lora_b_rank, ALL_MODULES, config.lora_b_steps, config, seed=99).save_pretrained(out / "baselines" / "lora-b")
    merged_adapter(base, out / "adapters", config.tasks).save_pretrained(out / "baselines" / "merged")
    report = {"config": asdict(config), "key": config.key(),
              "accuracy": _measure(base, tokenizer, out, {t: ev for t, (_, ev) in data.items()}),
              "build_seconds": round(time.perf_counter() - started, 1)}
    (out / "build_report.json").write_text(json.dumps(report, indent=2))
    write_manifest(out, uri, {"name": f"tinytasks-base-{config.key()}", "uri": f"{uri}/base/"},
                   {task: f"tinytasks: {ALL_TASKS[task].instruction}" for task in config.tasks})


def _train_base(tokenizer, config: TinyTasksConfig) -> LlamaForCausalLM:
    """A tiny Llama that learns echo and the held-out format tasks (single and composite prompts)."""
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden, intermediate_size=2 * config.hidden,
        num_hidden_layers=config.layers, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True))
    rng = random.Random(config.seed)

    def echo() -> dict:
        text = "".join(rng.choice(ECHO_ALPHABET) for _ in range(rng.randint(1, 8)))
        return {"prompt": prompt("echo", text), "response": text}

    def problem() -> dict:
        if rng.random() < 0.3 or not config.base_tasks:
            return echo()
        return ALL_TASKS[rng.choice(config.base_tasks)].sample(rng)

    single = [problem() for _ in range(4000)]
    composites = [composite([problem() for _ in range(rng.randint(2, 5))]) for _ in range(2000)]
    aux = None
    if config.instruction_loss > 0:
        aux = _InstructionHeads(tokenizer, config.hidden, range(config.adapter_first_layer, config.layers), config.instruction_chars,
                                config.instruction_loss)
    _train(model, tokenizer, [single, composites], config.base_steps, 3e-3, config.batch, config.seed, "training the base model", aux)
    return model.eval()


class _InstructionHeads(torch.nn.Module):
    """The base's auxiliary loss: at every token from the end of an instruction word on, a linear head on
    hidden_states[l] (rms-normalized, as the layer's Linears see it) predicts the first `chars` characters of the
    instruction of the problem that token's next token belongs to (the segment labels of gate training)."""

    def __init__(self, tokenizer, hidden: int, layers, chars: int, weight: float):
        super().__init__()
        self.tokenizer, self.layers, self.chars, self.weight = tokenizer, list(layers), chars, weight
        self.heads = torch.nn.ModuleList(torch.nn.Linear(hidden, chars * len(tokenizer)) for _ in self.layers)

    def targets(self, samples: list[dict], width: int) -> torch.Tensor:
        """[B, S, chars] character ids, -100 where there is nothing to predict."""
        rows = []
        for sample in samples:
            lines = sample["prompt"].splitlines(keepends=True)
            answers = sample["response"].split("\n")
            codes = [self._code(line.split(":")[0]) for line in lines]
            none = [-100] * self.chars
            row = [none]  # <s>
            for code, line in zip(codes, lines):
                word = len(line.split(":")[0])
                row += [none] * word + [code] * (len(line) - word)
            row[-1] = codes[0]  # the prompt's last token: its next token is the first answer's
            owner = [i for i, answer in enumerate(answers) for _ in range(len(answer) + (i < len(answers) - 1))]
            row += [codes[i] for i in owner[1:]] + [codes[-1] if owner else none]  # response tokens: the next token's answer
            row += [none]  # </s>
            rows.append(row + [none] * (width - len(row)))
        return torch.tensor(rows)

    def _code(self, word: str) -> list[int]:
        ids = self.tokenizer(word[:self.chars], add_special_tokens=False)["input_ids"]
        return ids + [-100] * (self.chars - len(ids))

    def loss(self, hidden_states, samples: list[dict]) -> torch.Tensor:
        targets = self.targets(samples, hidden_states[0].shape[1]).flatten()  # [B * S * chars]
        losses = []
        for layer, head in zip(self.layers, self.heads):
            h = torch.nn.functional.rms_norm(hidden_states[layer], (hidden_states[layer].shape[-1],))
            logits = head(h).view(-1, len(self.tokenizer))  # [B * S * chars, V]
            losses.append(torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100))
        return self.weight * torch.stack(losses).mean()


def _own_task_pools(samples: list[dict], rng: random.Random, base_tasks: tuple[str, ...]) -> list[list[dict]]:
    """One task's training pools: its single samples, and composites of 2-3 problems, so the adapter keeps the
    composite format the base knows: half of them all of its task, half of one of its problems among format
    problems the base already does, so it answers its own line wherever it stands beside other tasks' lines."""
    def mixed() -> dict:
        problems = [rng.choice(samples)] + [ALL_TASKS[rng.choice(base_tasks)].sample(rng) for _ in range(rng.randint(1, 2))]
        rng.shuffle(problems)
        return composite(problems)

    same = [composite(rng.sample(samples, rng.randint(2, 3))) for _ in range(len(samples) // 4)]
    return [samples, same + [mixed() for _ in range(len(samples) // 4)]]


def _train_lora(base, tokenizer, pools: list[list[dict]], rank: int, targets: list[str], steps: int, config: TinyTasksConfig, seed: int):
    torch.manual_seed(config.seed + seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layers = list(range(config.adapter_first_layer, config.layers))
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                                                layers_to_transform=layers, lora_dropout=0.0,
                                                                task_type="CAUSAL_LM"))
    _train(model, tokenizer, pools, steps, 5e-3, config.batch, config.seed + seed, None)
    return model.eval()


def _train(model, tokenizer, pools: list[list[dict]], steps: int, lr: float, batch: int, seed: int, desc: str | None,
           aux: "_InstructionHeads | None" = None) -> None:
    """AdamW with a one-cycle schedule; step i draws its batch from pools[i % len(pools)] (similar lengths
    batched together, so short samples are not padded to the longest); `aux` adds its loss (and trains its heads)."""
    params = [p for p in model.parameters() if p.requires_grad] + (list(aux.parameters()) if aux is not None else [])
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = random.Random(seed)
    model.train()
    for step in progress(range(steps), f"tinytasks: {desc}", every=max(1, steps // 20)) if desc else range(steps):
        pool = pools[step % len(pools)]
        samples = rng.sample(pool, min(batch, len(pool)))
        encoded = training_batch(tokenizer, samples)
        out = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"], labels=encoded["labels"],
                    output_hidden_states=aux is not None)
        loss = out.loss if aux is None else out.loss + aux.loss(out.hidden_states, samples)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()


def _measure(base, tokenizer, out: Path, eval_sets: dict[str, list[dict]]) -> dict:
    """Exact match on every eval split: base, each adapter on every task (the matrix), LoRA-B, merged."""
    result = {"base": accuracy_per_task(base, tokenizer, eval_sets, PLAIN), "adapters": {}}
    for task in progress(eval_sets, "tinytasks: measuring each adapter"):
        model = PeftModel.from_pretrained(copy.deepcopy(base), out / "adapters" / task).eval()
        result["adapters"][task] = accuracy_per_task(model, tokenizer, eval_sets, PLAIN)
    for name in ("lora-b", "merged"):
        model = PeftModel.from_pretrained(copy.deepcopy(base), out / "baselines" / name).eval()
        result[name] = accuracy_per_task(model, tokenizer, eval_sets, PLAIN)
    return result

