"""The one exception type users see: a one-line message naming the bad value and what would be valid."""

import re


class ToolkitError(Exception):
    """Bad input or a missing prerequisite; `toolkit-train` prints the message alone and exits with 2."""


def cause_of(err: BaseException | None, kind: type[BaseException]) -> BaseException | None:
    """`err` itself or the first exception of `kind` in its cause/context chain (libraries wrap what they
    raise: Hydra's instantiate wraps a ToolkitError, torch.save the OSError of a full disk)."""
    while err is not None:
        if isinstance(err, kind):
            return err
        err = err.__cause__ or err.__context__
    return None


# what gloo and NCCL report when the other end of a connection is gone
PEER_LOST = re.compile(
    r"(?:Connection (?:reset|closed) by peer|Broken pipe|remote process exited|NCCL communicator was aborted)"
)


def lost_peer(err: BaseException) -> str | None:
    """The collective library's own words when a peer rank vanished mid-collective (`Read error
    [10.0.0.2]:4295: Connection reset by peer`), else None."""
    text = str(err)
    match = PEER_LOST.search(text)
    if match is None:
        return None
    where = re.search(r"\[([0-9a-fA-F.:]+)\]:\d+", text)
    return f"{match.group(0).lower()}, at {where.group(1)}" if where else match.group(0).lower()
