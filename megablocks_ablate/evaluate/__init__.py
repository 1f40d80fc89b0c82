"""Perplexity evaluation over many domains (paper §3: the proxy scores of a study).

* :mod:`.sets` -- evaluation domains from JSONL files or preprocess held-out text,
  tokenized once per tokenizer and cached (:class:`EvalSuite`);
* :mod:`.windows` -- what is predicted, scoring windows, length-bucketed batches;
* :mod:`.perplexity` -- :func:`evaluate`: per-domain perplexity and bits per byte,
  sharded over ``torch.distributed`` ranks;
* :mod:`.dist` -- rank/world of a group and collectives' device (the process group
  itself comes from :func:`megablocks_ablate.train.distributed.init_distributed`);
* :mod:`.checkpoint` -- models from checkpoint directories, with a tokenizer check.
"""

from megablocks_ablate.evaluate.perplexity import DomainResult, evaluate, results_table
from megablocks_ablate.evaluate.sets import EvalSet, EvalSuite, resolve_sources

__all__ = ["DomainResult", "EvalSet", "EvalSuite", "evaluate", "resolve_sources", "results_table"]
