// Routing down a tree of hyperplanes on the CPU (the "tree" gater of the hard MoE): each internal
// node n holds a normal node_w[n] and an offset node_b[n]; a row goes to child 1 when
// <x, node_w[n]> > node_b[n], else to child 0. A child >= 0 is the next internal node, a child
// < 0 the leaf -(child + 1), which is the row's expert. A tree with no nodes has one leaf, 0.
//
// A row is read once per level it descends, and only its own path's normals: depth * d
// multiply-adds, against E * d for the distances to E centroids.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <atomic>

#include "common.h"

namespace moefast {
namespace {

// Dot product with 16 independent partial sums, so that -O3 vectorises it without -ffast-math.
template <typename scalar_t, typename acc_t>
acc_t dot(const scalar_t* a, const scalar_t* b, int64_t d) {
  constexpr int kLanes = 16;
  acc_t part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      part[j] += static_cast<acc_t>(a[i + j]) * static_cast<acc_t>(b[i + j]);
    }
  }
  acc_t sum = 0;
  for (; i < d; ++i) sum += static_cast<acc_t>(a[i]) * static_cast<acc_t>(b[i]);
  for (int j = 0; j < kLanes; ++j) sum += part[j];
  return sum;
}

at::Tensor tree_route_cpu(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& b_in,
                          const at::Tensor& child_in, int64_t depth) {
  const KernelGuard guard;
  check_tree_route_args(x_in, w_in, b_in, child_in, depth);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w = w_in.contiguous();
  const at::Tensor b = b_in.contiguous();
  const at::Tensor child = child_in.contiguous();
  const int64_t B = x.size(0);
  const int64_t d = x.size(1);
  const int64_t n = w.size(0);
  at::Tensor out = new_output({B}, x.options().dtype(at::kInt));
  int32_t* out_ptr = out.mutable_data_ptr<int32_t>();
  const int64_t* ch = child.const_data_ptr<int64_t>();
  // The first row whose walk left the tree (a child index >= n, a leaf not reached within depth
  // levels, or a leaf id past int32); B if none.
  std::atomic<int64_t> bad{B};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tree_route_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    // A level costs d multiply-adds per row; 64 rows per task keep the tasks worth starting.
    at::parallel_for(0, B, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        int64_t node = n == 0 ? -1 : 0;
        for (int64_t level = 0; level < depth && node >= 0; ++level) {
          const acc_t s = dot<scalar_t, acc_t>(xp + r * d, wp + node * d, d);
          const int side = s > static_cast<acc_t>(bp[node]) ? 1 : 0;
          node = ch[node * 2 + side];
          if (node >= n) break;
        }
        const int64_t leaf = -(node + 1);
        if (node >= 0 || leaf > INT32_MAX) {
          int64_t seen = bad.load();
          while (r < seen && !bad.compare_exchange_weak(seen, r)) {
          }
          out_ptr[r] = -1;
          continue;
        }
        out_ptr[r] = static_cast<int32_t>(leaf);
      }
    });
  });
  const int64_t row = bad.load();
  TORCH_CHECK_VALUE(row == B, "moefast.tree_route: the walk of row ", row,
                    " left the tree: node_child must hold internal nodes in [0, n) = [0, ", n,
                    ") or leaves -(e + 1), and every path must reach a leaf within depth = ", depth,
                    " levels");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(moefast, CPU, m) {
  m.impl("tree_route", &tree_route_cpu);
}

}  // namespace moefast
