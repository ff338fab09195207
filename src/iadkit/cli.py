"""The ``iadkit`` command line.

Stable commands (scripts and CI rely on them)::

    iadkit fit --method NAME --preset cpu|paper --data ROOT --category NAME --out RUN_DIR
    iadkit test RUN_DIR [--data ROOT --category NAME] --json FILE [--report DIR]
    iadkit predict RUN_DIR IMAGES... --out DIR [--format csv|jsonl] [--resume]
                   [--executor ray [--address HOST:PORT] [--actors N]]
    iadkit demo --out DIR
    iadkit benchmark GRID.yaml --out DIR [--executor ray [--address HOST:PORT]]
    iadkit serve RUN_DIR|EXPORT_DIR [--port 8000] [--runtime onnxruntime|openvino]
    iadkit export RUN_DIR --format onnx --out DIR
    iadkit adapt RUN_DIR REFERENCE_IMAGES... --out MODEL_DIR
    iadkit data prepare elpv DEST | iadkit data generate DEST
    iadkit synth preview --data ROOT --synthesis draem --out grid.png
    iadkit synth pseudo-val --data ROOT --synthesis fragments --out DIR
    iadkit methods

Settings come from ``--config FILE.yaml`` (keys of :class:`iadkit.engine.RunConfig`, with
``params:`` for hyperparameters), then flags override them; ``--param key=value`` overrides one
hyperparameter (the value is read as YAML: ``--param coreset_ratio=0.02``). Every bad setting
or hyperparameter is refused with one line on stderr and exit code 2, before any work.

``fit``, ``test`` and ``predict`` also run data-parallel under ``torchrun``
(``torchrun --standalone --nproc-per-node N -m iadkit fit ...``; docs/scaling.md).
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from . import distributed
from .data.generate import GENERATED_LAYOUTS, generate_dataset
from .deploy.quantize import DEFAULT_DRIFT_TOLERANCE, DEFAULT_MAX_RESTORE_MINUTES
from .deploy.settings import ServiceSettings
from .errors import IadkitError
from .fanout import check_executor, start_ray
from .nn.precision import PRECISIONS

log = logging.getLogger("iadkit")


def _parse_param(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--param needs key=value, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def _run_config(args: argparse.Namespace) -> Any:
    from .engine import RunConfig, SearchSettings

    values: dict[str, Any] = {}
    if args.config:
        loaded = yaml.safe_load(Path(args.config).read_text()) or {}
        if not isinstance(loaded, dict):
            raise IadkitError(f"{args.config}: expected a mapping of run settings")
        values.update(loaded)
    flags = {
        "method": args.method, "preset": args.preset, "data": args.data, "layout": args.layout,
        "setting": args.setting, "device": args.device, "seed": args.seed,
        "batch_size": args.batch_size, "workers": args.workers,
        "validation_fraction": args.validation_fraction, "calibration": args.calibration,
        "target_fpr": args.target_fpr, "fpr_confidence": args.fpr_confidence,
        "seen_subclasses": args.seen, "unseen_subclasses": args.unseen,
        "reference_normals": args.reference_normals,
    }
    values.update({k: v for k, v in flags.items() if v is not None})
    search = {"stages": args.search if args.search in (None, "default")
              else yaml.safe_load(args.search),
              "synthesis": args.search_synthesis, "textures": args.search_textures}
    search = {k: v for k, v in search.items() if v is not None}
    if search:  # the flags override the config file's search settings, or start a search
        values["search"] = SearchSettings.from_value(values.get("search") or "default", **search)
    if args.category:
        values["categories"] = None if args.category == ["all"] else args.category
    params = dict(values.get("params") or {})
    params.update(dict(args.param or []))
    if args.precision is not None:
        params["precision"] = args.precision
    values["params"] = params
    values["show_progress"] = not args.quiet
    for needed in ("method", "data"):
        if needed not in values:
            raise IadkitError(f"--{needed} is required (or give it in --config)")
    return RunConfig.from_dict(values)


def _format_table(results: dict[str, Any]) -> str:
    from .engine import METRIC_KEYS as keys

    header = f"{'group':<24}" + "".join(f"{k:>13}" for k in keys)
    lines = [header, "-" * len(header)]

    def row(name: str, values: dict[str, Any]) -> str:
        cells = "".join(
            f"{values[k]:>13.4f}" if values.get(k) is not None else f"{'-':>13}" for k in keys
        )
        return f"{name:<24}{cells}"

    for name, values in results["per_category"].items():
        lines.append(row(name, values))
    headline = "pooled" if results.get("pooled") else "mean"
    lines.append(row(headline, results))
    return "\n".join(lines)


def _format_protocol(protocol: dict[str, Any]) -> str:
    """The benchmark's table: its columns in its order, one row per category and the mean."""
    columns = protocol["columns"]
    width = max(12, *(len(name) for name in protocol["per_category"]))
    lines = [f"protocol {protocol['name']}",
             f"{'category':<{width}} " + " ".join(f"{c:>8}" for c in columns)]
    rows = [(name, row["metrics"]) for name, row in protocol["per_category"].items()]
    for name, values in [*rows, ("mean", protocol["metrics"])]:
        lines.append(f"{name:<{width}} " + " ".join(
            f"{values[c]:>{max(8, len(c))}.4f}" if values[c] is not None
            else f"{'-':>{max(8, len(c))}}" for c in columns))
    return "\n".join(lines)


def _format_decisions(results: dict[str, Any]) -> str:
    """One line per group on the decision at the stored threshold, and any shift warning."""
    groups = dict(results["per_category"])
    if results.get("pooled"):
        groups["pooled"] = results["pooled"]
    lines = []
    for name, values in groups.items():
        decision = values.get("decision")
        if not decision:
            continue
        line = f"{name}: threshold {decision['threshold']:.5g} ({decision['calibration']})"
        if decision["fpr"] is not None:
            low, high = decision["predicted_fpr_interval"]
            line += (f"; false positives {decision['false_positives']}/"
                     f"{decision['false_positives'] + decision['true_negatives']} = "
                     f"{decision['fpr']:.1%} (predicted {low:.1%}-{high:.1%})")
        if decision["recall"] is not None:
            found = decision["true_positives"]
            line += (f"; recall {found}/{found + decision['false_negatives']} = "
                     f"{decision['recall']:.1%}")
        lines.append(line)
        if decision["shift_warning"]:
            lines.append(f"  warning: {decision['shift_warning']}")
    return "\n".join(lines)


def cmd_methods(args: argparse.Namespace) -> int:
    from .methods import available_methods, get_method

    for name in available_methods():
        method = get_method(name)
        print(f"{name:<14} presets: {', '.join(sorted(method.presets)):<12} {method.summary}")
        if args.verbose:
            for preset, params in sorted(method.presets.items()):
                print(f"    {preset}: {params}")
            for declared in method.hyperparameters.values():
                flag = " (inference)" if declared.inference else ""
                print(f"    {declared.name}={declared.default!r}{flag}: {declared.help}; "
                      f"{declared.rule.describe()}")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from .engine import fit_run

    config = _run_config(args)
    saved = fit_run(config, args.out, resume=args.resume)
    print(f"saved {len(saved)} model(s) under {args.out}")
    return 0


def _write_outputs(results: dict[str, Any], evaluations: list[Any], json_path: str | None,
                   report_dir: str | None, title: str) -> None:
    """Print the metrics table; write the JSON file and the HTML report where asked."""
    print(_format_table(results))
    decisions = _format_decisions(results)
    if decisions:
        print(decisions)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(results, indent=2))
        print(f"metrics written to {json_path}")
    if report_dir:
        from .report import write_report

        page = write_report(results, evaluations, report_dir, title=title)
        print(f"report written to {page}")


def cmd_test(args: argparse.Namespace) -> int:
    from .engine import test_run

    results, evaluations = test_run(args.run_dir, args.data, args.category, args.device,
                                    show_progress=not args.quiet,
                                    accept_backbone_change=args.accept_backbone_change,
                                    protocol=args.protocol, views=args.views,
                                    precision=args.precision)
    if distributed.is_main():
        if "protocol" in results:
            print(_format_protocol(results["protocol"]))
        _write_outputs(results, evaluations, args.json, args.report,
                       title=f"iadkit test: {args.run_dir}")
    return 0


def _collect_images(inputs: list[str]) -> list[Path]:
    """Image files from files, folders (recursively) and glob patterns, absolute or relative.
    Hidden files are included: a file the user pointed at is scored or reported, never
    skipped in silence."""
    from .data.image_io import IMAGE_EXTENSIONS

    def is_image(path: Path) -> bool:
        return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()

    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths += sorted(p for p in path.rglob("*") if is_image(p))
        elif any(ch in item for ch in "*?["):
            paths += sorted(Path(p) for p in glob.glob(item, recursive=True,
                                                      include_hidden=True) if is_image(Path(p)))
        elif path.exists():
            paths.append(path)
        else:
            raise IadkitError(f"{item}: no such file or folder")
    if not paths:
        raise IadkitError(f"no images found in {inputs}")
    return paths


def cmd_predict(args: argparse.Namespace) -> int:
    from .deploy.batch import predict_files
    from .engine import resolve_model_dir
    from .methods import Detector

    if args.format == "mvtec-ad2":
        return _predict_submission(args)
    _start_executor(args)
    model_dir = resolve_model_dir(args.run_dir, args.model)
    detector = Detector.load(model_dir, device=args.device,
                             accept_backbone_change=args.accept_backbone_change,
                             precision=args.precision)
    summary = predict_files(detector, _collect_images(args.inputs), Path(args.out),
                            output_format=args.format, resume=args.resume,
                            heatmaps=not args.no_heatmaps, batch_size=args.batch_size,
                            show_progress=not args.quiet, executor=args.executor,
                            address=args.address, actors=args.actors, model_dir=model_dir)
    resumed = f", {summary.skipped} already done" if summary.skipped else ""
    print(f"{summary.scored} images scored, {summary.failed} unreadable{resumed}: "
          f"{summary.output}")
    return 0 if summary.failed == 0 else 1


def cmd_adapt(args: argparse.Namespace) -> int:
    """Adapt a saved detector to a new subclass (product variant) from a few of its normal
    images and save the adapted copy; the original model is left as it is."""
    from .data import Sample, SampleSet, make_loader
    from .engine import resolve_model_dir
    from .methods import Detector

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise IadkitError(f"--out {out}: exists and is not an empty folder; the adapted model "
                          "goes into a new one")
    paths = _collect_images(args.references)
    model_dir = resolve_model_dir(args.run_dir, args.model)
    detector = Detector.load(model_dir, device=args.device,
                             accept_backbone_change=args.accept_backbone_change,
                             precision=args.precision)
    if not detector.needs_references:
        raise IadkitError(f"{model_dir}: this {detector.name} model does not adapt to reference "
                          "images (adapted_moe with expert_choice='references', or with "
                          "use_tta=True and tta_statistics='reference', does)")
    references = SampleSet(Sample(path, 0, "reference", "good", "train") for path in paths)
    detector.adapt_to_references(make_loader(references, detector.preprocess, args.batch_size))
    detector.save(out)
    print(f"adapted to {len(paths)} reference images: {out}")
    return 0


def _predict_submission(args: argparse.Namespace) -> int:
    """``iadkit predict --format mvtec-ad2``: each object's images go through the run's model
    of that object (a run with one model per object), or through the one model (``--model``,
    or a run of one model). Every image's place and model are checked before any scoring."""
    from .deploy.submission import submission_paths, write_mvtec_ad2_submission
    from .engine import read_run, resolve_model_dir
    from .methods import Detector

    by_object: dict[str, list[Path]] = {}
    for image in _collect_images(args.inputs):
        submission_paths(image)
        by_object.setdefault(image.parent.parent.name, []).append(image)
    per_object = args.model is None and not (Path(args.run_dir) / "detector.json").is_file() \
        and len(read_run(args.run_dir)[1]) > 1
    models = {name: resolve_model_dir(args.run_dir, name if per_object else args.model)
              for name in by_object}
    written, failed = 0, []
    for name, images in by_object.items():
        detector = Detector.load(models[name], device=args.device,
                                 accept_backbone_change=args.accept_backbone_change,
                                 precision=args.precision)
        summary = write_mvtec_ad2_submission(detector, images, Path(args.out),
                                             args.batch_size, not args.quiet)
        written += summary.written
        failed += summary.failed
    for line in failed:
        print(line, file=sys.stderr)
    print(f"{written} maps written in the MVTec AD 2 submission layout, {len(failed)} "
          f"unreadable: {args.out}")
    return 0 if not failed else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from .data.elpv import prepare_elpv
    from .engine import RunConfig, fit_run, test_run

    out = Path(args.out)
    data_root = Path(args.data) if args.data else out / "data"
    if not args.data:
        print(f"preparing the ELPV solar-cell data in {data_root} ...")
        prepare_elpv(data_root, seed=args.seed, max_train=args.max_train)
    config = RunConfig(method=args.method, preset="cpu", data=str(data_root),
                       device=args.device or "auto", seed=args.seed,
                       show_progress=not args.quiet)
    print(f"training {config.method} (cpu preset) ...")
    fit_run(config, out / "run")
    results, evaluations = test_run(out / "run", show_progress=not args.quiet)
    _write_outputs(results, evaluations, str(out / "metrics.json"), str(out / "report"),
                   title=f"iadkit demo: {config.method} on {data_root}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "prepare":
        from .data.elpv import prepare_elpv

        if args.dataset != "elpv":
            raise IadkitError(f"unknown dataset {args.dataset!r}; available: elpv")
        category = prepare_elpv(args.dest, args.test_fraction, args.seed, args.max_train)
        print(f"ELPV written to {category}")
    else:
        generate_dataset(args.dest, tuple(args.categories), args.n_train, size=args.size,
                         seed=args.seed, layout=args.layout)
        print(f"generated a {args.layout} dataset in {args.dest}")
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from .benchmark import load_grid, run_grid

    _start_executor(args)
    cells = load_grid(args.grid)
    records = run_grid(cells, args.out, show_progress=not args.quiet, executor=args.executor,
                       address=args.address, cpus_per_cell=args.cpus_per_cell)
    failed = [r["id"] for r in records if r.get("status") != "ok"]
    print((Path(args.out) / "results.md").read_text(), end="")
    print(f"{len(records) - len(failed)} of {len(cells)} cells done; results in {args.out}")
    for record in records:
        if record.get("status") != "ok":
            print(f"failed: {record['id']}: {record.get('error')}", file=sys.stderr)
    return 1 if failed else 0


def cmd_export(args: argparse.Namespace) -> int:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise IadkitError("iadkit export needs onnx and onnxruntime: pip install 'iadkit[onnx]'"
                          ) from None
    from .deploy.export import export_onnx
    from .engine import resolve_model_dir
    from .methods import Detector

    if args.precision == "int8" and args.format != "openvino":
        raise IadkitError("--precision int8 is an OpenVINO model: add --format openvino")
    if args.precision != "int8" and args.calibration_data:
        raise IadkitError("--calibration-data calibrates an INT8 model: add --format openvino "
                          "--precision int8")
    if not args.int8_tolerance > 0:
        raise IadkitError(f"--int8-tolerance must be positive, got {args.int8_tolerance}")
    if not args.int8_max_minutes > 0:
        raise IadkitError(f"--int8-max-minutes must be positive, got {args.int8_max_minutes}")
    model_dir = resolve_model_dir(args.run_dir, args.model)
    # Refused before the (slow) export: an INT8 model needs normal images to calibrate on.
    calibration = (_int8_calibration_images(args, model_dir) if args.precision == "int8"
                   else None)
    detector = Detector.load(model_dir, device="cpu",
                             accept_backbone_change=args.accept_backbone_change)
    record = export_onnx(detector, args.out, opset=args.opset)
    parity = record["parity"]
    print(f"{detector.name} exported to {Path(args.out) / 'model.onnx'}; largest difference to "
          f"PyTorch: maps {parity['maps_max_abs']:.3g}, scores {parity['scores_max_abs']:.3g}")
    if calibration is not None:
        from .deploy.quantize import quantize_export

        try:
            result = quantize_export(args.out, calibration, tolerance=args.int8_tolerance,
                                     max_restore_minutes=args.int8_max_minutes)
        except IadkitError:
            print(f"the float32 export in {args.out} is kept", file=sys.stderr)
            raise
        print(f"INT8 model {Path(args.out) / result['model']}: calibrated on "
              f"{result['n_calibration_images']} training images; score drift on "
              f"{result['n_held_out_images']} held-out normals {result['drift']:.3g} standard "
              f"deviations (tolerance {result['tolerance']:g})")
    return 0


def _int8_calibration_images(args: argparse.Namespace, model_dir: Path) -> list[Path]:
    """Normal images for INT8 calibration: --calibration-data, else the run's training images
    of the exported model (never test images)."""
    from .data.layouts import list_images
    from .engine import read_run

    if args.calibration_data:
        folder = Path(args.calibration_data)
        if not folder.is_dir():
            raise IadkitError(f"--calibration-data {folder}: not a folder")
        images = list_images(folder)
        if not images:
            raise IadkitError(f"--calibration-data {folder}: holds no images")
        return images
    run_dir = model_dir.parent.parent
    try:
        config, _ = read_run(run_dir)
    except IadkitError:
        raise IadkitError(f"{args.run_dir}: a model folder outside its run; give normal images "
                          "to calibrate the INT8 model with --calibration-data DIR") from None
    for task in config.tasks():
        if task.name == model_dir.name:
            return [sample.image_path for sample in task.train]
    raise IadkitError(f"{run_dir}: its setting has no model {model_dir.name!r}; give "
                      "--calibration-data DIR")


def _read_api_keys(path: str | None) -> tuple[str, ...]:
    """The keys of an API-key file: one per line; blank lines and '#' comments ignored."""
    if path is None:
        return ()
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise IadkitError(f"--api-key-file {path}: unreadable ({error})") from None
    keys = tuple(line.strip() for line in lines if line.strip() and not line.startswith("#"))
    if not keys:
        raise IadkitError(f"--api-key-file {path}: holds no key")
    if any(len(key) < 16 for key in keys):
        raise IadkitError(f"--api-key-file {path}: every key needs at least 16 characters")
    return keys


def service_settings(args: argparse.Namespace) -> ServiceSettings:
    """``iadkit serve``'s flags as the service's settings."""
    return ServiceSettings(
        max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=args.max_pixels,
        max_decoded_bytes=int(args.max_decoded_mb * 2**20), max_in_flight=args.max_in_flight,
        max_waiting=args.max_waiting, body_timeout_s=args.body_timeout,
        request_timeout_s=args.request_timeout, api_keys=_read_api_keys(args.api_key_file),
        cors_origins=tuple(args.cors_origin or ()), docs=args.docs)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        raise IadkitError("iadkit serve needs FastAPI and uvicorn: pip install 'iadkit[serve]'"
                          ) from None
    from .deploy.inferencer import CONFIG_FILE as EXPORT_CONFIG_FILE
    from .deploy.service import create_app

    model_dir = Path(args.model_dir)
    threads = args.threads
    if not (model_dir / EXPORT_CONFIG_FILE).is_file():  # an export needs (and imports) no torch
        import torch

        from .engine import resolve_model_dir

        model_dir = resolve_model_dir(model_dir, args.model)
        if threads is not None:  # this process is the server: its torch threads are ours
            torch.set_num_threads(threads)
            threads = None
    app = create_app(model_dir, device=args.device, runtime=args.runtime,
                     precision=args.precision, threads=threads,
                     settings=service_settings(args),
                     accept_backbone_change=args.accept_backbone_change)
    uvicorn.run(app, host=args.host, port=args.port,
                log_level="info" if args.verbose else "warning")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from .data.layouts import load_dataset
    from .synthesis import TextureSource, build_pseudo_validation, preview_grid

    normals = load_dataset(args.data, args.category, args.layout).where(split="train")
    textures = TextureSource(args.textures) if args.textures else None
    if args.synth_command == "preview":
        path = preview_grid(normals, args.out, args.synthesis, args.count, args.size, textures,
                            args.seed)
        print(f"preview (normal | synthetic | mask) written to {path}")
    else:
        written = build_pseudo_validation(normals, args.out, args.synthesis, args.size,
                                          textures, args.seed)
        print(f"pseudo-validation set of {len(written)} images "
              f"({sum(written.labels)} synthetic) written to {args.out}")
    return 0


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", help="method name (see 'iadkit methods')")
    parser.add_argument("--preset", help="cpu (default) or paper")
    parser.add_argument("--data", help="dataset root folder")
    parser.add_argument("--category", action="append",
                        help="category to use; repeat for several; 'all' for every one")
    parser.add_argument("--layout", help="dataset layout (default: auto-detect)")
    parser.add_argument("--setting", help="one-class (default), model-unified, "
                        "absolute-unified, unseen-subclass")
    parser.add_argument("--seen", action="append", help="seen subclass (unseen-subclass setting)")
    parser.add_argument("--unseen", action="append", help="unseen subclass")
    parser.add_argument("--reference-normals", type=int, help="unseen-subclass setting: how "
                        "many training normals of each unseen subclass a detector that adapts "
                        "to it (adapted_moe, tta_statistics=reference) is given before it is "
                        "tested")
    parser.add_argument("--param", action="append", type=_parse_param, metavar="KEY=VALUE",
                        help="override a hyperparameter (value parsed as YAML)")
    parser.add_argument("--config", help="YAML file of run settings")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--calibration", help="where the threshold's normal scores come from: "
                        "auto (default: leave-one-out where the method can, else holdout), "
                        "holdout, leave-one-out, cv:K (K extra fits) or none")
    parser.add_argument("--target-fpr", type=float, help="the threshold bounds the false-"
                        "positive rate on normal images at this (default 0.01)")
    parser.add_argument("--fpr-confidence", type=float, help="with this confidence (default 0.9)")
    parser.add_argument("--validation-fraction", type=float,
                        help="share of training normals held out for a holdout calibration and "
                        "for a search (default 0.1)")
    parser.add_argument("--search", help="choose inference parameters on a pseudo-validation "
                        "set of the held-out normals: 'default' (the method's own search) or "
                        "a YAML list of stages, e.g. '[{param: tau, values: [100, 300]}]'")
    parser.add_argument("--search-synthesis", help="anomalies of that pseudo-validation set: "
                        "fragments, draem, cse, cutpaste, scar or mixed (default: the method's)")
    parser.add_argument("--search-textures", help="texture folder (e.g. DTD images/) for it; "
                        "procedural textures without it")


def _start_executor(args: argparse.Namespace) -> None:
    """Refuse a bad --executor/--address, and connect to Ray, before any work."""
    check_executor(args.executor, args.address)
    if args.executor == "ray":
        start_ray(args.address)


def _add_executor_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--executor", default="local",
                        help="local (default) or ray: fan the work out on a Ray cluster")
    parser.add_argument("--address", help="the Ray cluster's HOST:PORT (default: start a "
                        "local Ray instance)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iadkit", description=__doc__.split("\n")[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    common.add_argument("--device", help="auto (default), cpu, cuda, cuda:1 ...")
    common.add_argument("--verbose", "-v", action="store_true", help="log what happens")
    common.add_argument("--accept-backbone-change", action="store_true",
                        help="load a saved detector although its backbone weights file differs "
                        "from the one it was fitted with (SHA-256 checked otherwise)")
    # The commands that run a detector in PyTorch (export and serve name the runtime's).
    networks = argparse.ArgumentParser(add_help=False)
    networks.add_argument("--precision", choices=PRECISIONS,
                          help="what the networks compute in: f32 or bf16 (bfloat16 autocast, "
                          "for GPUs and CPUs with bfloat16 units); default: the saved model's, "
                          "f32 for a new one")
    commands = parser.add_subparsers(dest="command", required=True)

    def add_command(name: str, help: str, runs_networks: bool = False
                    ) -> argparse.ArgumentParser:
        parents = [common, networks] if runs_networks else [common]
        return commands.add_parser(name, help=help, parents=parents)

    add_command("methods", "list methods and presets").set_defaults(func=cmd_methods)

    fit = add_command("fit", "train detector(s) into a run folder", runs_networks=True)
    _add_run_flags(fit)
    fit.add_argument("--out", required=True, help="run folder to create")
    fit.add_argument("--resume", action="store_true",
                     help="keep models an interrupted run already saved; fit the rest")
    fit.set_defaults(func=cmd_fit)

    test = add_command("test", "evaluate a run folder on its test split", runs_networks=True)
    test.add_argument("run_dir")
    test.add_argument("--data", help="dataset root (default: the one used for fitting)")
    test.add_argument("--category", action="append")
    test.add_argument("--json", help="write the metrics as JSON here")
    test.add_argument("--protocol", help="also report a benchmark's own table: mvtec-ad2, "
                      "loco, real-iad or visa (docs/usage.md)")
    test.add_argument("--views", default="max", help="a multi-view sample's score from its "
                      "views' scores: max (default) or mean (Real-IAD's sample AUROC)")
    test.add_argument("--report", help="write an HTML report into this folder")
    test.set_defaults(func=cmd_test)

    predict = add_command("predict", "score images with a trained detector",
                          runs_networks=True)
    predict.add_argument("run_dir", help="run folder or model folder")
    predict.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    predict.add_argument("--out", required=True, help="folder for scores.csv and heatmaps/")
    predict.add_argument("--model", help="which model of a multi-model run folder")
    predict.add_argument("--batch-size", type=int, default=16)
    predict.add_argument("--no-heatmaps", action="store_true")
    predict.add_argument("--format", choices=("csv", "jsonl", "mvtec-ad2"), default="csv",
                         help="scores.csv (default), scores.jsonl, or mvtec-ad2: float16 TIFF "
                         "maps and 0/255 PNG segmentations in the layout MVTec AD 2's "
                         "evaluation server takes (images of <object>/test_private*/)")
    predict.add_argument("--resume", action="store_true",
                         help="skip the files already in the output and append the rest")
    _add_executor_flags(predict)
    predict.add_argument("--actors", type=int, default=2,
                         help="with --executor ray: actors, each holding the model once")
    predict.set_defaults(func=cmd_predict)

    adapt = add_command("adapt", "adapt a trained detector to a new subclass from a few of its "
                        "normal images (adapted_moe, tta_statistics=reference)",
                        runs_networks=True)
    adapt.add_argument("run_dir", help="run folder or model folder")
    adapt.add_argument("references", nargs="+",
                       help="normal images of the new subclass: files, folders or globs")
    adapt.add_argument("--out", required=True,
                       help="new folder for the adapted model (iadkit predict takes it)")
    adapt.add_argument("--model", help="which model of a multi-model run folder")
    adapt.add_argument("--batch-size", type=int, default=16)
    adapt.set_defaults(func=cmd_adapt)

    benchmark = add_command("benchmark", "run a grid of methods x datasets x settings "
                            "(resumable) into CSV/JSON/markdown results")
    benchmark.add_argument("grid", help="grid YAML file (see iadkit.benchmark)")
    benchmark.add_argument("--out", required=True,
                           help="results folder; run again to finish an interrupted grid")
    _add_executor_flags(benchmark)
    benchmark.add_argument("--cpus-per-cell", type=int, default=1,
                           help="with --executor ray: CPUs (and torch threads) per cell")
    benchmark.set_defaults(func=cmd_benchmark)

    export = add_command("export", "export a trained detector's inference as ONNX (and an "
                         "INT8 OpenVINO model)")
    export.add_argument("run_dir", help="run folder or model folder")
    export.add_argument("--model", help="which model of a multi-model run folder")
    export.add_argument("--format", choices=("onnx", "openvino"), default="onnx",
                        help="openvino: the ONNX graph, which OpenVINO runs, plus with "
                        "--precision int8 a quantised OpenVINO model")
    export.add_argument("--precision", choices=("f32", "int8"), default="f32",
                        help="int8: INT8 convolutions calibrated on training normals (NNCF); "
                        "refused when held-out normals' scores drift (--int8-tolerance)")
    export.add_argument("--calibration-data", help="folder of normal images to calibrate the "
                        "INT8 model on (default: the run's training images of the model)")
    export.add_argument("--int8-tolerance", type=float, default=DEFAULT_DRIFT_TOLERANCE,
                        help="largest INT8 score drift on held-out normals, in standard "
                        "deviations of their float32 scores (default %(default)s)")
    export.add_argument("--int8-max-minutes", type=float, default=DEFAULT_MAX_RESTORE_MINUTES,
                        help="when the INT8 scores drift, the longest expected search for the "
                        "layers to keep in float32 before the export is refused instead "
                        "(default %(default)s)")
    export.add_argument("--out", required=True, help="folder for model.onnx + inference.json")
    export.add_argument("--opset", type=int, default=17)
    export.set_defaults(func=cmd_export)

    serve = add_command("serve", "serve a trained detector or an ONNX export over HTTP "
                        "(POST /predict)")
    serve.add_argument("model_dir", help="run folder, model folder, or the folder of an "
                       "export (iadkit export), which runs without torch")
    serve.add_argument("--runtime", choices=("onnxruntime", "openvino"),
                       help="runtime of an export (default onnxruntime; openvino was the "
                       "fastest on CPUs, see docs/deployment.md)")
    serve.add_argument("--precision", choices=("f32", "bf16", "int8"),
                       help="OpenVINO's precision for an export (default f32; int8 runs the "
                       "export's INT8 model, iadkit export --precision int8), or the networks' "
                       "for a saved detector (f32 or bf16; default: the saved one)")
    serve.add_argument("--threads", type=int, help="CPU threads of the runtime, or of torch for "
                       "a saved detector (default: all)")
    serve.add_argument("--model", help="which model of a multi-model run folder")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default "
                       "127.0.0.1: this machine only; expose it behind --api-key-file)")
    serve.add_argument("--port", type=int, default=8000)
    limits = ServiceSettings()  # the defaults live there, once
    serve.add_argument("--max-upload-mb", type=float, default=limits.max_upload_bytes / 2**20,
                       help="larger request bodies get 413 (default %(default)g)")
    serve.add_argument("--max-pixels", type=int, default=limits.max_pixels,
                       help="larger images get 413 before decoding (default %(default)d)")
    serve.add_argument("--max-decoded-mb", type=float,
                       default=limits.max_decoded_bytes / 2**20,
                       help="images whose decoding takes more memory get 413 before decoding "
                       "(default %(default)g)")
    serve.add_argument("--max-in-flight", type=int, default=limits.max_in_flight,
                       help="images decoded and scored at once (default %(default)d)")
    serve.add_argument("--max-waiting", type=int, default=limits.max_waiting,
                       help="requests waiting for a slot; more get 503 (default %(default)d)")
    serve.add_argument("--body-timeout", type=float, default=limits.body_timeout_s,
                       help="seconds a request's whole body may take to arrive before 408 "
                       "(default %(default)g)")
    serve.add_argument("--request-timeout", type=float, default=limits.request_timeout_s,
                       help="seconds before an unanswered request gets 503 (default %(default)g)")
    serve.add_argument("--api-key-file", help="require one of the keys in this file (one per "
                       "line) in an X-API-Key or Authorization: Bearer header")
    serve.add_argument("--cors-origin", action="append",
                       help="allow browser pages from this origin; repeat for several "
                       "(default: none)")
    serve.add_argument("--docs", action="store_true",
                       help="serve the interactive API docs at /docs")
    serve.set_defaults(func=cmd_serve)

    demo = add_command("demo", "train, evaluate and report on the ELPV solar cells")
    demo.add_argument("--out", default="demo_out")
    demo.add_argument("--data", help="use this dataset instead of preparing ELPV")
    demo.add_argument("--method", default="patchcore")
    demo.add_argument("--max-train", type=int, default=400,
                      help="training images kept from ELPV (default 400, for a quick demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)

    synth = add_command("synth", "synthetic anomalies: preview them, build pseudo-validation")
    synth_commands = synth.add_subparsers(dest="synth_command", required=True)
    for name, help_text in (("preview", "write a PNG grid: normal | synthetic | mask"),
                            ("pseudo-val", "write a labelled set: half normal, half synthetic")):
        command = synth_commands.add_parser(name, help=help_text, parents=[common])
        command.add_argument("--data", required=True, help="dataset root (its training normals)")
        command.add_argument("--category", action="append")
        command.add_argument("--layout", default="auto")
        command.add_argument("--synthesis", "--kind", default="draem",
                             help="fragments, draem, cse, cutpaste or scar; pseudo-val also "
                             "takes mixed (all of them in turn)")
        command.add_argument("--textures", help="texture folder (e.g. DTD images/); "
                             "procedural textures without it")
        command.add_argument("--out", required=True,
                             help="PNG file (preview) or folder (pseudo-val)")
        command.add_argument("--count", type=int, default=6, help="rows of the preview")
        command.add_argument("--size", type=int, default=192)
        command.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=cmd_synth)

    data = add_command("data", "prepare or generate datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    prepare = data_commands.add_parser("prepare", help="arrange a packaged dataset (elpv)",
                                       parents=[common])
    prepare.add_argument("dataset")
    prepare.add_argument("dest")
    prepare.add_argument("--test-fraction", type=float, default=0.25)
    prepare.add_argument("--max-train", type=int)
    prepare.add_argument("--seed", type=int, default=0)
    generate = data_commands.add_parser("generate", help="write a procedural test dataset",
                                        parents=[common])
    generate.add_argument("dest")
    generate.add_argument("--categories", nargs="+", default=["texture"])
    generate.add_argument("--n-train", type=int, default=20)
    generate.add_argument("--size", type=int, default=64)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--layout", default="mvtec",
                          choices=GENERATED_LAYOUTS,
                          help="the folder layout of that benchmark (default mvtec)")
    data.set_defaults(func=cmd_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        # Under torchrun: join the other ranks; rank 0 alone reports (and writes files).
        if distributed.init_from_environment(getattr(args, "device", None)) \
                and not distributed.is_main():
            args.quiet = True
            logging.getLogger().setLevel(logging.ERROR)
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the process's lifetime)
        return args.func(args)
    except IadkitError as error:
        print(f"iadkit: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("iadkit: interrupted", file=sys.stderr)
        return 130
    finally:
        distributed.leave()


if __name__ == "__main__":
    sys.exit(main())
