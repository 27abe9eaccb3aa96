"""Why an old task moves after the increment (issue 18): on each old task's 100 eval responses, how often the
gates put a NEW expert (last_first, snake_label) among a token's top-2, at the attention modules (old rows copied,
frozen or not) and at the MLP modules (gates new: only the new experts target them), for the increment's
checkpoints from increment_100.py (and the first registration's top-1 at attention).

    PATH=.venv/bin:$PATH python benchmarks/results/chattasks/side_runs/increment_routing.py [DEMO_OUTPUT]
"""
import json
import sys
from pathlib import Path

import torch

from meteora import MeteoraModel, load_tokenizer
from meteora.prompts import to_device
from meteora.registry import load_manifest
from meteora.training import gate_batch

SIDE = Path(__file__).parent
runs = json.loads((SIDE / "increment_100.json").read_text())
demo = Path(sys.argv[1] if len(sys.argv) > 1 else SIDE.parents[3] / "demo-output")
manifest = load_manifest(str(demo / "store" / "more.yaml"))


@torch.no_grad()
def new_expert_share(model: MeteoraModel, tokenizer, samples: list[dict], task: int, new: list[int]) -> dict:
    """{"attention" | "mlp": share of (response token, module) top-2 picks holding a new expert}, and the top-1
    routing accuracy there."""
    picks: dict[str, torch.Tensor] = {}  # module -> [B * S, 2] its gate's top-2 expert ids

    def pick(name: str, layer, args) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).float()  # [B * S, d_in]
        picks[name] = torch.nn.functional.linear(x, layer.meteora_gate).topk(2, -1).indices

    hooks = [layer.register_forward_pre_hook(lambda layer, args, name=name: pick(name, layer, args))
             for name, layer in model.layers.items()]
    batch = to_device(gate_batch(tokenizer, [(s, task) for s in samples], model.prompt_format), model.device)
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=1)
    for hook in hooks:
        hook.remove()
    position = torch.arange(batch["input_ids"].shape[1])
    response = ((position >= batch["prompt_lengths"].unsqueeze(1)) & batch["attention_mask"].bool()).flatten()
    result = {}
    for kind in ("attention", "mlp"):
        ids = [picks[n][response] for n in picks if (".mlp." in n) == (kind == "mlp")]  # L x [T, 2]
        if not ids:  # the first registration has no MLP gates
            continue
        ids = torch.stack(ids)
        result[kind] = {"new_in_top2": round(float(torch.isin(ids, torch.tensor(new)).any(-1).float().mean()), 3),
                        "top1_right": round(float((ids[..., 0] == task).float().mean()), 3)}
    return result


def main() -> None:
    tokenizer = load_tokenizer(manifest.base_uri)
    eval_sets = {s.name: [json.loads(line) for line in Path(s.data["eval"]).read_text().splitlines()] for s in manifest.adapters}
    out = {}
    old, new_tasks = list(runs["summary"]["frozen"]["old_tasks_points_vs_first"]), list(runs["summary"]["frozen"]["new_tasks_vs_own"])
    for label in runs["checkpoints"]:
        model = MeteoraModel.from_pretrained(runs["checkpoints"][label])
        names = model.expert_names
        new = [names.index(t) for t in new_tasks if t in names]
        out[label] = {task: new_expert_share(model, tokenizer, eval_sets[task], names.index(task), new) for task in old}
        print(label, json.dumps(out[label]), flush=True)
    (SIDE / "increment_routing.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
