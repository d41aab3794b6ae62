"""Processes below one: a sandboxed backend serves from a grandchild of the process a
bench starts (`voidbox net run`'s NAT, `net serve`, a VM card's backend)."""

from __future__ import annotations

import os


def process_table() -> tuple[dict[int, list[int]], dict[int, str]]:
    """({ppid: [child pids]}, {pid: comm}) from /proc, as it is now."""
    children: dict[int, list[int]] = {}
    comms: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comms[int(entry)] = stat[stat.index("(") + 1:stat.rindex(")")]
        children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    return children, comms


def descendants(root: int) -> list[int]:
    """root and every process below it."""
    children, _ = process_table()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def descendant_named(root: int, comm: str) -> int:
    """The first process at or below root whose comm is `comm`; root if there is none."""
    children, comms = process_table()
    todo = [root]
    while todo:
        pid = todo.pop()
        if comms.get(pid) == comm:
            return pid
        todo.extend(children.get(pid, ()))
    return root
