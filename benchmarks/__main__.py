"""`python -m benchmarks [--tiny] [--only NAME ...] [--results DIR]`: run the benchmarks and publish them."""

import argparse
from pathlib import Path

from benchmarks import (
    chat,
    data_cache,
    defaults,
    harness,
    levers,
    local_sgd,
    memory,
    overhead,
    packing,
    preference,
    serve,
    strategies,
)
from benchmarks import quantize as quantize_benchmark

# Each entry is a module with `main(tiny: bool) -> harness.Result`; add new benchmarks here.
BENCHMARKS = {
    "strategies": strategies,
    "quantize": quantize_benchmark,
    "overhead": overhead,
    "packing": packing,
    "chat": chat,
    "preference": preference,
    "memory": memory,
    "levers": levers,
    "local_sgd": local_sgd,
    "data_cache": data_cache,
    "defaults": defaults,
    "serve": serve,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="smoke-test sizes: checks the harness, not speed")
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), help="run only these benchmarks")
    parser.add_argument("--results", type=Path, default=harness.RESULTS, help="where reports are written")
    args = parser.parse_args()
    for name in args.only or BENCHMARKS:
        result = BENCHMARKS[name].main(tiny=args.tiny)
        report = harness.publish(result, args.results)
        print(harness.markdown_table(result.table))
        print(f"{name}: written to {report}")


if __name__ == "__main__":
    main()
