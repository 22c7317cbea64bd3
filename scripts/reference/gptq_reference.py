"""GPTQ reference result on small matrices, for `crates/deltaserve-codecs/tests/gptq_reference.rs`.

Runs the GPTQ algorithm as the reference implementation does it (IST-DASLab/gptq, `gptq.py`
`GPTQ.fasterquant` with `quant.py` `Quantizer(perchannel=True, sym=False, mse=False)`; Frantar et
al., arXiv 2210.17323, Algorithm 1 with lazy batch updates and the Cholesky reformulation),
written out here in PyTorch, in float64 so that a float64 Rust port can be compared code by code.

Cases (each with its own prefix in the output file):
- `plain`:    4-bit, group 128, block 128, percdamp 0.01, act-order off, exact (float64) scales;
- `actorder`: the same with act-order (columns by decreasing diag(H), stable sort);
- `f16`:      the same as `plain`, but every group scale is rounded to float16 before use, which
              is what deltaserve stores (a deliberate deviation from the reference, documented in
              `crates/deltaserve-codecs/src/rtn.rs`).
Every case has rows=16, cols=300 (so groups 128, 128, 44 and a ragged last block), a Hessian
H = X^T X from 200 random inputs with column scales spread over two decades, and one dead input
column (H_ii = 0).

Usage: python3 scripts/reference/gptq_reference.py --out crates/deltaserve-codecs/tests/fixtures/gptq_reference.safetensors
"""

import argparse
import sys

import torch
from safetensors.torch import save_file

FIXTURE_VERSION = "1"


def find_params(x, bits, f16_scales):
    """Quantizer.find_params(x, weight=True), asymmetric, per row of x."""
    maxq = 2**bits - 1
    zero_t = torch.zeros(x.shape[0], dtype=x.dtype)
    xmin = torch.minimum(x.min(1).values, zero_t)
    xmax = torch.maximum(x.max(1).values, zero_t)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin[both_zero] = -1
    xmax[both_zero] = +1
    scale = (xmax - xmin) / maxq
    if f16_scales:
        scale = scale.to(torch.float16).to(x.dtype)
    zero = torch.round(-xmin / scale)
    return scale, zero


def quantize(x, scale, zero, maxq):
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return q, scale * (q - zero)


def gptq(W, H, bits=4, groupsize=128, blocksize=128, percdamp=0.01, actorder=False, f16_scales=False):
    W = W.clone().double()
    H = H.clone().double()
    rows, cols = W.shape
    maxq = 2**bits - 1
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = None
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    damp = percdamp * torch.mean(torch.diag(H))
    idx = torch.arange(cols)
    H[idx, idx] += damp
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)

    Q = torch.zeros_like(W)
    codes = torch.zeros_like(W)
    ngroups = (cols + groupsize - 1) // groupsize
    scales = torch.zeros(rows, ngroups, dtype=W.dtype)
    zeros = torch.zeros(rows, ngroups, dtype=W.dtype)
    scale = zero = None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        C1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            col = i1 + i
            if col % groupsize == 0:
                scale, zero = find_params(W[:, col:col + groupsize], bits, f16_scales)
                scales[:, col // groupsize] = scale
                zeros[:, col // groupsize] = zero
            w = W1[:, i]
            d = Hinv1[i, i]
            q, deq = quantize(w, scale, zero, maxq)
            C1[:, i] = q
            Q1[:, i] = deq
            err1 = (w - deq) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        codes[:, i1:i2] = C1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    if perm is not None:
        invperm = torch.argsort(perm)
        Q = Q[:, invperm]
    return Q, codes, scales, zeros, perm


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    g = torch.Generator().manual_seed(8)
    rows, cols, samples = 16, 300, 200
    W = (torch.randn(rows, cols, generator=g) * 0.05).float()
    col_scale = torch.logspace(-1, 1, cols, dtype=torch.float64)[torch.randperm(cols, generator=g)]
    X = torch.randn(samples, cols, generator=g, dtype=torch.float64) * col_scale
    X[:, 17] = 0  # a dead input
    H = X.T @ X

    tensors = {"w": W.contiguous(), "h": H.contiguous()}
    for name, kwargs in [("plain", {}), ("actorder", {"actorder": True}), ("f16", {"f16_scales": True})]:
        Q, codes, scales, zeros, perm = gptq(W, H, **kwargs)
        tensors[f"{name}.dequantized"] = Q.contiguous()
        tensors[f"{name}.codes"] = codes.to(torch.uint8).contiguous()
        tensors[f"{name}.scales"] = scales.contiguous()
        tensors[f"{name}.zeros"] = zeros.contiguous()
        if perm is not None:
            tensors[f"{name}.perm"] = perm.to(torch.int64).contiguous()
        rel = ((Q - W.double()) @ H @ (Q - W.double()).T).trace() / (W.double() @ H @ W.double().T).trace()
        print(f"{name}: relative output error tr(E H E^T)/tr(W H W^T) = {rel.item():.3e}", file=sys.stderr)
    meta = {
        "fixture_version": FIXTURE_VERSION,
        "command": "python3 scripts/reference/gptq_reference.py --out " + args.out,
        "torch": torch.__version__,
        "settings": "bits=4 groupsize=128 blocksize=128 percdamp=0.01 sym=False",
    }
    save_file(tensors, args.out, metadata=meta)


if __name__ == "__main__":
    main()
