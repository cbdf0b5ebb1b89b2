// Embedding gather y[n, :] = table[ids[n], :] and its backward, a scatter-add
// into an f32 gradient table. Ids outside [0, V) produce zero rows (forward)
// and are skipped (backward); the CPU path reports them as errors.
template <typename E>
__device__ void embedding_fwd_body(const int* ids, const typename E::T* table, typename E::T* y,
                                   long long N, int D, int V) {
    GRID_STRIDE(item, 0, N * D) {
        long long n = item / D;
        int d = (int)(item % D);
        int id = ids[n];
        E::store(y, item, (id >= 0 && id < V) ? E::load(table, (long long)id * D + d) : 0.f);
    }
}
template <typename E>
__device__ void embedding_bwd_body(const int* ids, const typename E::T* dy, float* dtable,
                                   long long N, int D, int V) {
    GRID_STRIDE(item, 0, N * D) {
        long long n = item / D;
        int d = (int)(item % D);
        int id = ids[n];
        if (id >= 0 && id < V) atomicAdd(dtable + (long long)id * D + d, E::load(dy, item));
    }
}
#define EMBEDDING(n_, E)                                                                       \
    extern "C" __global__ void embedding_fwd_##n_(const int* ids, const E::T* table, E::T* y,  \
                                                  long long N, int D, int V) {                 \
        embedding_fwd_body<E>(ids, table, y, N, D, V);                                         \
    }                                                                                          \
    extern "C" __global__ void embedding_bwd_##n_(const int* ids, const E::T* dy, float* dt,   \
                                                  long long N, int D, int V) {                 \
        embedding_bwd_body<E>(ids, dy, dt, N, D, V);                                           \
    }
FOR_FLOATS(EMBEDDING)
