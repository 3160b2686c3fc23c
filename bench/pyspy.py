"""Read py-spy's raw (collapsed-stack) output and say where the time went.

Each line is ``thread (tid): name;frame (file:line);...;leaf count``. Line numbers are
dropped so a function counts once however many lines of it were sampled.
"""

from __future__ import annotations

import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")
_THREAD = re.compile(r"^thread \(\w+\): ?(?P<name>.*)$")
# A process frame quotes its command line, which may itself hold ";" (spawn's -c code).
_PROCESS = re.compile(r'^process (?P<pid>\d+):"[^"]*";?')


def find_py_spy() -> str | None:
    candidate = Path(sys.executable).parent / "py-spy"
    if candidate.is_file():
        return str(candidate)
    return shutil.which("py-spy")


def _frame(text: str) -> tuple[str, str]:
    m = _FRAME.match(text)
    return (m.group("func"), m.group("file")) if m else (text, "?")


def _package(path: str) -> str:
    if "/" in path:
        return path.split("/", 1)[0]
    return path.removesuffix(".py")


def _thread_group(name: str) -> str:
    """"faxgw-store_0" -> "faxgw-store", "asyncio_3" -> "asyncio" (to_thread's pool)."""
    return re.sub(r"[_-]\d+(_\d+)?$", "", name) or name


def analyse(path: Path, main_pid: int | None = None, top: int = 15) -> dict[str, Any]:
    """Shares of samples: by thread ("daemon:<thread>" or "worker:<thread>" for the document
    worker processes), by function (self and inclusive), by package; and inclusive shares
    inside the daemon's event-loop thread."""
    total = 0
    threads: Counter[str] = Counter()
    self_fn: Counter[str] = Counter()
    incl_fn: Counter[str] = Counter()
    main_incl: Counter[str] = Counter()
    main_total = 0
    packages: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        proc = "daemon"
        while p := _PROCESS.match(stack):  # parent, then child when nested (--subprocesses)
            if main_pid is not None and int(p.group("pid")) != main_pid:
                proc = "worker"
            stack = stack[p.end():]
        parts = stack.split(";")
        group = f"{proc}:?"
        m = _THREAD.match(parts[0]) if parts else None
        if m:
            group = f"{proc}:{_thread_group(m.group('name').strip() or '?')}"
            parts = parts[1:]
        total += count
        threads[group] += count
        frames = [_frame(p) for p in parts]
        if frames:
            func, file = frames[-1]
            self_fn[f"{func} ({file})"] += count
            packages[_package(file)] += count
        seen = {f"{func} ({file})" for func, file in frames}
        for key in seen:
            incl_fn[key] += count
        if group == "daemon:MainThread":
            main_total += count
            for key in seen:
                main_incl[key] += count

    def share(counter: Counter[str], base: int, n: int) -> list[dict[str, Any]]:
        return [{"name": k, "samples": v, "pct": 100.0 * v / base if base else 0.0}
                for k, v in counter.most_common(n)]

    return {"samples": total, "main_thread_samples": main_total,
            "threads": share(threads, total, 20),
            "self": share(self_fn, total, top),
            "packages_self": share(packages, total, top),
            "main_inclusive": share(main_incl, main_total, top * 2),
            "inclusive": share(incl_fn, total, top)}
