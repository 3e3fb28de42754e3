"""The `cogft` command: tiny | prepare | train | sample | export | doctor | estimate | bench."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "PIL", "filelock", "torch.distributed", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, YAML-typed, e.g. train.max_steps=100")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cogft", description="Fine-tune CogVideoX text-to-video models.")
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("tiny", help="build the tiny random CogVideoX pipeline (diffusers layout)")
    tiny.add_argument("--out", help="folder to write (default: where tiny://FAMILY resolves)")
    tiny.add_argument("--family", choices=["2b", "5b"], default="2b")
    tiny.add_argument("--seed", type=int, default=0)

    _config_args(sub.add_parser("prepare", help="fill the latent/prompt cache for a config"))
    _config_args(sub.add_parser("train", help="train (same as python train.py / accelerate launch train.py)"))

    sample = sub.add_parser("sample", help="write an mp4 from a run's weights or a checkpoint")
    sample.add_argument("--from", dest="source", required=True, help="run directory or checkpoint folder")
    sample.add_argument("--prompt", required=True)
    sample.add_argument("--out", required=True, help="output .mp4 path")
    sample.add_argument("--steps", type=int, help="inference steps (default: validation.num_inference_steps)")
    sample.add_argument("--seed", type=int)
    sample.add_argument("--guidance-scale", type=float)
    sample.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    sample.add_argument("--cache", choices=["none", "pab", "first_block", "taylorseer"],
                        help="approximate inference cache (default: validation.cache of the run)")

    bench = sub.add_parser("bench", help="time the real training step (full size on a GPU), optionally beside the plain recipe")
    _config_args(bench)
    bench.add_argument("--baseline", action="store_true", help="also run the plain diffusers + peft recipe")
    bench.add_argument("--baseline-only", action="store_true", help="run only the plain recipe")
    bench.add_argument("--warmup", type=int, default=3)
    bench.add_argument("--steps", type=int, default=10)
    bench.add_argument("--profile", action="store_true", help="print the top kernels of one more step to stderr")
    bench.add_argument("--checkpoint", action="store_true", help="also time a checkpoint save and load")
    bench.add_argument("--sample", action="store_true", help="time a validation video instead of training steps")

    doctor = sub.add_parser("doctor", help="check every clip and caption without encoding anything")
    doctor.add_argument("target", metavar="CONFIG_OR_FOLDER", help="a config YAML, or a dataset folder / .csv / .jsonl")
    doctor.add_argument("overrides", nargs="*", help="section.key=value for a config, e.g. data.min_frames=9")
    doctor.add_argument("--json", action="store_true", help="print the machine-readable report")

    estimate = sub.add_parser("estimate", help="predict peak GPU memory and s/step for a config, before any GPU time")
    _config_args(estimate)
    estimate.add_argument("--gpu", default="H100", help="H100, H200, A100, L40S or 4090")
    estimate.add_argument("--json", action="store_true", help="print one JSON line")

    export = sub.add_parser("export", help="write diffusers-format weights of a run or checkpoint")
    export.add_argument("--from", dest="source", required=True, help="run directory or checkpoint folder")
    export.add_argument("--out", required=True, help="folder to write")
    export.add_argument("--merge", action="store_true", help="write a whole pipeline with the weights fused in")
    return parser


def run_train(config_path: str, overrides: list[str]) -> Path:
    """Shared by `cogft train` and train.py."""
    from .config import load_config

    config = load_config(config_path, overrides)  # fails fast, before the heavy imports below
    from .training.loop import train

    _setup_logging()
    return train(config)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .config import ConfigError
    from .data.sources import DatasetLayoutError
    from .training.backends import BackendError
    from .training.checkpointing import ResumeError

    user_errors = (ConfigError, DatasetLayoutError, ResumeError, BackendError, FileNotFoundError, FileExistsError)
    try:
        if args.command == "train":
            run_train(args.config, args.overrides)
            return 0
        _setup_logging()
        if args.command == "tiny":
            from .models.tiny import build_tiny_pipeline, tiny_dir

            print(build_tiny_pipeline(args.out or tiny_dir(args.family), args.family, args.seed))
        elif args.command == "prepare":
            import torch

            from .config import load_config
            from .data.cache import prepare, write_report
            from .models.loading import family_for

            config = load_config(args.config, args.overrides)
            family = family_for(config.model.path, config.model.dtype, config.model.revision)
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            prepared = prepare(config, family, device)
            report = write_report(prepared.report, config.output_dir)
            summary = prepared.summary
            print(f"{summary['kept']} clips ready ({summary['encoded']} encoded, {summary['cached']} cached), "
                  f"{summary['skipped']} skipped {summary['skipped_by_reason'] or ''}; buckets {summary['buckets']}; "
                  f"report: {report}")
        elif args.command == "doctor":
            from .data.doctor import diagnose, format_table

            with contextlib.redirect_stdout(sys.stderr):  # libraries print banners; stdout carries only the report
                report = diagnose(args.target, args.overrides)
            print(json.dumps(report) if args.json else format_table(report))
        elif args.command == "sample":
            from .sampling import sample

            print(sample(args.source, args.prompt, args.out, args.steps, args.seed, args.guidance_scale, args.device,
                         args.cache))
        elif args.command == "bench":
            from .config import load_config

            config = load_config(args.config, args.overrides)
            if args.sample:
                from .bench_sample import bench_sample

                bench_sample(config, args.baseline, args.profile, emit=lambda row: print(json.dumps(row), flush=True))
            else:
                from .bench import bench

                bench(config, args.baseline, args.baseline_only, args.warmup, args.steps, args.profile, args.checkpoint)
        elif args.command == "estimate":
            from dataclasses import asdict

            from .config import load_config
            from .estimate import as_trained, estimate, format_estimate
            from .models.loading import component_configs

            config = load_config(args.config, args.overrides)
            configs = component_configs(config.model.path, config.model.revision)
            config = as_trained(config, configs, args.gpu)
            result = estimate(config, configs, args.gpu)
            print(json.dumps(asdict(result)) if args.json else format_estimate(config, result))
        elif args.command == "export":
            from .export import export

            print(export(args.source, args.out, args.merge))
    except user_errors as error:
        print(f"cogft {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
