# SPDX-License-Identifier: Apache-2.0
"""Flash-attention tile sizes: attncore's prefill at several (BLOCK_Q, BLOCK_K) beside torch's
``scaled_dot_product_attention``, same process, same minute. Prints the ratio torch time /
attncore time (> 1: attncore faster) per shape and tile, on the float32 path this machine runs
(the AVX2 tile kernel where ``_sdpa.tile_products()``, else BLAS), and with ``--kernel blas``
on BLAS. The defaults are ``attncore.kernels.attention.flash_tiles``: on the tile kernel
128 x 96 (48 x 192 causal, 96 x 96 on AVX-512); on BLAS 64 x 192 at head_dim 64 with OpenBLAS's SkylakeX
small-matrix kernel, 256 x 512 without it.

    python bench/flash_tiles.py [--threads 1] [--kernel blas]
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

import attncore  # noqa: E402

# the module, not the function of the same name that attncore.kernels re-exports
front = sys.modules["attncore.kernels.attention"]

# BLAS: the first four are under OpenBLAS's small-matrix limit (100^3 multiply-adds at head_dim 64)
BLAS_TILES = [(64, 128), (64, 192), (32, 384), (96, 128), (128, 128), (128, 256), (256, 256),
              (256, 512)]
# the tile kernel: query tiles a multiple of 16
TILE_KERNEL_TILES = [(128, 96), (48, 192), (96, 96), (64, 128), (32, 256), (128, 192), (64, 64)]
SHAPES = [(8, 8, 512, 64), (1, 12, 2048, 64), (1, 8, 8192, 64)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=H.thread_count, default=1)
    parser.add_argument("--kernel", choices=["default", "blas"], default="default",
                        help="blas: run float32 flash on BLAS even where the tile kernel runs")
    args = parser.parse_args()
    torch = H.try_import_torch()
    if torch is None:   # (its reference column and timings are torch's flash kernel)
        parser.error("needs torch (pip install torch==2.13.0)")
    H.set_threads(args.threads)
    if args.kernel == "blas":
        front.USE_TILE_PRODUCTS = False
    tile_kernel = front.USE_TILE_PRODUCTS
    TILES = TILE_KERNEL_TILES if tile_kernel else BLAS_TILES
    print(f"# python bench/flash_tiles.py --threads {args.threads} --kernel {args.kernel}"
          f" ({'tile kernel' if tile_kernel else 'BLAS'})")
    print(f"# {H.machine_description()}")
    print("| shape (B, H, L, D) | causal | torch ms | "
          + " | ".join(f"{q}x{k}" for q, k in TILES) + " |")
    print("|---|---|---:|" + "---:|" * len(TILES))
    rng = np.random.default_rng(0)
    try:
        for shape in SHAPES:
            q, k, v = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
            tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
            for causal in (False, True):
                t_torch = H.best_time(lambda: torch.nn.functional.scaled_dot_product_attention(
                    tq, tk, tv, is_causal=causal), repeats=3, min_time=0)
                ratios = []
                for block_q, block_k in TILES:
                    front.FLASH_TILES = (block_q, block_k)
                    t = H.best_time(lambda: attncore.attention(q, k, v, causal=causal),
                                    repeats=3, min_time=0)
                    ratios.append(f"{t_torch / t:.2f}")
                print(f"| {shape} | {causal} | {t_torch * 1e3:.1f} | " + " | ".join(ratios) + " |",
                      flush=True)
    finally:
        front.FLASH_TILES = None
        front.USE_TILE_PRODUCTS = front.TILE_PRODUCTS


if __name__ == "__main__":
    main()
