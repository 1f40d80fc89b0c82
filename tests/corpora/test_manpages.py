"""The built-in manual-page corpus: roff to text, partitions, seed and evaluation sets
kept apart, determinism, and the error when there are no manual pages.

Everything runs on a fixture tree of fake pages (``root=tmp_path``), not on this
machine's /usr/share/man.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os

import pytest

from megablocks_ablate.corpora import manpages as mc
from megablocks_ablate.corpora.roff import (
    is_alias,
    roff_sections,
    roff_to_text,
    split_args,
    strip_comment,
    unescape,
)
from megablocks_ablate.errors import ConfigError

# ----------------------------------------------------------------------------- roff

MAN_PAGE = r""".\" A comment line that must vanish
.TH LS 1 "2024-01-01" "coreutils" "User Commands"
.SH NAME
ls \- list directory contents
.SH SYNOPSIS
.B ls
[\fIOPTION\fR]... [\fIFILE\fR]...
.SH DESCRIPTION
List information about the FILEs
(the current directory by default).   \" trailing comment
Sort entries alphabetically.
.PP
Mandatory arguments are mandatory\(emfor short options too.
.TP
.BR \-a ", " \-\-all
do not ignore entries starting with .
.IP \(bu 2
a bullet item
.SS "Exit status"
.nf
0   if OK,
1   if minor problems
.fi
Back to filled text.
"""


def test_man_macros_fonts_escapes_and_paragraphs():
    assert roff_to_text(MAN_PAGE) == (
        "NAME\nls - list directory contents\n\n"
        "SYNOPSIS\nls [OPTION]... [FILE]...\n\n"
        "DESCRIPTION\n"
        "List information about the FILEs (the current directory by default). "
        "Sort entries alphabetically.\n\n"
        "Mandatory arguments are mandatory\u2014for short options too.\n\n"
        "-a, --all\ndo not ignore entries starting with .\n\n"
        "\u2022 a bullet item\n\n"
        "Exit status\n0   if OK,\n1   if minor problems\nBack to filled text."
    )


def test_sections_split_at_sh_headings():
    sections = roff_sections(MAN_PAGE)
    assert [s.split("\n", 1)[0] for s in sections] == ["NAME", "SYNOPSIS", "DESCRIPTION"]
    assert "Exit status" in sections[2]  # .SS stays inside its section


def test_strings_macros_conditions_and_blocks():
    src = r""".ds Pn frobnicator
.de Hi
Hello, \\$1 and \\$2.
..
.if n .ds Mode nroff
.if t .ds Mode troff
.ie t \{\
Typeset only.
.\}
.el \{\
Terminal only.
.\}
.ig
Ignored text.
..
.EQ
x sup 2
.EN
The \*(Pn runs in \*[Mode] mode.
.Hi world "big moon"
Joined\c
word.
"""
    assert roff_to_text(src) == (
        "Terminal only. The frobnicator runs in nroff mode. Hello, world and big moon. Joinedword."
    )


def test_table_rows_become_lines():
    src = """.TS
allbox tab(:);
l l.
Signal:Action
SIGHUP:T{
Hangup of the
terminal
T}
.TE
After.
"""
    assert roff_to_text(src) == "Signal  Action\nSIGHUP  Hangup of the terminal\n\nAfter."


def test_mdoc_macros():
    src = """.Dd January 1, 2024
.Dt FROB 1
.Os
.Sh NAME
.Nm frob
.Nd twiddle bits
.Sh SYNOPSIS
.Nm
.Op Fl v
.Ar file
.Sh DESCRIPTION
See
.Xr ls 1 ,
then call
.Fn frob_init "int flags" .
.Sh EXIT STATUS
.Ex -std
"""
    assert roff_to_text(src) == (
        "NAME\nfrob \u2014 twiddle bits\n\n"
        "SYNOPSIS\nfrob [-v] file\n\n"
        "DESCRIPTION\nSee ls(1), then call frob_init(int flags).\n\n"
        "EXIT STATUS\nThe frob utility exits 0 on success, and >0 if an error occurs."
    )


def test_escape_helpers_and_aliases():
    assert unescape(r"\fBbold\fP \f(CWmono\fR \s-2small\s0 \-\-x \(aq\[u00E9]\e") == (
        "bold mono small --x 'é\\"
    )
    assert strip_comment(r"text \" comment") == "text "
    assert strip_comment(r"keep \\" + '" this') == r"keep \\" + '" this'  # an escaped backslash
    assert split_args(r'one "two words" "say ""hi""" \fBx\fR') == [
        "one",
        "two words",
        'say "hi"',
        r"\fBx\fR",
    ]
    assert is_alias('.\\" alias\n.so man1/ls.1\n') and not is_alias(MAN_PAGE)


# ----------------------------------------------------------------------------- fixture tree


def _page(name: str, section: str, body: str) -> str:
    return f".TH {name.upper()} {section}\n.SH NAME\n{name} \\- {body}\n.SH DESCRIPTION\n{body}\n"


def _write_gz(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(text)


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _words(tag: str, i: int, n: int = 40) -> str:
    """Distinct prose for page ``i`` of kind ``tag``."""
    return " ".join(f"{tag}{i}w{j}" for j in range(n)) + "."


def make_tree(root, pages_per_section: int = 12) -> str:
    """A fake Debian tree: man1..man8 (plus a German man1 and aliases), package docs,
    common licenses. Returns the root."""
    root = str(root)
    man = os.path.join(root, "usr", "share", "man")
    for section in ("1", "2", "3", "4", "5", "7", "8"):
        for i in range(pages_per_section):
            name = f"page{section}x{i}"
            _write_gz(
                f"{man}/man{section}/{name}.{section}.gz", _page(name, section, _words(name, i))
            )
    for i in range(pages_per_section):  # the git family, in man1 and man5
        _write_gz(f"{man}/man1/git-cmd{i}.1.gz", _page(f"git-cmd{i}", "1", _words("gitc", i)))
    _write_gz(f"{man}/man5/gitignore.5.gz", _page("gitignore", "5", _words("gitignore", 0)))
    _write_gz(f"{man}/man1/gcloud-thing.1.gz", _page("gcloud-thing", "1", _words("gcloud", 0)))
    _write_gz(f"{man}/man1/alias.1.gz", ".so man1/page1x0.1\n")
    os.symlink("page1x1.1.gz", f"{man}/man1/link.1.gz")
    same = _page("twin", "8", _words("twin", 0))  # identical text in two sections
    _write_gz(f"{man}/man8/twin.8.gz", same)
    _write_gz(f"{man}/man2/twin.2.gz", same)
    _write_gz(f"{man}/de/man1/page1x0.1.gz", _page("seite", "1", _words("deutsch", 0)))
    doc = os.path.join(root, "usr", "share", "doc")
    for i in range(pages_per_section):
        entry = (
            f"pkg{i} (1.{i}-1) unstable; urgency=medium\n\n  * {_words('chg', i)}\n\n -- A <a@b>\n"
        )
        _write_gz(f"{doc}/pkg{i}/changelog.Debian.gz", entry)
        _write(f"{doc}/pkg{i}/copyright", f"Files: *\nLicense: {_words('cpy', i)}\n")
        _write(f"{doc}/pkg{i}/README", f"Read me {_words('readme', i)}\n")
    _write(f"{doc}/pkg0/README.html", "<html>not prose</html>\n")
    _write(os.path.join(root, "usr", "share", "common-licenses", "GPL-2"), _words("gpl", 0))
    return root


def _texts(docs) -> list[str]:
    return [d["text"] for d in docs]


# ----------------------------------------------------------------------------- corpus


def test_partition_assignment(tmp_path):
    built = mc.build(make_tree(tmp_path), mc.ManpageCorpusConfig(seed_fraction=0.0))
    by_domain = {d: {x["source"] for x in docs} for d, docs in built.items()}
    man = "usr/share/man"
    assert by_domain["syscalls"] >= {f"{man}/man2/page2x{i}.2.gz" for i in range(12)}
    assert f"{man}/man5/gitignore.5.gz" in by_domain["git"]
    assert f"{man}/man1/git-cmd3.1.gz" in by_domain["git"]
    assert f"{man}/man1/page1x3.1.gz" in by_domain["commands"]
    assert by_domain["libraries"] == {f"{man}/man3/page3x{i}.3.gz" for i in range(12)}
    assert by_domain["devices"] == {f"{man}/man4/page4x{i}.4.gz" for i in range(12)}
    assert by_domain["changelogs"] == {
        f"usr/share/doc/pkg{i}/changelog.Debian.gz" for i in range(12)
    }
    assert "usr/share/common-licenses/GPL-2" in by_domain["licenses"]
    assert "usr/share/doc/pkg4/copyright" in by_domain["licenses"]
    assert by_domain["readmes"] == {f"usr/share/doc/pkg{i}/README" for i in range(12)}
    everything = set().union(*by_domain.values())
    for left_out in ("gcloud-thing.1.gz", "alias.1.gz", "link.1.gz", "README.html", "de/man1"):
        assert not any(left_out in s for s in everything), left_out
    assert built[mc.SEED_DOMAIN] == []  # seed_fraction 0
    # the page converted: heading lines and prose, no roff left
    ls = next(x for x in built["commands"] if x["source"].endswith("page1x3.1.gz"))
    assert (
        ls["text"]
        == f"NAME\npage1x3 - {_words('page1x3', 3)}\n\nDESCRIPTION\n{_words('page1x3', 3)}"
    )
    assert ls["domain"] == ls["kind"] == "commands"


def test_seed_partitions_and_eval_sets_are_disjoint(tmp_path):
    cfg = mc.ManpageCorpusConfig(seed_fraction=0.4)
    built = mc.build(make_tree(tmp_path), cfg)
    seed = built[mc.SEED_DOMAIN]
    assert seed and {x["kind"] for x in seed} <= set(mc.DOMAINS)
    assert len({x["kind"] for x in seed}) >= 5  # drawn from the whole mix
    places: dict[str, str] = {}
    sources: dict[str, str] = {}
    for name, docs in built.items():
        for x in docs:
            key = hashlib.sha256(x["text"].encode()).hexdigest()
            assert key not in places, (x["id"], places.get(key))
            places[key] = name
            assert sources.setdefault(x["source"], name) == name  # a page lives in one place
    for x in seed:
        assert mc.in_seed(x["source"], 0.4)
    for d in mc.DOMAINS:
        assert built[d], d
        assert not any(mc.in_seed(x["source"], 0.4) for x in built[d])
    # the twin page (same text in man2 and man8) is kept once
    twins = [x for docs in built.values() for x in docs if "/twin." in x["source"]]
    assert len(twins) == 1
    # order numbers each output 0..n-1
    for docs in built.values():
        assert [x["order"] for x in docs] == list(range(len(docs)))


def test_writers_are_deterministic_and_agree(tmp_path):
    root = make_tree(tmp_path / "tree")
    cfg = mc.ManpageCorpusConfig(seed_fraction=0.3)
    a = mc.write_all(str(tmp_path / "a"), root=root, cfg=cfg)
    b = mc.write_all(str(tmp_path / "b"), root=root, cfg=cfg)
    assert set(a) == {"corpus", "seed", *mc.OOD_SETS}
    for key in a:
        with open(a[key], "rb") as fa, open(b[key], "rb") as fb:
            assert fa.read() == fb.read(), key
    assert a["licenses"] == str(tmp_path / "a" / "ood" / "licenses.jsonl")
    counts = mc.write_corpus(str(tmp_path / "c.jsonl"), root=root, cfg=cfg)
    assert set(counts) == set(mc.DOMAINS)
    with open(tmp_path / "c.jsonl", "rb") as f, open(a["corpus"], "rb") as g:
        assert f.read() == g.read()
    seed_counts = mc.write_corpus(str(tmp_path / "s.jsonl"), [mc.SEED_DOMAIN], root=root, cfg=cfg)
    with open(a["seed"], encoding="utf-8") as f:
        lines = [json.loads(line) for line in f]
    assert seed_counts == {mc.SEED_DOMAIN: len(lines)}
    assert all(set(x) == {"id", "text", "domain", "order", "source", "kind"} for x in lines)
    ood = mc.write_ood_sets(str(tmp_path / "ood"), root=root, cfg=cfg)
    assert list(ood) == list(mc.OOD_SETS)


def test_long_pages_split_at_sections_and_domains_capped(tmp_path):
    root = make_tree(tmp_path)
    long_page = ".TH BIG 7\n" + "".join(
        f".SH PART{k}\n{_words(f'big{k}', k, 60)}\n" for k in range(10)
    )
    _write_gz(os.path.join(root, "usr/share/man/man7/big.7.gz"), long_page)
    cfg = mc.ManpageCorpusConfig(max_chars=1500, seed_fraction=0.0)
    built = mc.build(root, cfg)
    big = [x for x in built["overview"] if x["source"].endswith("big.7.gz")]
    assert len(big) > 1 and all(len(x["text"]) <= 1500 for x in big)
    assert [x["id"].rsplit("#", 1)[1] for x in big] == [str(i) for i in range(len(big))]
    assert "\n\n".join(_texts(big)) == roff_to_text(long_page)  # whole sections, in order
    orders = [x["order"] for x in big]
    assert orders == list(range(orders[0], orders[0] + len(big)))  # consecutive

    one_page = len(built["libraries"][0]["text"])
    capped = mc.build(root, mc.ManpageCorpusConfig(domain_chars=3 * one_page, seed_fraction=0.0))
    assert len(capped["libraries"]) == 3  # stops once the cap is reached
    assert set(_texts(capped["libraries"])) <= set(_texts(built["libraries"]))


def test_unknown_domain_and_bad_config():
    with pytest.raises(ConfigError, match="unknown manpage corpus domain 'nope'"):
        list(mc.iter_documents(["nope"], built={}))
    with pytest.raises(ConfigError, match="seed_fraction"):
        mc.ManpageCorpusConfig(seed_fraction=1.0)


def test_missing_tree_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"usr/share/man does not exist.*manpages-dev"):
        mc.build(str(tmp_path))
    root = make_tree(tmp_path / "t")
    for f in os.listdir(os.path.join(root, "usr/share/man/man2")):
        os.remove(os.path.join(root, "usr/share/man/man2", f))
    with pytest.raises(ConfigError, match=r"no manual pages in .*usr/share/man/man2 "):
        mc.build(root)
    root = make_tree(tmp_path / "u")
    for i in range(12):
        os.remove(os.path.join(root, f"usr/share/doc/pkg{i}/changelog.Debian.gz"))
    with pytest.raises(ConfigError, match=r"'changelogs' has no documents \(usr/share/doc/"):
        mc.build(root)
