"""Top functions of a py-spy profile in collapsed-stack form (``py-spy record --format raw``).

``python -m bench.profile_summary FILE [--top 25]`` prints, over all sampled stacks: the share of
samples per package (the file a sample's innermost frame is in: kopf, aiohttp, kubernetes, our
``kubetune``, the standard library's json/logging/asyncio…), the functions with the most samples
in their own code (self), and those with the most samples anywhere below them (inclusive). The
bench's ``--profile-operator FILE`` writes such a file for the operator process. Written here
rather than taken from a flame-graph tool: the bench README quotes these tables as text.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

_PACKAGES = ("kopf", "aiohttp", "kubernetes", "urllib3", "kmock", "yarl", "multidict", "pydantic", "json",
             "logging", "asyncio", "concurrent", "threading", "copy", "ssl", "http", "email", "selectors",
             "kubetune", "operator", "api", "techniques", "typing", "enum", "dataclasses", "re", "datetime")


def package_of(path: str) -> str:
    parts = [p for p in re.split(r"[\\/]", path) if p]
    if "site-packages" in parts:
        after = parts[parts.index("site-packages") + 1:]
        return after[0].removesuffix(".py") if after else "?"
    for part in parts:
        name = part.removesuffix(".py")
        if name in ("operator", "api", "techniques", "trainer"):  # this checkout's folders
            return f"kubetune/{name}"
    name = parts[-2] if len(parts) >= 2 and parts[-1] == "__init__.py" else (parts[-1].removesuffix(".py") if parts else "?")
    return f"stdlib:{name}" if name in _PACKAGES or "python3" in path else name


def parse(text: str) -> list[tuple[list[tuple[str, str]], int]]:
    stacks = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        frames_text, _, count = line.rpartition(" ")
        frames = []
        for frame in frames_text.split(";"):
            match = _FRAME.match(frame)
            frames.append((match["func"], match["file"]) if match else (frame, ""))
        stacks.append((frames, int(count)))
    return stacks


def summarize(text: str, top: int = 25) -> str:
    stacks = parse(text)
    total = sum(count for _, count in stacks) or 1
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    for frames, count in stacks:
        if not frames:
            continue
        func, path = frames[-1]
        own[f"{func} ({path})"] += count
        packages[package_of(path)] += count
        for name in {f"{f} ({p})" for f, p in frames}:
            inclusive[name] += count

    def table(title: str, counter: Counter[str]) -> list[str]:
        lines = [f"{title} (of {total} samples)"]
        lines += [f"  {100 * c / total:5.1f}%  {name}" for name, c in counter.most_common(top)]
        return lines

    return "\n".join(table("by package (innermost frame)", packages) + table("self", own)
                     + table("inclusive", inclusive))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("file")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    with open(args.file, encoding="utf-8") as handle:
        print(summarize(handle.read(), args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
