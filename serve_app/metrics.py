"""Custom Prometheus metrics of a replica, beside Serve's own ray_serve_*."""
from __future__ import annotations

from meteora_moe.serving import TokenEvent


class ServeMetrics:
    """Custom Prometheus metrics next to Serve's own ray_serve_*: tokens, per-expert routing, batch sizes."""

    def __init__(self):
        from ray.serve.metrics import Counter, Histogram

        self.tokens = Counter("meteora_tokens_generated", description="Tokens generated.")
        self.routing = Counter("meteora_expert_routing", description="Generated tokens by their heaviest expert.",
                               tag_keys=("expert",))
        self.batch = Histogram("meteora_batch_size", description="Requests per decoding step.",
                               boundaries=[1, 2, 4, 8, 16, 32, 64])

    def observe(self, events: list[TokenEvent]) -> None:
        if not events:
            return
        self.batch.observe(len(events))
        self.tokens.inc(len(events))
        for event in events:
            if event.routing:
                self.routing.inc(tags={"expert": next(iter(event.routing))})
