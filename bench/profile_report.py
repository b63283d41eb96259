"""Summarise a py-spy raw (collapsed stacks) profile: the functions with the most samples, self and total.

    python bench/profile_report.py /tmp/gateway-bench-*/profile-payments.txt [--top 40] [--filter TEXT]
"""

from __future__ import annotations

import argparse
from collections import Counter


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("file")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--filter", default="", help="only stacks containing this text")
    args = parser.parse_args()
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    with open(args.file) as f:
        for line in f:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            if not stack or not count_text.isdigit() or (args.filter and args.filter not in stack):
                continue  # (a frame name with a newline in it splits its line: skipped)
            count = int(count_text)
            samples += count
            frames = stack.split(";")
            own[frames[-1]] += count
            for frame in set(frames):
                total[frame] += count
    print(f"{samples} samples")
    print("-- total (inclusive)")
    for frame, count in total.most_common(args.top):
        print(f"{100 * count / samples:5.1f}%  {frame}")
    print("-- self")
    for frame, count in own.most_common(args.top):
        print(f"{100 * count / samples:5.1f}%  {frame}")


if __name__ == "__main__":
    main()
