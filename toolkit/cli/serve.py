"""`toolkit-serve from_run=<run dir> [serve.variant=quantized] [serve.port=8000]`: an OpenAI-compatible server
(LitServe) of a finished run's model, recording what users say about its answers in the run directory.

Causal LMs: POST /v1/chat/completions (streaming, batched), GET /v1/models, POST /v1/feedback; GET /health.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.errors import HydraException
from omegaconf import DictConfig

from toolkit.cli.train import one_line
from toolkit.config import compose_serve_config
from toolkit.console import console
from toolkit.errors import ToolkitError


def serve_config(args: list[str]) -> DictConfig:
    """The composed serve config with a run directory that exists, or a ToolkitError in one line."""
    try:
        cfg = compose_serve_config(args)
    except HydraException as err:
        raise ToolkitError(one_line(str(err))) from err
    if not cfg.from_run:
        raise ToolkitError("from_run=<run directory> is required (e.g. from_run=runs/nlp/smollm2_dpo/<time>)")
    if not Path(cfg.from_run).is_dir():
        raise ToolkitError(f"from_run={cfg.from_run} is not a directory; give a run directory under runs/")
    return cfg


def main() -> None:
    from toolkit.serve.server import build_server

    try:
        cfg = serve_config(sys.argv[1:])
        server = build_server(Path(cfg.from_run), cfg.serve)
    except ToolkitError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    s = cfg.serve
    console.print(f"serving {s.variant} of {cfg.from_run} on http://{s.host}:{s.port} (OpenAI base_url /v1)")
    server.run(
        host=s.host,
        port=s.port,
        num_api_servers=1,
        api_server_worker_type="thread",  # one process holds the feedback log's index
        generate_client_file=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
