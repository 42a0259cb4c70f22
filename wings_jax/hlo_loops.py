"""Loop-aware cost of a compiled TPU program: XLA's cost model counts each ``while`` body once, so the
per-instruction cycle estimates are re-weighted by the trip counts read from the HLO text (:func:`loop_scale`)."""
from __future__ import annotations

import re
from collections import Counter
from typing import Callable

_HEADER = re.compile(r"(ENTRY )?%(\S+) ")
_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')
_WHILE = re.compile(r"\bwhile\((%[^)\s,]+)\), condition=%([^,\s]+), body=%([^,\s]+)")
_CALLED = re.compile(r"\b(?:to_apply|true_computation|false_computation)=%([^,\s}]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")
_DEF = re.compile(r"^\s*(?:ROOT )?%(\S+) = ")
_CONST = re.compile(r"constant\((-?\d+)\)")
_GTE = re.compile(r"get-tuple-element\(%[^)]+\), index=(\d+)")


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    comps: dict[str, list[str]] = {}
    current, entry = None, ""
    for line in hlo.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            header = _HEADER.match(line)
            if header:
                current = header.group(2)
                comps[current] = []
                entry = current if header.group(1) else entry
        elif line.rstrip() == "}":  # not "}}, metadata=...": a multi-line attribute (a Pallas kernel's) goes on
            current = None
        elif current is not None:
            comps[current].append(line)
    return comps, entry


def _defs(lines: list[str]) -> dict[str, str]:
    return {m.group(1): line for line in lines if (m := _DEF.match(line))}


def _operands(line: str, op: str) -> list[str]:
    inner = re.sub(r"/\*.*?\*/", "", line.split(f" {op}(", 1)[1].split(")", 1)[0])
    return [a.strip().lstrip("%") for a in inner.split(",")]


def _definition(name: str, defs: dict[str, str]) -> str:
    """The line defining ``name``, looking through copies."""
    line = defs.get(name, "")
    return _definition(_operands(line, "copy")[0], defs) if " copy(" in line else line


def _constant(name: str, defs: dict[str, str]) -> int | None:
    line = _definition(name, defs)
    m = _CONST.search(line) if " constant(" in line else None
    return int(m.group(1)) if m else None


def _trip_count(parent: list[str], init: str, cond: list[str], body: list[str]) -> int | None:
    """``for (i = c0; i < n; i += s)`` as XLA writes a scan's loop; None for any other shape."""
    root = next((line for line in cond if line.lstrip().startswith("ROOT ")), "")
    if " compare(" not in root or "direction=LT" not in root:
        return None
    cond_defs = _defs(cond)
    counter, limit = _operands(root, "compare")
    index_match = _GTE.search(_definition(counter, cond_defs))
    n = _constant(limit, cond_defs)
    if index_match is None or n is None:
        return None
    index = int(index_match.group(1))
    parent_defs, body_defs = _defs(parent), _defs(body)
    init_line = parent_defs.get(init, "")
    body_root = next((line for line in body if line.lstrip().startswith("ROOT ")), "")
    if " tuple(" not in init_line or " tuple(" not in body_root:
        return None
    initial, updated = _operands(init_line, "tuple"), _operands(body_root, "tuple")
    if index >= min(len(initial), len(updated)):
        return None
    start, next_line = _constant(initial[index], parent_defs), _definition(updated[index], body_defs)
    if start is None or " add(" not in next_line:
        return None
    step = next((c for a in _operands(next_line, "add") if (c := _constant(a, body_defs)) is not None), None)
    if not step or step < 0:
        return None
    return max(0, -(-(n - start) // step))


def _cycles(hlo: str, once: bool, category: Callable[[str], str]) -> tuple[Counter, bool]:
    """Estimated cycles of the entry computation per ``category(instruction line)``, and whether every
    loop's trip count was read. Fused computations are costed by their fusion instruction; a conditional
    counts its costliest branch; ``once``: each loop body counted once (as XLA's cost analysis does)."""
    comps, entry = _computations(hlo)

    def cost(name: str) -> tuple[Counter, bool]:
        total, known = Counter(), True
        lines = comps.get(name, [])
        for line in lines:
            cycles = _CYCLES.search(line)
            if cycles:
                total[category(line)] += int(cycles.group(1))
            loop = _WHILE.search(line)
            if loop:
                init, cond, body = loop.group(1).lstrip("%"), loop.group(2), loop.group(3)
                inner, inner_known = cost(body)
                trips = 1 if once else _trip_count(lines, init, comps.get(cond, []), comps.get(body, []))
                known &= inner_known and trips is not None
                total.update({k: v * (trips or 1) for k, v in inner.items()})
            for called in _CALLED.findall(line):
                inner, inner_known = cost(called)
                total.update(inner)
                known &= inner_known
            branches = _BRANCHES.search(line)
            if branches:
                costs = [cost(b.strip().lstrip("%")) for b in branches.group(1).split(",")]
                total.update(max((c for c, _ in costs), key=lambda c: sum(c.values())))
                known &= all(k for _, k in costs)
        return total, known

    return cost(entry)


def loop_scale(hlo: str) -> float | None:
    """(estimated cycles of one step, loops run their trip counts) / (the same, each loop body once).

    Cycles are the TPU compiler's per-instruction ``estimated_cycles``. None when a loop's trip count
    cannot be read or the module carries no cycle estimates (not a TPU module).
    """
    once, _ = _cycles(hlo, True, lambda line: "")
    looped, known = _cycles(hlo, False, lambda line: "")
    return looped[""] / once[""] if known and once[""] else None


_FRAME = re.compile(r"stack_frame_id=(\d+)")
_FIELDS = re.compile(r"(\w+)=(\d+)")
PALLAS_KERNEL = 'custom_call_target="tpu_custom_call"'


def _table(lines: list[str], name: str) -> dict[int, str]:
    """One of the numbered tables (FileNames, FunctionNames, FileLocations, StackFrames) heading the module."""
    try:
        i = lines.index(name) + 1
    except ValueError:
        return {}
    rows = {}
    while i < len(lines) and lines[i][:1].isdigit():
        key, value = lines[i].split(" ", 1)
        rows[int(key)] = value.strip().strip('"')
        i += 1
    return rows


def _sources(hlo: str) -> dict[int, str]:
    """stack_frame_id -> "file.py:function:line" of the innermost frame (where the op was written)."""
    lines = hlo.splitlines()
    files, functions = _table(lines, "FileNames"), _table(lines, "FunctionNames")
    locations = {}
    for key, value in _table(lines, "FileLocations").items():
        f = dict(_FIELDS.findall(value))
        locations[key] = (f"{files.get(int(f['file_name_id']), '?').rsplit('/', 1)[-1]}:"
                          f"{functions.get(int(f['function_name_id']), '?')}:{f['line']}")
    return {key: locations.get(int(dict(_FIELDS.findall(value))["file_location_id"]), "?")
            for key, value in _table(lines, "StackFrames").items()}


def cycle_breakdown(hlo: str, top: int = 8) -> list[tuple[str, float]] | None:
    """The largest shares of a step's estimated cycles (loops at their trip counts) by the source line that
    wrote each op, as ("file.py:function:line", fraction), largest first; None as for :func:`loop_scale`."""
    sources = _sources(hlo)

    def where(line: str) -> str:
        frame = _FRAME.search(line)
        return sources.get(int(frame.group(1)), "?") if frame else "(no source line)"

    cycles, known = _cycles(hlo, False, where)
    total = sum(cycles.values())
    if not known or not total:
        return None
    return [(name, value / total) for name, value in cycles.most_common(top)]


def kernel_calls(hlo: str) -> int:
    """Pallas (Mosaic) kernel calls in a compiled TPU program: XLA's cost model gives them no time."""
    return hlo.count(PALLAS_KERNEL)
