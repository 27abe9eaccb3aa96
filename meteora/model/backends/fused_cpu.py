"""The `fused` CPU path: a layer's routing and its experts' delta in ONE native call, added into the base output.

At decode a token costs a layer some ten small torch ops (gate GEMV, top-k, softmax, gathers, shrink, weighting,
expand, casts, add), each a few microseconds of dispatch on a CPU while the arithmetic of a 135M model's gates and
rank-16 deltas is about one: the count of ops, not the work, made decode 0.69x PEFT's speed. fused_cpu.c does it
all in one loop per token (semantics in its header). It is C with no dependency, built on first use by the
machine's C compiler (`cc`, or $CC) for this CPU into the cache ($METEORA_CACHE/native/, keyed by the source,
the flags and the CPU) and called through ctypes. Where no compiler is found, `auto` keeps the torch backend.

The `auto` backend takes it for inference with gate routing (no forced or teacher routing, no gradient, no
logits kept for training) on fp32 CPU activations with an fp32 gate and fp32 or bf16 experts, at every size: it
measured faster than the torch backend at decode and at prefill, where its tokens are shared among torch's own
OpenMP threads (benchmarks/bench_decode.py, bench_mixture.py).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import weakref
from functools import cache
from pathlib import Path

import torch

from ...store import cache_dir
from ..experts import ExpertStack
from ..routing import Routing

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("fused_cpu.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
EXPERT_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


class _Layer(ctypes.Structure):  # fused_cpu.c's meteora_layer
    _fields_ = [("gate", ctypes.c_void_p), ("A", ctypes.c_void_p), ("B_t", ctypes.c_void_p),
                ("offsets", ctypes.c_void_p), ("ranks", ctypes.c_void_p), ("E", ctypes.c_int64), ("k", ctypes.c_int64),
                ("d_in", ctypes.c_int64), ("d_out", ctypes.c_int64), ("r_max", ctypes.c_int64),
                ("temperature", ctypes.c_float), ("experts_bf16", ctypes.c_int32)]


class _Call:
    """One layer's fused call: pointers into its tensors (kept alive here) and its routing settings. Rebuilt when the
    gate moves (a cast, a new gate) or the settings change; an ExpertStack's tensors are never replaced in place."""

    def __init__(self, gate: torch.Tensor, experts: ExpertStack, routing: Routing, native: ctypes.CDLL):
        self.key = _key(gate, routing)
        self.run = native.meteora_route_and_add
        self.tensors = (gate.detach(), experts.A, experts.B_t, experts.offsets, experts.ranks)
        self.layer = _Layer(gate.data_ptr(), experts.A.data_ptr(), experts.B_t.data_ptr(), experts.offsets.data_ptr(),
                            experts.ranks.data_ptr(), gate.shape[0], routing.top_k, gate.shape[1],
                            experts.B_t.shape[1], experts.r_max, routing.temperature, EXPERT_DTYPES[experts.A.dtype])
        self.pointer = ctypes.addressof(self.layer)


_calls: "weakref.WeakKeyDictionary[torch.nn.Module, _Call]" = weakref.WeakKeyDictionary()  # per MeteoraLinear


def add_fused_delta(layer: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> bool:
    """y [..., d_out] += the routed experts' delta of x [..., d_in] in one native call, and the routing recorded,
    where the fused call applies to this MeteoraLinear (see above); False, y untouched, where it does not."""
    routing, T = layer.routing, x.numel() // x.shape[-1]
    if (routing.forced is not None or routing.token_experts is not None or routing.gate_logits is not None
            or x.device.type != "cpu"
            or x.dtype != torch.float32 or y.dtype != torch.float32 or not (x.is_contiguous() and y.is_contiguous())):
        return False
    gate = layer.meteora_gate
    if y.requires_grad or (torch.is_grad_enabled() and gate.requires_grad):  # y is updated in place: no autograd
        return False
    call = _calls.get(layer)
    if call is None or call.key != _key(gate, routing):
        experts, native = layer.meteora_experts, _library()
        if gate.dtype != torch.float32 or not gate.is_contiguous() or experts.A.dtype not in EXPERT_DTYPES or native is None:
            return False
        call = _calls[layer] = _Call(gate, experts, routing, native)
    ids = weights = None
    if routing.recorder is not None:
        ids, weights = torch.empty(T, routing.top_k, dtype=torch.int64), torch.empty(T, routing.top_k)
    call.run(call.pointer, x.data_ptr(), T, y.data_ptr(), None if ids is None else ids.data_ptr(),
             None if weights is None else weights.data_ptr())
    if ids is not None:
        routing.record(layer.name, ids, weights, x.shape[:-1])
    return True


def _key(gate: torch.Tensor, routing: Routing) -> tuple:
    return gate.data_ptr(), routing.top_k, routing.temperature


def fused_available() -> bool:
    return _library() is not None


@cache
def _library() -> ctypes.CDLL | None:
    """The compiled fused_cpu.c, built once per source, flags and CPU; None (logged once) where it cannot be."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.warning("no C compiler (cc, or $CC): the fused CPU path is off, the torch backend serves every call")
        return None
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), " ".join(FLAGS).encode(), compiler.encode(), _cpu().encode()]))
    library = cache_dir() / "native" / f"fused_cpu-{key.hexdigest()[:16]}.so"
    try:
        if not library.exists():
            _build(compiler, library)
        native = ctypes.CDLL(str(library))
    except (OSError, subprocess.CalledProcessError) as error:  # a read-only cache, a compiler that fails
        log.warning("the fused CPU path is off, the torch backend serves every call: %s%s", error,
                    f"\n{error.stderr[-2000:]}" if isinstance(error, subprocess.CalledProcessError) else "")
        return None
    native.meteora_route_and_add.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                             ctypes.c_void_p, ctypes.c_void_p]
    native.meteora_route_and_add.restype = None
    return native


def _build(compiler: str, library: Path) -> None:
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:  # built aside, moved in whole
        built = Path(tmp) / library.name
        subprocess.run([compiler, *FLAGS, "-o", str(built), str(SOURCE), "-lm"], check=True, capture_output=True, text=True)
        os.replace(built, library)


def _cpu() -> str:
    """What -march=native compiles for: the CPU's model and flags (Linux), else the machine's name."""
    info = Path("/proc/cpuinfo")
    if info.exists():
        lines = info.read_text().splitlines()
        return "\n".join(dict.fromkeys(line for line in lines if line.startswith(("model name", "flags"))))
    return platform.machine() + platform.processor()
