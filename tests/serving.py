"""A real `toolkit-serve` process on 127.0.0.1 for the tests: started, waited for, stopped (process group)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

TOOLKIT_SERVE = Path(sys.executable).with_name("toolkit-serve")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`toolkit-serve from_run=<run> serve.port=<free port> <overrides>`, as a context manager."""

    def __init__(self, run_dir: Path, *overrides: str, env: dict | None = None) -> None:
        self.run_dir, self.overrides, self.env = run_dir, list(overrides), env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = run_dir.parent / f"serve-{self.port}.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> Server:
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
            try:
                if httpx.get(f"{self.url}/health", timeout=2, headers=self.headers()).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"toolkit-serve not ready after {timeout} s: {self.log.read_text()}")

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

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
