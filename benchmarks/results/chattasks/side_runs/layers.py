"""Per-layer routing on eval responses of a checkpoint: top-1 accuracy and top-2 hit rate by adapted layer."""
import sys, json, collections
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[4]))  # the repository root
import torch
from meteora import MeteoraModel, load_tokenizer
from meteora.registry import load_manifest
from meteora.training import gate_batch
ckpt, manifest = sys.argv[1], sys.argv[2]
m = load_manifest(manifest)
model = MeteoraModel.from_pretrained(ckpt).eval()
tok = load_tokenizer(m.base_uri)
names = model.expert_names
items = []
for spec in m.adapters:
    if spec.name in names:
        lines = open(spec.data["eval"]).read().splitlines()[:30]
        items += [(json.loads(l), names.index(spec.name)) for l in lines]
top1 = collections.defaultdict(lambda: [0, 0]); top2 = collections.defaultdict(lambda: [0, 0])
per_task = collections.defaultdict(lambda: [0, 0])
with torch.no_grad():
    for s in range(0, len(items), 32):
        b = gate_batch(tok, items[s:s + 32], model.prompt_format)
        pos = torch.arange(b["input_ids"].shape[1])
        tasks = b["token_tasks"].masked_fill(pos < b["prompt_lengths"].unsqueeze(1), -100).flatten()
        keep = tasks != -100
        with model.capture_gate_logits() as logits:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], logits_to_keep=1)
        for name, lg in zip(model.layer_names, logits):
            t = tasks[keep]; l = lg[keep]
            a1 = (l.argmax(-1) == t); a2 = (l.topk(2, -1).indices == t[:, None]).any(-1)
            top1[name][0] += int(a1.sum()); top1[name][1] += len(t)
            top2[name][0] += int(a2.sum()); top2[name][1] += len(t)
            for task in t.unique().tolist():
                sel = t == task
                per_task[names[task]][0] += int(a1[sel].sum()); per_task[names[task]][1] += int(sel.sum())
by_depth = collections.defaultdict(list)
for name in model.layer_names:
    layer = int(name.split(".")[2])
    by_depth[layer].append((top1[name][0] / top1[name][1], top2[name][0] / top2[name][1]))
out = {"per_layer": {l: [round(sum(a for a, _ in v) / len(v), 3), round(sum(b for _, b in v) / len(v), 3)] for l, v in sorted(by_depth.items())},
       "mean_top1": round(sum(a for a, _ in top1.values()) / sum(b for _, b in top1.values()), 4),
       "mean_top2_hit": round(sum(a for a, _ in top2.values()) / sum(b for _, b in top2.values()), 4),
       "per_task_top1": {k: round(a / b, 3) for k, (a, b) in per_task.items()}}
print(json.dumps(out))
