// Cross-entropy rows over f32 logits [rows, V] (one chunk of tokens of the
// fused LM-head loss). Per row: loss = logsumexp(l) - l[label]; with grads,
// dlogits = (softmax(l) - onehot(label)) * inv_norm written as E (may be the
// logits buffer itself when E is f32). Rows whose label is `ignore` get loss 0
// and zero gradient. One block per row.
template <typename E>
__device__ void ce_body(const float* logits, const int* labels, float* loss,
                        typename E::T* dlogits, int V, int ignore, float inv_norm) {
    __shared__ float sh[32];
    long long row = blockIdx.x;
    const float* l = logits + row * V;
    int label = labels[row];
    bool skip = label == ignore || label < 0 || label >= V;
    float mx = NEG_INF;
    for (int j = threadIdx.x; j < V; j += blockDim.x) mx = fmaxf(mx, l[j]);
    mx = block_max(mx, sh);
    float sum = 0.f;
    for (int j = threadIdx.x; j < V; j += blockDim.x) sum += expf(l[j] - mx);
    sum = block_sum(sum, sh);
    if (threadIdx.x == 0) loss[row] = skip ? 0.f : logf(sum) + mx - l[label];
    if (dlogits) {
        typename E::T* g = dlogits + row * V;
        float inv = 1.f / sum;
        __syncthreads();
        for (int j = threadIdx.x; j < V; j += blockDim.x) {
            float v = skip ? 0.f : (expf(l[j] - mx) * inv - (j == label ? 1.f : 0.f)) * inv_norm;
            E::store(g, j, v);
        }
    }
}
#define CE(n_, E)                                                                            \
    extern "C" __global__ void cross_entropy_##n_(const float* logits, const int* labels,     \
                                                  float* loss, E::T* dlogits, int V,          \
                                                  int ignore, float inv_norm) {               \
        ce_body<E>(logits, labels, loss, dlogits, V, ignore, inv_norm);                       \
    }
FOR_FLOATS(CE)
