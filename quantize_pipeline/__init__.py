"""quantize-pipeline: recipe -> quantized, verified, gated, vLLM-ready checkpoint.

Importing this package is cheap on purpose: torch, Quark, vLLM and lm-eval are
imported only inside the stages that need them (in child processes).
"""

__version__ = "0.1.0"

from quantize_pipeline.quantize import quark_import as _quark_import

_quark_import.install()  # a finder for one Quark module; imports nothing heavy (quantize_pipeline/quantize/quark_import.py says why)
