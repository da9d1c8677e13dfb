"""The options as the shim declares them (mod_opt_type, mod_options, mod_doc), as Python reads
them (Config.from_options) and as README documents them must agree: name and default. And what
README.md and docs/*.md name must exist: modules, classes, functions, options, ejabberdctl
commands, metrics, and the log lines they quote."""

from __future__ import annotations

import ast
import functools
import importlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
SHIM = (ROOT / "erl_shim" / "src" / "mod_push_py_opt.erl").read_text()  # the options
README = (ROOT / "README.md").read_text()
CONFIG = (ROOT / "pymod_push" / "core" / "config.py").read_text()
SHIM_ONLY = {"python", "reply_timeout", "queue_size", "access_backends",  # not Python's
             "push_iq_rate", "unified_push_access"}
MS = {"seconds": 1000, "second": 1000, "s": 1000, "minutes": 60_000, "minute": 60_000,
      "min": 60_000, "hours": 3_600_000, "hour": 3_600_000}


def shim_defaults() -> dict[str, str]:
    body = SHIM.split("mod_options(_Host) ->", 1)[1].split("].", 1)[0]
    return dict(re.findall(r"\{(\w+), (.+?)\}(?:,\n|$)", body + "\n", re.M))


def readme_defaults() -> dict[str, str]:
    table = README.split("## Options", 1)[1].split("\n## ", 1)[0]
    return {name: default.strip() for name, default in
            re.findall(r"^\| `(\w+)` \| ([^|]+) \|", table, re.M)}


def normalise_shim(value: str) -> str:
    value = value.strip()
    timers = re.findall(r"timer:(\w+)\((\d+)\)", value)
    if timers:
        return ",".join(str(int(n) * MS[unit]) for unit, n in timers)
    if value.startswith("<<"):
        return value.strip('<>"')
    return {"undefined": "none"}.get(value, value)


def normalise_readme(value: str) -> str:
    parts = re.findall(r"`?(\d+)`? ?(seconds?|minutes?|hours?|s|min)\b", value)
    if parts:
        return ",".join(str(int(n) * MS[unit]) for n, unit in parts)
    return value.replace("`", "").strip()


def test_every_option_is_declared_documented_and_read() -> None:
    declared = set(re.findall(r"^mod_opt_type\((\w+)\)", SHIM, re.M))
    defaults = set(shim_defaults())
    documented_in_mod_doc = set(re.findall(r"\{(\w+),\n\s+#\{value", SHIM))
    in_readme = set(readme_defaults())
    read_by_python = set(re.findall(r'options(?:\.get\(|\[)"(\w+)"', CONFIG)) | {"certfile"}
    assert declared == defaults, declared ^ defaults
    assert declared == documented_in_mod_doc, declared ^ documented_in_mod_doc
    assert declared == in_readme, declared ^ in_readme
    assert declared - SHIM_ONLY <= read_by_python, (declared - SHIM_ONLY) - read_by_python


def test_readme_defaults_are_the_shims() -> None:
    readme = readme_defaults()
    for name, value in shim_defaults().items():
        assert normalise_readme(readme[name]) == normalise_shim(value), name


# ------------------------------------------------------------------------------------------
# What README.md and docs/*.md name must exist: Python modules and names under pymod_push,
# classes and functions, module options, ejabberdctl commands, metrics, and the log lines
# they quote. The code is read as it is (pymod_push/ by its AST and by import, every
# erl_shim/src/*.erl), so a move or a rename shows up here instead of in an admin's hands.
# docs/protocol.md and docs/architecture.md are checked too.

DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PACKAGE = ROOT / "pymod_push"
STAR = "\0"  # a placeholder, in a format string of the code or in a quoted log line
NUMBER = "\2"  # a placeholder of the code for a number (%d, ~B): it takes no words
# Names of others that the docs put in backticks: ejabberd's, Erlang's, Python's, clients'.
EXTERNAL = {
    # ejabberd options, hooks and records that are not ours
    "max_ack_queue", "max_stanza_size", "user_regexp", "access_rules", "include_sender",
    "include_body", "wake_on_timeout", "store_mam_message", "roster_get_jid_info", "join_cluster",
    "module_install", "module_uninstall", "module_upgrade", "module_check", "module_options",
    "reload_config", "mod_doc", "c2s_handle_send", "ext_mod", "gen_mod", "gen_server",
    "modules_update_specs", "install_contrib_modules",
    # Python, SQLite, PostgreSQL, HTTP/2
    "asyncio", "to_thread", "sys", "path", "RssAnon", "GOAWAY", "REFUSED_STREAM",
    "WINDOW_UPDATE", "CONTINUATION", "SETTINGS", "NOTIFY", "BIGINT", "PRIMARY", "KEY",
    "Retry-After", "Urgency", "ValueError", "TypeError", "KeyError", "RuntimeError",
    "OSError", "Exception", "Mapping", "Sequence", "UnifiedPush", "PushKit", "NaN", "Infinity",
}
OWN_ROOTS = {"pymod_push", "bench", "devtools", "tests", "examples", "docs", "erl_shim", ".ci"}
WHEEL_ONLY = {"pymod_push/erl_shim": "erl_shim"}  # setup.py puts the shim's sources there


@dataclass
class Doc:
    path: Path
    prose: list[tuple[str, str]]  # (section, a paragraph or a table row, lines joined)
    blocks: list[tuple[str, str, str]]  # (section, info string, code)


def read_doc(path: Path) -> Doc:
    doc = Doc(path, [], [])
    section = ""
    paragraph: list[str] = []
    code: list[str] = []
    fence: str | None = None

    def flush() -> None:
        if paragraph:
            doc.prose.append((section, " ".join(paragraph)))
            paragraph.clear()

    for line in path.read_text().split("\n"):
        if fence is not None:
            if line.strip().startswith("```"):
                doc.blocks.append((section, fence, "\n".join(code)))
                fence, code = None, []
            else:
                code.append(line)
        elif line.strip().startswith("```"):
            flush()
            fence = line.strip()[3:].strip()
        elif line.startswith("#"):
            flush()
            section = line.lstrip("#").strip()
        elif not line.strip():
            flush()
        elif line.startswith("    ") and not paragraph:  # an indented code block
            doc.blocks.append((section, "", line.strip()))
        elif line.startswith("|"):
            flush()
            doc.prose.append((section, line))
        else:
            if re.match(r"\s*(?:[-*]|\d+\.) ", line):  # a list item: a paragraph of its own
                flush()
            paragraph.append(line.strip())
    flush()
    return doc


def docs() -> list[Doc]:
    return [read_doc(path) for path in DOC_FILES]


def spans(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


def where(doc: Doc, section: str) -> str:
    name = doc.path.relative_to(ROOT) if doc.path.is_relative_to(ROOT) else doc.path.name
    return f"{name} ({section or 'top'})"


# ------------------------------------------------------------------------- the code, read

def erlang() -> dict[str, str]:
    """Every Erlang module of the shim, by name: the shim is several files."""
    return {path.stem: path.read_text()
            for path in sorted((ROOT / "erl_shim" / "src").glob("*.erl"))}


def erlang_functions(source: str) -> set[str]:
    return set(re.findall(r"^([a-z]\w*)\(", source, re.M))


def erlang_strings(source: str) -> list[str]:
    """String literals (adjacent ones joined, as the compiler does), comments left out."""
    found: list[tuple[int, int, str]] = []
    i, n = 0, len(source)
    while i < n:
        c = source[i]
        if c == "%":
            i = source.find("\n", i)
            i = n if i < 0 else i
        elif c == "$":
            i += 3 if source[i + 1:i + 2] == "\\" else 2
        elif c == '"':
            j, chars = i + 1, []
            while j < n and source[j] != '"':
                if source[j] == "\\":
                    chars.append({"n": "\n", "t": "\t"}.get(source[j + 1], source[j + 1]))
                    j += 2
                else:
                    chars.append(source[j])
                    j += 1
            found.append((i, j + 1, "".join(chars)))
            i = j + 1
        else:
            i += 1
    joined: list[str] = []
    end = -1
    for start, stop, text in found:
        gap = re.sub(r"%[^\n]*", "", source[end:start]) if end >= 0 else "x"
        if joined and not gap.strip():
            joined[-1] += text
        else:
            joined.append(text)
        end = stop
    return joined


def erlang_template(text: str) -> str:
    text = re.sub(r"~[-0-9.*]*[bBefgxX#+]", NUMBER, text.replace("~~", "\1"))
    text = re.sub(r"~[-0-9.*]*[tl]?[a-zA-Z]", STAR, text)
    return text.replace("\1", "~")


def python_template(node: ast.expr) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        parts = [node.value]
    elif isinstance(node, ast.JoinedStr):
        parts = [v.value if isinstance(v, ast.Constant) and isinstance(v.value, str) else STAR
                 for v in node.values]
    else:
        return None
    text = "".join(parts).replace("%%", "\1")
    spec = r"%(?:\([^)]*\))?[-#0 +]*(?:\d+|\*)?(?:\.(?:\d+|\*))?"
    text = re.sub(spec + "[diouxXeEfFgG]", NUMBER, text)
    text = re.sub(spec + "[crsa]", STAR, text)
    return text.replace("\1", "%")


@dataclass
class Code:
    defined: set[str]  # classes, functions, names assigned at module or class level
    strings: set[str]  # string constants that are identifiers (names looked up, keys)
    classes: dict[str, set[str]]  # class name: its members, inherited ones included
    templates: list[str]  # every string of the code with its placeholders as STAR
    metrics: set[str]
    modules: set[str]  # pymod_push.core.limits, ...


def python_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def code() -> Code:
    found = Code(set(), set(), {}, [], set(), set())
    members: dict[str, set[str]] = {}
    bases: dict[str, set[str]] = {}
    for path in python_files():
        found.modules.add(module_name(path))
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                           ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)}
        module_strings: set[str] = set()
        type_templates: list[str] = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                found.defined.add(node.name)
            if isinstance(node, ast.ClassDef):
                own = members.setdefault(node.name, set())
                bases.setdefault(node.name, set()).update(
                    b.id if isinstance(b, ast.Name) else b.attr for b in node.bases
                    if isinstance(b, (ast.Name, ast.Attribute)))
                for item in ast.walk(node):
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        own.add(item.name)
                    elif isinstance(item, ast.Attribute) and isinstance(item.ctx, ast.Store) \
                            and isinstance(item.value, ast.Name) and item.value.id == "self":
                        own.add(item.attr)
                for item in node.body:
                    targets = (item.targets if isinstance(item, ast.Assign) else
                               [item.target] if isinstance(item, ast.AnnAssign) else [])
                    own.update(t.id for t in targets if isinstance(t, ast.Name))
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                found.defined.update(t.id for t in targets if isinstance(t, ast.Name))
            if isinstance(node, ast.expr) and id(node) not in docstrings:
                template = python_template(node)
                if template is None:
                    continue
                if isinstance(node, ast.Constant) and re.fullmatch(r"[A-Za-z_]\w*", template):
                    module_strings.add(template)
                found.templates.append(template)
                if template.startswith("# TYPE pymod_push_"):
                    type_templates.append(template.split()[2])
        found.strings |= module_strings
        for name in type_templates:  # pymod_push_{name}: the names this module has
            if STAR not in name:
                found.metrics.add(name)
            else:
                pattern = re.escape(name).replace(re.escape(STAR), r"(\w+)")
                found.metrics |= {f"pymod_push_{s}" for s in module_strings
                                  if re.fullmatch(pattern, f"pymod_push_{s}")}

    def inherited(name: str, seen: frozenset[str] = frozenset()) -> set[str]:
        out = set(members.get(name, ()))
        for base in bases.get(name, ()):
            if base not in seen:
                out |= inherited(base, seen | {name})
        return out

    found.classes = {name: inherited(name) for name in members}
    for source in erlang().values():
        found.templates += [erlang_template(s) for s in erlang_strings(source)]
    return found


@functools.cache
def code_words() -> set[str]:
    """Every word of the code's strings (SQL tables, keys) and every name defined in the
    repository's other Python (bench.versus_builtin, a test's name) and its module names."""
    words = set(re.findall(r"\w+", "\n".join(code().templates)))
    for folder in ("bench", "devtools", "tests", "examples"):
        for path in (ROOT / folder).rglob("*.py"):
            words.add(path.stem)
            words |= {node.name for node in ast.walk(ast.parse(path.read_text()))
                      if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))}
    return words


@functools.cache
def erlang_names() -> set[str]:
    """Every atom-like word of the shim (functions, options, hooks, record fields)."""
    return set(re.findall(r"\b[a-z]\w*", "\n".join(erlang().values())))


def module_options() -> set[str]:
    body = "\n".join(erlang().values()).split("mod_options(_Host) ->", 1)[1].split("].", 1)[0]
    return set(re.findall(r"\{(\w+),", body))


def backend_options() -> set[str]:
    body = "\n".join(erlang().values()).split("backend_options() ->", 1)[1].split("}.", 1)[0]
    return set(re.findall(r"(\w+) =>", body))


def ejabberdctl_commands() -> set[str]:
    source = "\n".join(erlang().values())
    return {name for record in re.findall(r"#ejabberd_commands\{(.*?)\}", source, re.S)
            for name in re.findall(r"\bname = (\w+)", record)}


# ------------------------------------------------------------------- modules and names

def repo_file(path: str) -> Path | None:
    """A path as the docs write it: from the repository, or from pymod_push/."""
    for base in (ROOT, PACKAGE):
        if path and (base / path).exists() and (base / path).resolve().is_relative_to(ROOT):
            return base / path
    return None


def attribute_error(module: str, attrs: list[str]) -> str | None:
    """None if module.attr.attr... exists (an instance attribute of a class counts)."""
    if not attrs or module.endswith("__main__"):
        return None
    try:
        value: object = importlib.import_module(module)
    except ImportError as exc:
        return f"{module} does not import ({exc})"
    for i, attr in enumerate(attrs):
        if hasattr(value, attr):
            value = getattr(value, attr)
        elif isinstance(value, type) and attr in code().classes.get(value.__name__, ()):
            return None  # an attribute its instances get
        else:
            return f"{module}.{'.'.join(attrs[:i + 1])} does not exist"
    return None


@functools.cache
def ours() -> set[str]:
    """Names that say "pymod_push" when written after a dot: its classes, functions and
    CONSTANTS (not ordinary attribute names such as user or fields)."""
    names = set()
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                names |= {t.id for t in node.targets
                          if isinstance(t, ast.Name) and re.fullmatch(r"_?[A-Z][A-Z0-9_]+", t.id)}
    return names


def python_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(
        n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))} | {
        t.id for n in ast.walk(tree) if isinstance(n, ast.Assign)
        for t in n.targets if isinstance(t, ast.Name)}


def name_error(token: str) -> str | None:
    """None if token names something that exists, else why not. Tokens read as ours: paths
    whose first folder is one of the repository's or of pymod_push/ (core/notify.py), a bare
    file.py, dotted names starting with pymod_push, a module of pymod_push (protocol.Publish,
    the last part of its name is enough: safexml.MAX_DEPTH) or of the repository
    (bench.versus_builtin), and any a.b whose b is a class, function or CONSTANT of
    pymod_push. Others (an absolute path, ejabberd.yml, recipient.extensions) are None."""
    token = re.sub(r"\((?:\.\.\.|…)?\)$", "", token.strip()).rstrip(",;:")
    if re.fullmatch(r"\w+\.py", token):
        files = [p for p in ROOT.rglob(token) if not {".venv", "build"} & set(p.parts)]
        return None if files else f"no file {token}"
    if not re.fullmatch(r"\.?[\w-]+(?:[./][\w-]+)*/?", token) or token.startswith("/") \
            or re.search(r"\.(?:com|org|net|im|io|localhost|invalid|test)$", token):
        return None  # not a path, or a host name (notify.windows.com)
    first = ("." if token.startswith(".") else "") + re.split(r"[./]", token.lstrip("."))[0]
    parts = token.replace("/", ".").split(".")
    leaves: dict[str, list[str]] = {}
    for name in code().modules:
        leaves.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    if "/" in token and first in OWN_ROOTS | set(leaves):
        if repo_file(token) or repo_file(WHEEL_ONLY.get(token.rstrip("/"), "")):
            return None  # a file or folder as written
        if parts[-1] == "py":
            return f"no file {token}"
    elif "/" in token or "." not in token or first in {"docs", "erl_shim", ".ci"}:
        return None
    elif first not in OWN_ROOTS and first not in leaves:
        return (f"{token}: no module {first}" if re.fullmatch(r"[a-z_]\w*", first)
                and len(parts) == 2 and parts[1] in ours() else None)
    for k in range(len(parts), 0, -1):  # the longest prefix that is a module
        path = "/".join(parts[:k])
        found = repo_file(path + ".py") or repo_file(path + "/__init__.py")
        if found is not None and found.is_relative_to(PACKAGE):
            return attribute_error(module_name(found), parts[k:])
        if found is not None:
            return (None if k == len(parts) or parts[k] in python_names(found)
                    else f"{token}: no {parts[k]} in {found.relative_to(ROOT)}")
    if first in leaves:  # a module named by the last part of its name
        errors = [attribute_error(module, parts[1:]) for module in leaves[first]]
        return None if None in errors else errors[0]
    return f"no module or file {token}"


def test_docs_name_modules_and_files_that_exist() -> None:
    """`pymod_push.logic.Message`, `core/notify.py`, `service.PushService`,
    `tests/unit/test_store.py`, `bench.versus_builtin`, `mod_push_py:c2s_handle_send/3`, and the
    imports of the docs' Python examples: each must exist (dotted names resolved by import and
    getattr; paths from the repository or from pymod_push/)."""
    problems = []
    modules = erlang()
    for doc in docs():
        for section, text in doc.prose:
            for span in spans(text):
                mfa = re.fullmatch(r"(mod_push_py\w*):(\w+)(?:/\d+)?", span)
                if mfa and (mfa[1] not in modules
                            or mfa[2] not in erlang_functions(modules[mfa[1]])):
                    problems.append(f"{where(doc, section)}: {span}: no such Erlang function")
                elif not mfa and (error := name_error(span)):
                    problems.append(f"{where(doc, section)}: {error}")
        for section, _, block in doc.blocks:
            for module, names in re.findall(r"^from (pymod_push[\w.]*) import (.+)$", block, re.M):
                for name in re.split(r",\s*", names.strip("() ")):
                    if error := attribute_error(module, [name]):
                        problems.append(f"{where(doc, section)}: {error}")
            for module in re.findall(r"python3? -m ((?:pymod_push|bench|devtools)[\w.]*)", block):
                if error := name_error(module):
                    problems.append(f"{where(doc, section)}: {error}")
    assert not problems, "\n".join(problems)


def test_docs_name_classes_and_functions_that_exist() -> None:
    """Backticked `CamelCase`, `Name.member` and `name()` that are not another project's
    (EXTERNAL) must be defined in pymod_push/ (a class, function or assigned name; a member
    of that class, inherited ones and instance attributes included; for `name()` also a name
    pymod_push looks up, as the admin's `summary()`) or be a function of the shim."""
    problems = []
    functions = set().union(*map(erlang_functions, erlang().values()))
    index = code()
    for doc in docs():
        for section, text in doc.prose:
            for span in spans(text):
                call = re.fullmatch(r"([A-Za-z_]\w*)\((?:\.\.\.|…)?\)", span)
                # the shim's Erlang variables and tuples are not names: {batch, Epoch, Seq}
                # CamelCase (PushService), or Capitalized with a member or a call (Gone());
                # a lone Capitalized word may be an Erlang variable (Seq) or English
                camel = (re.fullmatch(r"([A-Z][a-z0-9]+[A-Z]\w*)(?:\.(\w+))?", span)
                         or re.fullmatch(r"([A-Z]\w*[a-z]\w*)\.(\w+)", span))
                if call and call[1] not in EXTERNAL:
                    if call[1] not in index.defined | index.strings | functions:
                        problems.append(f"{where(doc, section)}: {span} is defined nowhere")
                elif camel and camel[1] not in EXTERNAL:
                    if camel[1] not in index.defined:
                        problems.append(f"{where(doc, section)}: {camel[1]} is defined nowhere")
                    elif camel[2] and camel[1] in index.classes \
                            and camel[2] not in index.classes[camel[1]]:
                        problems.append(f"{where(doc, section)}: {span}: {camel[1]} has no "
                                        f"{camel[2]}")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------ options

def yaml_keys(block: str) -> tuple[list[str], list[str]]:
    """The keys of mod_push_py (commented-out ones too) and of its backends (but the own
    options of a backend of type python) in a YAML example or a fragment of one."""
    options: list[str] = []
    items: list[tuple[list[str], bool]] = []  # each backend's keys, and whether it is python
    module_indent: int | None = None
    backends_indent: int | None = None
    fragment = "mod_push_py:" not in block and "backends:" not in block
    for line in (line for line in block.split("\n") if line.strip()):
        indent, text = len(line) - len(line.lstrip()), line.strip()
        commented = text.startswith("#")
        if not commented and module_indent is not None and indent <= module_indent:
            module_indent = backends_indent = None
        if not commented and backends_indent is not None and indent <= backends_indent:
            backends_indent = None
        key = re.match(r"(?:#\s*)?(-\s+)?(\w+):(?:\s|$)", text)
        if re.fullmatch(r"mod_push_py:\s*(#.*)?", text):
            module_indent = indent
        elif key is None:
            continue
        elif key[1] and not commented and (backends_indent is not None or fragment):
            items.append(([key[2]], bool(re.search(r"type:\s*python\b", text))))
        elif module_indent is not None and indent == module_indent + 2:
            options.append(key[2])
            if key[2] == "backends" and not commented:
                backends_indent = indent
        elif items and not commented and (backends_indent is not None or fragment):
            items[-1][0].append(key[2])
            if key[2] == "type" and re.search(r"type:\s*python\b", text):
                items[-1] = (items[-1][0], True)
    return options, [k for keys, python in items if not python for k in keys]


def test_docs_name_options_that_exist() -> None:
    """Option names in option context must be the shim's: keys of mod_push_py in YAML
    examples (mod_options) and of its backends (backend_options), backticked `name: value`,
    and names after "option(s)"; and every other backticked snake_case name must be an
    option or otherwise known (a name of pymod_push or the shim, a metric, ejabberd's)."""
    options, backend = module_options(), backend_options()
    assert {"python", "backends", "resume_timeout"} <= options, options
    assert {"type", "register_host", "key_file"} <= backend, backend
    index = code()
    known = (options | backend | index.defined | index.strings | index.metrics | erlang_names()
             | code_words() | EXTERNAL | {m.rsplit(".", 1)[-1] for m in index.modules})
    problems = []
    for doc in docs():
        for section, info, block in doc.blocks:
            if info not in ("yaml", "yml"):
                continue
            module_keys, backend_keys = yaml_keys(block)
            problems += [f"{where(doc, section)}: option {k} is not in mod_options"
                         for k in module_keys if k not in options]
            problems += [f"{where(doc, section)}: backend option {k} is not in backend_options"
                         for k in backend_keys if k not in backend]
        for section, text in doc.prose:
            for name in re.findall(r"`([a-z]\w*): [^`]+`", text):
                if not name.startswith("mod_") and name not in options | backend | EXTERNAL:
                    problems.append(f"{where(doc, section)}: `{name}: …` is no option")
            for run in re.findall(r"\b[Oo]ptions? ((?:`\w+`(?:, | and | or |/)?)+)", text):
                problems += [f"{where(doc, section)}: option {name} is not in mod_options"
                             for name in re.findall(r"`(\w+)`", run)
                             if name not in options | backend and not name.startswith("mod_")]
            for span in spans(text):
                if re.fullmatch(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)+", span) and span not in known \
                        and not span.startswith(("mod_", "ejabberd_")):
                    problems.append(f"{where(doc, section)}: {span} is no option and is "
                                    "named nowhere in the code")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------ commands and metrics

def test_docs_name_ejabberdctl_commands_that_exist() -> None:
    """`ejabberdctl push_xxx`, a backticked `push_xxx ARGS`, a `push_xxx` that is no option,
    and the rows of the commands table must be in the shim's get_commands_spec; `pymod-push
    WORD` must be a command pymod_push knows."""
    commands, options = ejabberdctl_commands(), module_options()
    assert {"push_status", "push_list", "push_reload_logic"} <= commands, commands
    problems = []
    for doc in docs():
        texts = [(s, t) for s, t in doc.prose] + [(s, b) for s, _, b in doc.blocks]
        for section, text in texts:
            named = set(re.findall(r"ejabberdctl\s+(?:help\s+)?(push_\w+)", text))
            named |= {s.split()[0] for s in spans(text) if re.fullmatch(r"push_\w+( [A-Z]\w*)+", s)}
            named |= {s for s in spans(text) if re.fullmatch(r"push_\w+", s) and s not in options}
            problems += [f"{where(doc, section)}: ejabberdctl {name} does not exist"
                         for name in sorted(named - commands)]
            problems += [f"{where(doc, section)}: pymod-push {word} does not exist"
                         for word in re.findall(r"pymod-push (?!-)([a-z][\w-]*\w)", text)
                         if word not in code().strings and word not in code().templates]
    assert not problems, "\n".join(problems)


def test_docs_name_metrics_that_exist() -> None:
    """A pymod_push_... name that is a metric by its look (_total, _seconds, {labels}, in a
    Metrics section or a sentence about metrics) must be one the exposition renders (its
    `# TYPE` lines); any other must at least be named in the code (a table, say)."""
    metrics = code().metrics
    assert {"pymod_push_events_total", "pymod_push_registrations"} <= metrics, metrics
    known = code().strings | code_words()
    problems = []
    for doc in docs():
        for section, text in doc.prose:
            for match in re.finditer(r"\bpymod_push_[a-z0-9_]*[a-z0-9](?![\w.\-/])", text):
                name = re.sub(r"_(bucket|sum|count)$", "", match[0]) \
                    if match[0].endswith(("_bucket", "_sum", "_count")) else match[0]
                looks = (name.endswith(("_total", "_seconds"))
                         or text[match.end():match.end() + 1] == "{"
                         or "metric" in (section + text).lower()
                         and not re.search(r"\btable\b", text[max(0, match.start() - 40):
                                                             match.start()]))
                if name in metrics:
                    continue
                if looks:
                    problems.append(f"{where(doc, section)}: metric {name} is not rendered")
                elif name not in known and name.removeprefix("pymod_push_") not in known:
                    problems.append(f"{where(doc, section)}: {name} is named nowhere in the code")
    assert not problems, "\n".join(problems)


# -------------------------------------------------------------------------------- log lines

Token = str | tuple[str, str]  # a character of a quote, STAR (elided), or (VALUE, its word)
VALUE = "value"


def quote_tokens(quote: str, open_left: bool = True, open_right: bool = True) -> list[Token]:
    """A quoted line as tokens: its characters; … and ... as STAR, which stands for
    anything (so do both ends, a quote being a part of a line, unless closed); words that
    stand for a value (HOST, N, USER, a number) as (VALUE, word): a placeholder of the code,
    or that very word (WNS, URI)."""
    tokens: list[Token] = [STAR] if open_left else []
    for match in re.finditer(r"(\.\.\.|…)|(\b[A-Z][A-Z0-9_]*\b|\b\d+(?:[.,]\d+)*\b)|(.)",
                             quote, re.S):
        if match[1] and tokens[-1:] != [STAR]:
            tokens.append(STAR)
        elif match[2]:
            tokens.append((VALUE, match[2]))
        elif match[3]:
            tokens.append(match[3])
    return [*tokens, STAR] if open_right and tokens[-1:] != [STAR] else tokens


Stretch = tuple[str, bool, bool]  # text a placeholder of the code took; open left, right


def alignment(doc: list[Token], template: str) -> tuple[int, list[Stretch]] | None:
    """The alignment of a quote with a format string of the code (STAR and NUMBER its
    placeholders) that matches the most characters literally, if they have a common
    instance at all: (that count, the stretches of the quote that placeholders of the code
    take). An elision of the quote takes anything; a value of the quote is one placeholder
    of the code or its own word; a placeholder of the code may be empty, and one for text
    (STAR, not NUMBER) may take characters and values of the quote."""
    n, m = len(doc), len(template)

    def moves(i: int, j: int) -> list[tuple[int, int, int, bool]]:
        """(next i, next j, characters matched, whether the code's placeholder took doc[i])"""
        d = doc[i] if i < n else None
        c = template[j] if j < m else None
        out = []
        if isinstance(d, str) and d != STAR and d == c:
            out.append((i + 1, j + 1, 1, False))
        if isinstance(d, tuple) and template.startswith(d[1], j):
            out.append((i + 1, j + len(d[1]), len(d[1]), False))
        if isinstance(d, tuple) and c in (STAR, NUMBER):
            out.append((i + 1, j + 1, 0, False))
        if d == STAR:
            out.append((i + 1, j, 0, False))
        if c is not None and (d == STAR or c in (STAR, NUMBER)):
            out.append((i, j + 1, 0, False))
        if c == STAR and d is not None and d != STAR:
            out.append((i + 1, j, 0, True))
        return out

    best = [[-1] * (m + 1) for _ in range(n + 1)]
    best[n][m] = 0
    for i in range(n, -1, -1):
        for j in range(m, -1, -1):
            if i < n or j < m:
                best[i][j] = max((best[a][b] + gain for a, b, gain, _ in moves(i, j)
                                  if best[a][b] >= 0), default=-1)
    if best[0][0] < 0:
        return None
    i = j = 0
    taken: list[int] = []
    while i < n or j < m:  # back along one best alignment
        a, b, gain, took = next(move for move in moves(i, j)
                                if best[move[0]][move[1]] >= 0
                                and best[move[0]][move[1]] + move[2] == best[i][j])
        if took:
            taken.append(i)
        i, j = a, b
    stretches: list[Stretch] = []
    for k, index in enumerate(taken):
        if k and taken[k - 1] == index - 1:
            continue
        end = index
        while end + 1 in taken:
            end += 1
        text = "".join(t[1] if isinstance(t, tuple) else t for t in doc[index:end + 1])
        stretches.append((text, index == 0 or doc[index - 1] == STAR,
                          end == n - 1 or doc[end + 1] == STAR))
    return best[0][0], stretches


def written(quote: str, depth: int = 0, open_left: bool = True, open_right: bool = True) -> bool:
    """Does the code write this (as a part of one of its lines)? It must match a format
    string of pymod_push/ or of the shim (see alignment), a third of its characters at
    least literally; what a placeholder of the code takes must be written too, as a whole
    line of the code where the quote does not cut it (lines are composed: "push to %s
    failed" with "USER/RESOURCE at JID", made by another format string, in the %s)."""
    doc = quote_tokens(quote, open_left, open_right)
    literal = sum(isinstance(t, str) and t != STAR for t in doc)
    runs = [run for run in re.split(r"[\0\1]+", "".join(
        "\1" if isinstance(t, tuple) else t for t in doc)) if run.strip()]
    pieces = runs + [w for r in runs for w in re.findall(r"\w{3,}", r)]
    candidates = sorted(((sum(len(p) for p in pieces if p in t), -len(t), t)
                         for t in set(code().templates)), reverse=True)[:40]
    for score, _, template in candidates:
        found = None if score == 0 else alignment(doc, template)
        if found is None or found[0] < max(min(8, literal), literal / 3):
            continue
        if all(len(re.findall(r"[a-z]", text)) < 3
               or (depth < 2 and written(text, depth + 1, left, right))
               for text, left, right in found[1]):
            return True
    return False


def quoted_lines(doc: Doc) -> list[tuple[str, str]]:
    """Lines the docs quote as the program's: *"…"* (italic quotes), blocks of type log,
    and backticked or "quoted" text in the sentence after "the log says", "logs", "log
    line"..."""
    found = [(s, q) for s, text in doc.prose for q in re.findall(r'\*"([^"]+)"\*', text)]
    found += [(s, line) for s, info, block in doc.blocks if info == "log"
              for line in block.split("\n") if line.strip()]
    for section, text in doc.prose:
        masked = re.sub(r"`[^`]*`", lambda m: "`" + "x" * (len(m[0]) - 2) + "`", text)
        for keyword in re.finditer(r"\b(?:log says|logs|logged as|log line|log:)", masked):
            window = re.split(r"\.\s+(?=[A-Z])", text[keyword.end():], maxsplit=1)[0]
            found += [(section, q) for q in re.findall(r'`([^`]+)`|"([^"]+)"', window)
                      for q in [q[0] or q[1]] if " " in q.strip()]
    return found


def test_docs_quote_log_lines_the_code_writes() -> None:
    problems = [f"{where(doc, section)}: {quote!r} is written nowhere in the code"
                for doc in docs() for section, quote in quoted_lines(doc)
                if not written(quote)]
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------- links

def anchors(path: Path) -> set[str]:
    """The anchors GitHub makes of a Markdown file's headings (lowercase, punctuation but
    - and _ dropped, spaces as -, a repeated heading with -1, -2...)."""
    seen: dict[str, int] = {}
    out = set()
    fence = False
    for line in path.read_text().split("\n"):
        fence ^= line.strip().startswith("```")
        heading = re.match(r"#+ (.*)", line)
        if heading and not fence:
            slug = re.sub(r"[^\w\- ]", "", heading[1].strip().lower()).replace(" ", "-")
            out.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return out


def test_docs_links_resolve() -> None:
    """Every relative link of README.md and docs/*.md reaches a file, and its #anchor a
    heading there (README's section names are linked from docs/ and from the tests)."""
    problems = []
    for doc in docs():
        for section, text in doc.prose:
            for target in re.findall(r"\]\(([^)\s]+)\)", text):
                if re.match(r"[a-z]+:", target):
                    continue
                file, _, anchor = target.partition("#")
                path = (doc.path.parent / file).resolve() if file else doc.path
                if not path.exists():
                    problems.append(f"{where(doc, section)}: {target}: no file {file}")
                elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                    problems.append(f"{where(doc, section)}: {target}: no heading #{anchor}")
    assert not problems, "\n".join(problems)

# A wrong name of each kind, as the docs could write it: each check must catch its own.
WRONG = {
    "test_docs_name_modules_and_files_that_exist": [
        "The admin's objects are `pymod_push.logic.Mesage`.",
        "Decisions are in `core/notifyy.py`.",
        "Events go to `service.PushServiceX`.",
        "Cut at `safexml.MAX_DEPTHS`.",
        "Merged by `store_pgx.ascii_number`.",
        "The shim's `mod_push_py:no_such_hook/3`.",
        "```python\nfrom pymod_push.python_provider import Delivred\n```",
    ],
    "test_docs_name_classes_and_functions_that_exist": [
        "Each event goes to `PushServise`.",
        "Then `PushService.handle_everything` decides.",
        "The admin's `summarize()` shapes the form.",
    ],
    "test_docs_name_options_that_exist": [
        "```yaml\nmodules:\n  mod_push_py:\n    resume_timout: 72h\n```",
        "```yaml\nmodules:\n  mod_push_py:\n    backends:\n      - type: apns\n"
        "        key_fil: /etc/k.p8\n```",
        "Set `notify_onn: all` for chat states.",
        "The option `max_publish_error` counts errors.",
        "Errors count once per `publish_errors_window`.",
    ],
    "test_docs_name_ejabberdctl_commands_that_exist": [
        "Run `ejabberdctl push_stats example.org`.",
        "`push_listing USER HOST` lists them.",
        "First `pymod-push instal`.",
    ],
    "test_docs_name_metrics_that_exist": [
        "Watch `pymod_push_events_totl{type}`.",
        "## Metrics\n\nThe gauge `pymod_push_registration` counts them.",
    ],
    "test_docs_quote_log_lines_the_code_writes": [
        '## Troubleshooting\n\n- *"app server rejected a push to USER/RESOURCE…"*: see above.',
        '- *"push to USER/RESOURCE at APP_SERVER refused (TYPE CONDITION): error N of M"*',
        "The log says `database went away (...)` once.",
        '- *"ejabberd started: waking N push registrations"*',
        '- *"N notifications not answered before the restart will be sent again"*',
        "- *\"field 'endpoint' is refused: … is not on the internet (private)\"*",
        '- *"protocol version mismatched"*',
    ],
    "test_docs_links_resolve": [
        "See [the layout](layout.md).",
        "See [Clusters](../README.md#cluster).",
        "See [below](#no-such-heading).",
    ],
}


@pytest.mark.parametrize("check, text", [(c, w) for c, ws in WRONG.items() for w in ws])
def test_each_check_catches_a_wrong_name(check: str, text: str, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = tmp_path / "wrong.md"
    wrong.write_text(f"# Wrong\n\n{text}\n")
    monkeypatch.setattr(sys.modules[__name__], "DOC_FILES", [wrong])
    with pytest.raises(AssertionError):
        globals()[check]()
    right = tmp_path / "right.md"
    right.write_text("# Right\n\nNothing named here.\n")
    monkeypatch.setattr(sys.modules[__name__], "DOC_FILES", [right])
    globals()[check]()
