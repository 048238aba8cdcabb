"""``python -m shardloop``: the demo and the benchmarks."""

from __future__ import annotations

import argparse
import sys


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m shardloop", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser(
        "bench", help="cross-shard calls against asyncio and uvloop threads"
    )
    bench.add_argument("--json", action="store_true", help="print a machine-readable summary")
    bench.add_argument(
        "--scaling", action="store_true", help="CPU-bound Python work on 1 and 2 shards instead"
    )
    commands.add_parser(
        "load",
        help="drive an echo, lookup or memcached server and report requests/s and latency",
        add_help=False,
    )
    demo = commands.add_parser("demo", help="start one shard per core and show submit_to at work")
    demo.add_argument(
        "--shards", type=int, default=None, help="number of shards (default: one per core)"
    )
    if sys.argv[1:2] == ["load"]:
        from ._load import main as load_main

        load_main(sys.argv[2:])
        return
    args = parser.parse_args()
    if args.command == "bench" and args.scaling:
        from ._scaling import main as scaling_main

        scaling_main(args.json)
    elif args.command == "bench":
        from ._bench import main as bench_main

        bench_main(args.json)
    else:
        from ._demo import main as demo_main

        demo_main(args.shards)


if __name__ == "__main__":
    main()
