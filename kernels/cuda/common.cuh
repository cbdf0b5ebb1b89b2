// llmft common device helpers, prepended to every kernel source.
// No CUDA headers are needed: bf16/f16 are carried as raw 16-bit values and
// converted with PTX instructions (or integer code before sm_80), so NVRTC
// compiles without an include path.

// LLMFT_PATH_ARCH: the architecture (as __CUDA_ARCH__, e.g. 700) whose code
// paths the kernels take. The compiler defines it: the device's own
// architecture, or an older one (LLMFT_KERNEL_ARCH) so a newer GPU runs the
// fallbacks of older ones. Fast paths test it, never __CUDA_ARCH__:
//   >= 900  thread-block clusters, vector float reductions
//   >= 800  cp.async, bf16/f16 m16n8k16 MMA, bf16 and f16x2 conversions
//   >= 750  ldmatrix, f16 m16n8k8 MMA
//   >= 700  ld.acquire, __nanosleep
#ifndef LLMFT_PATH_ARCH
#define LLMFT_PATH_ARCH __CUDA_ARCH__
#endif
#if LLMFT_PATH_ARCH > __CUDA_ARCH__
#error "LLMFT_PATH_ARCH is newer than the architecture compiled for"
#endif
typedef unsigned short bf16_t;
typedef unsigned short f16_t;
typedef unsigned char u8_t;
typedef signed char i8_t;
typedef unsigned int u32_t;
typedef unsigned long long u64_t;
#define NEG_INF __int_as_float(0xff800000)
#define POS_INF __int_as_float(0x7f800000)

__device__ __forceinline__ float bf16_to_f32(bf16_t h) {
    return __uint_as_float(((unsigned int)h) << 16);
}
__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
#if LLMFT_PATH_ARCH >= 800
    unsigned short r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
#else
    // Round to nearest even on the bit pattern (exact for subnormals and
    // overflow to infinity); NaN becomes the canonical NaN, as cvt.rn does.
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)0x7fff;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
#endif
}
__device__ __forceinline__ float f16_to_f32(f16_t h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ f16_t f32_to_f16(float f) {
    unsigned short r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}

// Element-type tags so one template serves f32, bf16 and f16 (bf16 and f16 share a C type).
struct F32 { typedef float T; static __device__ __forceinline__ float load(const float* p, long long i) { return p[i]; }
             static __device__ __forceinline__ void store(float* p, long long i, float v) { p[i] = v; } };
struct BF16 { typedef bf16_t T; static __device__ __forceinline__ float load(const bf16_t* p, long long i) { return bf16_to_f32(p[i]); }
              static __device__ __forceinline__ void store(bf16_t* p, long long i, float v) { p[i] = f32_to_bf16(v); } };
struct F16 { typedef f16_t T; static __device__ __forceinline__ float load(const f16_t* p, long long i) { return f16_to_f32(p[i]); }
             static __device__ __forceinline__ void store(f16_t* p, long long i, float v) { p[i] = f32_to_f16(v); } };

// 16-byte vector of elements: 4 f32 or 8 16-bit values.
struct __align__(16) Vec16 { unsigned int w[4]; };
template <typename E> struct VecN { static const int N = 16 / sizeof(typename E::T); };

template <typename E>
__device__ __forceinline__ void unpack(const Vec16& v, float* out) {
    const typename E::T* e = reinterpret_cast<const typename E::T*>(&v);
#pragma unroll
    for (int i = 0; i < VecN<E>::N; ++i) out[i] = E::load(e, i);
}
template <typename E>
__device__ __forceinline__ Vec16 pack(const float* in) {
    Vec16 v;
    typename E::T* e = reinterpret_cast<typename E::T*>(&v);
#pragma unroll
    for (int i = 0; i < VecN<E>::N; ++i) E::store(e, i, in[i]);
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// Block-wide sum; every thread gets the result. `sh` holds at least 32 floats.
__device__ __forceinline__ float block_sum(float v, float* sh) {
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : 0.f;
    return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v, float* sh) {
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : NEG_INF;
    return warp_max(v);
}

// Counter-based random numbers shared with the CPU path (llmft-tensor's rng):
// splitmix64 of (seed, index).
__device__ __forceinline__ u64_t splitmix64(u64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
__device__ __forceinline__ float uniform01(u64_t seed, u64_t idx) {
    u64_t r = splitmix64(seed ^ splitmix64(idx));
    return (float)(r >> 40) * (1.0f / 16777216.0f);
}

// Eight consecutive elements from/to 16-byte aligned memory as f32.
template <typename E>
__device__ __forceinline__ void load8(const typename E::T* p, long long i, float* v) {
    const Vec16* q = reinterpret_cast<const Vec16*>(p + i);
#pragma unroll
    for (int k = 0; k < (int)sizeof(typename E::T) / 2; ++k) unpack<E>(q[k], v + k * VecN<E>::N);
}
template <typename E>
__device__ __forceinline__ void store8(typename E::T* p, long long i, const float* v) {
    Vec16* q = reinterpret_cast<Vec16*>(p + i);
#pragma unroll
    for (int k = 0; k < (int)sizeof(typename E::T) / 2; ++k) q[k] = pack<E>(v + k * VecN<E>::N);
}
__device__ __forceinline__ bool aligned16(const void* p) { return (((u64_t)p) & 15) == 0; }

// Grid-stride helpers: vector part over 8-element chunks, then scalar tail.
#define GRID_STRIDE(i, start, n) \
    for (long long i = (start) + (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (long long)gridDim.x * blockDim.x)

// Instantiate a kernel body template for the three float types.
#define FOR_FLOATS(M) M(f32, F32) M(bf16, BF16) M(f16, F16)

// Multi-tensor ops: a launch covers T tensors cut into chunks of a fixed
// number of elements; `cs` holds T+1 chunk offsets (prefix sums of
// ceil(n_t / chunk)). The tensor owning chunk c is the last t with
// cs[t] <= c (empty tensors own no chunk). Block-uniform.
__device__ __forceinline__ int multi_owner(const u64_t* cs, int T, long long c) {
    int lo = 0, hi = T - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if ((long long)cs[mid] <= c) lo = mid; else hi = mid - 1;
    }
    return lo;
}
