// RMSNorm over the last dimension D: y = x * rstd * w, rstd = 1/sqrt(mean(x^2) + eps).
// Rows of up to RMS_MAXC * 8 * blockDim elements (16-byte aligned, D % 8 == 0)
// are held in registers, so each input is read from memory once.
#define RMS_MAXC 4
// The backward holds two inputs per element: fewer chunks per thread keep
// registers low and more rows in flight per SM.
#define RMS_BWD_MAXC 2

template <typename E>
__device__ void rmsnorm_fwd_body(const typename E::T* x, const typename E::T* w,
                                 typename E::T* y, float* rstd, int D, float eps) {
    __shared__ float sh[32];
    long long row = blockIdx.x;
    const typename E::T* xr = x + row * D;
    typename E::T* yr = y + row * D;
    bool vec = (D % 8 == 0) && aligned16(xr) && aligned16(w) && aligned16(yr);
    int nc = D / 8;
    if (vec && nc <= RMS_MAXC * (int)blockDim.x) {
        float v[RMS_MAXC][8];
        float acc = 0.f;
#pragma unroll
        for (int k = 0; k < RMS_MAXC; ++k) {
            int c = threadIdx.x + k * blockDim.x;
            if (c < nc) {
                load8<E>(xr, c * 8, v[k]);
#pragma unroll
                for (int j = 0; j < 8; ++j) acc += v[k][j] * v[k][j];
            }
        }
        acc = block_sum(acc, sh);
        float rr = rsqrtf(acc / (float)D + eps);
        if (threadIdx.x == 0) rstd[row] = rr;
#pragma unroll
        for (int k = 0; k < RMS_MAXC; ++k) {
            int c = threadIdx.x + k * blockDim.x;
            if (c < nc) {
                float g[8];
                load8<E>(w, c * 8, g);
#pragma unroll
                for (int j = 0; j < 8; ++j) v[k][j] = v[k][j] * rr * g[j];
                store8<E>(yr, c * 8, v[k]);
            }
        }
        return;
    }
    float ss = 0.f;
    if (vec) {
        for (int c = threadIdx.x; c < D / 8; c += blockDim.x) {
            float v[8];
            load8<E>(xr, c * 8, v);
#pragma unroll
            for (int k = 0; k < 8; ++k) ss += v[k] * v[k];
        }
    } else {
        for (int i = threadIdx.x; i < D; i += blockDim.x) {
            float v = E::load(xr, i);
            ss += v * v;
        }
    }
    ss = block_sum(ss, sh);
    float r = rsqrtf(ss / (float)D + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    if (vec) {
        for (int c = threadIdx.x; c < D / 8; c += blockDim.x) {
            float v[8], g[8];
            load8<E>(xr, c * 8, v);
            load8<E>(w, c * 8, g);
#pragma unroll
            for (int k = 0; k < 8; ++k) v[k] = v[k] * r * g[k];
            store8<E>(yr, c * 8, v);
        }
    } else {
        for (int i = threadIdx.x; i < D; i += blockDim.x)
            E::store(yr, i, E::load(xr, i) * r * E::load(w, i));
    }
}

// dx = r*dy*w - x * r^3 * sum(dy*w*x) / D;  dw += sum_rows dy * x * r (f32, optional).
// Each block walks rows blockIdx.x, +gridDim.x, ...; dw partials live in
// dynamic shared memory (D floats) when dw is requested.
template <typename E>
__device__ void rmsnorm_bwd_body(const typename E::T* dy, const typename E::T* x,
                                 const typename E::T* w, const float* rstd, typename E::T* dx,
                                 float* dw, long long N, int D) {
    extern __shared__ float dw_sh[];
    __shared__ float sh[32];
    if (dw)
        for (int i = threadIdx.x; i < D; i += blockDim.x) dw_sh[i] = 0.f;

    for (long long row = blockIdx.x; row < N; row += gridDim.x) {
        const typename E::T* dyr = dy + row * D;
        const typename E::T* xr = x + row * D;
        typename E::T* dxr = dx + row * D;
        float r = rstd[row];
        bool vec = (D % 8 == 0) && aligned16(dyr) && aligned16(xr) && aligned16(w) && aligned16(dxr);
        int nc = D / 8;
        if (vec && nc <= RMS_BWD_MAXC * (int)blockDim.x) {
            float a[RMS_BWD_MAXC][8], b[RMS_BWD_MAXC][8];
            float acc = 0.f;
#pragma unroll
            for (int k = 0; k < RMS_BWD_MAXC; ++k) {
                int c = threadIdx.x + k * blockDim.x;
                if (c < nc) {
                    float g[8];
                    load8<E>(dyr, c * 8, a[k]);
                    load8<E>(xr, c * 8, b[k]);
                    load8<E>(w, c * 8, g);
#pragma unroll
                    for (int j = 0; j < 8; ++j) acc += a[k][j] * g[j] * b[k][j];
                }
            }
            acc = block_sum(acc, sh);
            float k3 = r * r * r * acc / (float)D;
#pragma unroll
            for (int k = 0; k < RMS_BWD_MAXC; ++k) {
                int c = threadIdx.x + k * blockDim.x;
                if (c < nc) {
                    float g[8], o[8];
                    load8<E>(w, c * 8, g);
#pragma unroll
                    for (int j = 0; j < 8; ++j) {
                        o[j] = r * a[k][j] * g[j] - b[k][j] * k3;
                        if (dw) dw_sh[c * 8 + j] += a[k][j] * b[k][j] * r;
                    }
                    store8<E>(dxr, c * 8, o);
                }
            }
            continue;
        }
        float dot = 0.f;
        if (vec) {
            for (int c = threadIdx.x; c < D / 8; c += blockDim.x) {
                float a[8], b[8], g[8];
                load8<E>(dyr, c * 8, a);
                load8<E>(xr, c * 8, b);
                load8<E>(w, c * 8, g);
#pragma unroll
                for (int k = 0; k < 8; ++k) dot += a[k] * g[k] * b[k];
            }
        } else {
            for (int i = threadIdx.x; i < D; i += blockDim.x)
                dot += E::load(dyr, i) * E::load(w, i) * E::load(xr, i);
        }
        dot = block_sum(dot, sh);
        float c3 = r * r * r * dot / (float)D;
        if (vec) {
            for (int c = threadIdx.x; c < D / 8; c += blockDim.x) {
                float a[8], b[8], g[8], o[8];
                load8<E>(dyr, c * 8, a);
                load8<E>(xr, c * 8, b);
                load8<E>(w, c * 8, g);
#pragma unroll
                for (int k = 0; k < 8; ++k) {
                    o[k] = r * a[k] * g[k] - b[k] * c3;
                    if (dw) dw_sh[c * 8 + k] += a[k] * b[k] * r;
                }
                store8<E>(dxr, c * 8, o);
            }
        } else {
            for (int i = threadIdx.x; i < D; i += blockDim.x) {
                float a = E::load(dyr, i), b = E::load(xr, i);
                E::store(dxr, i, r * a * E::load(w, i) - b * c3);
                if (dw) dw_sh[i] += a * b * r;
            }
        }
    }
    if (dw) {
        __syncthreads();
        for (int i = threadIdx.x; i < D; i += blockDim.x) atomicAdd(dw + i, dw_sh[i]);
    }
}

#define RMSNORM(n_, E)                                                                         \
    extern "C" __global__ void rmsnorm_fwd_##n_(const E::T* x, const E::T* w, E::T* y,         \
                                                float* rstd, int D, float eps) {               \
        rmsnorm_fwd_body<E>(x, w, y, rstd, D, eps);                                            \
    }                                                                                          \
    extern "C" __global__ void rmsnorm_bwd_##n_(const E::T* dy, const E::T* x, const E::T* w,  \
                                                const float* rstd, E::T* dx, float* dw,        \
                                                long long N, int D) {                          \
        rmsnorm_bwd_body<E>(dy, x, w, rstd, dx, dw, N, D);                                     \
    }
FOR_FLOATS(RMSNORM)
