// Device code shared by `sign_matmul.cu` (PTX for the configured arch) and `binary_wgmma.cu`
// (PTX for sm_90a): the routing table every product kernel takes, programmatic dependent launch,
// the base-only rows' store, cp.async, and the binary kernels' reduce-scatter. Included, not
// compiled on its own.

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define DS_MAX_GROUPS 32
#define DS_MAX_ROWS 512
#define DS_GROUP_ROWS 32

struct GroupTable {
    unsigned long long words[DS_MAX_GROUPS];  // device address of each group's (N, W) words; 0 = zeros
    float scale[DS_MAX_GROUPS];
    unsigned int row_begin[DS_MAX_GROUPS + 1];
    unsigned short rows[DS_MAX_ROWS];
    unsigned int n_groups;
    unsigned int identity;
};

__device__ __forceinline__ int group_row(const GroupTable& tab, unsigned int begin, int j) {
    return tab.identity ? (int)(begin + j) : (int)tab.rows[begin + j];
}

// Programmatic dependent launch (src/cuda.rs launches the product kernels with it after their
// prep kernel): the prep kernels let the next grid start at once, and the product kernels wait for
// the prep's results only after issuing their first sign-word loads, which read nothing the prep
// writes. Both instructions are no-ops in a grid launched without the attribute.
// Measured on the H100 (BENCHMARKS.md, sixth pass): 32 rows of 8 tenants 16.1 / 38.4 / 38.0 us
// against 17.8 / 38.4 / 39.9 without, 32 rows of 32 tenants 38.3 / 87.5 / 100.3 against
// 39.3 / 88.9 / 102.6 (4096x4096 / 11008x4096 / 4096x11008).
__device__ __forceinline__ void ds_launch_dependents() {
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}
__device__ __forceinline__ void ds_wait_prerequisite() {
    asm volatile("griddepcontrol.wait;" ::: "memory");
}

// The blocks of a group whose words pointer is 0 (the base-only rows of a multi-tenant batch): its
// rows (rb, R as group_row takes them) get zeros, or the base, on this block's F features from
// n0. Waits for the prep kernel first, as the blocks with a delta do. Used by the bf16, int8 and
// binary product kernels.
__device__ __forceinline__ void ds_store_base_only(const GroupTable& tab, unsigned int rb, int R,
                                                   int n0, int F, int N,
                                                   const __nv_bfloat16* __restrict__ base,
                                                   __nv_bfloat16* __restrict__ y) {
    ds_wait_prerequisite();
    for (int idx = threadIdx.x; idx < R * F; idx += blockDim.x) {
        const int j = idx / F, n = n0 + idx % F;
        if (n < N) {
            const size_t o = (size_t)group_row(tab, rb, j) * N + n;
            y[o] = base ? base[o] : __float2bfloat16(0.f);
        }
    }
}


// cp.async helpers (the fused layer's per-warp ring).

// PF256: also ask L2 to fetch the whole 256-byte segment around the source.
template <bool PF256 = false>
__device__ __forceinline__ void ds_cp_async16(void* smem, const void* gmem, int src_bytes) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    if constexpr (PF256)
        asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(s),
                     "l"(gmem), "r"(src_bytes)
                     : "memory");
    else
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem),
                     "r"(src_bytes)
                     : "memory");
}
__device__ __forceinline__ void ds_cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N> __device__ __forceinline__ void ds_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}


// Sums V values over the 8 threads g = lane / 4 of each column t (lanes t, t + 4, ..., t + 28)
// and scatters the V sums among them: a butterfly over lane masks 16, 8, 4 in which each thread
// keeps half of its list (the half its bit of g names) and sends the other half to its partner.
// Afterwards thread g holds sums g V/8 .. (g + 1) V/8 - 1 in v[0 ..] (V >= 8); with V < 8 the
// last steps are plain exchanges and the 8 / V threads g with the same g V / 8 hold that sum.
template <int V>
__device__ __forceinline__ void ds_reduce_scatter8(int (&v)[V], int g) {
    static_assert(V >= 2 && (V & (V - 1)) == 0, "a power of two, at least 2");
    int half = V / 2;
#pragma unroll
    for (int lvl = 0; lvl < 3; ++lvl) {
        const int mask = 16 >> lvl;
        if (half >= 1) {
            const bool up = (g >> (2 - lvl)) & 1;
#pragma unroll
            for (int i = 0; i < V / 2; ++i)
                if (i < half) {
                    const int send = up ? v[i] : v[i + half];
                    const int keep = up ? v[i + half] : v[i];
                    v[i] = keep + __shfl_xor_sync(0xffffffffu, send, mask);
                }
            half /= 2;
        } else {
            v[0] += __shfl_xor_sync(0xffffffffu, v[0], mask);
        }
    }
}

// The weight of bit plane p in X (16-bit two's complement): 2^p, and -2^15 for the sign plane.
__device__ __forceinline__ int ds_plane_weight(int p) { return p == 15 ? -32768 : 1 << p; }

// The start of a binary kernel's cp.async ring: the sign rows of the first AHEAD chunks (which
// read nothing the prep kernel writes), then the wait for the prep, then x's part of the same
// chunks, one commit group per chunk. issue_a / issue_b take a chunk index.
template <int AHEAD, class IssueA, class IssueB>
__device__ __forceinline__ void ds_ring_prologue(int CH, IssueA& issue_a, IssueB& issue_b) {
#pragma unroll
    for (int c = 0; c < AHEAD; ++c)
        if (c < CH) issue_a(c);
    ds_wait_prerequisite();  // x's planes, row sums and scales come from the prep kernel
#pragma unroll
    for (int c = 0; c < AHEAD; ++c) {
        if (c < CH) issue_b(c);
        ds_cp_async_commit();
    }
}

// The binary kernels' store for one row of x: y[row, n] = scale (2 rs v - sum(x)) (+ base), v the
// row's exact weighted plane sum at feature n; rs = 2^-E and sum(x) (SL = ceil(Wp / 32) partial
// sums) from the prep kernel.
struct DsB1Row {
    size_t off;  // row * N
    double rs, xs;
};
__device__ __forceinline__ DsB1Row ds_b1_row(const double* __restrict__ xsum,
                                             const double* __restrict__ rscale, int row, int Wp,
                                             int N) {
    const int SL = (Wp + 31) / 32;
    double xs = 0.0;
    for (int i = 0; i < SL; ++i) xs += xsum[(size_t)row * SL + i];
    return {(size_t)row * N, rscale[row], xs};
}
__device__ __forceinline__ void ds_b1_store(const DsB1Row& r, int n, int N, int v, float scale,
                                            const __nv_bfloat16* __restrict__ base,
                                            __nv_bfloat16* __restrict__ y) {
    if (n >= N) return;
    const double dot = 2.0 * r.rs * (double)v - r.xs;
    const size_t o = r.off + n;
    float out = scale * (float)dot;
    if (base) out += __bfloat162float(base[o]);
    y[o] = __float2bfloat16(out);
}
