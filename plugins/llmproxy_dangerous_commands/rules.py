"""The built-in rules: which commands are destructive, judged on programs and arguments.

:func:`check` reads a command line with :mod:`.shell`, unwraps what only changes *how* a
command runs (``sudo``, ``env``, ``VAR=value`` prefixes, ``nohup``, ``timeout``, ``xargs``,
``bash -c "…"``, ``eval``, command substitutions) and applies every rule to every simple
command it finds. Each rule has an id (for ``disabled_rules``) and a reason (for the
message). The rules aim at commands that destroy data or the machine in one step and cannot
be undone; look-alikes that are routine in agent work (``rm -rf ./build``, ``git clean -n``,
``git push``, ``echo "rm -rf /"``) pass.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from typing import Callable, Iterable

from .shell import Segment, read

RULES: dict[str, str] = {
    "rm_root": "recursive delete of the filesystem root, the home directory, a system directory or the whole working directory",
    "find_delete_root": "find -delete (or -exec rm) over the filesystem root, the home directory or a system directory",
    "git_reset_hard": "git reset --hard throws away uncommitted changes",
    "git_clean_force": "git clean -f deletes untracked files for good (git clean -n only lists them)",
    "git_push_force": "a force push rewrites the remote's history",
    "git_discard_changes": "discards every uncommitted change in the working tree",
    "git_branch_force_delete": "git branch -D deletes a branch even if it is not merged",
    "disk_format": "formats or wipes a disk or partition",
    "disk_write": "writes raw data to a disk device",
    "recursive_permissions": "recursive chmod/chown of the filesystem root, the home directory or a system directory",
    "fork_bomb": "a fork bomb",
    "sql_drop": "drops a database, schema or table",
    "pipe_to_shell": "runs a script downloaded from the network without looking at it",
    "power": "shuts down or restarts the machine",
}
"""Every built-in rule: id → the reason given when it blocks."""


@dataclass(frozen=True, slots=True)
class Finding:
    """A blocked command: the rule, why, and the simple command that matched."""

    rule: str
    reason: str
    command: str


# -- paths -------------------------------------------------------------------------------------

_SYSTEM_DIRS = frozenset(
    "/bin /boot /dev /etc /home /lib /lib32 /lib64 /opt /proc /root /sbin /srv /sys /usr /var /mnt /media "
    "/snap /usr/bin /usr/lib /usr/local /usr/sbin /usr/share /var/lib /Users /System /Library /Applications /private "
    "/Volumes".split()
)
_HOME = frozenset(("~", "$HOME", "${HOME}"))
_HERE = frozenset((".", "..", "*", ".*", "$PWD", "${PWD}", "$(pwd)", "`pwd`"))


def _base(path: str) -> str:
    """``path`` without trailing ``/``, ``/.``, ``/*`` (so ``/*``, ``~/`` and ``./*`` are
    judged as ``/``, ``~`` and ``.``); the root stays ``/``."""
    while True:
        for suffix in ("/*", "/.", "/"):
            if path.endswith(suffix) and len(path) > len(suffix) - 1:
                path = path[: -len(suffix)]
                break
        else:
            break
    while "//" in path:
        path = path.replace("//", "/")
    return path or "/"


_SOMEONES_HOME = "/home/\x00"  # where ~ points, for resolving ``~/..``


def _resolved(path: str) -> str | None:
    """An absolute or home-relative path with ``.``/``..`` resolved, or None."""
    for home in _HOME:
        if path == home or path.startswith(home + "/"):
            path = _SOMEONES_HOME + path[len(home) :]
            break
    if not path.startswith("/"):
        return None
    return _base(posixpath.normpath(path))


def _system_path(path: str) -> bool:
    """The root, the home directory or a top-level system directory (not things inside them)."""
    base = _base(path)
    if base == "/" or base in _HOME or base in _SYSTEM_DIRS:
        return True
    resolved = _resolved(path)
    return resolved is not None and (resolved in ("/", _SOMEONES_HOME) or resolved in _SYSTEM_DIRS)


def _project_path(path: str) -> bool:
    """The working directory (the project) or its parent, as a whole."""
    return _base(path) in _HERE


# -- flags -------------------------------------------------------------------------------------


def _short_flags(args: Iterable[str]) -> str:
    """Every single-letter flag given (``-rf -x`` → ``"rfx"``), up to ``--``."""
    letters = []
    for arg in args:
        if arg == "--":
            break
        if arg.startswith("-") and not arg.startswith("--") and len(arg) > 1:
            letters.append(arg[1:])
    return "".join(letters)


def _operands(args: list[str]) -> list[str]:
    """Arguments that are not options (everything after ``--`` counts)."""
    out = []
    rest = False
    for arg in args:
        if rest:
            out.append(arg)
        elif arg == "--":
            rest = True
        elif not arg.startswith("-") or arg == "-":
            out.append(arg)
    return out


def _basename(word: str) -> str:
    return word.rsplit("/", 1)[-1]


# -- unwrapping -----------------------------------------------------------------------------------

_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\[[^\]]*\])?\+?=")
_SHELLS = frozenset(("sh", "bash", "zsh", "dash", "ksh", "mksh", "ash", "fish", "csh", "tcsh", "busybox"))
_INTERPRETERS = frozenset(("python", "python3", "python2", "perl", "ruby", "node", "php", "pwsh", "powershell"))
# wrapper → its options that take a value (the command follows the options)
_WRAPPERS: dict[str, frozenset[str]] = {
    "sudo": frozenset("-u -g -h -p -C -D -r -t -U -T -R --user --group --host --prompt --chdir --role --type --other-user".split()),
    "doas": frozenset(("-u", "-C")),
    "run0": frozenset(("-u", "--user", "-D")),
    "pkexec": frozenset(("--user",)),
    "nohup": frozenset(),
    "time": frozenset(("-f", "-o", "--format", "--output")),
    "nice": frozenset(("-n", "--adjustment")),
    "ionice": frozenset(("-c", "-n", "-p", "--class", "--classdata")),
    "command": frozenset(),
    "builtin": frozenset(),
    "exec": frozenset(("-a",)),
    "stdbuf": frozenset(("-i", "-o", "-e")),
    "setsid": frozenset(),
    "unbuffer": frozenset(),
    "chronic": frozenset(),
    "caffeinate": frozenset(("-t", "-w")),
    "xargs": frozenset("-I -n -P -L -d -E -s -a --max-args --max-procs --max-lines --delimiter --eof --max-chars --arg-file".split()),
    "watch": frozenset(("-n", "--interval", "-d")),
    "then": frozenset(),
    "do": frozenset(),
    "else": frozenset(),
    "if": frozenset(),
    "while": frozenset(),
    "until": frozenset(),
}


def _strip_options(args: list[str], valued: frozenset[str]) -> list[str]:
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return args[i + 1 :]
        if not arg.startswith("-") or arg == "-":
            return args[i:]
        if arg in valued:
            i += 2
        else:
            i += 1
    return []


def unwrap(words: list[str]) -> tuple[list[str], list[str]]:
    """The command that really runs, and scripts it runs as text (``bash -c``, ``eval``)."""
    scripts: list[str] = []
    for _ in range(16):  # wrappers of wrappers, bounded
        while words and _ASSIGNMENT.match(words[0]):
            words = words[1:]
        if not words:
            break
        program = _basename(words[0])
        args = words[1:]
        if program in _WRAPPERS:
            if program == "command" and any(a in ("-v", "-V") for a in args[:1]):
                break  # command -v: a lookup, nothing runs
            words = _strip_options(args, _WRAPPERS[program])
            continue
        if program == "env":
            rest = []
            i = 0
            while i < len(args):
                arg = args[i]
                if arg in ("-S", "--split-string") and i + 1 < len(args):
                    scripts.append(args[i + 1])
                    i += 2
                elif arg in ("-u", "--unset", "-C", "--chdir"):
                    i += 2
                elif arg.startswith("-") and not rest or _ASSIGNMENT.match(arg):
                    i += 1
                else:
                    rest = args[i:]
                    break
            words = rest
            continue
        if program == "timeout":
            rest = _strip_options(args, frozenset(("-s", "--signal", "-k", "--kill-after")))
            words = rest[1:]  # the duration
            continue
        if program == "eval":
            scripts.append(" ".join(args))
            return [], scripts
        if program in _SHELLS:
            inner = args
            if program == "busybox" and args and _basename(args[0]) in _SHELLS:
                inner = args[1:]
            script = _shell_script(inner)
            if script is not None:
                scripts.append(script)
                return [], scripts
        break
    return words, scripts


def _shell_script(args: list[str]) -> str | None:
    """The script of ``sh -c SCRIPT`` / ``bash -lc SCRIPT`` …, or None without ``-c``."""
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-o", "+o", "--rcfile", "--init-file", "-O", "+O"):
            i += 2
            continue
        if arg.startswith("--"):
            i += 1
            continue
        if arg.startswith(("-", "+")) and len(arg) > 1:
            if "c" in arg[1:]:
                return args[i + 1] if i + 1 < len(args) else ""
            i += 1
            continue
        return None  # a script file or nothing: not -c
    return None


# -- the rules ------------------------------------------------------------------------------------

Rule = Callable[[str, list[str], Segment], "str | None"]


def _rm(program: str, args: list[str], segment: Segment) -> str | None:
    if program != "rm":
        return None
    flags = _short_flags(args)
    recursive = "r" in flags or "R" in flags or "--recursive" in args
    targets = _operands(args)
    if "--no-preserve-root" in args:
        return "rm_root"
    if recursive and any(_system_path(t) or _project_path(t) for t in targets):
        return "rm_root"
    return None


def _find(program: str, args: list[str], segment: Segment) -> str | None:
    if program != "find":
        return None
    roots = []
    for arg in args:
        if arg.startswith("-") or arg in ("(", "!", ")"):
            break
        roots.append(arg)
    deletes = "-delete" in args
    for flag in ("-exec", "-execdir", "-ok", "-okdir"):
        if flag in args:
            after = args[args.index(flag) + 1 :]
            if after and _basename(after[0]) in ("rm", "shred"):
                deletes = True
    if deletes and any(_system_path(r) for r in roots):
        return "find_delete_root"
    return None


_GIT_VALUED = frozenset(("-C", "-c", "--git-dir", "--work-tree", "--namespace", "--exec-path", "--super-prefix", "--config-env"))
_ALL_PATHS = frozenset((".", "./", "*", ":/", ":/*", ":(top)", "./*", ":/."))


def _git(program: str, args: list[str], segment: Segment) -> str | None:
    if program != "git":
        return None
    rest = _strip_options(args, _GIT_VALUED)
    if not rest:
        return None
    sub, sub_args = rest[0], rest[1:]
    flags = _short_flags(sub_args)
    if sub == "reset":
        return "git_reset_hard" if "--hard" in sub_args else None
    if sub == "clean":
        force = "f" in flags or "--force" in sub_args
        dry = "n" in flags or "--dry-run" in sub_args
        return "git_clean_force" if force and not dry else None
    if sub == "push":
        if "f" in flags or "--mirror" in sub_args or any(a == "--force" or a.startswith("--force-with-lease") for a in sub_args):
            return "git_push_force"
        if any(op.startswith("+") for op in _operands(sub_args)):
            return "git_push_force"
        return None
    if sub == "checkout":
        if "f" in flags or "--force" in sub_args:
            return "git_discard_changes"
        paths = sub_args[sub_args.index("--") + 1 :] if "--" in sub_args else _operands(sub_args)
        return "git_discard_changes" if any(p in _ALL_PATHS for p in paths) else None
    if sub == "restore":
        staged_only = ("--staged" in sub_args or "S" in flags) and not ("--worktree" in sub_args or "W" in flags)
        paths = sub_args[sub_args.index("--") + 1 :] if "--" in sub_args else _operands(sub_args)
        return "git_discard_changes" if not staged_only and any(p in _ALL_PATHS for p in paths) else None
    if sub == "branch":
        force_delete = "D" in flags or (("d" in flags or "--delete" in sub_args) and ("f" in flags or "--force" in sub_args))
        return "git_branch_force_delete" if force_delete else None
    return None


_DISK_DEVICE = re.compile(r"^/dev/(?:sd[a-z]|hd[a-z]|vd[a-z]|xvd[a-z]|nvme\d|mmcblk\d|r?disk\d|md\d|dm-\d|mapper/|sr\d|loop\d)")


def _disk(program: str, args: list[str], segment: Segment) -> str | None:
    if program.startswith("mkfs") or program in ("mke2fs", "wipefs", "mkdosfs", "mkntfs"):
        return "disk_format"
    if program == "dd" and any(a.startswith("of=") and _DISK_DEVICE.match(a[3:]) for a in args):
        return "disk_write"
    if program in ("shred", "tee", "cp", "blkdiscard") and any(_DISK_DEVICE.match(a) for a in _operands(args)):
        return "disk_write"
    if any(op in (">", ">>", ">|", "&>", "&>>", "<>") and _DISK_DEVICE.match(target) for op, target in segment.redirects):
        return "disk_write"
    return None


def _permissions(program: str, args: list[str], segment: Segment) -> str | None:
    if program not in ("chmod", "chown", "chgrp"):
        return None
    recursive = "R" in _short_flags(args) or "--recursive" in args
    operands = _operands(args)[1:]  # the first operand is the mode or owner
    if recursive and any(_system_path(t) for t in operands):
        return "recursive_permissions"
    return None


_SQL_CLIENTS = frozenset(
    "psql mysql mariadb sqlite3 sqlite sqlcmd duckdb clickhouse-client clickhouse cqlsh mongosh mongo cockroach "
    "pgcli mycli litecli usql snowsql bq trino presto isql sqlplus osql".split()
)
SQL_DROP = re.compile(r"\bDROP\s+(?:DATABASE|SCHEMA|TABLE)\b", re.IGNORECASE)


def _sql(program: str, args: list[str], segment: Segment) -> str | None:
    if program == "dropdb":
        return "sql_drop"
    if program in ("mysqladmin", "mariadb-admin") and any(a.lower() == "drop" for a in _operands(args)):
        return "sql_drop"
    if program in ("rails", "rake") and any(a.startswith("db:drop") for a in args):
        return "sql_drop"
    return None


_POWER = frozenset(("shutdown", "reboot", "halt", "poweroff"))


def _power(program: str, args: list[str], segment: Segment) -> str | None:
    if program in _POWER:
        return "power"
    if program in ("init", "telinit") and args[:1] in (["0"], ["6"]):
        return "power"
    if program == "systemctl" and any(a in ("poweroff", "reboot", "halt", "kexec", "soft-reboot") for a in args):
        return "power"
    return None


_DOWNLOAD = re.compile(r"^(?:\$\(|`|<\()\s*(?:sudo\s+)?(?:curl|wget|fetch|iwr|irm|Invoke-WebRequest|Invoke-RestMethod)\b")


def _remote_script(program: str, args: list[str], segment: Segment) -> str | None:
    # sh -c "$(curl …)", eval "$(curl …)": the downloaded text is the command itself
    if _DOWNLOAD.match(program):
        return "pipe_to_shell"
    if (program in _SHELLS or program in ("source", ".")) and any(_DOWNLOAD.match(a) for a in args):
        return "pipe_to_shell"
    return None


SEGMENT_RULES: tuple[Rule, ...] = (_rm, _find, _git, _disk, _permissions, _sql, _power, _remote_script)

FORK_BOMB = re.compile(r"(?P<f>[\w:.]+)\s*\(\s*\)\s*\{[^}]*?(?P=f)\s*\|\s*&?\s*(?P=f)[^}]*&[^}]*\}")
_DOWNLOADERS = frozenset(("curl", "wget", "fetch", "http", "https", "aria2c", "iwr", "irm", "invoke-webrequest", "invoke-restmethod"))


def _runs_stdin(program: str, args: list[str]) -> bool:
    """A shell or interpreter reading its program from stdin (``| sh``, ``| python3 -``)."""
    if program in _SHELLS:
        operands = _operands(args)
        return _shell_script(args) is None and ("s" in _short_flags(args) or not operands or operands[0] == "-")
    if program in _INTERPRETERS:
        operands = _operands(args)
        return not operands or operands[0] == "-"
    return False


# -- checking ----------------------------------------------------------------------------------------


def check(command: str, disabled: frozenset[str] = frozenset(), extra: Iterable[tuple[str, re.Pattern[str], str]] = (),
          depth: int = 0) -> list[Finding]:
    """Every reason to block ``command`` (a shell command line): built-in rules not in
    ``disabled``, and ``extra`` rules (id, pattern, reason) searched in the command line and in
    each simple command."""
    findings: list[Finding] = []
    seen: set[tuple[str, str]] = set()

    def add(rule: str, reason: str, text: str) -> None:
        if (rule, text) not in seen and rule not in disabled:
            seen.add((rule, text))
            findings.append(Finding(rule, reason, text))

    extra = tuple(extra)
    if depth > 8 or not command.strip():
        return findings
    script = read(command)
    nested = list(script.substitutions)
    if FORK_BOMB.search(command):
        add("fork_bomb", RULES["fork_bomb"], command.strip())
    sql_client = False
    for pipeline in script.pipelines:
        downloaded = False
        previous: list[str] = []
        for segment in pipeline:
            words, scripts = unwrap(segment.words)
            nested.extend(scripts)
            if not words:
                continue
            first = words[0]
            program = first if first[:2] in ("$(", "<(") or first[:1] == "`" else _basename(first)
            args = words[1:]
            text = " ".join(words)
            if segment.piped and previous[:1] in (["echo"], ["printf"]) and _runs_stdin(program, args):
                nested.append(" ".join(previous[1:]))  # echo "…" | sh runs the text
            previous = [_basename(first), *args]
            if program in _SQL_CLIENTS or any(_basename(w) in _SQL_CLIENTS for w in segment.words):
                sql_client = True
            for rule in SEGMENT_RULES:
                found = rule(program, args, segment)
                if found:
                    add(found, RULES[found], text)
            if downloaded and segment.piped and _runs_stdin(program, args):
                add("pipe_to_shell", RULES["pipe_to_shell"], text)
            if program.lower() in _DOWNLOADERS:
                downloaded = True
            for rule_id, pattern, reason in extra:
                if pattern.search(text):
                    add(rule_id, reason, text)
    if sql_client and SQL_DROP.search(command):
        add("sql_drop", RULES["sql_drop"], command.strip())
    matched = {f.rule for f in findings}
    for rule_id, pattern, reason in extra:  # patterns that span several commands
        if rule_id not in matched and pattern.search(command):
            add(rule_id, reason, command.strip())
    for inner in nested:
        for finding in check(inner, disabled, extra, depth + 1):
            add(finding.rule, finding.reason, finding.command)
    return findings


def check_sql(statement: str, disabled: frozenset[str] = frozenset()) -> list[Finding]:
    """A statement given to an SQL tool (not a shell)."""
    if "sql_drop" in disabled or not SQL_DROP.search(statement):
        return []
    return [Finding("sql_drop", RULES["sql_drop"], statement.strip())]
