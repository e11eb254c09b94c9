"""`levante serve --ray`: engine replicas behind one OpenAI-compatible ingress on Ray Serve.

Each replica runs Levante's own FastAPI app around its own engine, so routes, errors and
streaming are exactly those of `levante serve`; Serve's proxy listens on --host/--port and routes
every request to a replica, whose number is fixed (--replicas) or left to Serve's autoscaler
(--ray-autoscaling). The app is built inside the replica once its engine has loaded, so only the
ServerConfig travels to the cluster. A replica names itself in the `x-levante-replica` response
header, in the `levante:replica_info` metric and in its log, so traffic can be traced to it."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request, Response
from prometheus_client import Info

from levante.api.server import Server, ServerConfig, create_app
from levante.errors import LevanteError

log = logging.getLogger(__name__)

APP_NAME = "levante"
DEPLOYMENT = "Levante"
REPLICA_HEADER = "x-levante-replica"


@dataclass
class RayServeConfig:
    replicas: int = 1
    autoscaling: dict[str, Any] | None = None  # Serve's autoscaling_config; replaces `replicas`
    actor_options: dict[str, Any] = field(default_factory=dict)  # Serve's ray_actor_options


class Replica:
    """One engine and its app inside a Serve replica (wrapped by `serve.ingress` at deploy time)."""

    async def __init__(self, config: ServerConfig) -> None:
        from ray import serve

        self.name = serve.get_replica_context().replica_tag
        logs = logging.StreamHandler()  # Ray relays a replica's stderr to the driver and its log files
        logs.setFormatter(logging.Formatter(f"%(asctime)s %(name)s [{self.name}]: %(message)s"))
        logging.getLogger("levante").addHandler(logs)
        logging.getLogger("levante").setLevel(logging.INFO)  # the request log, as `levante serve`
        self.server = Server(config)
        await asyncio.to_thread(self.server.load)
        assert self.server.state is not None
        registry = self.server.state.metrics.registry
        Info("levante:replica", "The replica that answers.", registry=registry).info({"replica": self.name})
        log.info("replica ready")

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = create_app(self.server)

        @app.middleware("http")
        async def tag(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
            response = await call_next(request)
            response.headers[REPLICA_HEADER] = self.name
            return response

        return app


def _serve() -> Any:
    try:
        from ray import serve
    except ImportError:
        raise LevanteError("--ray needs Ray Serve: pip install 'levante[ray]'") from None
    return serve


def deployment(config: ServerConfig, ray_config: RayServeConfig) -> Any:
    """The Serve deployment of the replicas (a `ray.serve.Deployment`); bad settings are errors
    naming their flag, raised before anything touches a cluster."""
    serve = _serve()
    from ray.serve.config import AutoscalingConfig

    options: dict[str, Any] = {"num_replicas": ray_config.replicas}
    if ray_config.autoscaling is not None:
        known = AutoscalingConfig.model_fields  # Serve ignores unknown keys: a typo would go unseen
        try:
            if unknown := sorted(set(ray_config.autoscaling) - set(known)):
                raise ValueError(f"unknown settings {unknown}; Serve's are {sorted(known)}")
            options = {"autoscaling_config": AutoscalingConfig(**ray_config.autoscaling)}
        except (ValueError, TypeError) as e:
            raise LevanteError(f"--ray-autoscaling: {e}") from None
    actor_options = ray_config.actor_options
    if config.device.startswith("cuda"):
        actor_options = {"num_gpus": 1, **actor_options}  # else Ray hides the GPUs from the replica
    try:
        return serve.deployment(
            serve.ingress()(Replica),
            name=DEPLOYMENT,
            ray_actor_options=actor_options,
            max_ongoing_requests=config.engine.max_num_seqs,  # the engine batches; Serve queues the rest
            graceful_shutdown_timeout_s=config.shutdown_timeout,
            max_constructor_retry_count=1,  # a model that fails to load fails again: report it at once
            **options,
        )
    except (ValueError, TypeError) as e:
        raise LevanteError(f"--ray-actor-options: {e}") from None


def _load_failure(serve: Any) -> str:
    """Why the deployment failed: the last line of a replica's traceback (Serve's own error only
    says that it failed)."""
    app = serve.status().applications.get(APP_NAME)
    status = app and app.deployments.get(DEPLOYMENT)
    message = status.message.strip() if status else ""
    return message.splitlines()[-1] if message else "see the replica logs above"


def serve_on_ray(config: ServerConfig, ray_config: RayServeConfig) -> int:
    """Deploys the replicas on the cluster in RAY_ADDRESS (or a new local one), stays in the
    foreground until SIGINT/SIGTERM, then deletes the app (replicas finish what they run, bounded
    by --shutdown-timeout) and Serve itself when no other app uses it. The exit status."""
    app = deployment(config, ray_config).bind(config)
    import ray
    from ray import serve

    try:
        ray.init()  # RAY_ADDRESS, else the latest cluster started here, else a new local one
    except ConnectionError as e:
        raise LevanteError(f"cannot reach the Ray cluster (RAY_ADDRESS): {e}") from None
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # ray.init set its own
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        try:
            serve.run(app, name=APP_NAME, route_prefix="/")
        except RuntimeError:
            raise LevanteError(f"the replicas did not start: {_load_failure(serve)}") from None
        scale = ray_config.autoscaling or ray_config.replicas
        log.info("ready: replicas %s on Ray behind http://%s:%d", scale, config.host, config.port)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            log.info("stopping: draining the replicas")
    finally:
        signal.signal(signal.SIGTERM, previous)
        serve.delete(APP_NAME)
        if not serve.status().applications:
            serve.shutdown()
        ray.shutdown()
    return 0
