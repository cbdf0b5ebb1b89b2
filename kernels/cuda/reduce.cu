// out[0] += sum(x^2): per-block partial sums, one atomic per block.
template <typename E>
__device__ void sumsq_body(const typename E::T* x, long long n, float* out) {
    __shared__ float sh[32];
    long long chunks = aligned16(x) ? n / 8 : 0;
    float acc = 0.f;
    GRID_STRIDE(c, 0, chunks) {
        float v[8];
        load8<E>(x, c * 8, v);
#pragma unroll
        for (int k = 0; k < 8; ++k) acc += v[k] * v[k];
    }
    GRID_STRIDE(i, chunks * 8, n) {
        float v = E::load(x, i);
        acc += v * v;
    }
    acc = block_sum(acc, sh);
    if (threadIdx.x == 0) atomicAdd(out, acc);
}
#define SUMSQ(n_, E) \
    extern "C" __global__ void sumsq_##n_(const E::T* x, long long n, float* out) { sumsq_body<E>(x, n, out); }
FOR_FLOATS(SUMSQ)
