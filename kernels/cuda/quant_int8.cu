// bitsandbytes' vector-wise int8 (LLM.int8): one absmax per row (SCB),
// q = round(x * (127 * rcp_approx(absmax))) as bnb's fast division, so bytes match;
// values at or above a positive threshold are outliers: left out of the
// absmax, stored as 0, and their columns flagged.

template <typename E>
__device__ void quant_int8_body(const typename E::T* x, i8_t* q, float* scb, u8_t* outlier_cols,
                                long long cols, float threshold) {
    __shared__ float sh[32];
    long long r = blockIdx.x;
    const typename E::T* row = x + r * cols;
    bool sparse = threshold > 0.0f;
    float m = -1.17549435e-38f;
    for (long long c = threadIdx.x; c < cols; c += blockDim.x) {
        float a = fabsf(E::load(row, c));
        if (sparse && a >= threshold) outlier_cols[c] = 1;
        else m = fmaxf(m, a);
    }
    m = block_max(m, sh);
    if (threadIdx.x == 0) scb[r] = m;
    float rcp;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(rcp) : "f"(m));
    float scale = __fmul_rn(127.0f, rcp);  // bnb's __fdividef(127, m)
    for (long long c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = E::load(row, c);
        q[r * cols + c] = (sparse && fabsf(v) >= threshold) ? 0 : (i8_t)__float2int_rn(__fmul_rn(v, scale));
    }
}

// Zeroes flagged outlier columns in every row (bnb does so for matrices of
// more than one row).
extern "C" __global__ void int8_zero_cols(i8_t* q, const u8_t* outlier_cols, long long rows, long long cols) {
    GRID_STRIDE(i, 0, rows * cols) {
        if (outlier_cols[i % cols]) q[i] = 0;
    }
}

// (q * scb[row]) * (1/127), as bnb's int8_vectorwise_dequant, 16 values a thread.
template <typename E>
__device__ void dequant_int8_body(const i8_t* q, const float* scb, typename E::T* out, long long cols,
                                  long long n) {
    const float inv127 = 7.874015718698502e-3f;
    long long chunks = (aligned16(out) && aligned16(q) && cols % 16 == 0) ? n / 16 : 0;
    GRID_STRIDE(c, 0, chunks) {
        float s = scb[(c * 16) / cols];
        Vec16 w = *reinterpret_cast<const Vec16*>(q + c * 16);
        const i8_t* b = reinterpret_cast<const i8_t*>(&w);
        float v[16];
#pragma unroll
        for (int k = 0; k < 16; ++k) v[k] = __fmul_rn(__fmul_rn((float)b[k], s), inv127);
        store8<E>(out, c * 16, v);
        store8<E>(out, c * 16 + 8, v + 8);
    }
    GRID_STRIDE(i, chunks * 16, n) {
        E::store(out, i, __fmul_rn(__fmul_rn((float)q[i], scb[i / cols]), inv127));
    }
}

#define INT8(n_, E)                                                                               \
    extern "C" __global__ void quant_int8_##n_(const E::T* x, i8_t* q, float* scb, u8_t* oc,       \
                                               long long cols, float threshold) {                 \
        quant_int8_body<E>(x, q, scb, oc, cols, threshold);                                        \
    }                                                                                             \
    extern "C" __global__ void dequant_int8_##n_(const i8_t* q, const float* scb, E::T* out,       \
                                                 long long cols, long long n) {                    \
        dequant_int8_body<E>(q, scb, out, cols, n);                                                \
    }
FOR_FLOATS(INT8)
