# SPDX-License-Identifier: Apache-2.0
"""Kernel benchmarks: attncore vs the NumPy reference vs torch, at 1 and 2 threads, in one run.

    python bench/kernels.py            # full table (a few minutes on 2 cores)
    python bench/kernels.py --quick    # smoke profile (seconds)
    python bench/kernels.py --threads 1 2 4
    python bench/kernels.py --only additive    # sections: attention decode masked softmax
                                               # activations norm additive pooling packed
                                               # matmul sampling calls

Prints, per thread count: the BLAS sgemm GFLOP/s of this run (the physical reference), then
attention at the prefill shapes (GFLOP/s = 4*B*H*Lq*Lk*D, halved for causal) and at decode
shapes, attention with dense masks (causal, band, padding and random patterns), softmax vs
NumPy, GELU / tanh / sigmoid vs NumPy, layer / RMS norm, additive
attention vs its reference, Nadaraya-Watson pooling, the products of a decoding step on
packed float32 and bfloat16 weights vs ``x @ W.T``, float32 matmul / linear vs NumPy, a top-p
sampling step and a beam-search ranking vs NumPy and torch, the fixed cost of a call of each
public kernel on a tiny input vs torch (section ``calls``); finally the peak memory of
``attention`` at length 16384 (it must show no len^2 buffer).
Ratios > 1 mean attncore is faster. In the attention and decode rows,
attncore and torch take turns (``_harness.best_times_interleaved``), so a slow stretch of the
machine falls on both.
"""
import subprocess
import sys
import os

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

import attncore  # noqa: E402
from attncore import reference  # noqa: E402

PREFILL = [(1, 8, 128, 64), (8, 8, 128, 64), (8, 8, 512, 64), (1, 12, 2048, 64), (1, 8, 8192, 64)]
DECODE = [(8, 512), (8, 4096), (64, 512), (64, 4096)]   # (batch*heads, kv_len), q_len 1, D 64
QUICK_PREFILL = [(1, 8, 128, 64), (2, 8, 256, 64)]
QUICK_DECODE = [(8, 512)]


def numpy_attention(q, k, v, causal):
    return reference.attention(q, k, v, causal=causal)


def _taking_turns(engines, torch, rounds, repeats):
    """(attncore seconds, torch seconds or NaN): the two taking turns
    (``_harness.best_times_interleaved``), torch under ``inference_mode`` for the whole
    measurement (entering it per call would add its cost to torch's time)."""
    if torch is None:
        return H.best_times_interleaved(engines, rounds, repeats)["attncore"], float("nan")
    with torch.inference_mode():
        times = H.best_times_interleaved(engines, rounds, repeats)
    return times["attncore"], times["torch"]


def run_attention(shapes, threads, torch, rows, quick):
    rng = np.random.default_rng(0)
    for (B, Hh, L, D) in shapes:
        for causal in (False, True):
            q, k, v = (rng.standard_normal((B, Hh, L, D), dtype=np.float32) for _ in range(3))
            flops = 4 * B * Hh * L * L * D * (0.5 if causal else 1.0)
            long = L >= 4096
            engines = {"attncore": lambda: attncore.attention(q, k, v, causal=causal)}
            if torch is not None:
                tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
                sdpa = torch.nn.functional.scaled_dot_product_attention
                engines["torch"] = lambda: sdpa(tq, tk, tv, is_causal=causal)
            t_ac, t_th = _taking_turns(engines, torch, rounds=2 if long else 3,
                                       repeats=1 if long else 3)
            t_np = (H.best_time(lambda: numpy_attention(q, k, v, causal), 2)
                    if L <= 2048 else float("nan"))
            rows.append((threads, f"attention B={B} H={Hh} L={L} D={D}{' causal' if causal else ''}",
                         t_ac, flops / t_ac / 1e9, t_np, t_th))


def run_decode(shapes, threads, torch, rows):
    rng = np.random.default_rng(1)
    for (bh, L) in shapes:
        B, Hh = (bh // 8, 8)
        q = rng.standard_normal((B, Hh, 1, 64), dtype=np.float32)
        k, v = (rng.standard_normal((B, Hh, L, 64), dtype=np.float32) for _ in range(2))
        flops = 4 * bh * L * 64
        engines = {"attncore": lambda: attncore.attention(q, k, v)}
        if torch is not None:
            tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
            sdpa = torch.nn.functional.scaled_dot_product_attention
            engines["torch"] = lambda: sdpa(tq, tk, tv)
        t_ac, t_th = _taking_turns(engines, torch, rounds=3, repeats=10)
        t_np = H.best_time(lambda: numpy_attention(q, k, v, False), 5)
        rows.append((threads, f"decode q_len=1 B*H={bh} kv_len={L} D=64", t_ac,
                     flops / t_ac / 1e9, t_np, t_th))


def _masks(rng, B, L):
    """Dense masks of a (B, ., L, L) problem, by name: a causal pattern, a band of 128 keys
    (sliding window), padding of half the keys of one batch entry, and 80% kept at random."""
    tril = np.tril(np.ones((L, L), bool))
    padding = np.ones((B, 1, 1, L), bool)
    padding[0, ..., L // 2:] = False
    return {"tril": tril, "band 128": tril & ~np.tril(np.ones((L, L), bool), -128),
            "padding (B,1,1,L)": padding, "random 80% (B,1,L,L)": rng.random((B, 1, L, L)) < 0.8}


def run_masked(threads, torch, rows, quick):
    """attention(mask=...) at prefill shapes with the masks of _masks, and decoding (q_len 1)
    with a padding mask; torch takes the same boolean mask (attn_mask)."""
    rng = np.random.default_rng(5)
    shapes = [(2, 4, 256, 64)] if quick else [(4, 8, 512, 64), (1, 8, 2048, 64)]
    cases = []
    for (B, Hh, L, D) in shapes:
        q, k, v = (rng.standard_normal((B, Hh, L, D), dtype=np.float32) for _ in range(3))
        for name, mask in _masks(rng, B, L).items():
            cases.append((f"attention mask={name} B={B} H={Hh} L={L} D={D}", q, k, v, mask))
    for (bh, L) in ([(8, 512)] if quick else [(64, 512), (64, 4096)]):
        q = rng.standard_normal((bh // 8, 8, 1, 64), dtype=np.float32)
        k, v = (rng.standard_normal((bh // 8, 8, L, 64), dtype=np.float32) for _ in range(2))
        mask = np.ones((bh // 8, 1, 1, L), bool)
        mask[0, ..., L // 2:] = False
        cases.append((f"decode mask=padding q_len=1 B*H={bh} kv_len={L} D=64", q, k, v, mask))
    for name, q, k, v, mask in cases:
        engines = {"attncore": lambda: attncore.attention(q, k, v, mask=mask)}
        if torch is not None:
            tq, tk, tv, tm = (torch.from_numpy(x) for x in (q, k, v, mask))
            sdpa = torch.nn.functional.scaled_dot_product_attention
            engines["torch"] = lambda: sdpa(tq, tk, tv, attn_mask=tm)
        long = q.shape[2] >= 2048
        t_ac, t_th = _taking_turns(engines, torch, rounds=2 if long else 3,
                                   repeats=1 if long else 3)
        t_np = (H.best_time(lambda: reference.attention(q, k, v, mask=mask), 2)
                if q.size * k.shape[2] <= 2 ** 26 else float("nan"))
        rows.append((threads, name, t_ac, float("nan"), t_np, t_th))


def run_softmax(threads, torch, rows, quick):
    rng = np.random.default_rng(2)
    for shape in ([(64, 1024)] if quick else [(4096, 1024), (256, 8192)]):
        x = rng.standard_normal(shape, dtype=np.float32)

        def np_softmax():
            e = np.exp(x - x.max(-1, keepdims=True))
            return e / e.sum(-1, keepdims=True)
        t_ac = H.best_time(lambda: attncore.softmax(x), 10)
        t_np = H.best_time(np_softmax, 5)
        t_th = float("nan")
        if torch is not None:
            tx = torch.from_numpy(x)
            t_th = H.best_time(lambda: torch.softmax(tx, -1), 10)
        rows.append((threads, f"softmax {shape[0]}x{shape[1]}", t_ac, float("nan"), t_np, t_th))


def run_activations(threads, torch, rows, quick):
    """GELU (erf and tanh forms), tanh and sigmoid on a Transformer FFN's hidden activations
    (rows x 2048) against the NumPy reference (float64 erf through scipy for GELU, as the
    oracle computes it; NumPy's own float32 tanh) and torch's float32 functions."""
    rng = np.random.default_rng(5)
    for shape in ([(16, 2048)] if quick else [(64, 2048), (1024, 2048)]):
        x = (2 * rng.standard_normal(shape)).astype(np.float32)
        for name, numpy_fn in (("gelu", lambda: reference.gelu(x)),
                               ("gelu_tanh", lambda: reference.gelu_tanh(x)),
                               ("tanh", lambda: np.tanh(x)),
                               ("sigmoid", lambda: reference.sigmoid(x))):
            fn = getattr(attncore, name)
            t_ac = H.best_time(lambda: fn(x), 20)
            t_np = H.best_time(numpy_fn, 5)
            t_th = float("nan")
            if torch is not None:
                tx = torch.from_numpy(x)
                F = torch.nn.functional
                torch_fn = {"gelu": lambda: F.gelu(tx),
                            "gelu_tanh": lambda: F.gelu(tx, approximate="tanh"),
                            "tanh": lambda: torch.tanh(tx),
                            "sigmoid": lambda: torch.sigmoid(tx)}[name]
                with torch.inference_mode():
                    t_th = H.best_time(torch_fn, 20)
            rows.append((threads, f"{name} {shape[0]}x{shape[1]}", t_ac, float("nan"), t_np, t_th))


def run_norm(threads, torch, rows, quick):
    """float32 layer norm (with gamma and beta) and RMS norm over rows of a Transformer's width
    against the NumPy reference (on the float32 input, as a user would call it) and torch's
    ``layer_norm`` / ``rms_norm``."""
    rng = np.random.default_rng(6)
    for shape in ([(16, 512)] if quick else [(64, 512), (4096, 512), (1024, 2048)]):
        x = (1 + 2 * rng.standard_normal(shape)).astype(np.float32)
        gamma, beta = rng.standard_normal((2, shape[1])).astype(np.float32)
        for mode in ("standard", "rms"):
            affine = (gamma, beta) if mode == "standard" else (gamma, None)
            t_ac = H.best_time(lambda: attncore.layer_norm(x, *affine, mode=mode), 20)
            t_np = H.best_time(lambda: reference.layer_norm(x, *affine, mode=mode), 5)
            t_th = float("nan")
            if torch is not None:
                tx, tg, tb = (torch.from_numpy(a) for a in (x, gamma, beta))
                F = torch.nn.functional
                if mode == "standard":
                    torch_fn = lambda: F.layer_norm(tx, (shape[1],), tg, tb, 1e-5)  # noqa: E731
                else:
                    torch_fn = lambda: F.rms_norm(tx, (shape[1],), tg, 1e-5)  # noqa: E731
                with torch.inference_mode():
                    t_th = H.best_time(torch_fn, 20)
            name = "layer_norm" if mode == "standard" else "rms_norm"
            rows.append((threads, f"{name} {shape[0]}x{shape[1]}", t_ac, float("nan"), t_np, t_th))


def run_additive(threads, torch, rows, quick):
    """Three uses: a whole call (keys projected inside, as in the textbook formula) and two
    decoder steps, keys projected once per source: as a plain array (``w_k=None``), and as an
    ``attncore.AdditiveKeys`` that also keeps the split tanh's key factors (made once per source
    like the projection, outside the timing). The reference gets the same pre-projected keys in
    both step cases, so the query projection + scores + softmax + sum are compared."""
    rng = np.random.default_rng(3)
    cases = ([(8, 8, 32, 64), (8, 1, 32, 64)] if quick
             else [(64, 1, 24, 256), (64, 24, 24, 256), (16, 1, 256, 256)])
    for (B, Lq, Lk, hidden) in cases:
        dim = hidden
        qs = rng.standard_normal((B, Lq, dim), dtype=np.float32)
        ks = rng.standard_normal((B, Lk, dim), dtype=np.float32)
        vs = rng.standard_normal((B, Lk, dim), dtype=np.float32)
        wq, wk = (rng.standard_normal((dim, hidden), dtype=np.float32) * 0.1 for _ in range(2))
        wv = rng.standard_normal(hidden, dtype=np.float32)
        t_ac = H.best_time(lambda: attncore.additive_attention(qs, ks, vs, wq, wk, wv), 10)
        t_np = H.best_time(lambda: reference.additive_attention(qs, ks, vs, wq, wk, wv), 5)
        rows.append((threads, f"additive B={B} Lq={Lq} Lk={Lk} hidden={hidden}", t_ac,
                     float("nan"), t_np, float("nan")))
        k_proj = attncore.project_keys(ks, wk)
        t_ac = H.best_time(lambda: attncore.additive_attention(qs, k_proj, vs, wq, None, wv), 10)
        t_np = H.best_time(lambda: reference.additive_attention(qs, k_proj, vs, wq, None, wv), 5)
        rows.append((threads, f"additive step (keys pre-projected) B={B} Lq={Lq} Lk={Lk} "
                     f"hidden={hidden}", t_ac, float("nan"), t_np, float("nan")))
        cached = attncore.AdditiveKeys(k_proj)
        t_ac = H.best_time(lambda: attncore.additive_attention(qs, cached, vs, wq, None, wv), 10)
        rows.append((threads, f"additive step (AdditiveKeys) B={B} Lq={Lq} Lk={Lk} "
                     f"hidden={hidden}", t_ac, float("nan"), t_np, float("nan")))


def run_pooling(threads, torch, rows, quick):
    """Nadaraya-Watson attention pooling (Gaussian kernel, bandwidth 1) against the NumPy
    reference and torch written the usual way: ``softmax(-cdist(q, k)^2 / 2) @ v`` (cdist
    expands ||q||^2 + ||k||^2 - 2 q.k in float32; attncore in float64, exact where rounding
    could move a weight). Shapes (queries, keys, features, value width): the seeds' 1-D
    regression and feature pooling."""
    rng = np.random.default_rng(7)
    cases = ([(256, 256, 1, 1), (128, 256, 16, 16)] if quick
             else [(2048, 2048, 1, 1), (512, 4096, 16, 16), (1024, 1024, 64, 64)])
    for (Nq, Nk, D, Dv) in cases:
        q, k = (rng.standard_normal((n, D), dtype=np.float32) for n in (Nq, Nk))
        v = rng.standard_normal((Nk, Dv), dtype=np.float32)
        t_ac = H.best_time(lambda: attncore.nadaraya_watson(q, k, v), 10)
        t_np = H.best_time(lambda: reference.nadaraya_watson(q, k, v), 3)
        t_th = float("nan")
        if torch is not None:
            tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
            with torch.inference_mode():
                t_th = H.best_time(
                    lambda: torch.softmax(-torch.cdist(tq, tk) ** 2 / 2, dim=-1) @ tv, 10)
        rows.append((threads, f"nadaraya_watson {Nq}x{Nk} d={D} dv={Dv}", t_ac, float("nan"),
                     t_np, t_th))


# the six products of the seq2seq benchmark's decoder step (bench/models.py): attention query,
# GRU layer 1 (input [context; embedding] and recurrent), GRU layer 2, vocabulary projection
STEP_WEIGHTS = [(256, 256), (768, 512), (768, 256), (768, 256), (768, 256), (4000, 256)]


def run_packed(threads, torch, rows, quick):
    """The products of a decoding step on packed weights, float32, bfloat16 and int8 panels,
    one after another like the step runs them (2.07M weights: 8.3 / 4.1 / 2.1 MB), against the
    reference's ``x @ W.T + b`` and torch's ``F.linear`` on the float32 weights. int8 runs
    AVX-512 VNNI and AMX where the CPU has them (``attncore.info()``; ATTNCORE_FORCE_ISA=avx512
    leaves AMX out)."""
    rng = np.random.default_rng(4)
    shapes = [(64, 64), (192, 64)] if quick else STEP_WEIGHTS
    weights = [rng.standard_normal(shape, dtype=np.float32) * 0.05 for shape in shapes]
    biases = [rng.standard_normal(shape[0], dtype=np.float32) for shape in shapes]
    macs = sum(n * k for n, k in shapes)
    for dtype in attncore.kernels.WEIGHT_DTYPES:
        packed = [attncore.kernels.PackedLinearWeight(w, dtype) for w in weights]
        for m in ([1, 17] if quick else [1, 4, 16, 17, 64]):
            xs = [rng.standard_normal((m, k), dtype=np.float32) for _, k in shapes]

            def ours():
                for x, w, b in zip(xs, packed, biases):
                    attncore.linear(x, w, b)

            def ref():
                for x, w, b in zip(xs, weights, biases):
                    reference.linear(x, w, b)
            t_ac, t_np = H.best_time(ours, 20), H.best_time(ref, 10)
            t_th = float("nan")
            if torch is not None:
                tw = [(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b))
                      for x, w, b in zip(xs, weights, biases)]

                def theirs():
                    for x, w, b in tw:
                        torch.nn.functional.linear(x, w, b)
                t_th = H.best_time(theirs, 20)
            rows.append((threads, f"step products ({dtype} panels) rows={m}", t_ac,
                         2 * m * macs / t_ac / 1e9, t_np, t_th))


# (M, K, N): a batch of decoder queries times an attention weight, wider outputs (B rows 4 KiB
# apart: copied into panels), a block of tokens through a Transformer layer's QKV projection
MATMUL_SHAPES = [(24, 256, 256), (64, 256, 256), (64, 256, 1024), (256, 512, 512),
                 (1024, 512, 1536)]


CALLS_PER_SAMPLE = 200


def _tiny_calls(torch):
    """(name, attncore call, torch call or None) on inputs of a few hundred elements, where a
    call's time is its fixed cost: the Python front's checks, the wrapper, the thread team."""
    rng = np.random.default_rng(9)

    def f32(*shape):
        return rng.standard_normal(shape).astype(np.float32)
    x, gamma, beta, w = f32(4, 64), f32(64), f32(64), f32(64, 64)
    q, kv = f32(1, 2, 1, 64), f32(1, 2, 16, 64)
    table, ids = f32(100, 64), np.array([1, 2, 3])
    lengths = np.array([9])
    queries, keys, w_q, w_k, w_v = f32(1, 1, 64), f32(1, 16, 64), f32(64, 32), f32(64, 32), f32(32)
    calls = [("softmax (4, 64)", lambda: attncore.softmax(x), "softmax"),
             ("log_softmax (4, 64)", lambda: attncore.log_softmax(x), "log_softmax"),
             ("layer_norm (4, 64)", lambda: attncore.layer_norm(x, gamma, beta), "layer_norm"),
             ("linear (4, 64) x (64, 64)", lambda: attncore.linear(x, w, beta), "linear"),
             ("matmul (4, 64) x (64, 64)", lambda: attncore.matmul(x, w), "matmul"),
             ("relu (4, 64)", lambda: attncore.relu(x), "relu"),
             ("sigmoid (4, 64)", lambda: attncore.sigmoid(x), "sigmoid"),
             ("embedding 3 ids of (100, 64)", lambda: attncore.embedding(table, ids), "embedding"),
             ("attention q_len 1, kv_len 16, 2 heads",
              lambda: attncore.attention(q, kv, kv), "sdpa"),
             ("attention, kv_lengths", lambda: attncore.attention(q, kv, kv, kv_lengths=lengths),
              "sdpa_lengths"),
             ("additive_attention q_len 1, kv_len 16",
              lambda: attncore.additive_attention(queries, keys, keys, w_q, w_k, w_v), None),
             ("nadaraya_watson 1 x 16", lambda: attncore.nadaraya_watson(queries[0], keys[0],
                                                                       keys[0]), None)]
    peers = {}
    if torch is not None:
        F = torch.nn.functional
        tx, tg, tb, tw = (torch.from_numpy(a) for a in (x, gamma, beta, w))
        tq, tkv, ttable, tids = (torch.from_numpy(a) for a in (q, kv, table, ids))
        tmask = torch.from_numpy(np.arange(16)[None, None, None, :] < lengths[:, None, None, None])
        peers = {"softmax": lambda: torch.softmax(tx, -1),
                 "log_softmax": lambda: torch.log_softmax(tx, -1),
                 "layer_norm": lambda: F.layer_norm(tx, (64,), tg, tb),
                 "linear": lambda: F.linear(tx, tw, tb), "matmul": lambda: torch.matmul(tx, tw),
                 "relu": lambda: F.relu(tx), "sigmoid": lambda: torch.sigmoid(tx),
                 "embedding": lambda: F.embedding(tids, ttable),
                 "sdpa": lambda: F.scaled_dot_product_attention(tq, tkv, tkv),
                 "sdpa_lengths": lambda: F.scaled_dot_product_attention(tq, tkv, tkv,
                                                                        attn_mask=tmask)}
    return [(name, ours, peers.get(peer)) for name, ours, peer in calls]


def run_calls(threads, torch, calls_rows, quick):
    """The fixed cost of one call of each public kernel on a tiny input, attncore and torch
    taking turns; a sample is a loop of CALLS_PER_SAMPLE calls (one call is a few us, near
    the timer's own cost). Rows: (threads, name, attncore s a call, torch s a call or NaN)."""
    loops = 20 if quick else CALLS_PER_SAMPLE

    def looped(fn):
        def run():
            for _ in range(loops):
                fn()
        return run
    for name, ours, peer in _tiny_calls(torch):
        engines = {"attncore": looped(ours)}
        if peer is not None:
            engines["torch"] = looped(peer)
        t_ac, t_th = _taking_turns(engines, torch if peer is not None else None, rounds=3,
                                   repeats=10)
        calls_rows.append((threads, name, t_ac / loops, t_th / loops))


def run_matmul(threads, torch, rows, quick):
    """float32 ``attncore.matmul(a, b)`` and ``attncore.linear(x, w)`` (the tile kernel on AVX2
    machines, BLAS elsewhere) against NumPy's ``a @ b`` / ``x @ w.T`` (the reference's BLAS)
    and torch's ``matmul`` / ``F.linear``."""
    rng = np.random.default_rng(5)
    for (M, K, N) in ([(24, 64, 80)] if quick else MATMUL_SHAPES):
        a = rng.standard_normal((M, K), dtype=np.float32)
        b = rng.standard_normal((K, N), dtype=np.float32)
        w = np.ascontiguousarray(b.T)
        for name, ours, ref, theirs in (
                ("matmul a.b", lambda: attncore.matmul(a, b), lambda: a @ b,
                 (lambda ta, tb, tw: torch.matmul(ta, tb))),
                ("linear x.W^T", lambda: attncore.linear(a, w), lambda: a @ w.T,
                 (lambda ta, tb, tw: torch.nn.functional.linear(ta, tw)))):
            t_ac, t_np = H.best_time(ours, 20), H.best_time(ref, 20)
            t_th = float("nan")
            if torch is not None:
                ta, tb, tw = (torch.from_numpy(x) for x in (a, b, w))
                t_th = H.best_time(lambda: theirs(ta, tb, tw), 20)
            rows.append((threads, f"{name} M={M} K={K} N={N}", t_ac, 2 * M * K * N / t_ac / 1e9,
                         t_np, t_th))


def _numpy_top_p(scores, stream, top_p):
    """A plain NumPy nucleus draw for one row (the reference): softmax, a stable sort of the
    whole row, the smallest prefix reaching ``top_p``, one uniform number."""
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    ranked = probs[order]
    keep = np.concatenate(([0.0], np.cumsum(ranked)[:-1])) < top_p
    keep[0] = True
    cdf = np.cumsum(ranked[keep])
    return order[min(int(np.searchsorted(cdf, stream.random() * cdf[-1], "right")),
                     int(keep.sum()) - 1)]


def run_sampling(threads, torch, rows, quick):
    """The per-step work of the searches besides the model. One sampling step's token choice for one row of log-probabilities, top_p=0.9
    (``generation._sample_rows``, what ``generate(do_sample=True)`` runs a step), against the
    plain NumPy nucleus above and torch's (a descending sort, softmax, cumsum, mask,
    ``multinomial``: transformers' TopPLogitsWarper). A flat row (a nucleus of thousands of
    tokens: an open-ended language model) and a peaked one (hundreds)."""
    from attncore import generation
    from attncore.kernels import _softmax
    rng = np.random.default_rng(6)
    for vocab in ([2000] if quick else [8000, 32000]):
        for kind, alpha in (("flat", 1.0), ("peaked", 0.05)):
            logp = np.log(rng.dirichlet(np.full(vocab, alpha)) + 1e-30).astype(np.float32)
            scores = logp[None, :]
            stream = np.random.default_rng(0)
            t_ac = H.best_time(lambda: generation._sample_rows(scores, [stream], 1.0, 0, 0.9),
                               20)
            row = logp.astype(np.float64)
            t_np = H.best_time(lambda: _numpy_top_p(row, stream, 0.9), 20)
            t_th = float("nan")
            if torch is not None:
                logits = torch.from_numpy(scores.copy())

                def theirs():
                    ranked, order = torch.sort(logits, descending=True)
                    mass = ranked.softmax(-1).cumsum(-1)
                    drop = mass > 0.9
                    drop[..., 1:] = drop[..., :-1].clone()
                    drop[..., 0] = False
                    masked = logits.scatter(1, order, ranked.masked_fill(drop, -float("inf")))
                    return torch.multinomial(masked.softmax(-1), 1)
                t_th = H.best_time(theirs, 20)
            rows.append((threads, f"sample top_p=0.9 V={vocab} ({kind})", t_ac, float("nan"),
                         t_np, t_th))
    # beam search's ranking a step: each source's best 2 x beam of its beams' cumulative
    # log-prob + token log-probs (_softmax.beam_top_k), against NumPy (the float64 sums, a
    # partition per source and a sort of the kept) and torch (transformers' beam search: topk
    # of the flattened sums)
    beam = 4
    for sources in ([2] if quick else [1, 16]):
        vocab = 2000 if quick else 8000
        scores = np.log(rng.dirichlet(np.full(vocab, 0.1), size=sources * beam)).astype(np.float32)
        base = rng.standard_normal(sources * beam) - 5.0
        bounds = np.arange(0, sources * beam + 1, beam, dtype=np.int64)
        t_ac = H.best_time(lambda: _softmax.beam_top_k(scores, base, bounds, 2 * beam), 20)

        def numpy_ranking():
            sums = (scores.astype(np.float64) + base[:, None]).reshape(sources, -1)
            kept = [np.argpartition(-row, 2 * beam)[:2 * beam] for row in sums]
            return [part[np.argsort(-row[part], kind="stable")] for row, part in zip(sums, kept)]
        t_np = H.best_time(numpy_ranking, 10)
        t_th = float("nan")
        if torch is not None:
            tscores, tbase = torch.from_numpy(scores), torch.from_numpy(base)
            t_th = H.best_time(lambda: torch.topk((tscores.double() + tbase[:, None])
                                                  .view(sources, -1), 2 * beam), 20)
        rows.append((threads, f"beam ranking beam={beam} sources={sources} V={vocab}", t_ac,
                     float("nan"), t_np, t_th))


PEAK_SNIPPET = """
import resource, sys, numpy as np, attncore
L = int(sys.argv[1])
q, k, v = (np.random.default_rng(0).standard_normal((1, 1, L, 64), dtype=np.float32) for _ in range(3))
attncore.set_num_threads(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
attncore.attention(q, k, v, causal=True)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(before, after)
"""


def peak_memory(L):
    """Peak RSS growth (MiB) of one attention call at length L, in a fresh process."""
    out = subprocess.run([sys.executable, "-c", PEAK_SNIPPET, str(L)], capture_output=True,
                         text=True, check=True).stdout.split()
    return (int(out[1]) - int(out[0])) / 1024


SECTIONS = ("attention", "decode", "masked", "softmax", "activations", "norm", "additive",
            "pooling", "packed", "matmul", "sampling", "calls")


def main(argv=None):
    parser = H.OneLineErrorParser(prog=H.bench_prog(), description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    parser.add_argument("--threads", type=H.thread_count, nargs="+", default=[1, 2])
    parser.add_argument("--no-torch", action="store_true",
                        help="leave torch out (not even imported)")
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS),
                        help="run these sections only (the peak-memory check runs with attention)")
    args = parser.parse_args(argv)
    if H.checking_arguments():
        return 0
    torch = None if args.no_torch else H.try_import_torch()
    print(f"# {' '.join(['python', 'bench/kernels.py'] + (argv if argv is not None else sys.argv[1:]))}")
    print(f"# machine: {H.machine_description(with_torch=not args.no_torch)}")
    rows = []
    calls_rows = []
    gemm = {}
    for threads in args.threads:
        with H.set_threads(threads, with_torch=not args.no_torch):
            gemm[threads] = H.sgemm_gflops(512 if args.quick else 2048)
            if "attention" in args.only:
                run_attention(QUICK_PREFILL if args.quick else PREFILL, threads, torch, rows,
                              args.quick)
            if "decode" in args.only:
                run_decode(QUICK_DECODE if args.quick else DECODE, threads, torch, rows)
            if "masked" in args.only:
                run_masked(threads, torch, rows, args.quick)
            if "softmax" in args.only:
                run_softmax(threads, torch, rows, args.quick)
            if "activations" in args.only:
                run_activations(threads, torch, rows, args.quick)
            if "norm" in args.only:
                run_norm(threads, torch, rows, args.quick)
            if "additive" in args.only:
                run_additive(threads, torch, rows, args.quick)
            if "pooling" in args.only:
                run_pooling(threads, torch, rows, args.quick)
            if "packed" in args.only:
                run_packed(threads, torch, rows, args.quick)
            if "matmul" in args.only:
                run_matmul(threads, torch, rows, args.quick)
            if "sampling" in args.only:
                run_sampling(threads, torch, rows, args.quick)
            if "calls" in args.only:
                run_calls(threads, torch, calls_rows, args.quick)
    print()
    print("| threads | workload | attncore ms | GFLOP/s | % of sgemm | vs NumPy ref | vs torch |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for threads, name, t_ac, gf, t_np, t_th in rows:
        pct = f"{100 * gf / gemm[threads]:5.0f}%" if np.isfinite(gf) else "  -  "
        gfs = f"{gf:7.1f}" if np.isfinite(gf) else "   -   "
        print(f"| {threads} | {name} | {t_ac * 1e3:9.3f} | {gfs} | {pct} | "
              f"{H.fmt_ratio(t_np / t_ac)} | {H.fmt_ratio(t_th / t_ac)} |")
    if calls_rows:
        print()
        print("| threads | one call on a tiny input | attncore us | torch us | vs torch |")
        print("|---:|---|---:|---:|---:|")
        for threads, name, t_ac, t_th in calls_rows:
            torch_us = f"{t_th * 1e6:.2f}" if np.isfinite(t_th) else "-"
            print(f"| {threads} | {name} | {t_ac * 1e6:.2f} | {torch_us} | "
                  f"{H.fmt_ratio(t_th / t_ac)} |")
    print()
    print("| threads | NumPy sgemm GFLOP/s (same run) |")
    print("|---:|---:|")
    for threads, g in gemm.items():
        print(f"| {threads} | {g:.1f} |")
    # thread scaling of the large shapes
    by_name = {}
    for threads, name, t_ac, *_ in rows:
        by_name.setdefault(name, {})[threads] = t_ac
    if len(args.threads) >= 2:
        a, b = args.threads[0], args.threads[1]
        scaling = [(name, ts[a] / ts[b]) for name, ts in by_name.items()
                   if a in ts and b in ts and name.startswith("attention") and "L=128" not in name]
        if scaling:   # (the large attention shapes only: no header without them)
            print()
            print(f"| workload | speed-up {b} vs {a} threads |")
            print("|---|---:|")
            for name, speedup in scaling:
                print(f"| {name} | {speedup:.2f}x |")
    if "attention" not in args.only:
        return
    L = 2048 if args.quick else 16384
    grow = peak_memory(L)
    score_mib = L * L * 4 / 2 ** 20
    print()
    print(f"peak RSS growth of attention(1x1x{L}x64, causal): {grow:.1f} MiB "
          f"(a materialised {L}x{L} float32 score matrix alone would be {score_mib:.0f} MiB)")


if __name__ == "__main__":
    H.run_main(main)
