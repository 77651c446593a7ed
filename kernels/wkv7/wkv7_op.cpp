// Torch binding for kernels/wkv7/wkv7.cu: two functional ops in the private namespace rwkv7_wkv7_ext.
// rwkv7/wkv_cuda.py wraps them as the public custom ops rwkv7::wkv7_forward / rwkv7::wkv7_backward.
//
// forward(r, w, k, v, a, b, s0?, save_all, lanes) -> (y bf16 [B,T,H,64], ckpt fp32 [B,H,T/16 or 1,64,64],
//                                                     sa fp32 [B,T,H,64] or [0])
//   save_all: keep every 16-step checkpoint and sa for the backward; otherwise ckpt holds only the final state.
// backward(r, w, k, v, a, b, dy, ckpt, sa, dsT?, lanes) -> (dr, dw, dk, dv, da, db bf16, ds0 fp32 [B,H,64,64])
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

cudaError_t wkv7_forward_cuda(int lanes, int B, int T, int H, const void* r, const void* w, const void* k,
                              const void* v, const void* a, const void* b, const float* s0, void* y, float* ckpt,
                              float* sa, bool save_all, cudaStream_t stream);
cudaError_t wkv7_backward_cuda(int lanes, int B, int T, int H, const void* r, const void* w, const void* k,
                               const void* v, const void* a, const void* b, const void* dy, const float* ckpt,
                               const float* sa, const float* dsT, void* dr, void* dw, void* dk, void* dv, void* da,
                               void* db, float* ds0, cudaStream_t stream);

namespace {

void check_input(const at::Tensor& x, const char* name, const at::Tensor& like) {
    TORCH_CHECK(x.is_cuda(), "wkv7: ", name, " must be a CUDA tensor");
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "wkv7: ", name, " must be bfloat16");
    TORCH_CHECK(x.is_contiguous(), "wkv7: ", name, " must be contiguous");
    TORCH_CHECK(x.sizes() == like.sizes(), "wkv7: ", name, " has shape ", x.sizes(), ", expected ", like.sizes());
    TORCH_CHECK(x.device() == like.device(), "wkv7: ", name, " is on another device");
}

void check_state(const at::Tensor& s, const char* name, int64_t B, int64_t H, const at::Tensor& like) {
    TORCH_CHECK(s.is_cuda() && s.device() == like.device(), "wkv7: ", name, " must be on ", like.device());
    TORCH_CHECK(s.scalar_type() == at::kFloat, "wkv7: ", name, " must be float32");
    TORCH_CHECK(s.is_contiguous(), "wkv7: ", name, " must be contiguous");
    TORCH_CHECK(s.dim() == 4 && s.size(0) == B && s.size(1) == H && s.size(2) == 64 && s.size(3) == 64, "wkv7: ",
                name, " must have shape [B, H, 64, 64]");
}

void check_shape(const at::Tensor& r) {
    TORCH_CHECK(r.dim() == 4, "wkv7: inputs must be [B, T, H, 64]");
    TORCH_CHECK(r.size(3) == 64, "wkv7: head size must be 64, got ", r.size(3));
    TORCH_CHECK(r.size(1) > 0 && r.size(1) % 16 == 0, "wkv7: T must be a positive multiple of 16, got ", r.size(1));
    TORCH_CHECK(r.size(0) * r.size(2) < (1LL << 31) && r.numel() < (1LL << 40), "wkv7: input too large");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& r, const at::Tensor& w, const at::Tensor& k,
                                                       const at::Tensor& v, const at::Tensor& a, const at::Tensor& b,
                                                       const std::optional<at::Tensor>& s0, bool save_all,
                                                       int64_t lanes) {
    check_shape(r);
    for (auto [x, n] : {std::pair{&r, "r"}, {&w, "w"}, {&k, "k"}, {&v, "v"}, {&a, "a"}, {&b, "b"}})
        check_input(*x, n, r);
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2);
    if (s0.has_value()) check_state(*s0, "initial state", B, H, r);
    const c10::cuda::CUDAGuard guard(r.device());
    auto f32 = r.options().dtype(at::kFloat);
    at::Tensor y = at::empty_like(r);
    at::Tensor ckpt = at::empty({B, H, save_all ? T / 16 : 1, 64, 64}, f32);
    at::Tensor sa = save_all ? at::empty({B, T, H, 64}, f32) : at::empty({0}, f32);
    cudaError_t err = wkv7_forward_cuda(
        (int)lanes, (int)B, (int)T, (int)H, r.data_ptr(), w.data_ptr(), k.data_ptr(), v.data_ptr(), a.data_ptr(),
        b.data_ptr(), s0.has_value() ? s0->data_ptr<float>() : nullptr, y.data_ptr(), ckpt.data_ptr<float>(),
        save_all ? sa.data_ptr<float>() : nullptr, save_all, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == cudaSuccess, "wkv7 forward launch failed: ", cudaGetErrorString(err));
    return {y, ckpt, sa};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& r, const at::Tensor& w, const at::Tensor& k, const at::Tensor& v, const at::Tensor& a,
    const at::Tensor& b, const at::Tensor& dy, const at::Tensor& ckpt, const at::Tensor& sa,
    const std::optional<at::Tensor>& dsT, int64_t lanes) {
    check_shape(r);
    for (auto [x, n] : {std::pair{&r, "r"}, {&w, "w"}, {&k, "k"}, {&v, "v"}, {&a, "a"}, {&b, "b"}, {&dy, "dy"}})
        check_input(*x, n, r);
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2);
    TORCH_CHECK(ckpt.scalar_type() == at::kFloat && ckpt.is_contiguous() && ckpt.numel() == B * H * (T / 16) * 4096,
                "wkv7 backward: checkpoints missing (forward must run with save_all)");
    TORCH_CHECK(sa.scalar_type() == at::kFloat && sa.is_contiguous() && sa.numel() == B * T * H * 64,
                "wkv7 backward: sa missing (forward must run with save_all)");
    if (dsT.has_value()) check_state(*dsT, "final-state gradient", B, H, r);
    const c10::cuda::CUDAGuard guard(r.device());
    at::Tensor dr = at::empty_like(r), dw = at::empty_like(r), dk = at::empty_like(r), dv = at::empty_like(r),
               da = at::empty_like(r), db = at::empty_like(r);
    at::Tensor ds0 = at::empty({B, H, 64, 64}, r.options().dtype(at::kFloat));
    cudaError_t err = wkv7_backward_cuda(
        (int)lanes, (int)B, (int)T, (int)H, r.data_ptr(), w.data_ptr(), k.data_ptr(), v.data_ptr(), a.data_ptr(),
        b.data_ptr(), dy.data_ptr(), ckpt.data_ptr<float>(), sa.data_ptr<float>(),
        dsT.has_value() ? dsT->data_ptr<float>() : nullptr, dr.data_ptr(), dw.data_ptr(), dk.data_ptr(),
        dv.data_ptr(), da.data_ptr(), db.data_ptr(), ds0.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == cudaSuccess, "wkv7 backward launch failed: ", cudaGetErrorString(err));
    return {dr, dw, dk, dv, da, db, ds0};
}

}  // namespace

TORCH_LIBRARY(rwkv7_wkv7_ext, m) {
    m.def("forward(Tensor r, Tensor w, Tensor k, Tensor v, Tensor a, Tensor b, Tensor? s0, bool save_all, int lanes)"
          " -> (Tensor, Tensor, Tensor)");
    m.def("backward(Tensor r, Tensor w, Tensor k, Tensor v, Tensor a, Tensor b, Tensor dy, Tensor ckpt, Tensor sa,"
          " Tensor? dsT, int lanes) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rwkv7_wkv7_ext, CUDA, m) {
    m.impl("forward", &forward);
    m.impl("backward", &backward);
}
