"""The built-in stdlib corpus: domains, docstring split, chunking, determinism."""

from __future__ import annotations

import hashlib
import itertools
import json
import os

from megablocks_ablate.corpora import stdlib as sc

SOURCE = '''"""Module doc."""

import os


class A:
    """Class doc,
    on two lines."""

    def f(self):
        """Method doc."""
        return 1


def g():
    return 2
'''


def test_split_source_moves_docstrings_out():
    code, docs = sc.split_source(SOURCE)
    assert docs == [("", "Module doc."), ("A", "Class doc,\non two lines."), ("A.f", "Method doc.")]
    assert '"""' not in code and "return 1" in code and "def g():" in code
    assert sc.split_source("print 'py2'\n") == ("print 'py2'\n", [])  # unparsable: verbatim


def test_chunks_bound_and_keep_text():
    text = "\n".join(f"def f{i}():\n    return {i}\n" for i in range(200))
    parts = sc.chunks(text, max_chars=300)
    assert all(len(p) <= 300 for p in parts) and len(parts) > 10
    assert "".join(parts).replace("\n", "") == text.replace("\n", "")
    assert all(len(p) <= 50 for p in sc.chunks("x" * 120, max_chars=50))  # hard cut


def test_test_files_go_to_their_family():
    j = os.path.join
    assert sc.test_domain(j("test", "test_asyncio", "test_tasks.py")) == "concurrency"
    assert sc.test_domain(j("test", "test_urllib2_localnet.py")) == "networking"
    assert sc.test_domain(j("test", "test_json", "test_dump.py")) == "formats"
    assert sc.test_domain(j("test", "support", "__init__.py")) == "testing"
    assert sc.test_domain(j("test", "test_grammar.py")) is None  # stays in the seed
    assert sc.test_domain(j("email", "parser.py")) is None


def _digest(docs) -> str:
    return hashlib.sha256("".join(json.dumps(d, sort_keys=True) for d in docs).encode()).hexdigest()


def test_domains_documents_and_determinism(tmp_path):
    assert sc.DOMAINS == (
        "docs",
        "networking",
        "concurrency",
        "formats",
        "testing",
        "gui",
        "tooling",
        "core",
    )
    docs = list(sc.iter_documents(["concurrency"]))
    assert _digest(docs) == _digest(sc.iter_documents(["concurrency"]))  # same on every run
    assert {d["domain"] for d in docs} == {"concurrency"}
    assert [d["order"] for d in docs] == list(range(len(docs)))
    assert len({d["id"] for d in docs}) == len(docs)
    sources = {d["source"].split(os.sep)[0] for d in docs}
    assert {"asyncio", "concurrent", "multiprocessing", "threading.py", "test"} <= sources
    assert all(0 < len(d["text"]) <= sc.MAX_CHARS for d in docs)
    # docs domain starts with the pydoc reference topics (prose)
    first = list(itertools.islice(sc.iter_documents(["docs"]), 3))
    assert all(d["source"].startswith("pydoc_data/") for d in first)
    sizes = sc.corpus_sizes(["concurrency"])
    assert sizes["concurrency"]["documents"] == len(docs)
    assert sizes["concurrency"]["chars"] == sum(len(d["text"]) for d in docs) > 1_000_000


def test_write_corpus_jsonl(tmp_path):
    path = tmp_path / "c.jsonl"
    counts = sc.write_corpus(str(path), ["formats"], max_chars=20_000)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert counts == {"formats": len(lines)}
    doc = json.loads(lines[0])
    assert set(doc) == {"id", "text", "domain", "order", "source"} and doc["domain"] == "formats"


def test_seed_and_ood_split_is_disjoint_by_file_and_deterministic(tmp_path):
    """The stdlib demo's out-of-domain set: whole files of the seed domain, never in the
    seed corpus, the same on every run, about OOD_MAX_CHARS of text."""
    counts = sc.write_seed_and_ood(str(tmp_path / "seed.jsonl"), str(tmp_path / "ood.jsonl"))
    seed = [json.loads(line) for line in open(tmp_path / "seed.jsonl", encoding="utf-8")]
    ood = [json.loads(line) for line in open(tmp_path / "ood.jsonl", encoding="utf-8")]
    assert counts == {"seed": len(seed), "ood": len(ood)} and len(ood) > 0
    assert {d["domain"] for d in ood} == {sc.OOD_SET} and {d["domain"] for d in seed} == {
        sc.SEED_DOMAIN
    }
    assert not {d["source"] for d in seed} & {d["source"] for d in ood}
    # together they are the seed domain, nothing lost or added
    everything = list(sc.iter_documents([sc.SEED_DOMAIN]))
    assert len(seed) + len(ood) == len(everything)
    chars = sum(len(d["text"]) for d in ood)
    assert chars >= sc.OOD_MAX_CHARS / 2 and chars < sc.OOD_MAX_CHARS + 10 * sc.MAX_CHARS
    again = tmp_path / "again"
    again.mkdir()
    sc.write_seed_and_ood(str(again / "seed.jsonl"), str(again / "ood.jsonl"))
    assert (again / "ood.jsonl").read_bytes() == (tmp_path / "ood.jsonl").read_bytes()
