// Seeded counter-based random numbers: element i of a tensor filled with seed
// s uses uniform01(s, i) (and uniform01(s, n + i) for the second normal draw),
// identical to the CPU path.
template <typename E>
__device__ void uniform_body(typename E::T* y, long long n, u64_t seed, float lo, float hi) {
    GRID_STRIDE(i, 0, n) E::store(y, i, lo + (hi - lo) * uniform01(seed, (u64_t)i));
}
template <typename E>
__device__ void normal_body(typename E::T* y, long long n, u64_t seed, float mean, float std) {
    GRID_STRIDE(i, 0, n) {
        float u1 = fmaxf(uniform01(seed, (u64_t)i), 5.9604645e-8f);
        float u2 = uniform01(seed, (u64_t)(n + i));
        float z = sqrtf(-2.f * logf(u1)) * cosf(6.2831853071795864f * u2);
        E::store(y, i, mean + std * z);
    }
}
// Inverted dropout: keep where uniform >= p, scaled by 1/(1-p).
template <typename E>
__device__ void dropout_body(const typename E::T* x, typename E::T* y, long long n, u64_t seed,
                             float p) {
    float scale = 1.f / (1.f - p);
    GRID_STRIDE(i, 0, n)
    E::store(y, i, uniform01(seed, (u64_t)i) >= p ? E::load(x, i) * scale : 0.f);
}
#define RNG(n_, E)                                                                          \
    extern "C" __global__ void uniform_##n_(E::T* y, long long n, u64_t seed, float lo,      \
                                            float hi) {                                     \
        uniform_body<E>(y, n, seed, lo, hi);                                                \
    }                                                                                       \
    extern "C" __global__ void normal_##n_(E::T* y, long long n, u64_t seed, float mean,     \
                                           float std) {                                     \
        normal_body<E>(y, n, seed, mean, std);                                              \
    }                                                                                       \
    extern "C" __global__ void dropout_##n_(const E::T* x, E::T* y, long long n, u64_t seed, \
                                            float p) {                                      \
        dropout_body<E>(x, y, n, seed, p);                                                  \
    }
FOR_FLOATS(RNG)
