"""Make the held-out code prompt set, `data/code.jsonl`: `python -m specray.bench.make_prompts`.

Each prompt is the opening of a function or method from the standard-library modules the demo pair
never trained on (HELD_OUT, the same list as tools/train_demo_pair.py; a unit test keeps them
equal): its one-line `def ...:` header, plus the first source line of its docstring when it has
one. Multi-line headers, one-line bodies and docstrings on the header line are skipped. The
functions are shuffled with a fixed seed, so any prefix of the file mixes modules. Prompts end
before a newline (see prompts.py). Run it under the Python whose stdlib the demo pair was trained
on (3.11); the prose set, `data/prose.jsonl`, is hand-written."""
from __future__ import annotations

import argparse
import ast
import json
import random
import sysconfig
from pathlib import Path

HELD_OUT = ("json/", "textwrap.py", "csv.py", "pprint.py", "difflib.py")  # relative to the stdlib
DATA = Path(__file__).parent / "data"


def held_out_files(stdlib: Path) -> list[Path]:
    files = []
    for rel in HELD_OUT:
        path = stdlib / rel
        files += sorted(path.rglob("*.py")) if rel.endswith("/") else [path]
    return files


def openings(path: Path, stdlib: Path) -> list[dict]:
    """{"source": "rel/path.py:LINE", "prompt"} for every eligible function in one file."""
    lines = path.read_text().splitlines()
    out = []
    for node in ast.walk(ast.parse("\n".join(lines))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        header = lines[node.lineno - 1].rstrip()
        if not header.lstrip().startswith(("def ", "async def ")) or not header.endswith(":"):
            continue
        prompt = header
        first = node.body[0]
        is_doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
            and isinstance(first.value.value, str)
        if is_doc and first.lineno > node.lineno:
            prompt += "\n" + lines[first.lineno - 1].rstrip()
        out.append({"source": f"{path.relative_to(stdlib).as_posix()}:{node.lineno}", "prompt": prompt})
    return out


def code_prompts(stdlib: Path, count: int = 48, seed: int = 0) -> list[dict]:
    """`count` openings drawn from the held-out modules with a fixed seed, ids code-00, code-01, ..."""
    pool = [o for f in held_out_files(stdlib) for o in openings(f, stdlib)]
    chosen = random.Random(seed).sample(pool, count)
    return [{"id": f"code-{i:02d}", **o} for i, o in enumerate(chosen)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    p.add_argument("--count", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DATA / "code.jsonl")
    args = p.parse_args(argv)
    rows = code_prompts(args.stdlib, args.count, args.seed)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} prompts to {args.out}")


if __name__ == "__main__":
    main()
