// AdamW on f32 parameters with f32 moments, in PyTorch's order:
//   g = grad * gscale
//   p *= 1 - lr*wd
//   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
//   p -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
// Optionally writes a bf16 copy of the updated parameters (p16, may be null).
// One element of the update (shared by the single- and multi-tensor kernels
// so both round identically); returns the new parameter.
__device__ __forceinline__ float adamw_elem(float* p, float graw, float* m, float* v, long long i,
                                            float b1, float b2, float eps, float bc2_sqrt,
                                            float gscale, float step, float decay) {
    // Explicitly rounded operations (no contraction into FMAs), so the
    // update is bit-identical to the host's (CPU reference, CpuAdamW of
    // optimizer offload).
    float g = __fmul_rn(graw, gscale);
    float mi = __fadd_rn(__fmul_rn(b1, m[i]), __fmul_rn(1.f - b1, g));
    float vi = __fadd_rn(__fmul_rn(b2, v[i]), __fmul_rn(__fmul_rn(1.f - b2, g), g));
    float pi = __fmul_rn(p[i], decay);
    pi = __fsub_rn(pi, __fdiv_rn(__fmul_rn(step, mi), __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bc2_sqrt), eps)));
    m[i] = mi;
    v[i] = vi;
    p[i] = pi;
    return pi;
}
template <typename E>
__device__ void adamw_body(float* p, const typename E::T* grad, float* m, float* v, bf16_t* p16,
                           long long n, float lr, float b1, float b2, float eps, float wd,
                           float bc1, float bc2_sqrt, float gscale) {
    float step = __fdiv_rn(lr, bc1);
    float decay = __fsub_rn(1.f, __fmul_rn(lr, wd));
    GRID_STRIDE(i, 0, n) {
        float pi = adamw_elem(p, E::load(grad, i), m, v, i, b1, b2, eps, bc2_sqrt, gscale, step, decay);
        if (p16) p16[i] = f32_to_bf16(pi);
    }
}
#define ADAMW(n_, E)                                                                          \
    extern "C" __global__ void adamw_##n_(float* p, const E::T* g, float* m, float* v,         \
                                          bf16_t* p16, long long n, float lr, float b1,       \
                                          float b2, float eps, float wd, float bc1,           \
                                          float bc2_sqrt, float gscale) {                     \
        adamw_body<E>(p, g, m, v, p16, n, lr, b1, b2, eps, wd, bc1, bc2_sqrt, gscale);        \
    }
FOR_FLOATS(ADAMW)

// Multi-tensor AdamW: T (param, grad, moments) tuples with the same
// hyper-parameters in one launch. `tab` holds five arrays of T u64 (param,
// grad, m, v pointers, element counts) followed by T+1 chunk offsets (see
// multi_owner). With `zero`, the gradient is set to 0 after it is read.
template <typename E>
__device__ void adamw_multi_body(const u64_t* tab, int T, long long chunks, long long chunk,
                                 int zero, float lr, float b1, float b2, float eps, float wd,
                                 float bc1, float bc2_sqrt, float gscale) {
    float step = __fdiv_rn(lr, bc1);
    float decay = __fsub_rn(1.f, __fmul_rn(lr, wd));
    const u64_t* cs = tab + 5 * (long long)T;
    for (long long c = blockIdx.x; c < chunks; c += gridDim.x) {
        int t = multi_owner(cs, T, c);
        float* p = reinterpret_cast<float*>(tab[t]);
        typename E::T* g = reinterpret_cast<typename E::T*>(tab[T + t]);
        float* m = reinterpret_cast<float*>(tab[2 * T + t]);
        float* v = reinterpret_cast<float*>(tab[3 * T + t]);
        long long n = (long long)tab[4 * T + t];
        long long lo = (c - (long long)cs[t]) * chunk;
        long long hi = lo + chunk < n ? lo + chunk : n;
        for (long long i = lo + threadIdx.x; i < hi; i += blockDim.x) {
            adamw_elem(p, E::load(g, i), m, v, i, b1, b2, eps, bc2_sqrt, gscale, step, decay);
            if (zero) E::store(g, i, 0.f);
        }
    }
}
#define ADAMW_MULTI(n_, E)                                                                    \
    extern "C" __global__ void adamw_multi_##n_(const u64_t* tab, int T, long long chunks,      \
                                                long long chunk, int zero, float lr, float b1,  \
                                                float b2, float eps, float wd, float bc1,       \
                                                float bc2_sqrt, float gscale) {                 \
        adamw_multi_body<E>(tab, T, chunks, chunk, zero, lr, b1, b2, eps, wd, bc1, bc2_sqrt,    \
                            gscale);                                                            \
    }
FOR_FLOATS(ADAMW_MULTI)
