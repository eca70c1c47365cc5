"""The LitServe server of one run's variant: the chat API, `/v1/models`, `/v1/feedback`, `/health` (LitServe's
own), an API key when it listens beyond this machine, and the limits."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import litserve as ls
from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from omegaconf import DictConfig
from pydantic import BaseModel

from toolkit.errors import ToolkitError
from toolkit.serve.chat_api import ChatAPI, ChatLimits, ChatSpec
from toolkit.serve.errors import RequestError, install_handlers
from toolkit.serve.feedback import FeedbackLog
from toolkit.serve.limits import Limits
from toolkit.serve.models import variant_dir
from toolkit.serve.predict_api import PredictAPI, PredictSpec, model_kind

HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # what LitServe binds: this machine only, or every interface
LIMITED_PATHS = ("/v1/chat/completions", "/v1/feedback", "/predict")


def check_bind(host: str, port: int, api_key: str | None) -> None:
    if host not in HOSTS:
        raise ToolkitError(f"serve.host={host} cannot be bound; valid: {', '.join(HOSTS)}")
    if not 1024 <= int(port) <= 65535:
        raise ToolkitError(f"serve.port={port} is out of range 1024 to 65535")
    if host != "127.0.0.1" and not api_key:
        raise ToolkitError(
            f"serve.host={host} listens beyond this machine: set an API key in the environment "
            "(TOOLKIT_SERVE_API_KEY) so that requests without it get 401"
        )


BEARER = Depends(HTTPBearer(auto_error=False))  # FastAPI reads the header; a missing one is None, not 403


class ApiKey:
    """FastAPI dependency: `Authorization: Bearer <key>` or 401 (the key itself is never logged)."""

    def __init__(self, key: str | None) -> None:
        self.key = key

    def __call__(self, credentials: HTTPAuthorizationCredentials | None = BEARER) -> None:
        if self.key and (credentials is None or credentials.credentials != self.key):
            raise RequestError("missing or wrong API key: send 'Authorization: Bearer <key>'", None, 401,
                               "invalid_api_key")  # fmt: skip


class Feedback(BaseModel):
    id: str
    rating: int | None = None
    preferred_over: str | None = None


class Routes:
    """The routes beside the chat API, as methods (the app may be pickled into an API-server process)."""

    def __init__(self, model_name: str, feedback: FeedbackLog) -> None:
        self.model_name, self.feedback, self.created = model_name, feedback, int(time.time())

    def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "toolkit"}
            ],
        }

    def add_feedback(self, body: Feedback) -> dict[str, Any]:
        record = self.feedback.add_feedback(body.id, body.rating, body.preferred_over)
        return {"id": body.id, "recorded": record["kind"]}


def build_server(run_dir: Path, serve: DictConfig) -> ls.LitServer:
    """The server of `serve.variant`: the chat API for a causal LM, /predict for the other tasks."""
    check_bind(serve.host, serve.port, serve.api_key)
    model_dir = variant_dir(run_dir, serve.variant)
    auth = ApiKey(serve.api_key)
    kind = model_kind(model_dir)
    if kind is None:
        model_name = serve.model_name or serve.variant
        feedback = FeedbackLog(run_dir, model_name)
        limits = ChatLimits(
            serve.max_tokens, serve.default_max_tokens, serve.max_messages, serve.context_length
        )
        spec = ChatSpec(model_name, str(model_dir), feedback, limits)
        api = ChatAPI(spec, serve.max_batch_size, serve.batch_timeout, authorize=auth)
    else:
        spec = PredictSpec(str(model_dir), kind, serve.top_k)
        api = PredictAPI(spec, serve.max_batch_size, serve.batch_timeout, authorize=auth)
    limit = {"max_request_bytes": serve.max_request_bytes, "max_concurrent": serve.max_concurrent,
             "paths": LIMITED_PATHS}  # fmt: skip
    server = ls.LitServer(
        api, accelerator=serve.accelerator, devices=1, timeout=serve.timeout, middlewares=[(Limits, limit)]
    )
    if kind is None:
        routes = Routes(model_name, feedback)
        server.app.add_api_route("/v1/models", routes.models, methods=["GET"], dependencies=[Depends(auth)])
        server.app.add_api_route(
            "/v1/feedback", routes.add_feedback, methods=["POST"], dependencies=[Depends(auth)]
        )
    install_handlers(server.app)
    return server
