"""A built-in corpus harvested from this machine's Python standard library: no download.

Domains (the ``domain`` field, used as the partition) are distinct kinds of text:

* ``docs``: English prose: the reference topics of :mod:`pydoc_data.topics` and the
  module, class and function docstrings of the standard library (outside ``test``);
* seven code domains, the source of distinct package families and of their tests
  (``test/test_<module>...``), docstrings removed (they are in ``docs``, and shared
  text would blur the partitions):
  ``networking`` (email, http, urllib, ...), ``concurrency`` (asyncio, concurrent,
  multiprocessing, threading, ...), ``formats`` (json, xml, html, csv, archives, ...),
  ``testing`` (unittest, doctest, debuggers, profilers), ``gui`` (tkinter, idlelib,
  turtle), ``tooling`` (importlib, lib2to3, ast, distutils, ...) and ``core``
  (text, numbers, dates, collections, the OS layer, ...);
* ``general`` (:data:`SEED_DOMAIN`): the rest of the ``test`` package, verbatim, kept
  apart as a seed corpus (general data the seed model trains on before the units).

Each document is one JSON line ``{"id", "text", "domain", "order", "source"}``: files
are split at top-level blank lines into documents of at most ``max_chars``; ``order``
numbers the documents of a domain in a fixed order (for ``--order-by``), and the output
is identical on every run with the same Python version.

    write_corpus("corpus.jsonl")                 # the 8 partition domains
    write_corpus("seed.jsonl", [SEED_DOMAIN])    # the seed corpus
    corpus_sizes()                               # {domain: {documents, chars, bytes}}
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import io
import json
import os
import sysconfig
import tokenize
from collections.abc import Callable, Iterator, Sequence

from megablocks_ablate.utils.atomic import atomic_open

SEED_DOMAIN = "general"
DOCS_DOMAIN = "docs"
MAX_CHARS = 6000

# Code domains: top-level modules or packages of the standard library (a package
# includes all its subpackages). Everything not listed is left out, except `test`.
CODE_DOMAINS: dict[str, tuple[str, ...]] = {
    "networking": (
        "email",
        "http",
        "urllib",
        "xmlrpc",
        "wsgiref",
        "smtplib",
        "smtpd",
        "imaplib",
        "poplib",
        "ftplib",
        "nntplib",
        "telnetlib",
        "socket",
        "socketserver",
        "ssl",
        "mailbox",
        "mailcap",
        "netrc",
        "ipaddress",
        "webbrowser",
        "cgi",
        "cgitb",
        "asynchat",
        "asyncore",
        "uuid",
    ),
    "concurrency": (
        "asyncio",
        "concurrent",
        "multiprocessing",
        "threading",
        "queue",
        "selectors",
        "subprocess",
        "sched",
        "_threading_local",
        "contextvars",
        "signal",
    ),
    "formats": (
        "json",
        "xml",
        "html",
        "csv",
        "configparser",
        "tomllib",
        "plistlib",
        "pickle",
        "pickletools",
        "copyreg",
        "_compat_pickle",
        "base64",
        "quopri",
        "uu",
        "mimetypes",
        "tarfile",
        "zipfile",
        "gzip",
        "bz2",
        "lzma",
        "zipapp",
        "wave",
        "aifc",
        "sunau",
        "chunk",
        "sndhdr",
        "imghdr",
        "shelve",
        "dbm",
        "sqlite3",
        "_markupbase",
        "_compression",
        "xdrlib",
        "binhex",
    ),
    "testing": (
        "unittest",
        "doctest",
        "pdb",
        "bdb",
        "trace",
        "profile",
        "cProfile",
        "pstats",
        "timeit",
        "tracemalloc",
        "tabnanny",
        "pydoc",
    ),
    "gui": ("tkinter", "idlelib", "turtle", "turtledemo"),
    "tooling": (
        "importlib",
        "lib2to3",
        "ast",
        "dis",
        "inspect",
        "tokenize",
        "token",
        "keyword",
        "pyclbr",
        "symtable",
        "compileall",
        "py_compile",
        "code",
        "codeop",
        "modulefinder",
        "runpy",
        "pkgutil",
        "zipimport",
        "opcode",
        "ensurepip",
        "venv",
        "distutils",
        "sysconfig",
        "site",
        "imp",
        "_bootsubprocess",
        "_aix_support",
        "_osx_support",
        "ctypes",
    ),
    "core": (
        "re",
        "sre_compile",
        "sre_parse",
        "sre_constants",
        "collections",
        "string",
        "textwrap",
        "difflib",
        "pprint",
        "reprlib",
        "_pydecimal",
        "fractions",
        "statistics",
        "numbers",
        "datetime",
        "_strptime",
        "calendar",
        "random",
        "heapq",
        "bisect",
        "functools",
        "enum",
        "dataclasses",
        "typing",
        "argparse",
        "optparse",
        "getopt",
        "gettext",
        "locale",
        "logging",
        "os",
        "posixpath",
        "ntpath",
        "genericpath",
        "pathlib",
        "shutil",
        "glob",
        "fnmatch",
        "tempfile",
        "filecmp",
        "fileinput",
        "linecache",
        "traceback",
        "warnings",
        "weakref",
        "_weakrefset",
        "copy",
        "abc",
        "_py_abc",
        "_collections_abc",
        "types",
        "operator",
        "contextlib",
        "io",
        "_pyio",
        "codecs",
        "stringprep",
        "struct",
        "hashlib",
        "hmac",
        "secrets",
        "colorsys",
        "graphlib",
        "zoneinfo",
        "platform",
        "getpass",
        "shlex",
        "cmd",
        "rlcompleter",
        "curses",
        "stat",
    ),
}
DOMAINS = (DOCS_DOMAIN,) + tuple(CODE_DOMAINS)
TEST_INFRASTRUCTURE = ("support", "libregrtest")  # test/ subpackages that go to "testing"


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


# ----------------------------------------------------------------------------- files


def _module_files(root: str, name: str) -> list[str]:
    """Source files of a top-level module or package, sorted (relative to root)."""
    if os.path.isfile(os.path.join(root, name + ".py")):
        return [name + ".py"]
    pkg = os.path.join(root, name)
    if not os.path.isdir(pkg):
        return []  # absent on this Python version
    out = []
    for dirpath, dirnames, filenames in os.walk(pkg):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        out += [
            os.path.relpath(os.path.join(dirpath, f), root)
            for f in sorted(filenames)
            if f.endswith(".py")
        ]
    return sorted(out)


def _read_source(path: str) -> str:
    """Text of a source file, honouring its coding cookie; undecodable bytes replaced."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
        text = raw.decode(encoding)
    except (SyntaxError, LookupError, UnicodeDecodeError):
        text = raw.decode("utf-8", errors="replace")
    return text.replace("\r\n", "\n").replace("\x00", "")


def _docstring_nodes(tree: ast.AST) -> Iterator[tuple[str, ast.Expr]]:
    """(qualified name, docstring expression) of the module, classes and functions."""
    stack: list[tuple[str, ast.AST]] = [("", tree)]
    while stack:
        prefix, node = stack.pop(0)
        body = getattr(node, "body", None)
        if isinstance(body, list) and body:
            first = body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                yield prefix, first
            for child in body:
                if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    stack.append((f"{prefix}.{child.name}" if prefix else child.name, child))


def split_source(text: str) -> tuple[str, list[tuple[str, str]]]:
    """(code without docstrings, [(qualified name, docstring)]); unparsable: (text, [])."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return text, []
    lines = text.split("\n")
    drop: set[int] = set()
    docs = []
    for name, node in _docstring_nodes(tree):
        docs.append((name, inspect.cleandoc(node.value.value)))
        drop.update(range(node.lineno - 1, node.end_lineno))
    code = "\n".join(line for i, line in enumerate(lines) if i not in drop)
    return code, [(n, d) for n, d in docs if d.strip()]


def chunks(text: str, max_chars: int = MAX_CHARS) -> list[str]:
    """Split at blank lines before unindented lines into pieces of at most ``max_chars``
    (a single longer block is cut at line ends, then hard)."""
    blocks, cur = [], []
    for line in text.split("\n"):
        if cur and line and not line[0].isspace() and not cur[-1].strip():
            blocks.append("\n".join(cur))
            cur = []
        cur.append(line)
    if cur:
        blocks.append("\n".join(cur))
    out, piece = [], ""
    for b in blocks:
        while len(b) > max_chars:
            cut = b.rfind("\n", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            if piece.strip():
                out.append(piece)
            piece = ""
            out.append(b[:cut])
            b = b[cut:].lstrip("\n")
        if len(piece) + len(b) + 1 > max_chars and piece.strip():
            out.append(piece)
            piece = ""
        piece = f"{piece}\n{b}" if piece else b
    if piece.strip():
        out.append(piece)
    return [p.strip("\n") for p in out if p.strip()]


# ----------------------------------------------------------------------------- documents


def test_domain(relpath: str) -> str | None:
    """The code domain whose tests a file of the ``test`` package holds, if any.

    ``test/test_asyncio/...`` and ``test/test_urllib2_localnet.py`` test ``asyncio`` and
    ``urllib``: the name after ``test_`` starts with the module, followed by nothing or a
    non-letter. The longest matching module wins; ``test/support`` and
    ``test/libregrtest`` are ``testing``; other tests stay in the seed corpus.
    """
    parts = relpath.split(os.sep)
    if len(parts) >= 2 and parts[0] == "test" and parts[1] in TEST_INFRASTRUCTURE:
        return "testing"
    if len(parts) < 2 or parts[0] != "test" or not parts[1].startswith("test_"):
        return None
    name = parts[1][len("test_") :].removesuffix(".py")
    best, best_len = None, 0
    for domain, modules in CODE_DOMAINS.items():
        for m in modules:
            if (
                name.startswith(m)
                and (len(name) == len(m) or not name[len(m)].isalpha())
                and len(m) > best_len
            ):
                best, best_len = domain, len(m)
    return best


def _code_domain_files(root: str) -> dict[str, list[str]]:
    """Files of every code domain (its modules, then their tests) and of the seed."""
    seen: set[str] = set()
    out: dict[str, list[str]] = {}
    for domain, modules in CODE_DOMAINS.items():
        files = []
        for m in dict.fromkeys(modules):
            for f in _module_files(root, m):
                if f not in seen:
                    seen.add(f)
                    files.append(f)
        out[domain] = files
    out[SEED_DOMAIN] = []
    for f in _module_files(root, "test"):
        out[test_domain(f) or SEED_DOMAIN].append(f)
    return out


def iter_documents(
    domains: Sequence[str] | None = None, max_chars: int = MAX_CHARS, root: str | None = None
) -> Iterator[dict]:
    """Documents of the chosen domains (default: :data:`DOMAINS`), in a fixed order."""
    root = root or stdlib_dir()
    domains = list(domains if domains is not None else DOMAINS)
    unknown = [d for d in domains if d not in DOMAINS and d != SEED_DOMAIN]
    if unknown:
        raise ValueError(
            f"unknown stdlib corpus domain {unknown[0]!r} "
            f"(known: {', '.join(DOMAINS + (SEED_DOMAIN,))})"
        )
    files = _code_domain_files(root)
    parsed: dict[str, tuple[str, list[tuple[str, str]]]] = {}

    def split(f: str) -> tuple[str, list[tuple[str, str]]]:
        """A code file's (code, docstrings), parsed once for both the file's code
        domain and the docs domain (parsing is most of the corpus's build time)."""
        if f not in parsed:
            parsed[f] = split_source(_read_source(os.path.join(root, f)))
        return parsed[f]

    for domain in domains:
        order = 0

        def emit(text: str, source: str, part: int, domain: str = domain) -> dict:
            nonlocal order
            doc = {
                "id": f"{domain}/{source}#{part}",
                "text": text,
                "domain": domain,
                "order": order,
                "source": source,
            }
            order += 1
            return doc

        if domain == DOCS_DOMAIN:
            yield from (emit(t, s, i) for s, i, t in _docs_texts(files, max_chars, split))
        elif domain == SEED_DOMAIN:
            for f in files[SEED_DOMAIN]:
                for i, t in enumerate(chunks(_read_source(os.path.join(root, f)), max_chars)):
                    yield emit(t, f, i)
        else:
            for f in files[domain]:
                code, _ = split(f)
                for i, t in enumerate(chunks(code, max_chars)):
                    yield emit(t, f, i)


def _docs_texts(
    files: dict[str, list[str]],
    max_chars: int,
    split: Callable[[str], tuple[str, list[tuple[str, str]]]],
) -> Iterator[tuple[str, int, str]]:
    """(source, part, text): pydoc topics, then every code domain's docstrings."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        for i, t in enumerate(chunks(topics[name].strip(), max_chars)):
            yield f"pydoc_data/{name}", i, t
    for domain in CODE_DOMAINS:
        for f in files[domain]:
            if f.startswith("test" + os.sep):
                continue  # test docstrings are about tests, not the library
            _, docs = split(f)
            module = f[:-3].replace(os.sep, ".").removesuffix(".__init__")
            text = "\n\n".join(f"{module}{'.' + n if n else ''}\n{d}" for n, d in docs)
            for i, t in enumerate(chunks(text, max_chars)):
                yield f, i, t


def write_corpus(
    path: str, domains: Sequence[str] | None = None, max_chars: int = MAX_CHARS
) -> dict[str, int]:
    """Write the JSONL corpus atomically; returns documents per domain."""
    counts: dict[str, int] = {}
    with atomic_open(path, "w", encoding="utf-8") as f:
        for doc in iter_documents(domains, max_chars):
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            counts[doc["domain"]] = counts.get(doc["domain"], 0) + 1
    return counts


# The stdlib demo's out-of-domain evaluation set (the paper's Paloma role): whole files of
# the seed corpus ``general`` held out from the seed, so it is general text the seed's
# distribution covers and no partition trains on: out of domain for every mixture.
OOD_SET = "general"
OOD_FILE_SHARE = 0.03  # files whose path hashes into this share are held out...
OOD_MAX_CHARS = 200_000  # ...until this many characters (~60K tokens)


def _held_out_file(source: str) -> bool:
    digest = hashlib.sha256(f"ood:{source}".encode()).digest()
    return int.from_bytes(digest[:4], "big") < OOD_FILE_SHARE * 2**32


def write_seed_and_ood(
    seed_path: str, ood_path: str, max_chars: int = MAX_CHARS, ood_max_chars: int = OOD_MAX_CHARS
) -> dict[str, int]:
    """Write the seed corpus and, disjoint from it, the out-of-domain set :data:`OOD_SET`
    (whole files of the seed domain chosen by a hash of their path, up to
    ``ood_max_chars``), both atomically; returns documents per file written."""
    counts = {"seed": 0, "ood": 0}
    ood_chars, source, to_ood = 0, None, False
    with (
        atomic_open(seed_path, "w", encoding="utf-8") as seed,
        atomic_open(ood_path, "w", encoding="utf-8") as ood,
    ):
        for doc in iter_documents([SEED_DOMAIN], max_chars):
            if doc["source"] != source:  # a file goes to one side whole
                source = doc["source"]
                to_ood = ood_chars < ood_max_chars and _held_out_file(source)
            if to_ood:
                ood_chars += len(doc["text"])
                doc = dict(doc, domain=OOD_SET)
            (ood if to_ood else seed).write(json.dumps(doc, ensure_ascii=False) + "\n")
            counts["ood" if to_ood else "seed"] += 1
    return counts


def corpus_sizes(
    domains: Sequence[str] | None = None, tokenizer=None, max_chars: int = MAX_CHARS
) -> dict[str, dict[str, int]]:
    """{domain: {"documents", "chars", "bytes"[, "tokens"]}}; tokens (plus one EOD per
    document, as preprocess counts them) when a tokenizer with ``encode`` is given."""
    sizes: dict[str, dict[str, int]] = {}
    batch: dict[str, list[str]] = {}

    def flush(d: str) -> None:
        if tokenizer is not None and batch.get(d):
            sizes[d]["tokens"] += sum(len(ids) + 1 for ids in tokenizer.encode(batch[d]))
        batch[d] = []

    for doc in iter_documents(domains, max_chars):
        d = doc["domain"]
        s = sizes.setdefault(
            d,
            {"documents": 0, "chars": 0, "bytes": 0}
            | ({"tokens": 0} if tokenizer is not None else {}),
        )
        s["documents"] += 1
        s["chars"] += len(doc["text"])
        s["bytes"] += len(doc["text"].encode("utf-8"))
        batch.setdefault(d, []).append(doc["text"])
        if len(batch[d]) >= 256:
            flush(d)
    for d in list(batch):
        flush(d)
    return sizes
