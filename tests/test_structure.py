"""Module structure: no import cycles, no private names across modules, eval adapters outside pathfm, and STYLE's
layering: nothing imports the trainer, launchers import no torch or pathfm at module top."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) for every import in the file, also those inside functions."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
    return out


def modules() -> dict[str, Path]:
    found = {}
    for package in ("pathfm", "eval"):
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found[name] = path
    return found


def test_no_import_cycles_even_through_function_level_imports():
    mods = modules()
    graph = {m: {i for i, names in imports(p) for i in [i, *(f"{i}.{n}" for n in names)] if i in mods and i != m}
             for m, p in mods.items()}

    def cycle_from(start):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return path + [start]
                if nxt not in path:
                    stack.append((nxt, path + [nxt]))
        return None

    cycles = [c for m in mods if (c := cycle_from(m))]
    assert not cycles, " ; ".join(" -> ".join(c) for c in cycles)


def test_no_private_names_imported_across_modules():
    bad = [f"{p.relative_to(ROOT)}: {m}.{n}" for p in modules().values() for m, names in imports(p)
           if m.startswith(("pathfm", "eval")) for n in names if n.startswith("_") and not n.endswith("__")]  # dunders (__version__) are public
    assert not bad, bad


def test_nothing_in_the_library_or_eval_imports_the_trainer():
    """STYLE: pathfm/train.py is the loop users edit, at the top of the import graph; pathfm/ and eval/ never import
    it (also not inside a function): what they need from it belongs in a library module."""
    bad = [f"{p.relative_to(ROOT)} imports pathfm.train" for name, p in modules().items() if name != "pathfm.train"
           for m, names in imports(p) if m == "pathfm.train" or (m == "pathfm" and "train" in names)]
    assert not bad, bad


def module_top_imports(path: Path) -> list[str]:
    """Modules imported when the file is imported: top-level statements (and those under a top-level if / try),
    not inside a function or class."""
    out = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        for n in ast.walk(node):
            if isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
                out.append(n.module)
            elif isinstance(n, ast.Import):
                out += [a.name for a in n.names]
    return out


def test_launchers_import_neither_torch_nor_pathfm_at_module_top():
    """STYLE: --help and --dry-run stay fast and need no GPU stack; the launchers import the training stack inside
    the functions that run it."""
    heavy = ("torch", "pathfm", "eval", "timm", "numpy")
    bad = [f"{p.relative_to(ROOT)}: {m}" for p in sorted((ROOT / "launch").glob("*.py"))
           for m in module_top_imports(p) if m.split(".")[0] in heavy]
    assert not bad, bad


def test_labelled_dataset_adapters_live_in_eval():
    assert not (ROOT / "pathfm" / "data" / "folders.py").exists()
    assert not [p for p in (ROOT / "pathfm").rglob("*.py") if "def crc(" in p.read_text()]
    assert "def crc(" in (ROOT / "eval" / "datasets.py").read_text()
