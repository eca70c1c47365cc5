"""`toolkit-serve` as a child process: started on a free port, waited for until /health says ok, stopped with
its whole process group (LitServe's workers included). For notebooks, benchmarks and tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

TOOLKIT_SERVE = Path(sys.executable).with_name("toolkit-serve")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`toolkit-serve from_run=<run> serve.port=<free port> <overrides>`, as a context manager."""

    def __init__(self, run_dir: Path, *overrides: str, env: dict | None = None) -> None:
        self.run_dir, self.overrides, self.env = run_dir, list(overrides), env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = run_dir.parent / f"serve-{self.port}.log"
        self.process: subprocess.Popen | None = None
        named = dict(o.split("=", 1) for o in overrides if o.startswith("serve."))
        self.model = named.get("serve.model_name") or named.get(
            "serve.variant", "fine_tuned"
        )  # the id to send

    def start(self, timeout: float = 120) -> ServerProcess:
        args = [str(TOOLKIT_SERVE), f"from_run={self.run_dir}", f"serve.port={self.port}",
                "serve.accelerator=cpu", *self.overrides]  # fmt: skip
        env = {**os.environ, **(self.env or {})}
        with self.log.open("w") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"toolkit-serve exited {self.process.returncode}: {self.log.read_text()}")
            if self.healthy():
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"toolkit-serve not ready after {timeout} s: {self.log.read_text()}")

    def healthy(self) -> bool:
        request = urllib.request.Request(f"{self.url}/health", headers=self.headers())
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def headers(self) -> dict[str, str]:
        key = (self.env or {}).get("TOOLKIT_SERVE_API_KEY")
        return {"Authorization": f"Bearer {key}"} if key else {}

    def stop(self, sig: int = signal.SIGINT) -> None:
        """SIGINT (LitServe shuts its workers down), SIGKILL of the whole group if that does not end it."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, sig)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):  # the spawned workers share the group: none may stay
            os.killpg(self.process.pid, signal.SIGKILL)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
