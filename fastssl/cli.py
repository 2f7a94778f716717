"""`fastssl` command line: a thin typer app. Flags and --config merge into one TrainConfig; a UserError
becomes one line on stderr and exit status 2; a run stopped by a signal (with its checkpoint) exits with 75."""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Optional

import typer
import yaml

from .config import FIELDS, KNN_K, KNN_T, load_file, merge
from .errors import EXIT_STOPPED, Stopped, UserError
from .evaluate import PROTOCOLS
from .methods import METHODS
from .options import TYPES, optional, type_name

app = typer.Typer(help="fastssl: high-throughput relational self-supervised learning (ReSSL, ISD, ReSA, ...).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
eval_app = typer.Typer(help="Evaluate a trained encoder (frozen).", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


def _print_version(value: bool) -> None:
    if value:
        from . import __version__
        print(f"fastssl {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="print fastssl's version and exit")) -> None:
    pass


def _method_option_help(name: str) -> str:
    """An option of one or more methods: what it is (for each method where meanings differ) and each one's recipe
    value, small images / ImageNet."""
    meanings, values = {}, []
    for m, cls in sorted(METHODS.items()):
        if name in cls.Options.names():
            meanings.setdefault(cls.Options.help(name), []).append(m)
            small, large = (_shown(cls.Options.recipe(s)[name]) for s in (True, False))
            values += [f"{m} {small}" + (f"/{large}" if large != small else "")] if small is not None else []
    what = "; ".join(f"{', '.join(ms)}: {text}" for text, ms in meanings.items()) if len(meanings) > 1 else [
        *meanings][0]
    return what + (f" (default from the recipe, small images/ImageNet: {', '.join(values)})" if values else "")


def _shown(value) -> str | None:
    return None if value is None else ("on" if value else "off") if isinstance(value, bool) else f"{value:g}"


def _train(ctx: typer.Context, config: Optional[Path], print_config: bool, **options):
    # by name: typer vendors its own click, whose ParameterSource is not click's
    given = {k: v for k, v in options.items() if ctx.get_parameter_source(k).name == "COMMANDLINE"}
    file_values = load_file(str(config)) if config else {}
    cfg = merge(file_values, given)
    from .train import resolved_settings, train
    if print_config:
        print(yaml.safe_dump(resolved_settings(cfg, {**file_values, **given}), sort_keys=False), end="")
        return
    train(cfg, given={**file_values, **given})


def _train_signature() -> inspect.Signature:
    """One option per setting, with its help and default: TrainConfig's fields, then every method's options (the
    dataclasses are the single source)."""
    params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
              inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                                default=typer.Option(None, help="YAML or TOML file with the same keys; "
                                                                "command-line options override it")),
              inspect.Parameter("print_config", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                                default=typer.Option(False, help="print the settings the run would use (a resumed "
                                                                 "run's, the image size, every method option) as "
                                                                 "YAML for --config, and exit"))]
    method_options = {f.name: f for cls in METHODS.values() for f in fields(cls.Options)}
    for f in [*FIELDS.values(), *method_options.values()]:
        own = f.name in FIELDS
        help_text = f.metadata["help"] if own else _method_option_help(f.name)
        help_text += f": {' | '.join(sorted(METHODS))}" if f.name == "method" else ""
        kind = TYPES[type_name(f)]
        params.append(inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[kind] if optional(f) or not own else kind,
            default=typer.Option(f.default if own else None, help=help_text, show_default=own and not optional(f))))
    return inspect.Signature(params)


_train.__signature__ = _train_signature()
app.command("train", help="Pretrain an encoder. Example: fastssl train --data fashion-mnist --epochs 20")(_train)


_WEIGHTS_HELP = ("the encoder: a run's checkpoint.pt (or checkpoint-prev.pt), or plain weights with --arch and --data: "
                 "a run's backbone.pt, a torchvision or timm ResNet or ViT state_dict (.pt, .pth, .safetensors)")
_WEIGHTS = typer.Option(..., "--weights", "--checkpoint", help=_WEIGHTS_HELP)
_ARCH = typer.Option(None, help="what plain weights are, as `fastssl train --arch`: r18, r50, r18-w16, vit-s16, ... "
                                "(a checkpoint knows its own)")
_IMAGE_SIZE = typer.Option(None, help="input side in pixels (default: the run's, else the data's: its own side up "
                                      "to 64 px, else 224)")
_PIPELINE = typer.Option(None, help="whose readers decode the images: torch | tensor | dali | ffcv | nvjpeg "
                                    "(default: the run's, else torch)")
_DATA = typer.Option(None, help="labelled data (default: the run's --data); train split = bank/training set, "
                                "val or test split = queries")
_DATA_VAL = typer.Option("", help="the query split, when not beside --data")


def _frozen(weights: Path, arch, image_size, data, pipeline, device: str, precision: str, workers: int):
    from .weights import load
    return load(weights, arch=arch, data=data, image_size=image_size, pipeline=pipeline, device=device,
                precision=precision, workers=workers)


def _queries(frozen, data_val: str):
    """The evaluation split (queries, test set) of the frozen encoder's data; both splits labelled, or UserError."""
    from . import pipelines
    queries, why = pipelines.eval_split(frozen.data, data_val)
    if not frozen.images.labelled or queries is None or not queries.labelled:
        raise UserError(f"fastssl eval needs labelled data: a train split (the bank or training set) and a val or "
                        f"test split (the queries); {frozen.data} has "
                        f"{'no labels' if not frozen.images.labelled else why}; pass --data (and --data-val) naming "
                        f"labelled splits")
    return queries


def _log(frozen, **values: float) -> None:
    """The results of a run's checkpoint on the run's data, into the run's metrics.csv and TensorBoard at the
    checkpoint's step."""
    if frozen.run_dir is None:
        return
    from .loggers import Logger
    keys = {f"eval/{k}": v for k, v in values.items()}
    try:
        with contextlib.closing(Logger(frozen.run_dir, "tensorboard,csv", purge=False)) as logger:
            logger.log(frozen.step, **keys)
    except OSError as e:  # a run folder we may read but not write: the result above stands
        print(f"warning: cannot log to {frozen.run_dir} ({e.strerror or e})", file=sys.stderr)
        return
    print(f"logged {', '.join(keys)} at step {frozen.step} in {frozen.run_dir / 'metrics.csv'} and tb/",
          file=sys.stderr)


@eval_app.command("knn", help="Weighted kNN top-1 (InstDisc: cosine, votes exp(sim/T)) of the frozen encoder.")
def eval_knn(weights: Path = _WEIGHTS, data: Optional[str] = _DATA, data_val: str = _DATA_VAL,
             k: int = typer.Option(KNN_K, help="neighbours"), t: float = typer.Option(KNN_T, help="temperature"),
             arch: Optional[str] = _ARCH, image_size: Optional[int] = _IMAGE_SIZE, pipeline: Optional[str] = _PIPELINE,
             device: str = "auto", workers: int = 2, precision: str = "auto"):
    from .evaluate import knn_accuracy
    frozen = _frozen(weights, arch, image_size, data, pipeline, device, precision, workers)
    queries = _queries(frozen, data_val)
    top1 = knn_accuracy(frozen.features(frozen.images), frozen.images.labels, frozen.features(queries),
                        queries.labels, k, t)
    print(f"kNN top-1 (k={k}, T={t}) on {frozen.data}: {top1:.2f}%")
    _log(frozen, knn_top1=top1)


def _settings(p, epochs: int, batch_size: int, lr: float) -> str:
    per = " per 256 images" if p.optimizer == "SGD" else ""
    return f"{epochs} epochs, batch {batch_size}, {p.optimizer} lr {lr:g}{per}"


def _linear_help() -> str:
    lines = [f"{name}{' (default)' if name == 'frozen-aug' else ''}: {_settings(p, p.epochs, p.batch_size, p.lr)}, "
             f"weight decay {p.weight_decay:g}. {p.source}." for name, p in PROTOCOLS.items()]
    return "\n\n".join(["Linear evaluation of the frozen encoder by a paper's protocol (--protocol): top-1, and top-5 "
                         "with more than 5 classes.", *lines])


@eval_app.command("linear", help=_linear_help())
def eval_linear(weights: Path = _WEIGHTS, data: Optional[str] = _DATA, data_val: str = _DATA_VAL,
                protocol: str = typer.Option("frozen-aug", help=" | ".join(PROTOCOLS) + " (described above)"),
                epochs: Optional[int] = typer.Option(None, min=1, help="classifier epochs (default: the protocol's)"),
                lr: Optional[float] = typer.Option(None, help="learning rate, SGD's per 256 images (x batch/256), "
                                                              "Adam's as is (default: the protocol's)"),
                batch_size: Optional[int] = typer.Option(None, min=1, help="default: the protocol's"),
                train_subset: int = typer.Option(0, min=0, help="train the classifier on a fixed random subset of "
                                                                "this many training images (0: all)"),
                seed: int = typer.Option(0, help="the classifier's initialisation, order and crops"),
                arch: Optional[str] = _ARCH, image_size: Optional[int] = _IMAGE_SIZE,
                pipeline: Optional[str] = _PIPELINE, device: str = "auto", workers: int = 2, precision: str = "auto"):
    from .evaluate import linear_on_features, linear_on_views
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r}; choose {' | '.join(PROTOCOLS)}")
    p = PROTOCOLS[protocol]
    chosen = dict(epochs=epochs or p.epochs, lr=p.lr if lr is None else lr, batch_size=batch_size or p.batch_size,
                  seed=seed)
    frozen = _frozen(weights, arch, image_size, data, pipeline, device, precision, workers)
    queries = _queries(frozen, data_val)
    train_set, test_x = frozen.images.subset(train_subset, seed), frozen.features(queries)
    if p.features == "views":
        scores = linear_on_views(p, frozen.encoder, frozen.augmented(train_set, chosen["batch_size"], seed), test_x,
                                 queries.labels, frozen.device, frozen.precision, **chosen)
    else:
        scores = linear_on_features(p, frozen.features(train_set), train_set.labels, test_x, queries.labels, **chosen)
    shown = f"({protocol}: {_settings(p, chosen['epochs'], chosen['batch_size'], chosen['lr'])}) on {frozen.data}"
    for name, value in sorted(scores.items(), reverse=True):  # top-1 last, as the kNN line: one figure per line
        print(f"linear probe {name[:3]}-{name[3:]} {shown}, {len(train_set)} training images: {value:.2f}%")
    _log(frozen, **{f"{protocol.replace('-', '_')}_{name}": value for name, value in scores.items()})


@eval_app.command("cluster", help="k-means on the frozen, L2-normalised features of the query split against its "
                                  "classes: NMI, ARI and cluster accuracy (Hungarian matching).")
def eval_cluster(weights: Path = _WEIGHTS, data: Optional[str] = _DATA, data_val: str = _DATA_VAL,
                 k: Optional[int] = typer.Option(None, help="clusters (default: the number of classes)"),
                 seed: int = typer.Option(0, help="k-means seed"), arch: Optional[str] = _ARCH,
                 image_size: Optional[int] = _IMAGE_SIZE, pipeline: Optional[str] = _PIPELINE, device: str = "auto",
                 workers: int = 2, precision: str = "auto"):
    from .evaluate import cluster_scores
    frozen = _frozen(weights, arch, image_size, data, pipeline, device, precision, workers)
    queries = _queries(frozen, data_val)
    s = cluster_scores(frozen.features(queries), queries.labels, k, seed)
    print(f"k-means (k={s['k']}) on the query split (val/test) of {frozen.data}, {len(queries)} images: NMI "
          f"{s['nmi']:.4f}, ARI {s['ari']:.4f}, cluster accuracy {100 * s['acc']:.2f}%")
    _log(frozen, cluster_nmi=s["nmi"], cluster_ari=s["ari"], cluster_acc=100 * s["acc"])


@app.command("export", help="Write a run's encoder as a state_dict under torchvision's names (as backbone.pt): FILE.pt "
                             "(torch) or FILE.safetensors. Example: fastssl export runs/x/checkpoint.pt --to r18.pt")
def export_command(checkpoint: Path = typer.Argument(..., help="a run's checkpoint.pt or checkpoint-prev.pt"),
                   to: Path = typer.Option(..., help="the file to write: .pt or .safetensors"),
                   encoder_ema: bool = typer.Option(False, help="the encoder's running average (a run trained with "
                                                                "--encoder-ema) instead of the encoder (ReSA: its "
                                                                "momentum encoder)")):
    from .weights import export
    cfg, tensors = export(checkpoint, to, encoder_ema)
    print(f"{to}: {tensors} tensors, the {'running average of the ' if encoder_ema else ''}encoder of {checkpoint} "
          f"({cfg.arch} at {cfg.image_size} px); evaluate it with `fastssl eval knn --weights {to} --arch {cfg.arch} "
          f"--image-size {cfg.image_size} --data {cfg.data}`")


@app.command("embed", help="Features of every image of a split, in order: OUT (.npy, N x D float32) and beside it "
                            "OUT's stem .labels.npy (int64, -1 when unlabelled) and .files.txt (each row's image "
                            "file, or ROOT#INDEX for sets held in memory). Example: fastssl embed "
                            "runs/x/checkpoint.pt --out feats.npy --split val")
def embed_command(weights: Path = typer.Argument(..., help=_WEIGHTS_HELP),
                  out: Path = typer.Option(..., help="the features' .npy file"),
                  data: Optional[str] = typer.Option(None, help="the images (default: the run's)"),
                  split: str = typer.Option("train", help="train | val (the evaluation split: val/ or test/)"),
                  arch: Optional[str] = _ARCH, image_size: Optional[int] = _IMAGE_SIZE,
                  pipeline: Optional[str] = _PIPELINE, device: str = "auto", workers: int = 2, precision: str = "auto"):
    import numpy as np

    from . import pipelines
    if out.suffix != ".npy" or split not in ("train", "val"):
        raise UserError(f"--out {out} --split {split}: write a .npy file (the labels and file names go beside it) of "
                        f"the train or the val split")
    frozen = _frozen(weights, arch, image_size, data, pipeline, device, precision, workers)
    images = frozen.images if split == "train" else pipelines.load_images(frozen.data, "test")
    features = frozen.features(images).cpu().numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, features)
    np.save(out.with_name(f"{out.stem}.labels.npy"), images.labels.numpy().astype(np.int64))
    files = images.files if images.files is not None else [f"{images.root}#{i}" for i in range(len(images))]
    out.with_name(f"{out.stem}.files.txt").write_text("".join(f"{f}\n" for f in files))
    print(f"{out}: {features.shape[0]} x {features.shape[1]} features of the {split} split of {frozen.data}; "
          f"{out.stem}.labels.npy and {out.stem}.files.txt beside it")


@app.command("convert", help="Write a data set as an FFCV .beton for --pipeline ffcv, leaving out and listing bad "
                              "images (the rules of `fastssl check`); unlabelled images are stored with label -1. "
                              "Example: fastssl convert imagenet --to ffcv --out imagenet_train.beton")
def convert_command(
        src: str = typer.Argument(..., help="fashion-mnist | cifar10 | cifar100 | imagenet, a folder holding one, an "
                                            "ImageFolder root with train/ and val/, a folder of class folders, or a "
                                            "folder of images (unlabelled)"),
        to: str = typer.Option("ffcv", help="output format (ffcv)"),
        out: Optional[Path] = typer.Option(None, help="the .beton to write (default: SRC_SPLIT.beton); name the "
                                                      "splits NAME_train.beton and NAME_val.beton"),
        split: str = typer.Option("train", help="train | val"),
        max_resolution: int = typer.Option(512, help="longest side kept in pixels (it bounds the FFCV loader's "
                                                     "decode buffers)"),
        jpeg_quality: int = typer.Option(90, help="JPEG quality of the stored images"),
        write_mode: str = typer.Option("smart", help="raw (pixels) | jpg | smart (raw up to 64x64 px, JPEG above) "
                                                     "| proportion (JPEG with --compress-probability)"),
        compress_probability: float = typer.Option(0.5, help="write mode proportion: share stored as JPEG"),
        workers: int = typer.Option(os.cpu_count() or 1, help="worker processes"),
        force: bool = typer.Option(False, help="overwrite an existing --out")):
    from .pipelines.convert import convert
    report = convert(src, out, to=to, split=split, max_resolution=max_resolution, jpeg_quality=jpeg_quality,
                     write_mode=write_mode, compress_probability=compress_probability, workers=workers, force=force)
    print(report.summary())


@app.command("check", help="List the bad files of a folder, by the rules `fastssl convert` leaves files out with "
                            "(unreadable, truncated, empty, not RGB, under 8 px on a side, no image extension); exit "
                            "status 1 when there are any. Example: fastssl check data/imagenet")
def check_command(
        data: str = typer.Argument(..., help="a folder of images in any layout (an ImageFolder root, class folders, "
                                             "images at any depth), or imagenet"),
        workers: int = typer.Option(os.cpu_count() or 1, help="worker processes")):
    from .pipelines.convert import check_tree
    report = check_tree(data, workers)
    print(report.summary())
    if report.bad:
        raise typer.Exit(1)


def main() -> None:
    try:
        app()
    except UserError as e:
        # the last line: a UserError raised in a DataLoader worker arrives wrapped in the worker's traceback
        print(f"error: {str(e).strip().splitlines()[-1].removeprefix('fastssl.errors.UserError: ')}", file=sys.stderr)
        sys.exit(2)
    except Stopped as e:
        print(str(e), file=sys.stderr)
        sys.exit(EXIT_STOPPED)
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the training loop
        print("interrupted; the last checkpoint is intact (continue with --resume)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
