"""Serving: continuous batching of generation requests over one fused model.

    requests.py       SamplingParams, TokenEvent, ServingLimits, and the one check of a request
    engine.py         GenerationEngine: requests join a running batch at the next step, each stops on its own
    batched_cache.py  its KV cache: rows left-padded to a common width, joining and leaving
    async_engine.py   the engine stepped by one thread, an async stream per request
    service.py        MeteoraService: a checkpoint ready to serve, the interface serve_app/ uses
"""
from .async_engine import AsyncEngine
from .engine import GenerationEngine
from .requests import SamplingParams, ServingLimits, TokenEvent, check_request
from .service import MeteoraService

__all__ = ["AsyncEngine", "GenerationEngine", "MeteoraService", "SamplingParams", "ServingLimits", "TokenEvent",
           "check_request"]
