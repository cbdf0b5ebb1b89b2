// AdamW on f32 parameters with f32 moments, in PyTorch's order:
//   g = grad * gscale
//   p *= 1 - lr*wd
//   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
//   p -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
// Optionally writes a bf16 copy of the updated parameters (p16, may be null).
template <typename E>
__device__ void adamw_body(float* p, const typename E::T* grad, float* m, float* v, bf16_t* p16,
                           long long n, float lr, float b1, float b2, float eps, float wd,
                           float bc1, float bc2_sqrt, float gscale) {
    float step = lr / bc1;
    float decay = 1.f - lr * wd;
    GRID_STRIDE(i, 0, n) {
        float g = E::load(grad, i) * gscale;
        float mi = b1 * m[i] + (1.f - b1) * g;
        float vi = b2 * v[i] + (1.f - b2) * g * g;
        float pi = p[i] * decay;
        pi -= step * mi / (sqrtf(vi) / bc2_sqrt + eps);
        m[i] = mi;
        v[i] = vi;
        p[i] = pi;
        if (p16) p16[i] = f32_to_bf16(pi);
    }
}
#define ADAMW(n_, E)                                                                          \
    extern "C" __global__ void adamw_##n_(float* p, const E::T* g, float* m, float* v,         \
                                          bf16_t* p16, long long n, float lr, float b1,       \
                                          float b2, float eps, float wd, float bc1,           \
                                          float bc2_sqrt, float gscale) {                     \
        adamw_body<E>(p, g, m, v, p16, n, lr, b1, b2, eps, wd, bc1, bc2_sqrt, gscale);        \
    }
FOR_FLOATS(ADAMW)
