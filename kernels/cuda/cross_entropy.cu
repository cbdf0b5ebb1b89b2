// Cross-entropy rows over f32 logits [rows, V] (one chunk of tokens of the
// fused LM-head loss). Per row: loss = logsumexp(l) - l[label]; with grads,
// dlogits = (softmax(l) - onehot(label)) * inv_norm written as E (may be the
// logits buffer itself when E is f32). Rows whose label is `ignore` get loss 0
// and zero gradient. f32 throughout.
//
// Two kernels:
// - cross_entropy_cl<K>_<E> (sm_90): a cluster of CE_CL blocks per row, each
//   holding its slice of the row in registers (K float4 per thread), so the
//   logits are read once and the gradient written once. Each block reduces
//   (max, sum exp) of its slice; the partials are combined through
//   distributed shared memory. Needs V % 4 == 0, 16-byte aligned logits,
//   aligned gradient rows and V <= CE_CL * CE_T * 4 * K.
// - cross_entropy_<E> (any arch, any V): one block per row, an online
//   (max, sum exp) pass then a gradient pass, over 16-byte loads where the
//   rows are aligned.

#define CE_T 512

// (m, s) <- the online-softmax merge of (m, s) and (m2, s2): s relative to m.
__device__ __forceinline__ void ce_merge(float& m, float& s, float m2, float s2) {
    float mn = fmaxf(m, m2);
    if (mn == NEG_INF) return;  // both empty (or all -inf)
    s = (m == NEG_INF ? 0.f : s * expf(m - mn)) + (m2 == NEG_INF ? 0.f : s2 * expf(m2 - mn));
    m = mn;
}

// Four consecutive elements from f32 to E at p + i (i a multiple of 4; the
// destination 4·sizeof(T)-aligned).
template <typename E>
__device__ __forceinline__ void ce_store4(typename E::T* p, long long i, const float* v) {
    struct alignas(4 * sizeof(typename E::T)) P4 { typename E::T e[4]; };
    P4 pk;
#pragma unroll
    for (int c = 0; c < 4; ++c) E::store(pk.e, c, v[c]);
    *reinterpret_cast<P4*>(p + i) = pk;
}

template <typename E>
__device__ void ce_body(const float* logits, const int* labels, float* loss,
                        typename E::T* dlogits, int V, int ignore, float inv_norm) {
    __shared__ float sh[32];
    long long row = blockIdx.x;
    const float* l = logits + row * V;
    typename E::T* g = dlogits ? dlogits + row * V : nullptr;
    int label = labels[row];
    bool skip = label == ignore || label < 0 || label >= V;
    // Vector path where the row (and the gradient row) are 16-byte / 4-element aligned.
    bool vec = (V & 3) == 0 && aligned16(logits) &&
               (!dlogits || ((u64_t)dlogits & (4 * sizeof(typename E::T) - 1)) == 0);
    int nv = vec ? V >> 2 : 0;
    const float4* l4 = reinterpret_cast<const float4*>(l);
    float mx = NEG_INF, s = 0.f;
    for (int j = threadIdx.x; j < nv; j += blockDim.x) {
        float4 x = l4[j];
        float m4 = fmaxf(fmaxf(x.x, x.y), fmaxf(x.z, x.w));
        if (m4 > mx) {
            s = mx == NEG_INF ? 0.f : s * expf(mx - m4);
            mx = m4;
        }
        if (mx != NEG_INF)
            s += expf(x.x - mx) + expf(x.y - mx) + expf(x.z - mx) + expf(x.w - mx);
    }
    for (int j = 4 * nv + threadIdx.x; j < V; j += blockDim.x) {
        float x = l[j];
        if (x > mx) {
            s = mx == NEG_INF ? 0.f : s * expf(mx - x);
            mx = x;
        }
        if (mx != NEG_INF) s += expf(x - mx);
    }
    float row_mx = block_max(mx, sh);
    float sum = block_sum(mx == NEG_INF ? 0.f : s * expf(mx - row_mx), sh);
    if (threadIdx.x == 0) loss[row] = skip ? 0.f : logf(sum) + row_mx - l[label];
    if (g) {
        float inv = 1.f / sum;
        // The label logit above is read before any thread overwrites it.
        __syncthreads();
        for (int j = threadIdx.x; j < nv; j += blockDim.x) {
            float4 x = l4[j];
            float v[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                int jj = 4 * j + c;
                v[c] = skip ? 0.f
                            : (expf(v[c] - row_mx) * inv - (jj == label ? 1.f : 0.f)) * inv_norm;
            }
            ce_store4<E>(g, 4 * (long long)j, v);
        }
        for (int j = 4 * nv + threadIdx.x; j < V; j += blockDim.x) {
            float v = skip ? 0.f : (expf(l[j] - row_mx) * inv - (j == label ? 1.f : 0.f)) * inv_norm;
            E::store(g, j, v);
        }
    }
}
#define CE(n_, E)                                                                            \
    extern "C" __global__ void __launch_bounds__(CE_T)                                       \
        cross_entropy_##n_(const float* logits, const int* labels, float* loss, E::T* dlogits, \
                           int V, int ignore, float inv_norm) {                              \
        ce_body<E>(logits, labels, loss, dlogits, V, ignore, inv_norm);                       \
    }
FOR_FLOATS(CE)

#if LLMFT_PATH_ARCH >= 900
#define CE_CL 8

__device__ __forceinline__ void ce_cluster_arrive() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void ce_cluster_wait() {
    asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
// The float2 at shared address `p` (of this block) in the block of cluster rank `rank`.
__device__ __forceinline__ float2 ce_ld_cluster(const float2* p, unsigned rank) {
    unsigned a = (unsigned)__cvta_generic_to_shared(p), ra;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(ra) : "r"(a), "r"(rank));
    float2 v;
    asm volatile("ld.shared::cluster.v2.f32 {%0, %1}, [%2];\n"
                 : "=f"(v.x), "=f"(v.y)
                 : "r"(ra)
                 : "memory");
    return v;
}

template <typename E, int K>
__device__ __forceinline__ void ce_cluster_body(const float* logits, const int* labels,
                                                float* loss, typename E::T* dlogits, int V,
                                                int ignore, float inv_norm) {
    __shared__ float sh[32];
    __shared__ float2 part;
    // 1-D clusters of CE_CL consecutive blocks: the rank is blockIdx.x % CE_CL.
    const int rank = blockIdx.x % CE_CL;
    const long long row = blockIdx.x / CE_CL;
    const int nv = V >> 2;
    const int seg = (nv + CE_CL - 1) / CE_CL;
    const int beg = rank * seg, end = min(beg + seg, nv);
    const float4* l4 = reinterpret_cast<const float4*>(logits + row * V);
    const int label = labels[row];
    const bool skip = label == ignore || label < 0 || label >= V;
    // Read before the cluster barrier, so before any block overwrites it (E = f32 in place).
    float lab_logit = 0.f;
    if (rank == 0 && threadIdx.x == 0 && !skip) lab_logit = logits[row * V + label];

    float4 x[K];
    float mx = NEG_INF;
#pragma unroll
    for (int k = 0; k < K; ++k) {
        int j = beg + threadIdx.x + k * CE_T;
        if (j < end) {
            x[k] = l4[j];
            mx = fmaxf(mx, fmaxf(fmaxf(x[k].x, x[k].y), fmaxf(x[k].z, x[k].w)));
        }
    }
    mx = block_max(mx, sh);
    // exp relative to the block's max, kept in x; an empty (or all -inf) slice adds 0.
    const bool live = mx != NEG_INF;
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
        int j = beg + threadIdx.x + k * CE_T;
        if (j < end) {
            x[k].x = live ? expf(x[k].x - mx) : 0.f;
            x[k].y = live ? expf(x[k].y - mx) : 0.f;
            x[k].z = live ? expf(x[k].z - mx) : 0.f;
            x[k].w = live ? expf(x[k].w - mx) : 0.f;
            s += (x[k].x + x[k].y) + (x[k].z + x[k].w);
        }
    }
    s = block_sum(s, sh);
    if (threadIdx.x == 0) part = make_float2(mx, s);
    ce_cluster_arrive();
    ce_cluster_wait();
    // Every warp combines the CE_CL partials of the row.
    const int lane = threadIdx.x & 31;
    float2 pv = make_float2(NEG_INF, 0.f);
    if (lane < CE_CL) pv = ce_ld_cluster(&part, (unsigned)lane);
    const float row_mx = warp_max(pv.x);
    const float sum = warp_sum(pv.x == NEG_INF ? 0.f : pv.y * expf(pv.x - row_mx));
    // Done with the other blocks' shared memory; none may exit before all are.
    ce_cluster_arrive();
    if (rank == 0 && threadIdx.x == 0) loss[row] = skip ? 0.f : logf(sum) + row_mx - lab_logit;
    if (dlogits) {
        typename E::T* g = dlogits + row * V;
        // softmax = exp(l - mx) * exp(mx - row_mx) / sum.
        const float f = live ? expf(mx - row_mx) / sum : 0.f;
#pragma unroll
        for (int k = 0; k < K; ++k) {
            int j = beg + threadIdx.x + k * CE_T;
            if (j < end) {
                float v[4] = {x[k].x, x[k].y, x[k].z, x[k].w};
#pragma unroll
                for (int c = 0; c < 4; ++c)
                    v[c] = skip ? 0.f : (v[c] * f - (4 * j + c == label ? 1.f : 0.f)) * inv_norm;
                ce_store4<E>(g, 4 * (long long)j, v);
            }
        }
    }
    ce_cluster_wait();
}

#define CE_CLK(n_, E, K, MINB)                                                               \
    extern "C" __global__ void __cluster_dims__(CE_CL, 1, 1) __launch_bounds__(CE_T, MINB)   \
        cross_entropy_cl##K##_##n_(const float* logits, const int* labels, float* loss,      \
                                   E::T* dlogits, int V, int ignore, float inv_norm) {       \
        ce_cluster_body<E, K>(logits, labels, loss, dlogits, V, ignore, inv_norm);            \
    }
#define CE_CL_ALL(n_, E)                                                                     \
    CE_CLK(n_, E, 1, 2) CE_CLK(n_, E, 2, 2) CE_CLK(n_, E, 4, 2) CE_CLK(n_, E, 8, 2)            \
        CE_CLK(n_, E, 16, 1)
FOR_FLOATS(CE_CL_ALL)
#endif
