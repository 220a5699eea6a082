"""Code-completion prompts for benchmarks: openings of Python functions and classes.

They end before a newline: byte-level BPE tokenizers merge a newline with the next line's
indentation, so a prompt ending in a bare newline sits on a token boundary never seen in training."""

CODE_PROMPTS = (
    "def fibonacci(n):",
    "import os\nimport sys\n\n\ndef main(argv):",
    "class Stack:\n    def __init__(self):",
    "def read_config(path):\n    \"\"\"Read a configuration file and return a dict.\"\"\"",
    "    def __repr__(self):",
    "def parse_args(args=None):\n    parser = argparse.ArgumentParser(",
    "class Error(Exception):\n    \"\"\"Base class for errors in this module.\"\"\"",
    "def _escape(s, quote=True):",
    "    for i, line in enumerate(lines):",
    "def copy(self):\n    \"\"\"Return a shallow copy.\"\"\"",
    "try:\n    import _thread\nexcept ImportError:",
    "def isabs(s):\n    \"\"\"Test whether a path is absolute\"\"\"",
    "class Queue:\n    def put(self, item, block=True, timeout=None):",
    "def encode(self, obj):",
    "    if not isinstance(key, str):\n        raise TypeError(",
    "def split(p):\n    \"\"\"Split a pathname.\"\"\"",
)
