"""A dask.distributed cluster of separate processes on 127.0.0.1, for the DaskRunner test and
`benchmarks/bench_distributed.py`.

One `dask scheduler` process and N `dask worker` processes (`--nthreads 1 --no-nanny`, so each
worker is the process it names), started as `python -m distributed.cli.dask_...` with this
Python, as one would on separate machines; the scheduler's address comes from its scheduler
file. The workers inherit the environment at start (HF_HUB_OFFLINE, the AWS_* variables of an
s3:// root, PYTHONPATH), as remote workers need it set on their machines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


class LocalDaskCluster:
    """`with LocalDaskCluster(2) as cluster:` -> `cluster.address`, `cluster.client()`."""

    def __init__(self, workers: int, *, env: dict[str, str] | None = None,
                 folder: Path | None = None, start_timeout: float = 120.0) -> None:
        self.workers = workers
        path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "PYTHONPATH": os.pathsep.join([*path, str(REPO)]),  # tests.dask_cluster
                    **(env or {})}
        self.folder = Path(folder or tempfile.mkdtemp(prefix="twinq-dask-"))
        self.folder.mkdir(parents=True, exist_ok=True)
        self.start_timeout = start_timeout
        self.address = ""
        self._procs: list[subprocess.Popen] = []
        self._client: Any = None

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.folder / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        self._procs.append(subprocess.Popen([sys.executable, "-m", *args], env=self.env,
                                            stdout=log, stderr=subprocess.STDOUT))
        log.close()

    def start(self) -> LocalDaskCluster:
        scheduler_file = self.folder / "scheduler.json"
        scheduler_file.unlink(missing_ok=True)
        self._spawn("scheduler", ["distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                  "--port", "0", "--dashboard-address", ":0", "--no-show",
                                  "--scheduler-file", str(scheduler_file)])
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                self.address = json.loads(scheduler_file.read_text())["address"]
                break
            except (OSError, ValueError, KeyError):
                self._check_alive()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no scheduler file after {self.start_timeout:.0f}s:\n"
                                       + self.log_tail("scheduler")) from None
                time.sleep(0.1)
        for i in range(self.workers):
            self._spawn(f"worker-{i}", ["distributed.cli.dask_worker", self.address,
                                        "--nthreads", "1", "--nworkers", "1", "--no-nanny",
                                        "--host", "127.0.0.1", "--dashboard-address", ":0",
                                        "--name", f"worker-{i}"])
        try:
            self.client().wait_for_workers(self.workers,
                                           timeout=max(1.0, deadline - time.monotonic()))
        except Exception:
            logs = "\n".join(self.log_tail(f"worker-{i}") for i in range(self.workers))
            self.stop()
            raise RuntimeError(f"{self.workers} dask workers did not register:\n{logs}") from None
        return self

    def _check_alive(self) -> None:
        for proc in self._procs:
            if proc.poll() is not None:
                raise RuntimeError(f"a dask process exited ({proc.returncode}):\n"
                                   + self.log_tail("scheduler"))

    def client(self) -> Any:
        """This test's own client of the scheduler (not the build's), made once."""
        if self._client is None:
            from distributed import Client

            self._client = Client(self.address, timeout=30)
        return self._client

    def worker_addresses(self) -> list[str]:
        return sorted(self.client().scheduler_info(n_workers=-1)["workers"])

    def log_tail(self, name: str, lines: int = 30) -> str:
        try:
            text = (self.folder / f"{name}.log").read_text(errors="replace")
        except OSError:
            return f"({name}: no log)"
        return f"--- {name}\n" + "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        for proc in reversed(self._procs):  # workers first, then the scheduler
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()

    def __enter__(self) -> LocalDaskCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# ------------------------------------------------------------- which worker did the work

_TALLY: dict[str, int] = {}
_EMBED_COST_S = [0.0]


def _install_work_tally(embed_cost_s: float = 0.0) -> str:
    """Run in each worker (`client.run`): count, in this process, the texts the build embeds
    (`EmbedHandler.run_inference`) and the shards it writes (`store_shard_records`), by wrapping
    both where the build's code looks them up. With `embed_cost_s`, each embedding batch also
    takes that long (see `install_work_tally`). Returns the worker's pid."""
    import functools
    import threading
    import time

    from twinq.pipelines import index_transforms
    from twinq.pipelines.embed_handler import EmbedHandler

    lock = threading.Lock()

    def add(name: str, n: int) -> None:
        with lock:
            _TALLY[name] = _TALLY.get(name, 0) + n

    if not getattr(EmbedHandler.run_inference, "_tallied", False):
        embed = EmbedHandler.run_inference

        @functools.wraps(embed)
        def run_inference(self, batch, model, inference_args=None):  # noqa: ANN001, ANN202
            add("texts_embedded", len(batch))
            time.sleep(_EMBED_COST_S[0])
            return embed(self, batch, model, inference_args)

        run_inference._tallied = True  # type: ignore[attr-defined]
        EmbedHandler.run_inference = run_inference
    if not getattr(index_transforms.store_shard_records, "_tallied", False):
        store = index_transforms.store_shard_records

        @functools.wraps(store)
        def store_shard_records(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            entry = store(*args, **kwargs)
            add("shards_written", 1)
            add("rows_written", entry["rows"])
            return entry

        store_shard_records._tallied = True  # type: ignore[attr-defined]
        index_transforms.store_shard_records = store_shard_records
    _TALLY.clear()
    _EMBED_COST_S[0] = embed_cost_s
    return str(os.getpid())


def _read_work_tally() -> dict[str, int]:
    return dict(_TALLY)


def install_work_tally(client: Any, *, embed_cost_s: float = 0.0) -> dict[str, str]:
    """Start counting each worker's share of the build (see `_install_work_tally`); returns
    {worker address: pid}.

    `embed_cost_s` gives each embedding batch the cost of a real model. A tiny test model embeds
    a batch in a millisecond, and Dask rightly runs such tasks where their input already is (on
    one worker: moving data costs more than the work); with tasks that take time, the scheduler
    has a reason to use the idle worker, as it does with the real model in
    `benchmarks/bench_distributed.py`."""
    return client.run(_install_work_tally, embed_cost_s)


def read_work_tally(client: Any) -> dict[str, dict[str, int]]:
    """{worker address: {"texts_embedded": n, "shards_written": n, "rows_written": n}}."""
    return client.run(_read_work_tally)


def _import(modules: list[str]) -> None:
    import importlib

    for name in modules:
        importlib.import_module(name)


def warm_imports(client: Any, modules: list[str], timeout_s: float = 300.0) -> None:
    """Import `modules` in every worker, and wait until each has. A first build would
    otherwise wait on Beam's and torch's imports in each worker; and a worker still importing
    when the build starts is busy, so the scheduler gave every task to the other one (a CI run
    of the spread test, session 12: 120 texts on one worker, none on the other)."""
    from distributed import wait

    futures = [client.submit(_import, modules, workers=[worker], pure=False,
                             allow_other_workers=False)
               for worker in client.scheduler_info(n_workers=-1)["workers"]]
    wait(futures, timeout=timeout_s)
    client.gather(futures)  # an import that failed raises here
