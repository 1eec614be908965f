# SPDX-License-Identifier: Apache-2.0
"""Batch inference on a Dask ``distributed`` cluster: the :mod:`attncore.batch` pipeline with
the model calls farmed out to workers.

    from attncore import distributed
    with distributed.local_client(n_workers=2) as client:
        for line, text in distributed.translate_lines(client, "model_dir", lines):
            ...

or from the command line: ``attncore translate --input big.txt --dask local:2`` (two local
worker processes) or ``--dask tcp://scheduler:8786`` (an existing cluster).

Why Dask ``distributed`` rather than Ray: both install from the package index, but
``distributed`` is pure Python (tornado, msgpack, cloudpickle; a few MB), starts an in-process
cluster (``processes=False``) or local worker processes in about a second on a small machine,
talks to an existing scheduler by address, and runs on HPC batch schedulers and Kubernetes
through ``dask-jobqueue`` / ``dask-kubernetes``. Ray ships an ~80 MB binary wheel and starts its
own object store, GCS and raylet services even for a local run, which costs more than the
inference itself for the file sizes this serves on a 2-core machine. Ray actors would be the
natural "load the model once" unit; on Dask the same property comes from a per-process cache.

How the work is split
---------------------
* The client reads lines lazily, tokenizes them with the model's tokenizer only
  (:meth:`attncore.batch.Frontend.from_path` reads ``config.json`` and the vocabularies, never
  the weights), groups them into batches (:func:`attncore.batch.plan_batches` rules: a bounded
  window sorted by length, row and token budgets), submits a window's batches, and writes the
  results back in input order. The client's memory is bounded by the window.
* A worker runs ``job.run_items(model, batch)``. The model is loaded **once per worker process**
  by :func:`cached_model`, keyed by the directory's real path and the modification times of
  its files (a rewritten model directory is reloaded). Workers must see the model directory at
  the same path (a shared file system, or a copy at that path on each machine).
* Threads: each batch runs under ``attncore.num_threads(kernel_threads)``. ``local:N``
  starts N worker processes with one task slot each and ``max(1, T // N)`` kernel threads,
  where T is :func:`attncore.get_num_threads` (``OMP_NUM_THREADS`` or the usable cores): N x
  (T / N) = T, no oversubscription while N <= T (more workers than cores run one thread each).
  On an existing cluster the default is the worker's usable CPUs divided by its task slots
  (``nthreads``).
* Errors keep the :mod:`attncore.batch` promise: a malformed line or a line the model refuses
  stops the run after every earlier line has been delivered, and names the line. What is not
  a line's fault raises :class:`ClusterError` (after the same earlier lines): a worker that
  cannot load the model, workers lost (``KilledWorker``), a lost scheduler, or no worker at
  all for :data:`NO_WORKER_TIMEOUT` seconds (Dask would queue the batches forever).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import signal
import threading
import time
from typing import Iterable, Iterator, Optional, Union

from . import batch as _batch
from .kernels.threads import _check_count, get_num_threads

__all__ = ["cached_model", "load_count", "local_client", "connect", "run_on_dask",
           "translate_lines", "available", "ClusterError", "NO_WORKER_TIMEOUT"]

#: Seconds a run waits while the cluster has no worker (none joined yet, or the last one was
#: lost) before it raises ClusterError.
NO_WORKER_TIMEOUT = 60.0

# how often a waiting client looks at the worker count
_POLL_SECONDS = 1.0


class ClusterError(RuntimeError):
    """The Dask cluster failed a run for a reason that is no input line's: a worker could not
    load the model, workers or the scheduler were lost, or no worker came."""

_models: dict = {}
_loads: dict = {}
_lock = threading.Lock()


def available() -> bool:
    """Whether the ``distributed`` package is installed."""
    import importlib.util
    return importlib.util.find_spec("distributed") is not None


def _require():
    try:
        import distributed
    except ImportError:
        raise ImportError("Dask distributed is not installed: pip install 'attncore[dask]' "
                          "(or pip install distributed)") from None
    return distributed


# -------------------------------------------------------------------------------- worker side
def _model_key(path) -> tuple:
    real = os.path.realpath(path)
    stamps = []
    for name in ("config.json", "model.safetensors"):
        try:
            # (the change time and inode too: `cp -p`, `rsync -a` or `tar` keep a rewritten
            # file's modification time, and a worker kept serving the old weights)
            st = os.stat(os.path.join(real, name))
            stamps.append((st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_size))
        except OSError:
            stamps.append(None)
    return (real, *stamps)


def cached_model(path, weight_dtype: str = "float32"):
    """The engine model of directory ``path`` (loaded with ``weight_dtype``), loaded once per
    process and then shared.

    Keyed by the real path, the modification and change times, inodes and sizes of
    ``config.json`` and ``model.safetensors``, and ``weight_dtype``. Engine models are
    immutable and thread-safe, so the threads of a worker share one copy. A directory
    rewritten since replaces its earlier version (of the same ``weight_dtype``): a long-lived
    worker kept every version.
    """
    from .models import load

    key = (*_model_key(path), weight_dtype)
    with _lock:  # one load even when a worker's threads ask at the same time
        model = _models.get(key)
        if model is None:
            model = load(path, weight_dtype=weight_dtype)
            for stale in [k for k in _models if k[0] == key[0] and k[-1] == weight_dtype]:
                del _models[stale]
            _models[key] = model
            _loads[key[0]] = _loads.get(key[0], 0) + 1
    return model


def load_count(path=None):
    """How often this process loaded models: for ``path``, or a dict by real path."""
    with _lock:
        if path is None:
            return dict(_loads)
        return _loads.get(os.path.realpath(path), 0)


def _worker_kernel_threads() -> int:
    from .kernels.threads import MAX_THREADS, available_cpus
    cpus = available_cpus()
    slots = 1
    try:
        from distributed import get_worker
        worker = get_worker()
        slots = getattr(getattr(worker, "state", worker), "nthreads", None) or worker.nthreads
    except (ImportError, ValueError, AttributeError):
        pass
    return min(max(1, cpus // max(1, int(slots))), MAX_THREADS)


def _run_batch(model_path: str, job, batch, kernel_threads: Optional[int],
               weight_dtype: str = "float32"):
    """A worker task: one batch (a list of :class:`attncore.batch.Item`) through ``job`` on
    the cached model."""
    from .kernels import num_threads

    try:
        model = cached_model(model_path, weight_dtype)
    except Exception as exc:   # (a ValueError would read as the batch's lines being refused)
        message = str(exc) or type(exc).__name__
        raise ClusterError(f"a Dask worker could not load the model {model_path!r}: "
                           f"{message}") from None
    with num_threads(kernel_threads or _worker_kernel_threads()):
        return job.run_items(model, batch)


# -------------------------------------------------------------------------------- client side
@contextlib.contextmanager
def local_client(n_workers: int = 2, *, processes: bool = True, kernel_threads: Optional[int] = None):
    """A Dask client on a local cluster, closed on exit (its dashboard, when bokeh is
    installed, listens on a free port of 127.0.0.1 only).

    ``n_workers`` workers with one task slot each, as processes on 127.0.0.1, or with
    ``processes=False`` as threads of this process (they then share one cached model). The
    client's ``attncore_kernel_threads`` attribute is ``kernel_threads``, by default
    ``max(1, attncore.get_num_threads() // n_workers)``, and :func:`run_on_dask` uses it.
    """
    distributed = _require()
    _batch._check_positive("n_workers", n_workers)
    if kernel_threads is not None:
        kernel_threads = _check_count(kernel_threads, "kernel_threads")
    # Worker processes talk TCP on the loopback interface only; in-process workers use Dask's
    # in-memory transport. Dask's HTTP endpoints (the dashboard; each worker's health and
    # metrics) go to free ports of 127.0.0.1 (in-process workers listened on every interface).
    network = {"host": "127.0.0.1", "protocol": "tcp://"} if processes else {}
    with _workers_ignoring_ctrl_c():
        cluster = distributed.LocalCluster(n_workers=n_workers, threads_per_worker=1,
                                           processes=processes, dashboard_address="127.0.0.1:0",
                                           worker_dashboard_address="127.0.0.1:0",
                                           # a failed task comes back through its future, its
                                           # line named; the worker's own traceback on stderr
                                           # would only repeat it. Above CRITICAL: a Ctrl-C
                                           # racing the shutdown logged "CRITICAL - Closed comm"
                                           # with two tracebacks, now and then
                                           silence_logs=logging.CRITICAL + 1, **network)
    client = distributed.Client(cluster)
    # (and in this process until the cluster is closed: its scheduler's shutdown, when a Ctrl-C
    # raced it, logged past silence_logs, which ends before the scheduler has closed)
    log = logging.getLogger("distributed")
    level = log.level
    log.setLevel(logging.CRITICAL + 1)
    try:
        client.attncore_kernel_threads = kernel_threads or max(1, get_num_threads() // n_workers)
        yield client
    finally:
        try:
            client.close()
            cluster.close()
        finally:
            log.setLevel(level)


@contextlib.contextmanager
def _workers_ignoring_ctrl_c():
    """SIGINT ignored while the local worker processes start, so they inherit that (Python
    keeps an ignored SIGINT ignored): Ctrl-C in a terminal reaches the whole process group, and
    each worker printed a 30-line KeyboardInterrupt traceback while this process, which stops
    them itself, reported "interrupted". Only in the main thread (where signals can be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def connect(address: str):
    """A client for ``address``: ``"local"`` / ``"local:N"`` start a local cluster of N worker
    processes (default 2), anything else is a scheduler address (``tcp://host:8786``)."""
    distributed = _require()
    if address == "local" or address.startswith("local:"):
        count = address.partition(":")[2] or "2"
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"--dask local:N needs a positive worker count, got {address!r}")
        with local_client(int(count)) as client:
            yield client
        return
    try:
        client = distributed.Client(address, timeout="10s")
    except (OSError, TimeoutError) as exc:
        raise OSError(f"cannot reach the Dask scheduler at {address!r}: {exc}") from None
    # (a lost scheduler is a ClusterError of the run; the client's own log lines on stderr,
    # tracebacks included, would only repeat it)
    log = logging.getLogger("distributed.client")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield client
    finally:
        client.close()
        log.setLevel(level)


def run_on_dask(client, model_path, job, items: Iterable[_batch.Item], batching: _batch.Batching,
                *, kernel_threads: Optional[int] = None, throughput=None, on_batch=None,
                weight_dtype: str = "float32") -> Iterator[tuple]:
    """:func:`attncore.batch.run_batches` with the model calls on Dask workers.

    Parameters
    ----------
    client : ``distributed.Client``, or an address string for :func:`connect` (the cluster
        then lives as long as this generator)
    model_path : the model directory, at the same path on every worker
    job : an :class:`attncore.batch.Job`
    items : parsed inputs (``job.items(lines, frontend)``)
    batching : :class:`attncore.batch.Batching`; a window's batches run at once
    kernel_threads : kernel threads per batch (default: see the module docstring)
    weight_dtype : how the workers load the model (``attncore.load``'s option)

    Yields
    ------
    ``(item, result)`` in input order; ``job.format_item(item, result, frontend)`` makes the text.
    """
    if isinstance(client, str):
        with connect(client) as live:
            yield from run_on_dask(live, model_path, job, items, batching,
                                   kernel_threads=kernel_threads, throughput=throughput,
                                   on_batch=on_batch, weight_dtype=weight_dtype)
        return
    from .kernels.basic import check_weight_dtype
    weight_dtype = check_weight_dtype(weight_dtype)  # here, not as a worker's error
    if kernel_threads is not None:
        kernel_threads = _check_count(kernel_threads, "kernel_threads")
    _require()
    # (absolute, not resolved: the workers resolve links on their own file system)
    model_path = os.path.abspath(model_path)
    threads = kernel_threads or getattr(client, "attncore_kernel_threads", None)

    def submit(batch):
        return client.submit(_run_batch, model_path, job, batch, threads, weight_dtype,
                             pure=False)

    def infer(batch):
        return _result(client, submit(batch))

    def map_batches(batches):
        # waited for in submission order: the output needs them in order anyway, and a wait on
        # one future can watch the cluster
        futures = [submit(b) for b in batches]
        try:
            for index, future in enumerate(futures):
                yield index, _result(client, future)
        finally:
            client.cancel([f for f in futures if not f.done()])

    yield from _batch.run_batches(items, infer, batching, throughput=throughput,
                                  on_batch=on_batch, map_batches=map_batches)


def _result(client, future):
    """``future.result()``, with the cluster's own failures as ClusterError: workers lost
    (``KilledWorker``), the scheduler lost (a cancelled future, a closed connection), or no
    worker for NO_WORKER_TIMEOUT seconds while the batch waits."""
    from distributed.scheduler import KilledWorker

    workerless_since = None
    while True:
        try:
            return future.result(timeout=_POLL_SECONDS)
        except TimeoutError:
            pass
        except KilledWorker as exc:
            raise ClusterError(f"the Dask workers running a batch died: {exc}") from None
        except (concurrent.futures.CancelledError, OSError) as exc:
            if isinstance(exc, OSError) and type(exc).__module__.split(".")[0] != "distributed":
                raise
            raise ClusterError(f"lost the Dask scheduler or the batch: "
                               f"{' '.join(str(exc).split()) or type(exc).__name__}") from None
        if _worker_count(client):
            workerless_since = None
        elif workerless_since is None:
            workerless_since = time.monotonic()
        elif time.monotonic() - workerless_since > NO_WORKER_TIMEOUT:
            raise ClusterError(f"the Dask cluster has had no worker for "
                               f"{NO_WORKER_TIMEOUT:g} s")


def _worker_count(client) -> int:
    try:
        return len(client.scheduler_info().get("workers", {}))
    except Exception:   # (a client losing its scheduler: the future says so next)
        return 1


def translate_lines(client, model_path, lines: Iterable[Union[str, tuple]], *,
                    batching: Optional[_batch.Batching] = None, job=None,
                    kernel_threads: Optional[int] = None,
                    weight_dtype: str = "float32") -> Iterator[tuple]:
    """Text lines in, ``(line_number, output_text)`` out, in input order, on Dask.

    ``lines`` are strings (numbered from 1) or ``(line_number, text)`` pairs; ``job`` defaults
    to greedy :class:`attncore.batch.GenerateJob`; ``weight_dtype`` as in :func:`run_on_dask`.
    As on the command line (unlike ``Model.translate``): a line with a token the source
    vocabulary lacks is an :class:`attncore.batch.InputError` unless the job has
    ``allow_unknown=True``, and output text is escaped to one line
    (:data:`attncore.batch.LINE_ESCAPES`).
    """
    job = job or _batch.GenerateJob()
    frontend = _batch.Frontend.from_path(model_path)
    numbered = ((n, line) if isinstance(line, str) else line
                for n, line in enumerate(lines, 1))
    items = job.items(numbered, frontend)
    for item, result in run_on_dask(client, model_path, job, items, batching or _batch.Batching(),
                                    kernel_threads=kernel_threads, weight_dtype=weight_dtype):
        yield item.line, _batch.format_result(job, item, result, frontend)
