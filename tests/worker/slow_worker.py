"""A real worker process for the fault tests, whose batches take `HOLD_S` seconds.

    python -m tests.worker.slow_worker MARKER HOLD_S WORKER_ID [EMBEDDED_PORT]
                                                       (settings from TWINQ_*)

When a batch is in flight it writes its size to MARKER, so a test knows when to kill it.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from twinq.shared.config import load_settings
from twinq.worker.cli import serve
from twinq.worker.consumer import Consumer, Entry
from twinq.worker.embedded_redis import DEFAULT_PORT


def main(marker: str, hold_s: float, worker_id: str, embedded_port: int) -> int:
    class HeldConsumer(Consumer):
        def _handle(self, batch: list[Entry]) -> None:
            Path(marker).write_text(str(len(batch)))
            time.sleep(hold_s)
            super()._handle(batch)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return serve(load_settings(), worker_id=worker_id, consumer_cls=HeldConsumer,
                 embedded_port=embedded_port)


if __name__ == "__main__":
    port = int(sys.argv[4]) if len(sys.argv) > 4 else DEFAULT_PORT
    sys.exit(main(sys.argv[1], float(sys.argv[2]), sys.argv[3], port))
