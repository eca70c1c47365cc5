"""The API-server end of a LitServe queue that this package's endpoints share: check a request where it
arrives, queue it as a job for the inference worker, read the worker's output back.

Checking before queueing matters: LitServe batches jobs and one failing job fails its whole batch, so
nothing malformed may reach the worker. Each endpoint raises a RequestError (a 4xx naming the field) instead.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem

from toolkit.serve.errors import RequestError


class QueuedSpec(LitSpec):
    """A LitSpec whose worker always streams (one item or many per job); endpoints call `submit`."""

    @property
    def stream(self) -> bool:
        return True

    def decode_request(self, request: Any, context_kwargs: dict | None = None) -> Any:
        return request

    def encode_response(self, output: Any, context_kwargs: dict | None = None) -> Any:
        yield from output

    def submit(self, job: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Queue `job`; the worker's outputs for it, as dicts, as they come."""
        uid = uuid.uuid4()
        pending, event = deque(), asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(response_queue=pending, event=event)
        self.request_queue.put((self.response_queue_id, uid, time.monotonic(), job))
        return self.outputs(uid, self.data_streamer(pending, event, send_status=True))

    async def outputs(self, uid: uuid.UUID, streamed: Any) -> AsyncIterator[dict[str, Any]]:
        """The worker's outputs as dicts; a worker failure becomes a 500 naming it. The request's buffer
        entry goes when its answer is done or its client has gone."""
        try:
            async for response, status in streamed:
                if status == LitAPIStatus.ERROR:
                    detail = getattr(response, "detail", None) or str(response)
                    raise RequestError(
                        f"the model failed on this request: {detail}", None, 500, "server_error"
                    )
                yield json.loads(response)
        finally:
            self.response_buffer.pop(uid, None)
