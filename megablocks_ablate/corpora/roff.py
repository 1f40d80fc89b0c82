"""Manual pages (roff source, ``man`` and ``mdoc`` macros) to plain text, without groff.

Formatting a page with groff would be slow for thousands of pages and groff may be
absent; the corpus only needs readable prose, so this is a small, crude interpreter:

* requests and macros are read as ``nroff`` would take them where it matters for text:
  conditions ``n`` true, ``t`` false, ``\\n(.g`` (groff) true, anything else false;
  strings (``.ds``/``.as``), character translations (``.tr``) and page-defined macros
  (``.de``, expanded with their arguments) are honoured; ``.ig`` blocks, comments,
  index entries and layout requests (fonts, sizes, indents, hyphenation) are dropped;
* ``man`` macros: ``.SH``/``.SS`` headings become lines of their own (``.SH`` starts a
  new section, see :func:`roff_sections`), ``.PP .IP .TP .sp ...`` end paragraphs,
  ``.B .I .BR .IR ...`` contribute their arguments' text, ``.nf``/``.EX``/``.Vb`` keep
  lines as they are; fill-mode text lines are joined into one line per paragraph;
* ``mdoc`` macros (BSD pages): headings, paragraphs, lists and the common inline
  macros (``.Fl`` as ``-x``, ``.Xr`` as ``name(sec)``, ``.Op`` as ``[...]``, ...; those
  are in :mod:`.roff_mdoc`);
* tables (``.TS``/``.TE``): the layout lines are dropped and each row becomes a line
  of cells; equations (``.EQ``/``.EN``) and pictures (``.PS``/``.PE``) are dropped;
* escapes: fonts, sizes and motions dropped, ``\\-`` as ``-``, named glyphs
  (``\\(em``, ``\\[bu]``, ``\\[u00E9]``, ...) as Unicode, unknown glyphs dropped.

``.so`` pages (aliases of another page) are recognised by :func:`is_alias`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from megablocks_ablate.corpora.roff_mdoc import MDOC_INLINE, mdoc_inline

# Named glyphs nroff prints as these characters (unknown names are dropped).
GLYPHS = {
    "em": "—", "en": "–", "hy": "-", "mi": "-", "bu": "•", "aq": "'", "dq": "\"", "lq": "“",
    "rq": "”", "oq": "‘", "cq": "’", "Fo": "«", "Fc": "»", "fo": "‹", "fc": "›", "co": "©",
    "rg": "®", "tm": "™", "de": "°", "sc": "§", "ps": "¶", "ct": "¢", "mu": "×", "di": "÷",
    "+-": "±", "<=": "≤", ">=": "≥", "!=": "≠", "==": "≡", "->": "→", "<-": "←", "<>": "↔",
    "rA": "⇒", "lA": "⇐", "ti": "~", "ha": "^", "ga": "`", "ul": "_", "rs": "\\", "sl": "/",
    "ba": "|", "or": "|", "pl": "+", "eq": "=", "lh": "☜", "rh": "☞", "dg": "†", "dd": "‡",
    "es": "∅", "if": "∞", "*a": "α", "*b": "β", "*g": "γ", "*d": "δ", "*e": "ε", "*l": "λ",
    "*m": "μ", "*p": "π", "*s": "σ", "*W": "Ω", "'e": "é", "`e": "è", ":a": "ä", ":o": "ö",
    ":u": "ü", "ss": "ß",
}  # fmt: skip

# One escape sequence: \[name], \(xx, \f.. (font), \*.. (string), \n.. (register),
# \s.. (size), quoted-argument escapes (\h'..' motions, \w'..' width, ...), \k. \z.
_ESCAPE = re.compile(
    r"""\\(?:
      \[(?P<bracket>[^\]]*)\]
    | \((?P<paren>..)
    | (?P<kind>[fFgmMY])(?:\[[^\]]*\]|\(..|.)
    | \*(?:\[(?P<sbr>[^\]]*)\]|\((?P<spar>..)|(?P<sone>.))
    | n[-+]?(?:\[[^\]]*\]|\(..|.)
    | s(?:[-+]?[1-3]\d|[-+]?\d|[-+]?\(\d\d|\([-+]\d\d|[-+]?\[[^\]]*\]|[-+]?'[^']*')
    | (?P<quoted>[hvwlLoXZDbxNCRS])'(?P<qarg>[^']*)'
    | [kz].
    | (?P<one>.)
    )""",
    re.VERBOSE | re.DOTALL,
)
_SIMPLE = {
    "-": "-",
    "e": "\\",
    "\\": "\\",
    "E": "\\",
    " ": " ",
    "~": " ",
    "0": " ",
    "t": "\t",
    ".": ".",
    "'": "'",
    "`": "`",
    '"': "",
    "c": "\x01",  # \c: the next text line continues this one without a space
}
_COMMENT = re.compile(r'^((?:[^\\]|\\.)*?)\\["#].*$', re.DOTALL)
_CONTROL = re.compile(r"^[.'][ \t]*(?P<name>[^ \t\\]*)(?P<rest>.*)$", re.DOTALL)
_MAN_ALTERNATING = {"BR", "BI", "IB", "IR", "RB", "RI"}
_MAN_WORDS = {"B", "I", "SM", "SB"}
_BREAKS = {"br", "RS", "RE", "in", "ti", "INDENT", "UNINDENT", "ce", "Bl", "El", "Bd", "Rs", "Re"}
_PARAS = {"PP", "LP", "P", "sp", "Sp", "HP", "Pp", "Lp", "YS", "bp"}
_NOFILL = {"nf", "EX", "Vb"}
_FILL = {"fi", "EE", "Ve"}
_SKIPPED_BLOCKS = {"EQ": "EN", "PS": "PE", "ig": "."}  # block start: its end request
_RAW_REST = {"if", "ie", "el", "ds", "ds1", "as"}  # requests that parse their own rest
_INLINE_TAG = re.compile(r"[\u2022*o\-]|\(?\w{1,2}[.)]|\d+")  # .IP tags kept on the body's line
_MAX_EXPANDED_LINES = 200_000  # page-defined macro expansion budget (runaway recursion)


def strip_comment(line: str) -> str:
    """The line without its ``\\"`` (or groff ``\\#``) comment."""
    m = _COMMENT.match(line)
    return m.group(1) if m else line


def split_args(s: str) -> list[str]:
    """Macro arguments: blank-separated, ``"..."`` quoted (``""`` inside is a quote)."""
    out, i, n = [], 0, len(s)
    while i < n:
        while i < n and s[i] in " \t":
            i += 1
        if i >= n:
            break
        if s[i] == '"':
            i += 1
            buf = []
            while i < n:
                if s[i] == '"':
                    if i + 1 < n and s[i + 1] == '"':
                        buf.append('"')
                        i += 2
                        continue
                    i += 1
                    break
                buf.append(s[i])
                i += 1
            out.append("".join(buf))
        else:
            j = i
            while j < n and s[j] not in " \t":
                j += 2 if s[j] == "\\" else 1
            out.append(s[i:j])
            i = j
    return out


def unescape(s: str, strings: dict[str, str] | None = None) -> str:
    """Text of a roff line: escapes resolved (see the module doc)."""
    strings = strings or {}

    def one(m: re.Match) -> str:
        g = m.groupdict()
        name = g["bracket"] if g["bracket"] is not None else g["paren"]
        if name is not None:
            if re.fullmatch(r"u[0-9A-Fa-f]{4,6}", name):
                return chr(int(name[1:], 16))
            return GLYPHS.get(name, "")
        string = g["sbr"] or g["spar"] or g["sone"]
        if string is not None:
            return strings.get(string, "")
        if g["quoted"] is not None:
            if g["quoted"] == "N" and g["qarg"].isdigit():
                return chr(int(g["qarg"]))
            if g["quoted"] == "h" and not g["qarg"].startswith(("-", "0")):
                return " "  # a rightward motion separates what it sits between
            return GLYPHS.get(g["qarg"], "") if g["quoted"] == "C" else ""
        if g["one"] is not None:
            return _SIMPLE.get(g["one"], "")
        return ""  # fonts, registers, sizes, \k, \z

    return _ESCAPE.sub(one, s)


def is_alias(source: str) -> bool:
    """Whether a page is only a ``.so`` redirect to another page."""
    for line in source.splitlines():
        line = strip_comment(line).strip()
        if not line or line == ".":
            continue
        return line.startswith(".so ") or line.startswith("'so ")
    return False


def _join_continuations(lines: list[str]) -> list[str]:
    """Lines ending in an odd number of backslashes continue on the next line."""
    out: list[str] = []
    buf = ""
    for line in lines:
        tail = len(line) - len(line.rstrip("\\"))
        if tail % 2 == 1:
            buf += line[:-1]
            continue
        out.append(buf + line)
        buf = ""
    if buf:
        out.append(buf)
    return out


class _Writer:
    """Text being built: sections (lists of lines), paragraphs filled into one line."""

    def __init__(self) -> None:
        self.sections: list[list[str]] = [[]]
        self.words: list[str] = []
        self.fill = True
        self.join_next = False
        self.translate: dict[int, str] = {}
        self.emitted = 0  # text pieces emitted so far (UR/UE: was there link text?)

    def text(self, s: str) -> None:
        s = s.translate(self.translate) if self.translate else s
        join = self.join_next
        self.join_next = s.endswith("\x01") and not s[:-1].endswith((" ", "\t"))
        s = s.replace("\x01", "")
        if not s.strip() and not self.fill:
            self.brk()
            self.sections[-1].append("")
            return
        self.emitted += 1
        if not self.fill:
            self.sections[-1].append(s.rstrip())
            return
        if not s.strip():
            self.para()
            return
        if s[0] in " \t":
            self.brk()  # an indented line starts a new output line, as in nroff
        if join and self.words:
            self.words[-1] += s.strip()
        else:
            self.words.append(" ".join(s.split()))

    def brk(self) -> None:
        if self.words:
            self.sections[-1].append(" ".join(w for w in self.words if w))
            self.words = []

    def para(self) -> None:
        self.brk()
        if self.sections[-1] and self.sections[-1][-1]:
            self.sections[-1].append("")

    def heading(self, title: str, new_section: bool) -> None:
        self.para()
        if new_section and any(line.strip() for line in self.sections[-1]):
            self.sections.append([])
        self.sections[-1].append(" ".join(title.split()))
        self.join_next = False

    def result(self) -> list[str]:
        self.brk()
        out = []
        for sec in self.sections:
            text = re.sub(r"\n{3,}", "\n\n", "\n".join(sec)).strip("\n")
            if text.strip():
                out.append(text)
        return out


class _Interpreter:
    """One page's state: strings, macros, conditions, tables, the output writer."""

    def __init__(self) -> None:
        self.w = _Writer()
        self.strings: dict[str, str] = {'L"': '"', 'R"': '"', "C+": "C++", "--": "--"}
        self.macros: dict[str, list[str]] = {}
        self.lines: list[str] = []
        self.pos = 0
        self.last_if = True
        self.pending_heading: str | None = None  # .SH/.SS without text: the next line
        self.tag_pending = False  # .TP: the next line is the item's tag
        self.expanded = 0
        self.mdoc_name = ""
        self.link = ""  # .UR target, printed at .UE when the link has no text
        self.function: list[str] | None = None  # mdoc .Fo: the name, then each .Fa
        self.requests: dict[str, Callable[[str, list[str]], None]] = {
            "SH": self._heading,
            "SS": self._heading,
            "Sh": self._heading,
            "Ss": self._heading,
            "TP": self._tp,
            "TQ": self._tp,
            "IP": self._ip,
            "It": self._ip,
            "ds": self._ds,
            "ds1": self._ds,
            "as": self._ds,
            "tr": self._tr,
            "if": self._if,
            "ie": self._if,
            "el": self._if,
            "de": self._de,
            "de1": self._de,
            "am": self._de,
            "TS": self._table,
            "nop": lambda _n, a: self._text_line(" ".join(a)),
        }

    # ------------------------------------------------------------------ driving

    def run(self, source: str) -> list[str]:
        self.lines = _join_continuations(source.replace("\r\n", "\n").split("\n"))
        self.pos = 0
        while self.pos < len(self.lines):
            line = self.lines[self.pos]
            self.pos += 1
            self.line(line)
        return self.w.result()

    def next_line(self) -> str | None:
        if self.pos >= len(self.lines):
            return None
        self.pos += 1
        return self.lines[self.pos - 1]

    def line(self, raw: str) -> None:
        line = strip_comment(raw)
        m = _CONTROL.match(line)
        if m is None:
            self._text_line(line)
            return
        name, rest = m.group("name"), m.group("rest")
        if "\\}" in name:  # "..\}", "br\}": the end of a conditional block
            name = name.split("\\}")[0]
        if not name or name == ".":
            return
        self.request(name, rest)

    def _text_line(self, line: str) -> None:
        self._emit(unescape(line.replace("\\{", "").replace("\\}", ""), self.strings))

    def request(self, name: str, rest: str) -> None:
        args = split_args(rest)
        if name in self.requests:
            self.requests[name](name, [rest] if name in _RAW_REST else args)
        elif name in _SKIPPED_BLOCKS:
            self._read_until(args[0] if name == "ig" and args else _SKIPPED_BLOCKS[name])
        elif name in self.macros:
            self._expand(self.macros[name], args)
        else:
            self._formatting(name, args)

    # ------------------------------------------------------------------ man and mdoc

    def _formatting(self, name: str, args: list[str]) -> None:
        w = self.w
        text = [unescape(a, self.strings) for a in args]
        if name in _NOFILL or (name == "Bd" and "-literal" in args):
            w.brk()
            w.fill = False
        elif name in _PARAS:
            w.para()
        elif name in _BREAKS:
            w.brk()
        elif name in _FILL or name == "Ed":
            w.brk()
            w.fill = True
        elif name in _MAN_WORDS and text:
            self._emit(" ".join(text))
        elif name in _MAN_ALTERNATING and text:
            self._emit("".join(text))
        elif name in ("UR", "MT"):
            self.w.emitted, self.link = 0, text[0] if text else ""
        elif name in ("UE", "ME"):
            self._emit(("" if self.w.emitted else self.link) + "".join(text))
        elif name in ("URL", "MTO") and text:
            self._emit((text[1] if len(text) > 1 and text[1] else text[0]) + "".join(text[2:]))
        elif name == "SY":
            w.para()
            self._emit(" ".join(text))
        elif name == "OP" and text:
            self._emit("[" + " ".join(text) + "]")
        else:
            self._mdoc(name, args, text)
        # everything else (TH, Dd, fonts, sizes, registers, IX, ...) adds no text

    def _mdoc(self, name: str, args: list[str], text: list[str]) -> None:
        """The mdoc macros that are lines of their own, then the inline ones."""
        w = self.w
        if self.function is not None and name in ("Fa", "Fc"):
            if name == "Fa":
                self.function.append(" ".join(text))
                return
            fname, *fargs = self.function
            self.function = None
            self._emit(f"{fname}({', '.join(fargs)});" + "".join(text))
        elif name == "Fo" and text:
            self.function = [text[0]]
        elif name in ("In", "Fd", "Ft", "D1", "Dl"):
            w.brk()
            line = mdoc_inline(args, self._text, self.mdoc_name)
            self._emit(f"#include <{line}>" if name == "In" else line)
            if name != "Ft":
                w.brk()
        elif name in ("Rv", "Ex") and "-std" in args:
            who = [a for a in text if a != "-std"] or [self.mdoc_name]
            if name == "Rv":
                self._emit(
                    f"The {', '.join(f + '()' for f in who)} function returns the value 0 if "
                    "successful; otherwise the value -1 is returned and the global variable "
                    "errno is set to indicate the error."
                )
            else:
                self._emit(
                    f"The {', '.join(who)} utility exits 0 on success, and >0 if an error occurs."
                )
        elif name == "Nm" and not self.mdoc_name and text:
            self.mdoc_name = text[0]
            self._emit(mdoc_inline(["Nm", *args], self._text, self.mdoc_name))
        elif name in MDOC_INLINE:
            self._emit(mdoc_inline([name, *args], self._text, self.mdoc_name))

    def _text(self, word: str) -> str:
        return unescape(word, self.strings)

    def _emit(self, text: str) -> None:
        """Text that a macro contributes, as a text line would."""
        if self.pending_heading is not None:
            kind, self.pending_heading = self.pending_heading, None
            self.w.heading(text, kind in ("SH", "Sh"))
            return
        self.w.text(text)
        if self.tag_pending:
            self.tag_pending = False
            self.w.brk()

    def _heading(self, name: str, args: list[str]) -> None:
        self.w.fill = True
        self.tag_pending = False
        if name in ("Sh", "Ss"):
            title = mdoc_inline(args, self._text, self.mdoc_name)
        else:
            title = " ".join(unescape(a, self.strings) for a in args)
        if title.strip():
            self.w.heading(title, name in ("SH", "Sh"))
        else:
            self.pending_heading = name

    def _tp(self, _name: str, _args: list[str]) -> None:
        self.w.para()
        self.tag_pending = True

    def _ip(self, name: str, args: list[str]) -> None:
        if name == "It":
            self.w.brk()
            tag = mdoc_inline(args, self._text, self.mdoc_name)
        else:
            self.w.para()
            tag = unescape(args[0], self.strings) if args else ""
        if tag.strip():
            self.w.text(tag)
            if name == "It" or not _INLINE_TAG.fullmatch(tag.strip()):
                self.w.brk()

    # ------------------------------------------------------------------ definitions

    def _ds(self, name: str, rest: list[str]) -> None:
        parts = rest[0].strip().split(None, 1) if rest else []
        if not parts:
            return
        value = parts[1] if len(parts) > 1 else ""
        value = unescape(value[1:] if value.startswith('"') else value, self.strings)
        key = parts[0]
        self.strings[key] = (self.strings.get(key, "") + value) if name == "as" else value

    def _tr(self, _name: str, args: list[str]) -> None:
        chars = unescape("".join(args), self.strings)
        for i in range(0, len(chars) - 1, 2):
            self.w.translate[ord(chars[i])] = chars[i + 1]

    def _de(self, name: str, args: list[str]) -> None:
        if not args:
            return
        body = self._read_until(args[1] if len(args) > 1 else ".")
        if name == "am":
            self.macros[args[0]] = self.macros.get(args[0], []) + body
        else:
            self.macros[args[0]] = body

    def _expand(self, body: list[str], args: list[str]) -> None:
        """Run a page-defined macro: its body, with ``\\$N``, ``\\$*``, ``\\$@``
        replaced and ``\\\\`` halved, is read next (so conditional blocks in it work)."""

        def arg(m: re.Match) -> str:
            k = m.group(1)
            if k in "*@":
                return " ".join(args)
            i = int(k) - 1
            return args[i] if i < len(args) else ""

        self.expanded += len(body)
        if self.expanded > _MAX_EXPANDED_LINES:
            return
        lines = [re.sub(r"\\\\\$([1-9*@])", arg, line).replace("\\\\", "\\") for line in body]
        self.lines[self.pos : self.pos] = lines

    def _read_until(self, end: str) -> list[str]:
        """The lines up to the control line named ``end`` (``"."``: ``..``), which is
        consumed."""
        body = []
        while (line := self.next_line()) is not None:
            m = _CONTROL.match(line)
            if m is not None and m.group("name") == end:
                break
            body.append(line)
        return body

    # ------------------------------------------------------------------ conditions

    def _if(self, name: str, rest: list[str]) -> None:
        body = rest[0].lstrip() if rest else ""
        if name == "el":
            ok = not self.last_if
        else:
            ok, body = _condition(body, self.strings)
            if name == "ie":
                self.last_if = ok
        if ok:
            body = body.lstrip()
            if body.startswith("\\{"):
                body = body[2:].lstrip()
            if body.strip():
                self.line(body)
            return
        depth = body.count("\\{") - body.count("\\}")
        while depth > 0 and (line := self.next_line()) is not None:
            depth += line.count("\\{") - line.count("\\}")

    # ------------------------------------------------------------------ tables

    def _table(self, _name: str, _args: list[str]) -> None:
        """``.TS`` ... ``.TE``: options and layout lines dropped, one line per row."""
        self.w.brk()
        rows: list[str] = []
        tab = "\t"
        layout = True
        cells: list[str] = []
        block: list[str] | None = None
        while (line := self.next_line()) is not None:
            stripped = strip_comment(line).rstrip()
            if stripped.startswith(".TE"):
                break
            if stripped.startswith(".T&"):
                layout = True
                continue
            if layout:
                m = re.search(r"tab\s*\((.)\)", stripped)
                tab = m.group(1) if m and stripped.endswith(";") else tab
                layout = not stripped.endswith(".") or stripped.endswith(";")
                continue
            if block is not None:
                if stripped.startswith("T}"):
                    cells.append(" ".join(block))
                    block = None
                    stripped = stripped[2:].lstrip(tab)
                    if not stripped:
                        rows.append("  ".join(c for c in cells if c))
                        cells = []
                        continue
                else:
                    if not stripped.startswith((".", "'")):
                        block.append(unescape(stripped, self.strings).strip())
                    continue
            if stripped in ("_", "=") or stripped.startswith((".", "'")):
                continue
            for cell in stripped.split(tab):
                if cell.strip() == "T{":
                    block = []
                else:
                    cells.append(unescape(cell, self.strings).strip())
            if block is None:
                rows.append("  ".join(c for c in cells if c and c not in ("_", "=")))
                cells = []
        self.w.para()
        for row in rows:
            if row.strip():
                self.w.sections[-1].append(row)
        self.w.para()


def _condition(body: str, strings: dict[str, str]) -> tuple[bool, str]:
    """(value, the rest after the condition) of an ``.if`` / ``.ie`` condition."""
    neg = body.startswith("!")
    s = body[1:] if neg else body
    m = re.match(r"([ntoe])(?=[\s\\]|$)", s)
    if m:
        value, rest = m.group(1) == "n", s[1:]
    elif re.match(r"\\n(\(\.g|\[\.g\])", s):
        m2 = re.match(r"\\n(?:\(\.g|\[\.g\])(\S*)", s)
        value, rest = (m2 is not None and m2.group(1) in ("", ">0")), s[m2.end() if m2 else 0 :]
    elif s[:1] in "'\"/" and s[:1]:
        q = s[0]
        parts = s[1:].split(q, 2)
        if len(parts) == 3:
            value = unescape(parts[0], strings) == unescape(parts[1], strings)
            rest = parts[2]
        else:
            value, rest = False, ""
    else:  # numeric expressions, registers, `d`/`r`/`c` tests: unknown, taken false
        parts = s.split(None, 1)
        value, rest = False, parts[1] if len(parts) > 1 else ""
        if parts and "\\{" in parts[0]:
            rest = parts[0][parts[0].index("\\{") :] + (" " + rest if rest else "")
    return (not value) if neg else value, rest


def roff_sections(source: str) -> list[str]:
    """Plain text of a page, one string per ``.SH``/``.Sh`` section (its heading first)."""
    return _Interpreter().run(source)


def roff_to_text(source: str) -> str:
    """Plain text of a page: sections separated by blank lines."""
    return "\n\n".join(roff_sections(source))
