"""The BSD ``mdoc`` macros of manual pages: which contribute text and how (used by
:mod:`.roff`, which handles the ones that are lines of their own)."""

from __future__ import annotations

from collections.abc import Callable

# mdoc macros that contribute text, and how their own name shows in the output
MDOC_INLINE = {
    "Nm", "Nd", "Fl", "Ar", "Cm", "Ic", "Pa", "Ev", "Va", "Dv", "Er", "Fa", "Ft", "Fn",
    "Fd", "In", "Em", "Sy", "Li", "Ql", "Dq", "Sq", "Pq", "Op", "Aq", "Bq", "Brq", "Qq",
    "Xr", "Sx", "Tn", "No", "Ns", "St", "An", "Lk", "Mt", "Oo", "Oc", "Xo", "Xc", "At",
    "Bx", "Bsx", "Fx", "Nx", "Ox", "Ux", "Dx", "Ta", "Ad", "Cd", "Vt", "Ms", "Do", "Dc",
    "Po", "Pc", "Qo", "Qc", "So", "Sc", "Bo", "Bc", "Eo", "Ec", "Ao", "Ac", "%A",
    "%T", "%B", "%J", "%D", "%N", "%V", "%P", "%I", "%O", "%R", "%Q", "%U", "Lb", "Rv",
    "Pf",
}  # fmt: skip
MDOC_QUOTES = {
    "Dq": ("\u201c", "\u201d"),
    "Sq": ("\u2018", "\u2019"),
    "Qq": ('"', '"'),
    "Pq": ("(", ")"),
    "Op": ("[", "]"),
    "Aq": ("<", ">"),
    "Bq": ("[", "]"),
    "Brq": ("{", "}"),
}
MDOC_OPEN = {"Oo": "[", "Do": "\u201c", "Po": "(", "Qo": '"', "So": "\u2018", "Bo": "[", "Ao": "<"}
MDOC_CLOSE = {
    "Oc": "]",
    "Dc": "\u201d",
    "Pc": ")",
    "Qc": '"',
    "Sc": "\u2019",
    "Bc": "]",
    "Ac": ">",
}
MDOC_NAMES = {"At": "AT&T UNIX", "Bx": "BSD", "Bsx": "BSD/OS", "Fx": "FreeBSD", "Nx": "NetBSD"}
MDOC_NAMES |= {"Ox": "OpenBSD", "Ux": "UNIX", "Dx": "DragonFly"}
PUNCT = set(".,:;)]?!")


def mdoc_inline(args: list[str], text: Callable[[str], str], name: str) -> str:
    """Text of an mdoc line (its arguments): callable macro names dropped or rendered,
    punctuation attached to the word before it; ``text`` resolves a word's escapes and
    ``name`` is the page's ``.Nm``."""
    out: list[str] = []
    closers: list[str] = []
    glue = False  # the next word attaches to the previous one (after Ns or an opener)

    def add(word: str, attach: bool = False) -> None:
        nonlocal glue
        if (glue or attach or word in PUNCT) and out:
            out[-1] += word
        else:
            out.append(word)
        glue = False

    i = 0
    while i < len(args):
        a = args[i]
        i += 1
        nxt = args[i] if i < len(args) else ""
        if a == "Ns":
            glue = True
        elif a == "Fl":
            flag = "" if nxt in MDOC_INLINE else text(nxt)
            add("-" + flag)
            i += 1 if flag else 0
        elif a == "Nm" and (not nxt or nxt in MDOC_INLINE or nxt in PUNCT):
            add(name)
        elif a == "Fn" and nxt:
            fargs = []
            while i + 1 < len(args) and args[i + 1] not in MDOC_INLINE | PUNCT:
                fargs.append(text(args[i + 1]))
                i += 1
            add(f"{text(nxt)}({', '.join(fargs)})")
            i += 1
        elif a == "Xr" and i + 1 < len(args):
            add(f"{text(nxt)}({args[i + 1]})")
            i += 2
        elif a in MDOC_QUOTES or a in MDOC_OPEN:
            opener, closer = MDOC_QUOTES.get(a, (MDOC_OPEN.get(a, ""), ""))
            add(opener)
            glue = True
            if closer:
                closers.append(closer)
        elif a in MDOC_CLOSE:
            add(MDOC_CLOSE[a], attach=True)
        elif a in MDOC_NAMES:
            add(MDOC_NAMES[a])
        elif a == "Nd":
            add("\u2014")
        elif a not in MDOC_INLINE:
            add(text(a))
    return " ".join(w for w in out if w) + "".join(reversed(closers))
