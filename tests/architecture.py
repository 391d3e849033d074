"""An import-linter contract type: no module uses another module's private names, however reached.

``from featurebank.features.engine import _collate``, ``import featurebank.features.engine as e; e._collate``
and ``from featurebank.features import engine; engine._Files`` all count. Used by the ``public names`` contract in
pyproject.toml (``make test`` runs it with ``lint-imports`` before pytest).
"""

from __future__ import annotations

import ast
from pathlib import Path

from importlinter.application import output
from importlinter.domain import fields
from importlinter.domain.contract import Contract, ContractCheck

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_FOLDERS = ("pipelines", "classifiers", "features", "data")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(path: Path, module: str, packages: set[str]) -> list[str]:
    """``module``'s uses of other project modules' private names, as 'line: what'."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    internal = lambda name: name.split(".")[0] in packages and name != module
    aliases: dict[str, str] = {}  # local name -> project module it is bound to
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if internal(a.name):
                    aliases[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and internal(node.module):
            for a in node.names:
                if _private(a.name):
                    found.append(f"{node.lineno}: from {node.module} import {a.name}")
                else:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            base = node.value
            dotted = []
            while isinstance(base, ast.Attribute):
                dotted.insert(0, base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id in aliases:
                found.append(f"{node.lineno}: {'.'.join([aliases[base.id], *dotted, node.attr])}")
    return found


class PublicNamesContract(Contract):
    type_name = "public_names"

    packages = fields.ListField(subfield=fields.StringField())  # folders whose modules are checked
    project = fields.ListField(subfield=fields.StringField())  # packages whose private names are protected

    def check(self, graph, verbose: bool) -> ContractCheck:
        project = set(self.project)
        broken = {}
        for folder in self.packages:
            for path in sorted((ROOT / folder).rglob("*.py")):
                parts = path.relative_to(ROOT).with_suffix("").parts
                if folder in PACKAGE_FOLDERS:  # the folders are installed as featurebank's subpackages
                    parts = ("featurebank", *parts)
                module = ".".join(parts).removesuffix(".__init__")
                uses = private_uses(path, module, project)
                if uses:
                    broken[module] = uses
        return ContractCheck(kept=not broken, metadata={"broken": broken})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for module, uses in check.metadata["broken"].items():
            for use in uses:
                output.print_error(f"{module}:{use} is another module's private name")
            output.new_line()


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, top-level module) of every import in a file, function-level ones included."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


class OnlyOwnerImportsContract(Contract):
    """Only ``owner`` (a package of the project) imports the library ``library``: e.g. only the store
    package knows HDF5. Every module of the project's folders is read (imports inside functions count);
    tests and benchmarks are not checked (they inspect files)."""

    type_name = "only_owner_imports"

    library = fields.StringField()  # a top-level module name: h5py
    owner = fields.StringField()  # a folder of the project: features/store

    def check(self, graph, verbose: bool) -> ContractCheck:
        owner = (ROOT / self.owner).resolve()
        broken = {}
        for folder in PACKAGE_FOLDERS:
            for path in sorted((ROOT / folder).rglob("*.py")):
                if path.resolve().is_relative_to(owner):
                    continue
                lines = [line for line, name in imports_of(path) if name == self.library]
                if lines:
                    broken[str(path.relative_to(ROOT))] = lines
        return ContractCheck(kept=not broken, metadata={"broken": broken})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for module, lines in check.metadata["broken"].items():
            for line in lines:
                output.print_error(f"{module}:{line} imports {self.library}, which only {self.owner} may import: "
                                   "read and write stores through featurebank.features.store")
        output.new_line()


class PackageInitCyclesContract(Contract):
    """No import cycle through a package's ``__init__``: a module inside a package importing the package
    itself while the package (its ``__init__``, imports inside functions included) reaches that module.
    ``acyclic_siblings`` compares a folder's children with each other, so it never sees these."""

    type_name = "no_package_init_cycles"

    packages = fields.ListField(subfield=fields.StringField())  # root packages whose packages are checked

    def check(self, graph, verbose: bool) -> ContractCheck:
        broken = []
        for root in self.packages:
            for package in sorted({root} | graph.find_descendants(root)):
                if not graph.find_children(package):
                    continue
                for module in sorted(graph.find_descendants(package)):
                    if (graph.direct_import_exists(importer=module, imported=package)
                            and graph.chain_exists(importer=package, imported=module)):
                        broken.append((package, module))
        return ContractCheck(kept=not broken, metadata={"broken": broken})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for package, module in check.metadata["broken"]:
            output.print_error(f"{module} imports its package {package}, whose __init__ imports it back: move what "
                               f"{module} needs out of {package}/__init__.py into a module of its own")
        output.new_line()
