"""medseg: 2D and 3D medical image segmentation with exact geometry.

Importing medseg is cheap (no torch) and has no side effects.
"""

from medseg._version import __version__
from medseg.config import Config, load_config
from medseg.errors import ConfigError, DataError, MedsegError
from medseg.io import describe_volume, load_volume, save_label_map, save_volume
from medseg.types import Volume

__all__ = [
    "__version__",
    "Config",
    "ConfigError",
    "DataError",
    "MedsegError",
    "Volume",
    "describe_volume",
    "load_config",
    "load_volume",
    "save_label_map",
    "save_volume",
]
