// The binary decode product on warpgroup MMA (wgmma, sm_90a only), loaded by `src/cuda.rs` as its
// own PTX module on devices of compute capability 9.0 (H100, H200); `build.rs` compiles it for
// sm_90a, which no other GPU can load, so `sign_matmul.cu` stays portable.
//
// Kernels:
//   ds_wgb1_bf16_r4, _r8   y = scale * (x . S^T) (+ base) for groups of at most 4 / 8 rows of x
//                          sharing one delta (decode), after ds_prepb1wg_bf16 (sign_matmul.cu).
//
// The same arithmetic as ds_tcb1_bf16_* (sign_matmul.cu, "the binary path"): x as 16 bit planes of
// X = round(x 2^E), |X| < 2^15, exact int32 sums of popc(plane AND sign) over K < 2^16, and
// x . s = 2 rs sum_p w_p D_p - sum(x) in the store. What changes is the instruction:
// wgmma.m64n64k256.b1 multiplies 64 A rows (4 rows of x x 16 planes) by 64 features' sign rows,
// both read by the tensor cores straight from shared memory, for the whole warpgroup at once.
// ds_tcb1's mma.sync needed every warp to load all of the group's x fragments and its own sign
// words into registers (10 LDS.128 and 16 mma per warp and 512 columns at 4 rows); here a chunk
// costs 2 wgmma per block and no shared-memory loads. Measured on the H100 (BENCHMARKS.md,
// session 9): 4096x4096, 32 rows x 8 tenants, 12.7 -> 10.9 us, with no copies at all 8.5 -> 6.4.
//
// Shared memory. Each 512-column chunk is one 64-byte row per feature (signs, 64 rows) and per
// plane of each x row (4 or 8 rows x 16 planes), in the K-major 64-byte-swizzle layout of wgmma:
// row r's 16-byte unit u sits at byte 64 r + 16 (u ^ ((r >> 1) & 3)). The copies keep that
// swizzle: 4 threads copy the 4 units of one row, so a warp writes 512 contiguous bytes. The first
// version placed them in the unswizzled 8 x 16-byte core-matrix layout instead, a scatter of 128
// bytes 1 KB apart per warp: the same bytes, read from memory the same way, took 14.8 us with no
// mma at all, against 10.8 swizzled.
//
// Ring. S slots of one chunk each, filled by cp.async (with the L2 prefetch of 256-byte segments,
// measured faster on every shape and mix tried). The wgmma of a chunk read its slot
// asynchronously, so the slot of chunk c is refilled only two chunks later, once every warp has
// waited for those mma (wgmma.wait_group 1 at the end of chunk c + 1, then the block barrier at
// the top of chunk c + 2): S - 2 chunks are in flight.
//
// Layouts the prep kernel and the copies agree on (CH = Wp / 16 chunks per row):
//   sign rows: words (N, W) as stored; feature r's chunk c = words 16 c .. 16 c + 15 (the copy
//     index is clamped into the row; x is zero past K, so what it reads there adds nothing);
//   x: xb from ds_prepb1wg_bf16, per row and chunk 16 planes x 16 words, plane after plane.
// The k order inside a chunk is the natural one for both operands (each is a 64-byte row read
// the same way), so no permutation has to match.

#include "common.cuh"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// A shared-memory matrix descriptor for a K-major operand in the 64-byte swizzle layout: start
// address, leading byte offset (unused for swizzled K-major, 1), stride byte offset 512 (8 rows of
// 64 bytes), layout type 2 (64-byte swizzle) in bits 62-63.
__device__ __forceinline__ uint64_t ds_wg_desc_sw64(const void* smem) {
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(smem);
    return (uint64_t)((a & 0x3FFFF) >> 4) | (1ull << 16) | ((uint64_t)(512 >> 4) << 32) |
           (2ull << 62);
}

// d += A . B^T over 256 columns: A 64 rows, B 64 rows (features), AND + popc, s32.
__device__ __forceinline__ void ds_wgmma_b1_n64(int (&d)[32], uint64_t da, uint64_t db) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n64k256.s32.b1.b1.and.popc "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
        "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, %32, %33, 1;\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]),
          "+r"(d[7]), "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]),
          "+r"(d[13]), "+r"(d[14]), "+r"(d[15]), "+r"(d[16]), "+r"(d[17]), "+r"(d[18]),
          "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]), "+r"(d[24]),
          "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]),
          "+r"(d[31])
        : "l"(da), "l"(db));
}

// One warpgroup (4 warps) per block of 64 features of one group, MT m64 tiles (4 MT rows of x).
// Needs ceil(K/32) % 4 == 0 (16-byte aligned sign rows) and K < 2^16 (src/cuda.rs checks both).
template <int MT>
__device__ __forceinline__ void ds_wgb1_body(const GroupTable& tab, const uint4* __restrict__ xb,
                                             const double* __restrict__ xsum,
                                             const double* __restrict__ rscale,
                                             const __nv_bfloat16* __restrict__ base,
                                             __nv_bfloat16* __restrict__ y, int N, int W, int Wp) {
    constexpr int S = 6;
    constexpr int B_U4 = 64 * 4;             // sign rows per slot: 64 rows x 4 units
    constexpr int SLOT = B_U4 + MT * 64 * 4;  // then x: 4 MT rows x 16 planes x 4 units
    // 1 KB: every slot (a multiple of 512 bytes) starts a whole swizzle pattern.
    extern __shared__ __align__(1024) uint4 wring[];
    const int grp = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const unsigned int rb = tab.row_begin[grp];
    const int Rg = (int)(tab.row_begin[grp + 1] - rb);
    const uint32_t* words = reinterpret_cast<const uint32_t*>(tab.words[grp]);
    const int nb = blockIdx.x * 64;
    if (words == nullptr) {  // base-only rows: zeros (or the base)
        ds_store_base_only(tab, rb, Rg, nb, 64, N, base, y);
        return;
    }
    const int CH = Wp / 16;
    // Thread e (of 128 u + threadIdx.x) copies unit q = e % 4 of row e / 4: of the block's sign
    // rows, then of the x planes (row m = 16 j + p of A: x row j of the group, plane p). Sources
    // are fixed but for the chunk; x rows past the group's are zero-filled (source size 0).
    const uint32_t* asrc[2];
    int adst[2];
#pragma unroll
    for (int u = 0; u < 2; ++u) {
        const int e = threadIdx.x + 128 * u, r = e >> 2, q = e & 3;
        asrc[u] = words + (size_t)min(nb + r, N - 1) * W + 4 * q;
        adst[u] = r * 4 + (q ^ ((r >> 1) & 3));
    }
    const uint4* bsrc[2 * MT];
    int bdst[2 * MT], bbytes[2 * MT];
#pragma unroll
    for (int u = 0; u < 2 * MT; ++u) {
        const int e = threadIdx.x + 128 * u, m = e >> 2, q = e & 3, j = m >> 4;
        bbytes[u] = j < Rg ? 16 : 0;
        bsrc[u] = xb + (j < Rg ? (size_t)group_row(tab, rb, j) * CH * 64 + (e & 63) : 0);
        bdst[u] = B_U4 + m * 4 + (q ^ ((m >> 1) & 3));
    }
    // asrc holds word 4 q of the row; word 16 c + 4 q is clamped to the row's last 16 bytes
    // (an int bound: q from the unsigned threadIdx would make a negative bound a huge one).
    const int alast = W - 4 - 4 * (int)(threadIdx.x & 3);
    auto issue_a = [&](int c) {
        uint4* slot = wring + (c % S) * SLOT;
#pragma unroll
        for (int u = 0; u < 2; ++u)
            ds_cp_async16<true>(slot + adst[u], asrc[u] + min(16 * c, alast), 16);
    };
    auto issue_b = [&](int c) {
        uint4* slot = wring + (c % S) * SLOT;
#pragma unroll
        for (int u = 0; u < 2 * MT; ++u) ds_cp_async16(slot + bdst[u], bsrc[u] + 64 * c, bbytes[u]);
    };
    ds_ring_prologue<S - 2>(CH, issue_a, issue_b);  // then xb, xsum, rscale of ds_prepb1wg_bf16

    int d[MT][32];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < 32; ++i) d[mt][i] = 0;
    for (int c = 0; c < CH; ++c) {
        ds_cp_async_wait<S - 3>();
        // cp.async wrote through the generic proxy; wgmma reads through the async proxy.
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();  // chunk c is in; every warp's mma of chunk c - 2 are done
        if (c + S - 2 < CH) {
            issue_a(c + S - 2);
            issue_b(c + S - 2);
        }
        ds_cp_async_commit();
        const uint4* slot = wring + (c % S) * SLOT;
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            // columns 256 h .. 256 h + 255 of the chunk: 32 bytes into every row
            const uint64_t db = ds_wg_desc_sw64(slot) + 2 * h;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
                ds_wgmma_b1_n64(d[mt], ds_wg_desc_sw64(slot + B_U4 + mt * 256) + 2 * h, db);
        }
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
    }
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    ds_cp_async_wait<0>();

    // Warp w holds D rows 16 w + g (plane g) and 16 w + g + 8 (plane g + 8) of tile mt, i.e. of x
    // row 4 mt + w; d[mt][4 nt + e] and d[mt][4 nt + 2 + e] are feature nb + 8 nt + 2 t + e.
    // The weighted plane sums are exact in int32 (as in ds_tcb1_body) and reduce-scatter over
    // the 8 threads g: thread g ends with tile nt = g, e = 0 and 1.
    const float scale = tab.scale[grp];
    const int wlo = ds_plane_weight(g), whi = ds_plane_weight(g + 8);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        int v[16];
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e)
                v[nt * 2 + e] = wlo * d[mt][4 * nt + e] + whi * d[mt][4 * nt + 2 + e];
        ds_reduce_scatter8<16>(v, g);
        const int j = 4 * mt + warp;
        if (j >= Rg) continue;
        const DsB1Row out = ds_b1_row(xsum, rscale, group_row(tab, rb, j), Wp, N);
#pragma unroll
        for (int e = 0; e < 2; ++e) ds_b1_store(out, nb + 8 * g + 2 * t + e, N, v[e], scale, base, y);
    }
}

#define DS_WGB1_KERNEL(MT, R)                                                                    \
    extern "C" __global__ void __launch_bounds__(128) ds_wgb1_bf16_r##R(                         \
            const GroupTable tab, const uint4* __restrict__ xb,                                 \
            const double* __restrict__ xsum, const double* __restrict__ rscale,                 \
            const __nv_bfloat16* __restrict__ base, __nv_bfloat16* __restrict__ y, int N, int W, \
            int Wp) {                                                                           \
        ds_wgb1_body<MT>(tab, xb, xsum, rscale, base, y, N, W, Wp);                             \
    }
DS_WGB1_KERNEL(1, 4)
DS_WGB1_KERNEL(2, 8)

#endif
