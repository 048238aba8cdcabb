"""``python -m shardloop``: the demo and the benchmarks."""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m shardloop", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser(
        "bench", help="cross-shard calls against asyncio and uvloop threads"
    )
    bench.add_argument("--json", action="store_true", help="print a machine-readable summary")
    demo = commands.add_parser("demo", help="start one shard per core and show submit_to at work")
    demo.add_argument(
        "--shards", type=int, default=None, help="number of shards (default: one per core)"
    )
    args = parser.parse_args()
    if args.command == "bench":
        from ._bench import main as bench_main

        bench_main(args.json)
    else:
        from ._demo import main as demo_main

        demo_main(args.shards)


if __name__ == "__main__":
    main()
