// Rotary position embedding (rotate-half convention) on x [T, H, Dh]:
// for i < Dh/2, a = pos[t] * inv_freq[i]:
//   y[i]      = x[i] cos a - x[i+Dh/2] sin a
//   y[i+Dh/2] = x[i+Dh/2] cos a + x[i] sin a
// sign = -1 rotates by -a (the backward). One thread per (t, i), looping heads,
// so each angle's sincos is computed once per token.
template <typename E>
__device__ void rope_body(const typename E::T* x, const int* pos, const float* inv_freq,
                          typename E::T* y, long long T, int H, int Dh, float sign) {
    int half = Dh / 2;
    GRID_STRIDE(item, 0, T * half) {
        long long t = item / half;
        int i = (int)(item % half);
        float s, c;
        sincosf((float)pos[t] * inv_freq[i], &s, &c);
        s *= sign;
        long long base = t * (long long)H * Dh + i;
#pragma unroll 4
        for (int h = 0; h < H; ++h) {
            long long o = base + (long long)h * Dh;
            float a = E::load(x, o), b = E::load(x, o + half);
            E::store(y, o, a * c - b * s);
            E::store(y, o + half, b * c + a * s);
        }
    }
}
#define ROPE(n_, E)                                                                           \
    extern "C" __global__ void rope_##n_(const E::T* x, const int* pos, const float* inv_freq, \
                                         E::T* y, long long T, int H, int Dh, float sign) {   \
        rope_body<E>(x, pos, inv_freq, y, T, H, Dh, sign);                                    \
    }
FOR_FLOATS(ROPE)
