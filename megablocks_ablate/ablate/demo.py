"""The built-in demo: the pipeline that exists today, end to end, on CPU, in seconds.

1. write a synthetic corpus (4 fields of study, years 1990-2022) and a separate
   evaluation set that shares a few paragraphs with the corpus;
2. train a SentencePiece tokenizer on it;
3. preprocess: partitions by field of study, base units ordered by year, held-out
   split, decontamination against the evaluation set;
4. pack a mixture of two partitions with the paper's equal-partition weights into
   training samples and read a global batch split over 2 data-parallel ranks.

Training unit models, merging and evaluating mixtures join the demo as those parts
land (see the project's issues).
"""

from __future__ import annotations

import json
import os
import time

from megablocks_ablate.data.synthetic import iter_documents, write_corpus

DEMO_DOCS = 4000
DEMO_VOCAB = 1024
DEMO_UNIT_TOKENS = 40_000
DEMO_SEQ_LEN = 256


def _write_eval_set(path: str, corpus: str, n_shared: int = 5) -> None:
    """An evaluation set: fresh documents plus a few paragraphs copied from the corpus."""
    with open(corpus, encoding="utf-8") as f:
        leaked = [json.loads(next(f))["text"].split("\n\n")[0] for _ in range(n_shared)]
    with open(path, "w", encoding="utf-8") as out:
        for d in iter_documents(200, seed=99):
            out.write(json.dumps({"text": d["text"]}) + "\n")
        for text in leaked:
            out.write(json.dumps({"text": text}) + "\n")


def run_demo(out: str, workers: int = 2) -> int:
    from megablocks_ablate.data.manifest import Manifest
    from megablocks_ablate.data.mixture import MixtureDataset, partition_balanced_weights
    from megablocks_ablate.data.preprocess import PreprocessConfig, run_preprocess
    from megablocks_ablate.data.tokenizer import load_tokenizer, train_sentencepiece

    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    corpus = os.path.join(out, "corpus.jsonl")
    eval_set = os.path.join(out, "eval", "paloma_like.jsonl")
    if not os.path.exists(corpus):
        write_corpus(corpus, n_docs=DEMO_DOCS, seed=0)
    os.makedirs(os.path.dirname(eval_set), exist_ok=True)
    _write_eval_set(eval_set, corpus)
    print(f"[1/4] corpus: {corpus} ({DEMO_DOCS} documents, 4 fields of study)")

    tok_path = os.path.join(out, "tokenizer.model")
    if not os.path.exists(tok_path):
        train_sentencepiece([corpus], tok_path[: -len(".model")], vocab_size=DEMO_VOCAB,
                            num_threads=2)
    tok = load_tokenizer(tok_path)
    print(f"[2/4] tokenizer: {tok_path} (vocab {tok.vocab_size}, "
          f"fingerprint {tok.fingerprint[:12]})")

    cfg = PreprocessConfig.from_dict(dict(
        input=[corpus], out=os.path.join(out, "data"), tokenizer=tok_path,
        partition_by=["fos"], order_by="year", unit_tokens=DEMO_UNIT_TOKENS,
        heldout_fraction=0.02, eval=[eval_set], workers=workers))
    m = run_preprocess(cfg, log=lambda msg: print("      " + msg))
    t = m.data["totals"]
    print(f"[3/4] preprocess: {len(m.partitions)} partitions, {len(m.units)} base units of "
          f"~{DEMO_UNIT_TOKENS:,} tokens; {t['documents_heldout']} held out, "
          f"{t['documents_contaminated']} contaminated documents dropped")
    for part, units in m.partition_units().items():
        first, last = m.units[units[0]], m.units[units[-1]]
        print(f"      {part:<10} {len(units)} units, years {first['order_first']}-"
              f"{last['order_last']}")

    parts = m.partition_units()
    chosen = dict(list(parts.items())[:2])
    chosen[list(chosen)[1]] = chosen[list(chosen)[1]][:1]  # uneven on purpose
    weights = partition_balanced_weights(chosen)
    mix = MixtureDataset({u: m.unit_prefix(u) for u in weights}, weights=weights,
                         seq_len=DEMO_SEQ_LEN, cache_dir=os.path.join(out, "data", "cache"))
    counts = dict(zip(weights, (int(c) for c in mix.counts)))
    batch = next(iter(mix.batches(global_batch=8, dp_rank=0, dp_world=2)))
    print(f"[4/4] mixture of {list(chosen)} with equal-partition weights "
          f"{ {u: round(w, 3) for u, w in weights.items()} }")
    print(f"      {len(mix)} samples of {DEMO_SEQ_LEN + 1} tokens, per unit {counts}; "
          f"rank 0 of 2 gets a batch of shape {tuple(batch.shape)}")
    print(f"demo finished in {time.time() - t0:.1f} s; outputs in {out}/ "
          "(training, merging and the study report are not built yet)")
    return 0
