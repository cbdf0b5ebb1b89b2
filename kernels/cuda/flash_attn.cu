// Fused causal attention (FlashAttention-2 scheme) on tensor cores, bf16/f16
// in, f32 accumulate. q [B, Hq, T, D], k/v [B, Hkv, T, D] head-major; query
// head h reads kv head h / (Hq / Hkv). Key j is visible to the query at
// position i when j <= i and, with segment ids seg [B, T], seg[j] == seg[i].
// Scores are never materialized: the forward keeps a running max and sum per
// query row and writes o and lse = log-sum-exp of the scaled visible scores;
// the backward recomputes P from lse.
//
// Head dims 16 and 32 (the FA2 kernels further down serve 64 and 128).
// Work split: 4 warps per block; the forward gives each warp 16 query rows of
// a 64-row tile and walks 64-key tiles; the backward gives each warp 16 keys
// of a 64-key tile and walks every query tile (of every query head sharing the
// kv head) that can see them, so dk/dv need no atomics; dq is accumulated in
// f32 with atomics and scaled/cast by a last small kernel.
#define FA_WARPS 4
#define FA_THREADS (FA_WARPS * 32)
#define FA_BM 64
#define FA_BN 64
#define FA_LOG2E 1.4426950408889634f
#define FA_LN2 0.6931471805599453f

__device__ __forceinline__ u32_t fa_smem(const void* p) {
    u32_t r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}
#if LLMFT_PATH_ARCH >= 750
__device__ __forceinline__ void fa_ldsm(u32_t* r, u32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void fa_ldsm_t(u32_t* r, u32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
#else
// ldmatrix from shared loads (before sm_75). Lanes 8i..8i+7 give the row
// addresses of 8x8 matrix i; lane l receives row l/4, columns 2(l%4) and
// 2(l%4)+1 of each matrix (transposed: rows 2(l%4), 2(l%4)+1 of column l/4).
__device__ __forceinline__ u32_t fa_lds32(u32_t addr) {
    u32_t v;
    asm volatile("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(addr));
    return v;
}
__device__ __forceinline__ u32_t fa_lds16(u32_t addr) {
    unsigned short v;
    asm volatile("ld.shared.b16 %0, [%1];" : "=h"(v) : "r"(addr));
    return v;
}
// Out of line, as the shuffle MMA below: the kernels unroll many of them.
struct FaU4 { u32_t x, y, z, w; };
__device__ __noinline__ FaU4 fa_ldsm_emul(u32_t addr) {
    const int lane = threadIdx.x & 31;
    u32_t r[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        u32_t row = __shfl_sync(0xffffffffu, addr, i * 8 + (lane >> 2));
        r[i] = fa_lds32(row + (lane & 3) * 4);
    }
    return FaU4{r[0], r[1], r[2], r[3]};
}
__device__ __noinline__ FaU4 fa_ldsm_t_emul(u32_t addr) {
    const int lane = threadIdx.x & 31;
    u32_t r[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        u32_t r0 = __shfl_sync(0xffffffffu, addr, i * 8 + 2 * (lane & 3));
        u32_t r1 = __shfl_sync(0xffffffffu, addr, i * 8 + 2 * (lane & 3) + 1);
        u32_t col = (lane >> 2) * 2;
        r[i] = fa_lds16(r0 + col) | (fa_lds16(r1 + col) << 16);
    }
    return FaU4{r[0], r[1], r[2], r[3]};
}
__device__ __forceinline__ void fa_ldsm(u32_t* r, u32_t addr) {
    FaU4 v = fa_ldsm_emul(addr);
    r[0] = v.x;
    r[1] = v.y;
    r[2] = v.z;
    r[3] = v.w;
}
__device__ __forceinline__ void fa_ldsm_t(u32_t* r, u32_t addr) {
    FaU4 v = fa_ldsm_t_emul(addr);
    r[0] = v.x;
    r[1] = v.y;
    r[2] = v.z;
    r[3] = v.w;
}
#endif

// The m16n8k16 MMA (row.col, f32 accumulate) from warp shuffles, for
// architectures without the instruction for the element type (bf16 before
// sm_80, f16 before sm_75). Lane l = 4g + t holds the fragments mma.sync
// defines: A rows g and g+8, B columns g, C rows g and g+8 at columns 2t and
// 2t+1. For each k pair group kt the lane fetches A's rows from lane 4g+kt
// and B's columns 2t and 2t+1 from lanes 8t+kt and 8t+4+kt.
// Not inlined: the kernels unroll hundreds of MMAs, and one out-of-line body
// keeps NVRTC's time (and the code size) of these paths bounded.
template <bool BF>
__device__ __forceinline__ float fa_half(u32_t r, int hi) {
    unsigned short h = (unsigned short)(hi ? r >> 16 : r & 0xffffu);
    return BF ? bf16_to_f32(h) : f16_to_f32(h);
}
template <bool BF>
__device__ __forceinline__ float fa_dot2(u32_t a, u32_t b, float acc) {
    return fmaf(fa_half<BF>(a, 1), fa_half<BF>(b, 1), fmaf(fa_half<BF>(a, 0), fa_half<BF>(b, 0), acc));
}
struct FaAcc4 { float x, y, z, w; };
template <bool BF>
__device__ __noinline__ FaAcc4 fa_mma_shfl_f4(FaAcc4 c, u32_t a0, u32_t a1, u32_t a2, u32_t a3, u32_t b0,
                                              u32_t b1) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int kt = 0; kt < 4; ++kt) {
        const u32_t ag0 = __shfl_sync(0xffffffffu, a0, 4 * g + kt);  // A[g][2kt..]
        const u32_t ag8 = __shfl_sync(0xffffffffu, a1, 4 * g + kt);  // A[g+8][2kt..]
        const u32_t bg0 = __shfl_sync(0xffffffffu, a2, 4 * g + kt);  // A[g][2kt+8..]
        const u32_t bg8 = __shfl_sync(0xffffffffu, a3, 4 * g + kt);  // A[g+8][2kt+8..]
        const u32_t p0 = __shfl_sync(0xffffffffu, b0, 8 * t + kt);      // B[2kt..][2t]
        const u32_t p1 = __shfl_sync(0xffffffffu, b1, 8 * t + kt);      // B[2kt+8..][2t]
        const u32_t q0 = __shfl_sync(0xffffffffu, b0, 8 * t + 4 + kt);  // B[2kt..][2t+1]
        const u32_t q1 = __shfl_sync(0xffffffffu, b1, 8 * t + 4 + kt);  // B[2kt+8..][2t+1]
        c.x = fa_dot2<BF>(bg0, p1, fa_dot2<BF>(ag0, p0, c.x));
        c.y = fa_dot2<BF>(bg0, q1, fa_dot2<BF>(ag0, q0, c.y));
        c.z = fa_dot2<BF>(bg8, p1, fa_dot2<BF>(ag8, p0, c.z));
        c.w = fa_dot2<BF>(bg8, q1, fa_dot2<BF>(ag8, q0, c.w));
    }
    return c;
}
template <bool BF>
__device__ __forceinline__ void fa_mma_shfl(float* c, const u32_t* a, u32_t b0, u32_t b1) {
    FaAcc4 r = fa_mma_shfl_f4<BF>(FaAcc4{c[0], c[1], c[2], c[3]}, a[0], a[1], a[2], a[3], b0, b1);
    c[0] = r.x;
    c[1] = r.y;
    c[2] = r.z;
    c[3] = r.w;
}

// m16n8k16 from two m16n8k8 (f16 on sm_75, which lacks the k16 shape).
__device__ __forceinline__ void fa_mma_f16_k8x2(float* c, const u32_t* a, u32_t b0, u32_t b1) {
#if LLMFT_PATH_ARCH >= 750
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(b0));
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[2]), "r"(a[3]), "r"(b1));
#else
    fa_mma_shfl<false>(c, a, b0, b1);
#endif
}

#if LLMFT_PATH_ARCH >= 800
#define FA_MMA_BODY(ty, bf)                                                                   \
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." ty "." ty ".f32 {%0,%1,%2,%3}, "   \
                 "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"                                   \
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                           \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#define FA_PACK_BODY(ty, from_f32)                                                            \
    u32_t r;                                                                                  \
    asm("cvt.rn." ty "x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));                    \
    return r;
#else
#define FA_MMA_BODY(ty, bf)                                                                   \
    if (bf) fa_mma_shfl<true>(c, a, b0, b1); else fa_mma_f16_k8x2(c, a, b0, b1);
#define FA_PACK_BODY(ty, from_f32) return (u32_t)from_f32(lo) | ((u32_t)from_f32(hi) << 16);
#endif

// Per element type: the m16n8k16 MMA and packing two f32 into one register
// (lower column in the low half). `ty` is the PTX type name.
#define FA_ELEM(Name, ty, bf, to_f32, from_f32)                                                   \
    struct Name {                                                                                 \
        static __device__ __forceinline__ void mma(float* c, const u32_t* a, u32_t b0, u32_t b1) { \
            FA_MMA_BODY(ty, bf)                                                                   \
        }                                                                                         \
        static __device__ __forceinline__ u32_t pack(float lo, float hi) {                        \
            FA_PACK_BODY(ty, from_f32)                                                            \
        }                                                                                         \
        static __device__ __forceinline__ float load(const unsigned short* p, long long i) {      \
            return to_f32(p[i]);                                                                  \
        }                                                                                         \
        static __device__ __forceinline__ unsigned short store(float v) { return from_f32(v); }   \
    };
FA_ELEM(FaBF16, "bf16", true, bf16_to_f32, f32_to_bf16)
FA_ELEM(FaF16, "f16", false, f16_to_f32, f32_to_f16)

// Rows [r0, r0 + R) of a [T, D] matrix into shared memory with row stride
// D + 8 (16-byte rows, no ldmatrix bank conflicts); rows past T are zeros.
template <int R, int D>
__device__ __forceinline__ void fa_load_tile(unsigned short* s, const unsigned short* g, int r0,
                                             int T) {
    const int VPR = D / 8;
    for (int i = threadIdx.x; i < R * VPR; i += FA_THREADS) {
        int r = i / VPR, c = (i % VPR) * 8;
        Vec16 v;
        v.w[0] = v.w[1] = v.w[2] = v.w[3] = 0u;
        if (r0 + r < T) v = *reinterpret_cast<const Vec16*>(g + (long long)(r0 + r) * D + c);
        *reinterpret_cast<Vec16*>(s + r * (D + 8) + c) = v;
    }
}

// Sum over the 4 threads of a quad (the threads sharing a fragment row).
__device__ __forceinline__ float fa_quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
__device__ __forceinline__ float fa_quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

// Forward: grid (ceil(T / 64) query tiles, B * Hq).
template <typename E, int D>
__device__ void fa_fwd_body(const unsigned short* q, const unsigned short* k,
                            const unsigned short* v, const int* seg, unsigned short* o,
                            float* lse, int Hq, int Hkv, int T, float scale) {
    const int SD = D + 8;
    __shared__ __align__(16) unsigned short sK[FA_BN * SD];
    __shared__ __align__(16) unsigned short sV[FA_BN * SD];
    __shared__ int sSeg[FA_BN];
    // The longest rows (most key tiles) start first.
    const int mt = gridDim.x - 1 - blockIdx.x;
    const int bh = blockIdx.y, b = bh / Hq, h = bh % Hq;
    const int hk = h / (Hq / Hkv);
    const unsigned short* qb = q + (long long)bh * T * D;
    const unsigned short* kb = k + ((long long)b * Hkv + hk) * T * D;
    const unsigned short* vb = v + ((long long)b * Hkv + hk) * T * D;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, tq = lane & 3;
    const int q0 = mt * FA_BM;

    // This warp's 16 query rows as MMA A fragments (staged through sK).
    fa_load_tile<FA_BM, D>(sK, qb, q0, T);
    __syncthreads();
    u32_t qf[D / 16][4];
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks)
        fa_ldsm(qf[ks], fa_smem(sK + (warp * 16 + (lane & 15)) * SD + ks * 16 + (lane >> 4) * 8));
    __syncthreads();

    const int r0 = q0 + warp * 16 + g, r1 = r0 + 8;
    const int* sg = seg ? seg + (long long)b * T : 0;
    const int sg0 = (sg && r0 < T) ? sg[r0] : -1;
    const int sg1 = (sg && r1 < T) ? sg[r1] : -1;
    const float sl2 = scale * FA_LOG2E;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;
    float acc[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;

    const int q_last = min(q0 + FA_BM, T) - 1;
    const int nkt = q_last / FA_BN + 1;
    for (int kt = 0; kt < nkt; ++kt) {
        const int k0 = kt * FA_BN;
        fa_load_tile<FA_BN, D>(sK, kb, k0, T);
        fa_load_tile<FA_BN, D>(sV, vb, k0, T);
        if (threadIdx.x < FA_BN) {
            int j = k0 + threadIdx.x;
            sSeg[threadIdx.x] = (sg && j < T) ? sg[j] : -2;
        }
        __syncthreads();
        float s[FA_BN / 8][4];
#pragma unroll
        for (int i = 0; i < FA_BN / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) {
#pragma unroll
            for (int np = 0; np < FA_BN / 16; ++np) {
                u32_t bk[4];
                fa_ldsm(bk, fa_smem(sK + (np * 16 + (lane & 7) + (lane >> 4) * 8) * SD + ks * 16 +
                                    ((lane >> 3) & 1) * 8));
                E::mma(s[2 * np], qf[ks], bk[0], bk[1]);
                E::mma(s[2 * np + 1], qf[ks], bk[2], bk[3]);
            }
        }
        // Mask, scale into the log2 domain, new running maxima.
        float mx0 = m0, mx1 = m1;
#pragma unroll
        for (int nt = 0; nt < FA_BN / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                int jl = nt * 8 + tq * 2 + (e & 1);
                int j = k0 + jl;
                int row = e < 2 ? r0 : r1;
                bool vis = j <= row && (!sg || sSeg[jl] == (e < 2 ? sg0 : sg1));
                float x = vis ? s[nt][e] * sl2 : NEG_INF;
                s[nt][e] = x;
                if (e < 2) mx0 = fmaxf(mx0, x);
                else mx1 = fmaxf(mx1, x);
            }
        }
        mx0 = fa_quad_max(mx0);
        mx1 = fa_quad_max(mx1);
        // A row with nothing visible yet keeps max -inf: shift by 0 (exp2 gives 0).
        const float base0 = mx0 == NEG_INF ? 0.f : mx0;
        const float base1 = mx1 == NEG_INF ? 0.f : mx1;
        const float al0 = exp2f(m0 - base0), al1 = exp2f(m1 - base1);
        m0 = mx0;
        m1 = mx1;
        float ps0 = 0.f, ps1 = 0.f;
#pragma unroll
        for (int nt = 0; nt < FA_BN / 8; ++nt) {
            s[nt][0] = exp2f(s[nt][0] - base0);
            s[nt][1] = exp2f(s[nt][1] - base0);
            s[nt][2] = exp2f(s[nt][2] - base1);
            s[nt][3] = exp2f(s[nt][3] - base1);
            ps0 += s[nt][0] + s[nt][1];
            ps1 += s[nt][2] + s[nt][3];
        }
        // Per-thread partial sums; the quad is summed once at the end.
        l0 = l0 * al0 + ps0;
        l1 = l1 * al1 + ps1;
#pragma unroll
        for (int i = 0; i < D / 8; ++i) {
            acc[i][0] *= al0;
            acc[i][1] *= al0;
            acc[i][2] *= al1;
            acc[i][3] *= al1;
        }
        // o += P·V, P straight from the score fragments.
#pragma unroll
        for (int kk = 0; kk < FA_BN / 16; ++kk) {
            u32_t pa[4] = {E::pack(s[2 * kk][0], s[2 * kk][1]), E::pack(s[2 * kk][2], s[2 * kk][3]),
                           E::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                           E::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int dp = 0; dp < D / 16; ++dp) {
                u32_t bv[4];
                fa_ldsm_t(bv, fa_smem(sV + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * SD +
                                      dp * 16 + (lane >> 4) * 8));
                E::mma(acc[2 * dp], pa, bv[0], bv[1]);
                E::mma(acc[2 * dp + 1], pa, bv[2], bv[3]);
            }
        }
        __syncthreads();
    }
    l0 = fa_quad_sum(l0);
    l1 = fa_quad_sum(l1);
    const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
    unsigned short* ob = o + (long long)bh * T * D;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
        int c = i * 8 + tq * 2;
        if (r0 < T)
            *reinterpret_cast<u32_t*>(ob + (long long)r0 * D + c) =
                E::pack(acc[i][0] * inv0, acc[i][1] * inv0);
        if (r1 < T)
            *reinterpret_cast<u32_t*>(ob + (long long)r1 * D + c) =
                E::pack(acc[i][2] * inv1, acc[i][3] * inv1);
    }
    if (tq == 0) {
        if (r0 < T) lse[(long long)bh * T + r0] = (m0 + log2f(l0)) * FA_LN2;
        if (r1 < T) lse[(long long)bh * T + r1] = (m1 + log2f(l1)) * FA_LN2;
    }
}

// Backward pre-pass: dsum[row] = Σ_d dO·O (one warp per row); also zeroes
// the f32 dq accumulator rows.
// Rows are in memory order; with tok (token-major [B, T, H, D]) memory row
// (b·T + t)·H + h is written to dsum[(b·H + h)·T + t].
template <typename E, int D>
__device__ void fa_bwd_pre_body(const unsigned short* o, const unsigned short* d_o, float* dsum,
                                float* dq_acc, long long rows, int T, int H, int tok) {
    long long row = (long long)blockIdx.x * FA_WARPS + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    float s = 0.f;
    for (int c = lane; c < D; c += 32) {
        s += E::load(o, row * D + c) * E::load(d_o, row * D + c);
        dq_acc[row * D + c] = 0.f;
    }
    s = warp_sum(s);
    long long at = row;
    if (tok) {
        long long bt = row / H, h = row % H;
        at = (bt / T * H + h) * T + bt % T;
    }
    if (lane == 0) dsum[at] = s;
}

// Backward main pass: grid (ceil(T / 64) key tiles, B * Hkv). BQ query rows
// per step (64 for D <= 64; 32 for D = 128 to stay in 48 KB of shared memory).
template <typename E, int D, int BQ>
__device__ void fa_bwd_body(const unsigned short* q, const unsigned short* k,
                            const unsigned short* v, const unsigned short* d_o, const float* lse,
                            const float* dsum, const int* seg, float* dq_acc, unsigned short* dk,
                            unsigned short* dv, int Hq, int Hkv, int T, float scale) {
    const int SD = D + 8, SS = BQ + 8;
    __shared__ __align__(16) unsigned short sK[FA_BN * SD];
    __shared__ __align__(16) unsigned short sQ[BQ * SD];
    __shared__ __align__(16) unsigned short sO[BQ * SD];
    __shared__ __align__(16) unsigned short sS[FA_BN * SS];
    __shared__ float sL[BQ], sDs[BQ];
    __shared__ int sSq[BQ];
    const int kt = blockIdx.x, bk = blockIdx.y, b = bk / Hkv, hk = bk % Hkv;
    const int rep = Hq / Hkv;
    const int k0 = kt * FA_BN;
    const unsigned short* kb = k + (long long)bk * T * D;
    const unsigned short* vb = v + (long long)bk * T * D;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, tq = lane & 3;

    // This warp's 16 rows of V as A fragments (staged through sK), then K.
    fa_load_tile<FA_BN, D>(sK, vb, k0, T);
    __syncthreads();
    u32_t vf[D / 16][4];
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks)
        fa_ldsm(vf[ks], fa_smem(sK + (warp * 16 + (lane & 15)) * SD + ks * 16 + (lane >> 4) * 8));
    __syncthreads();
    fa_load_tile<FA_BN, D>(sK, kb, k0, T);

    const int j0 = k0 + warp * 16 + g, j1 = j0 + 8;
    const int* sg = seg ? seg + (long long)b * T : 0;
    const int sk0 = (sg && j0 < T) ? sg[j0] : -2;
    const int sk1 = (sg && j1 < T) ? sg[j1] : -2;
    const float sl2 = scale * FA_LOG2E;
    float dka[D / 8][4], dva[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) dka[i][e] = dva[i][e] = 0.f;

    // dq's split of the BQ x D tile over the warps.
    const int MT = BQ / 16, WPM = FA_WARPS / MT, NTW = (D / 8) / WPM;
    const int mtile = warp % MT, part = warp / MT;

    for (int hr = 0; hr < rep; ++hr) {
        const long long bhq = (long long)b * Hq + hk * rep + hr;
        const unsigned short* qb = q + bhq * T * D;
        const unsigned short* ob = d_o + bhq * T * D;
        for (int q0 = (k0 / BQ) * BQ; q0 < T; q0 += BQ) {
            __syncthreads();
            fa_load_tile<BQ, D>(sQ, qb, q0, T);
            fa_load_tile<BQ, D>(sO, ob, q0, T);
            if (threadIdx.x < BQ) {
                int i = q0 + threadIdx.x;
                bool in = i < T;
                sL[threadIdx.x] = in ? lse[bhq * T + i] * FA_LOG2E : POS_INF;
                sDs[threadIdx.x] = in ? dsum[bhq * T + i] : 0.f;
                sSq[threadIdx.x] = in ? (sg ? sg[i] : 0) : -3;
            }
            __syncthreads();
            // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ for this warp's 16 keys x BQ queries.
            float st[BQ / 8][4], dpt[BQ / 8][4];
#pragma unroll
            for (int i = 0; i < BQ / 8; ++i)
#pragma unroll
                for (int e = 0; e < 4; ++e) st[i][e] = dpt[i][e] = 0.f;
#pragma unroll
            for (int ks = 0; ks < D / 16; ++ks) {
                u32_t ka[4];
                fa_ldsm(ka, fa_smem(sK + (warp * 16 + (lane & 15)) * SD + ks * 16 + (lane >> 4) * 8));
#pragma unroll
                for (int np = 0; np < BQ / 16; ++np) {
                    int off = (np * 16 + (lane & 7) + (lane >> 4) * 8) * SD + ks * 16 +
                              ((lane >> 3) & 1) * 8;
                    u32_t bq[4], bo[4];
                    fa_ldsm(bq, fa_smem(sQ + off));
                    fa_ldsm(bo, fa_smem(sO + off));
                    E::mma(st[2 * np], ka, bq[0], bq[1]);
                    E::mma(st[2 * np + 1], ka, bq[2], bq[3]);
                    E::mma(dpt[2 * np], vf[ks], bo[0], bo[1]);
                    E::mma(dpt[2 * np + 1], vf[ks], bo[2], bo[3]);
                }
            }
            // Pᵀ from lse; dSᵀ = Pᵀ ∘ (dPᵀ − dsum).
#pragma unroll
            for (int nt = 0; nt < BQ / 8; ++nt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    int qi = nt * 8 + tq * 2 + (e & 1);
                    int i = q0 + qi;
                    int j = e < 2 ? j0 : j1;
                    bool vis = j <= i && i < T && (!sg || sSq[qi] == (e < 2 ? sk0 : sk1));
                    float p = vis ? exp2f(st[nt][e] * sl2 - sL[qi]) : 0.f;
                    st[nt][e] = p;
                    dpt[nt][e] = p * (dpt[nt][e] - sDs[qi]);
                }
            }
            // dV += Pᵀ·dO and dK += dSᵀ·Q (the query axis is the reduction).
#pragma unroll
            for (int kk = 0; kk < BQ / 16; ++kk) {
                u32_t pa[4] = {E::pack(st[2 * kk][0], st[2 * kk][1]),
                               E::pack(st[2 * kk][2], st[2 * kk][3]),
                               E::pack(st[2 * kk + 1][0], st[2 * kk + 1][1]),
                               E::pack(st[2 * kk + 1][2], st[2 * kk + 1][3])};
                u32_t da[4] = {E::pack(dpt[2 * kk][0], dpt[2 * kk][1]),
                               E::pack(dpt[2 * kk][2], dpt[2 * kk][3]),
                               E::pack(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]),
                               E::pack(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3])};
#pragma unroll
                for (int dp = 0; dp < D / 16; ++dp) {
                    int off = (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * SD + dp * 16 +
                              (lane >> 4) * 8;
                    u32_t bo[4], bq[4];
                    fa_ldsm_t(bo, fa_smem(sO + off));
                    fa_ldsm_t(bq, fa_smem(sQ + off));
                    E::mma(dva[2 * dp], pa, bo[0], bo[1]);
                    E::mma(dva[2 * dp + 1], pa, bo[2], bo[3]);
                    E::mma(dka[2 * dp], da, bq[0], bq[1]);
                    E::mma(dka[2 * dp + 1], da, bq[2], bq[3]);
                }
            }
            // dSᵀ to shared memory for dQ += dS·K.
#pragma unroll
            for (int nt = 0; nt < BQ / 8; ++nt) {
                int c = nt * 8 + tq * 2;
                *reinterpret_cast<u32_t*>(sS + (warp * 16 + g) * SS + c) =
                    E::pack(dpt[nt][0], dpt[nt][1]);
                *reinterpret_cast<u32_t*>(sS + (warp * 16 + g + 8) * SS + c) =
                    E::pack(dpt[nt][2], dpt[nt][3]);
            }
            __syncthreads();
            float dqa[NTW][4];
#pragma unroll
            for (int i = 0; i < NTW; ++i) dqa[i][0] = dqa[i][1] = dqa[i][2] = dqa[i][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < FA_BN / 16; ++kk) {
                u32_t a[4];
                fa_ldsm_t(a, fa_smem(sS + (kk * 16 + (lane & 7) + (lane >> 4) * 8) * SS +
                                     mtile * 16 + ((lane >> 3) & 1) * 8));
#pragma unroll
                for (int np = 0; np < NTW / 2; ++np) {
                    int dpi = part * (NTW / 2) + np;
                    u32_t bkf[4];
                    fa_ldsm_t(bkf, fa_smem(sK + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * SD +
                                           dpi * 16 + (lane >> 4) * 8));
                    E::mma(dqa[2 * np], a, bkf[0], bkf[1]);
                    E::mma(dqa[2 * np + 1], a, bkf[2], bkf[3]);
                }
            }
            const int qa = q0 + mtile * 16 + g, qb2 = qa + 8;
            float* dqb = dq_acc + bhq * T * D;
#pragma unroll
            for (int nt = 0; nt < NTW; ++nt) {
                int c = (part * NTW + nt) * 8 + tq * 2;
                if (qa < T) {
                    atomicAdd(dqb + (long long)qa * D + c, dqa[nt][0]);
                    atomicAdd(dqb + (long long)qa * D + c + 1, dqa[nt][1]);
                }
                if (qb2 < T) {
                    atomicAdd(dqb + (long long)qb2 * D + c, dqa[nt][2]);
                    atomicAdd(dqb + (long long)qb2 * D + c + 1, dqa[nt][3]);
                }
            }
        }
    }
    unsigned short* dkb = dk + (long long)bk * T * D;
    unsigned short* dvb = dv + (long long)bk * T * D;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
        int c = i * 8 + tq * 2;
        if (j0 < T) {
            *reinterpret_cast<u32_t*>(dkb + (long long)j0 * D + c) =
                E::pack(dka[i][0] * scale, dka[i][1] * scale);
            *reinterpret_cast<u32_t*>(dvb + (long long)j0 * D + c) = E::pack(dva[i][0], dva[i][1]);
        }
        if (j1 < T) {
            *reinterpret_cast<u32_t*>(dkb + (long long)j1 * D + c) =
                E::pack(dka[i][2] * scale, dka[i][3] * scale);
            *reinterpret_cast<u32_t*>(dvb + (long long)j1 * D + c) = E::pack(dva[i][2], dva[i][3]);
        }
    }
}

// dq = scale · dq_acc, cast to the element type.
template <typename E>
__device__ void fa_bwd_dq_body(const float* dq_acc, unsigned short* dq, long long n, float scale) {
    GRID_STRIDE(i, 0, n) dq[i] = E::store(dq_acc[i] * scale);
}

// ---------------------------------------------------------------------------
// FlashAttention-2 kernels for head dims 64 and 128: larger tiles, tiles moved
// with cp.async while the previous one is multiplied, masking only on the
// tiles that straddle the diagonal (or with segments), dynamic shared memory.
//
// Forward: 128 query rows per block, 4 warps of 32 rows (two 16-row MMA
// tiles, so every K/V fragment read from shared memory feeds two MMAs);
// 64- or 32-key tiles; Q stays in shared memory. The V tile loads while S = Q·Kᵀ is
// computed, the next K tile while O += P·V is.
// Backward: BN keys per block, a warp per 16 keys (dK, dV in registers);
// BM-query tiles double-buffered (the next Q/dO tile loads during this one);
// dQ accumulated in f32 with vector reductions.
#define F2_M 128
#define F2_THREADS 128

#if LLMFT_PATH_ARCH >= 800
__device__ __forceinline__ void fa_cp16(u32_t dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void fa_cp_commit() { asm volatile("cp.async.commit_group;"); }
__device__ __forceinline__ void fa_cp_wait_all() {
    asm volatile("cp.async.wait_group 0;" ::: "memory");
}
#else
// Before sm_80: a plain load through registers, the bytes past `bytes` zero
// (as cp.async's src-size does); commit and wait only order memory.
__device__ __forceinline__ void fa_cp16(u32_t dst, const void* src, int bytes) {
    Vec16 v = {{0u, 0u, 0u, 0u}};
    if (bytes >= 16) {
        v = *reinterpret_cast<const Vec16*>(src);
    } else if (bytes > 0) {
        const unsigned char* s = reinterpret_cast<const unsigned char*>(src);
        unsigned char* d = reinterpret_cast<unsigned char*>(&v);
        for (int i = 0; i < bytes; ++i) d[i] = s[i];
    }
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};" ::"r"(dst), "r"(v.w[0]), "r"(v.w[1]),
                 "r"(v.w[2]), "r"(v.w[3])
                 : "memory");
}
__device__ __forceinline__ void fa_cp_commit() {}
__device__ __forceinline__ void fa_cp_wait_all() { asm volatile("" ::: "memory"); }
#endif
// x, hidden from loop-invariant code motion: shared-memory addresses derived
// from it inside a loop stay base + constant (folded into the ldmatrix
// offset) instead of one hoisted register per unrolled address.
__device__ __forceinline__ u32_t fa_opaque(u32_t x) {
    asm volatile("mov.b32 %0, %1;" : "=r"(x) : "r"(x));
    return x;
}
__device__ __forceinline__ float fa_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
// dst[0] += a, dst[1] += b (one vector reduction on sm_90+).
__device__ __forceinline__ void fa_red2(float* dst, float a, float b) {
#if LLMFT_PATH_ARCH >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" ::"l"(dst), "f"(a), "f"(b) : "memory");
#else
    atomicAdd(dst, a);
    atomicAdd(dst + 1, b);
#endif
}

// Rows [r0, r0 + R) of a head (row i at g + i·ld) into shared memory (row
// stride D + 8) with cp.async (NT threads); rows past T are zero-filled.
template <int R, int D, int NT>
__device__ __forceinline__ void fa_async_tile(unsigned short* s, const unsigned short* g, int r0,
                                              int T, int ld) {
    const int VPR = D / 8;
    static_assert((R * VPR) % NT == 0, "tile vectors must split evenly over the threads");
#pragma unroll
    for (int it = 0; it < R * VPR / NT; ++it) {
        int i = it * NT + threadIdx.x;
        int r = i / VPR, c = (i % VPR) * 8;
        bool ok = r0 + r < T;
        const unsigned short* src = ok ? g + (long long)(r0 + r) * ld + c : g;
        fa_cp16(fa_smem(s + r * (D + 8) + c), src, ok ? 16 : 0);
    }
}

// Packed rows: where a row's segment ids never decrease over [lo, hi] (what
// packing produces: one contiguous run per example), the first key a query
// at `lo` can see is the start of lo's run, and the last query that can see
// a key at `hi` is the end of hi's run. The block scans the ids once; with
// any other ids it returns the unrestricted bound (lo's run start = 0, hi's
// run end = T - 1), so the result is exact for every input.
__device__ int fa_run_start(const int* sg, int lo, int hi) {
    __shared__ int first;
    if (threadIdx.x == 0) first = lo;
    __syncthreads();
    const int id = sg[lo];
    bool mono = true;
    for (int j = threadIdx.x; j <= hi; j += blockDim.x) {
        int x = sg[j];
        if (j > 0 && x < sg[j - 1]) mono = false;
        if (x == id && j < lo) atomicMin(&first, j);
    }
    mono = __syncthreads_and(mono);
    int r = mono ? first : 0;
    __syncthreads();
    return r;
}
__device__ int fa_run_end(const int* sg, int lo, int hi, int T) {
    __shared__ int last;
    if (threadIdx.x == 0) last = hi;
    __syncthreads();
    const int id = sg[hi];
    bool mono = true;
    for (int j = lo + threadIdx.x; j < T; j += blockDim.x) {
        int x = sg[j];
        if (j > lo && x < sg[j - 1]) mono = false;
        if (x == id && j > hi) atomicMax(&last, j);
    }
    mono = __syncthreads_and(mono);
    int r = mono ? last : T - 1;
    __syncthreads();
    return r;
}

// Forward: grid (B * Hq, ceil(T / 128) query tiles), 128 threads, BN-key
// tiles (64 for D = 64; 32 for D = 128, which keeps the scores of two MMA
// tiles next to the 128-wide output in registers), dynamic shared memory
// (128 + 2·BN) · (D + 8) · 2 bytes + BN ints.
template <typename E, int D, int BN>
__device__ void fa2_fwd_body(const unsigned short* q, const unsigned short* k,
                             const unsigned short* v, const int* seg, unsigned short* o,
                             float* lse, int Hq, int Hkv, int T, float scale, int tok) {
    const int SD = D + 8;
    extern __shared__ __align__(16) unsigned short fa_sm[];
    unsigned short* sQ = fa_sm;
    unsigned short* sK = sQ + F2_M * SD;
    unsigned short* sV = sK + BN * SD;
    int* sSeg = reinterpret_cast<int*>(sV + BN * SD);
    // Blocks start in x-fastest order: with the heads on x, every head's
    // longest query tile (most key tiles) starts before any shorter one.
    const int mt = gridDim.y - 1 - blockIdx.y;
    const int bh = blockIdx.x, b = bh / Hq, h = bh % Hq;
    const int hk = h / (Hq / Hkv);
    // Head-major [B, H, T, D] or token-major [B, T, H, D] (tok): row stride
    // and head offset of q/o and of k/v.
    const int ldq = tok ? Hq * D : D, ldk = tok ? Hkv * D : D;
    const long long hq_off = tok ? D : (long long)T * D;
    const long long hk_off = tok ? D : (long long)T * D;
    const unsigned short* qb = q + (long long)b * T * Hq * D + h * hq_off;
    const unsigned short* kb = k + (long long)b * T * Hkv * D + hk * hk_off;
    const unsigned short* vb = v + (long long)b * T * Hkv * D + hk * hk_off;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, tq = lane & 3;
    const int q0 = mt * F2_M;
    const int wr0 = q0 + warp * 32;  // this warp's first query row
    const int q_last = min(q0 + F2_M, T) - 1;
    const int nkt = q_last / BN + 1;
    const int* sg = seg ? seg + (long long)b * T : 0;
    // Key tiles before the first row's example cannot be seen (packed rows).
    const int kt0 = sg ? fa_run_start(sg, q0, q_last) / BN : 0;

    fa_async_tile<F2_M, D, F2_THREADS>(sQ, qb, q0, T, ldq);
    fa_async_tile<BN, D, F2_THREADS>(sK, kb, kt0 * BN, T, ldk);
    fa_cp_commit();
    if (sg && threadIdx.x < BN) {
        int j = kt0 * BN + threadIdx.x;
        sSeg[threadIdx.x] = j < T ? sg[j] : -2;
    }

    // Fragment rows: [i][hh] = wr0 + 16·i + g + 8·hh.
    int sgr[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            int r = wr0 + i * 16 + g + hh * 8;
            sgr[i][hh] = (sg && r < T) ? sg[r] : -1;
        }
    const float sl2 = scale * FA_LOG2E;
    // Per-lane ldmatrix addresses: Q rows (A fragments), K rows (B), V rows (B, transposed).
    const u32_t q_base = fa_smem(sQ + (warp * 32 + (lane & 15)) * SD + (lane >> 4) * 8);
    const u32_t k_base = fa_smem(sK + ((lane & 7) + (lane >> 4) * 8) * SD + ((lane >> 3) & 1) * 8);
    const u32_t v_base = fa_smem(sV + ((lane & 7) + ((lane >> 3) & 1) * 8) * SD + (lane >> 4) * 8);
    float m[2][2], l[2][2];
    float acc[2][D / 8][4];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        m[i][0] = m[i][1] = NEG_INF;
        l[i][0] = l[i][1] = 0.f;
#pragma unroll
        for (int d = 0; d < D / 8; ++d) acc[i][d][0] = acc[i][d][1] = acc[i][d][2] = acc[i][d][3] = 0.f;
    }

    for (int kt = kt0; kt < nkt; ++kt) {
        const int k0 = kt * BN;
        fa_cp_wait_all();
        __syncthreads();  // K(kt) and its segments visible; every warp is done with V(kt - 1)
        fa_async_tile<BN, D, F2_THREADS>(sV, vb, k0, T, ldk);
        fa_cp_commit();
        // Some row of this warp sees a key of this tile / some key is hidden from some row.
        const bool active = k0 <= wr0 + 31;
        const bool masked = sg || k0 + BN - 1 > wr0;
        const u32_t aq = fa_opaque(q_base), ak = fa_opaque(k_base), av = fa_opaque(v_base);
        float s[2][BN / 8][4];
        if (active) {
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int n = 0; n < BN / 8; ++n) s[i][n][0] = s[i][n][1] = s[i][n][2] = s[i][n][3] = 0.f;
#pragma unroll
            for (int ks = 0; ks < D / 16; ++ks) {
                u32_t qa[2][4];
#pragma unroll
                for (int i = 0; i < 2; ++i) fa_ldsm(qa[i], aq + (i * 16 * SD + ks * 16) * 2);
#pragma unroll
                for (int np = 0; np < BN / 16; ++np) {
                    u32_t bk[4];
                    fa_ldsm(bk, ak + (np * 16 * SD + ks * 16) * 2);
#pragma unroll
                    for (int i = 0; i < 2; ++i) {
                        E::mma(s[i][2 * np], qa[i], bk[0], bk[1]);
                        E::mma(s[i][2 * np + 1], qa[i], bk[2], bk[3]);
                    }
                }
            }
            if (masked) {
#pragma unroll
                for (int i = 0; i < 2; ++i)
#pragma unroll
                    for (int n = 0; n < BN / 8; ++n)
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            int jl = n * 8 + tq * 2 + (e & 1);
                            int row = wr0 + i * 16 + g + (e >> 1) * 8;
                            bool vis = k0 + jl <= row && (!sg || sSeg[jl] == sgr[i][e >> 1]);
                            if (!vis) s[i][n][e] = NEG_INF;
                        }
            }
            // Online softmax in the log2 domain (the scale folded into the exponent).
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
                for (int n = 0; n < BN / 8; ++n) {
                    mx0 = fmaxf(mx0, fmaxf(s[i][n][0], s[i][n][1]));
                    mx1 = fmaxf(mx1, fmaxf(s[i][n][2], s[i][n][3]));
                }
                mx0 = fmaxf(m[i][0], fa_quad_max(mx0) * sl2);
                mx1 = fmaxf(m[i][1], fa_quad_max(mx1) * sl2);
                // A row with nothing visible yet keeps max -inf: shift by 0.
                const float b0 = mx0 == NEG_INF ? 0.f : mx0;
                const float b1 = mx1 == NEG_INF ? 0.f : mx1;
                const float al0 = fa_exp2(m[i][0] - b0), al1 = fa_exp2(m[i][1] - b1);
                m[i][0] = mx0;
                m[i][1] = mx1;
                float ps0 = 0.f, ps1 = 0.f;
#pragma unroll
                for (int n = 0; n < BN / 8; ++n) {
                    s[i][n][0] = fa_exp2(fmaf(s[i][n][0], sl2, -b0));
                    s[i][n][1] = fa_exp2(fmaf(s[i][n][1], sl2, -b0));
                    s[i][n][2] = fa_exp2(fmaf(s[i][n][2], sl2, -b1));
                    s[i][n][3] = fa_exp2(fmaf(s[i][n][3], sl2, -b1));
                    ps0 += s[i][n][0] + s[i][n][1];
                    ps1 += s[i][n][2] + s[i][n][3];
                }
                l[i][0] = l[i][0] * al0 + ps0;
                l[i][1] = l[i][1] * al1 + ps1;
#pragma unroll
                for (int d = 0; d < D / 8; ++d) {
                    acc[i][d][0] *= al0;
                    acc[i][d][1] *= al0;
                    acc[i][d][2] *= al1;
                    acc[i][d][3] *= al1;
                }
            }
        }
        fa_cp_wait_all();
        __syncthreads();  // V(kt) visible; every warp is done with K(kt) and its segments
        if (kt + 1 < nkt) {
            fa_async_tile<BN, D, F2_THREADS>(sK, kb, k0 + BN, T, ldk);
            fa_cp_commit();
            if (sg && threadIdx.x < BN) {
                int j = k0 + BN + threadIdx.x;
                sSeg[threadIdx.x] = j < T ? sg[j] : -2;
            }
        }
        if (active) {
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                u32_t pa[2][4];
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    pa[i][0] = E::pack(s[i][2 * kk][0], s[i][2 * kk][1]);
                    pa[i][1] = E::pack(s[i][2 * kk][2], s[i][2 * kk][3]);
                    pa[i][2] = E::pack(s[i][2 * kk + 1][0], s[i][2 * kk + 1][1]);
                    pa[i][3] = E::pack(s[i][2 * kk + 1][2], s[i][2 * kk + 1][3]);
                }
#pragma unroll
                for (int dp = 0; dp < D / 16; ++dp) {
                    u32_t bv[4];
                    fa_ldsm_t(bv, av + (kk * 16 * SD + dp * 16) * 2);
#pragma unroll
                    for (int i = 0; i < 2; ++i) {
                        E::mma(acc[i][2 * dp], pa[i], bv[0], bv[1]);
                        E::mma(acc[i][2 * dp + 1], pa[i], bv[2], bv[3]);
                    }
                }
            }
        }
    }
    unsigned short* ob = o + (qb - q);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const float la = fa_quad_sum(l[i][0]), lb = fa_quad_sum(l[i][1]);
        const float inv0 = la > 0.f ? 1.f / la : 0.f, inv1 = lb > 0.f ? 1.f / lb : 0.f;
        const int r0 = wr0 + i * 16 + g, r1 = r0 + 8;
#pragma unroll
        for (int d = 0; d < D / 8; ++d) {
            int c = d * 8 + tq * 2;
            if (r0 < T)
                *reinterpret_cast<u32_t*>(ob + (long long)r0 * ldq + c) =
                    E::pack(acc[i][d][0] * inv0, acc[i][d][1] * inv0);
            if (r1 < T)
                *reinterpret_cast<u32_t*>(ob + (long long)r1 * ldq + c) =
                    E::pack(acc[i][d][2] * inv1, acc[i][d][3] * inv1);
        }
        if (tq == 0) {
            if (r0 < T) lse[(long long)bh * T + r0] = (m[i][0] + log2f(la)) * FA_LN2;
            if (r1 < T) lse[(long long)bh * T + r1] = (m[i][1] + log2f(lb)) * FA_LN2;
        }
    }
}

// Backward: grid (B * Hkv, ceil(T / BN) key tiles), WARPS · 32 threads (a
// warp per 16 keys), dynamic shared memory
// (2·BN + 4·BM) · (D + 8) · 2 + BN · (BM + 8) · 2 + 6 · BM · 4 bytes.
// Each block walks the BM-query tiles (of every query head sharing its kv
// head) that can see its keys. Tiles: 128 keys × 64 queries (8 warps,
// 155.5 KiB at head dim 128) where the GPU allows it; 64 × 32 (4 warps,
// 73.8 KiB) on sm_86/89 and sm_70; 64 × 16 (54.4 KiB) on sm_75.
template <typename E, int D, int BN, int BM, int WARPS>
__device__ void fa2_bwd_body(const unsigned short* q, const unsigned short* k,
                             const unsigned short* v, const unsigned short* d_o, const float* lse,
                             const float* dsum, const int* seg, float* dq_acc, unsigned short* dk,
                             unsigned short* dv, int Hq, int Hkv, int T, float scale, int tok,
                             int* dq_lock) {
    static_assert(BN == WARPS * 16, "a warp per 16 keys");
    static_assert(WARPS % (BM / 16) == 0 && (D / 8) % (WARPS / (BM / 16)) == 0,
                  "dQ's tile must split evenly over the warps");
    constexpr int NT = WARPS * 32;
    const int SD = D + 8, SS = BM + 8;
    extern __shared__ __align__(16) unsigned short fa_sm[];
    unsigned short* sK = fa_sm;
    unsigned short* sV = sK + BN * SD;
    unsigned short* sQ = sV + BN * SD;     // two buffers of BM rows
    unsigned short* sO = sQ + 2 * BM * SD; // two buffers of BM rows
    unsigned short* sS = sO + 2 * BM * SD; // dSᵀ [BN keys][BM queries]
    float* sL = reinterpret_cast<float*>(sS + BN * SS);
    float* sDs = sL + 2 * BM;
    int* sSq = reinterpret_cast<int*>(sDs + 2 * BM);
    // Heads on x: every head's first key tile (the most query tiles) starts
    // before any later one.
    const int kt = blockIdx.y, bk = blockIdx.x, b = bk / Hkv, hk = bk % Hkv;
    const int rep = Hq / Hkv;
    const int k0 = kt * BN;
    // Head-major or token-major (tok) as in the forward; q, dO and the dq
    // accumulator share q's layout, dk and dv k's.
    const int ldq = tok ? Hq * D : D, ldk = tok ? Hkv * D : D;
    const long long hq_off = tok ? D : (long long)T * D;
    const long long hk_off = tok ? D : (long long)T * D;
    const long long kv_off = (long long)b * T * Hkv * D + hk * hk_off;
    const unsigned short* kb = k + kv_off;
    const unsigned short* vb = v + kv_off;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, tq = lane & 3;
    const int wk0 = k0 + warp * 16;  // this warp's first key
    const int j0 = wk0 + g, j1 = j0 + 8;
    const int* sg = seg ? seg + (long long)b * T : 0;
    const int sk0 = (sg && j0 < T) ? sg[j0] : -2;
    const int sk1 = (sg && j1 < T) ? sg[j1] : -2;
    const float sl2 = scale * FA_LOG2E;
    // Query tiles before qs cannot see any key of this block.
    const int qs = (k0 / BM) * BM;
    // Query tiles past the last key's example cannot see this block (packed rows).
    // (Not with dq_lock: there every key block passes every query tile after
    // its own, so that each tile's counter counts the blocks before it.)
    const int q_end = sg && !dq_lock ? fa_run_end(sg, k0, min(k0 + BN, T) - 1, T) + 1 : T;
    const int nq = (q_end - qs + BM - 1) / BM;
    const int n_it = rep * nq;

    // Tile `it` (query head it / nq, rows qs + BM·(it % nq)) into buffer `buf`.
    auto issue = [&](int it, int buf) {
        const int q0 = qs + (it % nq) * BM;
        const long long bhq = (long long)b * Hq + hk * rep + it / nq;
        const long long q_off = (long long)b * T * Hq * D + (hk * rep + it / nq) * hq_off;
        fa_async_tile<BM, D, NT>(sQ + buf * BM * SD, q + q_off, q0, T, ldq);
        fa_async_tile<BM, D, NT>(sO + buf * BM * SD, d_o + q_off, q0, T, ldq);
        fa_cp_commit();
        if (threadIdx.x < BM) {
            int i = q0 + threadIdx.x;
            bool in = i < T;
            sL[buf * BM + threadIdx.x] = in ? lse[bhq * T + i] * FA_LOG2E : POS_INF;
            sDs[buf * BM + threadIdx.x] = in ? dsum[bhq * T + i] : 0.f;
            sSq[buf * BM + threadIdx.x] = in ? (sg ? sg[i] : 0) : -3;
        }
    };
    fa_async_tile<BN, D, NT>(sK, kb, k0, T, ldk);
    fa_async_tile<BN, D, NT>(sV, vb, k0, T, ldk);
    if (n_it > 0) issue(0, 0);

    float dka[D / 8][4], dva[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) dka[i][e] = dva[i][e] = 0.f;
    // dQ's split of the BM x D tile over the warps.
    const int MT = BM / 16, WPM = WARPS / MT, NTW = (D / 8) / WPM;
    const int mtile = warp % MT, part = warp / MT;
    const u32_t k_rows = fa_smem(sK + (warp * 16 + (lane & 15)) * SD + (lane >> 4) * 8);
    const u32_t v_rows = k_rows + (u32_t)((sV - sK) * 2);
    const u32_t qo_plain = fa_smem(sQ + ((lane & 7) + (lane >> 4) * 8) * SD + ((lane >> 3) & 1) * 8);
    const u32_t qo_trans = fa_smem(sQ + ((lane & 7) + ((lane >> 3) & 1) * 8) * SD + (lane >> 4) * 8);
    const u32_t s_trans = fa_smem(sS + ((lane & 7) + (lane >> 4) * 8) * SS + mtile * 16 +
                                  ((lane >> 3) & 1) * 8);
    const u32_t k_trans = fa_smem(sK + ((lane & 7) + ((lane >> 3) & 1) * 8) * SD +
                                  part * (NTW / 2) * 16 + (lane >> 4) * 8);

    for (int it = 0; it < n_it; ++it) {
        const int buf = it & 1;
        const int q0 = qs + (it % nq) * BM;
        const long long bhq = (long long)b * Hq + hk * rep + it / nq;
        fa_cp_wait_all();
        __syncthreads();  // tile `it` visible; every warp is done with tile it - 1
        if (it + 1 < n_it) issue(it + 1, buf ^ 1);
        const float* cL = sL + buf * BM;
        const float* cDs = sDs + buf * BM;
        const int* cSq = sSq + buf * BM;
        // Per-lane ldmatrix addresses: this warp's K/V rows (A fragments), the
        // Q/dO tile as B fragments (plain and transposed), dSᵀ and K for dQ.
        const u32_t a_k = fa_opaque(k_rows), a_v = fa_opaque(v_rows);
        const u32_t b_q = fa_opaque(qo_plain) + buf * BM * SD * 2;
        const u32_t b_o = b_q + (u32_t)((sO - sQ) * 2);
        const u32_t t_q = fa_opaque(qo_trans) + buf * BM * SD * 2;
        const u32_t t_o = t_q + (u32_t)((sO - sQ) * 2);
        const u32_t a_s = fa_opaque(s_trans), b_k = fa_opaque(k_trans);
        const bool active = q0 + BM - 1 >= wk0;
        const bool masked = sg || q0 < k0 + BN - 1;
        float st[BM / 8][4], dpt[BM / 8][4];
#pragma unroll
        for (int i = 0; i < BM / 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) st[i][e] = dpt[i][e] = 0.f;
        if (active) {
            // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ for this warp's 16 keys x BM queries.
#pragma unroll
            for (int ks = 0; ks < D / 16; ++ks) {
                u32_t ka[4], va[4];
                fa_ldsm(ka, a_k + ks * 32);
                fa_ldsm(va, a_v + ks * 32);
#pragma unroll
                for (int np = 0; np < BM / 16; ++np) {
                    const u32_t off = (np * 16 * SD + ks * 16) * 2;
                    u32_t bq[4], bo[4];
                    fa_ldsm(bq, b_q + off);
                    fa_ldsm(bo, b_o + off);
                    E::mma(st[2 * np], ka, bq[0], bq[1]);
                    E::mma(st[2 * np + 1], ka, bq[2], bq[3]);
                    E::mma(dpt[2 * np], va, bo[0], bo[1]);
                    E::mma(dpt[2 * np + 1], va, bo[2], bo[3]);
                }
            }
            // Pᵀ from lse (+inf past T gives 0); dSᵀ = Pᵀ ∘ (dPᵀ − dsum).
#pragma unroll
            for (int n = 0; n < BM / 8; ++n) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    int qi = n * 8 + tq * 2 + (e & 1);
                    float p = fa_exp2(fmaf(st[n][e], sl2, -cL[qi]));
                    if (masked) {
                        int j = e < 2 ? j0 : j1;
                        bool vis = j <= q0 + qi && (!sg || cSq[qi] == (e < 2 ? sk0 : sk1));
                        if (!vis) p = 0.f;
                    }
                    st[n][e] = p;
                    dpt[n][e] = p * (dpt[n][e] - cDs[qi]);
                }
            }
            // dV += Pᵀ·dO and dK += dSᵀ·Q (the query axis is the reduction).
#pragma unroll
            for (int kk = 0; kk < BM / 16; ++kk) {
                u32_t pa[4] = {E::pack(st[2 * kk][0], st[2 * kk][1]),
                               E::pack(st[2 * kk][2], st[2 * kk][3]),
                               E::pack(st[2 * kk + 1][0], st[2 * kk + 1][1]),
                               E::pack(st[2 * kk + 1][2], st[2 * kk + 1][3])};
                u32_t da[4] = {E::pack(dpt[2 * kk][0], dpt[2 * kk][1]),
                               E::pack(dpt[2 * kk][2], dpt[2 * kk][3]),
                               E::pack(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]),
                               E::pack(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3])};
#pragma unroll
                for (int dp = 0; dp < D / 16; ++dp) {
                    const u32_t off = (kk * 16 * SD + dp * 16) * 2;
                    u32_t bo[4], bq[4];
                    fa_ldsm_t(bo, t_o + off);
                    fa_ldsm_t(bq, t_q + off);
                    E::mma(dva[2 * dp], pa, bo[0], bo[1]);
                    E::mma(dva[2 * dp + 1], pa, bo[2], bo[3]);
                    E::mma(dka[2 * dp], da, bq[0], bq[1]);
                    E::mma(dka[2 * dp + 1], da, bq[2], bq[3]);
                }
            }
        }
        // dSᵀ to shared memory for dQ += dS·K (zeros from a warp that saw nothing).
#pragma unroll
        for (int n = 0; n < BM / 8; ++n) {
            int c = n * 8 + tq * 2;
            *reinterpret_cast<u32_t*>(sS + (warp * 16 + g) * SS + c) = E::pack(dpt[n][0], dpt[n][1]);
            *reinterpret_cast<u32_t*>(sS + (warp * 16 + g + 8) * SS + c) =
                E::pack(dpt[n][2], dpt[n][3]);
        }
        __syncthreads();
        float dqa[NTW][4];
#pragma unroll
        for (int i = 0; i < NTW; ++i) dqa[i][0] = dqa[i][1] = dqa[i][2] = dqa[i][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            u32_t a[4];
            fa_ldsm_t(a, a_s + kk * 16 * SS * 2);
#pragma unroll
            for (int np = 0; np < NTW / 2; ++np) {
                u32_t bkf[4];
                fa_ldsm_t(bkf, b_k + (kk * 16 * SD + np * 16) * 2);
                E::mma(dqa[2 * np], a, bkf[0], bkf[1]);
                E::mma(dqa[2 * np + 1], a, bkf[2], bkf[3]);
            }
        }
        const int qa = q0 + mtile * 16 + g, qb2 = qa + 8;
        float* dqb = dq_acc + (long long)b * T * Hq * D + (bhq - (long long)b * Hq) * hq_off;
        // Deterministic mode: the key blocks add into a query tile one after
        // another in key-tile order, each waiting for the tile's counter to
        // reach its own index (blocks start in that order, so the ones waited
        // for are running or done).
        int* lk = dq_lock ? dq_lock + bhq * ((T + BM - 1) / BM) + q0 / BM : 0;
        if (lk) {
            if (threadIdx.x == 0) {
                int seen;
                do {
#if LLMFT_PATH_ARCH >= 700
                    asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(seen) : "l"(lk) : "memory");
                    if (seen != kt) __nanosleep(32);
#else
                    asm volatile("ld.volatile.global.s32 %0, [%1];" : "=r"(seen) : "l"(lk) : "memory");
                    __threadfence();
#endif
                } while (seen != kt);
            }
            __syncthreads();
        }
#pragma unroll
        for (int n = 0; n < NTW; ++n) {
            int c = (part * NTW + n) * 8 + tq * 2;
            if (qa < T) fa_red2(dqb + (long long)qa * ldq + c, dqa[n][0], dqa[n][1]);
            if (qb2 < T) fa_red2(dqb + (long long)qb2 * ldq + c, dqa[n][2], dqa[n][3]);
        }
        if (lk) {
            __threadfence();
            __syncthreads();
            if (threadIdx.x == 0) atomicAdd(lk, 1);
        }
    }
    unsigned short* dkb = dk + kv_off;
    unsigned short* dvb = dv + kv_off;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
        int c = i * 8 + tq * 2;
        if (j0 < T) {
            *reinterpret_cast<u32_t*>(dkb + (long long)j0 * ldk + c) =
                E::pack(dka[i][0] * scale, dka[i][1] * scale);
            *reinterpret_cast<u32_t*>(dvb + (long long)j0 * ldk + c) = E::pack(dva[i][0], dva[i][1]);
        }
        if (j1 < T) {
            *reinterpret_cast<u32_t*>(dkb + (long long)j1 * ldk + c) =
                E::pack(dka[i][2] * scale, dka[i][3] * scale);
            *reinterpret_cast<u32_t*>(dvb + (long long)j1 * ldk + c) = E::pack(dva[i][2], dva[i][3]);
        }
    }
}

#define FA2_KERNELS(n_, E, D)                                                                     \
    extern "C" __global__ void __launch_bounds__(F2_THREADS, 2)                                   \
        flash_attn2_fwd_##n_##_d##D(const unsigned short* q, const unsigned short* k,             \
                                    const unsigned short* v, const int* seg, unsigned short* o,   \
                                    float* lse, int Hq, int Hkv, int T, float scale, int tok) {   \
        fa2_fwd_body<E, D, (D > 64 ? 32 : 64)>(q, k, v, seg, o, lse, Hq, Hkv, T, scale, tok);     \
    }                                                                                             \
    FA2_BWD(n_, E, D, , 128, 64, 8)                                                               \
    FA2_BWD(n_, E, D, _n64m32, 64, 32, 4)
// The backward for BN keys × BM queries per block (`tiles` names it; the
// largest has no suffix).
#define FA2_BWD(n_, E, D, tiles, BN, BM, WARPS)                                                   \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, 1)                                   \
        flash_attn2_bwd_##n_##_d##D##tiles(                                                       \
            const unsigned short* q, const unsigned short* k, const unsigned short* v,            \
            const unsigned short* d_o, const float* lse, const float* dsum, const int* seg,       \
            float* dq_acc, unsigned short* dk, unsigned short* dv, int Hq, int Hkv, int T,        \
            float scale, int tok, int* dq_lock) {                                                 \
        fa2_bwd_body<E, D, BN, BM, WARPS>(q, k, v, d_o, lse, dsum, seg, dq_acc, dk, dv, Hq, Hkv,  \
                                          T, scale, tok, dq_lock);                                \
    }
FA2_KERNELS(bf16, FaBF16, 64)
FA2_KERNELS(bf16, FaBF16, 128)
FA2_KERNELS(f16, FaF16, 64)
FA2_KERNELS(f16, FaF16, 128)
FA2_BWD(bf16, FaBF16, 128, _n64m16, 64, 16, 4)
FA2_BWD(f16, FaF16, 128, _n64m16, 64, 16, 4)

#define FA_KERNELS(n_, E, D, BQ)                                                                  \
    extern "C" __global__ void __launch_bounds__(FA_THREADS) flash_attn_fwd_##n_##_d##D(          \
        const unsigned short* q, const unsigned short* k, const unsigned short* v, const int* seg, \
        unsigned short* o, float* lse, int Hq, int Hkv, int T, float scale, int /* tok = 0 */) {  \
        fa_fwd_body<E, D>(q, k, v, seg, o, lse, Hq, Hkv, T, scale);                               \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(FA_THREADS) flash_attn_bwd_pre_##n_##_d##D(      \
        const unsigned short* o, const unsigned short* d_o, float* dsum, float* dq_acc,           \
        long long rows, int T, int H, int tok) {                                                  \
        fa_bwd_pre_body<E, D>(o, d_o, dsum, dq_acc, rows, T, H, tok);                             \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(FA_THREADS) flash_attn_bwd_##n_##_d##D(          \
        const unsigned short* q, const unsigned short* k, const unsigned short* v,                \
        const unsigned short* d_o, const float* lse, const float* dsum, const int* seg,           \
        float* dq_acc, unsigned short* dk, unsigned short* dv, int Hq, int Hkv, int T,            \
        float scale, int /* tok = 0 */, int* /* dq_lock = null */) {                              \
        fa_bwd_body<E, D, BQ>(q, k, v, d_o, lse, dsum, seg, dq_acc, dk, dv, Hq, Hkv, T, scale);   \
    }
// Head dims 16 and 32 run the first kernels (head-major only: their `tok`
// argument is always 0); 64 and 128 the FA2 kernels above, which share the
// pre-pass.
#define FA_PRE(n_, E, D)                                                                          \
    extern "C" __global__ void __launch_bounds__(FA_THREADS) flash_attn_bwd_pre_##n_##_d##D(      \
        const unsigned short* o, const unsigned short* d_o, float* dsum, float* dq_acc,           \
        long long rows, int T, int H, int tok) {                                                  \
        fa_bwd_pre_body<E, D>(o, d_o, dsum, dq_acc, rows, T, H, tok);                             \
    }
#define FA_DIMS(n_, E) FA_KERNELS(n_, E, 16, 64) FA_KERNELS(n_, E, 32, 64) FA_PRE(n_, E, 64) \
    FA_PRE(n_, E, 128)
FA_DIMS(bf16, FaBF16)
FA_DIMS(f16, FaF16)
extern "C" __global__ void flash_attn_bwd_dq_bf16(const float* a, unsigned short* dq, long long n,
                                                  float scale) {
    fa_bwd_dq_body<FaBF16>(a, dq, n, scale);
}
extern "C" __global__ void flash_attn_bwd_dq_f16(const float* a, unsigned short* dq, long long n,
                                                 float scale) {
    fa_bwd_dq_body<FaF16>(a, dq, n, scale);
}
