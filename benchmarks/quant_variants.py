"""Which 4-bit scheme should `quantize="int4"` be? Measures the candidates on the built-in model.

Each candidate requantizes the float32 reference's matrices with the gguf package's own quantizers (Q4_0:
symmetric, a scale per 32; Q4_1: a scale and a minimum per 32; Q8_0 for comparison) or with minigemma's int4
quantizer (Q4_1's layout, least-squares scales), dequantizes them back to
float32 (so every candidate runs at BLAS speed; the numbers are the same as with the int4 kernels, which
compute on exactly these values), and scores the same windows of the reference text against the reference:
mean KL divergence, top-1 agreement, perplexity.

    python benchmarks/quant_variants.py [--tokens 2048] [--context 512]

Prints a Markdown table (the one in docs/quantization.md came from this script). Two other tables:
  --int8-fields   minigemma's int4 as it loads, then with more of its matrices kept int8 (taken from an int8
                  load): what int4's top-1 agreement costs in bytes;
  --one-at-a-time each kind of layer matrix alone at int4 (Int4.from_float), everything else float32: which
                  matrices carry int4's error (why weights.storage_for keeps v_proj int8).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import quants as gguf_quants

import minigemma
from minigemma.perplexity import perplexity, reference_text
from minigemma.params import params_nbytes
from minigemma.weights import Int4, dequantize

# name -> (type for the layer matrices, type for the tied embedding / head); None keeps float32
CANDIDATES = {
    "Q8_0 everywhere": (Q.Q8_0, Q.Q8_0),
    "Q4_0 everywhere": (Q.Q4_0, Q.Q4_0),
    "Q4_0, embedding Q8_0": (Q.Q4_0, Q.Q8_0),
    "Q4_1 everywhere": (Q.Q4_1, Q.Q4_1),
    "Q4_1, embedding Q8_0": (Q.Q4_1, Q.Q8_0),
    "Q4_1 with least-squares scales, embedding Q8_0 (minigemma's int4)": ("int4", Q.Q8_0),
}
BYTES_PER_WEIGHT = {Q.Q8_0: 34 / 32, Q.Q4_0: 18 / 32, Q.Q4_1: 20 / 32, "int4": 20 / 32}


def requantized(w: np.ndarray, qtype) -> np.ndarray:
    if qtype == "int4":  # minigemma's own quantizer (weights.Int4.from_float)
        return dequantize(Int4.from_float(w))
    return gguf_quants.dequantize(gguf_quants.quantize(w, qtype), qtype).astype(np.float32)


def variant(model, layer_type, embed_type):
    p = model.params
    layers = [dataclasses.replace(layer, **{f: requantized(w, layer_type) for f, w in vars(layer).items()
                                            if w is not None and w.ndim == 2})
              for layer in p.layers]
    params = dataclasses.replace(p, embed=requantized(p.embed, embed_type), layers=layers)
    return minigemma.Gemma(model.config, params, model.tokenizer)


# minigemma's int4 with these matrices taken from an int8 load instead (beyond those int4 keeps int8 itself)
MORE_INT8 = {
    "int4 as loaded (embedding, v_proj, some down_proj int8)": (),
    "+ up_proj int8": ("up_proj",),
    "+ up_proj, gate_proj int8": ("up_proj", "gate_proj"),
    "+ up_proj, gate_proj, q_proj, k_proj int8": ("up_proj", "gate_proj", "q_proj", "k_proj"),
}


def mixed(reference, m4, m8, fields):
    """The float32 model on the dequantized weights of m4, with `fields` of every block from m8; and its
    weight bytes as stored."""
    layers, stored = [], []
    for ref_layer, l4, l8 in zip(reference.params.layers, m4.params.layers, m8.params.layers):
        pick = {f: getattr(l8 if f in fields else l4, f) for f, w in vars(ref_layer).items()
                if w is not None and w.ndim == 2}
        stored.append(dataclasses.replace(l4, **pick))
        layers.append(dataclasses.replace(ref_layer, **{f: dequantize(w) for f, w in pick.items()}))
    nbytes = params_nbytes(dataclasses.replace(m4.params, layers=stored))
    params = dataclasses.replace(reference.params, embed=dequantize(m4.params.embed), layers=layers)
    return minigemma.Gemma(reference.config, params, reference.tokenizer), nbytes


def schemes_table(reference, ids, context):
    """The gguf package's formats (and minigemma's int4) on every matrix: the first table."""
    n_embed = reference.params.embed.size
    n_layers = reference.config.num_parameters - n_embed
    base = perplexity(reference, ids, context=context)
    print("| scheme | bytes/weight (whole model) | mean KL | top-1 agreement | perplexity |")
    print("|---|---|---|---|---|")
    print(f"| float32 reference | 4 | 0 | 100% | {base.perplexity:.3f} |")
    for name, (layer_type, embed_type) in CANDIDATES.items():
        start = time.perf_counter()
        r = perplexity(variant(reference, layer_type, embed_type), ids, context=context, reference=reference)
        size = (n_layers * BYTES_PER_WEIGHT[layer_type] + n_embed * BYTES_PER_WEIGHT[embed_type]) / (n_layers + n_embed)
        d = r.as_dict()
        print(f"| {name} | {size:.3f} | {d['mean_kl']:.4f} | {d['top1_agreement']:.1%} | {r.perplexity:.3f} |"
              f"  <!-- {time.perf_counter() - start:.0f} s -->", flush=True)


def int8_fields_table(reference, ids, context):
    """minigemma's int4 as it loads, then with more of its matrices int8 (--int8-fields)."""
    base = perplexity(reference, ids, context=context)
    m4 = minigemma.load(progress=False, backend="numpy", quantize="int4")
    m8 = minigemma.load(progress=False, backend="numpy", quantize="int8")
    print(f"| weights | bytes | mean KL | top-1 agreement | perplexity (float32: {base.perplexity:.3f}) |")
    print("|---|---|---|---|---|")
    for name, fields in MORE_INT8.items():
        model, nbytes = mixed(reference, m4, m8, fields)
        d = perplexity(model, ids, context=context, reference=reference).as_dict()
        print(f"| {name} | {nbytes / 1e6:.0f} MB | {d['mean_kl']:.4f} | {d['top1_agreement']:.2%} | "
              f"{d['perplexity']:.3f} |", flush=True)
    print(f"| int8 | {m8.nbytes / 1e6:.0f} MB | | | |")


def one_at_a_time_table(reference, ids, context):
    """Each kind of layer matrix alone at int4, the rest float32 (--one-at-a-time)."""
    print("| only this kind at int4 | mean KL | top-1 agreement |")
    print("|---|---|---|")
    for field in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        layers = [dataclasses.replace(layer, **{field: requantized(getattr(layer, field), "int4")})
                  for layer in reference.params.layers]
        model = minigemma.Gemma(reference.config, dataclasses.replace(reference.params, layers=layers),
                                reference.tokenizer)
        d = perplexity(model, ids, context=context, reference=reference).as_dict()
        print(f"| {field} | {d['mean_kl']:.4f} | {d['top1_agreement']:.2%} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--int8-fields", action="store_true", help="only the table of int4 with more int8")
    ap.add_argument("--one-at-a-time", action="store_true", help="only the table of one matrix kind at int4")
    args = ap.parse_args()

    reference = minigemma.load(progress=False, backend="numpy")  # float32 products: BLAS either way
    ids = reference.tokenizer.encode(reference_text(), add_bos=False)[:args.tokens]
    print(f"{len(ids)} tokens of pydoc_data.topics, context {args.context}, stride {args.context // 2}\n")
    table = (one_at_a_time_table if args.one_at_a_time else int8_fields_table if args.int8_fields
             else schemes_table)
    table(reference, ids, args.context)


if __name__ == "__main__":
    main()
