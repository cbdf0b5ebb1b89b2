// cast, fill, y = alpha*a + beta*b, y = a*b.

template <typename S, typename D>
__device__ void cast_body(const typename S::T* x, typename D::T* y, long long n) {
    long long chunks = (aligned16(x) && aligned16(y)) ? n / 8 : 0;
    GRID_STRIDE(c, 0, chunks) {
        float v[8];
        load8<S>(x, c * 8, v);
        store8<D>(y, c * 8, v);
    }
    GRID_STRIDE(i, chunks * 8, n) D::store(y, i, S::load(x, i));
}
#define CAST(sn, S, dn, D)                                                                   \
    extern "C" __global__ void cast_##sn##_##dn(const S::T* x, D::T* y, long long n) {       \
        cast_body<S, D>(x, y, n);                                                            \
    }
#define CAST_FROM(sn, S) CAST(sn, S, f32, F32) CAST(sn, S, bf16, BF16) CAST(sn, S, f16, F16)
FOR_FLOATS(CAST_FROM)

template <typename E>
__device__ void fill_body(typename E::T* y, long long n, float value) {
    long long chunks = aligned16(y) ? n / 8 : 0;
    float v[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = value;
    GRID_STRIDE(c, 0, chunks) store8<E>(y, c * 8, v);
    GRID_STRIDE(i, chunks * 8, n) E::store(y, i, value);
}
#define FILL(n_, E) \
    extern "C" __global__ void fill_##n_(E::T* y, long long n, float v) { fill_body<E>(y, n, v); }
FOR_FLOATS(FILL)
extern "C" __global__ void fill_i32(int* y, long long n, int v) { GRID_STRIDE(i, 0, n) y[i] = v; }

// Multi-tensor fill: `tab` holds T pointers, T element counts and T+1 chunk
// offsets (see multi_owner).
template <typename E>
__device__ void fill_multi_body(const u64_t* tab, int T, long long chunks, long long chunk,
                                float value) {
    const u64_t* cs = tab + 2 * (long long)T;
    float v[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = value;
    for (long long c = blockIdx.x; c < chunks; c += gridDim.x) {
        int t = multi_owner(cs, T, c);
        typename E::T* y = reinterpret_cast<typename E::T*>(tab[t]);
        long long n = (long long)tab[T + t];
        long long lo = (c - (long long)cs[t]) * chunk;
        long long hi = lo + chunk < n ? lo + chunk : n;
        long long vend = aligned16(y) ? lo + (hi - lo) / 8 * 8 : lo;
        for (long long i = lo + 8 * (long long)threadIdx.x; i < vend; i += 8 * (long long)blockDim.x)
            store8<E>(y, i, v);
        for (long long i = vend + threadIdx.x; i < hi; i += blockDim.x) E::store(y, i, value);
    }
}
#define FILL_MULTI(n_, E)                                                                     \
    extern "C" __global__ void fill_multi_##n_(const u64_t* tab, int T, long long chunks,       \
                                               long long chunk, float v) {                      \
        fill_multi_body<E>(tab, T, chunks, chunk, v);                                           \
    }
FOR_FLOATS(FILL_MULTI)

// op 0: y = alpha*a + beta*b (beta == 0 ignores b, even NaN); op 1: y = a*b. y may be b (in-place axpby).
template <typename E>
__device__ void binary_body(const typename E::T* a, const typename E::T* b, typename E::T* y,
                            long long n, int op, float alpha, float beta) {
    long long chunks = (aligned16(a) && aligned16(b) && aligned16(y)) ? n / 8 : 0;
    GRID_STRIDE(c, 0, chunks) {
        float va[8], vb[8];
        load8<E>(a, c * 8, va);
        load8<E>(b, c * 8, vb);
#pragma unroll
        for (int k = 0; k < 8; ++k) va[k] = op == 0 ? alpha * va[k] + (beta != 0.f ? beta * vb[k] : 0.f) : va[k] * vb[k];
        store8<E>(y, c * 8, va);
    }
    GRID_STRIDE(i, chunks * 8, n) {
        float va = E::load(a, i), vb = E::load(b, i);
        E::store(y, i, op == 0 ? alpha * va + (beta != 0.f ? beta * vb : 0.f) : va * vb);
    }
}
#define BINARY(n_, E)                                                                         \
    extern "C" __global__ void binary_##n_(const E::T* a, const E::T* b, E::T* y, long long n, \
                                           int op, float alpha, float beta) {                 \
        binary_body<E>(a, b, y, n, op, alpha, beta);                                          \
    }
FOR_FLOATS(BINARY)
