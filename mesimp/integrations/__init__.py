"""Integrations with other libraries' training tools, each an optional extra.

``mesimp.integrations.transformers``: meProp, meSimp and shrink inside the Hugging Face
``Trainer`` (``pip install mesimp[hf]``). Nothing here is imported by ``import mesimp``:
import the submodule you use.
"""
