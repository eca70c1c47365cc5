"""The one Rich console for user-facing output; soft wrap keeps long paths and commands copy-pastable."""

from rich.console import Console

console = Console(soft_wrap=True)
