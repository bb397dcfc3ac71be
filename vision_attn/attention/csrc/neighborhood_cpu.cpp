// Fused exact (dilated) neighborhood attention on CPU: forward and backward with the relative
// position bias, float32 and float64, plain C ABI (loaded with ctypes; built by
// vision_attn/attention/fused.py).
//
// Semantics, per axis of length L, kernel k, dilation d: position i is in group g = i % d at group
// coordinate j = i / d; the group has Lg = ceil((L - g) / d) positions and its window starts at
// s = clamp(j - k/2, 0, Lg - k): taps t = 0..k-1 are keys at group coordinates s + t, and the bias
// is indexed by the offset s + t - j. Exactly k*k keys per query: no halo.
//
// Layouts (all contiguous); BH = batch * heads, head of row bh = bh % heads.
//   q, k, v, out, dout, dq, dk, dv: (BH, H, W, D)      qt, kt, vt, gt: (BH, H, D, W) copies
//   probs, ds: (BH, H, K2, W), K2 = ky * kx             lse, glse: (BH, H, W)
//   bias, dbias: (heads, Sy, Sx), centred at ((Sy-1)/2, (Sx-1)/2)
//
// Work is vectorised over bands of VL consecutive queries of a row whose windows are centred on them
// (interior columns, any dilation): tap t of query x+i is then column x+i + d (t - r), consecutive
// across the band, so every product is a vertical vector operation on the (D, W) copies, with no
// horizontal sums. Borders at least half a band wide (d r >= 8 floats) take clamped bands: a clamped
// window is the window of the nearest interior query, so their keys fit one load per tap, permuted
// per lane. Narrower borders take a per-query path on the (W, D) layout. Backward: pass 1
// per query (ds, dq, bias gradient), pass 2 per key over its inverse neighbourhood (dk, dv): no
// scatter, no atomics. Rows are split over torch's OpenMP threads.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

template <class T>
constexpr int VL = 64 / sizeof(T);  // queries per band: one 512-bit vector (two 256-bit ones on AVX2)

struct Axis {
  int L, k, step, r;
  std::vector<int> kstart, boff;           // per query: index of tap 0, bias offset of tap 0
  std::vector<int> qrun, krun;             // banded runs: sliding queries / regular keys from here
  std::vector<int> inv_ptr, inv_q, inv_t;  // per key: the queries (and their tap) that see it

  Axis(int L_, int k_, int d)
      : L(L_), k(k_), step(d), r(k_ / 2), kstart(L_), boff(L_), qrun(L_ + 1, 0), krun(L_ + 1, 0),
        inv_ptr(L_ + 1, 0) {
    for (int g = 0; g < d; ++g) {
      const int Lg = (L - g + d - 1) / d;
      for (int j = 0; j < Lg; ++j) {
        const int s = std::min(std::max(j - r, 0), Lg - k);
        kstart[g + d * j] = g + d * s;
        boff[g + d * j] = s - j;
      }
    }
    for (int i = 0; i < L; ++i)
      for (int t = 0; t < k; ++t) ++inv_ptr[kstart[i] + step * t + 1];
    for (int m = 0; m < L; ++m) inv_ptr[m + 1] += inv_ptr[m];
    inv_q.resize(inv_ptr[L]);
    inv_t.resize(inv_ptr[L]);
    std::vector<int> fill(inv_ptr.begin(), inv_ptr.end() - 1);
    for (int i = 0; i < L; ++i)
      for (int t = 0; t < k; ++t) {
        const int m = kstart[i] + step * t;
        inv_q[fill[m]] = i;
        inv_t[fill[m]++] = t;
      }
    // A sliding query i: its window is centred on it, taps i + d * (t - r) (bias offset -r). A
    // regular key m: seen by exactly the sliding queries m + d * (r - t), through tap t. VL
    // consecutive sliding queries (or regular keys) form a band: their taps are consecutive too.
    std::vector<char> sliding(L), regular(L);
    for (int i = 0; i < L; ++i) sliding[i] = kstart[i] == i - d * r && boff[i] == -r;
    for (int m = 0; m < L; ++m) {
      bool ok = inv_ptr[m + 1] - inv_ptr[m] == k;
      for (int a = inv_ptr[m]; ok && a < inv_ptr[m + 1]; ++a)
        ok = inv_q[a] == m + d * (r - inv_t[a]) && sliding[inv_q[a]];
      regular[m] = ok;
    }
    for (int i = L - 1; i >= 0; --i) {
      qrun[i] = sliding[i] ? qrun[i + 1] + 1 : 0;
      krun[i] = regular[i] ? krun[i + 1] + 1 : 0;
    }
  }
};

// Rows split into `threads` contiguous chunks, f(begin, end, chunk). OpenMP: the .so links the
// libgomp that torch has loaded, so the kernel shares torch's thread pool (its own threads would
// compete with torch's spinning workers on a small machine).
template <class F>
void parallel_for(int64_t n, int threads, F f) {
  threads = (int)std::max<int64_t>(1, std::min<int64_t>(threads, n));
  const int64_t step = (n + threads - 1) / threads;
  if (threads == 1) {
    f(0, n, 0);
    return;
  }
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int t = 0; t < threads; ++t) {
    const int64_t a = t * step, b = std::min(n, a + step);
    if (a < b) f(a, b, t);
  }
}

// D is a compile-time constant for the common head dims (loops unroll and vectorise), else 0.
template <class T, int D>
inline T dot(const T* __restrict a, const T* __restrict b, int d) {
  T acc = 0;
  const int n = D > 0 ? D : d;
#pragma omp simd reduction(+ : acc)
  for (int c = 0; c < n; ++c) acc += a[c] * b[c];
  return acc;
}

template <class T, int D>
inline void axpy(T alpha, const T* __restrict x, T* __restrict y, int d) {
  const int n = D > 0 ? D : d;
#pragma omp simd
  for (int c = 0; c < n; ++c) y[c] += alpha * x[c];
}

// A row of D accumulators: a local array for the compile-time head dims (kept in registers), else heap.
template <class T, int D>
struct Acc {
  alignas(64) T v[D > 0 ? D : 1];
  explicit Acc(int) {
    for (int c = 0; c < D; ++c) v[c] = 0;
  }
  T* data() { return v; }
};
template <class T>
struct Acc<T, 0> {
  std::vector<T> v;
  explicit Acc(int d) : v(d, T(0)) {}
  T* data() { return v.data(); }
};

inline double exp_nonpositive(double x) { return std::exp(x); }

// exp(x) for x <= 0 on a vector of floats: Cephes' expf polynomial (about 1 ulp) on explicit
// vectors (a fully unrolled 16-lane loop of the scalar polynomial does not vectorise).
typedef float vfloat __attribute__((vector_size(64)));
typedef int32_t vint __attribute__((vector_size(64)));
static_assert(sizeof(vfloat) == VL<float> * sizeof(float), "one band of floats is one vector");

inline vfloat exp_nonpositive(vfloat x) {
  x = x < -87.0f ? vfloat{} - 87.0f : x;
  const vfloat y = x * 1.44269504088896341f + 0.5f;
  const vfloat t = __builtin_convertvector(__builtin_convertvector(y, vint), vfloat);  // trunc(y)
  const vfloat n = t + __builtin_convertvector(y < t, vfloat);                          // floor(y)
  const vfloat r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vfloat p = vfloat{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * (vfloat)((__builtin_convertvector(n, vint) + 127) << 23);
}

inline float exp_nonpositive(float x) { return exp_nonpositive(vfloat{} + x)[0]; }

// band[t][i] = exp(band[t][i] - mx[i]) and sum[i] += it over the VL lanes (doubles: std::exp).
inline void band_exp(float* band, const float* mx, float* sum, int rows) {
  vfloat m, s = {};
  std::memcpy(&m, mx, sizeof m);
  for (int t = 0; t < rows; ++t) {
    vfloat e;
    std::memcpy(&e, band + t * VL<float>, sizeof e);
    e = exp_nonpositive(e - m);
    std::memcpy(band + t * VL<float>, &e, sizeof e);
    s += e;
  }
  std::memcpy(sum, &s, sizeof s);
}

inline void band_exp(double* band, const double* mx, double* sum, int rows) {
  for (int t = 0; t < rows; ++t)
    for (int i = 0; i < VL<double>; ++i) {
      double& s = band[t * VL<double> + i];
      sum[i] += (s = std::exp(s - mx[i]));
    }
}

struct Problem {
  int BH, heads, H, W, D, ky, kx, K2, Sy, Sx;
  double scale;
  int threads;
  Axis ay, ax;
  Problem(int BH_, int heads_, int H_, int W_, int D_, int ky_, int dy_, int kx_, int dx_, int Sy_, int Sx_,
          double scale_, int threads_)
      : BH(BH_), heads(heads_), H(H_), W(W_), D(D_), ky(ky_), kx(kx_), K2(ky_ * kx_), Sy(Sy_), Sx(Sx_),
        scale(scale_), threads(threads_), ay(H_, ky_, dy_), ax(W_, kx_, dx_) {}
  int64_t row(int bh, int y) const { return (int64_t)bh * H + y; }
  int64_t pos(int bh, int y, int x) const { return row(bh, y) * W + x; }
  int key_row(int y, int ty) const { return ay.kstart[y] + ay.step * ty; }
  int key_col(int x, int tx) const { return ax.kstart[x] + ax.step * tx; }
  int bias_row(int y, int ty) const { return (ay.boff[y] + ty + (Sy - 1) / 2) * Sx + (Sx - 1) / 2; }
  int bias_at(int y, int x, int ty, int tx) const { return bias_row(y, ty) + ax.boff[x] + tx; }
  // probs / ds: (BH, H, K2, W)
  int64_t tap(int bh, int y, int t, int x) const { return (row(bh, y) * K2 + t) * W + x; }
};

// ------------------------------------------------------------------------------------------- bands

// One band of lanes as an explicit vector (the compiler splits it where vectors are narrower).
template <class T>
struct V {
  typedef T type __attribute__((vector_size(64)));
};
template <class T>
using vec = typename V<T>::type;

template <class T>
inline vec<T> load(const T* p) {
  vec<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <class T>
inline void store(T* p, vec<T> v) {
  std::memcpy(p, &v, sizeof v);
}

template <class T>
struct IV;
template <>
struct IV<float> {
  typedef int32_t type __attribute__((vector_size(64)));
};
template <>
struct IV<double> {
  typedef int64_t type __attribute__((vector_size(64)));
};
template <class T>
using ivec = typename IV<T>::type;

// A band of VL queries over a border (x = 0 or W - VL). Their windows are clamped, so their keys are
// not consecutive, but a clamped window is the window of the nearest interior query: for tap tx
// lane i's key is column start[tx] + perm[tx][i], all within one vector load, permuted. Bias
// offsets are per lane; only lanes [lo, hi) count in the bias gradient (the others belong to
// another band or are recomputed identically).
template <class T>
struct Clamp {
  int x, lo, hi;
  std::vector<int> start;
  std::vector<ivec<T>> perm;
  int boff[VL<T>];
};

// The clamped band at x (VL columns) covering [lo, hi), or false if one load cannot hold its keys.
template <class T>
bool make_clamp(const Axis& a, int kx, int x, int lo, int hi, Clamp<T>& b) {
  b.x = x, b.lo = lo, b.hi = hi;
  for (int i = 0; i < VL<T>; ++i) b.boff[i] = a.boff[x + i];
  for (int tx = 0; tx < kx; ++tx) {
    int lo_col = a.L, hi_col = -1;
    for (int i = 0; i < VL<T>; ++i) {
      lo_col = std::min(lo_col, a.kstart[x + i] + a.step * tx);
      hi_col = std::max(hi_col, a.kstart[x + i] + a.step * tx);
    }
    const int start = std::min(lo_col, a.L - VL<T>);
    if (hi_col - start >= VL<T>) return false;
    ivec<T> perm;
    for (int i = 0; i < VL<T>; ++i) perm[i] = a.kstart[x + i] + a.step * tx - start;
    b.start.push_back(start);
    b.perm.push_back(perm);
  }
  return true;
}

// band[t][i] = a(query x+i of row y) . b(its key t) for the VL sliding queries x..x+VL-1, from the
// (D, W) copies: vertical products only. Taps are taken N at a time, so that N accumulators run
// side by side (a single chain of D dependent FMAs would wait on each one's latency).
// Tap j of a group: its key columns for the band (interior: consecutive from `col`; clamped: one
// load from start[j], permuted).
template <class T, bool Clamped>
inline vec<T> keys_at(const T* row, int col, const Clamp<T>* cl, int tx) {
  if constexpr (Clamped)
    return __builtin_shuffle(load(row + cl->start[tx]), cl->perm[tx]);
  else
    return load(row + col);
}

template <class T, int D, int N, bool Clamped>
inline void band_dots_group(const T* arow, const T* brow, int W, int col, int step, const Clamp<T>* cl, int tx0,
                            T* band) {
  vec<T> acc[N] = {};
  for (int c = 0; c < D; ++c) {
    const vec<T> a = load(arow + c * W);
    for (int j = 0; j < N; ++j) acc[j] += a * keys_at<T, Clamped>(brow + c * W, col + j * step, cl, tx0 + j);
  }
  for (int j = 0; j < N; ++j) store(band + j * VL<T>, acc[j]);
}

template <class T, int D, bool Clamped>
void band_dots(const Problem& P, const T* at, const T* bt, int bh, int y, int x, const Clamp<T>* cl, T* band) {
  const int W = P.W, st = P.ax.step;
  const T* arow = at + P.row(bh, y) * D * W + x;
  for (int ty = 0; ty < P.ky; ++ty) {
    const T* brow = bt + P.row(bh, P.key_row(y, ty)) * D * W;
    T* o = band + ty * P.kx * VL<T>;
    const int col = P.ax.kstart[x];
    int tx = 0;
    for (; tx + 4 <= P.kx; tx += 4)
      band_dots_group<T, D, 4, Clamped>(arow, brow, W, col + tx * st, st, cl, tx, o + tx * VL<T>);
    switch (P.kx - tx) {
      case 3: band_dots_group<T, D, 3, Clamped>(arow, brow, W, col + tx * st, st, cl, tx, o + tx * VL<T>); break;
      case 2: band_dots_group<T, D, 2, Clamped>(arow, brow, W, col + tx * st, st, cl, tx, o + tx * VL<T>); break;
      case 1: band_dots_group<T, D, 1, Clamped>(arow, brow, W, col + tx * st, st, cl, tx, o + tx * VL<T>); break;
      default: break;
    }
  }
}

// Channels per block in the combining loops: each tap's weights are loaded once per block of CB
// channels, and CB accumulators run side by side (load- and latency-bound otherwise). D % CB == 0.
constexpr int CB = 8;

// Write a block of CB channels (lanes = queries or keys x..x+VL-1) to the (W, D) layout.
template <class T, int D>
inline void store_block(const vec<T>* acc, T alpha, T* o) {
  for (int j = 0; j < CB; ++j) {
    const vec<T> a = alpha * acc[j];
    for (int i = 0; i < VL<T>; ++i) o[i * D + j] = a[i];
  }
}

// out(query x+i)[c] = alpha * sum_t w[t][i] * b(key t)[c] for the band at x, to the (W, D) layout.
template <class T, int D, bool Clamped>
void band_combine(const Problem& P, const T* w, const T* bt, int bh, int y, int x, const Clamp<T>* cl, T alpha,
                  T* out) {
  const int W = P.W, col = P.ax.kstart[x];
  T* o = out + P.pos(bh, y, x) * D;
  for (int c0 = 0; c0 < D; c0 += CB) {
    vec<T> acc[CB] = {};
    for (int ty = 0; ty < P.ky; ++ty) {
      const T* brow = bt + (P.row(bh, P.key_row(y, ty)) * D + c0) * W;
      for (int tx = 0; tx < P.kx; ++tx) {
        const vec<T> wt = load(w + (ty * P.kx + tx) * VL<T>);
        for (int j = 0; j < CB; ++j)
          acc[j] += wt * keys_at<T, Clamped>(brow + j * W, col + tx * P.ax.step, cl, tx);
      }
    }
    store_block<T, D>(acc, alpha, o + c0);
  }
}

// --------------------------------------------------------------------------------------- forward

template <class T, int D, bool Clamped>
void forward_band(const Problem& P, const T* qt, const T* kt, const T* vt, const T* bias, int bh, int y, int x,
                  const Clamp<T>* cl, T* band, T* out, T* probs, T* lse) {
  band_dots<T, D, Clamped>(P, qt, kt, bh, y, x, cl, band);
  T mx[VL<T>], sum[VL<T>];
  for (int i = 0; i < VL<T>; ++i) mx[i] = -INFINITY, sum[i] = 0;
  for (int ty = 0; ty < P.ky; ++ty)
    for (int tx = 0; tx < P.kx; ++tx) {
      T* s = band + (ty * P.kx + tx) * VL<T>;
      T b[VL<T>];  // one offset for an interior band, per lane for a clamped one
      if constexpr (Clamped) {
        for (int i = 0; i < VL<T>; ++i) b[i] = bias ? bias[P.bias_row(y, ty) + cl->boff[i] + tx] : T(0);
      } else {
        const T b0 = bias ? bias[P.bias_at(y, x, ty, tx)] : T(0);
        for (int i = 0; i < VL<T>; ++i) b[i] = b0;
      }
#pragma omp simd
      for (int i = 0; i < VL<T>; ++i) {
        s[i] = (T)P.scale * s[i] + b[i];
        mx[i] = std::max(mx[i], s[i]);
      }
    }
  band_exp(band, mx, sum, P.K2);
  for (int i = 0; i < VL<T>; ++i) {
    if (lse) lse[P.pos(bh, y, x + i)] = mx[i] + std::log(sum[i]);
    sum[i] = T(1) / sum[i];
  }
  for (int t = 0; t < P.K2; ++t) {
    T* s = band + t * VL<T>;
    T* p = probs + P.tap(bh, y, t, x);
#pragma omp simd
    for (int i = 0; i < VL<T>; ++i) p[i] = (s[i] *= sum[i]);
  }
  band_combine<T, D, Clamped>(P, band, vt, bh, y, x, cl, T(1), out);
}

template <class T, int D>
void forward_query(const Problem& P, const T* q, const T* k, const T* v, const T* bias, int bh, int y, int x,
                   T* s, T* out, T* probs, T* lse) {
  const int d = P.D;
  const T* qp = q + P.pos(bh, y, x) * d;
  T mx = -INFINITY;
  for (int ty = 0; ty < P.ky; ++ty)
    for (int tx = 0; tx < P.kx; ++tx) {
      const int t = ty * P.kx + tx;
      s[t] = (T)P.scale * dot<T, D>(qp, k + P.pos(bh, P.key_row(y, ty), P.key_col(x, tx)) * d, d);
      if (bias) s[t] += bias[P.bias_at(y, x, ty, tx)];
      mx = std::max(mx, s[t]);
    }
  T sum = 0;
  for (int t = 0; t < P.K2; ++t) sum += (s[t] = exp_nonpositive(s[t] - mx));
  if (lse) lse[P.pos(bh, y, x)] = mx + std::log(sum);
  Acc<T, D> acc(d);
  for (int ty = 0; ty < P.ky; ++ty)
    for (int tx = 0; tx < P.kx; ++tx) {
      const int t = ty * P.kx + tx;
      s[t] /= sum;
      probs[P.tap(bh, y, t, x)] = s[t];
      axpy<T, D>(s[t], v + P.pos(bh, P.key_row(y, ty), P.key_col(x, tx)) * d, acc.data(), d);
    }
  std::memcpy(out + P.pos(bh, y, x) * d, acc.data(), sizeof(T) * d);
}

// ------------------------------------------------------------------------------ backward, pass 1

// ds = p * (dout . v - delta), delta = dout . out - glse; dq = scale * sum_t ds k; bias gradient.
template <class T, int D, bool Clamped>
void grad_query_band(const Problem& P, const T* kt, const T* vt, const T* out, const T* dout, const T* gt,
                     const T* glse, const T* probs, int bh, int y, int x, int fresh, const Clamp<T>* cl, T* band,
                     T* ds, T* dq, double* dbias) {
  const int d = P.D;
  band_dots<T, D, Clamped>(P, gt, vt, bh, y, x, cl, band);
  T delta[VL<T>];
  for (int i = 0; i < VL<T>; ++i) {
    const int64_t qi = P.pos(bh, y, x + i);
    delta[i] = dot<T, D>(dout + qi * d, out + qi * d, d) - (glse ? glse[qi] : T(0));
  }
  for (int ty = 0; ty < P.ky; ++ty)
    for (int tx = 0; tx < P.kx; ++tx) {
      const int t = ty * P.kx + tx;
      T* s = band + t * VL<T>;
      const T* p = probs + P.tap(bh, y, t, x);
      T* o = ds + P.tap(bh, y, t, x);
      T total = 0;
#pragma omp simd reduction(+ : total)
      for (int i = 0; i < VL<T>; ++i) {
        s[i] = p[i] * (s[i] - delta[i]);
        o[i] = s[i];
        total += i >= fresh ? s[i] : T(0);
      }
      if (!dbias) continue;
      if (Clamped)
        for (int i = cl->lo; i < cl->hi; ++i) dbias[P.bias_row(y, ty) + cl->boff[i] + tx] += s[i];
      else
        dbias[P.bias_at(y, x, ty, tx)] += total;
    }
  band_combine<T, D, Clamped>(P, band, kt, bh, y, x, cl, (T)P.scale, dq);
}

template <class T, int D>
void grad_query(const Problem& P, const T* k, const T* v, const T* out, const T* dout, const T* glse,
                const T* probs, int bh, int y, int x, T* ds, T* dq, double* dbias) {
  const int d = P.D;
  const int64_t qi = P.pos(bh, y, x);
  const T* g = dout + qi * d;
  const T delta = dot<T, D>(g, out + qi * d, d) - (glse ? glse[qi] : T(0));
  Acc<T, D> acc(d);
  for (int ty = 0; ty < P.ky; ++ty)
    for (int tx = 0; tx < P.kx; ++tx) {
      const int t = ty * P.kx + tx;
      const int64_t ki = P.pos(bh, P.key_row(y, ty), P.key_col(x, tx));
      const int64_t ti = P.tap(bh, y, t, x);
      const T st = probs[ti] * (dot<T, D>(g, v + ki * d, d) - delta);
      ds[ti] = st;
      axpy<T, D>(st, k + ki * d, acc.data(), d);
      if (dbias) dbias[P.bias_at(y, x, ty, tx)] += st;
    }
  T* o = dq + qi * d;
  for (int c = 0; c < d; ++c) o[c] = (T)P.scale * acc.data()[c];
}

// ------------------------------------------------------------------------------ backward, pass 2

// dk = scale * sum ds q and dv = sum p dout over the queries that see each key. A band of VL
// regular keys m..: through tap (ty, tx) they are seen by the VL consecutive queries m + d (r - tx)...
template <class T, int D>
void grad_key_band(const Problem& P, const T* qt, const T* gt, const T* probs, const T* ds, int bh, int my, int m,
                   T* dk, T* dv) {
  const int W = P.W, st = P.ax.step, reach = st * P.ax.r;
  for (int c0 = 0; c0 < D; c0 += CB) {
    vec<T> acc_k[CB] = {}, acc_v[CB] = {};
    for (int a = P.ay.inv_ptr[my]; a < P.ay.inv_ptr[my + 1]; ++a) {
      const int qy = P.ay.inv_q[a], ty = P.ay.inv_t[a];
      const T* qv = qt + (P.row(bh, qy) * D + c0) * W + m + reach;
      const T* gv = gt + (P.row(bh, qy) * D + c0) * W + m + reach;
      const int64_t t0 = P.tap(bh, qy, ty * P.kx, m + reach);
      for (int tx = 0; tx < P.kx; ++tx) {
        const int64_t ti = t0 + (int64_t)tx * W - tx * st;  // tap (ty, tx) of query m + d (r - tx)
        const vec<T> s = load(ds + ti), p = load(probs + ti);
        for (int j = 0; j < CB; ++j) {
          acc_k[j] += s * load(qv + j * W - tx * st);
          acc_v[j] += p * load(gv + j * W - tx * st);
        }
      }
    }
    store_block<T, D>(acc_k, (T)P.scale, dk + P.pos(bh, my, m) * D + c0);
    store_block<T, D>(acc_v, T(1), dv + P.pos(bh, my, m) * D + c0);
  }
}

template <class T, int D>
void grad_key(const Problem& P, const T* q, const T* dout, const T* probs, const T* ds, int bh, int my, int mx,
              T* dk, T* dv) {
  const int d = P.D;
  Acc<T, D> acc_k(d), acc_v(d);
  for (int a = P.ay.inv_ptr[my]; a < P.ay.inv_ptr[my + 1]; ++a) {
    const int qy = P.ay.inv_q[a], ty = P.ay.inv_t[a];
    for (int b = P.ax.inv_ptr[mx]; b < P.ax.inv_ptr[mx + 1]; ++b) {
      const int qx = P.ax.inv_q[b];
      const int64_t qi = P.pos(bh, qy, qx), ti = P.tap(bh, qy, ty * P.kx + P.ax.inv_t[b], qx);
      axpy<T, D>(ds[ti], q + qi * d, acc_k.data(), d);
      axpy<T, D>(probs[ti], dout + qi * d, acc_v.data(), d);
    }
  }
  const int64_t ki = P.pos(bh, my, mx);
  for (int c = 0; c < d; ++c) {
    dk[ki * d + c] = (T)P.scale * acc_k.data()[c];
    dv[ki * d + c] = acc_v.data()[c];
  }
}

// ----------------------------------------------------------------------------------- row drivers

// A row's work: bands of VL columns where runs allow them (compile-time D and the transposed copies
// given), else single columns. A run's remainder of at least VL/3 columns takes one more band that
// overlaps the previous one; its first `fresh` lanes were already done (values are recomputed
// identically; only the bias gradient, a sum, skips them).
struct Item {
  int x, fresh;
  bool band;
};

inline std::vector<Item> schedule(const std::vector<int>& run, int L, int lanes, bool bands) {
  std::vector<Item> items;
  for (int x = 0; x < L;) {
    if (!bands || run[x] < lanes) {
      items.push_back({x++, 0, false});
      continue;
    }
    const int end = x + run[x];
    for (; x + lanes <= end; x += lanes) items.push_back({x, 0, true});
    if (3 * (end - x) >= lanes) {
      items.push_back({end - lanes, lanes - (end - x), true});
      x = end;
    }
    for (; x < end; ++x) items.push_back({x, 0, false});
  }
  return items;
}

// Clamped bands for the borders of a query row at least VL/2 columns wide (d r >= 8 for floats: a
// narrower border costs less one query at a time): a band at 0 and one at W - VL; the single
// columns they cover leave `items`.
template <class T>
std::vector<Clamp<T>> border_bands(const Axis& a, int kx, std::vector<Item>& items) {
  std::vector<Clamp<T>> clamps;
  if (a.L < VL<T>) return clamps;
  int begin = 0, end = a.L;
  while (begin < a.L && !a.qrun[begin]) ++begin;
  while (end > begin && !a.qrun[end - 1]) --end;
  const int left_hi = std::min(begin, VL<T>), right_lo = std::max(end, a.L - VL<T>);
  Clamp<T> b;
  if (2 * left_hi >= VL<T> && make_clamp<T>(a, kx, 0, 0, left_hi, b)) clamps.push_back(b);
  b = Clamp<T>();
  if (2 * (a.L - right_lo) >= VL<T> && make_clamp<T>(a, kx, a.L - VL<T>, right_lo - (a.L - VL<T>), VL<T>, b))
    clamps.push_back(b);
  auto covered = [&](int x) {
    for (const Clamp<T>& c : clamps)
      if (x >= c.x + c.lo && x < c.x + c.hi) return true;
    return false;
  };
  items.erase(std::remove_if(items.begin(), items.end(), [&](const Item& it) { return !it.band && covered(it.x); }),
              items.end());
  return clamps;
}

template <class T, int D>
struct Forward {
  static void run(const Problem& P, const T* q, const T* k, const T* v, const T* qt, const T* kt, const T* vt,
                  const T* bias, T* out, T* probs, T* lse) {
    parallel_for((int64_t)P.BH * P.H, P.threads, [&](int64_t r0, int64_t r1, int) {
      std::vector<T> buf(P.K2 * VL<T>);
      std::vector<Item> items = schedule(P.ax.qrun, P.W, VL<T>, D > 0 && qt);
      const std::vector<Clamp<T>> clamps = D > 0 && qt ? border_bands<T>(P.ax, P.kx, items) : std::vector<Clamp<T>>{};
      for (int64_t r = r0; r < r1; ++r) {
        const int bh = (int)(r / P.H), y = (int)(r % P.H);
        const T* b = bias ? bias + (int64_t)(bh % P.heads) * P.Sy * P.Sx : nullptr;
        for (const Item& it : items)
          if (it.band)
            forward_band<T, D, false>(P, qt, kt, vt, b, bh, y, it.x, nullptr, buf.data(), out, probs, lse);
          else
            forward_query<T, D>(P, q, k, v, b, bh, y, it.x, buf.data(), out, probs, lse);
        for (const Clamp<T>& cl : clamps)
          forward_band<T, D, true>(P, qt, kt, vt, b, bh, y, cl.x, &cl, buf.data(), out, probs, lse);
      }
    });
  }
};

template <class T, int D>
struct Backward {
  static void run(const Problem& P, const T* q, const T* k, const T* v, const T* qt, const T* kt, const T* vt,
                  const T* out, const T* dout, const T* gt, const T* glse, const T* probs, T* ds, T* dq, T* dk,
                  T* dv, T* dbias) {
    const int64_t rows = (int64_t)P.BH * P.H, nb = (int64_t)P.heads * P.Sy * P.Sx;
    const int threads = (int)std::max<int64_t>(1, std::min<int64_t>(P.threads, rows));
    std::vector<double> acc(dbias ? threads * nb : 0, 0.0);  // per-thread bias gradient, summed in order
    parallel_for(rows, threads, [&](int64_t r0, int64_t r1, int th) {
      std::vector<T> buf(P.K2 * VL<T>);
      std::vector<Item> items = schedule(P.ax.qrun, P.W, VL<T>, D > 0 && gt);
      const std::vector<Clamp<T>> clamps = D > 0 && gt ? border_bands<T>(P.ax, P.kx, items) : std::vector<Clamp<T>>{};
      for (int64_t r = r0; r < r1; ++r) {
        const int bh = (int)(r / P.H), y = (int)(r % P.H);
        double* db = dbias ? acc.data() + th * nb + (int64_t)(bh % P.heads) * P.Sy * P.Sx : nullptr;
        for (const Item& it : items)
          if (it.band)
            grad_query_band<T, D, false>(P, kt, vt, out, dout, gt, glse, probs, bh, y, it.x, it.fresh, nullptr,
                                         buf.data(), ds, dq, db);
          else
            grad_query<T, D>(P, k, v, out, dout, glse, probs, bh, y, it.x, ds, dq, db);
        for (const Clamp<T>& cl : clamps)
          grad_query_band<T, D, true>(P, kt, vt, out, dout, gt, glse, probs, bh, y, cl.x, 0, &cl, buf.data(), ds, dq,
                                      db);
      }
    });
    if (dbias)
      for (int64_t i = 0; i < nb; ++i) {
        double s = 0.0;
        for (int t = 0; t < threads; ++t) s += acc[t * nb + i];
        dbias[i] = (T)s;
      }
    parallel_for(rows, threads, [&](int64_t r0, int64_t r1, int) {
      const std::vector<Item> items = schedule(P.ax.krun, P.W, VL<T>, D > 0 && qt);
      for (int64_t r = r0; r < r1; ++r) {
        const int bh = (int)(r / P.H), my = (int)(r % P.H);
        for (const Item& it : items)
          if (it.band)
            grad_key_band<T, D>(P, qt, gt, probs, ds, bh, my, it.x, dk, dv);
          else
            grad_key<T, D>(P, q, dout, probs, ds, bh, my, it.x, dk, dv);
      }
    });
  }
};

template <class T, template <class, int> class Fn, class... Args>
void by_dim(int d, Args&&... args) {
  switch (d) {
    case 16: Fn<T, 16>::run(args...); break;
    case 32: Fn<T, 32>::run(args...); break;
    case 64: Fn<T, 64>::run(args...); break;
    default: Fn<T, 0>::run(args...);
  }
}

}  // namespace

extern "C" {

int va_na_version() { return 4; }

// Columns of an axis (length L, kernel k, dilation d) that bands of `lanes` cover: interior query
// bands (which = 0), key bands (1) or clamped border bands (2). Tests use it to make sure their
// shapes reach each path.
int va_na_banded_columns(int L, int k, int d, int lanes, int which) {
  const Axis a(L, k, d);
  std::vector<Item> items = schedule(which == 1 ? a.krun : a.qrun, L, lanes, true);
  int covered = 0, last = -1;
  if (which == 2) {
    const auto count = [&](const auto& clamps) {
      for (const auto& c : clamps) covered += c.hi - c.lo;
    };
    if (lanes == VL<float>)
      count(border_bands<float>(a, k, items));
    else
      count(border_bands<double>(a, k, items));
    return covered;
  }
  for (const Item& it : items)
    if (it.band) {
      covered += it.x + lanes - std::max(it.x, last + 1);
      last = it.x + lanes - 1;
    }
  return covered;
}

#define VA_NA_ENTRY(T, SUFFIX)                                                                                 \
  void va_na_forward_##SUFFIX(const T* q, const T* k, const T* v, const T* qt, const T* kt, const T* vt,      \
                              const T* bias, T* out, T* probs, T* lse, int BH, int heads, int H, int W, int D,  \
                              int ky, int dy, int kx, int dx, int Sy, int Sx, double scale, int threads) {      \
    const Problem P(BH, heads, H, W, D, ky, dy, kx, dx, Sy, Sx, scale, threads);                                \
    by_dim<T, Forward>(D, P, q, k, v, qt, kt, vt, bias, out, probs, lse);                                       \
  }                                                                                                             \
  void va_na_backward_##SUFFIX(const T* q, const T* k, const T* v, const T* qt, const T* kt, const T* vt,     \
                               const T* out, const T* dout, const T* gt, const T* glse, const T* probs, T* ds,  \
                               T* dq, T* dk, T* dv, T* dbias, int BH, int heads, int H, int W, int D, int ky,   \
                               int dy, int kx, int dx, int Sy, int Sx, double scale, int threads) {             \
    const Problem P(BH, heads, H, W, D, ky, dy, kx, dx, Sy, Sx, scale, threads);                                \
    by_dim<T, Backward>(D, P, q, k, v, qt, kt, vt, out, dout, gt, glse, probs, ds, dq, dk, dv, dbias);          \
  }

VA_NA_ENTRY(float, f32)
VA_NA_ENTRY(double, f64)

}  // extern "C"
