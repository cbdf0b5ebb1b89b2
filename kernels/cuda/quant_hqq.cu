// HQQ (hqq library 0.2.8): W ≈ (W_q − z)·s per group. The weight is viewed
// as a [rows, cols] matrix (axis 1: rows = groups of `cols` consecutive
// values; axis 0: groups are the columns); packing stacks k slices of
// `step` rows in one word (k = 8/nbits, or 10 three-bit values in an int32),
// slice s at bit (k-1-s)*nbits. The solver is hqq's proximal one for the
// zero point; every step rounds as torch does (no fused multiply-add).

__device__ __forceinline__ float ld_stat(const void* p, long long i, int f16) {
    return f16 ? f16_to_f32(((const f16_t*)p)[i]) : ((const float*)p)[i];
}

// One thread per 8 packed words (vector part, cols % 8 == 0) or per word.
template <typename E, int NBITS>
__device__ void dequant_hqq_body(const void* wq, const void* scale, const void* zero, int f16,
                                 typename E::T* out, long long rows, long long cols, int axis) {
    const int K = NBITS == 3 ? 10 : 8 / NBITS;
    const unsigned int MASK = (1u << NBITS) - 1;
    long long step = (rows + K - 1) / K;
    bool vec = cols % 8 == 0 && aligned16(out) && aligned16(wq);
    long long nvec = vec ? step * cols / 8 : 0;
    GRID_STRIDE(t, 0, nvec) {
        long long r = (t * 8) / cols, c = (t * 8) % cols;
        unsigned int w[8];
        if (NBITS == 3) {
            const uint4* p = reinterpret_cast<const uint4*>((const int*)wq + r * cols + c);
            uint4 a = p[0], b = p[1];
            w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w; w[4] = b.x; w[5] = b.y; w[6] = b.z; w[7] = b.w;
        } else {
            uint2 a = *reinterpret_cast<const uint2*>((const u8_t*)wq + r * cols + c);
#pragma unroll
            for (int k = 0; k < 4; ++k) { w[k] = (a.x >> (8 * k)) & 0xff; w[4 + k] = (a.y >> (8 * k)) & 0xff; }
        }
        float s[8], z[8];
        if (axis == 0) {
#pragma unroll
            for (int k = 0; k < 8; ++k) { s[k] = ld_stat(scale, c + k, f16); z[k] = ld_stat(zero, c + k, f16); }
        }
#pragma unroll
        for (int sl = 0; sl < K; ++sl) {
            long long i = sl * step + r;
            if (i >= rows) break;
            if (axis == 1) {
                float s1 = ld_stat(scale, i, f16), z1 = ld_stat(zero, i, f16);
#pragma unroll
                for (int k = 0; k < 8; ++k) { s[k] = s1; z[k] = z1; }
            }
            float v[8];
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                float q = (float)((w[k] >> ((K - 1 - sl) * NBITS)) & MASK);
                v[k] = __fmul_rn(__fsub_rn(q, z[k]), s[k]);
            }
            store8<E>(out, i * cols + c, v);
        }
    }
    GRID_STRIDE(t, 0, vec ? 0 : step * cols) {
        long long r = t / cols, c = t % cols;
        unsigned int w = NBITS == 3 ? ((const unsigned int*)wq)[t] : ((const u8_t*)wq)[t];
        for (int sl = 0; sl < K; ++sl) {
            long long i = sl * step + r;
            if (i >= rows) break;
            long long g = axis == 1 ? i : c;
            float q = (float)((w >> ((K - 1 - sl) * NBITS)) & MASK);
            E::store(out, i * cols + c, __fmul_rn(__fsub_rn(q, ld_stat(zero, g, f16)), ld_stat(scale, g, f16)));
        }
    }
}

#define HQQ_DQ(n_, E, B)                                                                          \
    extern "C" __global__ void dequant_hqq##B##_##n_(const void* wq, const void* scale,            \
                                                     const void* zero, int f16, E::T* out,         \
                                                     long long rows, long long cols, int axis) {   \
        dequant_hqq_body<E, B>(wq, scale, zero, f16, out, rows, cols, axis);                       \
    }
#define HQQ_DQ_ALL(n_, E) HQQ_DQ(n_, E, 8) HQQ_DQ(n_, E, 4) HQQ_DQ(n_, E, 3) HQQ_DQ(n_, E, 2) HQQ_DQ(n_, E, 1)
FOR_FLOATS(HQQ_DQ_ALL)

// Element j of group g as a flat index.
__device__ __forceinline__ long long hqq_at(long long g, long long j, long long cols, int axis) {
    return axis == 1 ? g * cols + j : j * cols + g;
}

// Initial inverse scale and zero of each group (one thread per group).
template <typename E>
__device__ void hqq_init_body(const typename E::T* w, float* inv, float* zero, long long ngroups,
                              long long cols, int gs, int axis, float max_v, int round_zero) {
    GRID_STRIDE(g, 0, ngroups) {
        float lo = POS_INF, hi = NEG_INF;
        for (int j = 0; j < gs; ++j) {
            float v = E::load(w, hqq_at(g, j, cols, axis));
            lo = fminf(lo, v);
            hi = fmaxf(hi, v);
        }
        float denom = __fsub_rn(hi, lo);
        float s = __fmul_rn(__fdiv_rn(1.0f, denom), max_v);  // torch: reciprocal * max_v
        if (fabsf(denom) <= 1e-4f) s = 1.0f;
        s = fminf(s, 2e4f);
        float z = __fmul_rn(-lo, s);
        if (round_zero) z = rintf(z);
        inv[g] = s;
        zero[g] = z;
    }
}

// One solver iteration for every group: the group's error sum and new zero.
template <typename E>
__device__ void hqq_step_body(const typename E::T* w, const float* inv, float* zero, float* err,
                              const int* stop, long long ngroups, long long cols, int gs, int axis,
                              float max_v, float inv_beta, float lp) {
    if (*stop) return;
    GRID_STRIDE(g, 0, ngroups) {
        float s = inv[g], z = zero[g], e_sum = 0.f, acc = 0.f;
        for (int j = 0; j < gs; ++j) {
            float x = E::load(w, hqq_at(g, j, cols, axis));
            float q = fminf(fmaxf(rintf(__fadd_rn(__fmul_rn(x, s), z)), 0.f), max_v);
            float r = __fdiv_rn(__fsub_rn(q, z), s);
            float d = __fsub_rn(x, r);
            float a = fabsf(d);
            e_sum = __fadd_rn(e_sum, a);
            float sh = fmaxf(__fsub_rn(a, __fmul_rn(inv_beta, powf(a, lp - 1.f))), 0.f);
            float e = d > 0.f ? sh : (d < 0.f ? -sh : 0.f);
            acc = __fadd_rn(acc, __fsub_rn(q, __fmul_rn(__fsub_rn(x, e), s)));
        }
        err[g] = e_sum;
        zero[g] = __fdiv_rn(acc, (float)gs);
    }
}

// Early stop on the mean absolute error over the whole weight (one block).
extern "C" __global__ void hqq_decide(const float* err, long long ngroups, long long numel,
                                      float* best, int* stop, int early_stop) {
    __shared__ double sh[32];
    if (*stop) return;
    double s = 0.0;
    for (long long i = threadIdx.x; i < ngroups; i += blockDim.x) s += (double)err[i];
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0.0;
        for (int k = 0; k < (int)(blockDim.x >> 5); ++k) t += sh[k];
        float e = (float)(t / (double)numel);
        if (early_stop) {
            if (e < *best) *best = e;
            else *stop = 1;
        }
    }
}

// Rounds the stats as hqq returns them (f16 after the solver) and writes the
// dequantization scale 1/inv and the zero in the stored dtype.
extern "C" __global__ void hqq_stats_out(float* inv, float* zero, void* scale_out, void* zero_out,
                                         long long ngroups, int f16) {
    GRID_STRIDE(g, 0, ngroups) {
        if (f16) {
            float s = f16_to_f32(f32_to_f16(inv[g])), z = f16_to_f32(f32_to_f16(zero[g]));
            inv[g] = s;
            zero[g] = z;
            ((f16_t*)scale_out)[g] = f32_to_f16(__fdiv_rn(1.0f, s));
            ((f16_t*)zero_out)[g] = f32_to_f16(z);
        } else {
            ((float*)scale_out)[g] = __fdiv_rn(1.0f, inv[g]);
            ((float*)zero_out)[g] = zero[g];
        }
    }
}

// Final rounding and hqq's bit packing, one thread per packed word.
template <typename E, int NBITS>
__device__ void hqq_pack_body(const typename E::T* w, const float* inv, const float* zero, void* wq,
                              long long rows, long long cols, int axis) {
    const int K = NBITS == 3 ? 10 : 8 / NBITS;
    const float max_v = (float)((1 << NBITS) - 1);
    long long step = (rows + K - 1) / K;
    GRID_STRIDE(t, 0, step * cols) {
        long long r = t / cols, c = t % cols;
        unsigned int word = 0;
        for (int sl = 0; sl < K; ++sl) {
            long long i = sl * step + r;
            if (i >= rows) break;
            long long g = axis == 1 ? i : c;
            float q = fminf(fmaxf(rintf(__fadd_rn(__fmul_rn(E::load(w, i * cols + c), inv[g]), zero[g])), 0.f), max_v);
            word |= ((unsigned int)q) << ((K - 1 - sl) * NBITS);
        }
        if (NBITS == 3) ((unsigned int*)wq)[t] = word;
        else ((u8_t*)wq)[t] = (u8_t)word;
    }
}

#define HQQ_Q(n_, E)                                                                               \
    extern "C" __global__ void hqq_init_##n_(const E::T* w, float* inv, float* zero, long long ng,  \
                                             long long cols, int gs, int axis, float max_v,         \
                                             int round_zero) {                                      \
        hqq_init_body<E>(w, inv, zero, ng, cols, gs, axis, max_v, round_zero);                      \
    }                                                                                              \
    extern "C" __global__ void hqq_step_##n_(const E::T* w, const float* inv, float* zero,          \
                                             float* err, const int* stop, long long ng,             \
                                             long long cols, int gs, int axis, float max_v,         \
                                             float inv_beta, float lp) {                            \
        hqq_step_body<E>(w, inv, zero, err, stop, ng, cols, gs, axis, max_v, inv_beta, lp);         \
    }
FOR_FLOATS(HQQ_Q)
#define HQQ_P(n_, E, B)                                                                            \
    extern "C" __global__ void hqq_pack##B##_##n_(const E::T* w, const float* inv,                  \
                                                  const float* zero, void* wq, long long rows,      \
                                                  long long cols, int axis) {                       \
        hqq_pack_body<E, B>(w, inv, zero, wq, rows, cols, axis);                                    \
    }
#define HQQ_P_ALL(n_, E) HQQ_P(n_, E, 8) HQQ_P(n_, E, 4) HQQ_P(n_, E, 3) HQQ_P(n_, E, 2) HQQ_P(n_, E, 1)
FOR_FLOATS(HQQ_P_ALL)
