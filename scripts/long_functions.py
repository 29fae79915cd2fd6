#!/usr/bin/env python3
"""Lists functions in src/ longer than a limit (default 120 lines), longest first.

A function is measured from its `fn` line to the closing brace at the same
indentation. Used to keep functions short enough to read as named steps."""
import pathlib
import re
import sys

LIMIT = int(sys.argv[1]) if len(sys.argv) > 1 else 120
FN = re.compile(r"^(\s*)(?:pub(?:\([a-z]+\))? )?(?:async )?(?:unsafe )?fn (\w+)")
found = []
for path in sorted(pathlib.Path("src").rglob("*.rs")):
    lines = path.read_text().split("\n")
    for i, line in enumerate(lines):
        m = FN.match(line)
        if not m or line.rstrip().endswith(";"):
            continue
        indent = m.group(1)
        for j in range(i + 1, len(lines)):
            if lines[j] == indent + "}":
                if j - i + 1 > LIMIT:
                    found.append((j - i + 1, f"{path}:{i + 1}", m.group(2)))
                break
for n, where, name in sorted(found, reverse=True):
    print(f"{n:5} {where} {name}")
