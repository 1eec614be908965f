# SPDX-License-Identifier: Apache-2.0
"""What the build produced and the thread API: OpenMP must be on (a sequential fallback is
allowed but never silent: set ATTNCORE_SKIP_OPENMP_TEST=1 to accept it), a SIMD level and a
BLAS are reported, and thread counts are process-wide settings with a thread-local override."""
import math
import os
import shutil
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import attncore
from conftest import subprocess_env


@pytest.fixture(autouse=True)
def _restore_thread_setting():
    """Tests here change the process-wide thread count: put the default back afterwards."""
    yield
    attncore.set_num_threads(None)


def test_info_reports_build_facts():
    info = attncore.info()
    assert info["version"] == attncore.__version__
    assert info["numpy"] == np.__version__
    assert isinstance(info["openmp"], bool)
    assert info["simd"] in ("avx512", "avx2+fma", "scalar")
    assert isinstance(info["num_threads"], int) and info["num_threads"] >= 1
    assert isinstance(info["cpus"], int) and info["cpus"] >= 1


@pytest.mark.skipif(os.environ.get("ATTNCORE_SKIP_OPENMP_TEST") == "1",
                    reason="ATTNCORE_SKIP_OPENMP_TEST=1: a build without OpenMP is accepted")
def test_openmp_is_enabled():
    assert attncore.info()["openmp"] is True, (
        "attncore was built without OpenMP: kernels run single-threaded. Rebuild with a "
        "compiler that supports -fopenmp, or set ATTNCORE_SKIP_OPENMP_TEST=1 to accept it.")


def test_blas_is_reported_and_limited_to_one_thread():
    blas = attncore.info()["blas"]
    assert blas, "no BLAS library found behind scipy.linalg.cython_blas"
    for entry in blas:
        assert entry["library"] and entry["filepath"]
        assert os.path.exists(entry["filepath"])
    threadpoolctl = pytest.importorskip("threadpoolctl")
    paths = {e["filepath"] for e in blas}
    for lib in threadpoolctl.threadpool_info():
        if lib["filepath"] in paths:
            assert lib["num_threads"] == 1, "the BLAS our kernels call inside OpenMP regions " \
                "must be single-threaded (no nested oversubscription)"


def threads_of(n):
    """What get_num_threads() reports after asking for n: 1 in a build without OpenMP."""
    return n if attncore.info()["openmp"] else 1


def test_set_and_get_num_threads():
    attncore.set_num_threads(3)
    assert attncore.get_num_threads() == threads_of(3)
    assert attncore.info()["num_threads"] == threads_of(3)
    attncore.set_num_threads(np.int64(1))
    assert attncore.get_num_threads() == 1
    attncore.set_num_threads(None)
    default = attncore.get_num_threads()
    assert default >= 1
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) > 0:
        assert default == threads_of(int(env))
    elif hasattr(os, "sched_getaffinity") and attncore.info()["openmp"]:
        from attncore.kernels.threads import cgroup_cpu_limit
        quota = cgroup_cpu_limit()
        cpus = len(os.sched_getaffinity(0))
        assert default == (cpus if quota is None else min(cpus, max(1, math.ceil(quota))))


def _cgroup_tree(tmp_path, proc_lines, files):
    """A fake /proc/self/cgroup and /sys/fs/cgroup: ``files`` maps paths under the root to text."""
    root = tmp_path / "cgroup"
    root.mkdir()
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    proc = tmp_path / "proc_cgroup"
    proc.write_text("\n".join(proc_lines) + "\n")
    return str(proc), str(root)


@pytest.mark.parametrize("proc_lines, files, expected", [
    # cgroup v2: the tightest quota of the process's cgroup and those above it
    (["0::/kubepods/pod1/ctr"], {"cgroup.controllers": "cpu", "cpu.max": "max 100000",
                                 "kubepods/pod1/cpu.max": "150000 100000",
                                 "kubepods/pod1/ctr/cpu.max": "max 100000"}, 1.5),
    (["0::/user.slice"], {"cgroup.controllers": "cpu", "user.slice/cpu.max": "max 100000"}, None),
    # a container: /proc/self/cgroup names the host's path, the mount is the container's cgroup
    (["0::/docker/abc"], {"cgroup.controllers": "cpu", "cpu.max": "200000 100000"}, 2.0),
    # cgroup v1, hybrid hierarchy with an empty unified line
    (["4:memory:/x", "3:cpu,cpuacct:/job", "0::/"],
     {"cpu,cpuacct/cpu.cfs_quota_us": "-1", "cpu,cpuacct/cpu.cfs_period_us": "100000",
      "cpu,cpuacct/job/cpu.cfs_quota_us": "50000", "cpu,cpuacct/job/cpu.cfs_period_us": "100000"},
     0.5),
    (["3:cpu,cpuacct:/"], {"cpu,cpuacct/cpu.cfs_quota_us": "-1",
                           "cpu,cpuacct/cpu.cfs_period_us": "100000"}, None),
    # unreadable or odd files give no quota rather than an error
    (["0::/a"], {"cgroup.controllers": "cpu", "a/cpu.max": "lots 100000"}, None),
    (["0::/a"], {"cgroup.controllers": "cpu", "a/cpu.max": "100000 0"}, None),
    (["garbage"], {}, None),
    (["0::/../../etc"], {"cgroup.controllers": "cpu", "cpu.max": "300000 100000"}, 3.0),
])
def test_cgroup_cpu_quota_is_read(tmp_path, proc_lines, files, expected):
    from attncore.kernels.threads import cgroup_cpu_limit
    proc, root = _cgroup_tree(tmp_path, proc_lines, files)
    assert cgroup_cpu_limit(proc, root) == expected
    assert cgroup_cpu_limit(str(tmp_path / "missing"), root) is None


@pytest.mark.parametrize("quota, expected", [(None, 2), (0.5, 1), (1.0, 1), (1.2, 2), (8.0, 2)])
def test_default_thread_count_follows_a_cpu_quota(monkeypatch, quota, expected):
    """A quota does not show in the affinity mask: 64 threads under a 2-CPU quota wait at
    barriers, throttled. The default takes the smaller, rounded up; OMP_NUM_THREADS overrides."""
    from attncore.kernels import threads
    if not attncore.info()["openmp"]:
        pytest.skip("a build without OpenMP runs on one thread")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: quota)
    assert threads._default_num_threads() == expected
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads._default_num_threads() == 3


def test_num_threads_context_manager_restores_and_nests():
    attncore.set_num_threads(2)
    with attncore.num_threads(1) as n:
        assert n == 1
        assert attncore.get_num_threads() == 1
        with attncore.num_threads(3) as n:
            # (the count kernels get: it said 3 where a build without OpenMP runs 1)
            assert attncore.get_num_threads() == n == threads_of(3)
        assert attncore.get_num_threads() == 1
    assert attncore.get_num_threads() == threads_of(2)
    with pytest.raises(RuntimeError):
        with attncore.num_threads(1):
            raise RuntimeError("boom")
    assert attncore.get_num_threads() == threads_of(2)  # restored on the error path too


def test_num_threads_is_thread_local():
    """A Python thread inside num_threads(1) does not change what another thread sees."""
    attncore.set_num_threads(2)
    inside = threading.Event()
    release = threading.Event()
    seen = {}

    def worker():
        with attncore.num_threads(1):
            seen["worker"] = attncore.get_num_threads()
            inside.set()
            release.wait(10)
        seen["worker_after"] = attncore.get_num_threads()

    t = threading.Thread(target=worker)
    t.start()
    assert inside.wait(10)
    seen["main_while_worker_inside"] = attncore.get_num_threads()
    with attncore.num_threads(3):
        seen["main_own_override"] = attncore.get_num_threads()
    release.set()
    t.join(10)
    assert seen == {"worker": 1, "main_while_worker_inside": threads_of(2),
                    "main_own_override": threads_of(3), "worker_after": threads_of(2)}


def test_num_threads_is_per_asyncio_task():
    """Tasks interleaving on one event-loop thread each keep their own budget while open, and
    the loop thread's budget is the default again once they are done (a thread-local saved and
    restored per block left it at the value the last task to exit had saved)."""
    import asyncio
    attncore.set_num_threads(2)
    seen = []

    async def handler(n, steps):
        with attncore.num_threads(n):
            for _ in range(steps):
                seen.append((n, attncore.get_num_threads()))
                await asyncio.sleep(0)

    async def main():
        await asyncio.gather(handler(1, 3), handler(3, 5))
        return attncore.get_num_threads()

    assert asyncio.run(main()) == threads_of(2)
    assert attncore.get_num_threads() == threads_of(2)
    assert sorted(set(seen)) == [(1, 1), (3, threads_of(3))]


_FORK_SCRIPT = textwrap.dedent("""
    import os, sys, time, warnings
    import numpy as np
    import attncore
    attncore.set_num_threads(2)
    q = np.random.default_rng(0).standard_normal((2, 8, 256, 64)).astype(np.float32)
    if sys.argv[1] == "after":  # big enough for a team of two: OpenMP starts its pool here
        expected = attncore.attention(q, q, q)
    elif sys.argv[1] == "one thread":  # a pre-forking server's model loaded on one thread
        with attncore.num_threads(1):
            expected = attncore.attention(q, q, q)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            threads = attncore.get_num_threads()
            out = attncore.attention(q, q, q)
            attncore.linear(q[0, 0], q[0, 1])
        with attncore.num_threads(1):
            same = np.array_equal(out, attncore.attention(q, q, q))
        os.write(write_end, f"{threads} {same} {len(caught)} {caught[0].message if caught else ''}"
                 .encode())
        os._exit(0)
    os.close(write_end)
    for _ in range(600):  # a child that hangs is killed after a minute, not left behind
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        sys.exit("the forked child hung")
    print(os.read(read_end, 4096).decode(), "|", status)
""")


@pytest.mark.skipif(not hasattr(os, "fork") or not attncore.info()["openmp"],
                    reason="needs fork() and an OpenMP build")
@pytest.mark.parametrize("when", ["after", "before", "one thread"])
def test_a_forked_child_runs_kernels_instead_of_hanging(tmp_path, when):
    """GNU OpenMP's pool does not survive fork(): a child forked after a two-thread kernel used to
    wait forever in its first parallel region (a multiprocessing "fork" pool, a pre-forking
    server). It now runs on one thread, says so once, and gets the same bits. A child forked
    before any team started, or after kernels ran on one thread only, keeps its threads."""
    script = tmp_path / "fork_child.py"
    script.write_text(_FORK_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), when], env=subprocess_env(),
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    child, status = proc.stdout.rsplit("|", 1)
    assert status.strip() == "0"
    threads, same, n_warnings, message = child.split(" ", 3)
    assert same == "True"
    from attncore.kernels import _threads
    if when == "after" and _threads.forks_watched():   # (GNU OpenMP; clang's libomp restarts
        # its threads in the child: two threads, no warning)
        assert (threads, n_warnings) == ("1", "1")
        assert "forked after attncore had started OpenMP threads" in message
        assert "'spawn' or 'forkserver'" in message
    else:
        assert (threads, n_warnings, message.strip()) == ("2", "0", "")


def test_kernels_run_concurrently_from_python_threads(rng):
    """Kernels release the GIL and keep no shared state: concurrent calls from several Python
    threads (each with its own thread budget) give the single-threaded answers."""
    q = rng.standard_normal((2, 4, 70, 16)).astype(np.float32)
    k = rng.standard_normal((2, 2, 300, 16)).astype(np.float32)
    v = rng.standard_normal((2, 2, 300, 16)).astype(np.float32)
    with attncore.num_threads(1):
        expected = attncore.attention(q, k, v, causal=True)
    results, errors = [None] * 4, []

    def worker(i):
        try:
            with attncore.num_threads(1 + i % 2):
                for _ in range(3):
                    results[i] = attncore.attention(q, k, v, causal=True)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    for r in results:
        assert np.array_equal(r, expected)


ISA_ORDER = ("scalar", "avx2+fma", "avx512")


@pytest.mark.parametrize("forced", ["scalar", "avx2"])
def test_capped_isa_paths_match_reference(tmp_path, forced):
    """ATTNCORE_FORCE_ISA=scalar|avx2 caps the float32 dispatch, so the lower paths (otherwise
    untested on a machine with a higher one) report what they are and agree with the oracle."""
    best = attncore.info()["simd"]
    want_name = ISA_ORDER[min(ISA_ORDER.index(best), 0 if forced == "scalar" else 1)]
    code = textwrap.dedent(f"""
        import numpy as np, attncore
        from attncore import reference as ref
        assert attncore.info()["simd"] == {want_name!r}, attncore.info()["simd"]
        g = np.random.default_rng(0)
        q = g.standard_normal((2, 2, 70, 13)).astype(np.float32)
        k = g.standard_normal((2, 2, 300, 13)).astype(np.float32)
        v = g.standard_normal((2, 2, 300, 13)).astype(np.float32)
        f64 = lambda *a: [x.astype(np.float64) for x in a]
        for ql in (3, 70):
            out = attncore.attention(q[:, :, :ql], k, v, causal=True, kv_lengths=[300, 7])
            want = ref.attention(*f64(q[:, :, :ql], k, v), causal=True, kv_lengths=[300, 7])
            np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
        # decoding with a head wider than one 64-column register block
        qd, kd, vd = (g.standard_normal((2, 2, n, 80)).astype(np.float32) for n in (1, 77, 77))
        np.testing.assert_allclose(attncore.attention(qd, kd, vd, kv_lengths=[77, 30]),
                                   ref.attention(*f64(qd, kd, vd), kv_lengths=[77, 30]),
                                   rtol=1e-5, atol=1e-6)
        x = (3 * g.standard_normal((5, 37))).astype(np.float32)
        # the few-row product of decoding steps (own kernel, not BLAS)
        w = g.standard_normal((50, 37)).astype(np.float32)
        np.testing.assert_allclose(attncore.linear(x, w), ref.linear(*f64(x, w)),
                                   rtol=1e-4, atol=1e-5)
        # the decoding-step product on packed panels: row blocks, a padded last panel, bias
        wp = g.standard_normal((130, 37)).astype(np.float32)
        bp = g.standard_normal(130).astype(np.float32)
        packed = attncore.kernels.PackedLinearWeight(wp)
        panel_rows = attncore.kernels._blas.packed_panel_max_rows()
        assert panel_rows == {16 if forced == "scalar" else 256}, panel_rows
        for m in (1, 3, 16, 40):
            xm = g.standard_normal((m, 37)).astype(np.float32)
            np.testing.assert_allclose(attncore.linear(xm, packed, bp), ref.linear(*f64(xm, wp, bp)),
                                       rtol=1e-4, atol=1e-4)
        # bfloat16 panels: the bits of float32 panels of the rounded weight
        half = attncore.kernels.PackedLinearWeight(wp, "bfloat16")
        rounded = attncore.kernels.PackedLinearWeight(attncore.kernels.round_bfloat16(wp))
        for m in (1, 3, 7, 16, 40):
            xm = g.standard_normal((m, 37)).astype(np.float32)
            assert np.array_equal(attncore.linear(xm, half, bp), attncore.linear(xm, rounded, bp))
        # flash attention runs its products on the tile kernel with the AVX2 or AVX-512
        # kernels; the kernel itself (its scalar fallback without them) is right either way
        from attncore.kernels import _sdpa
        assert _sdpa.tile_products() == {want_name != "scalar"}
        at, bt = (g.standard_normal(s).astype(np.float32) for s in ((7, 33), (33, 21)))
        ct = np.ones((7, 21), np.float32)
        _sdpa.tile_gemm(at, bt, ct, True)
        np.testing.assert_allclose(ct, at.astype(np.float64) @ bt + 1, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(attncore.softmax(x), ref.softmax(x.astype(np.float64)),
                                   rtol=1e-5, atol=1e-6)
        for name in ("tanh", "sigmoid", "swish", "gelu", "gelu_tanh"):
            np.testing.assert_allclose(getattr(attncore, name)(x),
                                       getattr(ref, name)(x.astype(np.float64)),
                                       rtol=1e-5, atol=1e-6)
        # the recurrent cells (one vector pass over a row's gates), H = 13: a partial vector
        from attncore.kernels import _recurrent
        from attncore.kernels.threads import BLAS_SMALL_GEMM_MACS
        sig = lambda a: 1 / (1 + np.exp(-a))
        for lstm in (False, True):
            G, H, T = (4 if lstm else 3), 13, 5
            xp = g.standard_normal((3, T, G * H)).astype(np.float32)
            whh = (0.3 * g.standard_normal((G * H, H))).astype(np.float32)
            bhh = g.standard_normal(G * H).astype(np.float32)
            h, c = np.zeros((3, H), np.float32), np.zeros((3, H), np.float32)
            out = np.empty((3, T, H), np.float32)
            _recurrent.rnn_scan(xp, attncore.kernels.PackedLinearWeight(whh).panels, bhh,
                                np.full(3, T, np.int64), True, False, lstm, h, c, out,
                                BLAS_SMALL_GEMM_MACS, 1)
            hr, cr = np.zeros((3, H)), np.zeros((3, H))
            for t in range(T):
                gx, gh = xp[:, t].astype(np.float64), hr @ whh.T.astype(np.float64) + bhh
                if lstm:
                    i, f, o = (sig(gx[:, k * H:(k + 1) * H] + gh[:, k * H:(k + 1) * H]) for k in (0, 1, 3))
                    cr = f * cr + i * np.tanh(gx[:, 2 * H:3 * H] + gh[:, 2 * H:3 * H])
                    hr = o * np.tanh(cr)
                else:
                    r, z = (sig(gx[:, k * H:(k + 1) * H] + gh[:, k * H:(k + 1) * H]) for k in (0, 1))
                    n = np.tanh(gx[:, 2 * H:] + r * gh[:, 2 * H:])
                    hr = (1 - z) * n + z * hr
                np.testing.assert_allclose(out[:, t], hr, rtol=1e-5, atol=1e-6)
        # tanh's relative accuracy near 0 (the vector form was 1 - 2 / (exp(2x) + 1), 166% off
        # at 4e-8) and its exact limits, on every path
        small = np.logspace(-44, 1.5, 20001).astype(np.float32)
        small = np.concatenate([small, -small])
        np.testing.assert_allclose(attncore.tanh(small), np.tanh(small.astype(np.float64)),
                                   rtol=1e-6, atol=0)
        edges = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3e38, -3e38], np.float32)
        np.testing.assert_array_equal(attncore.tanh(edges), [0, 0, 1, -1, np.nan, 1, -1])
        assert np.signbit(attncore.tanh(edges[:2])).tolist() == [False, True]
        if {forced!r} == "avx2":   # the float-lane erf GELU: relative accuracy in the tail too
            from scipy.special import ndtr
            grid = np.linspace(-14, 14, 280001).astype(np.float32)
            exact = grid.astype(np.float64) * ndtr(grid.astype(np.float64))
            kept = np.abs(exact) > np.finfo(np.float32).tiny
            np.testing.assert_allclose(attncore.gelu(grid)[kept], exact[kept], rtol=2e-6, atol=0)
            special = np.array([-np.inf, np.inf, np.nan, -1e30, 1e30, -3e38], np.float32)
            np.testing.assert_array_equal(attncore.gelu(special),
                                          [np.nan, np.inf, np.nan, -0.0, special[4], -0.0])
        a = dict(queries=q[:, 0, :4], keys=k[:, 0], values=v[:, 0],
                 w_q=g.standard_normal((13, 9)).astype(np.float32),
                 w_k=g.standard_normal((13, 9)).astype(np.float32),
                 w_v=g.standard_normal(9).astype(np.float32))
        # scores reach sum|w_v| ~ 7: float32 rounding of them is ~1e-6 (conftest.score_atol)
        # four queries: the split tanh of simd.h; keys scaled past its limit: the exact tanh
        for key_scale in (1, 40):
            b = dict(a, keys=a["keys"] * np.float32(key_scale))
            np.testing.assert_allclose(attncore.additive_attention(**b),
                                       ref.additive_attention(*f64(*b.values())),
                                       rtol=1e-5, atol=2e-6)
        # the greedy search's argmax: numpy's, at the vector lengths and with NaN / ties
        from attncore.kernels import _recurrent
        for n in (5, 16, 23, 4000):
            for x in (g.standard_normal(n), g.integers(0, 2, n), np.full(n, -np.inf)):
                x = x.astype(np.float32)
                assert _recurrent.argmax(x) == np.argmax(x)
                x[n - 2] = np.nan
                assert _recurrent.argmax(x) == n - 2 and _recurrent.argmax(x, n - 2) == np.argmax(
                    np.where(np.arange(n) == n - 2, -np.inf, x))
        print("ok")
    """)
    # From an empty directory, importing the attncore this process imported (conftest).
    env = subprocess_env(ATTNCORE_FORCE_ISA=forced)
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


_SAME_BITS_CODE = textwrap.dedent("""
    import sys
    import numpy as np, attncore
    from attncore.kernels.attention import sequence_attention
    # causal tiles differ by instruction set (for speed): the same ones here
    sys.modules["attncore.kernels.attention"].FLASH_TILES = (48, 96)
    g = np.random.default_rng(3)
    q, k, v = (g.standard_normal((2, 3, n, 40)).astype(np.float32) for n in (70, 150, 150))
    x = g.standard_normal((300, 300)).astype(np.float32)
    w = g.standard_normal((130, 300)).astype(np.float32)
    packed = attncore.kernels.PackedLinearWeight(w)
    np.savez(sys.argv[1], simd=attncore.info()["simd"],
             flash=sequence_attention(q, k, v, kv_lengths=np.array([150, 61]), causal=False),
             causal=sequence_attention(q, k, v, kv_lengths=np.array([99, 150]), causal=True),
             matmul=attncore.matmul(x[:40], x[:, :77]), linear=attncore.linear(x, w),
             packed=attncore.linear(x, packed), packed_rows=attncore.linear(x[:7], packed))
""")


def _arrays_under_isa(tmp_path, code, isa):
    """The arrays a child ``python -c code OUT.npz`` saves, run with ATTNCORE_FORCE_ISA=isa."""
    out = str(tmp_path / f"{isa or 'best'}.npz")
    proc = subprocess.run([sys.executable, "-c", code, out], cwd=tmp_path,
                          env=subprocess_env(ATTNCORE_FORCE_ISA=isa), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(out))


def test_avx2_and_avx512_kernels_give_the_same_bits(tmp_path):
    # the tile kernel, the panel kernel and flash's column softmax run the same operations per
    # output on both instruction sets (float32 flash attention on the same tiles -- causal
    # prefill picks other tiles on AVX-512 --, matmul / linear past 16 rows, packed products at
    # any size)
    if attncore.info()["simd"] != "avx512":
        pytest.skip("needs an AVX-512 machine to compare its kernels with the AVX2 ones")
    results = {isa: _arrays_under_isa(tmp_path, _SAME_BITS_CODE, isa) for isa in ("avx512", "avx2")}
    assert results["avx2"].pop("simd") == "avx2+fma" and results["avx512"].pop("simd") == "avx512"
    for name, got in results["avx512"].items():
        np.testing.assert_array_equal(got, results["avx2"][name], err_msg=name)


_LAYER_NORM_CODE = textwrap.dedent("""
    import sys
    import numpy as np, attncore
    g = np.random.default_rng(5)
    out = {"simd": attncore.info()["simd"]}
    for D in (1, 7, 15, 16, 17, 100, 512):
        x = (3 + 2 * g.standard_normal((4, D))).astype(np.float32)
        gamma, beta = g.standard_normal((2, D)).astype(np.float32)
        for mode in ("standard", "uncentred", "rms"):
            out[f"{D}-{mode}"] = attncore.layer_norm(x, gamma, beta, mode=mode)
            out[f"{D}-{mode}-plain"] = attncore.layer_norm(x, mode=mode)
    for i, row in enumerate(([3e38, -3e38, 1e38], [0, 1e-40, 5e-41], [1, np.nan, 2])):
        for mode in ("standard", "uncentred", "rms"):   # rows with the float64 output
            out[f"extreme{i}-{mode}"] = attncore.layer_norm(np.float32([row]), eps=0, mode=mode)
    np.savez(sys.argv[1], **out)
""")


def test_float32_layer_norm_gives_the_same_bits_on_every_instruction_set(tmp_path):
    # one algorithm, three codings (scalar, AVX2, AVX-512: simd.c's layer_norm_row): the same
    # float64 chains and float32 operations per element, so a model's norms do not change
    # with the machine's instruction set
    best = attncore.info()["simd"]
    isas = {"scalar": "scalar", "avx2": "avx2+fma", "": "avx512"}
    runs = [isa for isa, name in isas.items() if ISA_ORDER.index(name) <= ISA_ORDER.index(best)]
    if len(runs) < 2:
        pytest.skip("needs a machine with AVX2 to compare two instruction sets")
    results = {isa: _arrays_under_isa(tmp_path, _LAYER_NORM_CODE, isa) for isa in runs}
    for isa in runs:
        assert str(results[isa].pop("simd")) == isas[isa]
    first = results[runs[0]]
    for isa in runs[1:]:
        for name, got in results[isa].items():
            np.testing.assert_array_equal(got, first[name], err_msg=f"{isa or 'best'}: {name}")


def _c_compiler_found():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    try:
        from packed_harness import c_compiler
    finally:
        sys.path.pop(0)
    return shutil.which(c_compiler()[0]) is not None


@pytest.mark.skipif(not _c_compiler_found(), reason="bench/packed_harness.py needs a C compiler")
def test_packed_harness_builds_and_times_both_paths(tmp_path):
    # the development harness patches src_c/packed_linear.c's row rule: it must still find it,
    # compile, and print one row per panel type with both paths timed
    script = os.path.join(os.path.dirname(__file__), "..", "bench", "packed_harness.py")
    proc = subprocess.run([sys.executable, script, "--threads", "1", "--rows", "17"],
                          env=subprocess_env(), cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| f32", "| bf16"))]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1:3] == ["1", "17"] and float(cells[3]) > 0 and float(cells[5]) > 0


@pytest.mark.parametrize("scipy_linalg", ["after", "before", "during"])
def test_import_takes_the_blas_table_without_scipy_linalg(tmp_path, scipy_linalg):
    # scipy.linalg's package import (150 ms of modules the kernels never use) ran at every
    # start; the kernels now load scipy.linalg.cython_blas by itself (_scipy_blas), and the
    # caller's own import of it (or of scipy.linalg) works as without attncore: after attncore,
    # before it, or in another thread while attncore's kernels import (made deterministic here:
    # that thread runs to completion as the kernels' first import starts; scipy.linalg then
    # lacked its cython_blas attribute)
    code = textwrap.dedent(f"""
        import builtins, sys, threading
        import numpy as np
        mode = {scipy_linalg!r}
        if mode == "before":
            import scipy.linalg
        real_import = builtins.__import__
        def importing(name, globals=None, locals=None, fromlist=(), level=0):
            if (mode == "during" and globals and globals.get("__name__") == "attncore.kernels"
                    and "_additive" in (fromlist or ())):
                thread = threading.Thread(target=lambda: real_import("scipy.linalg"))
                thread.start()
                thread.join()
            return real_import(name, globals, locals, fromlist, level)
        builtins.__import__ = importing
        import attncore
        builtins.__import__ = real_import
        assert ("scipy.linalg" in sys.modules) == (mode != "after")
        attncore.set_num_threads(1)   # (it checks SciPy's BLAS threads, without scipy.linalg)
        assert ("scipy.linalg" in sys.modules) == (mode != "after")
        x = np.ones((1, 2, 20, 8), np.float32)
        assert np.allclose(attncore.attention(x, x, x), 1)
        assert np.allclose(attncore.matmul(np.eye(3), np.ones((3, 2))), 1)
        import scipy.linalg.cython_blas
        assert "sgemm" in scipy.linalg.cython_blas.__pyx_capi__
        import scipy.linalg
        assert np.allclose(scipy.linalg.solve(2 * np.eye(2), np.ones(2)), 0.5)
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok"


def test_submodules_are_attributes_after_a_plain_import(tmp_path):
    # the README writes attncore.convert.from_pytorch_transformer and
    # attncore.distributed.translate_lines after `import attncore`: an AttributeError until the
    # submodules were imported by hand. They load on first use, so `import attncore` alone
    # still does not import dask or the converters.
    code = textwrap.dedent("""
        import sys
        import attncore
        assert "attncore.convert" not in sys.modules and "dask" not in sys.modules
        assert callable(attncore.convert.from_pytorch_transformer)
        assert callable(attncore.distributed.translate_lines)
        assert attncore.heatmap.__name__ == "attncore.heatmap"
        assert {"convert", "distributed", "Transformer", "attention"} <= set(dir(attncore))
        try:
            attncore.no_such_name
        except AttributeError as exc:
            assert "no_such_name" in str(exc)
        else:
            raise AssertionError("no AttributeError")
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok"


def test_source_distribution_carries_the_suite_and_the_docs(tmp_path):
    # the sdist left out tests/conftest.py (its tests could not run), docs/ and the scripts:
    # build one from a copy of the checkout's tracked files and compare
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    listed = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True)
    if listed.returncode != 0 or not os.path.exists(os.path.join(root, "setup.py")):
        pytest.skip("needs a git checkout of the sources")
    tracked = listed.stdout.split()
    copy = tmp_path / "src"
    for name in tracked:
        os.makedirs(copy / os.path.dirname(name), exist_ok=True)
        shutil.copy2(os.path.join(root, name), copy / name)
    proc = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")],
                          cwd=copy, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import tarfile
    (archive,) = (tmp_path / "dist").iterdir()
    with tarfile.open(archive) as tar:
        inside = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    missing = sorted(set(tracked) - inside - {".gitignore", ".ci/run"})
    assert not missing, missing
    assert not [name for name in inside if name.endswith((".so", ".pyc"))]


def test_the_package_imports_on_the_oldest_python_it_claims():
    """pyproject says Python >= 3.9, where ``bool | None`` in an annotation is evaluated at
    import and fails (attncore.kernels.attention did, so nothing imported there). Every module
    either defers its annotations (``from __future__ import annotations``) or spells them
    without PEP 604 unions, and parses as 3.9 syntax."""
    import ast
    import pathlib
    package = pathlib.Path(attncore.__file__).parent
    problems = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), feature_version=(3, 9))
        if any(isinstance(node, ast.ImportFrom) and node.module == "__future__"
               and any(alias.name == "annotations" for alias in node.names) for node in tree.body):
            continue
        annotations = [node.annotation for node in ast.walk(tree)
                       if isinstance(node, (ast.arg, ast.AnnAssign)) and node.annotation]
        annotations += [node.returns for node in ast.walk(tree)
                        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns]
        problems += [f"{path.name}:{a.lineno}: {ast.unparse(a)}" for a in annotations
                     if any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr)
                            for n in ast.walk(a))]
    assert not problems, problems
