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

// Multi-tensor sum over T tensors of sum(x^2). `tab` holds T pointers, T
// element counts and T+1 chunk offsets (see multi_owner); a block loops over
// a fixed set of chunks and writes its partial sum to part[blockIdx.x], which
// sum_partials_f32 adds up in a fixed order: the result does not depend on
// block scheduling (training on a GPU stays reproducible run to run).
template <typename E>
__device__ void sumsq_multi_body(const u64_t* tab, int T, long long chunks, long long chunk,
                                 float* part) {
    __shared__ float sh[32];
    const u64_t* cs = tab + 2 * (long long)T;
    float acc = 0.f;
    for (long long c = blockIdx.x; c < chunks; c += gridDim.x) {
        int t = multi_owner(cs, T, c);
        const typename E::T* x = reinterpret_cast<const typename E::T*>(tab[t]);
        long long n = (long long)tab[T + t];
        long long lo = (c - (long long)cs[t]) * chunk;
        long long hi = lo + chunk < n ? lo + chunk : n;
        // chunk is a multiple of 8, so lo keeps x's 16-byte alignment.
        long long vend = aligned16(x) ? lo + (hi - lo) / 8 * 8 : lo;
        for (long long i = lo + 8 * (long long)threadIdx.x; i < vend; i += 8 * (long long)blockDim.x) {
            float v[8];
            load8<E>(x, i, v);
#pragma unroll
            for (int k = 0; k < 8; ++k) acc += v[k] * v[k];
        }
        for (long long i = vend + threadIdx.x; i < hi; i += blockDim.x) {
            float v = E::load(x, i);
            acc += v * v;
        }
    }
    acc = block_sum(acc, sh);
    if (threadIdx.x == 0) part[blockIdx.x] = acc;
}
#define SUMSQ_MULTI(n_, E)                                                                    \
    extern "C" __global__ void sumsq_multi_##n_(const u64_t* tab, int T, long long chunks,      \
                                                long long chunk, float* part) {                 \
        sumsq_multi_body<E>(tab, T, chunks, chunk, part);                                       \
    }
FOR_FLOATS(SUMSQ_MULTI)

// out[0] += part[0] + ... + part[n - 1] in a fixed order (one block).
extern "C" __global__ void sum_partials_f32(const float* part, int n, float* out) {
    __shared__ float sh[32];
    float acc = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) acc += part[i];
    acc = block_sum(acc, sh);
    if (threadIdx.x == 0) out[0] += acc;
}
