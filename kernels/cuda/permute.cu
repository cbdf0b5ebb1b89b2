// y[a, c, b, d] = x[a, b, c, d] for x [A, B, C, D]: swaps the two middle axes
// (tokens <-> heads of attention). Each thread moves 8 consecutive d when
// D % 8 == 0 and both pointers are 16-byte aligned.
template <typename E>
__device__ void permute_body(const typename E::T* x, typename E::T* y, long long A, int B, int C,
                             int D) {
    bool vec = (D % 8 == 0) && aligned16(x) && aligned16(y);
    int w = vec ? 8 : 1;
    int dn = D / w;
    long long total = A * B * C * (long long)dn;
    GRID_STRIDE(item, 0, total) {
        int dc = (int)(item % dn);
        long long r = item / dn;
        int c = (int)(r % C);
        r /= C;
        int b = (int)(r % B);
        long long a = r / B;
        long long src = ((a * B + b) * C + c) * (long long)D + (long long)dc * w;
        long long dst = ((a * C + c) * B + b) * (long long)D + (long long)dc * w;
        if (vec) {
            *reinterpret_cast<Vec16*>(y + dst) = *reinterpret_cast<const Vec16*>(x + src);
            if (sizeof(typename E::T) == 4)
                *reinterpret_cast<Vec16*>(y + dst + 4) = *reinterpret_cast<const Vec16*>(x + src + 4);
        } else {
            y[dst] = x[src];
        }
    }
}
#define PERMUTE(n_, E)                                                                      \
    extern "C" __global__ void permute_0213_##n_(const E::T* x, E::T* y, long long A, int B, \
                                                 int C, int D) {                           \
        permute_body<E>(x, y, A, B, C, D);                                                  \
    }
FOR_FLOATS(PERMUTE)
