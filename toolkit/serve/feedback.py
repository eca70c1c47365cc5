"""What the server answered and what users said about it, appended to the run directory.

- `serve/completions.jsonl`: every answer with its id and the messages it answered, so feedback that names
  an id (also after a restart) finds both.
- `feedback/feedback.jsonl`: one line per rating or comparison, holding the full messages and answers, in
  the columns preference data reads (`data=feedback`): a rating is a KTO example (`prompt`, `completion`,
  `label`), a comparison a DPO pair (`prompt`, `chosen`, `rejected`).

Each line goes down in one `write` on a file opened for appending, then `fsync`, before the request is
acknowledged: concurrent writers never interleave, and a server killed at any moment leaves whole lines
only (a reader skips a last line without its newline, which a full disk could leave).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from toolkit.layout import COMPLETIONS, FEEDBACK
from toolkit.serve.errors import RequestError


def append_line(path: Path, record: dict[str, Any]) -> None:
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)  # users' messages: owner only
    try:
        written = os.write(fd, line)
        if written != len(line):
            raise OSError(f"{path}: wrote {written} of {len(line)} bytes (disk full?)")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_lines(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Whole lines from byte `offset` on, and the offset after the last whole line."""
    if not path.exists():
        return [], offset
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    records = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    return records, offset + end


class FeedbackLog:
    """Records completions and the feedback on them, for one run directory."""

    def __init__(self, run_dir: Path, model: str) -> None:
        self.completions_path, self.feedback_path = run_dir / COMPLETIONS, run_dir / FEEDBACK
        self.model = model
        self.known: dict[str, dict[str, Any]] = {}
        self.offset = 0
        self.lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # handed to LitServe's worker processes: a lock does not travel
        return {**self.__dict__, "lock": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, lock=threading.Lock())

    def prepare(self) -> None:
        self.completions_path.parent.mkdir(parents=True, exist_ok=True)
        self.feedback_path.parent.mkdir(parents=True, exist_ok=True)

    def add_completion(
        self, completion_id: str, messages: list[dict], answer: str, finish_reason: str
    ) -> None:
        record = {
            "id": completion_id,
            "created": int(time.time()),
            "model": self.model,
            "messages": messages,
            "answer": answer,
            "finish_reason": finish_reason,
        }
        append_line(self.completions_path, record)
        with self.lock:
            self.known[completion_id] = record

    def completion(self, completion_id: str, param: str) -> dict[str, Any]:
        with self.lock:
            if completion_id not in self.known:  # written by an earlier server or another API process
                records, self.offset = read_lines(self.completions_path, self.offset)
                self.known.update({r["id"]: r for r in records})
            record = self.known.get(completion_id)
        if record is None:
            raise RequestError(f"{param}='{completion_id}' is not a completion this run served", param, 404)
        return record

    def add_feedback(self, completion_id: str, rating: int | None, preferred_over: str | None) -> dict:
        """Append a rating (1 or -1) or a comparison (this answer preferred over another to the same
        messages); returns the line written."""
        if (rating is None) == (preferred_over is None):
            raise RequestError(
                "give exactly one of 'rating' (1 or -1) and 'preferred_over' (an id)", "rating"
            )
        if rating is not None and rating not in (1, -1):
            raise RequestError(f"rating={rating} is not valid; use 1 (good) or -1 (bad)", "rating")
        this = self.completion(completion_id, "id")
        record = {
            "kind": "rating" if rating is not None else "comparison",
            "id": completion_id,
            "other_id": preferred_over,
            "rating": rating,
            "created": int(time.time()),
            "model": this["model"],
            "prompt": this["messages"],
            "completion": this["answer"] if rating is not None else None,
            "label": rating == 1 if rating is not None else None,
            "chosen": None,
            "rejected": None,
        }
        if preferred_over is not None:
            other = self.completion(preferred_over, "preferred_over")
            if preferred_over == completion_id or other["messages"] != this["messages"]:
                raise RequestError(
                    f"preferred_over='{preferred_over}' must be another answer to the same messages as "
                    f"id='{completion_id}'",
                    "preferred_over",
                )
            record.update(chosen=this["answer"], rejected=other["answer"])
        append_line(self.feedback_path, record)
        return record
