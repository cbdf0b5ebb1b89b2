// Causal softmax over attention scores s [B, H, Tq, Tk] (queries are the last
// Tq of Tk positions). Key j is visible to query q (position qp = q + Tk - Tq)
// when j <= qp and, with segment ids seg [B, Tk], seg[j] == seg[qp] (packed
// sequences never attend across examples). p = softmax(scale * s) over the
// visible keys; masked entries are written as 0. One block per row; rows of
// up to SOFTMAX_REG elements per thread are held in registers (read once),
// longer ones are re-read from memory.
#define SOFTMAX_REG 16
template <typename E>
__device__ void softmax_fwd_body(const typename E::T* s, const int* seg, typename E::T* p,
                                 int H, int Tq, int Tk, float scale) {
    __shared__ float sh[32];
    long long row = blockIdx.x;
    int q = (int)(row % Tq);
    long long b = row / Tq / H;
    int qp = q + Tk - Tq;
    const typename E::T* sr = s + row * Tk;
    typename E::T* pr = p + row * Tk;
    const int* sg = seg ? seg + b * Tk : 0;
    int my = sg ? sg[qp] : 0;
    if (Tk <= blockDim.x * SOFTMAX_REG) {
        // The row in registers: every visible score is read once.
        float v[SOFTMAX_REG];
        unsigned vis = 0;
        float mx = NEG_INF;
#pragma unroll
        for (int k = 0; k < SOFTMAX_REG; ++k) {
            int j = threadIdx.x + k * blockDim.x;
            v[k] = 0.f;
            if (j <= qp && (!sg || sg[j] == my)) {
                v[k] = scale * E::load(sr, j);
                vis |= 1u << k;
                mx = fmaxf(mx, v[k]);
            }
        }
        mx = block_max(mx, sh);
        float sum = 0.f;
#pragma unroll
        for (int k = 0; k < SOFTMAX_REG; ++k) {
            v[k] = (vis >> k & 1u) ? expf(v[k] - mx) : 0.f;
            sum += v[k];
        }
        sum = block_sum(sum, sh);
        float inv = 1.f / sum;
#pragma unroll
        for (int k = 0; k < SOFTMAX_REG; ++k) {
            int j = threadIdx.x + k * blockDim.x;
            if (j < Tk) E::store(pr, j, (vis >> k & 1u) ? v[k] * inv : 0.f);
        }
        return;
    }
    float mx = NEG_INF;
    for (int j = threadIdx.x; j <= qp; j += blockDim.x)
        if (!sg || sg[j] == my) mx = fmaxf(mx, scale * E::load(sr, j));
    mx = block_max(mx, sh);
    float sum = 0.f;
    for (int j = threadIdx.x; j <= qp; j += blockDim.x)
        if (!sg || sg[j] == my) sum += expf(scale * E::load(sr, j) - mx);
    sum = block_sum(sum, sh);
    float inv = 1.f / sum;
    for (int j = threadIdx.x; j < Tk; j += blockDim.x) {
        bool vis = j <= qp && (!sg || sg[j] == my);
        E::store(pr, j, vis ? expf(scale * E::load(sr, j) - mx) * inv : 0.f);
    }
}

// ds = scale * p * (dp - sum_j p*dp); masked entries have p = 0 so ds = 0.
template <typename E>
__device__ void softmax_bwd_body(const typename E::T* p, const typename E::T* dp,
                                 typename E::T* ds, int Tk, float scale) {
    __shared__ float sh[32];
    long long row = blockIdx.x;
    const typename E::T* pr = p + row * Tk;
    const typename E::T* dpr = dp + row * Tk;
    typename E::T* dsr = ds + row * Tk;
    if (Tk <= blockDim.x * SOFTMAX_REG) {
        // p and dp in registers: each read once.
        float pv[SOFTMAX_REG], dv[SOFTMAX_REG];
        float dot = 0.f;
#pragma unroll
        for (int k = 0; k < SOFTMAX_REG; ++k) {
            int j = threadIdx.x + k * blockDim.x;
            pv[k] = j < Tk ? E::load(pr, j) : 0.f;
            dv[k] = j < Tk ? E::load(dpr, j) : 0.f;
            dot += pv[k] * dv[k];
        }
        dot = block_sum(dot, sh);
#pragma unroll
        for (int k = 0; k < SOFTMAX_REG; ++k) {
            int j = threadIdx.x + k * blockDim.x;
            if (j < Tk) E::store(dsr, j, scale * pv[k] * (dv[k] - dot));
        }
        return;
    }
    float dot = 0.f;
    for (int j = threadIdx.x; j < Tk; j += blockDim.x) dot += E::load(pr, j) * E::load(dpr, j);
    dot = block_sum(dot, sh);
    for (int j = threadIdx.x; j < Tk; j += blockDim.x)
        E::store(dsr, j, scale * E::load(pr, j) * (E::load(dpr, j) - dot));
}
#define SOFTMAX(n_, E)                                                                        \
    extern "C" __global__ void softmax_causal_fwd_##n_(const E::T* s, const int* seg, E::T* p, \
                                                       int H, int Tq, int Tk, float scale) {  \
        softmax_fwd_body<E>(s, seg, p, H, Tq, Tk, scale);                                     \
    }                                                                                         \
    extern "C" __global__ void softmax_causal_bwd_##n_(const E::T* p, const E::T* dp,         \
                                                       E::T* ds, int Tk, float scale) {       \
        softmax_bwd_body<E>(p, dp, ds, Tk, scale);                                            \
    }
FOR_FLOATS(SOFTMAX)
