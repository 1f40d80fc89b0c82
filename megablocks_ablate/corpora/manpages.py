"""A built-in corpus of English prose from this machine's manual pages: no download.

The stdlib corpus (:mod:`.stdlib`) is mostly code; this one is prose of
distinct kinds, read from files a Debian-like system already has (``root`` is the
filesystem prefix, ``/`` by default, so tests can point it at a fixture tree):

* eight partition domains (the ``domain`` field):

  * ``syscalls`` (``man2``), ``libraries`` (``man3``), ``formats`` (``man5``),
    ``overview`` (``man7``), ``admin`` (``man8``): one manual section each;
  * ``git``: the Git manual, every page named ``git*`` (lower case) of any of those
    sections and ``man1`` (commands, file formats, tutorials): one family, and without
    it ``man1`` alone would be too small for two partitions of comparable size;
  * ``commands``: the rest of ``man1``. Pages named ``gcloud*`` are left out: where the
    Google Cloud CLI is installed they are ~16,600 generated references (61 MB of roff,
    five times the rest of ``man1``) sharing most of their text, and absent elsewhere;
  * ``changelogs``: the newest entries (:attr:`ManpageCorpusConfig.changelog_head_chars`)
    of every ``/usr/share/doc/<package>/changelog.Debian[.gz]``;

* ``general`` (:data:`SEED_DOMAIN`), the seed corpus: a fixed share
  (:attr:`~ManpageCorpusConfig.seed_fraction`) of every domain's pages, chosen by a hash
  of the page's path, so the seed is the whole mix in its proportions and shares no page
  with a partition;
* three out-of-domain evaluation sets (:func:`write_ood_sets`), prose no partition has:
  ``licenses`` (``/usr/share/common-licenses`` and the packages' ``copyright`` files),
  ``readmes`` (``/usr/share/doc/<package>/README*``) and ``devices`` (``man4`` and
  ``man6``: the manual's style, sections no partition sees), from far to near the
  training text.

Pages are English only (``/usr/share/man/man<N>``; translations in
``/usr/share/man/<lang>/`` are not read), converted from roff by :mod:`.roff`; ``.so``
aliases and symbolic links are skipped. A page is one document, or, when longer than
``max_chars``, several: whole ``.SH`` sections packed up to ``max_chars`` (a longer
section is cut at paragraph ends). Each domain takes pages in a fixed pseudo-random order
(a hash of the path, so its first base unit samples the whole domain rather than the
pages starting with ``a``) until it holds ``domain_chars`` (seed share included); an
evaluation set until ``ood_chars``. A document whose text occurs earlier (partitions in
:data:`DOMAINS` order, then the seed's picks, then the evaluation sets) is dropped, so no
text is in two places. Lines are ``{"id", "text", "domain", "order", "source", "kind"}``
(``kind``: the domain a seed document was drawn from); the output is the same on every
run over the same files.

    write_all("out/")                            # corpus.jsonl, seed.jsonl, ood/*.jsonl
    write_corpus("corpus.jsonl")                 # the 8 partition domains
    write_corpus("seed.jsonl", [SEED_DOMAIN])    # the seed corpus
    write_ood_sets("ood/")                       # {"licenses": "ood/licenses.jsonl", ...}
    corpus_sizes()                               # {domain: {documents, chars, bytes}}
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

from megablocks_ablate.config import Config, doc
from megablocks_ablate.corpora.roff import is_alias, roff_sections
from megablocks_ablate.corpora.stdlib import chunks
from megablocks_ablate.errors import ConfigError
from megablocks_ablate.utils.atomic import atomic_open

logger = logging.getLogger(__name__)

SEED_DOMAIN = "general"
MAN_SECTION_DOMAINS = {
    "syscalls": "2",  # domain: manual section (pages named git* excepted, see page_domain)
    "libraries": "3",
    "formats": "5",
    "overview": "7",
    "admin": "8",
}
GIT_DOMAIN, COMMANDS_DOMAIN, CHANGELOGS_DOMAIN = "git", "commands", "changelogs"
DOMAINS = (*MAN_SECTION_DOMAINS, GIT_DOMAIN, COMMANDS_DOMAIN, CHANGELOGS_DOMAIN)
OOD_SETS = ("licenses", "readmes", "devices")
EXCLUDED_MAN1_PREFIXES = ("gcloud",)
REQUIRED_SECTIONS = ("1", "2", "3", "5", "7", "8")
MAN_DIR, DOC_DIR, LICENSES_DIR = "usr/share/man", "usr/share/doc", "usr/share/common-licenses"
_NOT_TEXT = (".html", ".htm", ".pdf", ".png", ".jpg", ".gif", ".svg", ".ps", ".dvi", ".css")


@dataclass
class ManpageCorpusConfig(Config):
    """Sizes of the manual-page corpus (the defaults are what the demo uses)."""

    max_chars: int = doc("characters per document at most (a longer page is split)", 4000)
    domain_chars: int = doc(
        "characters each domain takes at most (its partition plus its seed share)", 3_250_000
    )
    seed_fraction: float = doc("share of every domain's pages that go to the seed", 0.25)
    ood_chars: int = doc("characters each out-of-domain evaluation set takes at most", 100_000)
    changelog_head_chars: int = doc(
        "characters read from the top (the newest entries) of each Debian changelog", 16_000
    )

    def validate(self) -> None:
        for name in ("max_chars", "domain_chars", "ood_chars", "changelog_head_chars"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.seed_fraction < 1.0:
            raise ConfigError(f"seed_fraction: must be in [0, 1), got {self.seed_fraction}")


# ----------------------------------------------------------------------------- files


def read_text(path: str) -> str:
    """A text file (``.gz`` decompressed) as str: UTF-8, undecodable bytes replaced."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    return raw.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\x00", "")


def _files(directory: str) -> list[str]:
    """Regular files (not symbolic links) directly in ``directory``, sorted by name."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    return [
        os.path.join(directory, n)
        for n in names
        if not os.path.islink(os.path.join(directory, n))
        and os.path.isfile(os.path.join(directory, n))
    ]


def _package_dirs(root: str) -> list[str]:
    """``/usr/share/doc/<package>`` directories (not links to another's), sorted."""
    base = os.path.join(root, DOC_DIR)
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return []
    dirs = [os.path.join(base, n) for n in names]
    return [d for d in dirs if os.path.isdir(d) and not os.path.islink(d)]


def page_name(path: str) -> str:
    """``git-add`` for ``.../man1/git-add.1.gz``."""
    name = os.path.basename(path)
    name = name[:-3] if name.endswith(".gz") else name
    return name.rsplit(".", 1)[0] if "." in name else name


def page_domain(path: str, section: str) -> str | None:
    """The partition domain of a page of ``man<section>`` (None: left out)."""
    name = page_name(path)
    if name.startswith("git"):  # lower case: not the Perl module Git.3pm
        return GIT_DOMAIN
    if section != "1":
        return {s: d for d, s in MAN_SECTION_DOMAINS.items()}.get(section)
    return None if name.startswith(EXCLUDED_MAN1_PREFIXES) else COMMANDS_DOMAIN


def _man_pages(root: str, section: str) -> list[str]:
    return _files(os.path.join(root, MAN_DIR, f"man{section}"))


# A source: (path relative to root, function returning the documents' texts).
Source = tuple[str, Callable[[], list[str]]]


def _sources(root: str, cfg: ManpageCorpusConfig) -> dict[str, list[Source]]:
    """Every domain's and evaluation set's sources, in name order."""

    def man(p: str) -> Source:
        return os.path.relpath(p, root), partial(_page_documents, p, cfg.max_chars)

    def text(p: str, head: int | None = None) -> Source:
        return os.path.relpath(p, root), partial(_text_documents, p, cfg.max_chars, head)

    out: dict[str, list[Source]] = {d: [] for d in (*DOMAINS, *OOD_SETS)}
    for section in REQUIRED_SECTIONS:
        for p in _man_pages(root, section):
            domain = page_domain(p, section)
            if domain is not None:
                out[domain].append(man(p))
    out["devices"] = [man(p) for s in ("4", "6") for p in _man_pages(root, s)]
    out["licenses"] = [text(p) for p in _files(os.path.join(root, LICENSES_DIR))]
    for pkg in _package_dirs(root):
        for p in _files(pkg):
            name = os.path.basename(p)
            if name in ("changelog.Debian", "changelog.Debian.gz"):
                out[CHANGELOGS_DOMAIN].append(text(p, cfg.changelog_head_chars))
            elif name == "copyright":
                out["licenses"].append(text(p))
            elif name.upper().startswith("README") and not name.lower().endswith(_NOT_TEXT):
                out["readmes"].append(text(p))
    return out


def _page_documents(path: str, max_chars: int) -> list[str]:
    """A manual page's documents: its sections packed into pieces of ``max_chars``."""
    source = read_text(path)
    if is_alias(source):
        return []
    docs: list[str] = []
    piece = ""
    for section in roff_sections(source):
        parts = [section] if len(section) <= max_chars else chunks(section, max_chars)
        for part in parts:
            if piece and len(piece) + 2 + len(part) > max_chars:
                docs.append(piece)
                piece = ""
            piece = f"{piece}\n\n{part}" if piece else part
    if piece.strip():
        docs.append(piece)
    return docs


def _text_documents(path: str, max_chars: int, head: int | None = None) -> list[str]:
    """A plain-text file's documents (its first ``head`` characters, cut at a line end)."""
    text = read_text(path)
    if head is not None and len(text) > head:
        cut = text.rfind("\n\n", 0, head)
        text = text[: cut if cut > 0 else head]
    if text.count("\ufffd") > len(text) // 100:
        return []  # mostly undecodable: a binary file under a text name
    return chunks(text.strip("\n"), max_chars)


# ----------------------------------------------------------------------------- assignment


def _hash(kind: str, text: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{kind}\0{text}".encode()).digest()[:8], "big")


def in_seed(source: str, seed_fraction: float) -> bool:
    """Whether a page goes to the seed corpus: a hash of its path below the fraction."""
    return _hash("seed", source) < seed_fraction * 2**64


def check_tree(root: str = "/") -> None:
    """ConfigError unless ``root`` has the manual sections the partitions are made of."""
    man = os.path.join(root, MAN_DIR)
    if not os.path.isdir(man):
        raise ConfigError(
            f"manpage corpus: {man} does not exist; the corpus is built from the English "
            "manual pages of a Debian-like system (packages man-db, manpages, manpages-dev)"
        )
    missing = [s for s in REQUIRED_SECTIONS if not _man_pages(root, s)]
    if missing:
        raise ConfigError(
            "manpage corpus: no manual pages in "
            + ", ".join(os.path.join(man, f"man{s}") for s in missing)
            + " (sections 2 and 3 come with the package manpages-dev, 5, 7 and 8 with "
            "manpages, 1 with every program)"
        )


def build(root: str = "/", cfg: ManpageCorpusConfig | None = None) -> dict[str, list[dict]]:
    """Every domain's, the seed's and every evaluation set's documents (see the module
    doc). ConfigError if the tree lacks manual pages or a domain or set ends up empty."""
    cfg = cfg or ManpageCorpusConfig()
    check_tree(root)
    t0 = time.time()
    sources = _sources(root, cfg)
    seen: set[bytes] = set()
    out: dict[str, list[dict]] = {d: [] for d in (*DOMAINS, SEED_DOMAIN, *OOD_SETS)}
    for name in (*DOMAINS, *OOD_SETS):
        cap = cfg.domain_chars if name in DOMAINS else cfg.ood_chars
        seed_share = cfg.seed_fraction if name in DOMAINS else 0.0
        total = 0
        for source, load in sorted(sources[name], key=lambda s: _hash("order", s[0])):
            if total >= cap:
                break
            dest = SEED_DOMAIN if in_seed(source, seed_share) else name
            for part, text in enumerate(load()):
                key = hashlib.sha256(text.encode()).digest()
                if key in seen or not text.strip():
                    continue
                seen.add(key)
                total += len(text)
                out[dest].append(_doc(dest, name, source, part, text, len(out[dest])))
        if not out[name]:
            raise ConfigError(f"manpage corpus: {name!r} has no documents ({_where(name)})")
    logger.info(
        "manpage corpus from %s in %.1f s: %s",
        root,
        time.time() - t0,
        ", ".join(f"{d} {sum(len(x['text']) for x in docs):,} chars" for d, docs in out.items()),
    )
    return out


def _doc(domain: str, kind: str, source: str, part: int, text: str, order: int) -> dict:
    return {
        "id": f"{domain}/{source}#{part}",
        "text": text,
        "domain": domain,
        "order": order,
        "source": source,
        "kind": kind,
    }


def _where(name: str) -> str:
    if name in MAN_SECTION_DOMAINS:
        return f"{MAN_DIR}/man{MAN_SECTION_DOMAINS[name]}"
    return {
        GIT_DOMAIN: f"{MAN_DIR}/man*/git*",
        COMMANDS_DOMAIN: f"{MAN_DIR}/man1",
        CHANGELOGS_DOMAIN: f"{DOC_DIR}/*/changelog.Debian[.gz]",
        "licenses": f"{LICENSES_DIR}, {DOC_DIR}/*/copyright",
        "readmes": f"{DOC_DIR}/*/README*",
        "devices": f"{MAN_DIR}/man4, {MAN_DIR}/man6",
    }[name]


# ----------------------------------------------------------------------------- output


def _check_domains(domains: Sequence[str] | None) -> list[str]:
    chosen = list(domains if domains is not None else DOMAINS)
    known = (*DOMAINS, SEED_DOMAIN, *OOD_SETS)
    unknown = [d for d in chosen if d not in known]
    if unknown:
        raise ConfigError(
            f"unknown manpage corpus domain {unknown[0]!r} (known: {', '.join(known)})"
        )
    return chosen


def iter_documents(
    domains: Sequence[str] | None = None,
    root: str = "/",
    cfg: ManpageCorpusConfig | None = None,
    built: dict[str, list[dict]] | None = None,
) -> Iterator[dict]:
    """Documents of the chosen domains (default: :data:`DOMAINS`), in a fixed order."""
    chosen = _check_domains(domains)
    built = built if built is not None else build(root, cfg)
    for d in chosen:
        yield from built[d]


def _write_jsonl(path: str, docs: Iterator[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    with atomic_open(path, "w", encoding="utf-8") as f:
        for doc_ in docs:
            f.write(json.dumps(doc_, ensure_ascii=False) + "\n")
            counts[doc_["domain"]] = counts.get(doc_["domain"], 0) + 1
    return counts


def write_corpus(
    path: str,
    domains: Sequence[str] | None = None,
    root: str = "/",
    cfg: ManpageCorpusConfig | None = None,
) -> dict[str, int]:
    """Write the JSONL corpus of ``domains`` atomically; returns documents per domain."""
    return _write_jsonl(path, iter_documents(domains, root, cfg))


def write_ood_sets(
    out_dir: str,
    root: str = "/",
    cfg: ManpageCorpusConfig | None = None,
    built: dict[str, list[dict]] | None = None,
) -> dict[str, str]:
    """Write each out-of-domain evaluation set to ``<out_dir>/<name>.jsonl`` (its domain
    is the file stem); returns {name: path}."""
    built = built if built is not None else build(root, cfg)
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for name in OOD_SETS:
        paths[name] = os.path.join(out_dir, f"{name}.jsonl")
        _write_jsonl(paths[name], iter(built[name]))
    return paths


def write_all(
    out_dir: str, root: str = "/", cfg: ManpageCorpusConfig | None = None
) -> dict[str, str]:
    """One build, three outputs: ``corpus.jsonl`` (the partitions), ``seed.jsonl`` and
    ``ood/<name>.jsonl``; returns {"corpus", "seed", <set name>...: path}."""
    built = build(root, cfg)
    os.makedirs(out_dir, exist_ok=True)
    paths = {"corpus": os.path.join(out_dir, "corpus.jsonl")}
    paths["seed"] = os.path.join(out_dir, "seed.jsonl")
    _write_jsonl(paths["corpus"], iter_documents(DOMAINS, built=built))
    _write_jsonl(paths["seed"], iter_documents([SEED_DOMAIN], built=built))
    paths |= write_ood_sets(os.path.join(out_dir, "ood"), built=built)
    return paths


def corpus_sizes(
    domains: Sequence[str] | None = None,
    tokenizer=None,
    root: str = "/",
    cfg: ManpageCorpusConfig | None = None,
) -> dict[str, dict[str, int]]:
    """{domain: {"documents", "chars", "bytes"[, "tokens"]}} for ``domains`` (default:
    all, the seed and the evaluation sets included); tokens (plus one EOD per document,
    as preprocess counts them) when a tokenizer with ``encode`` is given."""
    built = build(root, cfg)
    chosen = _check_domains(domains if domains is not None else list(built))
    sizes = {}
    for d in chosen:
        texts = [x["text"] for x in built[d]]
        s = {"documents": len(texts), "chars": sum(map(len, texts))}
        s["bytes"] = sum(len(t.encode("utf-8")) for t in texts)
        if tokenizer is not None:
            s["tokens"] = sum(
                len(ids) + 1
                for i in range(0, len(texts), 256)
                for ids in tokenizer.encode(texts[i : i + 256])
            )
        sizes[d] = s
    return sizes
