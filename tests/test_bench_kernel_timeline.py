"""bench/kernel_timeline.py: the stage of each kernel name and the timeline summary the
end-to-end benchmark records (--profile), on hand-made timelines."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from kernel_timeline import stage_of, summarize, union_us  # noqa: E402


@pytest.mark.parametrize("name, stage", [
    ("void kvc::(anonymous namespace)::gather_kernel<__nv_bfloat16>(kvc_kcache_decode_args, kvc:", "fetch"),
    ("void kvc::(anonymous namespace)::score_mma_kernel<__nv_bfloat16, 4, 8>(kvc_kcache_decode_a", "scores"),
    ("kvc::(anonymous namespace)::selection_score_kernel(kvc::KCachePlan, float const*, kvc::Max", "selection"),
    ("kvc::(anonymous namespace)::topn_select_kernel(kvc::KCachePlan, float const*, int*)", "topn"),
    ("kvc::(anonymous namespace)::softmax_stats_kernel(kvc::KCachePlan, kvc::MaxSum const*, floa", "softmax_stats"),
    ("void kvc::(anonymous namespace)::finalize_kernel<__nv_bfloat16>(kvc::KCachePlan, int, floa", "kcache_finalize"),
    ("nvjet_tst_64x8_64x16_4x1_v_bz_TNT", "gemm"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>", "other"),
])
def test_stage_of_real_kernel_names(name, stage):
    assert stage_of(name) == stage


def test_union_merges_overlaps_and_keeps_gaps():
    assert union_us([(0, 10), (5, 20), (30, 35), (31, 32)]) == 25
    assert union_us([]) == 0


def kernel(stage, start, end, stream=1):
    return dict(name=stage, stage=stage, stream=stream, start=start, end=end)


def test_summary_of_a_two_stream_step():
    # scores 0-100 on stream 1; a fetch 50-150 beside it (half overlapped: counts as beside),
    # a gemm 150-200, a second fetch 200-260 alone; two calls' worth divided by calls=2
    kernels = [kernel("scores", 0, 100), kernel("fetch", 50, 150, 2), kernel("gemm", 150, 200),
               kernel("fetch", 200, 260, 2)]
    s = summarize(kernels, calls=2)
    assert s["span_us_per_call"] == 130
    assert s["busy_us_per_call"] == 130
    assert s["link_busy_us_per_call"] == 80
    assert s["link_busy_fraction"] == pytest.approx(160 / 260)
    assert s["fetch_overlapped_by_hbm_work_fraction"] == pytest.approx(50 / 160)
    assert (s["fetch_kernels_beside_scores"], s["fetch_mean_us_beside_scores"]) == (1, 100)
    assert (s["fetch_kernels_alone"], s["fetch_mean_us_alone"]) == (1, 60)
    assert s["stages"]["fetch"] == dict(kernel_us=80.0, count=1.0, busy_us=80.0)


def test_summary_without_kernels_says_so():
    assert "error" in summarize([], calls=1)


def test_op_bench_breakdown_averages_each_kernel_over_the_calls():
    from bench_kcache_op import per_kernel_us

    kernels = [kernel("scores", 0, 10), kernel("fetch", 10, 14), kernel("scores", 20, 32), kernel("fetch", 32, 35)]
    assert per_kernel_us(kernels, calls=2) == {"scores": 11.0, "fetch": 3.5}
