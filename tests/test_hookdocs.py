"""The hook reference stays equal to the hook specs, and every hook has a test.

Two meta-tests in the manner of datasette's: docs/hooks.md must be exactly what
``llmproxy.hookdocs`` renders from ``llmproxy/hookspecs.py`` (so a changed contract cannot
ship with stale docs), and every hook must be implemented by a plugin in at least one test
file other than this one (so a new hook cannot ship untested).
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from llmproxy import hookdocs, hookspecs
from llmproxy.manager import FLOW_HOOKS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "hooks.md"
HOOKS = [fn.__name__ for fn in hookdocs.hookspecs()]


def test_docs_hooks_md_is_generated_from_the_hookspecs() -> None:
    assert DOCS.read_text() == hookdocs.render(), f"docs/hooks.md is out of date with llmproxy/hookspecs.py; regenerate it: {hookdocs.COMMAND}"


def test_every_hook_is_in_the_reference_with_its_contract() -> None:
    assert set(FLOW_HOOKS) <= set(HOOKS)
    rendered = hookdocs.render()
    for fn in hookdocs.hookspecs():
        doc = inspect.getdoc(fn)
        assert doc and len(doc) > 40, f"hook {fn.__name__} needs a docstring stating its contract"
        assert f"### `{fn.__name__}`" in rendered
        assert hookdocs.signature(fn) in rendered
    # every hookspec found, and only hookspecs
    marked = {name for name, value in vars(hookspecs).items() if hasattr(value, "llmproxy_spec")}
    assert set(HOOKS) == marked


def _test_sources() -> dict[str, str]:
    here = Path(__file__).resolve()
    return {str(p.relative_to(ROOT)): p.read_text() for p in sorted((ROOT / "tests").rglob("*.py")) if p.resolve() != here}


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test(hook: str) -> None:
    # an implementation marked @hookimpl (with or without options), sync or async
    implementation = re.compile(rf"@hookimpl(\([^)]*\))?\s*\n\s*(async\s+)?def {hook}\(")
    files = [name for name, source in _test_sources().items() if implementation.search(source)]
    assert files, f"no test implements the {hook!r} hook; add one that proves its contract (see docs/hooks.md)"
