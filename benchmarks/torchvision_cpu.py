"""Moved to ``mesimp.integrations.torchvision_cpu`` (the Hugging Face integration needs it
at run time: ``import transformers`` imports torchvision); this path stays for the
benchmarks and tests that import it."""

from mesimp.integrations.torchvision_cpu import load

__all__ = ["load"]
