"""The one exception type users see: a one-line message naming the bad value and what would be valid."""


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
