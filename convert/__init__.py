"""Checkpoint formats (installed as `mixtral_convert`): key tables, permutations, safetensors I/O,
conversion to project checkpoints and export back.

Nothing here imports torch; only reading pickled `.pth`/`.bin` files (an explicit opt-in) does.
"""

from .convert import convert, export, info, write_folder
from .errors import CheckpointError
from .safetensors_io import SafetensorsFile, write_safetensors
from .sources import detect_format, iter_params, open_source

__all__ = ["CheckpointError", "SafetensorsFile", "convert", "detect_format", "export", "info",
           "iter_params", "open_source", "write_folder", "write_safetensors"]
