"""A real worker process that dies by SIGKILL at a chosen point of its Nth batch.

    python -m tests.reliability.fault_worker POINT N WORKER_ID      (settings from TWINQ_*)

POINT is where the process kills itself in batch N:
    before_reply   the batch is answered, no reply is written yet
    before_ack     every reply is written (LPUSH + done marker), nothing is acknowledged
    hold           it never dies itself: each batch writes its number to $TWINQ_FAULT_MARKER
                   and sleeps $TWINQ_FAULT_HOLD_S, so a test can SIGKILL it mid-batch
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from twinq.shared.config import load_settings
from twinq.worker.cli import serve
from twinq.worker.consumer import Consumer, Entry

POINTS = ("before_reply", "before_ack", "hold")


def main(point: str, batch_no: int, worker_id: str) -> int:
    if point not in POINTS:
        raise SystemExit(f"POINT must be one of {POINTS}")
    marker = os.environ.get("TWINQ_FAULT_MARKER", "")
    hold_s = float(os.environ.get("TWINQ_FAULT_HOLD_S", "0.5"))

    class FaultyConsumer(Consumer):
        batches = 0

        def _die(self, where: str) -> None:
            if point == where and self.batches == batch_no:
                self.log.warning("fault injection: SIGKILL %s in batch %d", where, batch_no)
                logging.shutdown()
                os.kill(os.getpid(), signal.SIGKILL)

        def _handle(self, batch: list[Entry]) -> None:
            self.batches += 1
            if point == "hold" and marker:
                Path(marker).write_text(str(self.batches))
                time.sleep(hold_s)
            super()._handle(batch)

        def _write_replies(self, replies: list[tuple[str, str, dict[str, Any]]]) -> Any:
            self._die("before_reply")
            return super()._write_replies(replies)

        def _ack(self, ids: list[str]) -> None:
            self._die("before_ack")
            super()._ack(ids)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return serve(load_settings(), worker_id=worker_id, consumer_cls=FaultyConsumer)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
