"""On the cached Intel-built tinytasks base: weak adapters (reverse, upper, sort, shift1) retrained with more steps
or a higher lr; own exact match on the 100 eval samples."""
import copy
import json
import random
import sys
import time
import warnings
from pathlib import Path
import torch
from transformers import LlamaForCausalLM
from suites.tinytasks import char_tokenizer
from suites.tinytasks.build import TinyTasksConfig, _own_task_pools, _train
from suites.tinytasks.tasks import split_samples
from meteora.evaluation import task_accuracy
from meteora.prompts import prompt_format
from peft import LoraConfig, get_peft_model
torch.set_num_threads(2)
root = Path(sys.argv[4]) if len(sys.argv) > 4 else Path.home() / ".cache/meteora/suites/tinytasks-de314e4e1063"
config = TinyTasksConfig()
tok = char_tokenizer()
base = LlamaForCausalLM.from_pretrained(root / "base").eval()
PLAIN = prompt_format("plain")
out = {}
for task, steps, lr in [(t, s, l) for t in sys.argv[1].split(",") for s, l in json.loads(sys.argv[2])]:
    index = config.tasks.index(task)
    train, ev = split_samples(task, config.n_train, config.n_eval, config.seed)
    pools = _own_task_pools(train, random.Random(f"{config.seed}:{task}"), config.base_tasks)
    rank, targets = config.adapter_shape(index)
    torch.manual_seed(config.seed + index)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                               layers_to_transform=list(range(config.adapter_first_layer, config.layers)), lora_dropout=0.0, task_type="CAUSAL_LM"))
    t0 = time.perf_counter()
    _train(model, tok, pools, steps, lr, config.batch, config.seed + index, None)
    acc = task_accuracy(model.eval(), tok, ev, PLAIN)
    out[f"{task} {steps} {lr}"] = (acc, round(time.perf_counter() - t0))
    print(task, steps, lr, acc, round(time.perf_counter() - t0), "s", flush=True)
json.dump(out, open(sys.argv[3], "w"), indent=1)
