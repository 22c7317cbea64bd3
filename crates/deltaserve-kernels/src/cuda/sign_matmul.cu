// Packed sign-matrix products on NVIDIA GPUs (sm_90), loaded by `src/cuda.rs` as PTX.
//
// Layout of the signs (the same as the CPU kernels and the delta file):
//   words: (N, W) u32, W = ceil(K / 32), row-major; bit b (LSB = 0) of word w of row n is the
//   sign of S[n, 32 w + b]: 1 -> +1, 0 -> -1. Bits for columns >= K are ignored (whatever they
//   hold): every kernel here multiplies them by a zero.
//
// Kernels:
//   ds_prep_bf16         x (M, K) bf16 -> xp (M, Kp) bf16 in tensor-core fragment order, scaled,
//                        and per-chunk sums for corr; see "the tensor-core path" below. The
//                        product kernels after a prep kernel are launched as its programmatic
//                        dependents (see ds_launch_dependents).
//   ds_tc_bf16_*         y = scale * (x . S^T) for row groups sharing one delta (decode and
//                        prefill), bf16 tensor cores (mma.sync m16n8k16), f32 accumulation;
//                        an optional `base` is added in the store.
//   ds_prepi8_bf16,      the same for groups of at most 8 rows (decode) with int8 tensor cores
//   ds_tci8_bf16_*       (mma.sync m16n8k32 u8 x s8, exact s32 sums): half the unpacking and
//                        half the mma instructions; see "The int8 path" below.
//   ds_prepb1_bf16,      the same for groups of at most 8 rows (decode) with 1-bit tensor cores
//   ds_tcb1_bf16_*       (mma.sync m16n8k256 b1, AND + popc, exact s32 sums): x as 16 bit planes,
//                        the sign words as stored, no unpacking; see "The binary path" below.
//   ds_prepb1wg_bf16     the same planes laid out for the warpgroup kernel ds_wgb1_bf16_* of
//                        binary_wgmma.cu (sm_90a: groups of 3-8 rows on compute capability 9.0).
//   ds_fused_bf16_*      a whole decode delta linear layer, x . (Wbase + scale_g S_g)^T per row
//                        group (up to 8; delta_linear sends one tenant), the sum formed in
//                        registers, in one kernel (see "Fused delta linear layer" below).
//   ds_fwd_simple_*      the same product on CUDA cores, f32 (f64) accumulation; for f32, f16 and
//                        f64 inputs, where the bf16 tensor-core trick would round x.
//   ds_bwd_simple_*      g . S (the gradient of x . S^T), CUDA cores.
//
// Row groups. Every forward launch takes a GroupTable by value (kernel parameter space, so a decode
// step needs no host-to-device copy): group g is up to 32 rows of x that share one delta
// (`words[g]`, `scale[g]`); its rows are rows[row_begin[g] .. row_begin[g+1]], or, when
// `identity` is set, the rows row_begin[g] .. row_begin[g+1] themselves. A group whose words
// pointer is 0 writes zeros (the base-only rows of a multi-tenant batch). Blocks index
// (output-feature tile, group), so each distinct delta's bits are read once per launch however many
// of its (up to 32) rows are in the batch.
//
// The tensor-core path. mma needs S as bf16 +-1 values, and expanding 1 bit into a bf16 costs
// instructions that, at HBM speed (an H100 SM receives ~13 bytes = 104 signs per clock), must stay
// near 0.5 per sign. A LOP3 `(w & mask) | magic` makes one 32-bit register of two bf16 values from
// two bits of a word without shifting them: the bits land at the same position p of the two
// 16-bit halves, and `magic` fills the rest of each half. Each half's value is then v0 (bit clear)
// or v1 (bit set), an affine function of the bit, so with s = 2b - 1,
//     s x = alpha_p (x v) - beta_p x,   alpha_p = 2 / (v1 - v0),   beta_p = 2 v0 / (v1 - v0) + 1.
// Positions used (half-word bit p -> magic, v0, v1, alpha, beta):
//   p = 0..6  mantissa bit  0x3F80 (1.0)   1, 1 + 2^(p-7)    2^(8-p)   2^(8-p) + 1
//   p = 7     exponent LSB  0x3F00 (0.5)   0.5, 1            4         3
//   p = 15    sign          0x3F80 (1.0)   1, -1             -1        0
// Bits 8..14 of each half would land in the exponent with a non-power-of-two alpha, so they are
// taken from `w >> 8` at positions 0..6 instead: 16 LOP3 + 1 shift per 32 signs, for any number
// of rows of x. All alphas are powers of two (or -1), so xp = alpha x is exact in bf16, and
// x . s = sum(xp * v) - corr with corr = sum(beta x) computed per row by the prep kernel.
// The f32 sum(xp * v) is up to ~2^8 times larger than the result, which costs ~8 of the
// accumulator's 24 bits: ~1e-5 relative error, far below the bf16 rounding of the output.
//
// Which bits feed which mma columns does not matter as long as x uses the same order: a sum over k
// can be taken in any order. So thread (g, t) of a warp (g = lane / 4, t = lane % 4) unpacks its
// own words of output rows g and g + 8 of a 16-row tile, and the prep kernel writes xp in exactly
// the order the same thread consumes it as the mma B fragment (see ds_prep_bf16).

#include "common.cuh"

// ---------------------------------------------------------------------------------------------
// Tensor-core path, bf16 x.

// alpha and beta (see the header) for a column k, from a = k % 16.
__device__ __forceinline__ float ds_alpha(int a) {
    if (a < 7) return (float)(1 << (8 - a));
    if (a == 7) return 4.f;
    if (a == 15) return -1.f;
    return (float)(1 << (16 - a));  // a = 8..14, read from w >> 8 at p = a - 8
}
__device__ __forceinline__ float ds_beta(int a) {
    if (a < 7) return (float)((1 << (8 - a)) + 1);
    if (a == 7) return 3.f;
    if (a == 15) return 0.f;
    return (float)((1 << (16 - a)) + 1);
}

// Register r (0..15) of a word: holds the bits a(r) and a(r) + 16, a(r) = r (r < 8), 15 (r = 8),
// r - 1 (r > 8). `r` is a compile-time constant after unrolling, so this is one LOP3.
// `(a & mask) | magic` as one LOP3. Written out because nvcc splits it into an AND and an OR
// (a LOP3 takes one immediate, and both constants would be immediates), doubling the
// instructions of the whole kernel; here `mask` becomes the immediate and `magic` a register.
__device__ __forceinline__ uint32_t ds_and_or(uint32_t a, uint32_t mask, uint32_t magic) {
    uint32_t d;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(mask), "r"(magic));
    return d;
}

// `one` = 0x3F803F80 (two bf16 1.0) and `half` = 0x3F003F00 (two bf16 0.5), held in registers.
__device__ __forceinline__ uint32_t ds_unpack(uint32_t w, uint32_t w8, int r, uint32_t one,
                                              uint32_t half) {
    if (r < 7) return ds_and_or(w, 0x00010001u << r, one);
    if (r == 7) return ds_and_or(w, 0x00800080u, half);
    if (r == 8) return ds_and_or(w, 0x80008000u, one);
    return ds_and_or(w8, 0x00010001u << (r - 9), one);
}

// xp layout, per row of x, Kp = 512 * ceil(K / 512) values:
//   pos = ((((sc * 4 + c) * 4 + sp) * 4 + t) * 8 + e)
// sc: 512-column chunk; thread t of a lane group reads word wi = 16 sc + 4 t + c; sp: pair of mma
// k-steps s = 2 sp + (e >> 2); within a step, e & 3 = (b0.lo, b0.hi, b1.lo, b1.hi), b0 matching
// register r = 2 s and b1 register r = 2 s + 1, lo = bit a(r), hi = bit a(r) + 16. So one 16-byte
// load gives a thread its B fragments of two k-steps, and the 4 threads of a group read 64
// contiguous bytes.
// One block per (row of x, 512-column chunk), 64 threads, each writing 8 consecutive xp values
// (one 16-byte store) and summing beta x over the chunk's columns into corr_part[row * SC + chunk];
// the main kernel adds a row's SC partial sums.
extern "C" __global__ void __launch_bounds__(64) ds_prep_bf16(const __nv_bfloat16* __restrict__ x,
                                                              uint4* __restrict__ xp,
                                                              float* __restrict__ corr_part, int K,
                                                              int Kp) {
    const int row = blockIdx.x, sc = blockIdx.y, SC = Kp / 512;
    const int tid = threadIdx.x;
    ds_launch_dependents();
    const __nv_bfloat16* xr = x + (size_t)row * K;
    __shared__ float xs[512];
    double sum = 0.0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int kk = 8 * tid + i, k = 512 * sc + kk;
        const float v = k < K ? __bfloat162float(xr[k]) : 0.f;
        xs[kk] = v;
        sum += (double)ds_beta(k & 15) * (double)v;
    }
    __syncthreads();
    // pos = 512 sc + 8 tid + e with t = tid & 3, sp = (tid >> 2) & 3, c = tid >> 4.
    const int t = tid & 3, sp = (tid >> 2) & 3, c = tid >> 4;
    uint32_t packed[4];
#pragma unroll
    for (int e2 = 0; e2 < 4; ++e2) {
        uint32_t halves[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int e = 2 * e2 + h;
            const int s = 2 * sp + (e >> 2), j = e & 3;
            const int r = 2 * s + (j >> 1), hi = j & 1;
            const int a = r < 8 ? r : (r == 8 ? 15 : r - 1);
            const int kk = 32 * (4 * t + c) + a + 16 * hi;  // column within the chunk
            // exact: a power of two (or -1) times a bf16 value
            const __nv_bfloat16 v = __float2bfloat16(ds_alpha(a) * xs[kk]);
            halves[h] = (uint32_t)__bfloat16_as_ushort(v);
        }
        packed[e2] = halves[0] | (halves[1] << 16);
    }
    xp[((size_t)row * Kp + 512 * sc + 8 * tid) / 8] =
        make_uint4(packed[0], packed[1], packed[2], packed[3]);
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    __shared__ double part[2];
    if ((tid & 31) == 0) part[tid >> 5] = sum;
    __syncthreads();
    if (tid == 0) corr_part[(size_t)row * SC + sc] = (float)(part[0] + part[1]);
}

__device__ __forceinline__ void ds_mma_bf16(float* d, uint32_t a0, uint32_t a1, uint32_t a2,
                                            uint32_t a3, uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Loads words wi0 .. wi0 + 3 of a row (zeros past W). VEC: W % 4 == 0 and 16-byte aligned rows.
template <bool VEC>
__device__ __forceinline__ void ds_load4(const uint32_t* __restrict__ row, int wi0, int W,
                                         uint32_t* out) {
    if (VEC) {
        uint4 v = make_uint4(0, 0, 0, 0);
        if (wi0 < W) v = __ldg(reinterpret_cast<const uint4*>(row + wi0));
        out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w;
    } else {
#pragma unroll
        for (int c = 0; c < 4; ++c) out[c] = (wi0 + c < W) ? __ldg(row + wi0 + c) : 0u;
    }
}

// Block: NW warps splitting K (warp w takes 512-column chunks w, w + NW, ...), each warp T tiles
// of 16 output features and RT tiles of 8 rows of x; the NW partial sums meet in shared memory.
// NW = 8 (`_w8` kernels) halves each warp's serial chain of chunks (HBM latency + compute) and
// doubles the warps in flight, which is what a grid of fewer than 2 blocks per SM needs (one
// tenant: 1-32 rows of a 4096-feature layer, 256 blocks); measured on the H100 it took 4096x4096
// 32x1 from 15.8 to 11.7 us and 4096x11008 1x1 from 20.6 to 14.1 us (BENCHMARKS.md, third pass).
// CLAMP (the `_w8` kernels): the word loads are unconditional, their index clamped into the row
// (VEC: W % 4 == 0, so a group of 4 words is all in or all out; words past K multiply xp zeros,
// and a chunk past the warp's last is loaded but never used). Guarded loads (`if (wi0 < W)`)
// become predicated loads that ptxas schedules near the END of the loop body, after ~75% of the
// chunk's LOP3/HMMA (SASS of ds_tc_bf16_t4_r1_v), so the next chunk's HBM latency is hardly
// overlapped; unconditional loads moved to ~65% (still not the top: ptxas sinks them to save
// registers). On full grids the guarded NW = 4 kernel was as fast or faster (fewer registers,
// more blocks per SM), so it stays there.
template <int T, int RT, bool VEC, int NW, bool CLAMP>
__device__ __forceinline__ void ds_tc_bf16_body(const GroupTable& tab, const uint4* __restrict__ xp,
                                                const float* __restrict__ corr_part,
                                                const __nv_bfloat16* __restrict__ base,
                                                __nv_bfloat16* __restrict__ y, int N, int W,
                                                int Kp) {
    const int grp = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const unsigned int rb = tab.row_begin[grp];
    const int R = (int)(tab.row_begin[grp + 1] - rb);
    const uint32_t* words = reinterpret_cast<const uint32_t*>(tab.words[grp]);
    const int n0 = blockIdx.x * 16 * T;

    if (words == nullptr) {  // base-only rows: zeros (or the base)
        ds_store_base_only(tab, rb, R, n0, 16 * T, N, base, y);
        return;
    }

    const uint32_t* arow[T][2];
#pragma unroll
    for (int i = 0; i < T; ++i) {
        const int nl = min(n0 + 16 * i + g, N - 1), nh = min(n0 + 16 * i + g + 8, N - 1);
        arow[i][0] = words + (size_t)nl * W;
        arow[i][1] = words + (size_t)nh * W;
    }
    const int row_u4 = Kp / 8;  // uint4 per row of xp
    const uint4* brow[RT];
    bool bact[RT];
#pragma unroll
    for (int rt = 0; rt < RT; ++rt) {
        const int j = 8 * rt + g;
        bact[rt] = j < R;
        brow[rt] = xp + (size_t)(bact[rt] ? group_row(tab, rb, j) : 0) * row_u4;
    }

    float acc[T][RT][4];
#pragma unroll
    for (int i = 0; i < T; ++i)
#pragma unroll
        for (int rt = 0; rt < RT; ++rt)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[i][rt][q] = 0.f;

    const int SC = Kp / 512;
    const uint32_t one = 0x3F803F80u, half = 0x3F003F00u;
    auto load = [&](int sc, uint32_t (&dst)[T][2][4]) {
        if (CLAMP) {
            const int wi = min(16 * sc + 4 * t, W - 4);
#pragma unroll
            for (int i = 0; i < T; ++i)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const uint4 v = __ldg(reinterpret_cast<const uint4*>(arow[i][h] + wi));
                    dst[i][h][0] = v.x; dst[i][h][1] = v.y; dst[i][h][2] = v.z; dst[i][h][3] = v.w;
                }
        } else {
#pragma unroll
            for (int i = 0; i < T; ++i)
#pragma unroll
                for (int h = 0; h < 2; ++h) ds_load4<VEC>(arow[i][h], 16 * sc + 4 * t, W, dst[i][h]);
        }
    };
    uint32_t a[T][2][4];
    load(warp, a);
    ds_wait_prerequisite();  // xp and corr_part come from ds_prep_bf16
    // corr of each row of the group: the sum of its SC partial sums (read before the loop, used
    // after the barrier below).
    __shared__ float corr_s[DS_GROUP_ROWS];
    if ((int)threadIdx.x < R) {
        const float* part = corr_part + (size_t)group_row(tab, rb, threadIdx.x) * SC;
        double total = 0.0;
        for (int i = 0; i < SC; ++i) total += (double)part[i];
        corr_s[threadIdx.x] = (float)total;
    }

    for (int sc = warp; sc < SC; sc += NW) {
        // Ask L2 for the words two chunks ahead (no registers held), then load the next chunk's
        // words while this one is computed.
        if (t == 0 && 16 * (sc + 2 * NW) < W) {
#pragma unroll
            for (int i = 0; i < T; ++i)
#pragma unroll
                for (int h = 0; h < 2; ++h)
                    asm volatile("prefetch.global.L2 [%0];" ::"l"(arow[i][h] + 16 * (sc + 2 * NW)));
        }
        uint32_t an[T][2][4];
        load(sc + NW, an);

#pragma unroll
        for (int c = 0; c < 4; ++c) {
            uint32_t b[RT][8][2];
#pragma unroll
            for (int rt = 0; rt < RT; ++rt) {
#pragma unroll
                for (int sp = 0; sp < 4; ++sp) {
                    uint4 v = make_uint4(0, 0, 0, 0);
                    if (bact[rt]) v = __ldg(brow[rt] + ((sc * 4 + c) * 4 + sp) * 4 + t);
                    b[rt][2 * sp][0] = v.x;
                    b[rt][2 * sp][1] = v.y;
                    b[rt][2 * sp + 1][0] = v.z;
                    b[rt][2 * sp + 1][1] = v.w;
                }
            }
#pragma unroll
            for (int i = 0; i < T; ++i) {
                const uint32_t wl = a[i][0][c], wh = a[i][1][c];
                const uint32_t wl8 = wl >> 8, wh8 = wh >> 8;
#pragma unroll
                for (int s = 0; s < 8; ++s) {
                    const uint32_t a0 = ds_unpack(wl, wl8, 2 * s, one, half);
                    const uint32_t a1 = ds_unpack(wh, wh8, 2 * s, one, half);
                    const uint32_t a2 = ds_unpack(wl, wl8, 2 * s + 1, one, half);
                    const uint32_t a3 = ds_unpack(wh, wh8, 2 * s + 1, one, half);
#pragma unroll
                    for (int rt = 0; rt < RT; ++rt)
                        ds_mma_bf16(acc[i][rt], a0, a1, a2, a3, b[rt][s][0], b[rt][s][1]);
                }
            }
        }
#pragma unroll
        for (int i = 0; i < T; ++i)
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int c = 0; c < 4; ++c) a[i][h][c] = an[i][h][c];
    }

    // Split-K reduction: warps 1..NW-1 hand their partial sums to warp 0.
    __shared__ float red[NW - 1][T][RT][4][32];
    if (warp > 0) {
#pragma unroll
        for (int i = 0; i < T; ++i)
#pragma unroll
            for (int rt = 0; rt < RT; ++rt)
#pragma unroll
                for (int q = 0; q < 4; ++q) red[warp - 1][i][rt][q][lane] = acc[i][rt][q];
    }
    __syncthreads();
    if (warp != 0) return;
    const float scale = tab.scale[grp];
#pragma unroll
    for (int i = 0; i < T; ++i) {
#pragma unroll
        for (int rt = 0; rt < RT; ++rt) {
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                float v = acc[i][rt][q];
#pragma unroll
                for (int w = 0; w < NW - 1; ++w) v += red[w][i][rt][q][lane];
                // d0, d1: feature g, columns 2t, 2t+1; d2, d3: feature g + 8.
                const int n = n0 + 16 * i + g + ((q >> 1) << 3);
                const int j = 8 * rt + 2 * t + (q & 1);
                if (n < N && j < R) {
                    const size_t o = (size_t)group_row(tab, rb, j) * N + n;
                    float out = scale * (v - corr_s[j]);
                    if (base) out += __bfloat162float(base[o]);
                    y[o] = __float2bfloat16(out);
                }
            }
        }
    }
}

#define DS_TC_KERNEL1(T, RT, SUF, VEC, NW, CLAMP)                                               \
    extern "C" __global__ void __launch_bounds__(32 * NW) ds_tc_bf16_t##T##_r##RT##_##SUF(       \
        const GroupTable tab, const uint4* __restrict__ xp, const float* __restrict__ corr,     \
        const __nv_bfloat16* __restrict__ base, __nv_bfloat16* __restrict__ y, int N, int W,    \
        int Kp) {                                                                               \
        ds_tc_bf16_body<T, RT, VEC, NW, CLAMP>(tab, xp, corr, base, y, N, W, Kp);               \
    }
#define DS_TC_KERNEL(T, RT)                                                                     \
    DS_TC_KERNEL1(T, RT, v, true, 4, false)                                                     \
    DS_TC_KERNEL1(T, RT, s, false, 4, false)                                                    \
    DS_TC_KERNEL1(T, RT, w8, true, 8, true)

DS_TC_KERNEL(1, 1)
DS_TC_KERNEL(2, 1)
DS_TC_KERNEL(4, 1)
DS_TC_KERNEL(1, 2)
DS_TC_KERNEL(2, 2)
DS_TC_KERNEL(4, 2)
DS_TC_KERNEL(1, 4)
DS_TC_KERNEL(2, 4)
// 2 warps splitting K, for the side stream of the overlapped decode step (src/cuda.rs): cuBLAS's
// base product at 32 rows (nvjet_sm90_tst_64x8_64x16_2x1_v_bz_splitK_TNT on the H100: 128 blocks
// of 384 threads x 168 registers and 164 KB of shared memory, so one block fills an SM's register
// file) cannot share an SM with anything, so the delta blocks only get SMs as cuBLAS's blocks
// finish. Blocks of 64 threads x 2 feature tiles (110 registers: 7 K per block, 1 KB of shared
// memory) are many small pieces that fill those SMs more evenly than 128-thread blocks of 4
// tiles (BENCHMARKS.md, seventh pass: 4096x11008 32 rows x 8 tenants 70.6 against 73.7 us).
DS_TC_KERNEL1(2, 1, w2, true, 2, false)

// ---------------------------------------------------------------------------------------------
// The int8 path: groups of at most 8 rows (decode; src/cuda.rs routes batches whose groups all
// have at most 2 rows here, where it measured fastest, unless the binary path takes them).
//
// Why. With one row per group the bf16 kernel uses 1 of the 8 mma columns, and what limits it is
// the ALU: 16 LOP3 + 1 shift per 32 signs (LOP3 issues at half rate), plus 32 mma.m16n8k16 per
// 512-column chunk of a 16-feature tile. An int8 register holds four values, so `w & mask` with
// mask = 0x01010101 << p makes four unsigned values b 2^p (b = the bit at position p of each
// byte) with ONE LOP3 and no magic or shift: 8 LOP3 per 32 signs, and mma.m16n8k32 (u8 x s8,
// s32 accumulation, native IMMA on sm_90; fp8 mma.sync is not native there) halves the mma count.
// The 2^p weight is moved into x: X'_k = X_k 2^(7 - p), X_k = round(x_k 2^E) with E per row such
// that |X| < 2^15 (exact for every element within 2^7 of the row's largest, i.e. all its bf16
// bits; smaller ones are rounded to 2^-E, 2^-16 of the largest). |X'| < 2^22 is written as three
// signed base-256 digits d0 + 256 d1 + 65536 d2, each its own mma column (a fourth column is
// zero), so two rows fit an n8 tile. Sums are exact in s32 (|2^p d| <= 2^14, K < 2^17), and
//   sum_k b_k X_k = 2^-7 (D0 + 256 D1 + 65536 D2),  x . s = 2 sum_k b_k x_k - sum_k x_k,
// computed in f64 in the store with sum_k x_k (of the rounded x) from the prep kernel.
// Register r (0..7) of a word holds positions p = r of its 4 bytes; mma step s (0..3) uses
// registers 2 s (a0 / a1, rows g / g + 8) and 2 s + 1 (a2 / a3). Thread t's B registers of step
// s hold x at k = 32 wi + 8 j + (2 s + h), j = 0..3, h = 0 (b0) / 1 (b1), wi = 16 sc + 4 t + c;
// xi8 stores them in that order (ds_prepi8_bf16).
// Measured on the H100 at 32 rows x 32 tenants (one row per group; BENCHMARKS.md, third pass):
// 4096x4096 48.8 -> 38.8 us, 11008x4096 109.2 -> 89.2 us, 4096x11008 122.6 -> 102.8 us against the
// bf16 kernel; with 4 or 8 rows per group (2 or 4 n-tiles) it was slower or no faster.

// The largest of every thread's m in a 256-thread block, for every thread (red_m: 8 floats).
__device__ __forceinline__ float ds_block_max(float m, float* red_m) {
    for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    if ((threadIdx.x & 31) == 0) red_m[threadIdx.x >> 5] = m;
    __syncthreads();
    m = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) m = fmaxf(m, red_m[i]);
    return m;
}

// The exponent E of a row's fixed-point form X = round(x 2^E), |X| < 2^15 (the int8 and binary
// paths), from the row's largest |x|: m = f 2^em, f in [0.5, 1), so m 2^(15 - em) < 2^15.
__device__ __forceinline__ int ds_fixed_point_exponent(float m) {
    int em = 0;
    if (m > 0.f) frexpf(m, &em);
    return m > 0.f ? 15 - em : 0;
}

// Sums every thread's `sum` of the 256-thread block and writes it and 2^-E for the row.
__device__ __forceinline__ void ds_row_sums(double sum, int E, double* red_s,
                                            double* __restrict__ xsum,
                                            double* __restrict__ rscale, int row) {
    const int tid = threadIdx.x;
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if ((tid & 31) == 0) red_s[tid >> 5] = sum;
    __syncthreads();
    if (tid == 0) {
        double total = 0.0;
        for (int i = 0; i < 8; ++i) total += red_s[i];
        xsum[row] = total;
        rscale[row] = ldexp(1.0, -E);
    }
}

// xi8 layout, per row of x: three digit planes of Kp bytes,
//   pos = ((sc * 4 + c) * 4 + t) * 32 + s * 8 + h * 4 + j.
// One block per row, 256 threads: the row's largest |x| picks E, then every thread writes whole
// 4-byte registers of the three planes and sums the rounded x (f64) into xsum[row];
// rscale[row] = 2^-E.
extern "C" __global__ void __launch_bounds__(256) ds_prepi8_bf16(const __nv_bfloat16* __restrict__ x,
                                                                 uint32_t* __restrict__ xi8,
                                                                 double* __restrict__ xsum,
                                                                 double* __restrict__ rscale,
                                                                 int K, int Kp) {
    const int row = blockIdx.x, tid = threadIdx.x;
    ds_launch_dependents();
    const __nv_bfloat16* xr = x + (size_t)row * K;
    __shared__ float red_m[8];
    __shared__ double red_s[8];
    float m = 0.f;
    for (int k = tid; k < K; k += 256) m = fmaxf(m, fabsf(__bfloat162float(xr[k])));
    const int E = ds_fixed_point_exponent(ds_block_max(m, red_m));
    double sum = 0.0;
    const int regs = Kp / 4;  // 4-byte registers per plane
    for (int q = tid; q < regs; q += 256) {
        // q = (((sc * 4 + c) * 4 + t) * 4 + s) * 2 + h
        const int h = q & 1, s = (q >> 1) & 3, t = (q >> 3) & 3, c = (q >> 5) & 3, sc = q >> 7;
        const int wi = 16 * sc + 4 * t + c, p = 2 * s + h;
        uint32_t d[3] = {0, 0, 0};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int k = 32 * wi + 8 * j + p;
            const float xv = k < K ? __bfloat162float(xr[k]) : 0.f;
            const int X = __float2int_rn(ldexpf(xv, E));  // |X| < 2^15
            sum += ldexp((double)X, -E);
            int v = X * (1 << (7 - p));  // |v| < 2^22
#pragma unroll
            for (int i = 0; i < 3; ++i) {
                const int di = (int)(int8_t)(v & 0xFF);  // low byte as a signed digit
                d[i] |= (uint32_t)(uint8_t)di << (8 * j);
                v = (v - di) >> 8;  // exact: v - di is a multiple of 256
            }
        }
#pragma unroll
        for (int i = 0; i < 3; ++i) xi8[((size_t)row * 3 + i) * regs + q] = d[i];
    }
    ds_row_sums(sum, E, red_s, xsum, rscale, row);
}

__device__ __forceinline__ void ds_mma_u8s8(int* d, uint32_t a0, uint32_t a1, uint32_t a2,
                                            uint32_t a3, uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Split-K as ds_tc_bf16_body (NW warps, T feature tiles per warp, clamped unconditional word
// loads as its CLAMP form; needs ceil(K/32) % 4 == 0, 16-byte aligned rows and K < 2^17 for the
// s32 sums), groups of at most 2 RT2 rows.
// Thread (g, t): B column g = digit g & 3 (3: zero) of group row 2 rt + (g >> 2); its
// accumulators c0, c1 (feature g) and c2, c3 (feature g + 8) are digits 2 (t & 1), 2 (t & 1) + 1
// of group row 2 rt + (t >> 1).
template <int T, int RT2, int NW, int PF = 0>
__device__ __forceinline__ void ds_tci8_body(const GroupTable& tab, const uint32_t* __restrict__ xi8,
                                             const double* __restrict__ xsum,
                                             const double* __restrict__ rscale,
                                             const __nv_bfloat16* __restrict__ base,
                                             __nv_bfloat16* __restrict__ y, int N, int W, int Kp) {
    const int grp = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const unsigned int rb = tab.row_begin[grp];
    const int R = (int)(tab.row_begin[grp + 1] - rb);
    const uint32_t* words = reinterpret_cast<const uint32_t*>(tab.words[grp]);
    const int n0 = blockIdx.x * 16 * T;

    if (words == nullptr) {  // base-only rows: zeros (or the base)
        ds_store_base_only(tab, rb, R, n0, 16 * T, N, base, y);
        return;
    }
    const uint32_t* arow[T][2];
#pragma unroll
    for (int i = 0; i < T; ++i) {
        const int nl = min(n0 + 16 * i + g, N - 1), nh = min(n0 + 16 * i + g + 8, N - 1);
        arow[i][0] = words + (size_t)nl * W;
        arow[i][1] = words + (size_t)nh * W;
    }
    const int plane_u4 = Kp / 16;  // uint4 per digit plane
    const uint4* brow[RT2];
    bool bact[RT2];
#pragma unroll
    for (int rt = 0; rt < RT2; ++rt) {
        const int j = 2 * rt + (g >> 2), digit = g & 3;
        bact[rt] = j < R && digit < 3;
        brow[rt] = reinterpret_cast<const uint4*>(xi8) +
                   ((size_t)(bact[rt] ? group_row(tab, rb, j) : 0) * 3 + (digit < 3 ? digit : 0)) *
                       plane_u4;
    }
    int acc[T][RT2][4];
#pragma unroll
    for (int i = 0; i < T; ++i)
#pragma unroll
        for (int rt = 0; rt < RT2; ++rt)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[i][rt][q] = 0;

    const int SC = Kp / 512;
    auto load = [&](int sc, uint32_t (&dst)[T][2][4]) {
        const int wi = min(16 * sc + 4 * t, W - 4);
#pragma unroll
        for (int i = 0; i < T; ++i)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const uint4 v = __ldg(reinterpret_cast<const uint4*>(arow[i][h] + wi));
                dst[i][h][0] = v.x; dst[i][h][1] = v.y; dst[i][h][2] = v.z; dst[i][h][3] = v.w;
            }
    };
    uint32_t a[T][2][4];
    load(warp, a);
    // PF > 0: the next PF chunks of this warp go to L2 before the wait, so that the loads in
    // flight during the prep kernel are not only the first chunk (the loop's own prefetch runs
    // 2 NW chunks ahead and only starts after the wait).
    if (PF > 0 && t == 0) {
#pragma unroll
        for (int f = 1; f <= PF; ++f)
            if (16 * (warp + f * NW) < W) {
#pragma unroll
                for (int i = 0; i < T; ++i)
#pragma unroll
                    for (int h = 0; h < 2; ++h)
                        asm volatile("prefetch.global.L2 [%0];" ::"l"(arow[i][h] + 16 * (warp + f * NW)));
            }
    }
    ds_wait_prerequisite();  // xi8, xsum and rscale come from ds_prepi8_bf16
    for (int sc = warp; sc < SC; sc += NW) {
        if (t == 0 && 16 * (sc + 2 * NW) < W) {
#pragma unroll
            for (int i = 0; i < T; ++i)
#pragma unroll
                for (int h = 0; h < 2; ++h)
                    asm volatile("prefetch.global.L2 [%0];" ::"l"(arow[i][h] + 16 * (sc + 2 * NW)));
        }
        uint32_t an[T][2][4];
        load(sc + NW, an);
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            uint32_t b[RT2][4][2];
#pragma unroll
            for (int rt = 0; rt < RT2; ++rt) {
#pragma unroll
                for (int hf = 0; hf < 2; ++hf) {
                    uint4 v = make_uint4(0, 0, 0, 0);
                    if (bact[rt]) v = __ldg(brow[rt] + ((sc * 4 + c) * 4 + t) * 2 + hf);
                    b[rt][2 * hf][0] = v.x;
                    b[rt][2 * hf][1] = v.y;
                    b[rt][2 * hf + 1][0] = v.z;
                    b[rt][2 * hf + 1][1] = v.w;
                }
            }
#pragma unroll
            for (int i = 0; i < T; ++i) {
                const uint32_t wl = a[i][0][c], wh = a[i][1][c];
#pragma unroll
                for (int s = 0; s < 4; ++s) {
                    // Plain ANDs; the immediate mask makes each one LOP3.
                    const uint32_t m0 = 0x01010101u << (2 * s), m1 = 0x01010101u << (2 * s + 1);
                    const uint32_t a0 = wl & m0, a1 = wh & m0, a2 = wl & m1, a3 = wh & m1;
#pragma unroll
                    for (int rt = 0; rt < RT2; ++rt)
                        ds_mma_u8s8(acc[i][rt], a0, a1, a2, a3, b[rt][s][0], b[rt][s][1]);
                }
            }
        }
#pragma unroll
        for (int i = 0; i < T; ++i)
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int c = 0; c < 4; ++c) a[i][h][c] = an[i][h][c];
    }

    __shared__ int red[NW - 1][T][RT2][4][32];
    if (warp > 0) {
#pragma unroll
        for (int i = 0; i < T; ++i)
#pragma unroll
            for (int rt = 0; rt < RT2; ++rt)
#pragma unroll
                for (int q = 0; q < 4; ++q) red[warp - 1][i][rt][q][lane] = acc[i][rt][q];
    }
    __syncthreads();
    if (warp != 0) return;
    const float scale = tab.scale[grp];
#pragma unroll
    for (int rt = 0; rt < RT2; ++rt) {
        const int j = 2 * rt + (t >> 1);
        const int row = j < R ? group_row(tab, rb, j) : 0;
#pragma unroll
        for (int i = 0; i < T; ++i) {
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                int d0 = acc[i][rt][2 * hh], d1 = acc[i][rt][2 * hh + 1];
#pragma unroll
                for (int w = 0; w < NW - 1; ++w) {
                    d0 += red[w][i][rt][2 * hh][lane];
                    d1 += red[w][i][rt][2 * hh + 1][lane];
                }
                // Even t holds digits 0, 1 of its row; odd t digit 2 (and the zero column).
                const int d2 = __shfl_xor_sync(0xffffffffu, d0, 1);
                const int n = n0 + 16 * i + g + 8 * hh;
                if ((t & 1) == 0 && j < R && n < N) {
                    const double S = (double)d0 + 256.0 * (double)d1 + 65536.0 * (double)d2;
                    // x . s = 2 sum b x - sum x, sum b x = rscale 2^-7 S
                    const double dot = 2.0 * rscale[row] * (S * 0.0078125) - xsum[row];
                    const size_t o = (size_t)row * N + n;
                    float out = scale * (float)dot;
                    if (base) out += __bfloat162float(base[o]);
                    y[o] = __float2bfloat16(out);
                }
            }
        }
    }
}

// MINB: __launch_bounds__'s minimum blocks per SM; PF: see ds_tci8_body.
#define DS_TCI8_KERNEL_X(T, RT2, NW, MINB, PF)                                                  \
    DS_TCI8_KERNEL_NAMED(T, RT2, NW, MINB, PF, ds_tci8_bf16_t##T##_r##RT2##_w##NW)
#define DS_TCI8_KERNEL_NAMED(T, RT2, NW, MINB, PF, NAME)                                        \
    extern "C" __global__ void __launch_bounds__(32 * NW, MINB) NAME(                           \
            const GroupTable tab, const uint32_t* __restrict__ xi8,                             \
            const double* __restrict__ xsum, const double* __restrict__ rscale,                 \
            const __nv_bfloat16* __restrict__ base, __nv_bfloat16* __restrict__ y, int N, int W, \
            int Kp) {                                                                           \
        ds_tci8_body<T, RT2, NW, PF>(tab, xi8, xsum, rscale, base, y, N, W, Kp);                \
    }
#define DS_TCI8_KERNEL(T, RT2, NW) DS_TCI8_KERNEL_X(T, RT2, NW, 1, 0)
#define DS_TCI8_KERNELS(T, RT2) DS_TCI8_KERNEL(T, RT2, 4) DS_TCI8_KERNEL(T, RT2, 8)

DS_TCI8_KERNELS(1, 1)
DS_TCI8_KERNELS(2, 1)
// One-row groups with many blocks (32 rows x 32 tenants; src/cuda.rs's rule), K9's measurements
// (BENCHMARKS.md, eighth pass). 4 warps: at 110 registers only 4 blocks fit an SM (16 warps, 25%
// occupancy, ~51% of DRAM bandwidth under Nsight Compute at 4096x4096); capping the registers at
// 5 blocks per SM moved 4096x4096 from 38.5 to 36.7 us and 11008x4096 from 87.8 to 82.1 (6 blocks
// was faster still there but slower at 8 x 8 and at K = 11008). 2 warps with the second chunk
// prefetched into L2 before the wait: for K = 11008 (22 chunks of 512, which 4 warps split 6/6/5/5)
// 100.0 -> 91.5 us, 8 x 8 unchanged.
DS_TCI8_KERNEL_X(4, 1, 4, 5, 0)
DS_TCI8_KERNEL(4, 1, 8)
DS_TCI8_KERNEL_X(4, 1, 2, 1, 1)
// The same 4-warp kernel capped at 6 blocks per SM (at most 80 registers), for launches of more
// than 16 groups (src/cuda.rs): K9 measured 6 blocks 1.2 us faster than 5 at 4096x4096 32 x 32 but
// slower at 8 x 8 (8 groups), and at 16 groups, beside cuBLAS, it made the whole step slower
// (BENCHMARKS.md, session 6, lead); those keep `t4_r1_w4`. Measured on the H100 (BENCHMARKS.md,
// ninth pass, two processes each, same call): 4096x4096 32 x 32 36.4-36.5 -> 35.4 us, 11008x4096
// 82.3-82.9 -> 81.4-81.5 us.
DS_TCI8_KERNEL_NAMED(4, 1, 4, 6, 0, ds_tci8_bf16_t4_r1_w4_b6)
DS_TCI8_KERNELS(1, 2)
DS_TCI8_KERNELS(2, 2)
DS_TCI8_KERNELS(4, 2)
DS_TCI8_KERNELS(1, 4)
DS_TCI8_KERNELS(2, 4)

// ---------------------------------------------------------------------------------------------
// The binary path: groups of at most 8 rows (decode) on 1-bit tensor cores. src/cuda.rs
// (`takes_b1`) routes one-row groups here, and groups of up to 8 rows with 8 or more tenants
// (2-row groups only where K or N >= 8192), where it measured faster than the int8 and bf16
// kernels (BENCHMARKS.md, sessions 7 and 8). On compute capability 9.0, groups of 3-8 rows take
// the warpgroup form of the same arithmetic instead (binary_wgmma.cu, session 9).
//
// Why. The bf16 and int8 paths spend their instructions turning sign bits into mma operands
// (16 LOP3 + 1 shift, or 8 LOP3, per 32 signs); at 4 rows per group that chain of unpacking and
// mma is what a warp waits on (BENCHMARKS.md, ninth pass: 8.8 cycles per issued instruction).
// mma.m16n8k256 on .b1 operands with AND + popc (BMMA, native on sm_90; ~8 cycles per sub-core
// on the H100 under Nsight Compute) takes the sign words as they are stored, so a warp does no
// unpacking at all. x goes in as bit planes: X_k = round(x_k 2^E) as in the int8 path
// (|X| < 2^15), and bit p of the 16-bit two's complement X is plane p, with weight
// w_p = 2^p (p < 15) or -2^15 (p = 15). The 16 planes of one row of x are the 16 rows of the
// mma's A; 8 output features' sign rows are its B (n8), so
//   sum_k b_k X_k = sum_p w_p D_p,  D_p = sum_k (bit p of X_k) AND b_k  (exact s32 popc sums),
//   x . s = 2 rscale sum_k b_k X_k - xsum  (sum_p w_p D_p in int32, exact for K < 2^16, then
//   f64 in the store; rscale = 2^-E, xsum of rounded x).
// Bits past K: x's planes are zero there, so whatever the sign words hold ANDs to zero.
// Fragments (m16n8k256, b1): thread (g, t) holds A rows g / g + 8 at k-slots 32 t .. 32 t + 31
// (a0 / a1) and 128 + 32 t .. (a2 / a3), B column g at k-slots 32 t .. (b0) and 128 + 32 t ..
// (b1). In a 512-column chunk c (16 words), mma j (0, 1) maps k-slot 32 t to word 16 c + 4 t + 2 j
// and k-slot 128 + 32 t to word 16 c + 4 t + 2 j + 1: one 16-byte load of a sign row gives a thread
// b0 b1 of both mma in adjacent registers, and the prep kernel stores x's planes as the A
// fragments themselves (xb below), one 16-byte load per mma and row of x, reused for every
// feature tile of the warp.

// xb layout: per row of x, CH = Wp / 16 chunks (Wp = 16 ceil(W / 16)) of 2 x 32 uint4 A
// fragments: uint4 ((row * CH + c) * 2 + j) * 32 + 4 g + t = (plane g, plane g + 8) of word
// 16 c + 4 t + 2 j, then of word 16 c + 4 t + 2 j + 1; word wi of plane p holds bit p of X at
// k = 32 wi .. 32 wi + 31 (bit b = column 32 wi + b), as the sign words do; zero past K.
// Grid (row, slice of 32 words), 256 threads: every block finds the row's E itself (so no block
// waits for another), each warp forms 4 words (lane b holds X at k = 32 wi + b; one ballot per
// plane), and the block's sum of X goes to xsum[row * SL + slice] (SL = ceil(Wp / 32)) as a
// double; the product kernel adds a row's SL partial sums. One block per row was 8 us at
// 32 x 4096 (Nsight Compute): its instructions, on 32 SMs.
// PLANE_ROWS: the layout of the warpgroup kernel (binary_wgmma.cu) instead, ds_prepb1wg_bf16:
// per row and chunk c, plane p's 16 words 16 c .. 16 c + 15 at uint32 ((row CH + c) 16 + p) 16,
// i.e. one 64-byte row of the wgmma A operand per plane.
template <bool PLANE_ROWS>
__device__ __forceinline__ void ds_prepb1_body(const __nv_bfloat16* __restrict__ x,
                                               uint32_t* __restrict__ xb, double* __restrict__ xsum,
                                               double* __restrict__ rscale, int K, int Wp) {
    const int row = blockIdx.x, slice = blockIdx.y, tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    ds_launch_dependents();
    const __nv_bfloat16* xr = x + (size_t)row * K;
    // This warp's 4 words: their x first, so that these loads and the row maximum's are in flight
    // together (the product kernel waits for all of this kernel).
    float xv[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int k = 32 * (32 * slice + 4 * warp + i) + lane;
        xv[i] = k < K ? __bfloat162float(xr[k]) : 0.f;
    }
    float m = 0.f;
    if ((reinterpret_cast<size_t>(xr) & 15) == 0) {  // 8 values per 16-byte load
        const uint4* xr8 = reinterpret_cast<const uint4*>(xr);
        const int K8 = K / 8;
#pragma unroll 8
        for (int v = tid; v < K8; v += 256) {
            const uint4 u = __ldg(xr8 + v);
            const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
            for (int h = 0; h < 4; ++h) {
                const __nv_bfloat162 b = *reinterpret_cast<const __nv_bfloat162*>(&w[h]);
                m = fmaxf(m, fmaxf(fabsf(__low2float(b)), fabsf(__high2float(b))));
            }
        }
        for (int k = 8 * K8 + tid; k < K; k += 256) m = fmaxf(m, fabsf(__bfloat162float(xr[k])));
    } else {
#pragma unroll 8
        for (int k = tid; k < K; k += 256) m = fmaxf(m, fabsf(__bfloat162float(xr[k])));
    }
    __shared__ float red_m[8];
    __shared__ long long red_s[8];
    const int E = ds_fixed_point_exponent(ds_block_max(m, red_m));
    // 2^E as two exact float factors: E is in [-114, 163], beyond one float's exponent range.
    const int e1 = E / 2, e2 = E - e1;
    const float f1 = __int_as_float((127 + e1) << 23), f2 = __int_as_float((127 + e2) << 23);
    const int CH = Wp / 16;
    int sum = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int wi = 32 * slice + 4 * warp + i;
        const int X = __float2int_rn(xv[i] * f1 * f2);  // |X| < 2^15
        sum += X;
        uint32_t mine = 0;
#pragma unroll
        for (int p = 0; p < 16; ++p) {
            const uint32_t word = __ballot_sync(0xffffffffu, (X >> p) & 1);
            if (lane == p) mine = word;
        }
        // word wi = 16 c + 4 t + 2 j + e; plane p = 8 hi + g goes to component 2 e + hi
        const int c = wi >> 4, t = (wi >> 2) & 3, j = (wi >> 1) & 1, e = wi & 1;
        if (lane < 16 && c < CH) {
            if constexpr (PLANE_ROWS)
                xb[(((size_t)row * CH + c) * 16 + lane) * 16 + (wi & 15)] = mine;
            else
                xb[((((size_t)row * CH + c) * 2 + j) * 32 + 4 * (lane & 7) + t) * 4 + 2 * e +
                   (lane >> 3)] = mine;
        }
    }
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane == 0) red_s[warp] = sum;
    __syncthreads();
    if (tid == 0) {
        long long total = 0;
#pragma unroll
        for (int i = 0; i < 8; ++i) total += red_s[i];
        // sum of the rounded x: exact (|total| < 2^32 times a power of two)
        xsum[(size_t)row * gridDim.y + slice] = ldexp((double)total, -E);
        if (slice == 0) rscale[row] = ldexp(1.0, -E);
    }
}
extern "C" __global__ void __launch_bounds__(256) ds_prepb1_bf16(const __nv_bfloat16* __restrict__ x,
                                                                 uint32_t* __restrict__ xb,
                                                                 double* __restrict__ xsum,
                                                                 double* __restrict__ rscale,
                                                                 int K, int Wp) {
    ds_prepb1_body<false>(x, xb, xsum, rscale, K, Wp);
}
extern "C" __global__ void __launch_bounds__(256)
    ds_prepb1wg_bf16(const __nv_bfloat16* __restrict__ x, uint32_t* __restrict__ xb,
                     double* __restrict__ xsum, double* __restrict__ rscale, int K, int Wp) {
    ds_prepb1_body<true>(x, xb, xsum, rscale, K, Wp);
}

__device__ __forceinline__ void ds_bmma(int* d, const uint4& a, uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
}

// NW warps side by side on the features (warp w: 2 T tiles of 8 features from n0 = nb + 16 T w),
// all over the whole K. Each 512-column chunk goes through a block-wide cp.async ring of S slots
// in dynamic shared memory: the block's sign rows (NW T 16 rows of 64 bytes) and the group's x
// fragments (R rows x 1 KB), so x is read from L2 once per block, not once per warp, and S - 1
// chunks are in flight while one is multiplied. Thread (g, t) reads its sign words at row
// offset 16 t bytes of a 64-byte row and its fragments at 16 lane: conflict-free. Groups of at
// most R rows. Needs ceil(K/32) % 4 == 0 and 16-byte aligned sign rows (the copies' word index is
// clamped into the row; what a clamped copy reads meets zero planes).
// PF: the sign copies ask L2 to fetch the whole 256-byte segment around them (.L2::256B), so the
// next 3 chunks of a sign row come from L2. Measured on the H100 (BENCHMARKS.md, session 8): a
// gain on the long rows of K = 11008 (4096x11008 32 x 32 93.4 -> 77.3 us, 8 x 8 26.0 -> 23.3)
// and with 32 tenants, a loss on the short rows of K = 4096 with 8 tenants (4096x4096 32 x 8
// 13.3 -> 14.3); src/cuda.rs chooses.
// What bounds this kernel is its warps' own instruction chains (Nsight Compute at 4096x4096
// 32 x 8: about 10 cycles between a warp's instructions, long and short scoreboard and fixed
// latency; DRAM 33% busy), so the loop and the store are written for few instructions: every mma
// of a chunk runs unpredicated after all its fragment loads, and the store reduces the planes in
// int32 and scatters the sums over the threads (ds_reduce_scatter8). From 3.87 M to 2.46 M
// instructions there, and 15.7 -> 12.9 us.
template <int T, int R, int NW, int S, bool PF>
__device__ __forceinline__ void ds_tcb1_body(const GroupTable& tab, const uint4* __restrict__ xb,
                                             const double* __restrict__ xsum,
                                             const double* __restrict__ rscale,
                                             const __nv_bfloat16* __restrict__ base,
                                             __nv_bfloat16* __restrict__ y, int N, int W, int Wp) {
    constexpr int A_U4 = NW * T * 16 * 4;  // uint4 of sign rows per slot
    constexpr int B_U4 = R * 64;           // uint4 of x fragments per slot
    extern __shared__ uint4 ring[];
    const int grp = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const unsigned int rb = tab.row_begin[grp];
    const int Rg = (int)(tab.row_begin[grp + 1] - rb);
    const uint32_t* words = reinterpret_cast<const uint32_t*>(tab.words[grp]);
    const int nb = blockIdx.x * NW * 16 * T;  // the block's first feature
    const int n0 = nb + warp * 16 * T;        // the warp's

    if (words == nullptr) {  // base-only rows: zeros (or the base)
        ds_store_base_only(tab, rb, Rg, nb, NW * 16 * T, N, base, y);
        return;
    }
    const int CH = Wp / 16;
    // Slot layout: sign row r (0 .. NW T 16) at r * 4 + q (q = the 16-byte quarter of the chunk's
    // 64 bytes), then x row j's fragments at A_U4 + j * 64 + (mma * 32 + lane). Thread e of the
    // block copies entries e + 32 NW u of each; their sources are fixed but for the chunk offset.
    // x rows past the group's are zero-filled (source size 0), so every mma below can run.
    constexpr int AU = A_U4 / (32 * NW), BU = (B_U4 + 32 * NW - 1) / (32 * NW);
    const int q = threadIdx.x & 3;
    const uint32_t* asrc[AU];
#pragma unroll
    for (int u = 0; u < AU; ++u) {
        const int r = (threadIdx.x + 32 * NW * u) >> 2;
        asrc[u] = words + (size_t)min(nb + r, N - 1) * W;
    }
    const uint4* bsrc[BU];
    int bbytes[BU];
#pragma unroll
    for (int u = 0; u < BU; ++u) {
        const int e = threadIdx.x + 32 * NW * u, j = e >> 6;
        bbytes[u] = j < Rg ? 16 : 0;
        bsrc[u] = xb + (j < Rg ? (size_t)group_row(tab, rb, j) * CH * 64 + (e & 63) : 0);
    }
    auto issue_a = [&](int c) {
        uint4* dst = ring + (c % S) * (A_U4 + B_U4) + threadIdx.x;
        const int wi = min(16 * c + 4 * q, W - 4);
#pragma unroll
        for (int u = 0; u < AU; ++u) ds_cp_async16<PF>(dst + 32 * NW * u, asrc[u] + wi, 16);
    };
    auto issue_b = [&](int c) {
        uint4* dst = ring + (c % S) * (A_U4 + B_U4) + A_U4 + threadIdx.x;
#pragma unroll
        for (int u = 0; u < BU; ++u)
            if (B_U4 % (32 * NW) == 0 || threadIdx.x + 32 * NW * u < B_U4)
                ds_cp_async16(dst + 32 * NW * u, bsrc[u] + 64 * c, bbytes[u]);
    };
    ds_ring_prologue<S - 1>(CH, issue_a, issue_b);  // then xb, xsum, rscale of ds_prepb1_bf16

    int acc[R][2 * T][4];
#pragma unroll
    for (int j = 0; j < R; ++j)
#pragma unroll
        for (int f = 0; f < 2 * T; ++f)
#pragma unroll
            for (int v = 0; v < 4; ++v) acc[j][f][v] = 0;

    for (int c = 0; c < CH; ++c) {
        ds_cp_async_wait<S - 2>();
        __syncthreads();  // chunk c is in; every warp is done with chunk c - 1's slot
        if (c + S - 1 < CH) {
            issue_a(c + S - 1);
            issue_b(c + S - 1);
        }
        ds_cp_async_commit();
        const uint4* slot = ring + (c % S) * (A_U4 + B_U4);
        uint4 b[2 * T];
#pragma unroll
        for (int f = 0; f < 2 * T; ++f) b[f] = slot[(warp * T * 16 + 8 * f + g) * 4 + t];
        // All fragments first, then the mma, unpredicated: a predicated mma.sync costs a
        // WARPSYNC, and loading each fragment just before its mma left the warp waiting on
        // every load.
        uint4 a[R][2];
#pragma unroll
        for (int j = 0; j < R; ++j)
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) a[j][mi] = slot[A_U4 + j * 64 + 32 * mi + lane];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
            for (int j = 0; j < R; ++j)
#pragma unroll
                for (int f = 0; f < 2 * T; ++f)
                    ds_bmma(acc[j][f], a[j][mi], mi ? b[f].z : b[f].x, mi ? b[f].w : b[f].y);
    }
    ds_cp_async_wait<0>();

    // Thread (g, t): acc[j][f][2 hi + e] is plane 8 hi + g of group row j, feature
    // n0 + 8 f + 2 t + e; the 8 threads g of a column t hold the 16 planes between them. Their
    // weighted sum sum_p w_p D_p is exact in int32: |X| < 2^15 and D_p <= K < 2^16 (src/cuda.rs
    // checks K), and every partial sum of it is bounded by the whole positive or negative part.
    // The warp's V sums (rows j, tiles f, e) are reduced over g and scattered at once
    // (ds_reduce_scatter8: 14 shuffles for V = 16 where one reduction per sum took 48), so that
    // thread g ends with V / 8 consecutive sums, all of one row (R <= 8), and stores them.
    constexpr int V = R * 2 * T * 2;
    const int wlo = ds_plane_weight(g), whi = ds_plane_weight(g + 8);
    int v[V];
#pragma unroll
    for (int j = 0; j < R; ++j)
#pragma unroll
        for (int f = 0; f < 2 * T; ++f)
#pragma unroll
            for (int e = 0; e < 2; ++e)
                v[(j * 2 * T + f) * 2 + e] = wlo * acc[j][f][e] + whi * acc[j][f][2 + e];
    ds_reduce_scatter8<V>(v, g);
    constexpr int HOLD = V >= 8 ? V / 8 : 1;  // v[0 .. HOLD): sums i0 .. i0 + HOLD - 1
    const int i0 = g * V / 8;
    constexpr int SHARED = V >= 8 ? 1 : 8 / V;  // threads g holding the same sums
    if (g % SHARED != 0) return;                 // its sums are also its neighbours'
    const int j = (i0 >> 1) / (2 * T);
    if (j >= Rg) return;
    const DsB1Row out = ds_b1_row(xsum, rscale, group_row(tab, rb, j), Wp, N);
    const float scale = tab.scale[grp];
#pragma unroll
    for (int k = 0; k < HOLD; ++k) {
        const int i = i0 + k, e = i & 1, f = (i >> 1) % (2 * T);
        ds_b1_store(out, n0 + 8 * f + 2 * t + e, N, v[k], scale, base, y);
    }
}

// 4 warps and a ring of 6 slots (src/cuda.rs opts in to more than 48 KB of shared memory where a
// slot is above 8 KB). Measured on the H100 (BENCHMARKS.md, sessions 7 and 8): 6 slots beat 4 and
// 8 (8 leaves room for 3 blocks per SM, which splits 4096-feature grids into two waves); no faster
// were 8 warps per block (x read from L2 half as often), two sets of 4 warps splitting K (gains of
// 1-4% on some mixes, losses on others), and the group's x kept in shared memory for several
// feature tiles per block (slower as the tiles per block grew: a block's chain got longer).
#define DS_TCB1_KERNEL(T, R, PF, SUFFIX)                                                         \
    extern "C" __global__ void __launch_bounds__(128) ds_tcb1_bf16_t##T##_r##R##SUFFIX(         \
            const GroupTable tab, const uint4* __restrict__ xb,                                 \
            const double* __restrict__ xsum, const double* __restrict__ rscale,                 \
            const __nv_bfloat16* __restrict__ base, __nv_bfloat16* __restrict__ y, int N, int W, \
            int Wp) {                                                                           \
        ds_tcb1_body<T, R, 4, 6, PF>(tab, xb, xsum, rscale, base, y, N, W, Wp);                 \
    }
#define DS_TCB1_KERNELS(T, R)              \
    DS_TCB1_KERNEL(T, R, false, /* none */) \
    DS_TCB1_KERNEL(T, R, true, _pf)
DS_TCB1_KERNELS(1, 1)
DS_TCB1_KERNELS(2, 1)
DS_TCB1_KERNELS(1, 2)
DS_TCB1_KERNELS(2, 2)
DS_TCB1_KERNELS(1, 4)
DS_TCB1_KERNELS(1, 8)

// ---------------------------------------------------------------------------------------------
// Fused delta linear layer for decode: y[r] = x[r] . (Wbase + scale_g S_g)^T, one kernel, for
// at most 32 rows in at most 8 groups (tenants, plus the base-only rows as one group).
//
// Why. At decode the base weight's bytes dominate (16 bits per weight against 1 sign bit per
// tenant), so the layer is a skinny GEMM that should stream Wbase at copy bandwidth. Each thread
// forms the merged weight Wbase + scale S of the elements it holds in registers, rounded once to
// bf16 (fma.rn.bf16x2: the exact w + s * (+-1), rounded, with s rounded to bf16 first: 2^-9
// relative on the delta term), and feeds one bf16 mma: the sign costs 1.5 instructions per weight
// and no mma of its own, and the product is the one a merged bf16 checkpoint computes. With
// several groups, the W registers are merged once per group and multiplied by that group's rows
// only (the other rows' x fragments are zeroed), which costs the merge and an mma per group: on
// the H100 that lost to GEMV + the delta kernel from 8 tenants on, so delta_linear (ops.rs) sends
// only one-tenant batches here.
// Measured on the H100 (BENCHMARKS.md, fourth pass), one tenant: 4096x4096 18.8 us at 1 row, 19.5
// at 8, 27.1 at 32 (the previous fused kernel, which computed the base and delta products
// separately in one pass: 19.2, 22.3, 51.9); 11008x4096 42.2 / 43.1 at 1 / 8 rows.
// Tried and lost on the same card: splitting K over a cluster of 8 blocks that kept their slice of
// x in shared memory and reduced through distributed shared memory (25.3 us at 4096x4096 1x1,
// 32.1 at 32x1: x re-reads were not what made 32 rows slow); moving the stages with the bulk copy
// engine (cp.async.bulk, one 256-byte row segment per lane, mbarrier completion: 27.9 us at 1x1,
// 54.3 at 32x1, worse with a deeper ring); 64 features per block (30.3 us at 1x1, 64 blocks).
//
// Layout. A block owns 16 T = 32 output features; its NW warps split K in stages of 32 KS
// columns (KS = 2 for one group, 4 for several; warp w takes stages w, w + NW, ...). Every stage
// goes through a per-warp cp.async ring of S slots in dynamic shared memory: the block's W rows
// (T x 16 rows x 64 KS bytes), x (RT x 8 rows x 64 KS bytes, rows gathered through the table,
// zero-filled past M and K) and each group's bits (T x 16 rows x 4 KS bytes, in 16-byte rows).
// All lanes of the warp copy and all read (a __syncwarp after the wait makes the other lanes'
// copies visible). Copies are 16 bytes (the bits 8 bytes when KS = 2), 32 / (4 KS) rows of W per
// warp instruction; the ring stores them in the order the mma fragments read them.
// Fragments: in k-step ks (32 columns, P = 32 ks + 8 t) thread (g, t) holds columns P .. P+7 of W
// rows g and g + 8 (registers .x .y .z .w = column pairs 0..3) and of x row g; .x .y feed the
// first m16n8k16 (a0 a1 a2 a3 = row g pair 0, row g+8 pair 0, row g pair 1, row g+8 pair 1; b0 b1
// = x pairs 0, 1), .z .w the second: mma index k = 2t, 2t+1, 2t+8, 2t+9 maps to the same physical
// column in A and in B, and the 4 threads t cover the 32 columns, so the sum over k is taken in
// another order, which does not change it. The bits of those 8 columns are byte t of word ks of
// the row: u = b | b << 15 puts bit 2j at position 2j and bit 2j + 1 at 16 + 2j, so
// (u << (15 - 2j)) & 0x80008000 moves the two bits of pair j to the two bf16 sign positions, and
// XOR 0xBF80BF80 gives +1 (bit set) or -1 per half: 2 instructions per pair, then the fma.
// Needs K % 8 == 0, ceil(K/32) % 4 == 0, 16-byte aligned W, x and words rows.
// The warps' partial sums meet in shared memory (reusing the ring) at the end; the grid is sized
// (src/cuda.rs) so that all its blocks are resident at once, with as many warps as fit.

__device__ __forceinline__ uint32_t ds_fma_bf16x2(uint32_t a, uint32_t b, uint32_t c) {
    uint32_t d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// A pair of signs from u (see above) as two bf16 +-1 values; P2 = 15 - 2 j.
template <int P2> __device__ __forceinline__ uint32_t ds_sign_pair(uint32_t u) {
    uint32_t d;
    asm("lop3.b32 %0, %1, %2, %3, 0x6A;"  // (a & b) ^ c
        : "=r"(d)
        : "r"(u << P2), "n"(0x80008000u), "r"(0xBF80BF80u));
    return d;
}

// A stage's sign bits of one row: KS words (16 bytes for 128-column stages, 8 for 64).
template <int KS> __device__ __forceinline__ void ds_cp_async_bits(void* smem, const uint32_t* gmem) {
    static_assert(KS == 2 || KS == 4, "stages of 64 or 128 columns");
    if constexpr (KS == 4) {
        ds_cp_async16(smem, gmem, 16);
    } else {
        // cp.async copies 4, 8 or 16 bytes; below 16 only through L1 (.ca).
        const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
        asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(s), "l"(gmem) : "memory");
    }
}

// At most 8 groups (src/cuda.rs sizes the shared memory for them).


// Fifth pass: the per-copy address work is hoisted. The profile of the fourth pass's kernel
// (Nsight Compute, 4096x4096, 32 rows: BENCHMARKS.md, fifth pass) showed DRAM at 38% and L2 at 40%
// of peak with 1 warp per scheduler issuing every 4.8 cycles, and its SASS had ~10 integer
// instructions (row clamps, 64-bit address products, group masks) per mma: the warps were busy
// issuing copies, not waiting for bytes. Here each lane's source rows are clamped and turned into
// pointers once, so a copy is one 64-bit add; ONE (a single group, the only batches delta_linear
// sends here) drops the per-row group masks, since rows past M are zero-filled already.
// Measured against the fourth pass's kernel in the same call (3-slot rings both): 4096x4096 17.4
// / 18.2 / 23.0 us at 1 / 8 / 32 rows (was 18.9 / 19.5 / 27.1), 11008x4096 32 rows 57.5 (78.1).
// Ring depth. Since the warps, not the bytes in flight, were the limit, the ring had 2 slots
// (plain double buffering: one stage in flight while the other is multiplied), so more warps fit:
// 6 instead of 4 at 32 rows on 4096x4096, 2 instead of 1 on 11008x4096. Same call against 3 slots:
// 4096x4096 16.6 / 17.1 / 22.4 us at 1 / 8 / 32 rows (17.3 / 18.3 / 22.9), 11008x4096 38.8 /
// 39.9 / 49.5 (39.9 / 40.7 / 57.7), 4096x11008 40.5 / 41.1 / 49.5 (42.1 / 42.9 / 52.2).
// Tried and lost: x out of the ring, loaded by each lane with ld.global one stage ahead into
// registers (8 warps fit instead of 4 at 32 rows, but they stall on those loads: 23.4 us at
// 4096x4096 32 rows with the hoisted addresses, 25.4 without); ring depth 4 or 5 (fewer warps:
// 31.3 / 40.5 us at 32 rows, 20.2 / 19.5 at 1 row, on the fourth pass's body).
// Sixth pass: stages of 64 columns (KS = 2) for one group. With 128-column stages a 32-row
// slot held 17 KB (x half of it), so 6 warps fit an SM on 4096x4096 with 2 slots, each with one
// stage in flight: Nsight Compute showed 0.23 issued warps per scheduler per cycle, 77% of cycles
// with no eligible warp, DRAM at 45%. Halving the slot lets 8 warps keep two stages in flight
// (3 slots, chosen by src/cuda.rs where 8 warps fit, else 2 slots for more warps): DRAM 56%, 0.29
// issued per scheduler. Same device call against the fifth pass's kernel (one process each):
// 4096x4096 15.3 / 15.6 / 16.4 / 18.5 us at 1 / 8 / 16 / 32 rows (16.6 / 17.0 / 18.2 / 22.3),
// 11008x4096 37.8 / 38.8 / 40.1 / 43.8 (38.6 / 39.6 / 41.9 / 49.2), 4096x11008 39.6 / 40.5 /
// 42.4 / 46.2 (40.2 / 41.0 / 43.0 / 49.6). Also measured: up to 16 warps with 2 slots (19.1 us
// at 4096x4096 32 rows) or 3 slots (15.8 at 1 row, 41.5 on 4096x11008 1 row): no better.
template <int T, int RT, int S, bool ONE, int KS>
__device__ __forceinline__ void ds_fused_bf16_body(const GroupTable& tab,
                                                    const __nv_bfloat16* __restrict__ x,
                                                    const __nv_bfloat16* __restrict__ wbase,
                                                    __nv_bfloat16* __restrict__ y, int M, int N,
                                                    int K, int W) {
    extern __shared__ uint4 ds_dyn_smem[];
    const int NW = blockDim.x >> 5;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int n0 = blockIdx.x * 16 * T;
    const int ng = ONE ? 1 : (int)tab.n_groups;
    // Per-slot uint4 counts: W (T m-tiles x KS k-steps x 2 halves x 32 lanes), x (RT n-tiles x KS
    // k-steps x 32 lanes), bits (ng groups x T m-tiles x 16 rows, 4 KS bytes used of each 16).
    constexpr int W_U4 = T * KS * 2 * 32, X_U4 = RT * KS * 32;
    // A stage is SC columns; a row's stage is LPR 16-byte segments, so one warp instruction
    // copies RPI rows.
    constexpr int SC = 32 * KS, LPR = 4 * KS, RPI = 32 / LPR;
    const int slot_u4 = W_U4 + X_U4 + ng * T * 16;
    uint4* ring = ds_dyn_smem + (size_t)warp * S * slot_u4;
    const int NST = (K + SC - 1) / SC;  // stages (= W / KS)
    const int c = lane % LPR;  // this lane's 16-byte segment of a row's stage
    const int rs = lane / LPR;  // and its row within the RPI rows of one copy instruction

    // W rows of this lane's copies (row 16 i + RPI q + rs of the block, clamped to N - 1: rows
    // past N are read but never stored), at its segment's first column.
    const __nv_bfloat16* wsrc[T][16 / RPI];
#pragma unroll
    for (int i = 0; i < T; ++i)
#pragma unroll
        for (int q = 0; q < 16 / RPI; ++q)
            wsrc[i][q] = wbase + (size_t)min(n0 + 16 * i + RPI * q + rs, N - 1) * K + 8 * c;
    // x rows of this lane's ring copies (slot j = 8 nt + RPI q + rs), null past M.
    const __nv_bfloat16* xsrc[RT][8 / RPI];
#pragma unroll
    for (int nt = 0; nt < RT; ++nt)
#pragma unroll
        for (int q = 0; q < 8 / RPI; ++q) {
            const int j = 8 * nt + RPI * q + rs;
            xsrc[nt][q] = j < M ? x + (size_t)group_row(tab, 0, j) * K + 8 * c : nullptr;
        }
    // ONE: the bits row of this lane's copy (row n0 + lane).
    const uint32_t* bsrc = ONE && tab.words[0] != 0ull
                               ? reinterpret_cast<const uint32_t*>(tab.words[0]) +
                                     (size_t)min(n0 + lane, N - 1) * W
                               : nullptr;

    auto issue = [&](int st, int slot) {
        uint4* dst = ring + slot * slot_u4;
        if (st < NST) {
            const int c0 = SC * st;
            const bool in_k = c0 + 8 * c < K;
            const int bytes = in_k ? 16 : 0;
            const int off = in_k ? c0 : -8 * c;  // a valid address (column 0) when nothing is read
#pragma unroll
            for (int i = 0; i < T; ++i)
#pragma unroll
                for (int q = 0; q < 16 / RPI; ++q) {
                    const int r = RPI * q + rs;
                    ds_cp_async16(&dst[((i * KS + (c >> 2)) * 2 + (r >> 3)) * 32 + (r & 7) * 4 + (c & 3)],
                                  wsrc[i][q] + off, bytes);
                }
            // x: n-tile nt, instruction q: slot j = 8 nt + RPI q + rs, segment c.
#pragma unroll
            for (int nt = 0; nt < RT; ++nt)
#pragma unroll
                for (int q = 0; q < 8 / RPI; ++q) {
                    const int jj = RPI * q + rs;
                    const __nv_bfloat16* src = xsrc[nt][q];
                    ds_cp_async16(&dst[W_U4 + (nt * KS + (c >> 2)) * 32 + jj * 4 + (c & 3)],
                                  src != nullptr ? src + off : x, src != nullptr ? bytes : 0);
                }
            // bits: group gi, m-tile i, row r: words KS st .. KS st + KS - 1.
            if constexpr (ONE) {
                if (bsrc != nullptr) ds_cp_async_bits<KS>(&dst[W_U4 + X_U4 + lane], bsrc + KS * st);
            } else {
                for (int e = lane; e < ng * T * 16; e += 32) {
                    const int gi = e / (T * 16), rr = e % (T * 16);
                    const uint32_t* words = reinterpret_cast<const uint32_t*>(tab.words[gi]);
                    if (words != nullptr) {
                        const int n = min(n0 + rr, N - 1);
                        ds_cp_async_bits<KS>(&dst[W_U4 + X_U4 + e], words + (size_t)n * W + KS * st);
                    }
                }
            }
        }
        ds_cp_async_commit();
    };

    int my_grp[RT];
#pragma unroll
    for (int nt = 0; nt < RT; ++nt) {
        const int j = 8 * nt + g;
        my_grp[nt] = -1;
        if constexpr (!ONE)
            for (int gi = 0; gi < ng; ++gi)
                if (j < M && (int)tab.row_begin[gi] <= j && j < (int)tab.row_begin[gi + 1]) my_grp[nt] = gi;
    }
    float acc[T][RT][4];
#pragma unroll
    for (int i = 0; i < T; ++i)
#pragma unroll
        for (int nt = 0; nt < RT; ++nt)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[i][nt][q] = 0.f;

#pragma unroll
    for (int s = 0; s < S - 1; ++s) issue(warp + NW * s, s);
    int step = 0;
    for (int st = warp; st < NST; st += NW, ++step) {
        ds_cp_async_wait<S - 2>();
        __syncwarp();
        // The slot refilled here was read in the previous iteration, which every lane has left.
        issue(st + NW * (S - 1), (step + S - 1) % S);
        const uint4* cur = ring + (step % S) * slot_u4;
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
            uint4 wv[T][2], xv[RT];
#pragma unroll
            for (int i = 0; i < T; ++i)
#pragma unroll
                for (int h = 0; h < 2; ++h) wv[i][h] = cur[((i * KS + ks) * 2 + h) * 32 + lane];
#pragma unroll
            for (int nt = 0; nt < RT; ++nt) xv[nt] = cur[W_U4 + (nt * KS + ks) * 32 + lane];
            for (int gi = 0; gi < ng; ++gi) {
                const int rb = (int)tab.row_begin[gi], re = (int)tab.row_begin[gi + 1];
                const bool delta = tab.words[gi] != 0ull;
                const __nv_bfloat16 sb = __float2bfloat16(tab.scale[gi]);
                const uint32_t s2 = (uint32_t)__bfloat16_as_ushort(sb) * 0x10001u;
                uint32_t a[T][2][4];
#pragma unroll
                for (int i = 0; i < T; ++i) {
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const uint32_t w4[4] = {wv[i][h].x, wv[i][h].y, wv[i][h].z, wv[i][h].w};
                        if (delta) {
                            const uint32_t word = reinterpret_cast<const uint32_t*>(
                                &cur[W_U4 + X_U4 + (gi * T + i) * 16 + g + 8 * h])[ks];
                            const uint32_t b = __byte_perm(word, 0u, 0x4440u | (uint32_t)t);
                            const uint32_t u = b * 0x8001u;
                            a[i][h][0] = ds_fma_bf16x2(ds_sign_pair<15>(u), s2, w4[0]);
                            a[i][h][1] = ds_fma_bf16x2(ds_sign_pair<13>(u), s2, w4[1]);
                            a[i][h][2] = ds_fma_bf16x2(ds_sign_pair<11>(u), s2, w4[2]);
                            a[i][h][3] = ds_fma_bf16x2(ds_sign_pair<9>(u), s2, w4[3]);
                        } else {
#pragma unroll
                            for (int p = 0; p < 4; ++p) a[i][h][p] = w4[p];
                        }
                    }
                }
#pragma unroll
                for (int nt = 0; nt < RT; ++nt) {
                    uint4 b = xv[nt];
                    if constexpr (!ONE) {
                        if (rb >= 8 * nt + 8 || re <= 8 * nt) continue;
                        if (my_grp[nt] != gi) b = make_uint4(0, 0, 0, 0);
                    }
#pragma unroll
                    for (int i = 0; i < T; ++i) {
                        ds_mma_bf16(acc[i][nt], a[i][0][0], a[i][1][0], a[i][0][1], a[i][1][1], b.x, b.y);
                        ds_mma_bf16(acc[i][nt], a[i][0][2], a[i][1][2], a[i][0][3], a[i][1][3], b.z, b.w);
                    }
                }
            }
        }
    }
    ds_cp_async_wait<0>();
    __syncthreads();
    float* red = reinterpret_cast<float*>(ds_dyn_smem);
    constexpr int E = T * RT * 4;
#pragma unroll
    for (int i = 0; i < T; ++i)
#pragma unroll
        for (int nt = 0; nt < RT; ++nt)
#pragma unroll
            for (int q = 0; q < 4; ++q)
                red[((size_t)warp * E + (i * RT + nt) * 4 + q) * 32 + lane] = acc[i][nt][q];
    __syncthreads();
    for (int idx = threadIdx.x; idx < E * 32; idx += blockDim.x) {
        const int e = idx >> 5, ln = idx & 31;
        const int q = e & 3, nt = (e >> 2) % RT, i = (e >> 2) / RT;
        const int n = n0 + 16 * i + (ln >> 2) + ((q >> 1) << 3);
        const int j = 8 * nt + 2 * (ln & 3) + (q & 1);
        if (n < N && j < M) {
            float v = 0.f;
            for (int w = 0; w < NW; ++w) v += red[((size_t)w * E + e) * 32 + ln];
            y[(size_t)group_row(tab, 0, j) * N + n] = __float2bfloat16(v);
        }
    }
}

// _1s2 / _1s3: one group (what delta_linear sends), 64-column stages, ring depth 2 / 3 (src/cuda.rs
// picks one and sizes the shared memory for it); _g: up to 8 groups (delta_linear_fused, tests),
// 128-column stages, 2 slots. See "Ring depth" and "Sixth pass" above.
#define DS_FUSED_KERNEL(NAME, RT, ONE, KS, S, LB)                                               \
    extern "C" __global__ void __launch_bounds__(LB) NAME(                                      \
        const GroupTable tab, const __nv_bfloat16* __restrict__ x,                              \
        const __nv_bfloat16* __restrict__ wbase, __nv_bfloat16* __restrict__ y, int M, int N,   \
        int K, int W) {                                                                         \
        ds_fused_bf16_body<2, RT, S, ONE, KS>(tab, x, wbase, y, M, N, K, W);                   \
    }
#define DS_FUSED_KERNELS(RT)                                                                    \
    DS_FUSED_KERNEL(ds_fused_bf16_r##RT##_1s2, RT, true, 2, 2, 256)                             \
    DS_FUSED_KERNEL(ds_fused_bf16_r##RT##_1s3, RT, true, 2, 3, 256)                             \
    DS_FUSED_KERNEL(ds_fused_bf16_r##RT##_g, RT, false, 4, 2, 256)
DS_FUSED_KERNELS(1)
DS_FUSED_KERNELS(2)
DS_FUSED_KERNELS(3)
DS_FUSED_KERNELS(4)



// ---------------------------------------------------------------------------------------------
// CUDA-core paths: exact in the accumulator type, any input dtype.

template <typename T> __device__ __forceinline__ float ds_to_f32(T v);
template <> __device__ __forceinline__ float ds_to_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float ds_to_f32<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float ds_to_f32<__nv_bfloat16>(__nv_bfloat16 v) {
    return __bfloat162float(v);
}

template <typename T, typename Acc> __device__ __forceinline__ Acc ds_load_acc(T v) {
    return (Acc)ds_to_f32<T>(v);
}
template <> __device__ __forceinline__ double ds_load_acc<double, double>(double v) { return v; }

template <typename T, typename Acc> __device__ __forceinline__ T ds_store(Acc v);
template <> __device__ __forceinline__ float ds_store<float, float>(float v) { return v; }
template <> __device__ __forceinline__ __half ds_store<__half, float>(float v) {
    return __float2half(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 ds_store<__nv_bfloat16, float>(float v) {
    return __float2bfloat16(v);
}
template <> __device__ __forceinline__ double ds_store<double, double>(double v) { return v; }

// y[row] = scale * x[row] . S^T for each group: block = 64 output features x up to 32 rows,
// thread = 1 feature x 8 rows; one word (32 columns) of x and S per step through shared memory.
template <typename T, typename Acc>
__device__ __forceinline__ void ds_fwd_simple_body(const GroupTable& tab, const T* __restrict__ x,
                                                   T* __restrict__ y, int N, int K, int W) {
    const int grp = blockIdx.y;
    const unsigned int rb = tab.row_begin[grp];
    const int R = (int)(tab.row_begin[grp + 1] - rb);
    const uint32_t* words = reinterpret_cast<const uint32_t*>(tab.words[grp]);
    const int n0 = blockIdx.x * 64;
    const int tid = threadIdx.x, col = tid & 63, q = tid >> 6;
    const int n = n0 + col;

    if (words == nullptr) {
        for (int i = 0; i < 8; ++i) {
            const int j = 8 * q + i;
            if (j < R && n < N) y[(size_t)group_row(tab, rb, j) * N + n] = ds_store<T, Acc>((Acc)0);
        }
        return;
    }

    __shared__ Acc xs[DS_GROUP_ROWS][33];
    __shared__ uint32_t ws[64];
    __shared__ int rows[DS_GROUP_ROWS];
    if (tid < DS_GROUP_ROWS) rows[tid] = tid < R ? group_row(tab, rb, tid) : 0;
    Acc acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = (Acc)0;
    __syncthreads();
    for (int w = 0; w < W; ++w) {
        for (int idx = tid; idx < DS_GROUP_ROWS * 32; idx += blockDim.x) {
            const int j = idx >> 5, kk = idx & 31, k = 32 * w + kk;
            Acc v = (Acc)0;
            if (j < R && k < K) v = ds_load_acc<T, Acc>(x[(size_t)rows[j] * K + k]);
            xs[j][kk] = v;
        }
        if (tid < 64) ws[tid] = (n0 + tid < N) ? words[(size_t)(n0 + tid) * W + w] : 0u;
        __syncthreads();
        const uint32_t bits = ws[col];
#pragma unroll 8
        for (int bit = 0; bit < 32; ++bit) {
            const Acc s = ((bits >> bit) & 1u) ? (Acc)1 : (Acc)-1;
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[i] += s * xs[8 * q + i][bit];
        }
        __syncthreads();
    }
    const Acc scale = (Acc)tab.scale[grp];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int j = 8 * q + i;
        if (j < R && n < N) y[(size_t)rows[j] * N + n] = ds_store<T, Acc>(scale * acc[i]);
    }
}

// out (M, K) = g (M, N) . S: block = 64 columns (2 words) x 32 rows of g, thread = 1 column x 8
// rows; 32 output features of S per step through shared memory.
template <typename T, typename Acc>
__device__ __forceinline__ void ds_bwd_simple_body(const T* __restrict__ gin, T* __restrict__ out,
                                                   const uint32_t* __restrict__ words, int M,
                                                   int N, int K, int W) {
    const int k0 = blockIdx.x * 64, m0 = blockIdx.y * 32;
    const int tid = threadIdx.x, col = tid & 63, q = tid >> 6;
    const int k = k0 + col;
    const int wcol = (k0 >> 5) + (col >> 5);  // word of column k
    __shared__ Acc gs[32][33];
    __shared__ uint32_t ws[32][2];
    Acc acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = (Acc)0;
    for (int nb = 0; nb < N; nb += 32) {
        for (int idx = tid; idx < 32 * 32; idx += blockDim.x) {
            const int i = idx >> 5, nn = idx & 31;
            Acc v = (Acc)0;
            if (m0 + i < M && nb + nn < N) v = ds_load_acc<T, Acc>(gin[(size_t)(m0 + i) * N + nb + nn]);
            gs[i][nn] = v;
        }
        if (tid < 64) {
            const int nn = tid >> 1, half = tid & 1, wi = (k0 >> 5) + half;
            ws[nn][half] = (nb + nn < N && wi < W) ? words[(size_t)(nb + nn) * W + wi] : 0u;
        }
        __syncthreads();
        const int half = wcol - (k0 >> 5), bit = k & 31;
#pragma unroll 8
        for (int nn = 0; nn < 32; ++nn) {
            const Acc s = ((ws[nn][half] >> bit) & 1u) ? (Acc)1 : (Acc)-1;
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[i] += s * gs[8 * q + i][nn];
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int m = m0 + 8 * q + i;
        if (m < M && k < K) out[(size_t)m * K + k] = ds_store<T, Acc>(acc[i]);
    }
}

#define DS_SIMPLE_KERNELS(NAME, T, ACC)                                                          \
    extern "C" __global__ void __launch_bounds__(256) ds_fwd_simple_##NAME(                      \
        const GroupTable tab, const T* __restrict__ x, T* __restrict__ y, int N, int K, int W) { \
        ds_fwd_simple_body<T, ACC>(tab, x, y, N, K, W);                                          \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(256) ds_bwd_simple_##NAME(                      \
        const T* __restrict__ g, T* __restrict__ out, const uint32_t* __restrict__ words, int M, \
        int N, int K, int W) {                                                                   \
        ds_bwd_simple_body<T, ACC>(g, out, words, M, N, K, W);                                   \
    }

DS_SIMPLE_KERNELS(f32, float, float)
DS_SIMPLE_KERNELS(f16, __half, float)
DS_SIMPLE_KERNELS(bf16, __nv_bfloat16, float)
DS_SIMPLE_KERNELS(f64, double, double)
