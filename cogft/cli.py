"""The `cogft` command: a table of subcommands, each an argument setup and a function to run."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "PIL", "filelock", "torch.distributed", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, YAML-typed, e.g. train.max_steps=100")


def _config(args):
    """The validated config: fails fast, before any heavy import."""
    from .config_file import load_config

    return load_config(args.config, args.overrides)


def _tiny_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", help="folder to write (default: where tiny://NAME resolves)")
    parser.add_argument("--family", default="2b",
                        help="the variant, as in tiny://NAME: 2b, 5b, 5b-i2v, 1.5-5b or 1.5-5b-i2v")
    parser.add_argument("--seed", type=int, default=0)


def _tiny(args) -> None:
    from .models.build import TINY_SCHEME, build_pipeline, tiny_dir
    from .models.registry import spec_named

    print(build_pipeline(args.out or tiny_dir(args.family), spec_named(args.family, TINY_SCHEME), seed=args.seed))


def run_train(config_path: str, overrides: list[str]) -> Path:
    """Shared by `cogft train` and train.py."""
    from .config_file import load_config

    config = load_config(config_path, overrides)  # fails fast, before the heavy imports below
    from .training.loop import train

    return train(config)


def _prepare(args) -> None:
    config = _config(args)
    import torch

    from .data.cache import prepare, write_report
    from .data.images import check_validation_images
    from .models.loading import load_for_config

    config, variant = load_for_config(config)
    check_validation_images(config.validation.images)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prepared = prepare(config, variant, device)
    report = write_report(prepared.report, config.output_dir)
    summary = prepared.summary
    print(f"{summary['kept']} clips ready ({summary['encoded']} encoded, {summary['cached']} cached), "
          f"{summary['skipped']} skipped {summary['skipped_by_reason'] or ''}; buckets {summary['buckets']}; "
          f"host memory peak {summary['host_peak_gib']} GiB; report: {report}")
    for key, counts in summary.get("sets", {}).items():  # data.sets: each set's count
        print(f"  {key} ({counts['kind']}, {counts['path']}): {counts['kept']} of {counts['clips']} ready, "
              f"{counts['skipped']} skipped")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


def _unit_float(text: str) -> float:
    value = _finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value}: must be above 0 and at most 1")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: not a number") from None
    if not math.isfinite(value):  # inf renders a black video, nan turns guidance off, each with exit 0
        raise argparse.ArgumentTypeError(f"{text}: must be a finite number")
    return value


def _sample_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source", required=True, help="run directory or checkpoint folder")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--out", required=True, help="output .mp4 path")
    parser.add_argument("--steps", type=_positive_int, help="inference steps (default: validation.num_inference_steps)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--guidance-scale", type=_finite_float)
    parser.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--cache", choices=["none", "pab", "first_block", "taylorseer"],
                        help="approximate inference cache (default: validation.cache of the run)")
    parser.add_argument("--image", help="image-to-video models: the image to start from (cropped to the video's size "
                                        "as the training clips were)")
    parser.add_argument("--control", help="control models: the control video (read as the run read its clips' "
                                          "controls: the run's data.control extractor, if any, runs on it)")
    parser.add_argument("--video", help="text-to-video models: a source video to restyle under the prompt (SDEdit, "
                                        "through diffusers' video-to-video pipeline; read as the run read its clips)")
    parser.add_argument("--strength", type=_unit_float, default=0.8,
                        help="with --video: how far the source is noised before denoising (0: kept, 1: ignored; "
                             "default 0.8)")
    parser.add_argument("--frames", type=_positive_int, help="frames, 4k+1 (default: the run's data.num_frames)")
    parser.add_argument("--height", type=_positive_int, help="pixels (default: the run's data.height, or its largest "
                                                             "data.buckets size)")
    parser.add_argument("--width", type=_positive_int, help="pixels (default: the run's data.width, or its largest "
                                                            "data.buckets size)")


def _sample(args) -> None:
    from .inference.sampling import sample

    print(sample(args.source, args.prompt, args.out, args.steps, args.seed, args.guidance_scale, args.device,
                 args.cache, image=args.image, control=args.control, video=args.video, strength=args.strength,
                 frames=args.frames, height=args.height, width=args.width))


def _export_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source", required=True, help="run directory or checkpoint folder")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--merge", action="store_true", help="write a whole pipeline with the weights fused in")
    parser.add_argument("--best", action="store_true", help="the run's checkpoint with the lowest held-out eval loss "
                                                            "(RUN/best.json; needs eval.holdout)")
    parser.add_argument("--recommended", action="store_true", help="the run's recommended checkpoint: the lowest "
                        "held-out eval loss within quality.* limits (RUN/recommended.json; needs eval.holdout)")
    parser.add_argument("--format", dest="formats", metavar="FORMAT[,FORMAT]",
                        type=lambda text: [part.strip() for part in text.split(",") if part.strip()],
                        help="LoRA files to write: diffusers (always), comfyui (ComfyUI's own loader), kohya "
                             "(kijai's CogVideoXWrapper); default: the run's lora.export_format")
    parser.add_argument("--push-to-hub", metavar="OWNER/NAME",
                        help="then upload the export to this Hugging Face model repository (created if missing)")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")


def _export(args) -> None:
    from .config import ConfigError
    from .inference.export import export
    from .inference.hub import card_folder, check_hub_push, push

    if args.private and not args.push_to_hub:
        raise ConfigError("--private applies to --push-to-hub OWNER/NAME; add it, or leave out --private")
    if args.push_to_hub:  # before the export, which can take minutes (--merge)
        check_hub_push(args.push_to_hub, "--push-to-hub")
    out = export(args.source, args.out, args.merge, args.best, args.recommended, args.formats)
    print(out)
    if args.push_to_hub:
        retry = (f"cogft export --from {args.source} --out ANOTHER_DIR{' --merge' if args.merge else ''}"
                 f"{' --best' if args.best else ''}{' --recommended' if args.recommended else ''}"
                 f"{' --format ' + ','.join(args.formats) if args.formats else ''} "
                 f"--push-to-hub {args.push_to_hub}{' --private' if args.private else ''}")
        print(push(card_folder(out), args.push_to_hub, True if args.private else None, retry))


def _doctor_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="CONFIG_OR_FOLDER", nargs="?",
                        help="a config YAML, or a dataset folder / .csv / .jsonl")
    parser.add_argument("overrides", nargs="*", help="section.key=value for a config, e.g. data.min_frames=9")
    parser.add_argument("--json", action="store_true", help="print the machine-readable report")
    parser.add_argument("--losses", metavar="RUN", help="instead: the clips whose training loss stands out in RUN")


def _doctor(args) -> None:
    from .config import ConfigError

    if args.losses:
        if args.target or args.overrides:
            raise ConfigError("--losses RUN reads a run folder alone; leave out CONFIG_OR_FOLDER and overrides")
        from .training.clip_outliers import clip_losses, format_clip_losses

        report = clip_losses(args.losses)
        print(json.dumps(report) if args.json else format_clip_losses(report))
        return
    if not args.target:
        raise ConfigError("give a CONFIG_OR_FOLDER to check, or --losses RUN for a trained run's clips")
    from .data.doctor import diagnose, format_table

    with contextlib.redirect_stdout(sys.stderr):  # libraries print banners; stdout carries only the report
        report = diagnose(args.target, args.overrides)
    print(json.dumps(report) if args.json else format_table(report))


def _estimate_args(parser: argparse.ArgumentParser) -> None:
    _config_args(parser)
    parser.add_argument("--gpu", default="H100", help="H100, H200, A100, L40S, A6000, 4090, 4080, 3090, 4070, "
                                                      "4060Ti, L4 or A10 (its speed; its memory unless --gpu-memory)")
    parser.add_argument("--gpu-memory", type=float, metavar="GIB", help="plan for a card with this much memory")
    parser.add_argument("--host-ram", type=float, metavar="GIB", help="check the host memory against this much RAM")
    parser.add_argument("--json", action="store_true", help="print one JSON line")


def _estimate(args) -> None:
    config = _config(args)
    from .bench.estimate import run_estimate

    print(run_estimate(config, args.gpu, args.json, args.gpu_memory, args.host_ram))


def _bench_args(parser: argparse.ArgumentParser) -> None:
    _config_args(parser)
    parser.add_argument("--baseline", action="store_true", help="also run the plain diffusers + peft recipe")
    parser.add_argument("--baseline-only", action="store_true", help="run only the plain recipe")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--profile", action="store_true", help="print the top kernels of one more step to stderr")
    parser.add_argument("--checkpoint", action="store_true", help="also time a checkpoint save and load")
    parser.add_argument("--loss-mask", action="store_true", help="time the step on a batch carrying a random loss "
                                                                  "mask against the same batch without, on one model")
    parser.add_argument("--sample", action="store_true", help="time a validation video instead of training steps")
    parser.add_argument("--eval", type=_positive_int, metavar="CLIPS",
                        help="time the held-out eval on this many clips against the training step")
    parser.add_argument("--trigger", action="store_true", help="with --eval: also time it with every caption carrying "
                                                                "a trigger (eval/trigger_gain) and quality/bleed on "
                                                                "the validation prompts, as a second row")
    parser.add_argument("--buckets", action="store_true", help="time the step at each size of data.buckets (after all "
                                                               "have run) against the first size alone, per token")
    parser.add_argument("--prior", action="store_true", help="time the LoRA step on a kind: prior batch (one more "
                                                             "forward, the adapter off) against a clip batch")
    parser.add_argument("--validation", action="store_true", help="time one validation without and with the motion "
                        "guard (quality.motion: base renders, optical flow) and its share of a run")
    parser.add_argument("--fp8-error", action="store_true", help="how far model.fp8_base moves the model's prediction "
                                                                 "(random:// weights, or the model.path given)")
    parser.add_argument("--gpu-memory", type=float, metavar="GIB", help="train as on a card with this much memory: "
                        "planned for it (train.memory_budget_gib: auto, train.blocks_to_swap: auto) and held to it")


def _bench(args) -> None:
    config = _config(args)
    others = [flag for flag, on in (("--sample", args.sample), ("--eval", args.eval), ("--buckets", args.buckets),
                                    ("--fp8-error", args.fp8_error), ("--prior", args.prior),
                                    ("--validation", args.validation)) if on]
    if args.loss_mask and others:
        from .config import ConfigError

        raise ConfigError(f"--loss-mask times the training step with a masked loss; leave out {others[0]}")
    if args.trigger and not args.eval:
        from .config import ConfigError

        raise ConfigError("--trigger times the held-out eval with its trigger measures: give --eval CLIPS too")
    if args.sample:
        from .bench.sampling import bench_sample

        bench_sample(config, args.baseline, args.profile, emit=lambda row: print(json.dumps(row), flush=True))
    elif args.eval:
        from .bench.training import bench_eval

        bench_eval(config, args.eval, args.warmup, args.steps, trigger=args.trigger)
    elif args.buckets:
        from .bench.training import bench_buckets

        bench_buckets(config, args.warmup, args.steps)
    elif args.prior or args.loss_mask:
        from .bench.training import bench_paired

        bench_paired(config, "prior" if args.prior else "loss_mask", args.warmup, args.steps)
    elif args.validation:
        from .bench.validation import bench_validation

        bench_validation(config, args.warmup, args.steps)
    elif args.fp8_error:
        from .bench.fp8 import bench_fp8_error

        bench_fp8_error(config)
    else:
        from .bench.training import bench

        bench(config, args.baseline, args.baseline_only, args.warmup, args.steps, args.profile, args.checkpoint,
              args.gpu_memory)


def _split_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC_FOLDER", help="the long videos: a folder (a caption NAME.txt beside "
                        "NAME.mp4 is carried to its clips), any list data.path takes, or one video")
    parser.add_argument("out", metavar="OUT_FOLDER", help="new or empty folder for the clips and their lists (or an "
                        "earlier split's, to resume it)")
    parser.add_argument("--config", help="take the clip length from this config's data.num_frames, data.fps and "
                                         "data.min_frames (default: --frames/--fps)")
    parser.add_argument("--frames", type=_positive_int, help="frames per clip (default 49, CogVideoX 2B/5B's)")
    parser.add_argument("--fps", type=_finite_float, help="the rate those frames are taken at (default 8)")
    parser.add_argument("--stride", type=_positive_int, help="frames (at that rate) from one clip's start to the "
                        "next in a scene; below --frames the clips overlap (default: --frames, back to back)")
    parser.add_argument("--keep-short", action="store_true", help="keep a scene shorter than one clip whole when it "
                        "fills the shortest frame bucket (data.min_frames; default min(17, frames)), instead of "
                        "skipping it")
    parser.add_argument("--detector", choices=["adaptive", "content"], default="adaptive",
                        help="PySceneDetect's detector (default adaptive: steadier under camera motion)")
    parser.add_argument("--threshold", type=_finite_float, help="the detector's threshold (lower: more cuts; "
                                                                "default PySceneDetect's: 3 adaptive, 27 content)")
    parser.add_argument("--crf", type=int, default=17, choices=range(0, 52), metavar="0-51",
                        help="libx264 quality of the clips (default 17; lower is closer to the source)")


def _split(args) -> None:
    from .config import ConfigError

    if args.config and (args.frames or args.fps):
        raise ConfigError("--config sets the clip length (data.num_frames, data.fps); leave out --frames/--fps, or "
                          "the config")
    if args.fps is not None and args.fps <= 0:
        raise ConfigError(f"--fps {args.fps:g}: must be above 0")
    frames, fps, min_frames = args.frames or 49, args.fps or 8.0, None
    if args.config:
        from .config_file import load_config

        data = load_config(args.config).data
        frames, fps, min_frames = data.num_frames, data.fps, data.shortest_bucket
    from .data.split import SplitSettings, split, summary_text

    settings = SplitSettings(frames, fps, args.stride or frames,
                             (min_frames or min(17, frames)) if args.keep_short else None, args.detector,
                             args.threshold, args.crf)
    print(summary_text(split(args.src, args.out, settings)))


def _compare_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="two run directories or more")
    parser.add_argument("--out", default="compare.html", help="the page to write (default: compare.html)")


def _compare(args) -> None:
    from .training.compare import write_comparison

    print(write_comparison(args.runs, args.out))


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]


COMMANDS = {
    "tiny": Command("build a tiny random CogVideoX pipeline (diffusers layout)", _tiny_args, _tiny),
    "prepare": Command("fill the latent/prompt cache for a config", _config_args, _prepare),
    "train": Command("train (same as python train.py / accelerate launch train.py)", _config_args,
                     lambda args: run_train(args.config, args.overrides)),
    "sample": Command("write an mp4 from a run's weights or a checkpoint", _sample_args, _sample),
    "export": Command("write diffusers-format weights of a run or checkpoint", _export_args, _export),
    "compare": Command("put runs side by side in one HTML page: settings, curves, measures, renders", _compare_args,
                       _compare),
    "doctor": Command("check every clip and caption without encoding anything", _doctor_args, _doctor),
    "estimate": Command("predict peak GPU memory and s/step for a config, before any GPU time", _estimate_args,
                        _estimate),
    "bench": Command("time the real training step (full size on a GPU), optionally beside the plain recipe",
                     _bench_args, _bench),
    "split": Command("cut long videos at scene changes into clips of the model's length, with their lists",
                     _split_args, _split),
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="cogft", description="Fine-tune CogVideoX video models.")
    parser.add_argument("--version", action="version", version=f"cogft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.help))
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with `section.key=value` overrides allowed on either side of the flags (argparse alone
    takes them only as one run: `... a=1 --flag x b=2` would refuse `b=2`)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [arg for arg in extra if "=" in arg and not arg.startswith("-")]
    unknown = [arg for arg in extra if arg not in overrides]
    if unknown or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .config import ConfigError  # the user's errors (a resume or backend mismatch too); light modules only,
    from .data.sources import DatasetLayoutError  # so a bad config fails before torch is imported

    user_errors = (ConfigError, DatasetLayoutError, FileNotFoundError, FileExistsError)
    try:
        _setup_logging()
        with logging_redirect_tqdm():  # log lines above the progress bars, never glued into one
            COMMANDS[args.command].run(args)
    except user_errors as error:
        print(f"cogft {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
