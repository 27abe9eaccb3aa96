"""Routing remedy: continue the first registration's gates for N more steps at lr L (in one process, bf16 base),
then save; /tmp/real/layers.py measures per-layer routing."""
import sys, json, time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[4]))  # the repository root
import torch
from meteora import MeteoraModel, load_tokenizer
from meteora.registry import load_manifest
from meteora.training import GateTrainer, GateTrainingConfig
ckpt, manifest, steps, lr, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
torch.set_num_threads(1)
m = load_manifest(manifest)
model = MeteoraModel.from_pretrained(ckpt, dtype=torch.bfloat16)
tok = load_tokenizer(m.base_uri)
names = model.expert_names
train = [(json.loads(l), names.index(s.name)) for s in m.adapters if s.name in names for l in open(s.data["train"]).read().splitlines()]
cfg = GateTrainingConfig(steps=steps, batch=16, lr=lr, composite_fraction=0.25, checkpoint_every=max(1, steps // 4), eval_samples=0)
t = time.time()
GateTrainer(model, tok, cfg).run(train, [], on_checkpoint=lambda r: print("step", r["step"], "gate", round(r["gate_loss"], 3), "route", round(r["routing_accuracy"], 3), f"{time.time()-t:.0f}s", flush=True))
model.float().save_pretrained(out)
print("saved", out, flush=True)
