#!/usr/bin/env python3
"""Module cycles inside a crate: every `crate::<module>` a module's code names (in `use`
lines and paths, comments left out) is an edge; strongly connected components of more
than one module are cycles. Prints the edge count, each cycle, and with -v every edge.

    python3 scripts/module-cycles.py crates/paligemma/src [-v]

Exits with 1 when there is a cycle."""
import glob
import os
import re
import sys


def edges_of(src):
    mods = {os.path.basename(f)[:-3]: f for f in glob.glob(os.path.join(src, "*.rs"))}
    mods.pop("lib", None)
    mods.pop("main", None)
    edges = {m: set() for m in mods}
    for m, path in mods.items():
        for line in open(path, encoding="utf-8"):
            code = line.split("//", 1)[0]
            names = re.findall(r"crate::(\w+)", code)
            grouped = re.match(r"\s*(?:pub(?:\(crate\))? )?use crate::\{(.*)\}", code)
            if grouped:
                names += re.findall(r"(\w+)::", grouped.group(1))
            edges[m] |= {n for n in names if n in mods and n != m}
    return edges


def cycles(edges):
    """Tarjan's strongly connected components of more than one module."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    edges = edges_of(sys.argv[1])
    found = cycles(edges)
    print(f"{sys.argv[1]}: {len(edges)} modules, {sum(map(len, edges.values()))} edges, {len(found)} cycles")
    for c in found:
        print("cycle:", " <-> ".join(c))
    if "-v" in sys.argv:
        for m in sorted(edges):
            print(f"  {m} -> {', '.join(sorted(edges[m]))}")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
