"""The package's shape, checked from the source text (no imports run): rooms import one way, files stay short,
diagnostics go through `logging`.

Rooms are the top-level entries of `src/alignkit/`: each folder (`data/`, `train/`, `rl/`, ...) and each top-level
module (`models.py`, `reward_model.py`, `progress.py`, ...). Data flows one way, so a room imports only rooms on
its own line of this list or below it:

    pipeline/, cli                                                running everything
    evaluate/, chat/, serve/                                      using trained models
    batching, decode                                              the engine chat/ and serve/ share: continuous batching
    rl/        rollout, reward sources, experience, PPO/RLOO/GRPO on the training loop
    train/     the loop shell; SFT, RM and DPO stages
    reward_model                                                  the LM with a scalar head
    runs       a pipeline run's directory: stage records and models
    models, testing, generation, packing, data/                   loading models, reading data
    atomic, progress, config, flags, precision, losses            shared utilities: any room may import them

The test does not freeze that order (a room may move up or down as the code grows); it asserts what the order is
for: no two rooms import each other, directly or around a loop, so each room can be read, tested and moved with
only what lies below it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "alignkit"

# import edges allowed to close a loop, each with the reason (none today: chat <-> serve went when the batching
# engine moved to alignkit/batching.py, serve <-> pipeline when the run-directory reader moved to alignkit/runs.py)
KNOWN_CYCLE_EDGES: set[tuple[str, str]] = set()

# files allowed over MAX_LINES, each with the reason (none today)
KNOWN_LONG_FILES: set[str] = set()
MAX_LINES = 500

# modules whose print() is the command's output on stdout, not a diagnostic: the final JSON line, `--version`,
# generated text (cli.py), Self-Instruct's report of what it made (data/self_instruct.py)
PRINT_ALLOWED = {"cli.py", "data/self_instruct.py"}

# importable from every room: they import no other room of alignkit (progress.py and atomic.py use only the
# standard library at import time)
LEAVES = {"atomic", "progress"}


def _sources() -> dict[str, ast.Module]:
    return {path.relative_to(PACKAGE).as_posix(): ast.parse(path.read_text(encoding="utf-8"), str(path))
            for path in sorted(PACKAGE.rglob("*.py"))}


def _room(module: str) -> str | None:
    """`alignkit.train.loop` -> `train`; `alignkit.models` -> `models`; anything outside alignkit -> None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "alignkit" and len(parts) > 1 else None


def _is_room(name: str) -> bool:
    return (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file()


def _imported_rooms(tree: ast.Module) -> set[str]:
    """The rooms a module imports anywhere in it (top level, inside functions, under TYPE_CHECKING)."""
    rooms = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            rooms |= {_room(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "alignkit":  # from alignkit import atomic (but not: from alignkit import __version__)
                rooms |= {alias.name for alias in node.names if _is_room(alias.name)}
            else:
                rooms.add(_room(node.module))
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError("relative import: alignkit uses absolute imports only (the graph below reads them)")
    return rooms - {None}


def room_graph(sources: dict[str, ast.Module]) -> dict[str, dict[str, list[str]]]:
    """room -> {imported room: [files of the room that import it]}, without a room's imports of itself."""
    graph: dict[str, dict[str, list[str]]] = {}
    for name, tree in sources.items():
        room = name.split("/")[0].removesuffix(".py")
        graph.setdefault(room, {})
        for other in _imported_rooms(tree) - {room}:
            graph[room].setdefault(other, []).append(name)
    return graph


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle [a, b, ..., a] of the directed graph, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_find_cycle_finds_loops_and_only_loops():
    """The checker itself: a loop of three is found; a diamond (two paths to one room) is not a loop."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) is None
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_room_graph_reads_every_import_form():
    """`import alignkit.x`, `from alignkit.x.y import z`, `from alignkit import x`, and imports inside functions."""
    tree = ast.parse("import alignkit.models\nfrom alignkit.data.formats import read_rows\nfrom alignkit import atomic, __version__\n"
                     "def f():\n    from alignkit.train.loop import train\nimport torch\n")
    assert room_graph({"rl/x.py": tree}) == {"rl": {"models": ["rl/x.py"], "data": ["rl/x.py"], "atomic": ["rl/x.py"],
                                                    "train": ["rl/x.py"]}}


def test_rooms_import_each_other_one_way_only():
    graph = room_graph(_sources())
    assert {"data", "train", "rl", "evaluate", "pipeline", "models", "reward_model", "progress"} <= set(graph)
    stale = {(a, b) for a, b in KNOWN_CYCLE_EDGES if b not in graph.get(a, {})}
    assert not stale, f"{stale} no longer exist: remove them from KNOWN_CYCLE_EDGES"
    edges = {room: set(imported) - {b for a, b in KNOWN_CYCLE_EDGES if a == room} for room, imported in graph.items()}
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle between rooms: " + " -> ".join(cycle) + "; where: " + "; ".join(
        f"{a} -> {b}: {', '.join(graph[a][b])}" for a, b in zip(cycle, cycle[1:]))


def test_shared_utilities_import_no_room():
    """progress.py and atomic.py sit below everything, so any room may import them without climbing."""
    sources = _sources()
    for leaf in sorted(LEAVES):
        assert _imported_rooms(sources[f"{leaf}.py"]) - {leaf} == set(), leaf


def test_no_source_file_is_over_500_lines():
    long = {name: n for name, n in ((p.relative_to(PACKAGE).as_posix(), len(p.read_text(encoding="utf-8").splitlines()))
                                    for p in PACKAGE.rglob("*.py")) if n > MAX_LINES}
    assert set(long) <= KNOWN_LONG_FILES, {k: v for k, v in long.items() if k not in KNOWN_LONG_FILES}
    assert set(long) == KNOWN_LONG_FILES, f"{KNOWN_LONG_FILES - set(long)} are short now: remove them from KNOWN_LONG_FILES"


def _is_print(call: ast.Call) -> bool:
    """print(...), or accelerator.print(...) (accelerate's print on the main process: stdout all the same)."""
    func = call.func
    return (isinstance(func, ast.Name) and func.id == "print") or (
        isinstance(func, ast.Attribute) and func.attr == "print" and isinstance(func.value, ast.Name) and func.value.id == "accelerator")


def _print_calls(tree: ast.Module) -> list[int]:
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call) and _is_print(node)]


def test_print_calls_are_found():
    tree = ast.parse("print(1)\naccelerator.print(2)\nconsole.print(3)\nlogger.info(4)\n")
    assert _print_calls(tree) == [1, 2]  # rich's console.print writes where its console says (stderr for diagnostics)


def test_diagnostics_use_logging_not_print():
    """print() only where it writes a command's output; everything else logs (stderr, silenced by the caller)."""
    sources = _sources()
    offenders = {name: lines for name, tree in sources.items() if (lines := _print_calls(tree)) and name not in PRINT_ALLOWED}
    assert offenders == {}, f"print() used for diagnostics (use logging.getLogger(__name__)): {offenders}"
    assert all(_print_calls(sources[name]) for name in PRINT_ALLOWED), "an allow-listed module no longer prints: drop it"
