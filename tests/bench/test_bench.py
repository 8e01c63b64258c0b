"""The benchmarks run end to end and write their JSON and plot (speed itself is not tested here)."""
import json
import time

import pytest
import torch

from kzoo.bench import models, rational


def test_rational_bench_writes_results(tmp_path):
    result = rational.run(torch.device("cpu"), batch=1, repeats=1, out_dir=tmp_path)
    payload = json.loads(result["json"].read_text())
    assert [row["shape"] for row in payload["rows"]] == [[1, 197, 768], [1, 197, 3072]]
    for row in payload["rows"]:
        assert set(row["timings"]) == {"kzoo", "reference", "reference+compile", "gelu"}
        assert all(t["forward_ms"] > 0 and t["forward_backward_ms"] > 0 for t in row["timings"].values())
    assert result["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 1x197x768 | float32 | kzoo |" in rational.table(payload)


def test_models_bench_writes_results(tmp_path):
    result = models.run(torch.device("cpu"), sizes=("tiny",), batch=1, warmup=1, iters=1, out_dir=tmp_path)
    payload = json.loads(result["json"].read_text())
    assert [row["model"] for row in payload["rows"]] == ["kat_tiny_patch16_224", "deit_tiny_patch16_224"]
    assert payload["rows"][0]["param_count"] == 5_718_328
    assert payload["kat_over_deit"]["tiny"]["infer"] > 0
    assert result["plot"].read_bytes()[:4] == b"\x89PNG"


def test_attention_bench_writes_results(tmp_path):
    from kzoo.bench import attention

    result = attention.run(torch.device("cpu"), resolutions=(256,), depths=("d16",), repeats=1, out_dir=tmp_path,
                           min_seconds=0.0)
    payload = json.loads(result["json"].read_text())
    assert [(r["mode"], r["length"], r["allowed_pairs"]) for r in payload["rows"]] == [
        ("markov", 680, 110_468), ("block_causal", 680, 286_434), ("causal", 680, 680 * 681 // 2)]
    for row in payload["rows"]:
        assert row["rounds"] == {"forward": 1, "forward_backward": 1}
        assert set(row["timings"]) == {"kzoo", "sdpa_masked", "sdpa_dense"}
        # With one round, a speedup is the baseline's time over the method's in that round.
        masked = row["timings"]["sdpa_masked"]
        for timing in row["timings"].values():
            for kind in ("forward", "forward_backward"):
                assert timing[f"{kind}_speedup_vs_sdpa_masked"] == pytest.approx(
                    masked[f"{kind}_ms"] / timing[f"{kind}_ms"], rel=1e-12)
    assert result["plot"].read_bytes()[:4] == b"\x89PNG"


def test_flex_baseline_sees_the_same_keys():
    """The GPU-only FlexAttention baseline, built from the ranges, computes the reference attention
    (its forward also runs on CPU); a wrong mask_mod would make every GPU comparison meaningless."""
    from kzoo.bench import attention
    from kzoo.kernels import reference, scale_ranges

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    for mode in ("markov", "block_causal"):
        start, end = scale_ranges((1, 2, 3, 5, 8), mode)  # 103 tokens, scales cut across flex's blocks
        q, k, v = (torch.randn(1, 2, 103, 16, generator=g) for _ in range(3))
        flex = attention._flex(start, end, 103, torch.device("cpu"))
        expected = reference.block_sparse_attention(*(t.double() for t in (q, k, v)), start, end)
        torch.testing.assert_close(flex(q, k, v).double(), expected, rtol=1e-5, atol=1e-5)


def test_interleaved_rounds_run_every_step_once_in_shuffled_orders():
    from kzoo.bench.common import interleaved_times_ms

    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = interleaved_times_ms(steps, torch.device("cpu"), warmup=1, iters=12)
    rounds = [tuple(calls[i:i + 3]) for i in range(3, len(calls), 3)]  # after the warm-up round
    assert len(rounds) == 12 and all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert len(set(rounds)) > 1  # not one fixed order, in which each step always follows the same one
    assert {name: len(t) for name, t in times.items()} == {"a": 12, "b": 12, "c": 12}


def test_interleaved_rounds_go_on_until_the_time_floor():
    from kzoo.bench.common import interleaved_times_ms

    steps = {name: (lambda: time.sleep(0.002)) for name in "ab"}
    times = interleaved_times_ms(steps, torch.device("cpu"), warmup=0, iters=2, min_seconds=0.05)
    rounds = len(times["a"])
    assert len(times["b"]) == rounds
    assert sum(times["a"]) + sum(times["b"]) >= 50.0  # ms
    # the round before the last still fell short of the floor: no round more than needed
    assert sum(times["a"][:-1]) + sum(times["b"][:-1]) < 50.0 and rounds > 2


def test_paired_speedup_is_the_median_of_same_round_ratios():
    from kzoo.bench.common import paired_speedup

    # Round ratios 2, 3, 1: median 2; the ratio of the medians would be 12 / 10 = 1.2.
    assert paired_speedup([10.0, 30.0, 12.0], [5.0, 10.0, 12.0]) == 2.0


def test_normal_bench_writes_results(tmp_path):
    from kzoo.bench import normal
    from kzoo.train.tasks.normal import build_pipeline, save_pipeline

    estimator = {"model": "yoso_kat", "embed_dim": 32, "depth": 1, "num_heads": 2, "stem_widths": [8, 16],
                 "out_widths": [16, 16], "native_size": 32}
    refiner = {"model": "sgdrn_small", "semantic_channels": 16, "widths": [8, 16], "dim": 32, "depth": 1,
               "num_heads": 2, "cond_dim": 32}
    save_pipeline(build_pipeline(estimator, refiner), tmp_path / "tiny.safetensors", estimator, refiner)
    result = normal.run(torch.device("cpu"), resolutions=(48,), iters=1, render_images=3, workers=0,
                        out_dir=tmp_path, checkpoint=tmp_path / "tiny.safetensors")
    payload = json.loads(result["json"].read_text())
    row, = payload["rows"]
    assert row["resolution"] == 48 and row["steps"] == 10
    assert row["images_per_s"]["turbo"] > row["images_per_s"]["refined"] > 0
    assert payload["renderer"]["images"] == 3 and payload["renderer"]["images_per_s"] > 0
    assert result["plot"].read_bytes()[:4] == b"\x89PNG"
    assert "| 48px | 1 |" in normal.table(payload)
