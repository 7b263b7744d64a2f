"""twinq's common library: config, models, the snapshot format, search, rerank and protocol.

`pipelines` and `worker` import this package; it imports neither of them.
"""

from __future__ import annotations

__version__ = "0.1.0"
