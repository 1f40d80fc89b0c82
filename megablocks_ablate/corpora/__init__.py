"""Built-in demo corpora, written as JSONL that a study preprocesses like a user's own:
the Python standard library (:mod:`.stdlib`), the system's manual pages (:mod:`.manpages`,
converted from roff by :mod:`.roff`) and a seeded synthetic corpus (:mod:`.synthetic`) for
tests and benchmarks. The data pipeline (:mod:`megablocks_ablate.data`) never imports them."""
