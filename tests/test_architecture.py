"""The shape of the code (issues 23 and 35): clat is a house of floors (subpackages), each importing only from its own
floor and the floors below, with no circle, counting every import (inside functions too); no private names imported
across modules; files and functions of a readable size (exceptions named here, with the reason); lines of at most
140 characters; one place for the threat model's defaults. docs/architecture.md draws the same floors."""

from __future__ import annotations

import ast
import re
from pathlib import Path


SRC = Path(__file__).resolve().parents[1] / "src" / "clat"
REPO = SRC.parents[1]

# The floors of clat, lowest first: a module imports from its own floor and the floors below, never from above.
# Within a floor, modules import each other without a circle. `clat` itself (the facade) and `clat.__main__` sit on top.
FLOORS = ("base", "layers", "attacks", "data", "models", "config", "criticality", "methods", "eval", "runs", "training",
          "analysis", "cli")
# Imports that may stay inside functions (everything else is imported at the top of its module), and why.
LAZY_IMPORTS = {
    "peft": "optional (pip install clat-at[lora]): only LoRA fine-tuning needs it",
    "PIL": "optional (clat-at[images]): only image folders need it",
    "torch.utils.tensorboard": "optional (clat-at[tensorboard]): only log.tensorboard=true needs it",
    "wandb": "optional (clat-at[wandb]): only log.wandb=true needs it",
    "matplotlib": "slow to import (~0.5 s), and only plots need it",
    "autoattack": "the reference AutoAttack (pyautoattack), imported when AutoAttack runs: it is slow to import",
    "fcntl": "POSIX only (the run folder's lock falls back where it is missing)",
}


def _module(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in sorted(SRC.rglob("*.py"))}


def _floor(module: str) -> int:
    parts = module.split(".")
    return len(FLOORS) if len(parts) == 1 or parts[1] == "__main__" else FLOORS.index(parts[1])


def _imports(path: Path) -> list[tuple[str, list[str], int, bool]]:
    """(module, imported names, line, inside a function) of every import in the file, ``if TYPE_CHECKING`` included."""
    out = []

    def visit(node, in_function: bool) -> None:
        for n in ast.iter_child_nodes(node):
            local = in_function or isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
                out.append((n.module, [a.name for a in n.names], n.lineno, in_function))
            elif isinstance(n, ast.Import):
                out.extend((a.name, [], n.lineno, in_function) for a in n.names)
            visit(n, local)

    visit(ast.parse(path.read_text()), False)
    return out


def _in_try_import_error(path: Path) -> set[int]:
    """Lines of imports inside ``try: ... except ImportError`` (a fallback between versions of a dependency)."""
    lines = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.Try) and any("ImportError" in ast.unparse(h.type or ast.Name("")) for h in n.handlers):
            lines |= {x.lineno for x in ast.walk(n) if isinstance(x, (ast.Import, ast.ImportFrom))}
    return lines


def _edges() -> dict[str, dict[str, int]]:
    """module -> {imported clat module: line}; ``from clat.x import y`` where y is a module imports y (else x)."""
    graph: dict[str, dict[str, int]] = {m: {} for m in MODULES}
    for mod, path in MODULES.items():
        for target, names, line, _ in _imports(path):
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            for t in subs if subs and len(subs) == len(names) else [target, *subs]:
                if t in MODULES and t != mod:
                    graph[mod].setdefault(t, line)
    return graph


def test_every_module_lives_on_a_floor():
    """The folder list is the architecture: src/clat holds the floors, the facade and the packaged data, nothing else."""
    entries = {p.name for p in SRC.iterdir() if p.name != "__pycache__"}
    assert entries == {*FLOORS, "__init__.py", "__main__.py", "py.typed", "assets", "configs"}, sorted(entries)
    for floor in FLOORS:
        assert (SRC / floor / "__init__.py").is_file(), floor
        assert ast.get_docstring(ast.parse((SRC / floor / "__init__.py").read_text())), f"clat.{floor} says what it holds"


def test_the_readme_map_names_every_module():
    """README's Architecture map lists every floor and every module in it (issue 35): the map is the package."""
    text = (REPO / "README.md").read_text()
    block = text[text.index("## Architecture"):]
    block = block[block.index("```"):block.index("```", block.index("```") + 3)]
    missing = [f"{floor}/" for floor in FLOORS if f"  {floor}/" not in block]
    missing += [f"{p.parent.name}/{p.name}" for floor in FLOORS for p in sorted((SRC / floor).glob("*.py"))
                if p.stem != "__init__" and not re.search(rf"\b{p.stem}\b", block)]
    assert not missing, missing


def test_no_import_goes_up_a_floor():
    """Every import between clat's modules, at the top of a module or inside a function, points to the same floor or
    one below (the facade ``clat`` imports everything and nothing imports it)."""
    up = [f"{m} -> {t} (line {line})" for m, targets in _edges().items() for t, line in targets.items() if _floor(t) > _floor(m)]
    assert not up, "\n".join(up)


def test_the_import_graph_has_no_circle():
    """No circle through any imports (inside functions too): the order of the floors and, within a floor, of the
    modules is a real order; a subpackage's facade imports its own modules, so a module never imports its facade."""
    graph = _edges()
    state: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                circles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                dfs(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m)
    assert not circles, "\n".join(" -> ".join(c) for c in circles)


def test_imports_inside_functions_are_only_the_named_lazy_ones():
    """Everything is imported at the top of its module, so the import graph the tests above read is the real one;
    the exceptions are the optional or slow dependencies of LAZY_IMPORTS and version fallbacks (try/except ImportError)."""
    bad = []
    for mod, path in MODULES.items():
        fallback = _in_try_import_error(path)
        for target, _, line, local in _imports(path):
            if local and line not in fallback and not any(target == k or target.startswith(k + ".") for k in LAZY_IMPORTS):
                bad.append(f"{path.relative_to(REPO)}:{line} {target}")
    assert not bad, "\n".join(bad)


def test_no_module_imports_a_private_name_of_another():
    bad = []
    for path in [*MODULES.values(), *(REPO / "scripts").glob("*.py"), *(REPO / "benchmarks").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("clat"):
                bad += [f"{path.relative_to(REPO)}:{node.lineno} {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_") and not (a.name.startswith("__") and a.name.endswith("__"))]
    # third-party privates that numpy's own pickles name (clat.cifar's safe unpickler allows them by name)
    assert not bad, "\n".join(bad)


# No file over 400 lines and no function over 80 (a docstring counts), except these, with the reason (at most three).
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 80
LONG_FILES: dict[str, str] = {}
LONG_FUNCTIONS = {
    "cli/main.py:build_parser": "declarative: one add_argument per option of every command, in the order of `clat --help`",
}


def test_files_and_functions_are_of_a_readable_size():
    assert len(LONG_FILES) + len(LONG_FUNCTIONS) <= 3
    over = {p.relative_to(SRC).as_posix(): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert set(over) <= set(LONG_FILES), f"files over {MAX_FILE_LINES} lines without a stated reason: {over}"
    long = {}
    for p in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                long[f"{p.relative_to(SRC).as_posix()}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert set(long) <= set(LONG_FUNCTIONS), f"functions over {MAX_FUNCTION_LINES} lines without a stated reason: {long}"


def test_lines_are_at_most_140_characters():
    """The project's line limit (pyproject's ruff line-length), checked here so CI holds it without ruff installed."""
    long = [f"{p.relative_to(REPO)}:{i} ({len(line)})" for d in ("src", "tests", "scripts", "benchmarks") for p in (REPO / d).rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if len(line) > 140]
    assert not long, "\n".join(long)


def test_nothing_outside_the_run_folder_owner_builds_a_checkpoint_path():
    hits = [f"{p.relative_to(REPO)}:{i}" for p in SRC.rglob("*.py") if p.name != "folder.py"
            for i,
            line in enumerate(p.read_text().splitlines(), 1) if re.search(r"""/ *["']checkpoints["']|["']checkpoints/|epoch_(\d|\*|\{)""",
                                                                          line)]
    assert not hits, hits


def test_the_default_threat_model_is_written_once():
    """ε = 8/255 and the step 2/255 appear as numbers in one place (``clat.attacks.threat.ThreatModel``); everything
    else (config defaults, function defaults) reads them from there."""
    where = []
    for p in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right,
                                                                                            ast.Constant) and node.right.value == 255
                    and isinstance(node.left, ast.Constant) and node.left.value in (8, 2)):
                where.append(f"{p.relative_to(REPO)}:{node.lineno}")
            elif isinstance(node, ast.Constant) and isinstance(node.value, float) and round(node.value, 6) in (round(8 / 255, 6),
                                                                                                               round(2 / 255, 6)):
                where.append(f"{p.relative_to(REPO)}:{node.lineno}")
    assert len(where) == 2 and all("attacks/threat.py" in w for w in where), where
    from clat.attacks.threat import DEFAULT_THREAT, pgd
    from clat.config.schema import AttackConfig

    assert AttackConfig().threat() == DEFAULT_THREAT
    import inspect

    assert inspect.signature(pgd).parameters["threat"].default is DEFAULT_THREAT


def test_the_threat_model_travels_whole():
    """No function of the library takes the threat model as loose pieces (``eps=``, ``alpha=``, ``norm=``,
    the attack's ``steps=``): attacks, evaluation, criticality, the sanity checks and the estimators take one
    :class:`clat.attacks.threat.ThreatModel`. (RiFT's weight-space ``eps`` is another quantity and has no ``alpha``.)
    Nor does any attack steer its randomness through module state: the shard of a data-parallel batch is an
    argument (``Shard``)."""
    loose = []
    for p in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names = {a.arg for a in (*node.args.args, *node.args.kwonlyargs)}
                if "eps" in names and ({"alpha", "norm"} & names) and node.name not in ("eps_str",):  # eps_str formats a number
                    loose.append(f"{p.relative_to(REPO)}:{node.lineno} {node.name}")
    assert not loose, loose
    tree = ast.parse((SRC / "attacks" / "threat.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Global)] and "ContextVar" not in ast.unparse(tree)


def test_methods_take_a_threat_model_not_the_config_section():
    """The methods' floor reads no run-config section for its attacks (issue 35): ``Method(threat)`` takes a
    :class:`ThreatModel`; ``from_config`` turns the run's ``attack:`` section into one."""
    users = [f"{p.relative_to(REPO)}:{n.lineno}" for p in (SRC / "methods").glob("*.py") for n in ast.walk(ast.parse(p.read_text()))
             if isinstance(n, ast.ImportFrom) and any(a.name == "AttackConfig" for a in n.names)]
    assert not users, users
    from clat.attacks.threat import ThreatModel
    from clat.config.schema import AttackConfig
    from clat.methods import PGDAT

    t = ThreatModel(steps=3, random_start=False)
    assert PGDAT(t).threat is t and PGDAT(AttackConfig(steps=3)).threat == AttackConfig(steps=3).threat()
