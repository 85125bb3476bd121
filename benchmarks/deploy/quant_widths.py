"""What the quantization-friendly widths buy and cost: each zoo model pruned by the default recipe with its MLP
widths left as the budget chose them (--mlp-multiple-of 1), at the default (auto: multiples of 32, 256 from 4,096
neurons) and at 256, then

- quality: WikiText-2 perplexity over the first 8,192 tokens in windows of 1,024 (the zoo's measure), the same
  windows for every variant and the dense model;
- size: `amp export --format gguf` at f16, Q8_0 and Q4_K_M (llama.cpp's own quantizer) against the dense model
  exported the same way, with the weight tensors that fell back to a larger type (F16, or Q5_0 / Q8_0 where a
  K-quant's 256 does not divide the row).

    python -m benchmarks.deploy.quant_widths [--models smollm2-135m,gemma3-270m] [--ratios 0.2]
        [--widths 1,auto,256] [--types f16,q8_0,q4_k_m] [--work DIR] [--no-record]

Each prune runs in this process one after another (quality figures, not timings).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchmarks import zoo
from benchmarks.harness import record

K_QUANTS = {"q4_k_m": {"Q4_K", "Q6_K"}, "q5_k_m": {"Q5_K", "Q6_K"}, "q6_k": {"Q6_K"}}
SEQLEN, WINDOWS = 1024, 8


def _ppl(folder: Path, data_dir) -> float:
    import amp
    result = amp.evaluate(folder, tasks=[], ppl=["wikitext2"], seqlen=SEQLEN, max_windows=WINDOWS,
                          data_dir=data_dir, progress=False)
    return result["perplexity"][f"wikitext2@{SEQLEN}"]


def _export(folder: Path, ftype: str, work: Path) -> dict:
    import amp
    out = Path(tempfile.mkdtemp(dir=work, prefix=f"{folder.name}-{ftype}-"))
    out.rmdir()
    report = amp.export_checkpoint(folder, "gguf", out, dtype=ftype, progress=False)
    held = report["gguf"]
    fallbacks = [n for n, t in held["tensors"].items() if ftype in K_QUANTS and t in ("Q5_0", "Q8_0", "Q5_1")
                 and n.endswith("weight")]
    return {"bytes": held["file_bytes"], "f16_fallbacks": len(held.get("unquantized_weights", [])),
            "k_fallbacks": len(fallbacks), "ffn_down_types": sorted({t for n, t in held["tensors"].items()
                                                                    if "ffn_down" in n})}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2-135m,gemma3-270m")
    p.add_argument("--ratios", default="0.2")
    p.add_argument("--widths", default="1,auto,256")
    p.add_argument("--types", default="f16,q8_0,q4_k_m")
    p.add_argument("--work", default=None, help="where the pruned models and exports go (default: a temporary folder)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    import amp
    from amp.io.models import gguf_folder
    work = Path(args.work or tempfile.mkdtemp(prefix="amp-quant-widths-"))
    work.mkdir(parents=True, exist_ok=True)
    types = args.types.split(",")
    rows = []
    for name in args.models.split(","):
        dense = gguf_folder(zoo.path(name))
        base = {"model": name, "ppl_dense": round(_ppl(dense, args.data_dir), 3)}
        dense_sizes = {t: _export(dense, t, work) for t in types}
        print(f"{name}: dense ppl {base['ppl_dense']}, " +
              ", ".join(f"{t} {s['bytes'] / 1e6:.1f} MB" for t, s in dense_sizes.items()), flush=True)
        for ratio in [float(r) for r in args.ratios.split(",")]:
            for width in args.widths.split(","):
                out = work / f"{name}-{ratio}-{width}"
                config = amp.PruneConfig(ratio=ratio, mlp_multiple_of=width if width == "auto" else int(width))
                report = amp.prune_checkpoint(str(dense), config, out, data_dir=args.data_dir, progress=False,
                                              overwrite=True)
                widths = [len(layer["kept_neurons"]) for layer in report["layers"]]
                row = {**base, "ratio": ratio, "mlp_multiple_of": width,
                       "resolved": report["allocation"].get("mlp_multiple_of", 1),
                       "ratio_achieved": round(report["ratio_achieved"], 4), "ppl": round(_ppl(out, args.data_dir), 3),
                       "widths_not_32": sum(w % 32 != 0 for w in widths),
                       "widths_not_256": sum(w % 256 != 0 for w in widths)}
                for t in types:
                    got = _export(out, t, work)
                    row.update({f"{t}_MB": round(got["bytes"] / 1e6, 2),
                                f"{t}_vs_dense": round(got["bytes"] / dense_sizes[t]["bytes"], 4),
                                f"{t}_f16_fallbacks": got["f16_fallbacks"], f"{t}_k_fallbacks": got["k_fallbacks"],
                                f"{t}_ffn_down": "/".join(got["ffn_down_types"])})
                rows.append(row)
                print(json.dumps(row), flush=True)
    if not args.no_record:
        summary = [f"{r['model']} at {r['ratio']:.0%}, --mlp-multiple-of {r['mlp_multiple_of']} (-> {r['resolved']}): "
                   f"ppl {r['ppl']} (dense {r['ppl_dense']}); " +
                   ", ".join(f"{t} {r[f'{t}_vs_dense']:.3f}x dense ({r[f'{t}_f16_fallbacks']} F16 fallbacks)"
                             for t in types) for r in rows]
        record("quant_widths", rows, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
