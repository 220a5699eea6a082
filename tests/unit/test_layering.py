"""The package's layering, enforced by parsing imports (the folders are the architecture).

- specray/core: pure torch; no Ray, Serve, gRPC or protobuf, and nothing from actors/engine/deployments.
- specray/actors: Ray, but no Serve, gRPC or protobuf.
- specray/engine/engine.py (the scheduler): no Ray and no actors; the transports (engine/workers.py,
  engine/graph.py, engine/placement.py) hold what it needs of them.
- Only specray/deployments imports ray.serve or generated `*_pb2` / `*_pb2_grpc` modules (the
  generated modules themselves, wherever they live, are exempt); besides them, the gRPC client
  specray/client.py imports the generated modules, and neither Ray nor the engine. Tests are not checked.
Every import counts, including ones inside functions and relative ones. Folders that do not exist
yet check nothing."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "specray"
RPC = ("grpc", "google.protobuf")
CORE_FORBIDDEN = ("ray", *RPC, "specray.actors", "specray.deployments", "specray.engine")
ACTORS_FORBIDDEN = ("ray.serve", *RPC)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Absolute names of every module `source` (the module `module`) imports, `from a import b` giving a and a.b."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package[:len(package) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def is_under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def is_generated(name: str) -> bool:
    return name.rsplit(".", 1)[-1].endswith(("_pb2", "_pb2_grpc"))


def sources(folder: str = "") -> list[Path]:
    root = PACKAGE / folder if folder else PACKAGE
    return sorted(root.rglob("*.py")) if root.is_dir() else []


def violations(files: list[Path], forbidden) -> list[str]:
    """'file: module' for every import in `files` that `forbidden(name)` rejects."""
    out = []
    for path in files:
        names = imported_modules(path.read_text(), module_name(path), path.name == "__init__.py")
        out += [f"{path.relative_to(PACKAGE.parent)}: {n}" for n in sorted(names) if forbidden(n)]
    return out


def test_core_imports_no_ray_rpc_or_upper_layers():
    files = sources("core")
    assert files, "specray/core should exist and hold the model"
    assert not violations(files, lambda n: is_under(n, CORE_FORBIDDEN) or is_generated(n))


def test_actors_import_no_serve_or_rpc():
    assert not violations(sources("actors"), lambda n: is_under(n, ACTORS_FORBIDDEN) or is_generated(n))


def test_the_engine_imports_no_ray_or_actors():
    engine = [p for p in sources("engine") if module_name(p) == "specray.engine.engine"]
    assert engine and not violations(engine, lambda n: is_under(n, ("ray", "specray.actors")))


def test_only_deployments_import_serve_or_generated_protobuf():
    files = [p for p in sources() if not is_generated(module_name(p))
             and not module_name(p).startswith(("specray.deployments", "specray.client"))]
    assert not violations(files, lambda n: is_under(n, ("ray.serve",)) or is_generated(n))


def test_the_grpc_client_imports_protobuf_but_not_ray():
    client = [p for p in sources() if module_name(p) == "specray.client"]
    assert client and not violations(client, lambda n: is_under(n, ("ray", "specray.engine", "specray.core")))


@pytest.mark.parametrize("source, module, expected", [
    ("import ray", "specray.core.x", {"ray"}),
    ("from ray import serve", "specray.actors.w", {"ray", "ray.serve"}),
    ("def f():\n    import grpc.aio", "specray.core.x", {"grpc.aio"}),
    ("from google.protobuf import message", "specray.core.x", {"google.protobuf", "google.protobuf.message"}),
    ("from ..deployments import app", "specray.core.x", {"specray.deployments", "specray.deployments.app"}),
    ("from . import tree", "specray.core.model", {"specray.core", "specray.core.tree"}),
    ("from .gen import specray_pb2", "specray.engine.s", {"specray.engine.gen", "specray.engine.gen.specray_pb2"}),
])
def test_import_parser_sees_every_form(source, module, expected):
    """The checker itself: absolute, from-, nested and relative imports all resolve to absolute names."""
    assert imported_modules(source, module) == expected


def test_import_parser_resolves_relative_imports_in_packages():
    assert imported_modules("from .. import engine", "specray.core", is_package=True) == {"specray", "specray.engine"}
    assert is_under("specray.engine", CORE_FORBIDDEN) and is_generated("specray.engine.gen.specray_pb2")
    assert not is_under("rayon", CORE_FORBIDDEN) and not is_under("ray_utils", ("ray",))
