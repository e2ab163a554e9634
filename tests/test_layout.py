"""The layering rule of README.md's Layout section, read from the import statements.

Every module under proxy/ belongs to one layer; a module imports only from
its own layer or the ones below it, and the modules' imports form no cycle.
A new module must be given a layer here, which is the moment to decide
where it belongs.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "proxy"
README = PACKAGE.parent / "README.md"

# Lowest first. The README's Layout section names the same layers.
LAYERS: tuple[tuple[str, frozenset[str]], ...] = (
    (
        "sans-IO",
        frozenset(
            {
                "proxy",
                "clienthello",
                "ja4",
                "sni",
                "identity",
                "outcome",
                "outcome.ingress",
                "outcome.upstream",
                "outcome.reasons",
                "proxy_protocol",
            }
        ),
    ),
    (
        "material",
        frozenset(
            {
                "config",
                "config.addresses",
                "config.errors",
                "config.fields",
                "config.schema",
                "config.load",
                "config.socketfile",
                "certs",
                "selfsigned",
                "openssl",
                "log",
                "metrics",
                "unraisable",
            }
        ),
    ),
    (
        "data path",
        frozenset(
            {
                "buffers",
                "membio",
                "tlsio",
                "tls",
                "tls_upstream",
                "handshake",
                "ends",
                "splice",
                "parking",
                "backend",
                "resolver",
                "accept_proxy",
            }
        ),
    ),
    ("connection", frozenset({"runtime", "upstream", "connection"})),
    (
        "process",
        frozenset(
            {
                "accept",
                "socket_file",
                "reload",
                "server",
                "admin",
                "watch",
                "fdlimit",
                "worker",
                "workers",
                "supervisor_start",
                "__main__",
            }
        ),
    ),
)

LAYER_OF = {module: rank for rank, (_, modules) in enumerate(LAYERS) for module in modules}


def _module_name(path: Path) -> str:
    """proxy/config/load.py -> "config.load"; proxy/__init__.py -> "proxy"."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "proxy"


def _imported(tree: ast.AST, modules: set[str]) -> set[str]:
    """The proxy modules a module imports, anywhere in it (a function's
    import and a TYPE_CHECKING block count too). `from proxy import x` is the
    module proxy.x if there is one, else a name of the package (its version)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names = [
                f"{node.module}.{alias.name}"
                if _local(f"{node.module}.{alias.name}") in modules
                else node.module
                for alias in node.names
            ]
        else:
            continue
        found.update(_local(name) for name in names if name.split(".")[0] == "proxy")
    return found


def _local(name: str) -> str:
    """proxy.config.load -> "config.load"; proxy -> "proxy"."""
    return name.removeprefix("proxy.") if name != "proxy" else name


def import_graph() -> dict[str, set[str]]:
    """Each module under proxy/ -> the proxy modules it imports."""
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(path) for path in paths}
    graph = {}
    for path in paths:
        name = _module_name(path)
        graph[name] = _imported(ast.parse(path.read_text(), str(path)), modules) - {name}
    return graph


def violations(graph: Mapping[str, set[str]]) -> list[str]:
    """Every import that runs up the layers, every module without a layer,
    and every cycle; empty when the layout keeps its rule."""
    found = [f"{module}: no layer (add it to LAYERS)" for module in graph if module not in LAYER_OF]
    for module, imports in sorted(graph.items()):
        for target in sorted(imports):
            if module in LAYER_OF and target in LAYER_OF and LAYER_OF[target] > LAYER_OF[module]:
                found.append(
                    f"{module} ({LAYERS[LAYER_OF[module]][0]}) imports {target} "
                    f"({LAYERS[LAYER_OF[target]][0]}), a higher layer"
                )
    found += [f"import cycle: {' -> '.join(cycle)}" for cycle in _cycles(graph)]
    return found


def _cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """One cycle through each module that is on one (depth-first search)."""
    cycles: list[list[str]] = []
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycles.append([*path[path.index(module) :], module])
            return
        if module in done:
            return
        for target in sorted(graph.get(module, ())):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    return cycles


def test_every_module_keeps_to_its_layer() -> None:
    found = violations(import_graph())
    assert not found, "\n".join(found)


# Below the data path no module touches the network: it may read files and
# write logs, but imports neither of these.
NETWORK = frozenset({"socket", "trio"})


def test_no_sockets_below_the_data_path() -> None:
    below = {module for _, modules in LAYERS[:2] for module in modules}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if _module_name(path) not in below:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module is not None:
                names = [node.module]
            else:
                continue
            found += [
                f"{_module_name(path)} imports {n}" for n in names if n.split(".")[0] in NETWORK
            ]
    assert not found, "\n".join(found)


def test_every_layer_has_a_module() -> None:
    """LAYERS names no module that is gone (a moved module must be moved here too)."""
    assert set(LAYER_OF) == set(import_graph())


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"ja4": {"clienthello"}, "clienthello": set()}, []),
        (
            {"ja4": {"server"}, "server": set()},
            ["ja4 (sans-IO) imports server (process), a higher layer"],
        ),
        (
            {"config.schema": {"connection"}, "connection": set()},
            ["config.schema (material) imports connection (connection), a higher layer"],
        ),
        ({"elsewhere": set()}, ["elsewhere: no layer (add it to LAYERS)"]),
        (
            {"server": {"reload"}, "reload": {"server"}},
            ["import cycle: reload -> server -> reload"],
        ),
    ],
)
def test_the_rule_catches(graph: dict[str, set[str]], expected: list[str]) -> None:
    assert violations(graph) == expected


def readme_layers() -> list[tuple[str, set[str]]]:
    """The README's Layout tree: each `# N. layer` heading and the modules
    listed under it (`config/` with its files: config, config.load, ...)."""
    text = README.read_text()
    tree = text[text.index("## Layout") :].split("```")[1]
    layers: list[tuple[str, set[str]]] = []
    package = ""
    for line in tree.splitlines():
        if heading := re.fullmatch(r"  # \d+\. (.+)", line):
            layers.append((heading[1], set()))
        elif entry := re.fullmatch(r"( +)(\w+)(\.py|/) .*", line):
            indent, name, kind = entry.groups()
            if kind == "/":
                package = name
                layers[-1][1].add(name)
            elif len(indent) > 2:
                layers[-1][1].add(f"{package}.{name}")
            else:
                layers[-1][1].add(name)
    return layers


def test_the_readme_shows_these_layers() -> None:
    """README.md's Layout names every module, in the layer this test gives it."""
    expected = [(name, set(modules) - {"proxy"}) for name, modules in LAYERS]
    assert readme_layers() == expected
