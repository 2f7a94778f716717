"""`fastssl` command line: a thin typer app. Flags and --config merge into one TrainConfig; a UserError
becomes one line on stderr and exit status 2; a run stopped by a signal (with its checkpoint) exits with 75."""

from __future__ import annotations

import inspect
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Optional

import typer
import yaml

from . import methods
from .config import FIELDS, KNN_K, KNN_T, from_saved, load_file, merge
from .errors import EXIT_STOPPED, Stopped, UserError
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


def _load_encoder(checkpoint_path: Path, device_name: str):
    from . import checkpoint
    from .device import pick_device
    state = checkpoint.load(checkpoint_path)
    if not isinstance(state, dict) or "config" not in state:
        raise UserError(f"{checkpoint_path} is not a fastssl training checkpoint (no config); pass the run's "
                        f"checkpoint.pt")
    cfg, method = methods.build(from_saved(state["config"]))  # BN groups only matter in training
    method.load_state_dict(state["method"])
    device = pick_device(device_name)
    return cfg, method.evaluated_encoder().to(device), device


def _eval_features(checkpoint_path: Path, data: Optional[str], data_val: str, device: str, workers: int,
                   precision: str):
    """Features and labels of the bank (train split) and the queries (evaluation split) of labelled data."""
    from . import pipelines
    from .device import pick_precision
    from .evaluate import extract_features
    cfg, encoder, dev = _load_encoder(checkpoint_path, device)
    data = data or cfg.data
    bank = pipelines.load_images(data, "train")
    queries, why = pipelines.eval_split(data, data_val)
    if not bank.labelled or queries is None or not queries.labelled:
        raise UserError(f"fastssl eval needs labelled data: a train split (the bank or training set) and a val or "
                        f"test split (the queries); {data} has {'no labels' if not bank.labelled else why}; pass "
                        f"--data (and --data-val) naming labelled splits")

    def features(images):
        batches = pipelines.eval_reader(cfg.pipeline, images, cfg.image_size, batch_size=512, workers=workers)
        return extract_features(encoder, batches, images.mean_std, dev, precision=pick_precision(precision, dev),
                                channels_last=cfg.channels_last)

    return features(bank), bank.labels, features(queries), queries.labels, data


_CKPT = typer.Option(..., "--checkpoint", help="a run's checkpoint.pt")
_DATA = typer.Option(None, help="labelled data (default: the run's --data); train split = bank/training set, "
                                "val or test split = queries")
_DATA_VAL = typer.Option("", help="the query split, when not beside --data")


@eval_app.command("knn", help="Weighted kNN top-1 (InstDisc: cosine, votes exp(sim/T)) of the frozen encoder.")
def eval_knn(checkpoint: Path = _CKPT, data: Optional[str] = _DATA, data_val: str = _DATA_VAL,
             k: int = typer.Option(KNN_K, help="neighbours"), t: float = typer.Option(KNN_T, help="temperature"),
             device: str = "auto", workers: int = 2, precision: str = "auto"):
    from .evaluate import knn_accuracy
    train_f, train_y, test_f, test_y, data = _eval_features(checkpoint, data, data_val, device, workers, precision)
    print(f"kNN top-1 (k={k}, T={t}) on {data}: {knn_accuracy(train_f, train_y, test_f, test_y, k, t):.2f}%")


@eval_app.command("linear", help="Linear probe on frozen, L2-normalised and standardised features.")
def eval_linear(checkpoint: Path = _CKPT, data: Optional[str] = _DATA, data_val: str = _DATA_VAL,
                epochs: int = typer.Option(100, help="probe epochs over the cached features"),
                lr: float = typer.Option(0.1, help="probe SGD learning rate"), device: str = "auto",
                workers: int = 2, precision: str = "auto"):
    from .evaluate import linear_probe
    train_f, train_y, test_f, test_y, data = _eval_features(checkpoint, data, data_val, device, workers, precision)
    print(f"linear probe top-1 on {data}: {linear_probe(train_f, train_y, test_f, test_y, epochs=epochs, lr=lr):.2f}%")


@eval_app.command("cluster", help="k-means on the frozen, L2-normalised features of the query split against its "
                                  "classes: NMI, ARI and cluster accuracy (Hungarian matching).")
def eval_cluster(checkpoint: Path = _CKPT, data: Optional[str] = _DATA, data_val: str = _DATA_VAL,
                 k: Optional[int] = typer.Option(None, help="clusters (default: the number of classes)"),
                 seed: int = typer.Option(0, help="k-means seed"), device: str = "auto", workers: int = 2,
                 precision: str = "auto"):
    from .evaluate import cluster_scores
    _, _, test_f, test_y, data = _eval_features(checkpoint, data, data_val, device, workers, precision)
    s = cluster_scores(test_f, test_y, k, seed)
    print(f"k-means (k={s['k']}) on the query split (val/test) of {data}, {len(test_y)} images: NMI {s['nmi']:.4f}, "
          f"ARI {s['ari']:.4f}, cluster accuracy {100 * s['acc']:.2f}%")


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
