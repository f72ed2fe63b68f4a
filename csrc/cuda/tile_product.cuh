// The one matrix-product engine behind the low-rank, cluster, merge and penalty kernels:
//
//   for every problem p of a batch, every (m, n) of its M x N result:
//       p.epilogue(m, n, sum_k p.left(m, k) * p.right(k, n))
//
// `left` and `right` are element loaders, so masks, index maps and scalings are applied as the
// tiles are read (nothing is materialized), and `epilogue` decides what happens to each result
// (store, add, atomic add for split-K). A batch holds up to a few dozen problems of one type,
// passed by value in the kernel parameters; one launch runs the tiles of all of them (a flat
// tile list in blockIdx.x, the K split in blockIdx.z), so CPS-LoRA's clusters cost one launch.
//
// Each block computes a kTileM x kTileN tile over its share of K, kTileK at a time, through a
// multi-stage shared-memory pipeline: where an operand is plain data of the tile type with a
// unit-stride dimension (no mask, no map), its tiles are copied 16 bytes at a time with cp.async
// (__pipeline_memcpy_async; zero-filled past the edges) kStages - 1 steps ahead of the math;
// otherwise they go through the loader element by element. Each operand tile is stored with its
// contiguous dimension innermost (k-major or mn-major, chosen per launch), so the copies land
// unchanged. With 16-bit tiles (Tile = __half / __nv_bfloat16) the inner product runs on tensor
// cores (wmma, float accumulation) where the architecture has them for that type (fp16 from
// sm_70, bf16 from sm_80); otherwise it is a plain FMA loop in the accumulation type (float, or
// double for double tiles) over the same rounded tiles.
//
// Loader:   __device__ Acc operator()(int64_t row, int64_t col) const;
//           and, to choose the tile layout and copy tiles as bytes:
//           using Element = ...;                                 // the type it reads
//           __host__ __device__ bool cols_contiguous() const;   // chooses the tile layout
//           __device__ const Element* raw(bool cols_inner, int64_t& ld) const;
//               // non-null when element (r, c) is adjust(r, c, p[r * ld + c]) (cols_inner) or
//               // adjust(r, c, p[c * ld + r]) (else): the tiles are then copied as bytes and
//               // adjusted in shared memory, by the thread that copied them, after its wait
//           __device__ bool exact() const;  // adjust is the identity (no pass over the copies)
//           __device__ Acc adjust(int64_t row, int64_t col, Acc raw_value) const;
//           optionally static constexpr bool kColsContiguous (fixed: only that layout is
//           compiled). A loader without Element is read element by element, as if its
//           columns were contiguous.
// Epilogue: __device__ void operator()(int64_t m, int64_t n, Acc value);  (each thread has its
//           own copy, so it may keep per-thread state)
//           optionally __device__ void row(int64_t m, int64_t n, const float* values, int count)
//           const: results (m, n .. n + count - 1), count <= 8 (tensor-core tiles)
//           optionally __device__ bool active() const: when false, every block returns at once
//           (a switch read on the device, so the host never waits to decide);
//           optionally the whole tile or none of it: __device__ bool accepts(m, n, value) const
//           for every element first; if all accept, operator() for each, else refuse(count)
//           once per block (count: the elements refused); then finish() on every thread (may
//           hold barriers: the block's reduction of what the threads gathered)
#pragma once
#include <cuda_pipeline_primitives.h>
#include <mma.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "numeric.cuh"
#include "tile_load.cuh"

namespace soslora::cuda {

// Kernel parameters are limited to 4 KiB on every architecture (more only from sm_70 with
// CUDA 12.1): a batch of problems passed by value is sized to fit.
constexpr size_t kParamBytes = 4096;
constexpr int kMaxBatch = 32;
// Static shared memory for the pipeline stages (48 KiB per block at most); the stage count
// follows from the tile type: 3 for 16-bit tiles, 2 for float, 1 for double.
constexpr size_t kStageBudget = 40 << 10;
constexpr int kMaxStages = 3;

// Evaluated per compilation pass: each device architecture sees its own __CUDA_ARCH__.
template <typename Tile>
constexpr bool kTensorCoreTile =
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 700
    false;
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    std::is_same_v<Tile, __half>;
#else
    std::is_same_v<Tile, __half> || std::is_same_v<Tile, __nv_bfloat16>;
#endif

// A k step's math on the tensor cores: 8 warps, warp w owns rows 16*(w%4) and the two
// 16-column fragments at 32*(w/4) of the tile.
template <typename Tile, bool kLeftK, bool kRightK> struct WmmaStep {
  using LT = OperandTile<Tile, kLeftK>;
  using RT = OperandTile<Tile, kRightK>;
  using LayoutA = std::conditional_t<kLeftK, nvcuda::wmma::row_major, nvcuda::wmma::col_major>;
  using LayoutB = std::conditional_t<kRightK, nvcuda::wmma::col_major, nvcuda::wmma::row_major>;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[2];
  int warp_m, warp_n;

  __device__ __forceinline__ WmmaStep()
      : warp_m(int(threadIdx.x) / 32 % 4 * 16), warp_n(int(threadIdx.x) / 32 / 4 * 32) {
    nvcuda::wmma::fill_fragment(acc[0], 0.0f);
    nvcuda::wmma::fill_fragment(acc[1], 0.0f);
  }
  __device__ __forceinline__ void operator()(const Tile* stage) {
    namespace wmma = nvcuda::wmma;
    const Tile* ls = stage;
    const Tile* rs = stage + LT::kElements;
    for (int kk = 0; kk < kTileK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, Tile, LayoutA> a;
      wmma::load_matrix_sync(a, ls + LT::at(warp_m, kk), LT::kLd);
      SOSLORA_UNROLL
      for (int f = 0; f < 2; ++f) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, Tile, LayoutB> b;
        wmma::load_matrix_sync(b, rs + RT::at(warp_n + 16 * f, kk), RT::kLd);
        wmma::mma_sync(acc[f], a, b, acc[f]);
      }
    }
  }
};

// A k step's math as FMAs in the accumulation type: each thread owns a 4 x 4 block of the tile,
// rows and columns strided by 16 so that a warp reads spread-out banks.
template <typename Tile, bool kLeftK, bool kRightK> struct FmaStep {
  using LT = OperandTile<Tile, kLeftK>;
  using RT = OperandTile<Tile, kRightK>;
  using Acc = acc_t<Tile>;
  static constexpr int kPer = 4;
  Acc acc[kPer][kPer] = {};
  int ty = int(threadIdx.x) / (kTileN / kPer), tx = int(threadIdx.x) % (kTileN / kPer);

  __device__ __forceinline__ void operator()(const Tile* stage) {
    const Tile* ls = stage;
    const Tile* rs = stage + LT::kElements;
    for (int kk = 0; kk < kTileK; ++kk) {
      Acc a[kPer], b[kPer];
      SOSLORA_UNROLL
      for (int i = 0; i < kPer; ++i) a[i] = to_acc<Acc>(ls[LT::at(ty + 16 * i, kk)]);
      SOSLORA_UNROLL
      for (int j = 0; j < kPer; ++j) b[j] = to_acc<Acc>(rs[RT::at(tx + 16 * j, kk)]);
      SOSLORA_UNROLL
      for (int i = 0; i < kPer; ++i)
        SOSLORA_UNROLL
        for (int j = 0; j < kPer; ++j) acc[i][j] += a[i] * b[j];
    }
  }
};

// The k loop of one tile through kStages shared-memory stages: step s's tiles are issued
// kStages - 1 steps before its math.
template <typename Tile, bool kLeftK, bool kRightK, class Left, class Right> struct Pipeline {
  using LT = OperandTile<Tile, kLeftK>;
  using RT = OperandTile<Tile, kRightK>;
  using LeftTile = TileLoad<Tile, kLeftK, true, Left>;
  using RightTile = TileLoad<Tile, kRightK, false, Right>;
  static constexpr int kStageElements = LT::kElements + RT::kElements;
  static constexpr int kFit = int(kStageBudget / (kStageElements * sizeof(Tile)));
  static constexpr int kStages = kFit < 1 ? 1 : (kFit > kMaxStages ? kMaxStages : kFit);
  static constexpr size_t kBytes = kStages * kStageElements * sizeof(Tile);

  Tile* stages;
  const Left& left;
  const Right& right;
  int64_t M, N, m0, n0, k_begin, k_end, steps;

  __device__ __forceinline__ Pipeline(Tile* s, const Left& l, const Right& r, int64_t M_,
                                      int64_t N_, int64_t m0_, int64_t n0_, int64_t k_begin_,
                                      int64_t k_end_)
      : stages(s), left(l), right(r), M(M_), N(N_), m0(m0_), n0(n0_), k_begin(k_begin_),
        k_end(k_end_), steps((k_end_ - k_begin_ + kTileK - 1) / kTileK) {}

  __device__ __forceinline__ Tile* stage(int64_t step) const {
    return stages + (step % kStages) * kStageElements;
  }
  __device__ __forceinline__ void issue(int64_t step) const {
    if (step < steps) {
      const int64_t k0 = k_begin + step * kTileK;
      LeftTile(left, m0, k0, M, k_end).issue(stage(step));
      RightTile(right, n0, k0, N, k_end).issue(stage(step) + LT::kElements);
    }
    __pipeline_commit();  // one group per step, empty or not, so the wait counts stay fixed
  }
  __device__ __forceinline__ void finish(int64_t step) const {
    const int64_t k0 = k_begin + step * kTileK;
    LeftTile(left, m0, k0, M, k_end).finish(stage(step));
    RightTile(right, n0, k0, N, k_end).finish(stage(step) + LT::kElements);
  }
  template <class Math> __device__ __forceinline__ void run(Math& math) const {
    if constexpr (kStages == 1) {
      for (int64_t step = 0; step < steps; ++step) {
        issue(step);
        __pipeline_wait_prior(0);
        finish(step);
        __syncthreads();
        math(stages);
        __syncthreads();
      }
    } else {
      for (int s = 0; s < kStages - 1; ++s) issue(s);
      for (int64_t step = 0; step < steps; ++step) {
        __pipeline_wait_prior(kStages - 2);  // this thread's copies of `step` have landed
        finish(step);
        // Everyone's copies of `step` are visible, and everyone is done with step - 1, whose
        // buffer the next issue refills.
        __syncthreads();
        issue(step + kStages - 1);
        math(stage(step));
      }
    }
  }
};

// Hands this thread's results of the tile (for_each(f) calls f(m, n, value) for each) to the
// epilogue: element by element, or the whole tile or none of it (see above).
template <class Epilogue, class ForEach>
__device__ __forceinline__ void finish_tile(Epilogue& epilogue, const ForEach& for_each) {
  if constexpr (requires { epilogue.refuse(1); }) {
    __shared__ int refused_s[1];
    if (threadIdx.x == 0) refused_s[0] = 0;
    __syncthreads();
    int mine = 0;
    for_each([&](int64_t m, int64_t n, auto v) { mine += !epilogue.accepts(m, n, v); });
    if (mine != 0) atomicAdd(refused_s, mine);
    __syncthreads();
    const int refused = refused_s[0];
    if (refused == 0) for_each([&](int64_t m, int64_t n, auto v) { epilogue(m, n, v); });
    else if (threadIdx.x == 0) epilogue.refuse(refused);
    epilogue.finish();
  } else {
    for_each([&](int64_t m, int64_t n, auto v) { epilogue(m, n, v); });
  }
}

// The tile at (m0, n0) over K in [k_begin, k_end) of one problem.
template <typename Tile, bool kLeftK, bool kRightK, class Left, class Right, class Epilogue>
__device__ __forceinline__ void tile_block(int64_t M, int64_t N, int64_t m0, int64_t n0,
                                           int64_t k_begin, int64_t k_end, const Left& left,
                                           const Right& right, const Epilogue& epilogue_in) {
  Epilogue epilogue = epilogue_in;  // this thread's copy
  using P = Pipeline<Tile, kLeftK, kRightK, Left, Right>;
  constexpr bool kWmma = kTensorCoreTile<Tile>;
  constexpr int kLdC = kTileN + 4;  // the wmma result tile, floats (reuses the stage buffers)
  constexpr size_t kResultBytes = kWmma ? kTileM * kLdC * sizeof(float) : 0;
  __shared__ __align__(128) unsigned char smem[P::kBytes > kResultBytes ? P::kBytes : kResultBytes];
  const P pipeline(reinterpret_cast<Tile*>(smem), left, right, M, N, m0, n0, k_begin, k_end);

  if constexpr (kWmma) {
    WmmaStep<Tile, kLeftK, kRightK> math;
    pipeline.run(math);
    float* result = reinterpret_cast<float*>(smem);
    __syncthreads();  // every warp is done with the stage buffers the result reuses
    SOSLORA_UNROLL
    for (int f = 0; f < 2; ++f)
      nvcuda::wmma::store_matrix_sync(result + math.warp_m * kLdC + math.warp_n + 16 * f,
                                      math.acc[f], kLdC, nvcuda::wmma::mem_row_major);
    __syncthreads();
    if constexpr (requires { epilogue.row(m0, n0, result, 8); } &&
                  !requires { epilogue.refuse(1); }) {
      // 8 consecutive results per thread: the epilogue may write them 16 bytes at a time.
      for (int idx = threadIdx.x; idx < kTileM * kTileN / 8; idx += kTileThreads) {
        const int r = idx / (kTileN / 8), c = idx % (kTileN / 8) * 8;
        if (m0 + r < M && n0 + c < N)
          epilogue.row(m0 + r, n0 + c, result + r * kLdC + c, int(N - n0 - c < 8 ? N - n0 - c : 8));
      }
    } else {
      finish_tile(epilogue, [&](auto&& f) {
        for (int idx = threadIdx.x; idx < kTileM * kTileN; idx += kTileThreads) {
          const int r = idx / kTileN, c = idx % kTileN;
          if (m0 + r < M && n0 + c < N) f(m0 + r, n0 + c, result[r * kLdC + c]);
        }
      });
    }
  } else {
    using Step = FmaStep<Tile, kLeftK, kRightK>;
    Step math;
    pipeline.run(math);
    finish_tile(epilogue, [&](auto&& f) {
      SOSLORA_UNROLL
      for (int i = 0; i < Step::kPer; ++i)
        SOSLORA_UNROLL
        for (int j = 0; j < Step::kPer; ++j) {
          const int64_t m = m0 + math.ty + 16 * i, n = n0 + math.tx + 16 * j;
          if (m < M && n < N) f(m, n, math.acc[i][j]);
        }
    });
  }
}

template <class Left, class Right, class Epilogue> struct TileProblem {
  int64_t M = 0, N = 0, K = 0;
  Left left;
  Right right;
  Epilogue epilogue;
};

// What one launch runs: problems[q] owns the tiles [first_tile[q], first_tile[q + 1]) of
// blockIdx.x, m fastest, and K in chunks of k_chunk[q] along blockIdx.z.
template <class Problem, int kMax> struct TileBatch {
  int count = 0;
  unsigned first_tile[kMax + 1] = {};
  int64_t k_chunk[kMax] = {};
  Problem problems[kMax];
};

// As many problems as fit in the kernel parameters.
template <class Problem>
constexpr int kBatchCapacity = [] {
  constexpr size_t per = sizeof(Problem) + sizeof(unsigned) + sizeof(int64_t);
  constexpr size_t fit = (kParamBytes - 64) / per;
  static_assert(fit >= 1, "a tile problem does not fit in the kernel parameters");
  return int(fit < kMaxBatch ? fit : kMaxBatch);
}();

template <typename Tile, bool kLeftK, bool kRightK, class Batch>
__global__ void __launch_bounds__(kTileThreads) tile_product_kernel(const Batch batch) {
  int q = 0;
  while (q + 1 < batch.count && batch.first_tile[q + 1] <= blockIdx.x) ++q;
  const auto& p = batch.problems[q];
  if constexpr (requires { p.epilogue.active(); }) {
    if (!p.epilogue.active()) return;
  }
  const int64_t tiles_m = (p.M + kTileM - 1) / kTileM, t = blockIdx.x - batch.first_tile[q];
  const int64_t m0 = t % tiles_m * kTileM, n0 = t / tiles_m * kTileN;
  const int64_t k_begin = int64_t(blockIdx.z) * batch.k_chunk[q];
  if (blockIdx.z > 0 && k_begin >= p.K) return;  // this problem has fewer K chunks
  const int64_t k_end = k_begin + batch.k_chunk[q] < p.K ? k_begin + batch.k_chunk[q] : p.K;
  tile_block<Tile, kLeftK, kRightK>(p.M, p.N, m0, n0, k_begin, k_end, p.left, p.right,
                                    p.epilogue);
}

namespace detail {

// Whether a loader type can have this column contiguity (a fixed one compiles one layout).
template <class Load> constexpr bool may_have_cols_contiguous(bool value) {
  return kFixedColsContiguous<Load> < 0 || kFixedColsContiguous<Load> == int(value);
}

template <class Load> bool cols_contiguous(const Load& load) {
  if constexpr (kFixedColsContiguous<Load> >= 0) return kFixedColsContiguous<Load> == 1;
  else return load.cols_contiguous();
}

// The shared-memory layouts for a problem: the left operand k-major when its columns (k) are
// contiguous, the right one k-major when its rows (k) are.
template <class Problem> int layout_of(const Problem& p) {
  return (cols_contiguous(p.left) ? 2 : 0) + (cols_contiguous(p.right) ? 0 : 1);
}

template <typename Tile, int kLayout, class Batch>
cudaError_t launch_batch(const Batch& batch, unsigned tiles, int64_t grid_k,
                         cudaStream_t stream) {
  constexpr bool kLeftK = kLayout & 2, kRightK = kLayout & 1;
  using Problem = std::remove_cvref_t<decltype(batch.problems[0])>;
  using Left = decltype(Problem::left);
  using Right = decltype(Problem::right);
  if constexpr (may_have_cols_contiguous<Left>(kLeftK) &&
                may_have_cols_contiguous<Right>(!kRightK)) {
    static_assert(sizeof(Batch) <= kParamBytes, "the batch exceeds the kernel parameters");
    tile_product_kernel<Tile, kLeftK, kRightK>
        <<<dim3(tiles, 1, static_cast<unsigned>(grid_k)), kTileThreads, 0, stream>>>(batch);
    return cudaGetLastError();
  } else {
    return cudaErrorInvalidValue;  // a layout the loaders declared impossible
  }
}

}  // namespace detail

// Runs `count` problems; `splits` > 1 divides each problem's K between blocks (their epilogues
// must then add atomically). Problems are launched in batches of up to kMax that share a
// shared-memory layout (one launch when they all do and count <= kMax). Returns the first
// launch error, if any.
template <typename Tile, int kMax = 0, class Problem>
cudaError_t launch_tile_products(const Problem* problems, int64_t count, int64_t splits,
                                 cudaStream_t stream) {
  constexpr int kCap = kMax > 0 ? kMax : kBatchCapacity<Problem>;
  using Batch = TileBatch<Problem, kCap>;
  if (splits < 1) splits = 1;
  bool done[kMaxBatch] = {};  // per problem of the current window
  for (int64_t begin = 0; begin < count; begin += kCap) {
    const int64_t window = count - begin < kCap ? count - begin : kCap;
    for (int64_t i = 0; i < window; ++i) done[i] = false;
    // One launch per layout present in this window of problems.
    for (int64_t lead = 0; lead < window; ++lead) {
      if (done[lead]) continue;
      const int layout = detail::layout_of(problems[begin + lead]);
      Batch batch;
      int64_t tiles = 0, grid_k = 1;
      for (int64_t i = lead; i < window; ++i) {
        const Problem& p = problems[begin + i];
        if (done[i] || detail::layout_of(p) != layout) continue;
        done[i] = true;
        if (p.M <= 0 || p.N <= 0) continue;  // no tiles
        // Whole kTileK steps per split, so only the last split has a ragged end.
        int64_t chunk = (p.K + splits - 1) / splits;
        chunk = (chunk + kTileK - 1) / kTileK * kTileK;
        if (chunk == 0) chunk = kTileK;
        const int64_t k_blocks = p.K > 0 ? (p.K + chunk - 1) / chunk : 1;
        grid_k = k_blocks > grid_k ? k_blocks : grid_k;
        batch.first_tile[batch.count] = static_cast<unsigned>(tiles);
        batch.k_chunk[batch.count] = chunk;
        batch.problems[batch.count++] = p;
        tiles += ((p.M + kTileM - 1) / kTileM) * ((p.N + kTileN - 1) / kTileN);
        if (tiles > 0x7fffffff) return cudaErrorInvalidConfiguration;
      }
      if (batch.count == 0) continue;
      if (grid_k > 65535) return cudaErrorInvalidConfiguration;
      batch.first_tile[batch.count] = static_cast<unsigned>(tiles);
      cudaError_t err = cudaErrorInvalidValue;
      switch (layout) {
        case 0: err = detail::launch_batch<Tile, 0>(batch, unsigned(tiles), grid_k, stream); break;
        case 1: err = detail::launch_batch<Tile, 1>(batch, unsigned(tiles), grid_k, stream); break;
        case 2: err = detail::launch_batch<Tile, 2>(batch, unsigned(tiles), grid_k, stream); break;
        case 3: err = detail::launch_batch<Tile, 3>(batch, unsigned(tiles), grid_k, stream); break;
      }
      if (err != cudaSuccess) return err;
    }
  }
  return cudaSuccess;
}

// One problem: M x N, K (see launch_tile_products).
template <typename Tile, class Left, class Right, class Epilogue>
cudaError_t launch_tile_product(int64_t M, int64_t N, int64_t K, int64_t splits,
                                const Left& left, const Right& right, const Epilogue& epilogue,
                                cudaStream_t stream) {
  const TileProblem<Left, Right, Epilogue> problem{M, N, K, left, right, epilogue};
  return launch_tile_products<Tile, 1>(&problem, 1, splits, stream);
}

}  // namespace soslora::cuda
