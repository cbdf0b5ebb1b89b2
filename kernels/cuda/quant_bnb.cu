// bitsandbytes' blockwise formats: 4-bit NF4/FP4 (absmax per block, two
// values per byte, first in the high nibble) and the signed 8-bit dynamic
// map used to double-quantize absmax. Arithmetic follows bnb's kernels step
// by step (reciprocal multiply, no fused multiply-add) so bytes match bnb.
// bnb is built with --use_fast_math: its 1.0f/absmax is the approximate
// reciprocal (rcp.approx.ftz), so ours is too.

__device__ __forceinline__ float rcp_approx(float x) {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

// The reciprocal table the CPU path uses: rcp of 1 + k/1024 (k < 1024), and
// the same mantissas scaled by 2^(e-127) for a check of exponent independence.
extern "C" __global__ void rcp_table(float* out, int e) {
    int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k < 1024) out[k] = rcp_approx(__uint_as_float(((unsigned)e << 23) | ((unsigned)k << 13)));
}

__device__ __forceinline__ unsigned char nf4_encode(float x) {
    if (x > 0.03979014977812767f)
        if (x > 0.3893125355243683f)
            if (x > 0.6427869200706482f) return x > 0.8614784181118011f ? 15 : 14;
            else return x > 0.5016634166240692f ? 13 : 12;
        else if (x > 0.2035212516784668f) return x > 0.2920137718319893f ? 11 : 10;
        else return x > 0.1202552504837513f ? 9 : 8;
    else if (x > -0.33967943489551544f)
        if (x > -0.13791173323988914f) return x > -0.045525018125772476f ? 7 : 6;
        else return x > -0.23460740596055984f ? 5 : 4;
    else if (x > -0.6106329262256622f) return x > -0.4599952697753906f ? 3 : 2;
    else return x > -0.8480964004993439f ? 1 : 0;
}

__device__ __forceinline__ unsigned char fp4_encode(float x) {
    unsigned char sign = x < 0 ? 8 : 0;
    x = fabsf(x);
    unsigned char c;
    if (x > 0.29166667f)
        if (x > 0.583333f) c = x > 0.8333333f ? 3 : 2;
        else c = x > 0.4166667f ? 5 : 4;
    else if (x > 0.0859375f) c = x > 0.20833333f ? 7 : 6;
    else c = x > 0.00260417f ? 1 : 0;
    return c + sign;
}

// One warp per quantization block: absmax, then codes two values a byte.
template <typename E>
__device__ void quant4_body(const typename E::T* x, u8_t* packed, float* absmax, long long n,
                            int bs, int fp4) {
    long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    long long nblocks = (n + bs - 1) / bs;
    if (warp >= nblocks) return;
    long long lo = warp * bs;
    long long hi = min(lo + bs, n);
    float m = -3.402823466e38f;
    for (long long i = lo + lane; i < hi; i += 32) m = fmaxf(m, fabsf(E::load(x, i)));
    m = warp_max(m);
    if (lane == 0) absmax[warp] = m;
    float inv = rcp_approx(m);
    for (long long i = lo + 2 * lane; i < hi; i += 64) {
        float a = __fmul_rn(E::load(x, i), inv);
        float b = __fmul_rn(i + 1 < hi ? E::load(x, i + 1) : 0.0f, inv);
        packed[i >> 1] = fp4 ? (u8_t)((fp4_encode(a) << 4) | fp4_encode(b))
                             : (u8_t)((nf4_encode(a) << 4) | nf4_encode(b));
    }
}

// 16 values (8 bytes) per thread in the vector part; `code16` is the
// 16-entry table; absmax is read, or rebuilt from the double-quantized form
// as bnb does: code8[qabsmax] * nested_absmax[b / 256] + offset.
template <typename E>
__device__ void dequant4_body(const u8_t* packed, const float* absmax, const u8_t* qabsmax,
                              const float* nested, const float* code8, float offset,
                              const float* code16, typename E::T* out, long long n, int log2_bs) {
    __shared__ float lut[16];
    __shared__ float dyn[256];
    if (threadIdx.x < 16) lut[threadIdx.x] = code16[threadIdx.x];
    if (qabsmax)
        for (int i = threadIdx.x; i < 256; i += blockDim.x) dyn[i] = code8[i];
    __syncthreads();
    long long chunks = (aligned16(out) && (((u64_t)packed) & 7) == 0) ? n / 16 : 0;
    GRID_STRIDE(c, 0, chunks) {
        long long b = (c * 16) >> log2_bs;
        float am = qabsmax ? __fadd_rn(__fmul_rn(dyn[qabsmax[b]], nested[b >> 8]), offset) : absmax[b];
        uint2 w = *reinterpret_cast<const uint2*>(packed + c * 8);
        float v[16];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            unsigned int x = (w.x >> (8 * k)) & 0xff, y = (w.y >> (8 * k)) & 0xff;
            v[2 * k] = __fmul_rn(lut[x >> 4], am);
            v[2 * k + 1] = __fmul_rn(lut[x & 15], am);
            v[8 + 2 * k] = __fmul_rn(lut[y >> 4], am);
            v[8 + 2 * k + 1] = __fmul_rn(lut[y & 15], am);
        }
        store8<E>(out, c * 16, v);
        store8<E>(out, c * 16 + 8, v + 8);
    }
    GRID_STRIDE(i, chunks * 16, n) {
        long long b = i >> log2_bs;
        float am = qabsmax ? __fadd_rn(__fmul_rn(dyn[qabsmax[b]], nested[b >> 8]), offset) : absmax[b];
        u8_t q = packed[i >> 1];
        E::store(out, i, __fmul_rn(lut[(i & 1) ? (q & 15) : (q >> 4)], am));
    }
}

#define BNB4(n_, E)                                                                              \
    extern "C" __global__ void quant_bnb4_##n_(const E::T* x, u8_t* packed, float* absmax,        \
                                               long long n, int bs, int fp4) {                    \
        quant4_body<E>(x, packed, absmax, n, bs, fp4);                                            \
    }                                                                                            \
    extern "C" __global__ void dequant_bnb4_##n_(const u8_t* packed, const float* absmax,         \
                                                 const u8_t* qabsmax, const float* nested,        \
                                                 const float* code8, float offset,                \
                                                 const float* code16, E::T* out, long long n,     \
                                                 int log2_bs) {                                   \
        dequant4_body<E>(packed, absmax, qabsmax, nested, code8, offset, code16, out, n, log2_bs); \
    }
FOR_FLOATS(BNB4)

__device__ __forceinline__ unsigned char dyn_encode(const float* code, float x) {
    int pivot = 127, upper_pivot = 255, lower_pivot = 0;
    float lower = -1.0f, upper = 1.0f, val = code[pivot];
    for (int i = 64; i > 0; i >>= 1) {
        if (x > val) { lower_pivot = pivot; lower = val; pivot += i; }
        else { upper_pivot = pivot; upper = val; pivot -= i; }
        val = code[pivot];
    }
    if (upper_pivot == 255) upper = code[upper_pivot];
    if (lower_pivot == 0) lower = code[lower_pivot];
    if (x > val) return x > __fmul_rn(__fadd_rn(upper, val), 0.5f) ? upper_pivot : pivot;
    return x < __fmul_rn(__fadd_rn(lower, val), 0.5f) ? lower_pivot : pivot;
}

// Double quant of absmax, in three steps: the sum (f64, one block, fixed
// order), subtracting the mean, and the 8-bit blockwise code (warp per block).
extern "C" __global__ void absmax_sum(const float* x, long long n, double* sum) {
    __shared__ double sh[32];
    double s = 0.0;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) s += (double)x[i];
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0.0;
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) t += sh[w];
        sum[0] = t;
    }
}

extern "C" __global__ void quant_dyn8(const float* x, const double* sum, long long n, int bs,
                                      const float* code, u8_t* q, float* absmax, float* offset_out) {
    __shared__ float c[256];
    for (int i = threadIdx.x; i < 256; i += blockDim.x) c[i] = code[i];
    __syncthreads();
    float offset = (float)(sum[0] / (double)n);
    long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (warp == 0 && lane == 0) offset_out[0] = offset;
    long long nblocks = (n + bs - 1) / bs;
    if (warp >= nblocks) return;
    long long lo = warp * bs, hi = min(lo + bs, n);
    float m = -3.402823466e38f;
    for (long long i = lo + lane; i < hi; i += 32) m = fmaxf(m, fabsf(__fsub_rn(x[i], offset)));
    m = warp_max(m);
    if (lane == 0) absmax[warp] = m;
    float inv = rcp_approx(m);
    for (long long i = lo + lane; i < hi; i += 32) q[i] = dyn_encode(c, __fmul_rn(__fsub_rn(x[i], offset), inv));
}
