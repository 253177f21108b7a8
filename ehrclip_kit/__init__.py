"""ehrclip_kit: multimodal contrastive pretraining on health records, notebook-first.

The library is thin on purpose: notebooks and the ``ehrclip`` command call into it.
"""

__version__ = "0.1.0"
