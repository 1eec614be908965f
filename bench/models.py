# SPDX-License-Identifier: Apache-2.0
"""Model benchmarks: attncore's engine beside PyTorch and CTranslate2 on identical weights.

    python bench/models.py [--threads 1 2] [--only transformer seq2seq ran ran-lm] [--quick]
                           [--beam 4]

* transformer: Transformer-base (d 512, 6+6 layers, 8 heads, FFN 2048, vocab 8000, pre-norm),
  24-token sources, exactly 24 greedy steps (``--beam N``: beam search, attncore and
  CTranslate2 only), batch 1 and 16. Peers: torch ``nn.Transformer``
  (greedy without a KV cache, as users write it) and CTranslate2 float32 / int8, its weights
  filled through the spec API (see shared/peers/transformer_peers.py). attncore gets the same
  weights through ``attncore.convert.from_pytorch_transformer``.
* seq2seq: Bahdanau GRU encoder-decoder (embedding 256, hidden 256, 2 layers, vocab 4000,
  the d2l.ai layout), 24 -> 24 greedy, batch 1 and 64, against the same model in torch eager,
  in float32 and dynamically quantized to int8 (``torch.ao.quantization.quantize_dynamic``).
* ran: RAN encode (d 512, 8 heads of 64, window 256, 2 layers) of 2k..100k-token documents:
  tokens/s and peak traced memory (and tokens/s with int8 weights), beside an attncore
  Transformer encoder of the same width
  (2 layers, FFN 2048) on the lengths where quadratic attention stays affordable.
* ran-lm: generation with a causal RAN language model of the same shape (``token_head="lm"``):
  200-token prompts continued by 128 greedy tokens (crossing a window's end), batch 1 and 4,
  beside the same tokens fed one call at a time through ``token_logits`` with the carried
  state (the window recomputed at each token, as ``generate`` did before its window cache),
  and an attncore decoder-only Transformer of the same width (2 layers, FFN 2048, KV cache).

attncore runs three times: float32 weights, ``weight_dtype="bfloat16"`` (weight matrices rounded
to bfloat16, half the bytes per decoding step) and ``weight_dtype="int8"`` (products quantized
to int8, a quarter of the bytes); the token agreement of the last two is with attncore float32.

Every row is measured in one process and the same minute, the engines of a row taking turns
(``best_times_interleaved``: a slow stretch of the VM then costs each of them one block, not one
of them its whole measurement); ratios are what to read. Token
agreement with the first peer is printed so a fast wrong answer cannot hide. Asked for several
families, the script runs each in a process of its own: torch's eager speed depends on what ran
before it in a process (its batch-1 seq2seq ran 2.7x slower after the Transformer and
CTranslate2 rows), and a ratio should not measure that.
"""
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import (OneLineErrorParser, bench_prog, best_time,  # noqa: E402
                      best_times_interleaved, checking_arguments, machine_description, run_main,
                      set_threads, thread_count, try_import_torch)

import attncore  # noqa: E402
from attncore import io  # noqa: E402
from attncore.models.base import MAX_BEAM_SIZE  # noqa: E402

SRC_LEN = TGT_LEN = 24
# the weight dtypes attncore runs besides float32: (row key, weight_dtype)
VARIANTS = (("bf16", "bfloat16"), ("int8", "int8"))


def _agreement(a, b):
    """Share of equal tokens between two lists of token lists, position by position over the
    longer of each pair of rows: a token one side lacks (a shorter or missing row) counts as a
    disagreement (zip dropped them, and a truncated output agreed 1.00)."""
    if len(a) < len(b):
        a = list(a) + [[]] * (len(b) - len(a))
    if len(b) < len(a):
        b = list(b) + [[]] * (len(a) - len(b))
    total = sum(max(len(ra), len(rb)) for ra, rb in zip(a, b))
    equal = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    return equal / total if total else float("nan")


# ------------------------------------------------------------------------------ Transformer

def _torch_transformer(torch, D, H, L, FF, V, positions):
    class TorchNMT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.src_emb = torch.nn.Embedding(V, D)
            self.tgt_emb = torch.nn.Embedding(V, D)
            self.core = torch.nn.Transformer(D, H, L, L, FF, dropout=0.0, batch_first=True,
                                             norm_first=True)
            self.proj = torch.nn.Linear(D, V)
            self.register_buffer("pe", torch.from_numpy(positions))

        def embed(self, emb, ids):
            return emb(ids) * D ** 0.5 + self.pe[: ids.shape[1]]

        @torch.inference_mode()
        def greedy(self, src, steps, bos=1):
            memory = self.core.encoder(self.embed(self.src_emb, src))
            out = torch.full((src.shape[0], 1), bos, dtype=torch.long)
            for _ in range(steps):
                mask = self.core.generate_square_subsequent_mask(out.shape[1])
                h = self.core.decoder(self.embed(self.tgt_emb, out), memory, tgt_mask=mask,
                                      tgt_is_causal=True)
                out = torch.cat([out, self.proj(h[:, -1]).argmax(-1, keepdim=True)], 1)
            return out[:, 1:]

    torch.manual_seed(0)
    model = TorchNMT().eval()
    with torch.no_grad():  # larger weights so that greedy outputs are not degenerate
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(1.5)
    return model


def _ctranslate2_dir(sd, L, H, D, V, path):
    """Fill CTranslate2's Transformer spec from the torch state dict (PEERS.md, section c)."""
    from ctranslate2.specs import transformer_spec
    spec = transformer_spec.TransformerSpec.from_config((L, L), H, pre_norm=True)

    def lin(s, w, b):
        s.weight, s.bias = sd[w], sd[b]

    def ln(s, p):
        s.gamma, s.beta = sd[p + ".weight"], sd[p + ".bias"]

    for side, emb in (("encoder", "src_emb"), ("decoder", "tgt_emb")):
        sp = getattr(spec, side)
        e = sp.embeddings[0] if isinstance(sp.embeddings, list) else sp.embeddings
        e.weight = sd[emb + ".weight"]
        sp.position_encodings.encodings = sd["pe"]
        ln(sp.layer_norm, f"core.{side}.norm")
        for i, layer in enumerate(sp.layer):
            p = f"core.{side}.layers.{i}"
            lin(layer.self_attention.linear[0], p + ".self_attn.in_proj_weight",
                p + ".self_attn.in_proj_bias")
            lin(layer.self_attention.linear[1], p + ".self_attn.out_proj.weight",
                p + ".self_attn.out_proj.bias")
            ln(layer.self_attention.layer_norm, p + ".norm1")
            lin(layer.ffn.linear_0, p + ".linear1.weight", p + ".linear1.bias")
            lin(layer.ffn.linear_1, p + ".linear2.weight", p + ".linear2.bias")
            if side == "decoder":
                w = sd[p + ".multihead_attn.in_proj_weight"]
                b = sd[p + ".multihead_attn.in_proj_bias"]
                layer.attention.linear[0].weight, layer.attention.linear[0].bias = w[:D], b[:D]
                layer.attention.linear[1].weight, layer.attention.linear[1].bias = w[D:], b[D:]
                lin(layer.attention.linear[2], p + ".multihead_attn.out_proj.weight",
                    p + ".multihead_attn.out_proj.bias")
                ln(layer.attention.layer_norm, p + ".norm2")
                ln(layer.ffn.layer_norm, p + ".norm3")
            else:
                ln(layer.ffn.layer_norm, p + ".norm2")
    lin(spec.decoder.projection, "proj.weight", "proj.bias")
    vocab = ["<blank>", "<s>", "</s>", "<unk>"] + [f"t{i}" for i in range(4, V)]
    spec.register_source_vocabulary(vocab)
    spec.register_target_vocabulary(vocab)
    spec.validate()
    spec.optimize(quantization=None)
    os.makedirs(path, exist_ok=True)
    spec.save(path)
    return vocab


def bench_transformer(threads_list, batches, torch, quick, rows, beam=1):
    D, H, L, FF, V = (128, 4, 2, 512, 1000) if quick else (512, 8, 6, 2048, 8000)
    positions = attncore.sinusoidal_positions(512, D)
    if torch is None:
        print("transformer: torch is absent, nothing to build the shared weights with; skipped")
        return
    try:
        import ctranslate2
    except ImportError:
        ctranslate2 = None
    model = _torch_transformer(torch, D, H, L, FF, V, positions)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    tmp = tempfile.mkdtemp(prefix="attncore-bench-")
    from attncore import convert
    ours_dir = convert.from_pytorch_transformer(
        sd, os.path.join(tmp, "attncore"), prefix="core.", num_heads=H, norm_first=True,
        scale_embedding=True, names={"src_embedding": "src_emb.weight",
                                     "tgt_embedding": "tgt_emb.weight", "positions": "pe",
                                     "output": "proj.weight", "output_bias": "proj.bias"})
    ours = attncore.load(ours_dir)
    variants = {name: attncore.load(ours_dir, weight_dtype=dtype) for name, dtype in VARIANTS}
    vocab = _ctranslate2_dir(sd, L, H, D, V, os.path.join(tmp, "ct2")) if ctranslate2 else None
    # the same sources at every thread count: a row's outputs (and token agreements) then
    # compare across thread rows, attncore's being identical by design
    rng = np.random.default_rng(0)
    sources_of = {B: rng.integers(4, V, size=(B, SRC_LEN)) for B in batches}
    for threads in threads_list:
        set_threads(threads, with_torch=torch is not None)
        for B in batches:
            src = sources_of[B]
            sources = [list(r) + [2] for r in src]          # every engine reads the same EOS
            row = {"threads": threads, "batch": B, "torch": None, "agree": float("nan")}

            def run_ours(model=ours):
                return model.generate(sources, max_length=TGT_LEN, min_length=TGT_LEN,
                                      beam_size=beam)
            got = [r.tokens for r in run_ours()]
            if beam == 1:   # the torch model decodes greedily only (no beam search to compare)
                tsrc = torch.from_numpy(np.array(sources))
                t_torch = best_time(lambda: model.greedy(tsrc, TGT_LEN), repeats=3, min_time=0)
                row.update(torch=B * TGT_LEN / t_torch,
                           agree=_agreement(got, model.greedy(tsrc, TGT_LEN).numpy().tolist()))
            engines = {"attncore": run_ours}
            engines.update({name: (lambda v=variant: run_ours(v))
                            for name, variant in variants.items()})
            ct2_runs = {}
            if ctranslate2 is not None:
                toks = [[vocab[i] for i in r] for r in sources]
                for compute in ("float32", "int8"):
                    tr = ctranslate2.Translator(os.path.join(tmp, "ct2"), device="cpu",
                                                compute_type=compute, intra_threads=threads,
                                                inter_threads=1)
                    ct2_runs[f"ct2-{compute}"] = (
                        lambda tr=tr: tr.translate_batch(toks, beam_size=beam,
                                                         max_decoding_length=TGT_LEN,
                                                         min_decoding_length=TGT_LEN))
            engines.update(ct2_runs)
            # (torch, 4-6x slower without a KV cache, is timed once above: the contested ratios
            # are attncore's against CTranslate2's, measured taking turns)
            times = best_times_interleaved(engines, rounds=2, repeats=2)
            row.update({name: B * TGT_LEN / t for name, t in times.items()})
            for name, variant in variants.items():
                row["agree_" + name] = _agreement([r.tokens for r in run_ours(variant)], got)
            for name, run_ct2 in ct2_runs.items():
                hyp = [[vocab.index(x) for x in r.hypotheses[0]] for r in run_ct2()]
                row["agree_ct2" if name == "ct2-float32" else "agree_ct2_int8"] = \
                    _agreement(got, hyp)
            rows.append(row)
            print(_transformer_line(row), flush=True)


def _transformer_line(r):
    ct32, ct8 = r.get("ct2-float32"), r.get("ct2-int8")

    def vs(ours, peer):
        return f"{ours / peer:5.2f}x" if peer else "  -  "
    return (f"| {r['threads']} | {r['batch']:3d} | {r['attncore']:8.1f} | {r['bf16']:8.1f} | "
            f"{r['int8']:8.1f} | "
            f"{(r['torch'] or float('nan')):8.1f} | {(ct32 or float('nan')):8.1f} | "
            f"{(ct8 or float('nan')):8.1f} | "
            f"{vs(r['attncore'], r['torch'])} | {vs(r['attncore'], ct32)} | "
            f"{vs(r['bf16'], ct32)} | {vs(r['int8'], ct8)} | {r['agree']:.2f} / "
            f"{r.get('agree_ct2', float('nan')):.2f} / {r['agree_bf16']:.2f} / "
            f"{r['agree_int8']:.2f} / {r.get('agree_ct2_int8', float('nan')):.2f} |")


# --------------------------------------------------------------------------------- seq2seq

def _torch_seq2seq(torch, E, HID, LAYERS, V):
    nn = torch.nn

    class Additive(nn.Module):
        def __init__(s):
            super().__init__()
            s.Wq = nn.Linear(HID, HID, bias=False)
            s.Wk = nn.Linear(HID, HID, bias=False)
            s.v = nn.Linear(HID, 1, bias=False)

        def forward(s, q, k, v):
            scores = s.v(torch.tanh(s.Wq(q)[:, :, None] + s.Wk(k)[:, None])).squeeze(-1)
            return torch.softmax(scores, -1) @ v

    class Seq2Seq(nn.Module):
        def __init__(s):
            super().__init__()
            s.semb = nn.Embedding(V, E)
            s.enc = nn.GRU(E, HID, LAYERS, batch_first=True)
            s.temb = nn.Embedding(V, E)
            s.att = Additive()
            s.dec = nn.GRU(E + HID, HID, LAYERS, batch_first=True)
            s.out = nn.Linear(HID, V)

        @torch.inference_mode()
        def greedy(s, src, steps, bos=1):
            enc, h = s.enc(s.semb(src))
            y = torch.full((src.shape[0],), bos, dtype=torch.long)
            outs = []
            for _ in range(steps):
                ctx = s.att(h[-1][:, None], enc, enc)
                o, h = s.dec(torch.cat([s.temb(y)[:, None], ctx], -1), h)
                y = s.out(o[:, 0]).argmax(-1)
                outs.append(y)
            return torch.stack(outs, 1)

    torch.manual_seed(0)
    return Seq2Seq().eval()


def _seq2seq_to_attncore(model, E, HID, LAYERS, V, path):
    """The torch model's weights under attncore's seq2seq names. Its decoder GRU reads
    [embedding ; context]; attncore's reads [context ; embedding]: swap the column blocks."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    config = {"architecture": "seq2seq_attention", "src_vocab_size": V, "tgt_vocab_size": V,
              "embed_dim": E, "hidden_size": HID, "num_layers": LAYERS, "rnn_type": "gru",
              "bidirectional": False, "attention": "bahdanau", "attention_dim": HID,
              "input_feeding": False, "packed_source": True, "dropout": 0.0, "dtype": "float32",
              "pad_id": 0, "bos_id": 1, "eos_id": 2, "unk_id": 3, "tokenizer": None}
    w = {"encoder.embedding.weight": sd["semb.weight"], "decoder.embedding.weight": sd["temb.weight"],
         "decoder.attention.query.weight": sd["att.Wq.weight"],
         "decoder.attention.key.weight": sd["att.Wk.weight"],
         "decoder.attention.score.weight": sd["att.v.weight"],
         "decoder.output.weight": sd["out.weight"], "decoder.output.bias": sd["out.bias"]}
    for k in range(LAYERS):
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            w[f"encoder.rnn.{name}_l{k}"] = sd[f"enc.{name}_l{k}"]
            w[f"decoder.rnn.{name}_l{k}"] = sd[f"dec.{name}_l{k}"]
    w["decoder.rnn.weight_ih_l0"] = np.concatenate(
        [sd["dec.weight_ih_l0"][:, E:], sd["dec.weight_ih_l0"][:, :E]], axis=1)
    return io.save_model_dir(path, config, w)


def bench_seq2seq(threads_list, batches, torch, quick, rows):
    E, HID, LAYERS, V = (64, 64, 2, 500) if quick else (256, 256, 2, 4000)
    if torch is None:
        print("seq2seq: torch is absent; skipped")
        return
    model = _torch_seq2seq(torch, E, HID, LAYERS, V)
    # torch's own int8 peer: dynamic quantization of the GRUs and linear layers (int8 weights,
    # activations quantized per call), as a torch user would quantize this model
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model_int8 = torch.ao.quantization.quantize_dynamic(
            model, {torch.nn.GRU, torch.nn.Linear}, dtype=torch.qint8)
    ours_dir = _seq2seq_to_attncore(model, E, HID, LAYERS, V,
                                    tempfile.mkdtemp(prefix="attncore-bench-"))
    ours = attncore.load(ours_dir)
    variants = {name: attncore.load(ours_dir, weight_dtype=dtype) for name, dtype in VARIANTS}
    # the same sources at every thread count: a row's outputs (and token agreements) then
    # compare across thread rows, attncore's being identical by design
    rng = np.random.default_rng(0)
    sources_of = {B: rng.integers(4, V, size=(B, SRC_LEN)) for B in batches}
    for threads in threads_list:
        set_threads(threads, with_torch=torch is not None)
        for B in batches:
            src = sources_of[B]
            tsrc = torch.from_numpy(src)
            want = model.greedy(tsrc, TGT_LEN).numpy().tolist()
            sources = [list(r) for r in src]

            def run_ours(model=ours):
                return model.generate(sources, max_length=TGT_LEN, min_length=TGT_LEN)
            engines = {"torch": lambda: model.greedy(tsrc, TGT_LEN),
                       "torch_int8": lambda: model_int8.greedy(tsrc, TGT_LEN),
                       "attncore": run_ours}
            engines.update({name: (lambda v=variant: run_ours(v))
                            for name, variant in variants.items()})
            times = best_times_interleaved(engines, rounds=3, repeats=3, min_time=0.3)
            got = [r.tokens for r in run_ours()]
            row = {"threads": threads, "batch": B,
                   "agree_torch_int8": _agreement(
                       got, model_int8.greedy(tsrc, TGT_LEN).numpy().tolist()),
                   "agree": _agreement(got, want)}
            row.update({name: B * TGT_LEN / t for name, t in times.items()})
            for name, variant in variants.items():
                row["agree_" + name] = _agreement([r.tokens for r in run_ours(variant)], got)
            rows.append(row)
            print(f"| {threads} | {B:3d} | {row['attncore']:9.1f} | {row['bf16']:9.1f} | "
                  f"{row['int8']:9.1f} | {row['torch']:9.1f} | {row['torch_int8']:9.1f} | "
                  f"{row['attncore'] / row['torch']:6.2f}x | "
                  f"{row['bf16'] / row['torch']:6.2f}x | {row['int8'] / row['torch']:6.2f}x | "
                  f"{row['int8'] / row['torch_int8']:6.2f}x | "
                  f"{row['agree']:.2f} / {row['agree_bf16']:.2f} / {row['agree_int8']:.2f} / "
                  f"{row['agree_torch_int8']:.2f} |", flush=True)


# ------------------------------------------------------------------------------------- RAN

def _timed(fn):
    """Seconds of one call of ``fn``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _traced(fn):
    """(seconds, peak bytes traced by tracemalloc -- NumPy reports its buffers -- , result)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    t = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return seconds, peak, result


def bench_ran(threads_list, lengths, quick, rows):
    d, heads, window, layers = (64, 4, 64, 2) if quick else (512, 8, 256, 2)
    V = 8000
    ran_config = {
        "architecture": "ran", "vocab_size": V, "embedding_size": d, "ran_layers": layers,
        "head_num": heads, "head_size": d // heads, "window_size": window,
        "min_window_size": window // 4, "cell_pooling": "last", "causal": False,
        "memory_review": True, "num_classes": 2, "token_head": "none", "num_token_classes": 0,
        "dropout": 0.0, "dtype": "float32", "pad_id": 0, "bos_id": 1, "eos_id": 2, "unk_id": 3,
        "tokenizer": None}
    ran = attncore.models.from_config(ran_config, seed=0)
    ran_int8 = attncore.models.from_config(ran_config, seed=0, weight_dtype="int8")
    encoder = attncore.models.from_config({
        "architecture": "transformer", "kind": "encoder_only", "src_vocab_size": V,
        "tgt_vocab_size": 0, "d_model": d, "num_heads": heads, "num_encoder_layers": layers,
        "num_decoder_layers": 0, "dim_feedforward": 4 * d, "activation": "relu",
        "norm_first": True, "final_norm": True, "layer_norm_eps": 1e-5, "positions": "sinusoidal",
        "max_positions": max(lengths), "scale_embedding": True, "fused_qkv": True,
        "attention_bias": True, "tie_embeddings": False, "num_classes": 2, "pooling": "mean",
        "dropout": 0.0, "dtype": "float32", "pad_id": 0, "bos_id": 1, "eos_id": 2, "unk_id": 3,
        "tokenizer": None}, seed=0)
    transformer_limit = 2048 if quick else 8192
    rng = np.random.default_rng(0)
    for threads in threads_list:
        set_threads(threads, with_torch=False)
        for T in lengths:
            doc = rng.integers(4, V, size=T)
            # every speed untraced, after a warm-up; the peaks from a traced run apart
            # (tracemalloc slowed the float32 RAN and the Transformer 2-10% at full size, 3x
            # at --quick, while the int8 RAN ran untraced)
            row = {"threads": threads, "T": T}
            for key, model in (("ran", ran), ("ran_int8", ran_int8)):
                model.encode([doc[:min(T, 4 * window)]])       # warm up
                row[f"{key}_tps"] = T / _timed(lambda: model.encode([doc]))
            row["ran_mib"] = _traced(lambda: ran.encode([doc]))[1] / 2 ** 20
            if T <= transformer_limit:
                encoder.encode([doc[:min(T, 4 * window)]])
                row["tf_tps"] = T / _timed(lambda: encoder.encode([doc]))
                row["tf_mib"] = _traced(lambda: encoder.encode([doc]))[1] / 2 ** 20
            rows.append(row)
            tf = (f"{row['tf_tps']:9.0f} | {row['tf_mib']:8.1f}" if "tf_tps" in row
                  else "        - |        -")
            print(f"| {threads} | {T:6d} | {row['ran_tps']:9.0f} | {row['ran_mib']:8.1f} | "
                  f"{row['ran_int8_tps']:9.0f} | {tf} |", flush=True)


def bench_ran_lm(threads_list, batches, quick, rows):
    d, heads, window, layers = (64, 4, 64, 2) if quick else (512, 8, 256, 2)
    V, prompt_len, steps = 8000, 200, 128
    ran = attncore.models.from_config({
        "architecture": "ran", "vocab_size": V, "embedding_size": d, "ran_layers": layers,
        "head_num": heads, "head_size": d // heads, "window_size": window,
        "min_window_size": window // 4, "cell_pooling": "last", "causal": True,
        "memory_review": True, "num_classes": 0, "token_head": "lm", "dropout": 0.0,
        "dtype": "float32", "pad_id": 0, "bos_id": 1, "eos_id": 2, "unk_id": 3,
        "tokenizer": None}, seed=0)
    decoder = attncore.models.from_config({
        "architecture": "transformer", "kind": "decoder_only", "src_vocab_size": 0,
        "tgt_vocab_size": V, "d_model": d, "num_heads": heads, "num_encoder_layers": 0,
        "num_decoder_layers": layers, "dim_feedforward": 4 * d, "activation": "relu",
        "norm_first": True, "final_norm": True, "layer_norm_eps": 1e-5, "positions": "sinusoidal",
        "max_positions": prompt_len + steps, "scale_embedding": True, "fused_qkv": True,
        "attention_bias": True, "tie_embeddings": False, "dropout": 0.0, "dtype": "float32",
        "pad_id": 0, "bos_id": 1, "eos_id": 2, "unk_id": 3, "tokenizer": None}, seed=0)
    rng = np.random.default_rng(0)
    prompts_of = {B: [rng.integers(4, V, size=prompt_len) for _ in range(B)] for B in batches}

    def token_by_token(prompts):
        """Greedy through the public encode path: one token per call, the state carried."""
        logits, state = ran.token_logits(prompts)
        tokens = [[] for _ in prompts]
        for _ in range(steps):
            nxt = [int(np.argmax(row[-1])) for row in logits]
            for out, t in zip(tokens, nxt):
                out.append(t)
            logits, state = ran.token_logits([np.array([t]) for t in nxt], state)
        return tokens

    for threads in threads_list:
        set_threads(threads, with_torch=False)
        for B in batches:
            prompts = prompts_of[B]

            def generate(model=ran):
                return model.generate(prompts, max_length=steps, min_length=steps)
            got = [r.tokens for r in generate()]
            agree = _agreement(got, token_by_token(prompts))
            times = best_times_interleaved({
                "cache": generate, "recompute": lambda: token_by_token(prompts),
                "decoder": lambda: generate(decoder)}, rounds=2, repeats=1)
            row = {"threads": threads, "batch": B, "agree": agree,
                   **{k: B * steps / t for k, t in times.items()}}
            rows.append(row)
            print(f"| {threads} | {B} | {row['cache']:8.1f} | {row['recompute']:8.1f} | "
                  f"{row['cache'] / row['recompute']:5.2f}x | {row['decoder']:8.1f} | "
                  f"{row['cache'] / row['decoder']:5.2f}x | {agree:.2f} |", flush=True)


def main(argv=None):
    parser = OneLineErrorParser(prog=bench_prog(), description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=thread_count, nargs="+", default=[1, 2])
    parser.add_argument("--only", nargs="+", choices=["transformer", "seq2seq", "ran", "ran-lm"],
                        default=["transformer", "seq2seq", "ran", "ran-lm"])
    parser.add_argument("--quick", action="store_true", help="small models, for a smoke run")
    parser.add_argument("--no-torch", action="store_true",
                        help="leave torch out (not even imported; the Transformer and seq2seq "
                             "sections need it for their weights and are skipped)")
    parser.add_argument("--beam", type=int, default=1,
                        help="transformer: beam search of this size, attncore and CTranslate2 "
                             "(the torch model decodes greedily only: no torch column)")
    args = parser.parse_args(argv)
    if not 1 <= args.beam <= MAX_BEAM_SIZE:   # (2000 failed after every model was built)
        parser.error(f"--beam must lie in [1, {MAX_BEAM_SIZE}], got {args.beam}")
    if checking_arguments():
        return 0
    if len(args.only) > 1:
        common = (["--threads", *map(str, args.threads)] + ["--quick"] * args.quick
                  + ["--no-torch"] * args.no_torch + ["--beam", str(args.beam)])
        for family in args.only:
            status = subprocess.call([sys.executable, os.path.abspath(__file__), "--only", family,
                                      *common])
            if status:   # (a signal's negative code: 128 + its number, as a shell says)
                raise SystemExit(128 - status if status < 0 else status)
        return []
    torch = None if args.no_torch else try_import_torch()
    print(f"machine: {machine_description(with_torch=not args.no_torch)}")
    print(f"command: python bench/models.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    rows = []
    if "transformer" in args.only:
        steps = "greedy steps" if args.beam == 1 else f"steps of beam search (beam {args.beam})"
        print(f"\n### Transformer-base, 24-token sources, 24 {steps} (target tokens/s)\n")
        print("| threads | batch | attncore | attncore bf16 | attncore int8 | torch (no KV cache) | "
              "CT2 float32 | CT2 int8 | vs torch | vs CT2 f32 | bf16 vs CT2 f32 | "
              "int8 vs CT2 int8 | token agreement with attncore f32 (torch / CT2 / bf16 / int8 / "
              "CT2 int8) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        bench_transformer(args.threads, [1, 4] if args.quick else [1, 16], torch, args.quick, rows,
                          beam=args.beam)
    if "seq2seq" in args.only:
        print("\n### Bahdanau GRU seq2seq, 24 -> 24 greedy (target tokens/s)\n")
        print("| threads | batch | attncore | attncore bf16 | attncore int8 | torch eager | "
              "torch int8 (dynamic) | vs torch | bf16 vs torch | int8 vs torch | "
              "int8 vs torch int8 | token agreement with attncore f32 (torch / bf16 / int8 / "
              "torch int8) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        bench_seq2seq(args.threads, [1, 8] if args.quick else [1, 64], torch, args.quick, rows)
    if "ran" in args.only:
        print("\n### RAN encode vs a Transformer encoder of the same width (tokens/s, peak MiB)\n")
        print("| threads | tokens | RAN tok/s | RAN peak MiB | RAN int8 tok/s | Transformer tok/s | "
              "Transformer peak MiB |")
        print("|---|---|---|---|---|---|---|")
        lengths = [512, 2048] if args.quick else [2048, 8192, 32768, 100000]
        bench_ran(args.threads, lengths, args.quick, rows)
    if "ran-lm" in args.only:
        print("\n### RAN language model: 200-token prompts, 128 greedy tokens (tokens/s)\n")
        print("| threads | batch | RAN generate | RAN token by token through encode | "
              "speed-up | Transformer decoder (same width) | vs Transformer | "
              "token agreement |")
        print("|---|---|---|---|---|---|---|---|")
        bench_ran_lm(args.threads, [1, 4], args.quick, rows)
    return rows


if __name__ == "__main__":
    run_main(main)
