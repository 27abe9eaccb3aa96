"""The deploy stage: the checkpoint behind serve_app on Ray Serve, a running application updated in place (new replicas
start before old ones drain), or started."""
from __future__ import annotations

from pipelines.workflow_config import DeploySettings
from pipelines.workflow_state import Deployed, StageResult


def app_running(app_name: str) -> bool:
    from ray import serve

    try:
        return serve.status().applications[app_name].status == "RUNNING"
    except Exception:  # noqa: BLE001 - no Serve on this cluster, or no such application
        return False


def deploy(checkpoint: str, settings: DeploySettings) -> StageResult:
    from ray import serve

    import serve_app

    serve.start(http_options={"host": settings.host, "port": settings.http_port},  # a running Serve keeps its own
                proxy_location=settings.proxy_location)
    args = serve_app.ServeSettings.model_validate({**settings.settings, "checkpoint": checkpoint}).model_dump()
    updating = app_running(settings.app_name)
    serve.run(serve_app.MeteoraServer.options(**settings.deployment).bind(args), name=settings.app_name,
              route_prefix=settings.route_prefix)
    verb = "updated in place" if updating else "started"
    return StageResult(Deployed(checkpoint, settings.app_name), f"application '{settings.app_name}' {verb} with {checkpoint}")
