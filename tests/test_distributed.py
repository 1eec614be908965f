# SPDX-License-Identifier: Apache-2.0
"""Batch inference on Dask (attncore.distributed): results equal the single-process run, the
model is loaded once per worker process, errors name their line after an exact output prefix.

Clusters are local: in-process workers (Dask's in-memory transport, no sockets) and, once,
two worker processes on 127.0.0.1. Skipped when ``distributed`` is not installed.
"""
import os
import shutil
import subprocess
import sys
import time

import pytest

pytest.importorskip("distributed")

import attncore  # noqa: E402
from attncore import batch, distributed  # noqa: E402
from attncore.batch import Batching, InputError  # noqa: E402
from conftest import subprocess_env  # noqa: E402

DATES = os.path.join(os.path.dirname(os.path.abspath(attncore.__file__)), "assets", "dates")
FORMS = ["Tuesday, 3 March 1998", "4/10/85", "the 3rd of March 1998", "Sat 1 Jan 2000",
         "December 25, 2023", "2011-07-14", "14 Jul 1789", "March 3rd, 1998"]
LINES = [FORMS[(i * 5) % len(FORMS)] for i in range(90)]
# small batches and windows: several windows, batches of different lengths finishing out of order
BATCHING = Batching(batch_size=4, max_tokens=60, window=24)


def single_process(lines, job=None, path=DATES, weight_dtype="float32"):
    from attncore import models
    job = job or batch.GenerateJob()
    model = models.load(path, weight_dtype=weight_dtype)
    frontend = batch.Frontend.from_model(model)
    items = job.items(enumerate(lines, 1), frontend)
    return [(item.line, job.format(result, frontend))
            for item, result in batch.run_batches(items, lambda rows: job.run_items(model, rows),
                                                           BATCHING)]


@pytest.fixture(scope="module")
def client():
    with distributed.local_client(n_workers=2, processes=False, kernel_threads=1) as live:
        yield live


def test_distributed_equals_single_process(client):
    got = list(distributed.translate_lines(client, DATES, LINES, batching=BATCHING))
    assert got == single_process(LINES)
    assert [line for line, _ in got] == list(range(1, len(LINES) + 1))


def test_ids_and_beam_search_jobs(client):
    from attncore.tokenizer import load_tokenizer
    from attncore import io
    tokenizer = load_tokenizer(DATES, io.read_config(DATES))
    id_lines = [" ".join(map(str, tokenizer.encode_source(t))) for t in LINES[:30]]
    job = batch.GenerateJob(ids=True, beam_size=3)
    got = list(distributed.translate_lines(client, DATES, id_lines, batching=BATCHING, job=job))
    assert got == single_process(id_lines, job)


def test_sampling_on_workers_equals_one_process_with_other_batches(client):
    # a sampled line draws from its line number's stream: the batches of the workers and of a
    # single process one line at a time give the same text
    job = batch.GenerateJob(do_sample=True, temperature=3.0, seed=5)
    got = list(distributed.translate_lines(client, DATES, LINES[:40], batching=BATCHING, job=job))
    from attncore import models
    model = models.load(DATES)
    frontend = batch.Frontend.from_model(model)
    alone = [(item.line, job.format(result, frontend)) for item, result in batch.run_batches(
        job.items(enumerate(LINES[:40], 1), frontend), lambda rows: job.run_items(model, rows),
        Batching(batch_size=1, window=1))]
    assert got == alone
    assert len({text for _, text in got}) > len(FORMS), "the samples differ line by line"


def test_each_worker_loads_the_model_once(client):
    list(distributed.translate_lines(client, DATES, LINES, batching=BATCHING))
    list(distributed.translate_lines(client, DATES, LINES[:10], batching=BATCHING))
    counts = client.run(distributed.load_count, DATES)
    # in-process workers share this process's cache: one load in all
    assert set(counts.values()) == {1}, counts


def test_a_bad_line_stops_after_an_exact_prefix(client):
    lines = LINES[:40]
    lines[30] = "3 März 1998"
    got = []
    with pytest.raises(InputError, match="^line 31: .*missing from the source vocabulary"):
        for line, text in distributed.translate_lines(client, DATES, lines, batching=BATCHING):
            got.append((line, text))
    assert got == single_process(lines[:30])


def test_cached_model_reloads_a_rewritten_directory(tmp_path):
    path = tmp_path / "dates"
    shutil.copytree(DATES, path)
    first = distributed.cached_model(path)
    assert distributed.cached_model(str(path)) is first
    assert distributed.load_count(path) == 1
    stamp = time.time() + 5
    os.utime(path / "config.json", (stamp, stamp))
    second = distributed.cached_model(path)
    assert second is not first
    assert distributed.load_count(path) == 2
    # the earlier version is dropped, not kept beside it (a long-lived worker held every one)
    real = os.path.realpath(path)
    assert [model for key, model in distributed._models.items() if key[0] == real] == [second]
    half = distributed.cached_model(path, "bfloat16")   # another dtype of the same version stays
    assert distributed.cached_model(path) is second and distributed.cached_model(path, "bfloat16") is half


def test_two_worker_processes_on_loopback():
    """Real worker processes: same results, and each process loaded the model exactly once."""
    with distributed.local_client(n_workers=2, processes=True) as live:
        assert live.attncore_kernel_threads >= 1
        got = list(distributed.translate_lines(live, DATES, LINES, batching=BATCHING))
        counts = live.run(distributed.load_count, DATES)
    assert got == single_process(LINES)
    assert len(counts) == 2 and set(counts.values()) <= {0, 1} and sum(counts.values()) >= 1


def test_cli_dask_local(tmp_path):
    (tmp_path / "in.txt").write_text("".join(f"{line}\n" for line in LINES[:20]))
    env = subprocess_env()
    proc = subprocess.run([sys.executable, "-m", "attncore", "translate", "--input", "in.txt",
                           "--dask", "local:2", "--no-progress", "--batch-size", "4"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [text for _, text in single_process(LINES[:20])]
    # a reader that stops early: exit 141 and nothing on stderr (the results' clean-up ran
    # after the client had closed and printed a traceback); a bad line: its one error line
    lines = [LINES[i % len(LINES)] for i in range(300)]
    lines[150] = "3 März 1998"
    (tmp_path / "big.txt").write_text("".join(f"{line}\n" for line in lines))
    command = (f"{sys.executable} -m attncore translate --input big.txt --dask local:2 "
               f"--no-progress --batch-size 4 --threads 1")
    head = subprocess.run(f"set -o pipefail; {command} | head -1", shell=True,
                          executable="/bin/bash", cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert head.returncode == 141 and head.stderr == "", head.stderr[-2000:]
    refused = subprocess.run(command.split(), cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 1
    errors = refused.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("attncore translate: error: line 151: ") \
        and errors[0].endswith("the 150 lines before it were written to stdout"), errors[-20:]


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="needs process groups")
def test_ctrl_c_on_a_local_cluster_prints_one_line(tmp_path):
    # Ctrl-C reaches the terminal's whole process group: each local worker printed a 30-line
    # KeyboardInterrupt traceback beside "interrupted"; now the workers ignore it and this
    # process stops them. What was written stays an exact prefix of the output.
    import signal
    lines = [LINES[i % len(LINES)] for i in range(200_000)]
    (tmp_path / "big.txt").write_text("".join(f"{line}\n" for line in lines))
    proc = subprocess.Popen([sys.executable, "-m", "attncore", "translate", "--input", "big.txt",
                             "--output", "out.txt", "--dask", "local:1", "--no-progress",
                             "--threads", "1"], cwd=tmp_path, env=subprocess_env(),
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and (
            not (tmp_path / "out.txt").exists() or (tmp_path / "out.txt").stat().st_size == 0):
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines() == ["attncore translate: interrupted"], err[-2000:]
    written = (tmp_path / "out.txt").read_text().splitlines()
    expected = [text for _, text in single_process(LINES)]
    assert 0 < len(written) < len(lines)
    assert written == [expected[i % len(LINES)] for i in range(len(written))]


def test_connect_refuses_a_bad_worker_count():
    with pytest.raises(ValueError, match="positive worker count"):
        with distributed.connect("local:0"):
            pass


def test_bfloat16_workers_equal_the_bfloat16_model(client, tmp_path):
    path = tmp_path / "dates"  # a copy: the load counts of DATES stay those of float32
    shutil.copytree(DATES, path)
    got = list(distributed.translate_lines(client, path, LINES[:30], batching=BATCHING,
                                           weight_dtype="bfloat16"))
    assert got == single_process(LINES[:30], path=path, weight_dtype="bfloat16")
    half = distributed.cached_model(path, "bfloat16")
    assert half.weight_dtype == "bfloat16" and distributed.cached_model(path) is not half
    with pytest.raises(ValueError, match="weight_dtype"):
        next(distributed.translate_lines(client, path, LINES[:3], weight_dtype="int4"))


def test_a_model_the_workers_cannot_load_is_a_cluster_error(client, tmp_path):
    # a worker's load error is a ValueError: it read as "the model refused the batch", and the
    # one-by-one rerun blamed line 1 (over 17 lines of stderr on the command line)
    path = tmp_path / "dates"
    shutil.copytree(DATES, path)
    (path / "model.safetensors").write_bytes(b"\x10\x00")           # truncated
    with pytest.raises(distributed.ClusterError, match="(?s)could not load the model .*safetensors"):
        list(distributed.translate_lines(client, path, LINES[:5], batching=BATCHING))
    (tmp_path / "in.txt").write_text("".join(f"{line}\n" for line in LINES[:5]))
    proc = subprocess.run([sys.executable, "-m", "attncore", "translate", "--model", str(path), "--input",
                           "in.txt", "--dask", "local:1", "--no-progress", "--threads", "1"],
                          cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    errors = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-2000:]
    assert "could not load the model" in errors[0] and "line 1" not in errors[0]
    assert errors[0].endswith("stopped there, nothing was written")


class _Future:
    """A stand-in for a Dask future: raises ``error`` (or times out) on result()."""

    def __init__(self, error=None):
        self.error = error

    def result(self, timeout=None):
        raise self.error if self.error is not None else TimeoutError()


class _Client:
    def __init__(self, workers):
        self.workers = workers

    def scheduler_info(self):
        return {"workers": dict.fromkeys(range(self.workers))}


def test_cluster_failures_are_cluster_errors(monkeypatch):
    # no worker (none joined, or the last one died): Dask queues the batch forever and the
    # command line hung without a word; lost workers and scheduler printed tracebacks
    import concurrent.futures
    from types import SimpleNamespace
    from distributed.scheduler import KilledWorker
    from distributed.comm import CommClosedError
    monkeypatch.setattr(distributed, "NO_WORKER_TIMEOUT", 0.2)
    monkeypatch.setattr(distributed, "_POLL_SECONDS", 0.02)
    started = time.monotonic()
    with pytest.raises(distributed.ClusterError, match="no worker for 0.2 s"):
        distributed._result(_Client(0), _Future())
    assert time.monotonic() - started < 5
    for error, words in [(KilledWorker("task", SimpleNamespace(address="tcp://w"), 3),
                          "workers running a batch died"),
                         (concurrent.futures.CancelledError("gone"), "lost the Dask scheduler"),
                         (CommClosedError("closed"), "lost the Dask scheduler")]:
        with pytest.raises(distributed.ClusterError, match=words):
            distributed._result(_Client(1), _Future(error))
    # errors of the job itself pass through as they are
    for error in (ValueError("line"), OSError("disk")):
        with pytest.raises(type(error)) as raised:
            distributed._result(_Client(1), _Future(error))
        assert raised.value is error


def test_cached_model_reloads_a_directory_rewritten_with_its_old_times(tmp_path):
    # cp -p / rsync -a / tar keep a file's modification time: the worker kept the old weights
    path = tmp_path / "dates"
    shutil.copytree(DATES, path)
    first = distributed.cached_model(path)
    weights = path / "model.safetensors"
    stat = weights.stat()
    replacement = tmp_path / "new.safetensors"
    shutil.copy2(weights, replacement)                  # the same bytes, another inode
    os.replace(replacement, weights)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_mtime_ns == stat.st_mtime_ns
    assert distributed.cached_model(path) is not first


def test_kernel_threads_are_checked_where_given(client):
    for bad, error in [(0, ValueError), (-1, ValueError), (2000, ValueError), ("2", TypeError),
                       (1.5, TypeError)]:
        with pytest.raises(error, match="kernel_threads"):
            with distributed.local_client(1, processes=False, kernel_threads=bad):
                pass
        with pytest.raises(error, match="kernel_threads"):
            next(distributed.translate_lines(client, DATES, LINES[:2], kernel_threads=bad))


def test_in_process_workers_serve_http_on_loopback_only(client):
    # the workers' health and metrics endpoints listened on every interface
    hosts = client.run(lambda dask_worker: [
        sock.getsockname()[0] for server in dask_worker.http_server._sockets.values()
        for sock in [server]])
    assert hosts and all(set(names) <= {"127.0.0.1"} for names in hosts.values()), hosts


def test_workers_get_the_path_as_given_not_its_link_target(client, tmp_path):
    # (a worker with another mount may not have the client's link target)
    link = tmp_path / "link"
    link.symlink_to(DATES)
    seen = tmp_path / "seen.txt"
    original = distributed._run_batch

    def spy(model_path, *args):   # (tasks are serialized even in-process: a file records)
        with open(seen, "a") as f:
            f.write(model_path + "\n")
        return original(model_path, *args)

    try:
        distributed._run_batch = spy
        got = list(distributed.translate_lines(client, link, LINES[:3], batching=BATCHING))
    finally:
        distributed._run_batch = original
    assert got == single_process(LINES[:3])
    assert set(seen.read_text().split()) == {str(link)}


# ------------------------------------------------- mutation-testing round 2: thread budgets
def test_worker_kernel_threads_are_the_cpus_of_one_task_slot(monkeypatch):
    import distributed as dask_distributed
    from types import SimpleNamespace
    from attncore.kernels import threads
    monkeypatch.setattr(threads, "available_cpus", lambda: 8)
    for slots, expected in [(1, 8), (2, 4), (3, 2), (16, 1)]:
        monkeypatch.setattr(dask_distributed, "get_worker",
                            lambda slots=slots: SimpleNamespace(nthreads=slots))
        assert distributed._worker_kernel_threads() == expected


def test_a_local_cluster_splits_the_thread_budget_between_its_workers(monkeypatch):
    monkeypatch.setattr(distributed, "get_num_threads", lambda: 8)
    with distributed.local_client(n_workers=2, processes=False) as live:
        assert live.attncore_kernel_threads == 4


class _Recording:
    """A client that runs nothing: it records the kernel threads each batch is sent with."""
    attncore_kernel_threads = 3

    def __init__(self):
        self.threads = []

    def submit(self, function, model_path, job, rows, threads, weight_dtype, pure):
        import concurrent.futures
        self.threads.append(threads)
        future = concurrent.futures.Future()
        future.set_result([[int(item.source[0])] for item in rows])
        return future

    def cancel(self, futures):
        pass

    def scheduler_info(self):
        return {"workers": {0: None}}


def test_run_on_dask_sends_the_clients_kernel_threads_unless_given():
    import numpy as np
    items = [batch.Item(n, np.array([n])) for n in range(1, 6)]
    for given, expected in [(None, 3), (1, 1)]:
        client = _Recording()
        out = list(distributed.run_on_dask(client, DATES, batch.GenerateJob(ids=True), items,
                                           Batching(batch_size=2), kernel_threads=given))
        assert [result for _, result in out] == [[n] for n in range(1, 6)]
        assert client.threads == [expected] * 3
