"""`glam-bench` (`make bench`): speed measured in one process, written to BENCHMARKS.md.

1. matmul peak (float32, bfloat16) on the current device: the denominator of MFU (the peak
   of the benchmarked dtype: bfloat16 on GPU/TPU, float32 on CPU, or `--dtype`);
2. MoE FFN forward+backward against a dense two-matrix GELU FFN of equal activated FLOPs
   (width K x H), for E in 8..128 and each dispatch path, at capacity factor 1.25, with
   routing alone and the expert matmuls alone, and a large elementwise op's bandwidth (the
   expert parameters and gradients grow with E at fixed FLOPs);
3. a whole training step, MoE (GLaM placement) vs the dense model it extends and vs a
   FLOP-matched MoE: step time ratio, tokens/s, model FLOPs utilisation, peak memory;
4. the expert-parallel step on 8 fake CPU devices vs 1 device (overhead, not speed; run in a
   child process, since the device count is fixed when JAX starts);
5. data (`glam.data.bench`): `glam-data prepare` throughput with 1 and 2 workers, its peak
   memory at two corpus sizes, and the input pipeline's time per batch vs the step.

Times are medians of repeated runs after a warm-up call; ratios come from the same run.
"""

from __future__ import annotations

import argparse

from glam.resolve import CONF_DIR


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="glam-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(CONF_DIR.parent / "BENCHMARKS.md"))
    p.add_argument("--json", default="outputs/bench.json")
    p.add_argument("--experts", default="8,16,32,64,128")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="activations of the FFN and step benches (default: bfloat16 on GPU/TPU, "
                        "float32 on CPU)")
    args = p.parse_args(argv)
    from glam import bench  # JAX: after --help

    bench.run(args, p.error)


if __name__ == "__main__":
    main()
