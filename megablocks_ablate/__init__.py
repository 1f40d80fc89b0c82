"""megablocks-ablate: data-ablation studies by modular training and merging.

Implements Na et al. 2024, "Scalable Data Ablation Approximations for Language
Models through Modular Training and Merging": one unit model per equal-size base
unit of a corpus, all continued from one seed checkpoint; any mixture of units is
scored by evaluating the weighted parameter average of its unit models.
"""

__version__ = "0.1.0"
