// CPS-LoRA's cluster form on the CPU, without gathered copies of the activations.
//
// The batch is taken a chunk of rows at a time. A chunk's input columns are read through the
// column map into a buffer in partition order (the dropout mask applied as they are read), every
// cluster's products run on slices of that buffer, and the chunk's output columns are written
// back through the row map, added to the base output in the same sweep. The buffers hold a
// chunk, not the batch, so they stay in the cache and the step allocates only its outputs (the
// gather-then-scatter form kept [N, in] and [N, out] copies, forward and backward). The sums run
// in the accumulation dtype (float; double for float64) and are rounded once into the output.
#include <ATen/Parallel.h>

#include "philox.h"
#include "soslora.h"

namespace soslora {
namespace {

// Elements of the per-chunk buffers ([rows, in + out + ranks] in the accumulation dtype): 4 MiB
// of float. Smaller chunks keep the buffers nearer the core but make the products too thin for
// BLAS to run at full speed (measured at 2^17..2^22 on 384..4096-wide layers); at least 64
// rows, so every product is a matrix product rather than a row.
constexpr int64_t kChunkElements = int64_t{1} << 20;
constexpr int64_t kMinChunkRows = 64;

struct Partition {
  const int64_t* row_index;  // output column of partition position j
  const int64_t* col_index;  // input column of partition position j
  at::IntArrayRef row_offsets, col_offsets, ranks;
  std::vector<int64_t> rank_offsets;
  int64_t clusters() const { return static_cast<int64_t>(ranks.size()); }
  int64_t rows(int64_t c) const { return row_offsets[c + 1] - row_offsets[c]; }
  int64_t cols(int64_t c) const { return col_offsets[c + 1] - col_offsets[c]; }
};

// The dropout of x's elements, regenerated from the seed: element (n, j) of an [N, in] tensor
// is kept as dropout_keep(seed, offset, n * in + j) decides (the mask dropout_apply draws).
struct Dropout {
  bool on = false;
  uint64_t seed = 0, offset = 0;
  uint32_t threshold = 0;
  PhiloxWords words = nullptr;
};

Dropout dropout_of(const OptTensor& seed, double p) {
  Dropout d;
  if (p == 0) return d;
  const Tensor s = seed->contiguous();
  d.on = true;
  d.seed = static_cast<uint64_t>(s.const_data_ptr<int64_t>()[0]);
  d.offset = static_cast<uint64_t>(s.const_data_ptr<int64_t>()[1]);
  d.threshold = dropout_threshold(p);
  d.words = cpu_philox_words();
  return d;
}

// 1/(1-p) rounded to scalar_t, as the dropout loops and kernels round it (exact in scalar_t).
template <typename scalar_t> scalar_t keep_value(double p) {
  return static_cast<scalar_t>(dropout_keep_value(p, c10::CppTypeToScalarType<scalar_t>::value));
}

int64_t chunk_rows(int64_t n, int64_t width) {
  const int64_t rows = std::max(kChunkElements / std::max<int64_t>(width, 1), kMinChunkRows);
  return std::min(rows, std::max<int64_t>(n, 1));
}

// buf[i, j] = D(src)[first + i, index[j]] in acc_t, for the rows [first, first + rows) of src
// [N, width] (contiguous); D is the dropout of src's elements when `drop.on`.
template <typename scalar_t, typename acc_t>
void gather_rows(acc_t* buf, const scalar_t* src, int64_t first, int64_t rows, int64_t width,
                 const int64_t* index, const Dropout& drop, scalar_t keep) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(width, 1)),
                   [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> words(drop.on ? width : 0);
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* __restrict row = src + (first + i) * width;
      acc_t* __restrict out = buf + i * width;
      if (!drop.on) {
        for (int64_t j = 0; j < width; ++j) out[j] = static_cast<acc_t>(row[index[j]]);
        continue;
      }
      drop.words(drop.seed, drop.offset, static_cast<uint64_t>((first + i) * width), width,
                 words.data());
      for (int64_t j = 0; j < width; ++j) {
        const int64_t k = index[j];
        // Rounded to scalar_t as dropout_apply rounds the dropped input.
        const scalar_t dropped = static_cast<scalar_t>(static_cast<acc_t>(row[k]) *
                                                       static_cast<acc_t>(keep));
        out[j] = words[k] >= drop.threshold ? static_cast<acc_t>(dropped) : acc_t(0);
      }
    }
  });
}

// dst[first + i, index[j]] = D(buf[i, j]) (+ add[first + i, index[j]]), rounded once into
// scalar_t; D is the dropout of dst's elements when `drop.on`.
template <typename scalar_t, typename acc_t>
void scatter_rows(scalar_t* dst, const scalar_t* add, const acc_t* buf, int64_t first,
                  int64_t rows, int64_t width, const int64_t* index, const Dropout& drop,
                  acc_t keep) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(width, 1)),
                   [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> words(drop.on ? width : 0);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = (first + i) * width;
      if (drop.on)
        drop.words(drop.seed, drop.offset, static_cast<uint64_t>(row), width, words.data());
      const acc_t* __restrict in = buf + i * width;
      scalar_t* __restrict out = dst + row;
      const scalar_t* __restrict base = add == nullptr ? nullptr : add + row;
      for (int64_t j = 0; j < width; ++j) {
        const int64_t k = index[j];
        acc_t v = in[j];
        if (drop.on) v = words[k] >= drop.threshold ? v * keep : acc_t(0);
        if (base != nullptr) v += static_cast<acc_t>(base[k]);
        out[k] = static_cast<scalar_t>(v);
      }
    }
  });
}

// Cluster c's blocks in the accumulation dtype: A_c [r_c, |C_c|] (a view, row stride in) and
// B_c * scale[c] [|R_c|, r_c].
struct Blocks {
  std::vector<Tensor> A, Bs;
  std::vector<double> scale;
};

Blocks blocks_of(const Tensor& A, const Tensor& B, const Tensor& scale, const Partition& p,
                 at::ScalarType acc) {
  Blocks b;
  const Tensor A_acc = A.to(acc), B_acc = B.to(acc);
  const Tensor s = scale.to(at::kDouble).contiguous();
  for (int64_t c = 0; c < p.clusters(); ++c) {
    b.scale.push_back(s.const_data_ptr<double>()[c]);
    b.A.push_back(A_acc.narrow(0, 0, p.ranks[c]).narrow(1, p.col_offsets[c], p.cols(c)));
    // Scaled as the dense form scales: the product rounded once in acc.
    b.Bs.push_back(B_acc.narrow(0, p.row_offsets[c], p.rows(c)).narrow(1, 0, p.ranks[c]) *
                   scale.to(acc)[c]);
  }
  return b;
}

Partition partition_of(const Tensor& row_index, const Tensor& col_index,
                       at::IntArrayRef row_offsets, at::IntArrayRef col_offsets,
                       at::IntArrayRef ranks, std::vector<int64_t> rank_offsets) {
  return {row_index.const_data_ptr<int64_t>(), col_index.const_data_ptr<int64_t>(), row_offsets,
          col_offsets, ranks, std::move(rank_offsets)};
}

template <typename scalar_t, typename acc_t>
void forward_chunks(const Tensor& x, const Blocks& blocks, const Partition& p,
                    const OptTensor& base_out, const Dropout& drop, double dropout_p, Tensor& out,
                    Tensor& hidden) {
  const int64_t N = x.size(0), in = x.size(1), n_out = out.size(1);
  const int64_t R = p.rank_offsets.back();
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t step = chunk_rows(N, in + n_out + R);
  const auto opts = x.options().dtype(acc);
  Tensor xb = at::empty({step, in}, opts), hb = at::empty({step, R}, opts);
  Tensor ub = at::empty({step, n_out}, opts);
  const scalar_t keep = keep_value<scalar_t>(dropout_p);
  const scalar_t* base = base_out.has_value() ? base_out->const_data_ptr<scalar_t>() : nullptr;
  for (int64_t first = 0; first < N; first += step) {
    const int64_t m = std::min(step, N - first);
    Tensor xm = xb.narrow(0, 0, m), hm = hb.narrow(0, 0, m), um = ub.narrow(0, 0, m);
    gather_rows<scalar_t, acc_t>(xm.data_ptr<acc_t>(), x.const_data_ptr<scalar_t>(), first, m,
                                 in, p.col_index, drop, keep);
    for (int64_t c = 0; c < p.clusters(); ++c) {
      Tensor h = hm.narrow(1, p.rank_offsets[c], p.ranks[c]);
      at::mm_out(h, xm.narrow(1, p.col_offsets[c], p.cols(c)), blocks.A[c].t());
      Tensor u = um.narrow(1, p.row_offsets[c], p.rows(c));
      if (p.ranks[c] == 0) u.zero_();  // an empty product is not written by every BLAS
      else at::mm_out(u, h, blocks.Bs[c].t());
    }
    hidden.narrow(0, first, m).copy_(hm);
    scatter_rows<scalar_t, acc_t>(out.data_ptr<scalar_t>(), base, um.const_data_ptr<acc_t>(),
                                  first, m, n_out, p.row_index, Dropout{}, acc_t(1));
  }
}

template <typename scalar_t, typename acc_t>
void backward_chunks(const Tensor& grad_out, const Tensor& x, const Blocks& blocks,
                     const Partition& p, const Tensor& hidden, const OptTensor& grad_hidden,
                     const OptTensor& grad_x_base, const Dropout& drop, double dropout_p,
                     Tensor& grad_x, Tensor& grad_A, Tensor& grad_B) {
  const int64_t N = x.size(0), in = x.size(1), n_out = grad_out.size(1);
  const int64_t R = p.rank_offsets.back();
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t step = chunk_rows(N, 2 * in + n_out + 2 * R);
  const auto opts = x.options().dtype(acc);
  Tensor xb = at::empty({step, in}, opts), gxb = at::empty({step, in}, opts);
  Tensor gb = at::empty({step, n_out}, opts);
  Tensor hb = at::empty({step, R}, opts), ghb = at::empty({step, R}, opts);
  const scalar_t keep = keep_value<scalar_t>(dropout_p);
  const scalar_t* base = grad_x_base.has_value() ? grad_x_base->const_data_ptr<scalar_t>()
                                                 : nullptr;
  for (int64_t first = 0; first < N; first += step) {
    const int64_t m = std::min(step, N - first);
    Tensor xm = xb.narrow(0, 0, m), gxm = gxb.narrow(0, 0, m), gm = gb.narrow(0, 0, m);
    Tensor hm = hb.narrow(0, 0, m), ghm = ghb.narrow(0, 0, m);
    gather_rows<scalar_t, acc_t>(gm.data_ptr<acc_t>(), grad_out.const_data_ptr<scalar_t>(),
                                 first, m, n_out, p.row_index, Dropout{}, scalar_t(1));
    gather_rows<scalar_t, acc_t>(xm.data_ptr<acc_t>(), x.const_data_ptr<scalar_t>(), first, m,
                                 in, p.col_index, drop, keep);
    hm.copy_(hidden.narrow(0, first, m));
    if (grad_hidden.has_value()) ghm.copy_(grad_hidden->narrow(0, first, m));
    for (int64_t c = 0; c < p.clusters(); ++c) {
      const int64_t r = p.ranks[c];
      Tensor gx = gxm.narrow(1, p.col_offsets[c], p.cols(c));
      if (r == 0) {
        gx.zero_();
        continue;
      }
      const Tensor g = gm.narrow(1, p.row_offsets[c], p.rows(c));
      const Tensor h = hm.narrow(1, p.rank_offsets[c], r);
      Tensor gh = ghm.narrow(1, p.rank_offsets[c], r);
      // grad_B_c += scale[c] gᵀ h; grad_h = g (B_c scale[c]) (+ grad_hidden); grad_A_c += grad_hᵀ
      // D(x); the input's gradient D(grad_h A_c) goes back through the column map below.
      grad_B.narrow(0, p.row_offsets[c], p.rows(c)).narrow(1, 0, r)
          .addmm_(g.t(), h, 1, blocks.scale[c]);
      if (grad_hidden.has_value()) gh.addmm_(g, blocks.Bs[c]);
      else at::mm_out(gh, g, blocks.Bs[c]);
      grad_A.narrow(0, 0, r).narrow(1, p.col_offsets[c], p.cols(c))
          .addmm_(gh.t(), xm.narrow(1, p.col_offsets[c], p.cols(c)));
      at::mm_out(gx, gh, blocks.A[c]);
    }
    scatter_rows<scalar_t, acc_t>(grad_x.data_ptr<scalar_t>(), base, gxm.const_data_ptr<acc_t>(),
                                  first, m, in, p.col_index, drop, static_cast<acc_t>(keep));
  }
}

}  // namespace

std::tuple<Tensor, Tensor> cluster_lowrank_forward_cpu(
    const Tensor& x, const Tensor& A, const Tensor& B, const Tensor& scale,
    const Tensor& row_index, const Tensor& col_index, at::IntArrayRef row_offsets,
    at::IntArrayRef col_offsets, at::IntArrayRef ranks, std::vector<int64_t> rank_offsets,
    const OptTensor& base_out, const OptTensor& dropout_seed, double dropout_p) {
  const c10::NoGradGuard no_grad;  // the products below are the op's own, never recorded
  const Tensor xc = x.contiguous(), rows = row_index.contiguous(), cols = col_index.contiguous();
  const OptTensor base = base_out.has_value() ? OptTensor(base_out->contiguous()) : std::nullopt;
  const Partition p = partition_of(rows, cols, row_offsets, col_offsets, ranks,
                                   std::move(rank_offsets));
  const auto acc = accumulate_dtype(x.scalar_type());
  const Blocks blocks = blocks_of(A, B, scale, p, acc);
  const Dropout drop = dropout_of(dropout_seed, dropout_p);
  Tensor out = at::empty({x.size(0), B.size(0)}, x.options());
  Tensor hidden = at::empty({x.size(0), p.rank_offsets.back()}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cluster_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    forward_chunks<scalar_t, acc_t>(xc, blocks, p, base, drop, dropout_p, out, hidden);
  });
  return {out, hidden};
}

std::tuple<Tensor, Tensor, Tensor> cluster_lowrank_backward_cpu(
    const Tensor& grad_out, const Tensor& x, const Tensor& A, const Tensor& B,
    const Tensor& scale, const Tensor& hidden, const OptTensor& grad_hidden,
    const Tensor& row_index, const Tensor& col_index, at::IntArrayRef row_offsets,
    at::IntArrayRef col_offsets, at::IntArrayRef ranks, std::vector<int64_t> rank_offsets,
    const OptTensor& grad_x_base, const OptTensor& dropout_seed, double dropout_p) {
  const c10::NoGradGuard no_grad;
  const Tensor xc = x.contiguous(), gc = grad_out.contiguous();
  const Tensor rows = row_index.contiguous(), cols = col_index.contiguous();
  const OptTensor gx_base =
      grad_x_base.has_value() ? OptTensor(grad_x_base->contiguous()) : std::nullopt;
  const Partition p = partition_of(rows, cols, row_offsets, col_offsets, ranks,
                                   std::move(rank_offsets));
  const auto acc = accumulate_dtype(x.scalar_type());
  const Blocks blocks = blocks_of(A, B, scale, p, acc);
  const Dropout drop = dropout_of(dropout_seed, dropout_p);
  Tensor grad_x = at::empty_like(xc);
  // Summed over the chunks in acc; rank slots beyond a cluster's rank keep zero gradient.
  Tensor grad_A = at::zeros(A.sizes(), A.options().dtype(acc));
  Tensor grad_B = at::zeros(B.sizes(), B.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cluster_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    backward_chunks<scalar_t, acc_t>(gc, xc, blocks, p, hidden, grad_hidden, gx_base, drop,
                                     dropout_p, grad_x, grad_A, grad_B);
  });
  return {grad_x, grad_A.to(A.scalar_type()), grad_B.to(B.scalar_type())};
}

}  // namespace soslora
