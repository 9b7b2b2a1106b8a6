#!/usr/bin/env python3
"""Summarises a `perf script` dump (dwarf call graphs) of `intracom bench` by hot path.

For each path (publish, delivery, claim): the share of all samples whose stack passes
through it, the functions it spends its own time in, and the functions of intracom,
bson and the mongodb driver that hold its time. How the issue's profiles were made:

    cargo build --release --all-features    # with CARGO_PROFILE_RELEASE_DEBUG=line-tables-only
    perf record -F 499 --call-graph dwarf,65528 -o bench.data -- \\
        target/release/intracom bench --uri "$URI" --only publish,latency,work,request --rounds 2
    perf script -i bench.data > bench.txt
    scripts/perf-summary.py bench.txt
"""
import collections
import re
import sys

PATHS = {
    "publish": ["Intracom::publish"],
    "delivery": ["mongo::hub::", "mongo::follower::", "delivery::subscriber::", "medium::memory::Follower"],
    "claim": ["mongo::work::claim", "mongo::work::settle", "WorkerLoop", "work::serve"],
}
FRAME = re.compile(r"^[0-9a-f]+ (.*) \(([^)]*)\)$")
OURS = re.compile(r"^(<)?(intracom|bson|mongodb)::")
HARNESS = re.compile(r"^intracom::(bench|run|main)")
TOP = 8


def frames(block):
    out = []
    for line in block.strip().split("\n")[1:]:
        match = FRAME.match(line.strip())
        if match:
            out.append(re.sub(r"\+0x[0-9a-f]+$", "", match.group(1)))
    return out


def short(symbol, width=110):
    if len(symbol) > width:
        symbol = re.sub(r"<[^<>]*>", "<…>", symbol)
    return symbol[:width]


def main(path):
    total = 0
    under = {name: [] for name in PATHS}
    with open(path) as dump:
        for block in dump.read().split("\n\n"):
            stack = frames(block)
            if not stack:
                continue
            total += 1
            for name, patterns in PATHS.items():
                if any(p in f for f in stack for p in patterns):
                    under[name].append(stack)
    print(f"{total} samples")
    for name, stacks in under.items():
        if not stacks:
            continue
        print(f"## {name}: {len(stacks)} samples, {100 * len(stacks) / total:.1f}% of the process")
        print("  own time (leaf function), % of this path:")
        for symbol, n in collections.Counter(s[0] for s in stacks).most_common(TOP):
            print(f"    {100 * n / len(stacks):5.1f}%  {short(symbol)}")
        inclusive = collections.Counter()
        for stack in stacks:
            inclusive.update({f for f in stack if OURS.match(f) and not HARNESS.match(f)})
        print("  inclusive, functions of intracom / bson / mongodb, % of this path:")
        for symbol, n in inclusive.most_common(TOP):
            print(f"    {100 * n / len(stacks):5.1f}%  {short(symbol)}")


if __name__ == "__main__":
    main(sys.argv[1])
