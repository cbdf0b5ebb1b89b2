// SwiGLU: y = silu(g) * u, silu(g) = g * sigmoid(g).
__device__ __forceinline__ float sigm(float g) { return 1.f / (1.f + expf(-g)); }

template <typename E>
__device__ void swiglu_fwd_body(const typename E::T* g, const typename E::T* u, typename E::T* y,
                                long long n) {
    long long chunks = (aligned16(g) && aligned16(u) && aligned16(y)) ? n / 8 : 0;
    GRID_STRIDE(c, 0, chunks) {
        float a[8], b[8];
        load8<E>(g, c * 8, a);
        load8<E>(u, c * 8, b);
#pragma unroll
        for (int k = 0; k < 8; ++k) a[k] = a[k] * sigm(a[k]) * b[k];
        store8<E>(y, c * 8, a);
    }
    GRID_STRIDE(i, chunks * 8, n) {
        float a = E::load(g, i);
        E::store(y, i, a * sigm(a) * E::load(u, i));
    }
}

// dg = dy * u * s * (1 + g (1 - s)), du = dy * g * s.
template <typename E>
__device__ void swiglu_bwd_body(const typename E::T* dy, const typename E::T* g,
                                const typename E::T* u, typename E::T* dg, typename E::T* du,
                                long long n) {
    long long chunks =
        (aligned16(dy) && aligned16(g) && aligned16(u) && aligned16(dg) && aligned16(du)) ? n / 8 : 0;
    GRID_STRIDE(c, 0, chunks) {
        float d[8], a[8], b[8], og[8], ou[8];
        load8<E>(dy, c * 8, d);
        load8<E>(g, c * 8, a);
        load8<E>(u, c * 8, b);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            float s = sigm(a[k]);
            og[k] = d[k] * b[k] * s * (1.f + a[k] * (1.f - s));
            ou[k] = d[k] * a[k] * s;
        }
        store8<E>(dg, c * 8, og);
        store8<E>(du, c * 8, ou);
    }
    GRID_STRIDE(i, chunks * 8, n) {
        float d = E::load(dy, i), a = E::load(g, i), b = E::load(u, i), s = sigm(a);
        E::store(dg, i, d * b * s * (1.f + a * (1.f - s)));
        E::store(du, i, d * a * s);
    }
}
#define SWIGLU(n_, E)                                                                          \
    extern "C" __global__ void swiglu_fwd_##n_(const E::T* g, const E::T* u, E::T* y,          \
                                               long long n) {                                  \
        swiglu_fwd_body<E>(g, u, y, n);                                                        \
    }                                                                                          \
    extern "C" __global__ void swiglu_bwd_##n_(const E::T* dy, const E::T* g, const E::T* u,   \
                                               E::T* dg, E::T* du, long long n) {              \
        swiglu_bwd_body<E>(dy, g, u, dg, du, n);                                               \
    }
FOR_FLOATS(SWIGLU)
