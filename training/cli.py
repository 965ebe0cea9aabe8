"""`valley-train`: thin command line over the training library.

`train`, `fge`, `sse`, `distill` and `curve` also run as several processes under `torchrun` (`training.distributed`):
`torchrun --nproc_per_node=N -m training.cli train ...`; rank 0 alone logs events and prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from artefact.config import CONFIG_FILE, ConfigError, parse, read_config, set_key, write_config
from training.errors import UsageError

if TYPE_CHECKING:
    from training.config import TrainConfig


DATA_ARGUMENTS = ("dataset", "data_dir", "download", "val_size", "subset", "image_size", "batch_size", "workers")


def _add_data_arguments(parser: argparse.ArgumentParser, defaults: bool = True) -> None:
    """The data flags; `defaults` False leaves them None (fge: they apply only with --init)."""
    from training.data import DATASETS

    def default(value: object) -> object:
        return value if defaults else None

    parser.add_argument("--dataset", default=default("fashion-mnist"), help=f"one of {', '.join(DATASETS)}")
    parser.add_argument("--data-dir", type=Path, help="folder holding the dataset (default per dataset)")
    parser.add_argument("--download", action="store_true", default=default(False),
                        help="let torchvision download CIFAR")
    parser.add_argument("--val-size", type=int,
                        help="training images held out for validation (default 5000; 10%% for imagefolder)")
    parser.add_argument("--subset", type=int, help="use at most N images of each split (smoke runs)")
    parser.add_argument("--image-size", type=int, default=default(224), help="crop size for imagefolder")
    parser.add_argument("--batch-size", type=int, default=default(128))
    parser.add_argument("--workers", type=int, default=default(0), help="DataLoader workers (imagefolder)")


def _add_init_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--init", type=Path, metavar="PATH",
                        help="start from weights trained elsewhere: a state_dict file, a checkpoint dict holding one, "
                             "or torchvision's weights read from disk (keys matched strictly; nothing downloaded)")
    parser.add_argument("--reset-head", action="store_true",
                        help="with --init: start the classifier head afresh (weights trained on other classes)")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log every epoch")
    parser = argparse.ArgumentParser(prog="valley-train", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", parents=[common], help="train one network with the base schedule")
    _add_data_arguments(train)
    train.add_argument("--model", default="cnn", help="registered model name or torchvision:<name>")
    train.add_argument("--epochs", type=int, default=40, help="the budget B")
    train.add_argument("--lr", type=float, default=0.05, help="initial learning rate lr0")
    train.add_argument("--momentum", type=float, default=0.9)
    train.add_argument("--weight-decay", type=float, default=5e-4)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    train.add_argument("--save-epoch", type=int, action="append", default=[], dest="save_epochs",
                       help="also keep the checkpoint of this epoch (repeatable); 80%% of the budget is always kept")
    train.add_argument("--out", type=Path, required=True, help="run directory")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    _add_init_arguments(train)

    fge = commands.add_parser("fge", parents=[common], help="Fast Geometric Ensembling from a base run, or from "
                              "weights trained elsewhere (--init)")
    start = fge.add_mutually_exclusive_group(required=True)
    start.add_argument("--from", dest="base_run", type=Path, help="base run directory")
    start.add_argument("--init", type=Path, metavar="PATH",
                       help="weights trained elsewhere (a state_dict file; keys matched strictly), with --model and "
                            "--dataset: the cycles start from them, and they are the baseline")
    fge.add_argument("--reset-head", action="store_true", help="with --init: start the classifier head afresh")
    fge.add_argument("--model", help="with --init: the registered model or torchvision:<name> the weights are for")
    fge.add_argument("--momentum", type=float, help="with --init (default 0.9; from a base run: the run's)")
    fge.add_argument("--weight-decay", type=float, help="with --init (default 5e-4; from a base run: the run's)")
    _add_data_arguments(fge, defaults=False)
    fge.add_argument("--start-epoch", type=int, help="checkpoint to start from (default 80%% of the budget)")
    fge.add_argument("--cycles", type=int, help="number of cycles K (default: the rest of the base budget)")
    fge.add_argument("--cycle-epochs", type=int, default=2, help="cycle length c in epochs")
    fge.add_argument("--lr1", type=float, default=0.01, help="high learning rate, at the cycle's ends")
    fge.add_argument("--lr2", type=float, default=0.0005, help="low learning rate, at the snapshot")
    fge.add_argument("--seed", type=int, help="batch-order seed (default: the base run's)")
    fge.add_argument("--device", default="auto")
    fge.add_argument("--out", type=Path, required=True, help="FGE run directory")
    fge.add_argument("--resume", action="store_true")

    sse = commands.add_parser("sse", parents=[common], help="a snapshot ensemble: cosine cycles with restarts, "
                              "one member per cycle (Huang et al. 2017)")
    _add_data_arguments(sse)
    sse.add_argument("--model", default="cnn", help="registered model name or torchvision:<name>")
    _add_init_arguments(sse)
    sse.add_argument("--epochs", type=int, default=40, help="the budget B, split into the cycles")
    sse.add_argument("--cycles", type=int, default=5, help="cosine cycles M, one member each (default 5)")
    sse.add_argument("--lr", type=float, default=0.05, help="lr0, where every cycle restarts (default 0.05)")
    sse.add_argument("--momentum", type=float, default=0.9)
    sse.add_argument("--weight-decay", type=float, default=5e-4)
    sse.add_argument("--seed", type=int, default=0)
    sse.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    sse.add_argument("--out", type=Path, required=True, help="SSE run directory")
    sse.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")

    swa = commands.add_parser("swa", parents=[common], help="average an FGE or SSE run's snapshots into one network "
                              "(stochastic weight averaging), batch norm recomputed")
    swa.add_argument("--from", dest="source_run", type=Path, required=True, help="FGE or SSE run directory")
    swa.add_argument("--members", type=int, help="average the first K snapshots (default: all)")
    swa.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    swa.add_argument("--out", type=Path, required=True, help="SWA run directory")

    distill = commands.add_parser("distill", parents=[common], help="train one network on an FGE or SSE "
                                  "ensemble's probabilities (knowledge distillation)")
    distill.add_argument("--teacher", dest="teacher_run", type=Path, required=True, help="FGE or SSE run directory")
    distill.add_argument("--members", type=int, help="the teacher's first K snapshots (default: all)")
    distill.add_argument("--temperature", type=float, default=2.0,
                         help="of the softmax in the loss, teacher's and student's (default 2; choose on validation)")
    distill.add_argument("--hard-label-weight", type=float, default=0.0,
                         help="share of the loss that is the cross-entropy with the true labels (default 0)")
    distill.add_argument("--epochs", type=int, help="the student's budget (default: the teacher's base budget)")
    distill.add_argument("--lr", type=float, help="initial learning rate of the base schedule (default: the "
                                                  "teacher's)")
    distill.add_argument("--seed", type=int, default=0)
    distill.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    distill.add_argument("--out", type=Path, required=True, help="student run directory")
    distill.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")

    curve = commands.add_parser("curve", parents=[common], help="train a low-loss curve between two base runs")
    # --start-run also: torchrun's own parser takes a bare --start for an abbreviation of its --start-method.
    curve.add_argument("--start", "--start-run", dest="start_run", type=Path, required=True,
                       help="base run at t = 0, or a weight file (a state_dict trained elsewhere)")
    curve.add_argument("--end", "--end-run", dest="end_run", type=Path, required=True,
                       help="base run at t = 1, or a weight file")
    curve.add_argument("--model", help="where both endpoints are weight files: the registered model, "
                                       "torchvision:<name> or timm:<name> they are for")
    _add_data_arguments(curve, defaults=False)
    curve.add_argument("--curve", choices=["bezier", "polychain"], default="bezier",
                       help="Bezier curve (Bernstein polynomials) or polygonal chain (default bezier)")
    curve.add_argument("--bends", type=int, default=1, help="trainable control points between the endpoints (1..32, "
                                                            "default 1)")
    curve.add_argument("--epochs", type=int, help="budget (default: the start run's)")
    curve.add_argument("--lr", type=float, default=0.03, help="initial learning rate of the base schedule (0.03)")
    curve.add_argument("--momentum", type=float, help="default: the start run's")
    curve.add_argument("--weight-decay", type=float, help="L2 on the weights at t (default: the start run's)")
    curve.add_argument("--seed", type=int, default=0, help="seed of the t's and the batch order")
    curve.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    curve.add_argument("--out", type=Path, required=True, help="curve run directory")
    curve.add_argument("--resume", action="store_true", help="continue the curve in --out from its last checkpoint")

    curve_eval = commands.add_parser("curve-eval", parents=[common],
                                     help="loss and error along a trained curve and along the straight line")
    curve_eval.add_argument("curve_dir", type=Path, help="curve run directory")
    curve_eval.add_argument("--points", type=int, default=21, help="evenly spaced t from 0 to 1")
    curve_eval.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")

    export = commands.add_parser("export", parents=[common], help="export an ensemble to ONNX with its manifest")
    sources = export.add_mutually_exclusive_group(required=True)
    sources.add_argument("--from", dest="runs", type=Path, nargs="+",
                         help="one FGE or SSE run directory, one curve run directory, one SWA or distilled run "
                              "directory (one network), or one or more base run directories (independent ensemble)")
    sources.add_argument("--onnx", type=Path, nargs="+", metavar="GRAPH",
                         help="ONNX classifiers trained elsewhere (one NCHW image input with a dynamic batch, one "
                              "[N, classes] output), packaged as an ensemble fitted on --dataset's validation split")
    export.add_argument("--outputs", choices=["logits", "probabilities"], default="logits",
                        help="with --onnx: what the graphs' output holds (default logits)")
    export.add_argument("--input-mean", type=_floats, help="with --onnx, for graphs taking normalised float images: "
                        "the per-channel mean of [0, 1] pixels they subtract, comma-separated (e.g. 0.485,0.456,0.406)")
    export.add_argument("--input-std", type=_floats, help="with --onnx: the per-channel std they divide by")
    _add_data_arguments(export, defaults=False)
    export.add_argument("--name", required=True, help="ensemble name in the repository")
    export.add_argument("--version", type=int, help="version number (default: the next free one)")
    export.add_argument("--out", type=Path, required=True, help="model repository directory")
    export.add_argument("--overwrite", action="store_true", help="replace an existing version directory")
    export.add_argument("--cascade-nll-tolerance", type=float, default=0.01,
                        help="the anytime ensemble's validation NLL may exceed the full ensemble's by this fraction "
                             "(default 0.01)")
    export.add_argument("--cascade-accuracy-tolerance", type=float, default=0.001,
                        help="and its validation accuracy may fall below it by this much (default 0.001: 0.1 point)")
    export.add_argument("--cascade-min-gain-kept", type=float, default=0.9,
                        help="and it keeps at least this share of the full ensemble's validation NLL and ECE lead "
                             "over its best single member, or every member serves (default 0.9)")
    export.add_argument("--front", type=Path,
                        help="an SWA or distilled run of the members' data and architecture: its network answers "
                             "before the members where the cascade fit finds that it pays (its own graph, at every "
                             "precision exported)")
    export.add_argument("--member-order", choices=["best-first", "as-trained"], default="best-first",
                        help="the members' order in the manifest, which decides the first N a request for N members "
                             "gets and the order of the cascade's stages: best-first by validation NLL (default) or "
                             "as trained")
    export.add_argument("--precision", dest="precisions", choices=["int8", "fp16"], action="append", default=[],
                        help="also export every graph at this precision (repeatable): int8 is statically quantized "
                             "for the CPU, fp16 is meant for CUDA")
    export.add_argument("--variant-nll-tolerance", type=float, default=0.02,
                        help="a lower-precision ensemble's validation NLL may exceed FP32's by this fraction (or by "
                             "0.001, whichever is more), or the export fails (default 0.02)")
    export.add_argument("--variant-accuracy-tolerance", type=float, default=0.005,
                        help="and its validation accuracy may fall below FP32's by this much (default 0.005: half a "
                             "point)")
    export.add_argument("--target-accuracy", dest="target_accuracies", type=float, action="append",
                        help="selective prediction: fit the threshold that answers with this accuracy (repeatable; "
                             "default 0.95, 0.97 and 0.99)")
    export.add_argument("--default-target-accuracy", type=float, default=0.99,
                        help="the target accuracy of a request that names none (default 0.99; one of the targets)")
    export.add_argument("--conformal-score", choices=("lac", "aps", "raps"), default="lac",
                        help="prediction sets: the conformity score of a request that names none (default lac, the "
                             "smallest sets; aps and raps grow with each image's uncertainty); all three are fitted")
    export.add_argument("--coverage", type=float, default=0.9,
                        help="prediction sets: the coverage of a request that names none (default 0.9)")
    export.add_argument("--config", dest="serving", action="append", default=[], metavar="KEY=VALUE|FILE",
                        help="the ensemble's serving settings, written to <out>/<name>/config.json over the one "
                             "there (repeatable): a JSON file of them, or one KEY=VALUE (max_batch_size=16, "
                             "members=2, dynamic_batching.max_queue_delay_microseconds=500; docs/serving.md lists "
                             "the keys); checked before the export starts")
    points = export.add_mutually_exclusive_group()
    points.add_argument("--points", type=_t_list, help="curve runs: the members' t, e.g. 0.25,0.5,0.75")
    points.add_argument("--num-points", type=int,
                        help="curve runs: K members at evenly spaced t from 0 to 1, both ends included")
    return parser


def _floats(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _t_list(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1], got {text!r}") from None


def _train_config(args: argparse.Namespace, save_epochs: list[int]) -> TrainConfig:
    from training.config import DataConfig, TrainConfig

    data = DataConfig(dataset=args.dataset, data_dir=args.data_dir, download=args.download, val_size=args.val_size,
                      subset=args.subset, image_size=args.image_size, batch_size=args.batch_size,
                      workers=args.workers)
    return TrainConfig(data=data, model=args.model, epochs=args.epochs, lr=args.lr, momentum=args.momentum,
                       weight_decay=args.weight_decay, seed=args.seed, device=args.device, save_epochs=save_epochs,
                       init=getattr(args, "init", None), reset_head=getattr(args, "reset_head", False))


def _train(args: argparse.Namespace) -> str:
    from training.train import train_network

    report = train_network(_train_config(args, args.save_epochs), args.out, resume=args.resume)
    return json.dumps({"run": str(args.out), "test": report.test.model_dump()})


def _sse(args: argparse.Namespace) -> str:
    from training.sse import resolve_sse_config, run_sse, summary_table

    config = resolve_sse_config(_train_config(args, []), args.cycles)
    return summary_table(run_sse(config, args.out, resume=args.resume))


def _fge(args: argparse.Namespace) -> str:
    from training.config import FGEConfig
    from training.fge import DEFAULT_CYCLES, run_fge, summary_table

    given = {name: value for name in ("model", "momentum", "weight_decay", *DATA_ARGUMENTS)
             if (value := getattr(args, name)) not in (None, False)}
    init = None
    if args.init is not None:
        from training.config import DataConfig, TrainConfig

        if args.start_epoch is not None:
            raise UsageError("--start-epoch picks a base run's checkpoint; with --init the cycles start from the "
                             "weights")
        cycles = args.cycles if args.cycles is not None else DEFAULT_CYCLES
        data = DataConfig(**{name: value for name, value in given.items() if name in DATA_ARGUMENTS})
        init = TrainConfig(data=data, epochs=max(1, cycles * args.cycle_epochs), lr=args.lr1, seed=args.seed or 0,
                           device=args.device, init=args.init, reset_head=args.reset_head,
                           **{name: given[name] for name in ("model", "momentum", "weight_decay") if name in given})
    elif given or args.reset_head:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in [*given, *(["reset_head"] if args.reset_head
                                                                                else [])])
        raise UsageError(f"{flags}: FGE from a base run (--from) takes the base run's model, data and optimiser; "
                         "these apply with --init")
    config = FGEConfig(base_run=args.base_run, init=init, start_epoch=args.start_epoch, cycles=args.cycles,
                       cycle_epochs=args.cycle_epochs, lr1=args.lr1, lr2=args.lr2, seed=args.seed, device=args.device)
    return summary_table(run_fge(config, args.out, resume=args.resume))


def _swa(args: argparse.Namespace) -> str:
    from training.swa import run_swa, summary_table

    return summary_table(run_swa(args.source_run, args.out, members=args.members, device=args.device))


def _distill(args: argparse.Namespace) -> str:
    from training.distill import resolve_distill_config, run_distill, summary_table

    config = resolve_distill_config(args.teacher_run, args.members, args.temperature, args.hard_label_weight,
                                    args.epochs, args.lr, args.seed, args.device)
    return summary_table(run_distill(config, args.out, resume=args.resume))


def _curve(args: argparse.Namespace) -> str:
    from training.config import CurveConfig
    from training.curve_train import run_curve

    given = {name: value for name in DATA_ARGUMENTS if (value := getattr(args, name)) not in (None, False)}
    base = None
    if args.model is not None or given:
        from training.config import DataConfig, TrainConfig

        base = TrainConfig(data=DataConfig(**given), seed=args.seed, device=args.device,
                           **({"model": args.model} if args.model is not None else {}),
                           **({"epochs": args.epochs} if args.epochs is not None else {}))
    config = CurveConfig(start_run=args.start_run, end_run=args.end_run, base=base, curve=args.curve,
                         bends=args.bends, epochs=args.epochs, lr=args.lr, momentum=args.momentum,
                         weight_decay=args.weight_decay, seed=args.seed, device=args.device)
    report = run_curve(config, args.out, resume=args.resume)
    return json.dumps({"run": str(args.out), "curve": report.config.curve, "bends": report.config.bends,
                       "epochs": report.config.epochs, "train_seconds_total": report.train_seconds_total,
                       "next": f"valley-train curve-eval {args.out}"})


def _curve_eval(args: argparse.Namespace) -> str:
    from training.curve_eval import evaluate_curve, summary_table
    from training.runs import RunDir

    report = evaluate_curve(args.curve_dir, points=args.points, device=args.device)
    evaluation = report.evaluation
    assert evaluation is not None
    run = RunDir(args.curve_dir)
    return "\n".join([
        summary_table(report),
        f"test error: endpoints {100 * evaluation.endpoint_test_error[0]:.2f}% and "
        f"{100 * evaluation.endpoint_test_error[1]:.2f}%, curve max {100 * evaluation.curve_max_test_error:.2f}%, "
        f"line max {100 * evaluation.line_max_test_error:.2f}%",
        f"report: {run.report_file}  plot: {run.curve_plot_file}",
    ])


def _serving_config(folder: Path, items: Sequence[str]) -> dict[str, Any] | None:
    """The config.json `--config` asks for: the one in `folder` with each file's and KEY=VALUE's settings over it,
    checked; None without --config."""
    if not items:
        return None
    existing = folder / CONFIG_FILE
    try:
        config = read_config(existing) if existing.is_file() else {}
        for item in items:
            config = set_key(config, item) if "=" in item else {**config, **read_config(Path(item))}
        parse(json.dumps(config), f"--config ({folder.name}/{CONFIG_FILE})", folder.name)
    except ConfigError as error:
        raise UsageError(str(error)) from None
    return config


def _export(args: argparse.Namespace) -> str:
    from training.config import ExportConfig
    from training.export.ensemble import export_ensemble

    serving = _serving_config(args.out / args.name, args.serving)
    given = {name: value for name in DATA_ARGUMENTS if (value := getattr(args, name)) not in (None, False)}
    external = None
    if args.onnx is not None:
        from training.config import DataConfig, ExternalSource

        external = ExternalSource(graphs=args.onnx, data=DataConfig(**given), outputs=args.outputs,
                                  input_mean=args.input_mean, input_std=args.input_std)
    else:
        extra = [*given, *(name for name in ("input_mean", "input_std") if getattr(args, name) is not None),
                 *(["outputs"] if args.outputs != "logits" else [])]
        if extra:
            raise UsageError(f"{', '.join('--' + name.replace('_', '-') for name in extra)}: these apply with "
                             "--onnx; an export of runs takes the runs' data")
    config = ExportConfig(runs=args.runs or [], onnx=external, name=args.name, repository=args.out,
                          version=args.version, overwrite=args.overwrite, points=args.points,
                          num_points=args.num_points,
                          front=args.front, member_order=args.member_order,
                          cascade_nll_tolerance=args.cascade_nll_tolerance,
                          cascade_accuracy_tolerance=args.cascade_accuracy_tolerance,
                          cascade_min_gain_kept=args.cascade_min_gain_kept,
                          # Asking twice for one precision asks for it once.
                          precisions=list(dict.fromkeys(args.precisions)),
                          variant_nll_tolerance=args.variant_nll_tolerance,
                          variant_accuracy_tolerance=args.variant_accuracy_tolerance,
                          target_accuracies=args.target_accuracies or [0.95, 0.97, 0.99],
                          default_target_accuracy=args.default_target_accuracy,
                          conformal_score=args.conformal_score, coverage=args.coverage)
    report = export_ensemble(config).report().model_dump(mode="json", exclude_none=True)
    if serving is not None:
        report["config"] = str(write_config(args.out / args.name, serving))
    return json.dumps(report)


# What runs as several processes under torchrun; the others read a run and write one output.
DISTRIBUTED_COMMANDS = ("train", "fge", "sse", "distill", "curve")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from training import distributed

    # The other ranks repeat rank 0's events: they log errors only.
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level if distributed.is_main() else logging.ERROR,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export", "onnxruntime.quantization"):
        # The ONNX exporter logs every optimisation pass at INFO, the quantizer every shape inference.
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if distributed.launched() and args.command not in DISTRIBUTED_COMMANDS:
            raise UsageError(f"{args.command} runs as one process: run it without torchrun "
                             f"(only {', '.join(DISTRIBUTED_COMMANDS)} run under torchrun)")
        commands = {"train": _train, "fge": _fge, "sse": _sse, "swa": _swa, "distill": _distill, "curve": _curve,
                    "curve-eval": _curve_eval, "export": _export}
        output = commands[args.command](args)
        if distributed.is_main():
            print(output)
    except UsageError as error:
        print(f"valley-train: error: {error}", file=sys.stderr)
        return 2
    except ValidationError as error:
        # A field's name as its flag is typed (--hard-label-weight, not hard_label_weight).
        problems = "; ".join(f"--{'-'.join(str(p).replace('_', '-') for p in e['loc'])}: {e['msg']}"
                             for e in error.errors())
        print(f"valley-train: error: {problems}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("valley-train: interrupted; continue with --resume", file=sys.stderr)
        return 130
    finally:
        distributed.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
