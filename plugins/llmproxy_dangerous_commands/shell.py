"""A small shell reader: enough of POSIX sh / bash syntax to find every simple command in a
command line, so the rules in :mod:`.rules` judge programs and their arguments rather than
raw text (``echo "rm -rf /"`` runs echo; ``bash -c "rm -rf /"`` runs rm).

It never fails: unbalanced quotes or parentheses end the word or substitution where the
text ends, because a command line the reader cannot parse must still be judged (a refusal
to parse would let it through).

What it understands: words with '…', "…", $'…' quoting and backslash escapes; ``#``
comments; the operators ``; & && || | |& ( ) \\n`` between commands; redirections (``>``,
``>>``, ``2>``, ``&>``, ``<`` …) and their targets; command substitution ``$(…)`` and
backticks (unquoted or inside double quotes) and process substitution ``<(…)``, whose text
is analysed as commands too. Heredoc bodies are read as the following lines, i.e. as
commands — a ``bash <<EOF`` body runs, so that errs on the safe side.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_SEPARATORS = frozenset((";", "&", "&&", "||", "\n", "(", ")", ";;", "{", "}"))
_PIPES = frozenset(("|", "|&"))
_REDIRECTS = frozenset((">", ">>", "<", "<<", "<<-", "<<<", ">&", "<&", "&>", "&>>", ">|", "<>"))
_OPERATOR_CHARS = frozenset(";&|()<>\n")


@dataclass(slots=True)
class Segment:
    """One simple command: its words, its redirections, and whether stdin comes from a pipe."""

    words: list[str] = field(default_factory=list)
    redirects: list[tuple[str, str]] = field(default_factory=list)
    piped: bool = False


@dataclass(slots=True)
class Script:
    """A command line read into pipelines of segments, plus the text of every command and
    process substitution found in it (each to be read as a script of its own)."""

    pipelines: list[list[Segment]]
    substitutions: list[str]


def _closing(text: str, start: int, opener: str = "(", closer: str = ")") -> int:
    """Index just past the ``closer`` matching an opener before ``start`` (quotes respected),
    or len(text) when it never closes."""
    depth = 1
    i = start
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "'":
            end = text.find("'", i + 1)
            i = n if end < 0 else end + 1
            continue
        if c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            i += 1
            continue
        if c == opener:
            depth += 1
        elif c == closer:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return n


def tokens(text: str) -> tuple[list[tuple[str, str]], list[str]]:
    """Split ``text`` into ``("word", text)`` and ``("op", operator)`` tokens, and collect
    the text of command and process substitutions."""
    out: list[tuple[str, str]] = []
    subs: list[str] = []
    word: list[str] = []
    in_word = False  # a word has begun (possibly empty, as in "")
    quoted = False  # the current word has quoted parts (so "2" before ">" is a word, not a fd)
    i = 0
    n = len(text)

    def end_word() -> None:
        nonlocal in_word, quoted
        if in_word:
            out.append(("word", "".join(word)))
            word.clear()
        in_word = False
        quoted = False

    while i < n:
        c = text[i]
        if c in " \t\r":
            end_word()
            i += 1
        elif c == "#" and not in_word:
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif c == "\\":
            if i + 1 < n and text[i + 1] == "\n":  # line continuation
                i += 2
                continue
            word.append(text[i + 1 : i + 2])
            in_word = True
            i += 2
        elif c == "'":
            end = text.find("'", i + 1)
            end = n if end < 0 else end
            word.append(text[i + 1 : end])
            in_word = quoted = True
            i = end + 1
        elif c == "$" and text.startswith("$'", i):
            j = i + 2
            chars = []
            while j < n and text[j] != "'":
                if text[j] == "\\" and j + 1 < n:
                    chars.append(text[j + 1])
                    j += 2
                    continue
                chars.append(text[j])
                j += 1
            word.append("".join(chars))
            in_word = quoted = True
            i = j + 1
        elif c == '"':
            j = i + 1
            chars = []
            while j < n and text[j] != '"':
                d = text[j]
                if d == "\\" and j + 1 < n:
                    if text[j + 1] in '"\\$`':
                        chars.append(text[j + 1])
                    elif text[j + 1] != "\n":
                        chars.append(text[j : j + 2])
                    j += 2
                elif d == "$" and text.startswith("$(", j):
                    end = _closing(text, j + 2)
                    subs.append(text[j + 2 : end - 1] if end <= n and text[end - 1 : end] == ")" else text[j + 2 : end])
                    chars.append(text[j:end])
                    j = end
                elif d == "`":
                    end = text.find("`", j + 1)
                    end = n if end < 0 else end
                    subs.append(text[j + 1 : end])
                    chars.append(text[j : end + 1])
                    j = end + 1
                else:
                    chars.append(d)
                    j += 1
            word.append("".join(chars))
            in_word = quoted = True
            i = j + 1
        elif c == "$" and text.startswith("$(", i):
            end = _closing(text, i + 2)
            subs.append(text[i + 2 : end - 1] if text[end - 1 : end] == ")" else text[i + 2 : end])
            word.append(text[i:end])
            in_word = True
            i = end
        elif c == "$" and text.startswith("${", i):
            end = _closing(text, i + 2, "{", "}")
            word.append(text[i:end])
            in_word = True
            i = end
        elif c == "`":
            end = text.find("`", i + 1)
            end = n if end < 0 else end
            subs.append(text[i + 1 : end])
            word.append(text[i : end + 1])
            in_word = True
            i = end + 1
        elif c in "<>" and text.startswith("(", i + 1):  # process substitution <(…) >(…)
            end = _closing(text, i + 2)
            subs.append(text[i + 2 : end - 1] if text[end - 1 : end] == ")" else text[i + 2 : end])
            word.append(text[i:end])
            in_word = True
            i = end
        elif c in _OPERATOR_CHARS:
            if c in "<>" and in_word and not quoted and "".join(word).isdigit():
                word.clear()  # "2>": a file descriptor, not an argument
                in_word = False
            end_word()
            j = i + 1
            while j < n and text[j] in _OPERATOR_CHARS and text[j] != "\n" and text[i : j + 1] in _KNOWN_OPERATORS:
                j += 1
            out.append(("op", text[i:j]))
            i = j
        else:
            word.append(c)
            in_word = True
            i += 1
    end_word()
    return out, subs


_KNOWN_OPERATORS = frozenset(
    (";", "&", "&&", "||", "|", "|&", "(", ")", ";;", "\n", ">", ">>", "<", "<<", "<<-", "<<<", ">&", "<&", "&>", "&>>", ">|", "<>")
)


def read(text: str) -> Script:
    """Read a command line into pipelines of simple commands."""
    toks, subs = tokens(text)
    pipelines: list[list[Segment]] = []
    pipeline: list[Segment] = []
    segment = Segment()
    expect_target: str | None = None

    def close(piped_next: bool) -> None:
        nonlocal segment, pipeline
        if segment.words or segment.redirects:
            pipeline.append(segment)
        segment = Segment(piped=piped_next and bool(pipeline))
        if not piped_next:
            if pipeline:
                pipelines.append(pipeline)
            pipeline = []

    for kind, value in toks:
        if kind == "word":
            if expect_target is not None:
                segment.redirects.append((expect_target, value))
                expect_target = None
            elif value in ("{", "}", "!") and not segment.words:
                continue  # grouping and negation: the command follows
            else:
                segment.words.append(value)
        elif value in _PIPES:
            expect_target = None
            close(True)
        elif value in _REDIRECTS:
            expect_target = value
        else:
            expect_target = None
            close(False)
    close(False)
    return Script(pipelines, subs)
