import math

import pytest
import torch
import triton

from kzoo.kernels import block_sparse_attention, causal_ranges, reference, scale_ranges, use_backend, window_ranges
from tests.conftest import TRITON_DEVICE, relative_error
from tests.kernels import TRITON_DTYPES

PATCH_NUMS = (1, 2, 3, 4, 5, 6)  # 91 tokens
VAR_256_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def random_ranges(num_queries, num_keys, generator, batch=None):
    """Random ranges with every special case present: empty rows, single-key rows and full rows."""
    shape = (num_queries,) if batch is None else (batch, num_queries)
    start = torch.randint(0, num_keys + 1, shape, generator=generator)
    end = start + (torch.rand(shape, generator=generator) * (num_keys + 1 - start)).long()
    start[..., 0], end[..., 0] = 3, 3                       # empty
    start[..., 1], end[..., 1] = num_keys - 1, num_keys     # single key, the last one
    start[..., 2], end[..., 2] = 0, num_keys                # full
    start[..., 3], end[..., 3] = 5, 6                       # single key
    return start.int(), end.int()


def layout(name, generator):
    """(Lq, Lk, kv_start, kv_end) for each tested layout."""
    if name in ("markov", "block_causal"):
        start, end = scale_ranges(PATCH_NUMS, name)
        return 91, 91, start, end
    if name == "equal_blocks":  # several runs of one shape: batched together on the CPU path
        start, end = scale_ranges((2, 2, 2, 3, 1), "markov")
        return 22, 22, start, end
    if name in ("mixed_runs", "tiling_runs"):
        runs = {
            # short runs (some empty, some of one shape) between long ones
            "mixed_runs": [(3, 0, 0), (5, 0, 5), (200, 5, 300), (7, 9, 9), (2, 290, 300), (150, 0, 150), (3, 100, 140)],
            # key ranges that tile the keys in order, one of them empty: the CPU path splits them
            "tiling_runs": [(4, 0, 4), (3, 4, 4), (4, 4, 8), (6, 8, 20)],
        }[name]
        start = torch.cat([torch.full((n,), a) for n, a, _ in runs]).int()
        end = torch.cat([torch.full((n,), b) for n, _, b in runs]).int()
        return len(start), int(end.max()), start, end
    if name == "causal":
        return 70, 70, *causal_ranges(70)
    if name == "window":
        return 77, 77, *window_ranges(77, 9, 4)
    if name == "random":
        return 83, 83, *random_ranges(83, 83, generator)
    if name == "random_lq_ne_lk":
        return 37, 101, *random_ranges(37, 101, generator)
    if name == "random_per_sample":
        return 45, 60, *random_ranges(45, 60, generator, batch=2)
    if name == "long_window":  # several query tiles on the CPU path's masked branch
        return 300, 300, *window_ranges(300, 40, 10)
    if name == "long_random_per_sample":
        return 290, 310, *random_ranges(290, 310, generator, batch=2)
    raise ValueError(name)


LAYOUTS = ["markov", "block_causal", "equal_blocks", "causal", "window", "random", "random_lq_ne_lk", "random_per_sample"]


def make_inputs(lq, lk, head_dim, dtype, device, generator, batch=2, heads=2):
    q = torch.randn(batch, heads, lq, head_dim, generator=generator)
    k = torch.randn(batch, heads, lk, head_dim, generator=generator)
    v = torch.randn(batch, heads, lk, head_dim, generator=generator)
    grad_out = torch.randn(batch, heads, lq, head_dim, generator=generator)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, grad_out)]


def run_op(q, k, v, kv_start, kv_end, grad_out, **kwargs):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))  # not clone(): it may drop strides
    out = block_sparse_attention(q, k, v, kv_start, kv_end, **kwargs)
    out.backward(grad_out)
    return out, (q.grad, k.grad, v.grad)


def float64_reference(q, k, v, kv_start, kv_end, grad_out, scale=None):
    args = [t.detach().cpu().double() for t in (q, k, v)]
    ranges = [kv_start.cpu(), kv_end.cpu()]
    out = reference.block_sparse_attention(*args, *ranges, scale)
    grads = reference.block_sparse_attention_backward(grad_out.cpu().double(), *args, *ranges, scale)
    return out, grads


def allowed_keys(kv_start, kv_end, b, i):
    """Query i's keys in sample b, as a list: independent of the reference's masking."""
    s, e = (kv_start[b, i], kv_end[b, i]) if kv_start.ndim == 2 else (kv_start[i], kv_end[i])
    return list(range(int(s), int(e)))


def naive_attention(q, k, v, kv_start, kv_end, scale):
    """Row by row, with an explicit list of allowed keys."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(q.shape[0]):
        for i in range(q.shape[2]):
            keys = allowed_keys(kv_start, kv_end, b, i)
            if keys:
                scores = (q[b, :, i:i + 1].double() @ k[b, :, keys].double().transpose(-2, -1)) * scale
                out[b, :, i] = (scores.softmax(-1) @ v[b, :, keys].double())[:, 0]
    return out


def naive_log2_sum_exp(q, k, kv_start, kv_end, scale):
    out = torch.full(q.shape[:3], float("-inf"), dtype=torch.float64)
    for b in range(q.shape[0]):
        for i in range(q.shape[2]):
            keys = allowed_keys(kv_start, kv_end, b, i)
            if keys:
                scores = (k[b, :, keys].double() @ q[b, :, i, :, None].double())[..., 0] * scale  # (H, keys)
                out[b, :, i] = torch.logsumexp(scores, -1) / math.log(2)
    return out


@pytest.mark.parametrize("name", LAYOUTS)
def test_reference_matches_naive_attention(name):
    g = torch.Generator().manual_seed(1)
    lq, lk, start, end = layout(name, g)
    q, k, v, _ = make_inputs(lq, lk, 16, torch.float64, "cpu", g)
    expected = naive_attention(q, k, v, start, end, 0.3)
    torch.testing.assert_close(reference.block_sparse_attention(q, k, v, start, end, 0.3), expected,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("ranges", ["markov", "random", "random_per_sample"])
def test_gradcheck(backend, ranges):
    g = torch.Generator().manual_seed(2)
    start, end = {  # small layouts: gradcheck perturbs every input element
        "markov": lambda: scale_ranges((1, 2, 3), "markov"),
        "random": lambda: random_ranges(11, 13, g),
        "random_per_sample": lambda: random_ranges(9, 10, g, batch=2),
    }[ranges]()
    q, k, v, _ = make_inputs(start.shape[-1], int(end.max()) + 1, 16, torch.float64, "cpu", g, batch=2, heads=1)
    inputs = tuple(t.requires_grad_() for t in (q, k, v))
    with use_backend(backend):
        assert torch.autograd.gradcheck(lambda q, k, v: block_sparse_attention(q, k, v, start, end), inputs,
                                        fast_mode=True)


TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}  # bf16: 8 mantissa bits


def check_against_reference(name, head_dim, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    lq, lk, start, end = layout(name, g)
    q, k, v, grad_out = make_inputs(lq, lk, head_dim, dtype, device, g)
    start, end = start.to(device), end.to(device)
    out, grads = run_op(q, k, v, start, end, grad_out)
    out_ref, grads_ref = float64_reference(q, k, v, start, end, grad_out)
    assert out.dtype == dtype and out.shape == q.shape
    assert relative_error(out, out_ref) < TOLERANCE[dtype]
    for grad, grad_ref, label in zip(grads, grads_ref, "qkv"):
        assert relative_error(grad, grad_ref) < TOLERANCE[dtype], f"d{label}"
    empty = (start >= end).expand(q.shape[0], -1) if start.ndim == 1 else start >= end
    rows = empty[:, None, :].expand(-1, q.shape[1], -1)
    assert not out[rows].any() and not grads[0][rows].any()


@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=lambda dtype: str(dtype).removeprefix("torch."))
@pytest.mark.parametrize("head_dim", [16, 32, 64])
@pytest.mark.parametrize("name", LAYOUTS)
def test_triton_matches_reference(name, head_dim, dtype, poison):
    with use_backend("triton"):
        check_against_reference(name, head_dim, dtype, TRITON_DEVICE, seed=head_dim + len(name))


@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=lambda dtype: str(dtype).removeprefix("torch."))
@pytest.mark.parametrize("name", ["window", "random_per_sample"])
def test_triton_head_dim_128(name, dtype, poison):
    """The widest head, on two layouts only: the interpreter is slow at D = 128."""
    with use_backend("triton"):
        check_against_reference(name, 128, dtype, TRITON_DEVICE, seed=128 + len(name))


@pytest.mark.parametrize("backend,device", [("triton", TRITON_DEVICE), ("auto", "cpu")])
def test_float64_is_computed_in_float64(backend, device, poison):
    """The Triton kernels compute in float32: float64 input takes the reference on the Triton path,
    so that it gets float64 arithmetic, not a float32 result."""
    g = torch.Generator().manual_seed(17)
    lq, lk, start, end = layout("random_per_sample", g)
    q, k, v, grad_out = make_inputs(lq, lk, 32, torch.float64, device, g)
    with use_backend(backend):
        out, grads = run_op(q, k, v, start.to(device), end.to(device), grad_out)
    out_ref, grads_ref = float64_reference(q, k, v, start, end, grad_out)
    assert out.dtype == torch.float64 and relative_error(out, out_ref) < 1e-12
    for grad, grad_ref, label in zip(grads, grads_ref, "qkv"):
        assert grad.dtype == torch.float64 and relative_error(grad, grad_ref) < 1e-12, f"d{label}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("head_dim", [16, 64])
@pytest.mark.parametrize("name", LAYOUTS + ["mixed_runs", "tiling_runs", "long_window", "long_random_per_sample"])
def test_cpu_path_matches_reference(name, head_dim, dtype, poison):
    with use_backend("auto"):
        check_against_reference(name, head_dim, dtype, "cpu", seed=head_dim + len(name))


@pytest.mark.parametrize("backend,device", [("auto", "cpu"), ("reference", "cpu"), ("triton", TRITON_DEVICE)])
@pytest.mark.parametrize("name", ["mixed_runs", "random", "random_per_sample"])  # all with empty rows
def test_stats_are_the_base2_log_sum_exp_on_every_backend(backend, device, name, poison):
    """One statistic whatever the backend, so that the op's fake and a compiled graph never depend on it."""
    g = torch.Generator().manual_seed(9)
    lq, lk, start, end = layout(name, g)
    q, k, v, _ = make_inputs(lq, lk, 16, torch.float32, device, g)
    with use_backend(backend):
        _, stats = torch.ops.kzoo.block_sparse_attention(q, k, v, start.to(device), end.to(device), 0.3)
    expected = naive_log2_sum_exp(q.cpu(), k.cpu(), start, end, 0.3)
    assert stats.dtype == torch.float32 and stats.shape == q.shape[:3]
    stats = stats.cpu().double()
    assert torch.equal(stats.isneginf(), expected.isneginf()) and expected.isneginf().any()
    finite = expected.isfinite()
    assert relative_error(stats[finite], expected[finite]) < 1e-6


@pytest.mark.parametrize("name,tiles", [("markov", 0), ("block_causal", 0), ("mixed_runs", 0), ("tiling_runs", 0),
                                        ("causal", 1), ("random_per_sample", 1), ("long_window", 3)])
def test_cpu_path_masks_only_query_tiles(name, tiles, monkeypatch):
    """Scale layouts run per query run, forward and backward, without any mask; other layouts build
    one mask per tile of queries, over only the keys the tile's rows see."""
    from kzoo.kernels.cpu import QUERY_TILE

    g = torch.Generator().manual_seed(7)
    lq, lk, start, end = layout(name, g)
    q, k, v, grad_out = make_inputs(lq, lk, 16, torch.float32, "cpu", g)
    masks = []
    real_range_mask = reference.range_mask
    monkeypatch.setattr(reference, "range_mask", lambda *a: masks.append(real_range_mask(*a)) or masks[-1])
    with use_backend("auto"):
        run_op(q, k, v, start, end, grad_out)
    assert len(masks) == 2 * tiles  # forward and backward
    assert all(mask.shape[-2] <= QUERY_TILE for mask in masks)
    if name == "long_window":  # 40 keys left, 10 right: no tile needs all 300
        assert max(mask.shape[-1] for mask in masks) == 128 + 50


@pytest.fixture
def empty_memo(monkeypatch):
    """The range memo as a fresh process has it: entries of earlier tests in this worker would
    otherwise fill it, and a full memo is cleared, which forgets this test's facts mid-way."""
    from kzoo.kernels import attention

    monkeypatch.setattr(attention, "_memo", {})


def test_ranges_are_read_once_per_pair_of_tensors_until_changed_in_place(monkeypatch, empty_memo):
    """The range check and the CPU path's plan run once for range tensors used again (as a model's
    layers use them), forward and backward; an in-place change to either tensor is seen."""
    from kzoo.kernels import attention, cpu

    calls = []
    for module, name in ((attention, "_check_ranges"), (cpu, "plan")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    g = torch.Generator().manual_seed(11)
    start, end = scale_ranges((2, 3, 4), "markov")
    q, k, v, grad_out = make_inputs(29, 29, 16, torch.float32, "cpu", g)
    with use_backend("auto"):
        for _ in range(3):
            run_op(q, k, v, start, end, grad_out)
        assert sorted(calls) == ["_check_ranges", "plan"]
        start.fill_(0)  # now block_causal
        out, grads = run_op(q, k, v, start, end, grad_out)
        assert sorted(calls) == ["_check_ranges", "_check_ranges", "plan", "plan"]
        out_ref, grads_ref = float64_reference(q, k, v, start, end, grad_out)
        assert relative_error(out, out_ref) < 1e-4
        assert all(relative_error(grad, grad_ref) < 1e-4 for grad, grad_ref in zip(grads, grads_ref))
        run_op(q, k, v, start.clone(), end, grad_out)  # equal values, another tensor
        assert len(calls) == 6
        end[0] = 30
        for _ in range(2):  # bad ranges are never remembered
            with pytest.raises(ValueError, match=r"range \[0, 30\) of query \(0,\) is outside \[0, 29\]"):
                block_sparse_attention(q, k, v, start, end)
        for _ in range(2 * attention._MEMO_SIZE):  # the memo stays bounded
            block_sparse_attention(q[..., :1, :], k, v, *causal_ranges(1))
        assert len(attention._memo) <= attention._MEMO_SIZE


def test_inference_tensor_ranges():
    """Ranges made under inference_mode have no version counter: they are read at every call."""
    g = torch.Generator().manual_seed(12)
    q, k, v, _ = make_inputs(29, 29, 16, torch.float32, "cpu", g)
    with torch.inference_mode():
        start, end = scale_ranges((2, 3, 4), "markov")
        with use_backend("auto"):
            first = block_sparse_attention(q, k, v, start, end)
            end.fill_(29)
            start.fill_(0)
            second = block_sparse_attention(q, k, v, start, end)
    assert relative_error(first, float64_reference(q, k, v, *scale_ranges((2, 3, 4), "markov"), q)[0]) < 1e-4
    assert relative_error(second, float64_reference(q, k, v, start, end, q)[0]) < 1e-4


@pytest.mark.parametrize("backend,device", [("auto", "cpu"), ("reference", "cpu"), ("triton", TRITON_DEVICE)])
def test_empty_rows_and_empty_tensors(backend, device):
    q, k, v = (torch.randn(1, 2, 5, 16, device=device) for _ in range(3))
    nothing = torch.zeros(5, dtype=torch.int32, device=device)
    with use_backend(backend):
        out, grads = run_op(q, k, v, nothing, nothing, torch.ones_like(q))
        assert not out.any() and all(not g.any() for g in grads)
        empty_q = torch.randn(1, 2, 0, 16, device=device, requires_grad=True)
        out = block_sparse_attention(empty_q, k, v, nothing[:0], nothing[:0])
        out.sum().backward()
        assert out.shape == (1, 2, 0, 16) and empty_q.grad.shape == empty_q.shape


@pytest.mark.parametrize("mode", ["window", "markov"])  # the CPU path's masked and per-run branches
def test_scale_and_strided_inputs(mode):
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(2, 40, 3, 2, 32, generator=g)  # (B, L, 3, H, D) as a fused projection lays it out
    start, end = window_ranges(40, 3, 3) if mode == "window" else scale_ranges((2, 6), "markov")
    grad_out = torch.randn(2, 2, 40, 32, generator=g)
    out_ref, grads_ref = float64_reference(*qkv.permute(2, 0, 3, 1, 4).unbind(0), start, end, grad_out, scale=0.2)
    for backend, device in (("auto", "cpu"), ("triton", TRITON_DEVICE)):
        leaf = qkv.to(device, copy=True).requires_grad_()
        q, k, v = leaf.permute(2, 0, 3, 1, 4).unbind(0)  # views with gaps: not contiguous, not dense
        assert not q.is_contiguous()
        with use_backend(backend):
            out = block_sparse_attention(q, k, v, start.to(device), end.to(device), scale=0.2)
            out.backward(grad_out.to(device))
        assert relative_error(out, out_ref) < 1e-4
        for grad, grad_ref in zip(leaf.grad.permute(2, 0, 3, 1, 4).unbind(0), grads_ref):
            assert relative_error(grad, grad_ref) < 1e-4


def test_range_helpers():
    start, end = scale_ranges((1, 2, 3), "markov")
    assert start.dtype == end.dtype == torch.int32
    assert start.tolist() == [0, 1, 1, 1, 1] + [5] * 9 and end.tolist() == [1] + [5] * 4 + [14] * 9
    start, end = scale_ranges((1, 2, 3), "block_causal")
    assert start.tolist() == [0] * 14 and end.tolist() == [1] + [5] * 4 + [14] * 9
    assert scale_ranges((1, 2), "bidirectional")[0].tolist() == scale_ranges((1, 2), "markov")[0].tolist()
    assert scale_ranges((1, 2), "dense")[1].tolist() == [5] * 5
    assert scale_ranges((1, 2, 3, 4, 5, 6, 8, 10, 13, 16), "markov")[0].shape == (680,)
    assert causal_ranges(3)[1].tolist() == [1, 2, 3]
    assert window_ranges(5, 1, 2)[0].tolist() == [0, 0, 1, 2, 3]
    assert window_ranges(5, 1, 2)[1].tolist() == [3, 4, 5, 5, 5]
    with pytest.raises(ValueError, match="'sideways'"):
        scale_ranges((1, 2), "sideways")


def _inputs(lq=8, lk=8, d=16, dtype=torch.float32):
    return tuple(torch.randn(1, 2, n, d).to(dtype) for n in (lq, lk, lk))


@pytest.mark.parametrize("case,error,message", [
    (lambda: (*_inputs(), torch.zeros(8, dtype=torch.int32), torch.full((8,), 9, dtype=torch.int32)),
     ValueError, r"range \[0, 9\) of query \(0,\) is outside \[0, 8\]"),
    (lambda: (*_inputs(), torch.full((8,), 4, dtype=torch.int32), torch.full((8,), 2, dtype=torch.int32)),
     ValueError, r"kv_start\[\(0,\)\]=4 > kv_end\[\(0,\)\]=2"),
    (lambda: (*_inputs(d=24), *causal_ranges(8)), ValueError, "D=24"),
    (lambda: (*_inputs(lk=9)[:2], _inputs()[2], *causal_ranges(8)), ValueError, r"k \(1, 2, 9, 16\), v \(1, 2, 8, 16\)"),
    (lambda: (*_inputs(), *causal_ranges(7)), ValueError, r"\(7,\); expected \(8,\)"),
    (lambda: (*_inputs(), torch.zeros(8, dtype=torch.int64), torch.ones(8, dtype=torch.int64)),
     TypeError, "torch.int64"),
    (lambda: (*_inputs(dtype=torch.int32), *causal_ranges(8)), TypeError,
     "torch.int32; expected float16, bfloat16, float32 or float64$"),
    (lambda: (torch.randn(2, 8, 16), *_inputs()[1:], *causal_ranges(8)), ValueError, r"\(2, 8, 16\)"),
])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_bad_input(case, error, message, backend):
    with use_backend(backend), pytest.raises(error, match=message):
        block_sparse_attention(*case())


@pytest.fixture
def gpu_forward_autotuner(monkeypatch):
    """The forward's autotuner as built on a GPU (the interpreter has tiles of its own)."""
    from kzoo.kernels.triton import attention as kernels

    monkeypatch.setattr(kernels, "triton_interpreted", lambda: False)
    kernels._autotuned_forward.cache_clear()
    yield kernels._autotuned_forward()
    kernels._autotuned_forward.cache_clear()


def test_forward_autotune_keeps_only_the_configs_of_each_dtype_and_head_dim(gpu_forward_autotuner):
    """The kept (BLOCK_M, BLOCK_N, num_warps, num_stages), written out from the rule: fp32 runs only
    the backward's exact tile; fp16 and bf16 try the backward's tile, 64x32 and 128x32, and 128x64
    up to D = 64."""
    from kzoo.kernels.triton.attention import _prune_forward_configs

    half = {16: {(64, 64, 4, 3), (64, 32, 4, 3), (128, 32, 8, 2), (128, 64, 8, 3)},
            128: {(64, 32, 4, 2), (64, 32, 4, 3), (128, 32, 8, 2)}}
    half[32] = half[64] = half[16]
    expected = {torch.float32: {16: {(64, 32, 4, 2)}, 32: {(64, 32, 4, 2)}, 64: {(32, 32, 8, 2)},
                                128: {(16, 16, 4, 1)}},
                torch.float16: half, torch.bfloat16: half}
    configs = gpu_forward_autotuner.configs
    for dtype, per_head_dim in expected.items():
        for head_dim, tiles in per_head_dim.items():
            kept = _prune_forward_configs(configs, {"Q": torch.empty(0, dtype=dtype)}, HEAD_DIM=head_dim,
                                          PRECISION="ieee", COUNT_TILES=False)
            assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept} == tiles, \
                (dtype, head_dim)
    every = set().union(*(tiles for per_head_dim in expected.values() for tiles in per_head_dim.values()))
    assert len(configs) == len(every)  # each candidate compiled once


# --- kernels at real sizes ---------------------------------------------------------------------

def spans_by_table(kv_start, kv_end, num_keys, block_n):
    """query_span_per_key_tile from the full (ranges, key tiles, queries) table of who sees what."""
    start, end = kv_start.reshape(-1, kv_start.shape[-1]).long(), kv_end.reshape(-1, kv_end.shape[-1]).long()
    tile_lo = torch.arange(0, num_keys, block_n)
    sees = (start[:, None, :] < (tile_lo + block_n)[None, :, None]) & (end[:, None, :] > tile_lo[None, :, None])
    sees &= (start < end)[:, None, :]
    query = torch.arange(start.shape[-1])
    first = torch.where(sees, query, start.shape[-1]).amin(-1)
    last = torch.where(sees, query + 1, 0).amax(-1)
    return torch.stack([first, last], -1).to(torch.int32)


def test_query_span_per_key_tile_matches_the_table():
    from kzoo.kernels.triton.attention import query_span_per_key_tile

    g = torch.Generator().manual_seed(13)
    cases = [(*scale_ranges((1, 2, 3, 4, 5, 6, 8, 10, 13, 16), mode), 680) for mode in ("markov", "block_causal")]
    cases += [(*window_ranges(300, 40, 10), 300), (*causal_ranges(77), 77)]
    for trial in range(40):  # odd sizes, a fifth of the rows empty, shared and per-sample ranges
        lq, lk = (int(n) for n in torch.randint(1, 90, (2,), generator=g))
        shape = (lq,) if trial % 2 else (3, lq)
        start = torch.randint(0, lk + 1, shape, generator=g)
        end = start + (torch.rand(shape, generator=g) * (lk + 1 - start)).long()
        end = torch.where(torch.rand(shape, generator=g) < 0.2, start, end)
        cases.append((start.int(), end.int(), lk))
    for i, (start, end, num_keys) in enumerate(cases):
        for block_n in (1, 3, 16, 64):
            spans = query_span_per_key_tile(start, end, num_keys, block_n)
            assert spans.dtype == torch.int32
            assert torch.equal(spans, spans_by_table(start, end, num_keys, block_n)), (i, block_n)


def test_query_span_per_key_tile_memory_grows_with_the_sequence_not_its_square():
    """No (queries, key tiles) table: at HMAR's 1024 layout with per-sample ranges (L = 9451,
    B = 64) one took 1.4 GB per backward."""
    from torch.profiler import ProfilerActivity, profile

    from kzoo.kernels.triton.attention import query_span_per_key_tile

    start, end = random_ranges(4000, 4000, torch.Generator().manual_seed(14), batch=4)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        query_span_per_key_tile(start, end, 4000, 16)
    largest = max(event.cpu_memory_usage for event in prof.events())
    assert 0 < largest <= 2 * 8 * start.numel()  # two int64 per query; the table is 250 key tiles x that


def test_triton_path_plans_once_per_pair_of_range_tensors(monkeypatch, empty_memo):
    """The keys seen (forward) and the per-key-tile query spans (backward) are worked out once for
    range tensors used again, and again after an in-place change."""
    from kzoo.kernels.triton import attention as kernels

    calls = []
    for name in ("keys_seen", "query_span_per_key_tile"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    g = torch.Generator().manual_seed(15)
    start, end = scale_ranges((2, 3, 4), "markov")
    q, k, v, grad_out = make_inputs(29, 29, 16, torch.float32, TRITON_DEVICE, g, batch=1, heads=1)
    start, end = start.to(TRITON_DEVICE), end.to(TRITON_DEVICE)
    with use_backend("triton"):
        for _ in range(3):
            run_op(q, k, v, start, end, grad_out)
        assert sorted(calls) == ["keys_seen", "keys_seen", "query_span_per_key_tile"]  # forward, backward
        start.fill_(0)  # now block_causal
        _, grads = run_op(q, k, v, start, end, grad_out)
    assert len(calls) == 6
    _, grads_ref = float64_reference(q, k, v, start, end, grad_out)
    assert all(relative_error(grad, grad_ref) < 1e-4 for grad, grad_ref in zip(grads, grads_ref))


def unread_layout(name):
    """(Lq, Lk, kv_start, kv_end) with keys that no query may read, and for some, queries that see nothing."""
    if name == "window":  # an unseen tail of keys
        return 37, 50, *window_ranges(37, 4, 2)
    if name == "causal":  # nobody sees the last 7 keys
        start, end = causal_ranges(40)
        return 40, 40, start, end.clamp_max(33)
    if name == "markov":  # scales 1 and 3 see nothing: nobody sees their keys, gaps inside a query tile's keys
        start, end = scale_ranges((1, 2, 3, 4, 5), "markov")
        return 55, 55, start, torch.where((start == 1) | (start == 14), start, end)
    if name == "per_sample":  # another unseen set in each sample
        causal, window = causal_ranges(40), window_ranges(40, 3, 1)
        silent = (torch.arange(40) >= 20) & (torch.arange(40) < 25)
        start = torch.stack([causal[0], window[0]])
        return 40, 40, start, torch.stack([causal[1].clamp_max(33), torch.where(silent, window[0], window[1])])
    raise ValueError(name)


@pytest.mark.parametrize("backend,device", [("triton", TRITON_DEVICE), ("auto", "cpu"), ("reference", "cpu")])
@pytest.mark.parametrize("name", ["window", "causal", "markov", "per_sample"])
def test_values_no_query_may_read_never_reach_the_result(backend, device, name, poison):
    """NaN in the keys no query sees, and in q and dO of the queries that see nothing: every output
    and gradient is what zeros there give."""
    g = torch.Generator().manual_seed(16)
    lq, lk, start, end = unread_layout(name)
    q, k, v, grad_out = make_inputs(lq, lk, 16, torch.float32, device, g)
    mask = reference.range_mask(start, end, lk)
    mask = (mask if mask.ndim == 3 else mask[None])[:, None]
    silent, unseen = (~mask.any(-1)[..., None]).to(device), (~mask.any(-2)[..., None]).to(device)
    assert unseen.any()
    out_ref, grads_ref = float64_reference(q.masked_fill(silent, 0), k.masked_fill(unseen, 0),
                                           v.masked_fill(unseen, 0), start, end, grad_out.masked_fill(silent, 0))
    nan = float("nan")
    with use_backend(backend):
        out, grads = run_op(q.masked_fill(silent, nan), k.masked_fill(unseen, nan), v.masked_fill(unseen, nan),
                            start.to(device), end.to(device), grad_out.masked_fill(silent, nan))
    assert relative_error(out, out_ref) < 1e-4
    for grad, grad_ref, label in zip(grads, grads_ref, "qkv"):
        assert relative_error(grad, grad_ref) < 1e-4, f"d{label}"


def tile_visits(kv_start, kv_end, lq, lk, block_m, block_n):
    """What DESIGN.md promises the kernels visit, from the (ranges, queries, keys) mask: per (query
    tile, key tile), whether some row sees some key, and whether every row sees every key."""
    mask = reference.range_mask(kv_start, kv_end, lk).reshape(-1, lq, lk)
    query_tiles, key_tiles = triton.cdiv(lq, block_m), triton.cdiv(lk, block_n)
    padded = torch.zeros(mask.shape[0], query_tiles * block_m, key_tiles * block_n, dtype=torch.bool)
    padded[:, :lq, :lk] = mask
    shape = (mask.shape[0], query_tiles, block_m, key_tiles, block_n)
    some = padded.reshape(shape).any(4).any(2)
    padded[:, lq:, :lk] = True  # rows past Lq take no part; keys past Lk are never seen
    return some, padded.reshape(shape).all(4).all(2)


def layout_with_both_tile_kinds(name, block_m, block_n):
    """The smallest of growing layouts of one kind in which some tiles are seen whole by every row
    and others only in part, for the tiles the device runs (16x16 interpreted, up to 64x32 on a GPU)."""
    for size in range(6, len(VAR_256_PATCH_NUMS) + 1):
        patch_nums = VAR_256_PATCH_NUMS[:size]
        if name == "per_sample":
            start, end = (torch.stack(pair) for pair in zip(scale_ranges(patch_nums, "markov"),
                                                             scale_ranges(patch_nums, "block_causal")))
        elif name == "window":
            length = 100 * (size - 5)
            start, end = window_ranges(length, 2 * length // 5, length // 5)
        else:
            start, end = scale_ranges(patch_nums, name)
        length = start.shape[-1]
        some, every = tile_visits(start, end, length, length, block_m, block_n)
        if every.any() and (some & ~every).any():
            return length, length, start, end
    raise AssertionError(f"no {name} layout has both kinds of {block_m}x{block_n} tile")


@pytest.mark.parametrize("name", ["markov", "block_causal", "window", "per_sample"])
def test_triton_kernels_visit_only_the_tiles_some_row_sees(name):
    """The forward and dQ walk, per query tile, only the key tiles its rows see, the forward without a
    mask where every row sees the whole key tile; dK/dV walks, per key tile, only the query tiles
    that see it."""
    from kzoo.kernels.triton import attention as kernels

    g = torch.Generator().manual_seed(18)
    tiles = kernels.tile_config(16, torch.float32)
    lq, lk, start, end = layout_with_both_tile_kinds(name, tiles["BLOCK_M"], tiles["BLOCK_N"])
    q, k, v, grad_out = make_inputs(lq, lk, 16, torch.float32, TRITON_DEVICE, g)
    start, end = start.to(TRITON_DEVICE), end.to(TRITON_DEVICE)
    counts = {}
    plan = kernels.backward_plan(start, end, lk, 16, torch.float32)
    out, lse = kernels.attention_forward(q, k, v, start, end, 0.25, plan.keys_seen, tile_counts=counts)
    grads = kernels.attention_backward(grad_out, q, k, v, out, lse, start, end, 0.25, plan, tile_counts=counts)
    out_ref, grads_ref = float64_reference(q, k, v, start, end, grad_out, scale=0.25)
    assert relative_error(out, out_ref) < 1e-4
    assert all(relative_error(grad, grad_ref) < 1e-4 for grad, grad_ref in zip(grads, grads_ref))

    some, every = tile_visits(start.cpu(), end.cpu(), lq, lk, tiles["BLOCK_M"], tiles["BLOCK_N"])
    sample = torch.arange(q.shape[0] * q.shape[1]) // q.shape[1]  # of each program's (b, h)
    if start.ndim == 1:
        sample.zero_()
    visited, unmasked = counts["forward"].cpu().unbind(-1)  # (query tiles, B*H)
    assert torch.equal(visited, some.sum(2)[sample].T.int())
    assert torch.equal(unmasked, every.sum(2)[sample].T.int())
    visited, unmasked = counts["dq"].cpu().unbind(-1)
    assert torch.equal(visited, some.sum(2)[sample].T.int()) and not unmasked.any()
    visited, unmasked = counts["dkdv"].cpu().unbind(-1)  # (key tiles, B*H)
    assert torch.equal(visited, some.sum(1)[sample].T.int()) and not unmasked.any()


def test_batch_offsets_past_two_to_the_31_elements():
    """Batch 2 of a fused-qkv layout starts past element 2^31, as from batch ~40 at HMAR's 1024
    layout. The buffer is 8 GiB of address space, nearly all of it never touched; it starts 2^21
    elements before the tensor, so that a 32-bit batch offset, wrapping to -2^21, reads a wrong
    (zero) batch rather than crashing."""
    heads, length, head_dim = 2, 24, 16
    batch_stride = 2**31 - 2**20  # below 2^31, so the JIT passes it as a 32-bit integer
    buffer = torch.empty(2**21 + 2 * batch_stride + length * 3 * heads * head_dim, dtype=torch.float16,
                         device=TRITON_DEVICE)
    qkv = buffer.as_strided((3, length, 3, heads, head_dim),
                            (batch_stride, 3 * heads * head_dim, heads * head_dim, head_dim, 1), 2**21)
    g = torch.Generator().manual_seed(19)
    qkv.copy_(torch.randn(qkv.shape, generator=g))
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    grad_out = torch.randn(q.shape, generator=g).to(q)
    start, end = (t.to(TRITON_DEVICE) for t in window_ranges(length, 5, 3))
    with use_backend("triton"):
        out, stats = torch.ops.kzoo.block_sparse_attention(q, k, v, start, end, 0.25)
        grads = torch.ops.kzoo.block_sparse_attention_backward(grad_out, q, k, v, out, stats, start, end, 0.25)
    out_ref, grads_ref = float64_reference(q, k, v, start, end, grad_out, scale=0.25)
    assert relative_error(out, out_ref) < TOLERANCE[torch.float16]
    for grad, grad_ref, label in zip(grads, grads_ref, "qkv"):
        assert relative_error(grad, grad_ref) < TOLERANCE[torch.float16], f"d{label}"
