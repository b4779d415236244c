"""Vision-language support: media rows (media.py), the toy VLM and its visual domains (toy.py), multimodal
prompts for the engine and trainer-side log-probs with pixel inputs (inputs.py, logprobs.py). See docs/vision.md.

Importing this package is cheap; it makes a CUDA-built torchvision importable next to CPU torch
(torchvision_ops.py) before any processor import can need it."""
from posttrain.vl.torchvision_ops import install_import_hook

install_import_hook()
