"""`toolkit-chat from_run=<run dir> [serve.variant=quantized] [chat.system="..."]`: talk to a run's model in
the terminal, its answer streamed token by token, through the server's generation code.

Commands: /reset (forget the conversation), /system <prompt> (set the system prompt and reset), /exit.
"""

from __future__ import annotations

import sys
from pathlib import Path

from toolkit.cli.serve import serve_config
from toolkit.errors import ToolkitError

HELP = "commands: /reset  /system <prompt>  /exit"


def main() -> None:
    from toolkit.serve.generation import Sampling, render_prompt, stream_batch
    from toolkit.serve.models import load_served, variant_dir

    try:
        cfg = serve_config(sys.argv[1:])
        model_dir = variant_dir(Path(cfg.from_run), cfg.serve.variant)
    except ToolkitError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    model, tokenizer = load_served(model_dir)
    sampling = Sampling(cfg.chat.max_tokens, cfg.chat.temperature)
    system = cfg.chat.system
    history = start(system)
    print(f"{cfg.serve.variant} of {cfg.from_run}; {HELP}", flush=True)
    for line in sys.stdin:
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset" or text.startswith("/system"):
            if text.startswith("/system"):  # "/system" alone clears it
                system = text.removeprefix("/system").strip() or None
            history = start(system)
            print("(conversation reset)", flush=True)
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]}; {HELP}", flush=True)
            continue
        history.append({"role": "user", "content": text})
        answer = ""
        for (delta,) in stream_batch(model, tokenizer, [render_prompt(tokenizer, history)], [sampling]):
            answer += delta.text
            print(delta.text, end="", flush=True)
        print(flush=True)
        history.append({"role": "assistant", "content": answer})


def start(system: str | None) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}] if system else []


if __name__ == "__main__":
    main()
