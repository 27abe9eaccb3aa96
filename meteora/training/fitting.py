"""Fitting the gates from captured activations (method "fit"): module by module in the model's order, in one
forward pass, with no backward pass through the model.

A gate is a bias-free linear classifier of its module's input (logits = G x), and CE_gate is, at each module, a
softmax cross-entropy of those logits against the token's task. Given the inputs, fitting a gate is a convex
multinomial logistic regression, and so is fitting some of its rows with the others held fixed (their logits are
constants). A module's inputs depend only on the gates before it, so one forward pass fits them all, as GPTQ
calibrates a model layer by layer: when the forward reaches an adapted module, the module's inputs at the
labelled tokens are captured, its gate is fitted, and the forward goes on through the fitted gate, so every
later module is fitted on the inputs it will see at inference (not those of perfect routing, which fit gates that
route worse: a prototype measured 0.82 against 0.97 on eval responses).

Per module, over every worker's labelled tokens (x_i, task y_i), with sigma_j the RMS of input feature j:
    minimise over G[rows]   mean_i CE(G x_i, y_i) + l2 / 2 * || G[rows] * sigma ||^2   (+ a registration's Guard)
by L-BFGS on the standardised inputs x / sigma. Standardising each feature (not the whole vector by its norm)
matters: a few hidden dimensions carry most of a residual stream's norm, and a penalty in units of the norm
starves the informative rest (on chattasks, eval-response accuracy at mid layers 0.87 with the norm, 0.99 per
feature). Without the L2 term separable data would drive the logits to infinity and top-2's second weight to 0.
Each worker sums the loss and gradient of its own tokens and one all-reduce adds them, so every worker takes
the same steps and ends with the same gate (L-BFGS decides locally how often to evaluate: the workers must round
alike, as the same build of torch on one kind of machine does). Only the fitted rows are written back: held rows stay bit-identical
(registration fits only the new experts' rows). A registration's new experts are also kept out of the old
experts' top-k wherever no new task is asked, the shared prompt prefix included (Guard): on chattasks, without it
a registration cost old tasks up to 17 points, the new experts in the top-2 of 43% of the system prompt's q/v
tokens and of a quarter of one old task's question tokens.

The calibration items run as one batch packed without padding (packed_batch): rows of about PACKED_ROW tokens,
each starting with the prefix every item shares (a chat template's system prompt, computed once a row), then
items one after the other, each attending to that prefix and to itself, at the positions it has alone; on
chattasks 4x fewer token positions than one right-padded batch. Memory: a worker's tokens at one layer at a
time (as any layer-wise calibration holds them), and one module's captured inputs, at most fit_tokens of them;
rows are as wide as the longest, so an item far longer than PACKED_ROW widens them all (and the mask, R x W^2).
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..batching import to_device
from ..model import MeteoraLinear, MeteoraModel
from .batches import gate_batch
from .collective import Collective
from .config import GateTrainingConfig
from .loss import IGNORE
from .sampling import Item, Sample, composite_around

PACKED_ROW = 512  # tokens per packed row (an item longer than that gets a row of its own)
UNLABELLED = -1  # a guarded token that no task labels (the shared prompt prefix): in the guard's hinge only
GUARD_MARGIN = 0.5  # how far under the old experts' k-th logit the guard pushes a new expert's


def fit_items(samples: list[Sample], config: GateTrainingConfig, experts: Sequence[int] | None = None) -> list[Item]:
    """The calibration items (the same on every worker; worker r fits on items[r::world]): fit_samples train samples
    of each expert (all where it has fewer), about composite_fraction of them asked among others' as training
    draws them. experts: whose samples lead items (default all; the others' still appear inside composites)."""
    rng = random.Random(f"fit:{config.seed}")
    wanted = set(range(max(s[1] for s in samples) + 1) if experts is None else experts)
    items: list[Item] = []
    for expert in sorted(wanted):
        own = [s for s in samples if s[1] == expert]
        for sample in rng.sample(own, min(config.fit_samples, len(own))):
            use_composite = rng.random() < config.composite_fraction
            items.append(composite_around(sample, samples, rng, config.composite_max) if use_composite else sample)
    return items


Penalty = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Guard:
    """A registration's hold on the old experts' routing (fit_guard > 0). At each module, on every token that no new
    expert's task labels, each new expert's logit is pushed under the old experts' k-th highest logit minus
    GUARD_MARGIN by a squared hinge of weight rho: a penalty method for "the old top-k stays as it was". Those
    tokens are the old tasks' and the prompt prefix every item shares (UNLABELLED: no task labels it, yet every
    prompt starts with it, so a new expert routed there changes every old task's answers). The fit computes the
    prefix once per packed row, so its tokens weigh prefix_weight each: the number of calibration items, one copy
    per item as inference sees it (fit_tokens may subsample the items' labelled tokens, never the prefix)."""

    new: tuple[int, ...]  # the new experts' ids
    top_k: int
    rho: float
    prefix_weight: float = 1.0

    def hinge(self, labels: torch.Tensor, held: torch.Tensor, fitted: torch.Tensor) -> Penalty:
        """One module's hinge as a function of its logits [E, N]: (value, gradient [E, N]). labels [N]; held [E, N]
        the held rows' logits (0 in the fitted rows, whose ids are `fitted`). Where no old row is fitted (a
        registration at a module it shares), the old experts' k-th logit is a constant, computed once."""
        is_new = torch.zeros(held.shape[0], dtype=torch.bool, device=held.device)
        is_new[list(self.new)] = True
        k, new = min(self.top_k, int((~is_new).sum())), is_new.nonzero().flatten()
        unlabelled = labels == UNLABELLED
        guarded = unlabelled | ~is_new[labels.clamp_min(0)]  # [N] no new expert's task labels it
        weight = self.rho * torch.where(unlabelled, self.prefix_weight, 1.0) * guarded  # [N]

        def kth_old(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [N] the k-th old logit, whose it is
            old = logits.masked_fill(is_new[:, None], float("-inf")).topk(k, dim=0)
            return old.values[k - 1], old.indices[k - 1]

        constant = None if bool((~is_new)[fitted].any()) else kth_old(held)

        def penalty(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            kth, where = constant if constant is not None else kth_old(logits)
            over = (logits[new] - kth + GUARD_MARGIN).clamp_min(0)  # [new, N]
            push = weight * over
            gradient = torch.zeros_like(logits)
            gradient[new] = push
            if constant is None:  # the k-th old row is fitted too: it is pushed up as much
                gradient.scatter_add_(0, where[None], -push.sum(0, keepdim=True))
            return 0.5 * (push * over).sum(), gradient

        return penalty


def solve_gates(x: torch.Tensor, labels: torch.Tensor, gates: Sequence[torch.Tensor], rows: Sequence[Sequence[int]],
                l2: float, iterations: int, collective: Collective = Collective(),
                guard: Guard | None = None) -> tuple[list[torch.Tensor], list[dict]]:
    """For gates whose modules read the same inputs (q, k and v; gate and up), the rows rows[j] of gates[j] that
    minimise module j's loss (above) over every worker's tokens, its other rows held. The losses are independent,
    so their sum is minimised as one problem: one L-BFGS, one all-reduce per evaluation, for all of them; the
    gradient is computed in closed form (softmax minus one-hot), with no autograd graph, and logits are kept as
    [E, N] (a softmax over a short contiguous axis is 30x faster than over rows of E on a CPU).
    x [N, d_in] this worker's inputs, labels [N] expert ids (UNLABELLED: a token for the guard only), gates[j]
    [E, d_in]. guard: a registration's hinge (Guard), added to each module's summed loss. Returns per module the
    fitted rows [len(rows[j]), d_in] fp32 and {accuracy, loss, iterations, seconds} over every worker's labelled
    tokens (the loss without the guard)."""
    started = time.perf_counter()
    x = x.float()
    labelled = labels != UNLABELLED
    totals = collective.sum_(torch.cat([x[labelled].square().sum(0), x.new_tensor([labelled.sum()])]).double())
    count = max(totals[-1].item(), 1.0)
    sigma = (totals[:-1] / count).sqrt().float().clamp_min(1e-6)  # [d_in] each feature's RMS (labelled tokens)
    xs, sizes = x / sigma, [len(r) for r in rows]
    xs_t = xs.t().contiguous()  # [d_in, N]
    parts = [_held_logits(x, gate.detach().float(), r) for gate, r in zip(gates, rows)]  # per module (fixed, index)
    start = torch.cat([gate.detach().float()[index] for gate, (_, index) in zip(gates, parts)])
    weights = (start * sigma).requires_grad_()  # [R, d_in]: every module's fitted rows, in the standardised space
    one_hot = F.one_hot(labels.clamp_min(0), gates[0].shape[0]).t().float() * labelled  # [E, N], 0 where unlabelled
    hinges = [guard.hinge(labels, fixed, index) for fixed, index in parts] if guard is not None else []

    def per_module(w: torch.Tensor) -> list[torch.Tensor]:  # each module's logits [E, N]
        return [fixed.index_copy(0, index, z) for (fixed, index), z in zip(parts, (w @ xs_t).split(sizes, 0))]

    def closure() -> torch.Tensor:
        loss, dz = x.new_zeros(()), []
        for j, (logits, (_, index)) in enumerate(zip(per_module(weights.detach()), parts)):
            log_p = torch.log_softmax(logits, dim=0)  # [E, N]
            loss -= (log_p * one_hot).sum()
            d_logits = (log_p.exp() - one_hot) * labelled
            if hinges:
                value, gradient = hinges[j](logits)
                loss, d_logits = loss + value, d_logits + gradient
            dz.append(d_logits.index_select(0, index))  # d loss / d logits of the fitted rows
        gradient = torch.cat(dz) @ xs  # [R, d_in]
        summed = collective.sum_(torch.cat([loss.view(1), gradient.flatten()])) / count
        weights.grad = summed[1:].view_as(weights) + l2 * weights.detach()
        return summed[0] + 0.5 * l2 * weights.detach().square().sum()

    optimizer = torch.optim.LBFGS([weights], lr=1.0, max_iter=iterations, history_size=10, tolerance_grad=1e-6,
                                  tolerance_change=1e-9, line_search_fn="strong_wolfe")
    optimizer.step(closure)
    fitted = weights.detach()
    with torch.no_grad():  # each module's loss and accuracy at the fitted rows, every worker's tokens
        scores = [torch.stack([-(torch.log_softmax(logits, dim=0) * one_hot).sum(), ((logits.argmax(0) == labels) & labelled).sum()])
                  for logits in per_module(fitted)]
        scores = collective.sum_(torch.stack(scores).double()).tolist()
    steps = optimizer.state[weights].get("n_iter", 0)
    seconds = round((time.perf_counter() - started) / len(gates), 3)  # the group's time, shared among its modules
    stats = [{"accuracy": right / count, "loss": loss / count + 0.5 * l2 * w.square().sum().item(), "iterations": steps,
              "seconds": seconds} for (loss, right), w in zip(scores, fitted.split(sizes))]
    return [w / sigma for w in fitted.split(sizes)], stats


def _held_logits(x: torch.Tensor, gate: torch.Tensor, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """([E, N] logits of the gate's held rows, 0 in the fitted rows; the fitted rows' index)."""
    index = torch.tensor(list(rows), dtype=torch.int64, device=x.device)
    held = torch.ones(gate.shape[0], dtype=torch.bool, device=x.device)
    held[index] = False
    fixed = x.new_zeros(gate.shape[0], x.shape[0])
    fixed[held] = gate[held] @ x.t()
    return fixed, index


@torch.no_grad()
def fit_gates(model: MeteoraModel, tokenizer, items: list[Item], config: GateTrainingConfig,
              collective: Collective = Collective(), rows: dict[str, list[int]] | None = None,
              on_module: Callable[[int, int, str, dict], None] | None = None, solve: Callable = solve_gates,
              new_experts: Sequence[int] = ()) -> dict:
    """Fit the gates of `model` in place from this worker's calibration `items`, in one forward pass (above).
    rows: per module the rows to fit (registration: the new experts'; a module missing from it is left as it is);
    default every row of every gate. new_experts: a registration's, kept off the old experts' routing by a Guard
    when config.fit_guard > 0 (every row then fitted with fit_guard_l2; where old rows are held, with
    fit_guard_iters). on_module(done, total, module, stats) after each fit. solve: another rule for a module
    group's rows from their captured inputs, with solve_gates' signature and result (benchmarks compare).
    Returns {seconds, tokens (labelled, every worker), modules: {module: stats}}."""
    started = time.perf_counter()
    plan = {name: list(range(len(model.expert_names))) for name in model.layer_names} if rows is None else rows
    plan = {name: r for name, r in plan.items() if r and len(model.expert_names) > 1}
    if not plan:  # nothing to fit (one expert, or only removed experts): no forward pass
        return {"seconds": 0.0, "tokens": 0, "modules": {}}
    if not items:
        raise ValueError("fit_gates needs at least one calibration item on every worker: fewer workers, or more "
                         "fit_samples")
    dtype = model.base_model.get_input_embeddings().weight.dtype
    padded = gate_batch(tokenizer, items, model.prompt_format)
    batch = to_device(packed_batch(padded, dtype), model.device)
    labels, picked = _picked_tokens(batch["token_tasks"], config.fit_tokens, config.seed + collective.rank)
    guard = None
    if new_experts and len(new_experts) < len(model.expert_names) and config.fit_guard > 0:  # some old experts
        items_everywhere = collective.sum_(torch.tensor([float(len(items))], dtype=torch.float64)).item()
        guard = Guard(tuple(new_experts), model.routing.top_k, config.fit_guard, prefix_weight=items_everywhere)
        if collective.rank == 0:  # the shared prompt prefix, once for every worker: row 0's first positions
            prefix = torch.arange(_shared_prefix(padded), device=picked.device)
            labels, picked = torch.cat([labels, torch.full_like(prefix, UNLABELLED)]), torch.cat([picked, prefix])
    l2 = config.fit_guard_l2 if guard is not None else config.fit_l2
    groups = input_groups(model, batch["input_ids"][:1, :2], plan)  # leader -> the modules reading its input
    stats: dict[str, dict] = {}

    def fit(layer: MeteoraLinear, args: tuple) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).index_select(0, picked)  # [N, d_in] this worker's labelled tokens
        members = [model.layers[name] for name in groups[layer.name]]
        rows = [plan[m.name] for m in members]
        some_held = guard is not None and any(len(r) < m.meteora_gate.shape[0] for r, m in zip(rows, members))
        iterations = config.fit_guard_iters if some_held else config.fit_iters
        fitted, group_stats = solve(x, labels, [m.meteora_gate for m in members], rows, l2, iterations, collective, guard)
        for member, rows_fitted, member_stats in zip(members, fitted, group_stats):
            gate = member.meteora_gate
            gate.index_copy_(0, torch.tensor(plan[member.name], device=gate.device), rows_fitted.to(gate.device))
            stats[member.name] = member_stats
            if on_module is not None:
                on_module(len(stats), len(plan), member.name, member_stats)

    hooks = [model.layers[leader].register_forward_pre_hook(lambda module, args: fit(module, args)) for leader in groups]
    try:
        model.eval()
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
              use_cache=False, logits_to_keep=1)
    finally:
        for hook in hooks:
            hook.remove()
    tokens = collective.sum_(torch.tensor([float((labels != UNLABELLED).sum())], dtype=torch.float64)).item()
    return {"seconds": round(time.perf_counter() - started, 2), "tokens": int(tokens), "modules": stats}


def input_groups(model: MeteoraModel, probe: torch.Tensor, plan: dict) -> dict[str, list[str]]:
    """{first module: every planned module that reads the same input tensor (q, k, v; gate, up)}, found by a forward
    of a few probe tokens that records which tensor each adapted module is called with, in calling order."""
    calls: list[tuple[str, torch.Tensor]] = []  # the tensors themselves, kept alive: no two can share an identity
    hooks = [layer.register_forward_pre_hook(lambda module, args: calls.append((module.name, args[0])))
             for layer in model.layers.values()]
    try:
        model(input_ids=probe, use_cache=False, logits_to_keep=1)
    finally:
        for hook in hooks:
            hook.remove()
    groups: dict[str, list[str]] = {}
    leader, last_input = None, None
    for name, tensor in calls:
        if name not in plan:
            continue
        if tensor is not last_input or leader is None:
            leader = name
        groups.setdefault(leader, []).append(name)
        last_input = tensor
    return groups


def packed_batch(batch: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                 row_tokens: int = PACKED_ROW) -> dict[str, torch.Tensor]:
    """A right-padded gate batch (gate_batch) packed into rows without padding (module docstring): input_ids,
    position_ids, token_tasks [R, S] and attention_mask [R, 1, S, S] (0 where a query may attend a key, dtype's
    minimum elsewhere: what transformers' attention adds to its scores). Positions and labels are each item's own,
    so a forward of it computes what a forward of `batch` does at every labelled token."""
    lengths = batch["attention_mask"].sum(1).tolist()
    prefix = _shared_prefix(batch)
    rows: list[list[tuple[int, int]]] = [[]]  # per row: (item, its length past the prefix)
    for item, length in enumerate(lengths):
        used = prefix + sum(n for _, n in rows[-1])
        if rows[-1] and used + length - prefix > row_tokens:
            rows.append([])
        rows[-1].append((item, length - prefix))
    width = max(prefix + sum(n for _, n in row) for row in rows)
    ids = torch.full((len(rows), width), int(batch["input_ids"][0, 0]))
    positions = torch.zeros(len(rows), width, dtype=torch.int64)
    tasks = torch.full((len(rows), width), IGNORE)
    segment = torch.full((len(rows), width), -1)  # which item a position holds: -1 the prefix, -2 padding
    for r, row in enumerate(rows):
        ids[r, :prefix], positions[r, :prefix] = batch["input_ids"][0, :prefix], torch.arange(prefix)
        start = prefix
        for item, n in row:
            ids[r, start:start + n] = batch["input_ids"][item, prefix:prefix + n]
            tasks[r, start:start + n] = batch["token_tasks"][item, prefix:prefix + n]
            positions[r, start:start + n] = torch.arange(prefix, prefix + n)
            segment[r, start:start + n] = item
            start += n
        segment[r, start:] = -2
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = segment[:, :, None] == segment[:, None, :]  # [R, S, S] query and key in one item (or both padding)
    allowed = causal & (same | (segment[:, None, :] == -1))  # ... or the key in the prefix
    mask = torch.zeros(len(rows), 1, width, width, dtype=dtype).masked_fill(~allowed[:, None], torch.finfo(dtype).min)
    return {"input_ids": ids, "position_ids": positions, "token_tasks": tasks, "attention_mask": mask}


def _shared_prefix(batch: dict[str, torch.Tensor]) -> int:
    """The length of the unlabelled token prefix every row of a right-padded batch shares (0 when one row has a
    label from its start)."""
    shortest = int(batch["attention_mask"].sum(1).min())
    ids, tasks = batch["input_ids"][:, :shortest], batch["token_tasks"][:, :shortest]
    shared = (ids == ids[:1]).all(0) & (tasks == IGNORE).all(0)  # [shortest]
    return int(shared.long().cumprod(0).sum())


def _picked_tokens(token_tasks: torch.Tensor, limit: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels [N], flat positions [N]) of the labelled tokens of a [B, S] batch: at most `limit` of them (0: all),
    drawn at random (seeded), in position order."""
    flat = token_tasks.flatten()
    positions = (flat != IGNORE).nonzero().flatten()
    if 0 < limit < positions.numel():
        keep = torch.randperm(positions.numel(), generator=torch.Generator().manual_seed(seed))[:limit]
        positions = positions[keep.sort().values.to(positions.device)]
    return flat[positions], positions
