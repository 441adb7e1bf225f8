"""The kernel templates as files (codegen/*/templates/*.jinja, rendered by codegen/_templates.py):
no template syntax survives into a generated module, a variable the renderer does not pass
is an error, editing a template changes the kernel-cache keys, and the templates ship as
package data."""
import itertools
import shutil
from pathlib import Path

import jinja2
import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from codegen import _templates
from codegen.attention import cache as kcache
from codegen.attention import render
from codegen.attention.kernel_spec import AttentionKernelSpec
from codegen.memory import update_rule

ROOT = Path(__file__).resolve().parent.parent
LEFTOVERS = ("{%", "%}", "{{", "}}", "{#", "#}", "#?")


@pytest.mark.parametrize("variant, has_padding, current",
                         list(itertools.product(("ptr", "desc"), (False, True), ("dense", "causal"))))
def test_attention_source_is_plain_python(variant, has_padding, current):
    spec = AttentionKernelSpec(32, 16, 4, 2, "float32", 2, 3, current, 16, has_padding)
    src = render.render_attention_source(spec, variant, key="k" * 32)
    assert src.splitlines()[0] == "# sparsedsl-kernel-key: " + "k" * 32
    assert "# Glossary" in src and "codegen/attention/templates/" in src.splitlines()[2]
    assert not [s for s in LEFTOVERS if s in src]
    assert "\n\n\n\n" not in src and not any(line != line.rstrip() for line in src.splitlines())
    compile(src, "generated", "exec")


def test_update_source_is_plain_python():
    src = update_rule.render_update_source("importance * exp(-age / 4) + previous",
                                           header=("schedule x", "  two"))
    assert not [s for s in LEFTOVERS if s in src]
    assert "    schedule x\n      two\n\nStatistics" in src
    compile(src, "generated", "exec")


def test_a_missing_variable_is_an_error():
    spec = AttentionKernelSpec(16, 16, 1, 1, "bfloat16", 1, 1, "dense", 0, False)
    good = render.render_attention_source(spec, "ptr")
    assert good
    with pytest.raises(jinja2.UndefinedError, match="BT"):
        _templates.render(render.TEMPLATE_DIR, "header.py.jinja", key="", generator="",
                          variant="ptr", has_padding=False, current="dense", dtype="bfloat16")


def test_editing_a_template_changes_the_cache_keys(tmp_path, monkeypatch):
    for module in (render, update_rule):
        copy = tmp_path / module.__name__
        shutil.copytree(module.TEMPLATE_DIR, copy)
        assert _templates.templates_hash(copy) == module.TEMPLATE_HASH
        first = sorted(copy.glob("*.jinja"))[0]
        first.write_text(first.read_text() + "# edited\n")
        assert _templates.templates_hash(copy) != module.TEMPLATE_HASH
    spec = AttentionKernelSpec(16, 16, 1, 1, "bfloat16", 1, 1, "dense", 0, False)
    key, ukey = kcache.kernel_key(spec, "ptr"), update_rule.update_key("importance")
    monkeypatch.setattr(kcache, "TEMPLATE_HASH", "0" * 16)
    monkeypatch.setattr(update_rule, "TEMPLATE_HASH", "0" * 16)
    assert kcache.kernel_key(spec, "ptr") != key
    assert update_rule.update_key("importance") != ukey


def test_templates_ship_as_package_data():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_data = config["tool"]["setuptools"]["package-data"]
    templates = sorted((ROOT / "codegen").rglob("*.jinja"))
    assert len(templates) >= 6
    for path in templates:
        rel = path.relative_to(ROOT)
        covered = False
        for package, globs in package_data.items():
            pkg_dir = Path(*package.split("."))
            if rel.is_relative_to(pkg_dir):
                covered |= any(rel.relative_to(pkg_dir).match(g) for g in globs)
        assert covered, f"{rel} is not in [tool.setuptools.package-data]"
