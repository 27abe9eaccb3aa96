"""The application's arguments (`args:` in configs/serve.yaml), and the service they load."""
from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from meteora_moe.model import check_backend
from meteora_moe.serving import ServingLimits


class ServeSettings(BaseModel):
    """The application's arguments (`args:` in configs/serve.yaml)."""

    model_config = ConfigDict(extra="forbid")
    checkpoint: str  # MeteoRA checkpoint: a directory or s3:// prefix
    base_model: str | None = None  # default: the base model URI the checkpoint records
    model_name: str = Field("meteora", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    backend: Annotated[str, AfterValidator(check_backend)] = "auto"  # auto: Triton on GPU, one native call per layer on CPU
    max_batch_size: int = Field(16, ge=1)  # requests decoded together per replica
    max_waiting: int = Field(16, ge=0)  # prompts queued behind a full batch before 429 (16 + 16: max_ongoing_requests)
    max_prompt_tokens: int = Field(1024, ge=1)  # longer prompts: 413
    max_tokens_limit: int = Field(512, ge=1)  # largest max_tokens accepted
    api_key_env: str = "METEORA_API_KEY"  # when this environment variable is set, requests need its bearer token
    torch_threads: int = Field(1, ge=1)  # intra-op threads per replica (match the replica's CPUs)


def service_settings(settings: ServeSettings) -> dict:
    """MeteoraService.load's arguments from the application's settings."""
    limits = ServingLimits(settings.max_batch_size, settings.max_waiting, settings.max_prompt_tokens, settings.max_tokens_limit)
    return {"checkpoint": settings.checkpoint, "base_model": settings.base_model, "backend": settings.backend,
            "limits": limits, "threads": settings.torch_threads}
