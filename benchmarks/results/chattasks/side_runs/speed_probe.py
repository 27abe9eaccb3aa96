"""Side by side on the bench's 12-expert checkpoint: base, PEFT one adapter, MeteoRA torch (dense decode form,
this commit) and MeteoRA torch with the previous decode form (gathered columns into an expand bag)."""
import sys, copy, statistics, json
sys.path[:0] = ["/work/main", "/work/main/benchmarks"]
import torch
import torch.nn.functional as F
from bench_mixture import decode_tokens_per_s, prefill_tokens_per_s
from meteora import MeteoraModel, load_base_model
from meteora.model.backends import vectorized as V
from meteora.registry import load_manifest
from peft import PeftModel

def previous_delta(x, ids, weights, experts):
    T, k = ids.shape
    x = x.float()
    rows = experts.row_table.index_select(0, ids.reshape(-1)).view(T, -1)
    if 2 * rows.numel() <= experts.total_rank:
        picked_A = experts.A.index_select(0, rows.view(-1)).float().view(T, -1, x.shape[1])
        h = torch.bmm(picked_A, x.unsqueeze(-1))
    elif T * experts.total_rank <= V.DENSE_SHRINK_MAX:
        h = F.linear(x, experts.A.float()).gather(1, rows)
    else:
        h = V._grouped_shrink(x, ids, experts)
    per_row = (h.view(T, k, -1) * weights.unsqueeze(-1)).view(T, -1)
    return F.embedding_bag(rows, experts.B_t.float(), per_sample_weights=per_row, mode="sum")

class Previous:
    """Runs a model with the previous decode form swapped in."""
    def __init__(self, model): self.model = model
    def __call__(self, *a, **k):
        from meteora.model import backends
        saved = backends.BACKENDS["torch"]
        backends.BACKENDS["torch"] = previous_delta
        try: return self.model(*a, **k)
        finally: backends.BACKENDS["torch"] = saved

ckpt, adapter = sys.argv[1], sys.argv[2]
fused = MeteoraModel.from_pretrained(ckpt, backend="torch").eval()
base = load_base_model(fused.base_info.uri).eval()
peft = PeftModel.from_pretrained(copy.deepcopy(base), adapter).eval()
variants = {"base": base, "peft_one_adapter": peft, "meteora_torch_top2": fused, "meteora_torch_top2_previous_form": Previous(fused)}
g = torch.Generator().manual_seed(0)
p = {b: torch.randint(0, 49152, (b, 128), generator=g) for b in (8, 1)}
scen = {"decode_batch8": (decode_tokens_per_s, p[8], 32), "decode_batch1": (decode_tokens_per_s, p[1], 32), "prefill_batch8x128": (prefill_tokens_per_s, p[8])}
with torch.inference_mode():
    for v in variants.values(): prefill_tokens_per_s(v, p[1])
    s = {v: {k: [] for k in scen} for v in variants}
    for _ in range(int(sys.argv[3]) if len(sys.argv) > 3 else 3):
        for k, (fn, *args) in scen.items():
            for name, v in variants.items():
                s[name][k].append(fn(v, *args))
med = {v: {k: round(statistics.median(x), 1) for k, x in per.items()} for v, per in s.items()}
ratio = {v: {k: round(med[v][k] / med["peft_one_adapter"][k], 3) for k in scen} for v in variants}
print(json.dumps({"tokens_per_s_median": med, "ratio_to_peft_one_adapter": ratio, "samples": s}, indent=1))
