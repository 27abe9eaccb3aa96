"""The Ray Serve deployment (one MeteoraService per replica) and the `serve run` / `serve deploy` entry point."""
from __future__ import annotations

from fastapi import FastAPI
from ray import serve
from ray.serve.exceptions import RayServeException

from meteora_moe.model import checkpoint_exists
from meteora_moe.serving import MeteoraService
from meteora_moe.store import absolute_uri

from .metrics import ServeMetrics
from .routes import create_app
from .settings import ServeSettings, service_settings


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32, health_check_period_s=10,
                  health_check_timeout_s=30, graceful_shutdown_timeout_s=30)
@serve.ingress()
class MeteoraServer:
    def __init__(self, settings: dict):
        self.settings = ServeSettings.model_validate(settings)
        self.service = MeteoraService.load(**service_settings(self.settings), on_step=ServeMetrics().observe)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.service, self.settings)

    def check_health(self) -> None:
        if not self.service.alive:
            raise RuntimeError("the generation engine thread stopped")

    def __del__(self):
        service = getattr(self, "service", None)  # absent when loading failed
        if service is not None:
            service.close()


def app_builder(args: dict) -> serve.Application:
    """`serve run` / `serve deploy` entry point: args are ServeSettings; relative local paths are taken from the
    directory the command runs in. A checkpoint that is not there fails here, once, before any replica starts."""
    settings = ServeSettings.model_validate(args)
    settings.checkpoint = absolute_uri(settings.checkpoint)
    settings.base_model = settings.base_model and absolute_uri(settings.base_model)
    if not checkpoint_exists(settings.checkpoint):  # RayServeException: Serve reports its message, and retries none
        raise RayServeException(f"no MeteoRA checkpoint at {settings.checkpoint} (args.checkpoint): train one first "
                                "(`make demo` writes demo-output/checkpoint) or point args.checkpoint at yours")
    return MeteoraServer.bind(settings.model_dump())
