"""The ``cellbg`` command line: thin typer commands that call the stage functions.

Exit codes: 0 success, 2 user error (one red line on stderr, no traceback), 1 internal
failure. ``--debug`` shows the traceback.
"""

from __future__ import annotations

import contextlib
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cellbg import __version__
from cellbg._checks import CellbgError, describe_os_error

app = typer.Typer(
    name="cellbg",
    help="How much of a cell classifier's accuracy comes from the cell, and how much from its background.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)
_state = {"debug": False}

ProtocolArg = Annotated[Path, typer.Argument(help="protocol YAML file", show_default=False)]
RunDirArg = Annotated[Path, typer.Argument(help="run folder (the protocol's output)", show_default=False)]


@contextlib.contextmanager
def _handle():
    """Turn a user error into one red line and exit 2; anything else into exit 1."""
    try:
        yield
    except typer.Exit:
        raise
    except BrokenPipeError:  # `cellbg ... | head`: the reader has what it wanted
        _stdout_to_devnull()
        raise typer.Exit(code=0) from None
    except CellbgError as exc:
        if _state["debug"]:
            raise
        for line in str(exc).splitlines() or [type(exc).__name__]:
            err.print(f"[red]error:[/red] {line}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow]; finished work is kept, run again to resume")
        raise typer.Exit(code=130) from None
    except Exception as exc:
        if _state["debug"]:
            raise
        fs_error = describe_os_error(exc)  # disk full, read-only, a file in the way: the user's to fix
        if fs_error is not None:
            err.print(f"[red]error:[/red] {fs_error}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None
        msg = str(exc).splitlines()[0] if str(exc) else ""
        err.print(
            f"[red]internal error:[/red] {type(exc).__name__}: {msg} (run with --debug for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(code=1) from None


def _stdout_to_devnull() -> None:
    """Point stdout at /dev/null so that Python's flush at exit does not fail again
    (the recipe of the Python docs, "Note on SIGPIPE")."""
    import os
    import sys

    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _load(protocol: Path, *, check_paths: bool = True):
    from cellbg.protocol import load_protocol

    return load_protocol(protocol, check_paths=check_paths)


def _version(value: bool) -> None:
    if value:
        out.print(f"cellbg {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="show Python tracebacks on errors")] = False,
) -> None:
    _state["debug"] = debug


def _df_table(df, title: str | None = None) -> Table:
    table = Table(title=title, show_lines=False)
    for c in df.columns:
        table.add_column(str(c))
    for row in df.itertuples(index=False):
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
    return table


@app.command(rich_help_panel="Set-up")
def validate(protocol: ProtocolArg) -> None:
    """Check a protocol, its data listing, weights and device; print it with every default filled in."""
    with _handle():
        from cellbg.preflight import preflight
        from cellbg.protocol import resolved_yaml

        p = _load(protocol)
        preflight(p, source=str(protocol))  # data listing, weights, device: before any work
        typer.echo(resolved_yaml(p), nl=False)


@app.command("init", rich_help_panel="Set-up")
def init_command(
    folder: Annotated[
        Path, typer.Argument(help="folder of images: <label>/<patient>/<image>, or a plain folder", show_default=False)
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="protocol file to write")] = Path("protocol.yaml"),
    name: Annotated[str | None, typer.Option(help="protocol name; default: the folder's name")] = None,
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing protocol file")] = False,
) -> None:
    """Write a commented protocol for a folder of images (classes, patients and masks detected)."""
    with _handle():
        from cellbg.scaffold import init_protocol

        path, scan = init_protocol(folder, output, force=force, name=name)
        for line in scan.summary_lines():
            out.print(line, highlight=False, soft_wrap=True)
        out.print(f"wrote {path}; check it with `cellbg validate {path}`", highlight=False, soft_wrap=True)


@app.command(rich_help_panel="Set-up")
def data(protocol: ProtocolArg) -> None:
    """What the dataset holds: classes, patients, images."""
    with _handle():
        from cellbg.data import discover, summarize

        p = _load(protocol)
        table = discover(p, need_classes=False)
        summary = summarize(table)
        out.print(_df_table(summary, title=f"{p.name}: {len(table)} images"))
        per_class = table.groupby("label").agg(patients=("patient_id", "nunique"), images=("path", "size"))
        for label, r in per_class.iterrows():
            out.print(f"class {label}: {r.patients} patients, {r.images} images")
        n_masks = int((table["mask_path"] != "").sum())
        out.print(f"masks: {n_masks} of {len(table)} images have one")
        if table["label"].nunique() < 2:
            out.print(
                f"[yellow]{table['label'].nunique()} class: enough for `cellbg segment`, "
                "not for training (a classifier needs at least two)[/yellow]"
            )


# --- synth command (issue 3) ---
class _LabelBy(StrEnum):
    cell = "cell"
    patient = "patient"


class _SynthMode(StrEnum):
    rgb = "rgb"
    gray = "gray"


class _CoocClass(StrEnum):
    healthy = "healthy"
    sezary = "sezary"


@app.command(rich_help_panel="Set-up")
def synth(
    out_dir: Annotated[Path, typer.Argument(help="output folder (new or empty)", show_default=False)],
    patients: Annotated[int, typer.Option(min=1, help="patients (slides)")] = 8,
    cells_per_patient: Annotated[int, typer.Option(min=1, help="cells per patient")] = 40,
    cells_per_image: Annotated[int, typer.Option(min=1, help="most cells per field of view")] = 6,
    image_size: Annotated[int, typer.Option(min=64, help="field side in pixels")] = 256,
    signal: Annotated[float, typer.Option(min=0.0, max=1.0, help="planted background-cue probability")] = 0.8,
    signal_sd_between_patients: Annotated[float, typer.Option(min=0.0, help="patient SD of the cue probability")] = 0.0,
    label_by: Annotated[_LabelBy, typer.Option(help="one class per image (cell) or per patient")] = _LabelBy.cell,
    mode: Annotated[_SynthMode, typer.Option(help="RGB brightfield or gray fluorescence")] = _SynthMode.rgb,
    seed: Annotated[int, typer.Option(min=0, help="random seed (same seed, same bytes)")] = 0,
    cooccurrence: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="probability of non-target objects beside a cell of one class")
    ] = 0.0,
    cooccurrence_class: Annotated[
        _CoocClass, typer.Option(help="the class the non-target objects accompany")
    ] = _CoocClass.sezary,
) -> None:
    """Make a synthetic Sezary-like dataset with a planted background signal."""
    with _handle():
        from cellbg.synth import make_dataset

        manifest = make_dataset(
            out_dir,
            patients=patients,
            cells_per_patient=cells_per_patient,
            cells_per_image=cells_per_image,
            image_size=image_size,
            signal=signal,
            signal_sd_between_patients=signal_sd_between_patients,
            label_by=label_by.value,
            mode=mode.value,
            seed=seed,
            cooccurrence=cooccurrence,
            cooccurrence_class=cooccurrence_class.value,
        )
        counts = ", ".join(f"{k}: {v}" for k, v in manifest["label"].value_counts().sort_index().items())
        out.print(f"wrote {len(manifest)} images ({counts}) of {manifest['patient'].nunique()} patients to {out_dir}")


# --- models / segment commands (issue 4) ---
@app.command("models", rich_help_panel="Stages")
def models_command() -> None:
    """List the Cellpose models present locally, where they are looked for, and how to pre-stage them."""
    with _handle():
        from cellbg.segment import MODELS_HELP, list_models, model_dir

        table = list_models()
        out.print(_df_table(table, title=f"Cellpose models in {model_dir()}"))
        out.print(
            "Looked up by name in $CELLPOSE_LOCAL_MODELS_PATH, else ~/.cellpose/models; "
            "segmentation.model may also be a weights path."
        )
        out.print(MODELS_HELP, soft_wrap=True, highlight=False, markup=False)


@app.command("segment", rich_help_panel="Stages")
def segment_command(
    protocol: ProtocolArg,
    evaluate: Annotated[bool, typer.Option("--evaluate", help="score against ground-truth masks")] = False,
) -> None:
    """Segment every image into <run>/segmentation/ (threshold, cellpose or masks)."""
    with _handle():
        from cellbg.segment import evaluate_run, run_segmentation, summarize_evaluation

        p = _load(protocol)
        table = run_segmentation(p)
        out.print(f"{len(table)} label images ({p.segmentation.method}) in {p.run_dir / 'segmentation'}")
        if p.segmentation.method == "threshold":
            from cellbg.segment import threshold_log

            chosen = threshold_log(p.run_dir)
            if chosen is not None and len(chosen):
                d, est = chosen["diameter"], chosen["diameter_estimated"].astype(bool)
                how = f"estimated for {int(est.sum())} of {len(chosen)} images" if est.any() else "given"
                out.print(
                    f"diameter: median {d.median():.1f} px, range {d.min():.1f}-{d.max():.1f} ({how}); "
                    f"segmented plane: {', '.join(sorted({str(v).split(' (')[0] for v in chosen['plane']}))}",
                    highlight=False,
                    soft_wrap=True,
                )
                out.print(f"per image: {p.run_dir / 'segmentation' / 'threshold.csv'}", highlight=False, soft_wrap=True)
        if evaluate:
            scores = evaluate_run(p, table)
            cols = ["image_id", "n_true", "n_pred", "precision", "recall", "f1", "ap"]
            out.print(_df_table(scores[cols], title="per image (F1 etc. at IoU 0.5; AP over IoU 0.5:0.95)"))
            m = summarize_evaluation(scores)
            out.print(
                f"mean precision {m['precision']:.3f}  recall {m['recall']:.3f}  "
                f"F1@0.5 {m['f1']:.3f}  AP@0.5:0.95 {m['ap']:.3f}  ({m['images']} images)"
            )


# --- crops command (issue 4) ---
@app.command("crops", rich_help_panel="Stages")
def crops_command(protocol: ProtocolArg) -> None:
    """Cut one crop and mask per cell: <run>/cells.parquet and <run>/crops.zarr."""
    with _handle():
        from cellbg.crops import run_crops

        p = _load(protocol)
        cells = run_crops(p)
        s = cells.attrs["summary"]
        removed = ", ".join(f"{k} {v}" for k, v in s["removed"].items())
        per_class = ", ".join(f"{k}: {v}" for k, v in s["cells_per_class"].items())
        out.print(f"{s['cells']} cells from {s['images']} images ({per_class}) in {p.run_dir}")
        out.print(f"removed by filter: {removed}")
        if "store_bytes" in s:
            ratio = s["store_bytes"] / s["source_pixel_bytes"] if s["source_pixel_bytes"] else float("nan")
            out.print(
                f"store: {s['store_bytes'] / 1e6:.1f} MB ({s['store_bytes_per_cell']:.0f} bytes per cell, "
                f"{ratio:.2f}x the source pixels' {s['store_dtype']} bytes)",
                highlight=False,
            )
        if s["images_without_cells"]:
            out.print(f"[yellow]{len(s['images_without_cells'])} image(s) without cells[/yellow]")


# --- variants command (issue 5) ---
@app.command("variants", rich_help_panel="Stages")
def variants_command(
    protocol: ProtocolArg,
    gallery: Annotated[Path | None, typer.Option(help="write a montage PNG: rows = cells, columns = variants")] = None,
    export: Annotated[Path | None, typer.Option(help="write every variant as TIFFs into this folder")] = None,
) -> None:
    """Check the protocol's background variants on the crops; optionally a gallery or a TIFF export."""
    with _handle():
        from cellbg.variants import run_variants

        s = run_variants(_load(protocol), gallery=gallery, export=export)
        out.print(f"{len(s['specs'])} variants on {s['cells']} cells: {', '.join(s['specs'])}")
        if s["gallery"]:
            out.print(f"gallery: {s['gallery']}")
        if s["export"]:
            out.print(f"exported TIFFs: {s['export']}")


# --- train command (issue 6) ---
@app.command(rich_help_panel="Stages")
def train(protocol: ProtocolArg) -> None:
    """Train every job (model x train variant x seed x fold) serially; finished jobs are skipped."""
    with _handle():
        from cellbg.train import run_training

        p = _load(protocol, check_paths=False)

        def show(r) -> None:
            acc = ", ".join(f"{k} {v:.3f}" for k, v in r.accuracy.items())
            out.print(
                f"{r.spec.model} / {r.spec.train_variant} / seed {r.spec.seed} / fold {r.spec.fold}: "
                f"{r.epochs} epochs (best {r.best_epoch}); test accuracy: {acc}",
                highlight=False,
                soft_wrap=True,
            )

        results = run_training(p, progress=show)
        out.print(f"{len(results)} jobs done; predictions in {p.run_dir / 'predictions.parquet'}", soft_wrap=True)


# --- saliency command (issue 8) ---
@app.command(rich_help_panel="Stages")
def saliency(
    protocol: ProtocolArg,
    montage: Annotated[
        Path | None, typer.Option("--montage", help="also draw crops with their maps into this PNG")
    ] = None,
) -> None:
    """Attribution maps and the background share of attribution for sampled held-out cells."""
    with _handle():
        from cellbg.saliency import run_saliency, write_montage

        p = _load(protocol, check_paths=False)
        table = run_saliency(p, progress=lambda i, n: out.print(f"job {i}/{n} mapped", highlight=False))
        summary = (
            table.groupby(["model", "train_variant", "method"], sort=False)[
                ["background_share", "background_ratio", "sanity_rank_corr"]
            ]
            .mean()
            .reset_index()
        )
        out.print(_df_table(summary, title=f"{len(table)} maps (mean per model, train variant, method)"))
        out.print(f"maps in {p.run_dir / 'saliency.zarr'}, table in {p.run_dir / 'saliency.parquet'}")
        if montage is not None:
            out.print(f"montage: {write_montage(p.run_dir, montage)}")


# --- stats command (issue 7) ---
@app.command(rich_help_panel="Results")
def stats(run_dir: RunDirArg) -> None:
    """Patient-level paired tests between conditions; writes RUN_DIR/stats/ (tests.csv, accuracy.csv, summary.md)."""
    with _handle():
        from cellbg.stats import run_stats

        table = run_stats(run_dir)
        out.print(f"{len(table)} tests; primary rows (estimate = B minus A, CI, p, Holm p, BH p):")
        for r in table[table["role"] == "primary"].itertuples():
            label = f"{r.comparison} ({r.name})" if r.name else r.comparison
            ps = (
                f"p={r.pvalue:.3g} holm={r.p_holm:.3g} bh={r.p_bh:.3g}"
                if r.pvalue == r.pvalue
                else "p not computed (see the note in tests.csv)"
            )  # NaN p: never a negative result
            out.print(
                f"  {r.family:<12} {r.model} {label}: {r.estimate:+.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}] {ps}",
                highlight=False,
                soft_wrap=True,
            )
        out.print(f"wrote {Path(run_dir) / 'stats'}: tests.csv, accuracy.csv, summary.md", highlight=False)


# --- report command (issue 10) ---
@app.command(rich_help_panel="Results")
def report(
    run_dir: RunDirArg,
    gallery_cells: Annotated[int, typer.Option(help="cells (rows) in the saliency gallery", min=1)] = 4,
) -> None:
    """Write RUN_DIR/report/: report.md, a self-contained report.html, LaTeX tables, figures."""
    with _handle():
        from cellbg.report import write_report

        folder = write_report(run_dir, gallery_cells=gallery_cells)
        made = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        out.print(f"report written to {folder} ({len(made)} files)")
        for name in made:
            if not name.startswith("figures/") or name.endswith(".png"):
                out.print(f"  {name}", highlight=False)


@app.command(rich_help_panel="Results")
def export(
    run_dir: RunDirArg,
    cells: Annotated[
        Path | None, typer.Option(help="write per-cell predictions here: one row per cell, columns per condition")
    ] = None,
    tests: Annotated[Path | None, typer.Option(help="write every test (stats/tests.csv) here")] = None,
) -> None:
    """Export a run's results as CSV: per-cell predictions (wide) and the tests."""
    with _handle():
        from cellbg.report.export import export_run

        for what, (path, rows) in export_run(run_dir, cells=cells, tests=tests).items():
            out.print(f"{what}: {rows} rows written to {path}", highlight=False, soft_wrap=True)


# --- detect command (issue 20) ---
@app.command(rich_help_panel="Stages")
def detect(protocol: ProtocolArg) -> None:
    """The detection study: Faster R-CNN with and without the correlated class; writes <run>/detect/."""
    with _handle():
        from cellbg.detect.train import run_detection

        p = _load(protocol)
        if not p.detection.enabled:
            raise CellbgError(f"{protocol}: detection.enabled is false; set it to run the detection study")
        tests = run_detection(p, progress=lambda s, d: out.print(f"{s.name} done ({d.name})", highlight=False))
        for r in tests.to_dict("records"):
            out.print(
                f"  {r['family']:<10} {r['condition']:<16} {r['class']:<10} {r['measure']:<6} {r['a']} -> "
                f"{r['b']}: {r['mean_a']:.3f} -> {r['mean_b']:.3f} (p={r['pvalue']:.3g}, holm={r['p_holm']:.3g})",
                highlight=False,
                soft_wrap=True,
            )
        out.print(f"tables and tests in {p.run_dir / 'detect'}", highlight=False, soft_wrap=True)


# --- run / status commands (issue 9) ---
class ExecutorKind(StrEnum):
    local = "local"
    slurm = "slurm"
    pbs = "pbs"
    sge = "sge"
    lsf = "lsf"


@app.command(rich_help_panel="Run")
def run(
    protocol: ProtocolArg,
    executor: Annotated[
        ExecutorKind | None, typer.Option(help="where jobs run; default: the protocol's executor.kind")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list the jobs and which are cached; run nothing")] = False,
) -> None:
    """Run the whole pipeline; skip every job whose inputs have not changed; resume after a kill."""
    with _handle():
        from cellbg.preflight import preflight
        from cellbg.runner import run_protocol

        p = _load(protocol)
        if not dry_run:  # before any work, for the executor the jobs will run on
            kind = {"kind": executor.value} if executor else {}
            preflight(p.model_copy(update={"executor": p.executor.model_copy(update=kind)}), source=str(protocol))
        summary = run_protocol(p, executor=executor.value if executor else None, dry_run=dry_run)
        if dry_run:
            for s in summary.stages:
                for j in s.jobs:
                    typer.echo(f"{s.name:<12} {'cached' if j.cached else 'to run':<7} {j.key}  {j.name}")
        typer.echo(summary.summary())
        if not summary.ok:
            err.print(f"[red]{len(summary.failures)} job(s) failed[/red]; finished jobs are kept, run again to retry")
            # bad input everywhere (exit 2, as for any user error) vs a failure of the code or machine
            raise typer.Exit(code=2 if all(f.user_error for f in summary.failures) else 1)
        if not dry_run:
            from cellbg.runner import final_lines

            typer.echo(f"run folder: {summary.run_dir} ({summary.ran} jobs ran in {summary.seconds:.1f} s)")
            for line in final_lines(summary.run_dir):
                typer.echo(line)


@app.command(rich_help_panel="Run")
def status(
    run_dir: RunDirArg,
    verify: Annotated[
        bool, typer.Option("--verify", help="hash every output and name damaged files (exit 2 if any)")
    ] = False,
) -> None:
    """How far a run is: state of the last run, jobs done and to do per stage, failures."""
    with _handle():
        from cellbg.runner import status as run_status

        result = run_status(run_dir, verify=verify)
        typer.echo(result.summary())
        if verify and result.damaged:
            stage, job, what = result.damaged[0]
            raise CellbgError(
                f"{len(result.damaged)} damaged file(s) in {result.run_dir}, e.g. {what} "
                f"({stage} {job}); run again to redo their jobs"
            )


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except BrokenPipeError:  # raised outside a command (help, usage): end as quietly
        _stdout_to_devnull()
        raise SystemExit(0) from None


if __name__ == "__main__":  # pragma: no cover
    main()
