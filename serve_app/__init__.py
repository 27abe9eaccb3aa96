"""The MeteoRA model behind an OpenAI-compatible HTTP API, as a Ray Serve application (the project's only HTTP code).

    serve run configs/serve.yaml          import_path serve_app:app_builder, args = ServeSettings
    GET  /healthz   GET /v1/models   POST /v1/completions   POST /v1/chat/completions   (README.md, "Serving")

    HTTP request ─► create_app (FastAPI: auth, schemas, OpenAI-shaped errors)
                    ─► meteora_moe.serving.MeteoraService (checkpoint + base model + tokenizer, prompt encoding, every
                       check of a request, continuous batching in one thread per replica) ─► token events ─► JSON / SSE
Each replica batches the requests it holds: a request joins the running batch at the next decoding step and
requests for different tasks share forward passes, the gates routing every token. Extensions to OpenAI's
schema: "experts" (force these adapters, like model "<model>:<expert>") and "return_routing" (per generated
token, the experts' weights). Bad input is a 4xx in OpenAI's error shape, never a 5xx.
One file per part: settings.py, schemas.py (request bodies), errors.py, routes.py, responses.py, sse.py,
metrics.py, deployment.py (the Ray Serve deployment and app_builder).
"""
from .deployment import MeteoraServer, app_builder
from .errors import APIError, api_error
from .routes import create_app, forced_experts
from .settings import ServeSettings, service_settings

__all__ = ["APIError", "MeteoraServer", "ServeSettings", "api_error", "app_builder", "create_app", "forced_experts",
           "service_settings"]
