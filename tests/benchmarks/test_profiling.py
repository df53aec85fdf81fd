"""benchmarks/profiling.py: kernels sorted into kinds, device time summed per unit of work."""

from types import SimpleNamespace

import pytest

MUL = ("void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl_nocast<at::native::BinaryFunctor<"
       "c10::BFloat16, c10::BFloat16, c10::BFloat16, at::native::binary_internal::MulFunctor<float> > >("
       "at::TensorIteratorBase&, at::native::BinaryFunctor<c10::BFloat16, c10::BFloat16, c10::BFloat16, "
       "at::native::binary_internal::MulFunctor<float> > const&)::{lambda(int)#1}>(int, ...)")
COPY = ("void at::native::vectorized_elementwise_kernel<4, at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)"
        "::{lambda()#3}::operator()() const::{lambda(float)#1}, std::array<char*, 2ul> >(int, ...)")
MEAN = ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MeanOps<float, float, float, "
        "float>, unsigned int, float, 4> >(at::native::ReduceOp<float, at::native::MeanOps<float, float, float, float>, "
        "unsigned int, float, 4>)")
MEM_EFF = ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t, "
           "cutlass::arch::Sm80, true, 64, 64, 64, true, true>::Params)")


@pytest.fixture
def prof(benchmark_script):
    return benchmark_script("profiling")


@pytest.mark.parametrize("name, kind", [
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT", "matmul"),  # Hopper cuBLAS
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_kernel__5x_cublas", "matmul"),
    ("triton_tem_fused_mm_3", "matmul"),  # inductor's matmul template
    ("aten::addmm", "matmul"),
    (MEM_EFF, "attention"),  # a cutlass kernel, but attention
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>, false>(Flash_fwd_params)", "attention"),
    ("triton_poi_fused__to_copy_add_mul_0", "compiled"),  # fused, though it names a copy
    (COPY, "copy/cast"),
    ("Memcpy HtoD (Pageable -> Device)", "copy/cast"),
    (MEAN, "reduction/norm"),
    ("aten::sum", "reduction/norm"),
    (MUL, "element-wise/other"),  # gpu_kernel_impl_nocast is no cast
    ("aten::mul", "element-wise/other"),
])
def test_kernels_are_sorted_into_kinds(prof, name, kind):
    assert prof.kind_of(name) == kind


def test_short_names_keep_the_functor_and_drop_template_arguments(prof):
    assert prof.short_name(MUL) == "at::native::elementwise_kernel[MulFunctor]"
    assert prof.short_name(COPY) == "at::native::vectorized_elementwise_kernel[direct_copy_kernel_cuda]"
    assert prof.short_name(MEAN) == "at::native::reduce_kernel[MeanOps]"
    assert prof.short_name("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float>(float*)") \
        == "at::native::cunn_SoftMaxForward"
    assert len(prof.short_name("x" * 200, width=40)) == 40


def _event(key, device, self_device_us=0, self_cpu_us=0, count=1):
    return SimpleNamespace(key=key, device_type=SimpleNamespace(name=device), self_device_time_total=self_device_us,
                           self_cpu_time_total=self_cpu_us, count=count)


def test_cuda_profile_sums_kernel_time_per_unit_and_ignores_host_events(prof):
    events = [
        _event("aten::mm", "CPU", self_device_us=9_000, self_cpu_us=500, count=4),  # host side of the gemm: not counted
        _event("nvjet_tst_128x256_a", "CUDA", self_device_us=6_000, count=4),
        _event("nvjet_tst_128x256_a<float>", "CUDA", self_device_us=2_000, count=2),  # template variant of the same
        _event(MUL, "CUDA", self_device_us=1_500, count=30),
        _event(COPY, "CUDA", self_device_us=500, count=10),
    ]
    p = prof.summarise(events, "cuda", wall_s=0.04, reps=2)  # two steps in 40 ms
    assert p.wall_s == pytest.approx(0.02) and p.busy_s == pytest.approx(0.005)  # 10 ms of kernels / 2
    assert p.busy_share == pytest.approx(0.25)  # host-bound: the GPU idled 75% of the time
    assert p.share("matmul") == pytest.approx(0.8) and p.share("copy/cast") == pytest.approx(0.05)
    assert sum(p.share(k) for k in prof.KIND_NAMES) == pytest.approx(1.0)
    name, kind, seconds, calls = p.top[0]
    assert (name, kind) == ("nvjet_tst_128x256_a", "matmul") and seconds == pytest.approx(0.004) and calls == 3
    assert [t[0] for t in p.top] == ["nvjet_tst_128x256_a", "at::native::elementwise_kernel[MulFunctor]",
                                     "at::native::vectorized_elementwise_kernel[direct_copy_kernel_cuda]"]


def test_cpu_profile_of_real_work_counts_aten_ops_and_has_no_busy_figure(prof):
    import torch

    a = torch.randn(256, 256)
    with prof.Profiler("cpu", reps=3) as p:
        for _ in range(3):
            (a @ a).relu_()
    r = p.result
    assert r.device == "cpu" and r.busy_s is None and r.busy_share is None and r.wall_s > 0
    names = {t[0]: t for t in r.top}
    assert "aten::mm" in names and names["aten::mm"][3] == pytest.approx(1.0)  # one matmul per unit
    assert r.share("matmul") > 0 and sum(r.share(k) for k in prof.KIND_NAMES) == pytest.approx(1.0)
    text = prof.markdown([("matmul loop", r)])
    assert "| matmul loop |" in text and "`aten::mm`" in text and "aten self CPU time" in text
