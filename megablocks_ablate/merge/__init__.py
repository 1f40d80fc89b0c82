"""Merging unit models: weighted parameter averages (Na et al. 2024).

* :mod:`.kernels` -- ``merge_into(out, inputs, weights)``, the one dispatch over the
  C++ / CUDA / Triton / PyTorch-reference kernels.
* :mod:`.spec` -- merge specs (uniform, weights, by tokens, macro, micro, trees) reduced
  to one weight vector over unit models.
* :mod:`.file_merge` -- streaming checkpoint-to-checkpoint merge (``megablocks-ablate merge``).
* :mod:`.pool` -- :class:`ModelPool`, N unit models in one ``[N, P]`` buffer for
  merge-eval batches.
"""
