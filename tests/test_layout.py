"""The package stands in one direction: the method below the harness, and no module importing one that imports it."""

import ast
import tokenize
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lorpa"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The lorpa modules a file imports anywhere in it (function-level imports count: they still tie the two)."""
    name, found = module_name(path), set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("lorpa")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.startswith("lorpa"):
                found.add(base)
                found |= {f"{base}.{alias.name}" for alias in node.names}  # `from . import two_stage`
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        # importing a submodule runs its packages' __init__ anyway: those edges say nothing about layering
        edges[name] = {m for m in imports(path) if m in modules and m != name and not name.startswith(m + ".")}
    return edges


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_module_imports_one_that_imports_it_back():
    assert cycle(graph()) is None


def test_the_cycle_finder_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_the_sweeps_never_import_the_launcher():
    edges = graph()
    sweep = [name for name in edges if name.startswith("lorpa.harness.sweep")]
    assert sweep and not any("lorpa.harness.launch" in edges[name] for name in sweep)


def test_the_method_imports_no_harness_and_no_task():
    """What `import lorpa` users need; `lorpa.report` is the command in front of the harness's tables."""
    edges = graph()
    method = [n for n in edges if not n.startswith(("lorpa.harness", "lorpa.tasks")) and n != "lorpa.report"]
    assert "lorpa.pruning" in method
    assert not {n: sorted(t for t in edges[n] if t.startswith(("lorpa.harness", "lorpa.tasks"))) for n in method
                if any(t.startswith(("lorpa.harness", "lorpa.tasks")) for t in edges[n])}


def method_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.glob("*.py")}


def test_no_public_function_of_the_method_takes_more_than_eight_parameters():
    """Options travel as one object (PruneOptions, StageOptions), not as long keyword lists."""
    found = {}
    for name, path in method_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                args = node.args
                named = [*args.posonlyargs, *args.args, *args.kwonlyargs]
                count = len([a for a in named if a.arg not in ("self", "cls")]) + bool(args.vararg) + bool(args.kwarg)
                if count > 8:
                    found[f"{name}.{node.name}"] = count
    assert not found


def identifiers(path: Path) -> set[str]:
    """The names a file's code uses (not its strings, docstrings or comments)."""
    with tokenize.open(path) as stream:
        return {token.string for token in tokenize.generate_tokens(stream.readline) if token.type == tokenize.NAME}


def test_each_prune_option_is_spelled_in_at_most_three_files():
    """Its field, its flag and its use: a new option touches no more. Options named by a common word (score,
    alpha, seed) cannot be told apart from other uses of the word and are left out."""
    from dataclasses import fields

    from lorpa.options import PruneOptions

    distinctive = [f.name for f in fields(PruneOptions) if "_" in f.name]
    assert {"target_rank", "svd_split", "global_norm", "rank_multiple"} <= set(distinctive)
    names = {p: identifiers(p) for p in PACKAGE.rglob("*.py")}
    spread = {option: sorted(str(p.relative_to(PACKAGE)) for p, found in names.items() if option in found)
              for option in distinctive}
    assert {option: where for option, where in spread.items() if len(where) > 3} == {}
