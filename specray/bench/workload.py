"""The benchmark's prompt sets, shipped in data/ as JSON lines {"id", "source", "prompt"}.

- `code`: 48 openings of functions and methods from the standard-library modules the demo pair
  never trained on (made by make_prompts.py; `source` is "stdlib/relative/path.py:LINE");
- `prose`: 32 hand-written openings of plain English sentences (`source` "hand-written").

A run takes the first N prompts of each set, in file order. Knows nothing of models or timing."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DATA = Path(__file__).parent / "data"
SETS = ("code", "prose")


@dataclass(frozen=True)
class Prompt:
    id: str
    set: str
    text: str
    source: str


def load_set(name: str) -> list[Prompt]:
    if name not in SETS:
        raise ValueError(f"unknown prompt set {name!r}; choose from {list(SETS)}")
    lines = (DATA / f"{name}.jsonl").read_text().splitlines()
    return [Prompt(r["id"], name, r["prompt"], r["source"]) for r in map(json.loads, lines) if r]


def select(sets: tuple[str, ...], counts: tuple[int, ...] = ()) -> dict[str, list[Prompt]]:
    """The first counts[i] prompts of sets[i] (one count applies to every set; none: whole sets)."""
    if counts and len(counts) not in (1, len(sets)):
        raise ValueError(f"give one prompt count, or one per set ({len(sets)}), got {list(counts)}")
    if any(c < 1 for c in counts):
        raise ValueError(f"prompt counts must be >= 1, got {list(counts)}")
    out = {}
    for i, name in enumerate(sets):
        prompts = load_set(name)
        n = counts[0 if len(counts) == 1 else i] if counts else len(prompts)
        if n > len(prompts):
            raise ValueError(f"prompt set {name!r} has {len(prompts)} prompts, {n} asked for")
        out[name] = prompts[:n]
    return out
