"""vidret: parameter-efficient text-video retrieval over one frozen CLIP backbone."""

from __future__ import annotations

__version__ = "0.1.0"
