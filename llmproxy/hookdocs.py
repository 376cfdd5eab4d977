"""Render the hook reference (docs/hooks.md) from the hook specifications.

The contract lives in one place, :mod:`llmproxy.hookspecs`: its module docstring and one
docstring per hook. This module turns them into Markdown, so the docs cannot drift from the
code; ``tests/test_hookdocs.py`` fails when docs/hooks.md differs from what this renders.
Regenerate with::

    python -m llmproxy.hookdocs > docs/hooks.md
"""

from __future__ import annotations

import inspect
import re
import sys
from types import ModuleType
from typing import Any, Callable

from . import hookspecs as _hookspecs

COMMAND = "python -m llmproxy.hookdocs > docs/hooks.md"
_SECTION = re.compile(r"^# -- (.+?) -+$")
_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc):`(~?)([^`]+)`")


def hookspecs(module: ModuleType = _hookspecs) -> list[Callable[..., Any]]:
    """The hook specifications of ``module``, in the order they are written."""
    marker = f"{_hookspecs.hookspec.project_name}_spec"
    found = [value for value in vars(module).values() if inspect.isfunction(value) and hasattr(value, marker)]
    return sorted(found, key=lambda fn: fn.__code__.co_firstlineno)


def _markdown(text: str) -> str:
    """reStructuredText inline markup, as used in our docstrings, to Markdown."""
    text = _ROLE.sub(lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`", text)
    text = text.replace("``", "`")
    return text.replace("::\n", ":\n")


def _annotation(value: Any) -> str:
    # With postponed evaluation the annotations are source text; drop forward-ref quotes.
    return (value if isinstance(value, str) else inspect.formatannotation(value)).replace('"', "").replace("'", "")


def signature(fn: Callable[..., Any]) -> str:
    sig = inspect.signature(fn)
    params = []
    for param in sig.parameters.values():
        params.append(param.name if param.annotation is param.empty else f"{param.name}: {_annotation(param.annotation)}")
    returns = "" if sig.return_annotation is sig.empty else f" -> {_annotation(sig.return_annotation)}"
    return f"def {fn.__name__}({', '.join(params)}){returns}"


def _sections(module: ModuleType) -> list[tuple[int, str]]:
    """(line, title) of each ``# -- title ---`` comment in the module's source."""
    lines = inspect.getsource(module).splitlines()
    return [(number, match.group(1)) for number, line in enumerate(lines, 1) if (match := _SECTION.match(line))]


def render(module: ModuleType = _hookspecs) -> str:
    """docs/hooks.md: the module docstring, then each hook's signature and contract."""
    out = [
        "# Hook reference",
        "",
        f"<!-- Generated from {module.__name__.replace('.', '/')}.py by `{COMMAND}`; edit the docstrings there, not this file. -->",
        "",
        _markdown(inspect.cleandoc(module.__doc__ or "")),
    ]
    sections = _sections(module)
    current = None
    marker = f"{_hookspecs.hookspec.project_name}_spec"
    for fn in hookspecs(module):
        line = fn.__code__.co_firstlineno
        title = next((t for n, t in reversed(sections) if n < line), None)
        if title is not None and title != current:
            current = title
            out += ["", f"## {title[:1].upper()}{title[1:]}"]
        out += ["", f"### `{fn.__name__}`", "", "```python", signature(fn), "```", ""]
        options = getattr(fn, marker) or {}
        flags = [name for name in ("firstresult", "historic") if options.get(name)]
        if flags:
            out += [f"*pluggy: {', '.join(flags)}*", ""]
        out.append(_markdown(inspect.getdoc(fn) or "(undocumented)"))
    return "\n".join(line.rstrip() for line in "\n".join(out).splitlines()) + "\n"


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
