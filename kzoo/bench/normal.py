"""``kzoo bench normal``: images/s of the StableNormal pipeline and of the scene renderer.

- Pipeline: ``StableNormal.predict`` on the bundled model's architecture, turbo (YOSO alone) and
  SG-DRN at the default steps, at each resolution (the longer side the networks see), timed in
  alternation in one process; the ratio is the median of per-round ratios.
- Renderer: ``kzoo data normals``' scenes at 128x128 on as many processes as ``--workers`` (two,
  the cores of the reference machine), end to end through the same generator ``export`` uses.

The model is the bundled one unless ``checkpoint`` names another.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from kzoo.models.stablenormal import DEFAULT_STEPS

from .common import bar_chart, device_name, environment, interleaved_times_ms, paired_speedup, write_results

RENDER_SIZE = 128


def _pipeline(device: torch.device, checkpoint=None):
    from kzoo.normal import BUNDLED
    from kzoo.train.tasks.normal import load_pipeline

    return load_pipeline(checkpoint or BUNDLED).to(device)


def measure_pipeline(pipeline, resolution: int, batch: int, steps: int, device: torch.device, warmup: int,
                     iters: int) -> dict:
    images = torch.rand(batch, 3, resolution, resolution, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None

    def run(n_steps):
        def step():
            if autocast is None:
                pipeline.predict(images, steps=n_steps, resolution=resolution)
            else:
                with autocast:
                    pipeline.predict(images, steps=n_steps, resolution=resolution)
        return step

    times = interleaved_times_ms({"turbo": run(0), "refined": run(steps)}, device, warmup, iters)
    return dict(resolution=resolution, batch=batch, steps=steps,
                images_per_s={name: batch / statistics.median(t) * 1e3 for name, t in times.items()},
                refined_over_turbo_time=paired_speedup(times["turbo"], times["refined"]) ** -1)


def measure_renderer(count: int, workers: int) -> dict:
    from kzoo.data.normals import render_samples

    start = time.perf_counter()
    rendered = sum(1 for _ in render_samples(1234, range(count), (RENDER_SIZE, RENDER_SIZE), workers=workers))
    seconds = time.perf_counter() - start
    return dict(size=RENDER_SIZE, images=rendered, workers=workers, seconds=seconds, images_per_s=rendered / seconds)


def run(device: torch.device, resolutions=None, batch: int | None = None, iters: int | None = None,
        render_images: int = 256, workers: int = 2, out_dir: Path = Path("bench/results"), checkpoint=None) -> dict:
    on_gpu = device.type == "cuda"
    resolutions = [int(r) for r in (resolutions or (256, 512))]
    iters = iters or (20 if on_gpu else 3)
    pipeline = _pipeline(device, checkpoint)
    rows = []
    for resolution in resolutions:
        row = measure_pipeline(pipeline, resolution, batch or (8 if on_gpu else 1), DEFAULT_STEPS, device,
                               warmup=2 if on_gpu else 1, iters=iters)
        rows.append(row)
        ips = row["images_per_s"]
        print(f"{resolution}px: turbo {ips['turbo']:.2f} img/s, {DEFAULT_STEPS} steps {ips['refined']:.2f} img/s")
    renderer = measure_renderer(render_images, workers)
    print(f"renderer: {renderer['images_per_s']:.1f} img/s at {RENDER_SIZE}px on {workers} processes")
    name = f"normal-{device_name(device)}"
    payload = dict(benchmark="normal", environment=environment(device),
                   precision="amp_bfloat16" if on_gpu else "float32", iters=iters, rows=rows, renderer=renderer)
    json_path = write_results(out_dir, name, payload)
    groups = [f"{row['resolution']}px" for row in rows] + [f"renderer\n{RENDER_SIZE}px"]
    series = {"turbo": [row["images_per_s"]["turbo"] for row in rows] + [float("nan")],
              f"{DEFAULT_STEPS} steps": [row["images_per_s"]["refined"] for row in rows] + [float("nan")],
              "renderer": [float("nan")] * len(rows) + [renderer["images_per_s"]]}
    plot = bar_chart(out_dir / f"{name}.png", f"StableNormal images/s, {payload['precision']}, {device_name(device)}",
                     groups, series, "images/s (higher is better)")
    return dict(payload=payload, json=json_path, plot=plot)


def table(payload: dict) -> str:
    lines = ["| resolution | batch | turbo img/s | refined img/s | steps | refined time / turbo time |",
             "|---:|---:|---:|---:|---:|---:|"]
    for row in payload["rows"]:
        ips = row["images_per_s"]
        lines.append(f"| {row['resolution']}px | {row['batch']} | {ips['turbo']:.2f} | {ips['refined']:.2f} | "
                     f"{row['steps']} | {row['refined_over_turbo_time']:.1f}x |")
    r = payload["renderer"]
    lines.append(f"\nrenderer: {r['images_per_s']:.1f} images/s at {r['size']}x{r['size']} on {r['workers']} "
                 f"processes ({r['images']} images in {r['seconds']:.1f} s)")
    return "\n".join(lines)
