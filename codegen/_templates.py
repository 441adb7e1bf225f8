"""Kernel templates as files: the Jinja2 environment of a template folder, and its hash.

The generated kernels (codegen/attention/templates/, codegen/memory/templates/) are Jinja2
files that read like the Triton they become: `{% if has_padding %} ... {% endif %}` on
lines of their own, `{{ BT }}` placeholders. Every folder renders with the same settings:

    undefined=StrictUndefined   a variable the renderer does not pass is an error
    trim_blocks, lstrip_blocks  a line holding only a {% tag %} or {# comment #} leaves
                                nothing behind (no blank line, no indentation)
    keep_trailing_newline       the file's last newline is kept
    autoescape off              the output is Python, not HTML

plus the filter `repr` (a Python literal of a value). `templates_hash(folder)` hashes the
folder's template files (name and bytes, sorted by name); the kernel caches put it in
their keys, so editing a template invalidates the kernels rendered from it.

Imports nothing of codegen (any room may import it); jinja2 is imported on first use.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

SUFFIX = ".jinja"


@functools.lru_cache(maxsize=None)
def environment(folder: str):
    """The Jinja2 environment loading the templates in `folder` (a path, as a str)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(folder),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["repr"] = repr
    return env


def render(folder: Path, name: str, **context) -> str:
    """Template `name` of `folder` rendered with `context` (a missing variable raises)."""
    return environment(str(folder)).get_template(name).render(**context)


def template_files(folder: Path) -> list[Path]:
    """The template files of `folder`, sorted by name."""
    files = sorted(Path(folder).glob("*" + SUFFIX))
    if not files:  # pragma: no cover - an install without the package data
        raise FileNotFoundError(f"no {SUFFIX} templates in {folder} (package data missing?)")
    return files


def templates_hash(folder: Path) -> str:
    """sha256 (16 hex digits) over the template files of `folder`: names and bytes, by name."""
    h = hashlib.sha256()
    for path in template_files(folder):
        data = path.read_bytes()
        h.update(f"{path.name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()[:16]
