"""Where an Edge process spends its event-loop time: reads a py-spy raw profile
(`py-spy record -f raw --function`) and prints the functions with the largest share of samples,
inclusive (the function and what it calls) and self (the function's own frames; time in
syscalls made from C, e.g. a socket send, shows as the Python frame that made them).

    python bench/play/profile_top.py OUT/profile-redirect.raw [N]
"""

from __future__ import annotations

import collections
import sys


def main() -> None:
    path = sys.argv[1]
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in open(path):
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if not any("runners.py" in f for f in frames):  # the event loop's thread only
            continue
        n = int(count)
        total += n
        for f in set(frames):
            inclusive[f] += n
        own[frames[-1]] += n
    print(f"{total} samples of the event-loop thread (idle excluded)")
    print("inclusive:")
    for f, n in inclusive.most_common(top):
        if "runners.py" in f or f.startswith(("<module>", "main (edge/cli", "_serve ", "run (")):
            continue
        print(f"  {n / total:6.1%}  {f[:150]}")
    print("self:")
    for f, n in own.most_common(top // 2):
        print(f"  {n / total:6.1%}  {f[:150]}")


if __name__ == "__main__":
    main()
