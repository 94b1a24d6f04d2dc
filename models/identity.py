"""What a result is made of: the source files a stage runs (from the import graph) and content
hashes of files, so a run's identity can name its code, calibration and data.

The code a stage depends on is derived, never listed by hand: the static import graph of the
stage's module (and, for per-study stages, the study's module and the modules of the row kinds
asked for, ``models.studies.row_modules``) restricted to this project's packages. Imports are
read with ``ast`` (no module is executed), so computing it costs milliseconds and imports neither
torch nor the library. Every package ``__init__.py`` on the way counts, since Python runs it.
``models.studies`` loads each study lazily (``importlib``), so a study's stages depend on that
study's code only, and a study loads a row kind's module the same way, so a run depends on its
own row's code only.

What the code *means* is hashed, not its bytes (``code_hash``): a Python file counts by its syntax
tree with the docstrings taken out, so an edit to a comment, a docstring or the layout retrains
nothing, while any change to what runs does.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "stages")  # what counts as project code
CHUNK = 1 << 20


@functools.cache
def module_file(module: str, root: Path = ROOT) -> Path | None:
    """``models.eqt.ep`` -> models/eqt/ep.py (or the package's __init__.py); None if absent."""
    base = root.joinpath(*module.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


@functools.cache
def _imports(path: Path, module: str) -> frozenset[str]:
    """Project modules imported anywhere in ``path`` (including function-level imports)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in _statements(tree.body):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # submodules
    return frozenset(m for m in found if m.split(".")[0] in PACKAGES)


def _statements(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Every statement, nested ones included (imports are statements: no need to visit the
    expressions, which are most of a tree's nodes)."""
    for node in body:
        yield node
        for name in ("body", "orelse", "finalbody"):
            yield from _statements(getattr(node, name, []))
        for handler in getattr(node, "handlers", []):
            yield from _statements(handler.body)
        for case in getattr(node, "cases", []):
            yield from _statements(case.body)


def _with_parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


@functools.cache
def closure(modules: tuple[str, ...], root: Path = ROOT) -> tuple[str, ...]:
    """Files (relative to ``root``, sorted) of ``modules`` and everything they import."""
    seen: dict[str, Path] = {}
    todo = [p for m in modules for p in _with_parents(m)]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        path = module_file(mod, root)
        if path is None:
            continue  # a name imported from a module, not a module itself
        seen[mod] = path
        for dep in _imports(path, mod):
            todo.extend(p for p in _with_parents(dep) if p not in seen)
    return tuple(sorted({str(p.relative_to(root)) for p in seen.values()}))


def stage_code(stage: str, study: str | None = None, kinds: tuple[str, ...] | None = None,
               root: Path = ROOT) -> list[str]:
    """The source files behind ``python -m stages.<stage> [--study <study>]`` for rows of
    ``kinds`` (None: of every kind the study has; what a stage over all its rows may run)."""
    modules: tuple[str, ...] = (f"stages.{stage}",)
    if study:
        from models.studies import row_modules  # the registry: torch-free, as this module

        modules += (f"models.studies.{study}", *row_modules(study, kinds))
    return list(closure(modules, root))


def coarsen(files: Iterable[str], root: Path = ROOT) -> list[str]:
    """The same set of files, with each directory all of whose files are in it named once.

    For DVC: one dependency per fully-imported package instead of one per file makes dvc.yaml
    and dvc.lock several times smaller, and DVC's no-op time is mostly spent parsing them. The
    set of files tracked is unchanged, so a stage still re-runs for exactly the edits it did."""
    chosen = {str(f) for f in files}
    candidates = {str(parent) for f in chosen for parent in Path(f).parents
                  if parent != Path(".")}
    full = {d for d in candidates if _dir_files(root / d, root) <= chosen}
    top = sorted(d for d in full if not any(str(p) in full for p in Path(d).parents))
    rest = sorted(f for f in chosen if not any(f.startswith(d + "/") for d in top))
    return top + rest


def _dir_files(directory: Path, root: Path) -> set[str]:
    """Every file under ``directory`` that DVC hashes (``.dvcignore`` drops bytecode)."""
    return {str(p.relative_to(root)) for p in directory.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def source_digest(path: Path) -> str:
    """sha256 of what a source file means: for Python its syntax tree without docstrings
    (comments and layout never reach the tree), other files byte for byte."""
    if path.suffix != ".py":
        return file_sha256(path)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree, include_attributes=False).encode()).hexdigest()


def code_hash(paths: Iterable[str | Path], root: Path = ROOT) -> str:
    """One short hash over the names and meaning (``source_digest``) of source files."""
    return _names_and_digests(paths, root, source_digest)


def files_hash(paths: Iterable[str | Path], root: Path = Path(".")) -> str:
    """One short hash over the names and contents of ``paths`` (missing files hash as such)."""
    return _names_and_digests(paths, root, file_sha256)


def _names_and_digests(paths: Iterable[str | Path], root: Path,
                       digest_of: Callable[[Path], str]) -> str:
    digest = hashlib.sha256()
    for rel in sorted(str(p) for p in paths):
        path = root / rel
        digest.update(rel.encode() + b"\0")
        digest.update(digest_of(path).encode() if path.is_file() else b"<missing>")
    return digest.hexdigest()[:16]


def import_graph(root: Path = ROOT, package: str = "models") -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere, ``TYPE_CHECKING`` blocks and imports
    inside functions included. For the no-cycle test: a type-only cycle still says two modules
    each need the other to be understood, which is the design smell the test is there for."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        modules[".".join(parts)] = path
    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                deps.add(base)
                deps.update(f"{base}.{a.name}" for a in node.names)
        graph[mod] = {d for d in deps if d in modules and d != mod}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None
