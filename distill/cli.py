"""`distill` command line. User mistakes print one line and exit 2 (`--debug` shows the traceback)."""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import signal
import sys
import threading
from typing import Iterator, List, NoReturn, Optional

from .launch import ERRORS, is_main_process, report_error, said_stop, under_torchrun
from .errors import SIGNALLED, Terminated, UserError, stop_on_signal
from .roles import MODELS_OUT, SCRATCH, STUDENT, TEACHER

DEFAULT_RECIPE = "digits"
NEEDS = {"generate": (TEACHER,), "soft-labels": (TEACHER,), "train-student": (TEACHER,), "evaluate": MODELS_OUT}


def _recipe_args(p: argparse.ArgumentParser, target_help: str) -> None:
    p.add_argument("target", nargs="?", default=None, help=target_help)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set train.epochs=3 --set distill.temperature=4")
    p.add_argument("--out", default=None, help="run folder (default: output.dir of the recipe, else runs/NAME)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
                   help="continue an interrupted run from its newest checkpoint (`--resume DIR` = `DIR --resume`)")
    p.add_argument("--overwrite", action="store_true",
                   help="allow a run folder that holds a run of a different recipe (unchanged stages are reused)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also log scalars and weight/gradient histograms for TensorBoard, in RUN_DIR/tensorboard")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the student trained without distillation (the same as --set baseline=false)")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train in N processes on this machine (torchrun, on 127.0.0.1; gloo on the CPU, one GPU "
                        "each with train.device: cuda); data.batch_size stays the global batch")


class Parser(argparse.ArgumentParser):
    """A mistake on the command line is one line, as every other user mistake (argparse's own error prints the
    whole usage first); `--help` shows the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="distill",
        description="Knowledge distillation for PyTorch: train or load a teacher, cache its soft labels, "
                    "distill a small student, and compare it with the teacher and a student trained without "
                    "distillation.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser("run", help="run a whole recipe: teacher, soft labels, students, evaluation",
                       description="Run every stage of a recipe and print teacher / scratch student / distilled "
                                   "student side by side. With no RECIPE, runs the bundled 'digits' recipe.")
    _recipe_args(r, "a recipe file or a bundled recipe name (see `distill recipes`); default: digits")
    r.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="repeat the run for seeds 0..N-1 (in OUT/seed_<s>) and report mean ± sample std")

    sub.add_parser("recipes", help="list the bundled recipes", description="List the bundled recipes.")

    stage_help = ("a run folder holding recipe.yaml (from an earlier run), or a recipe file/name; "
                  "default: the bundled 'digits' recipe")
    for name, what in (("train-teacher", "train the teacher (or load its checkpoint)"),
                       ("generate", "the teacher writes training completions (sequence-level KD, distill."
                                    "sequence_kd): sampled, verified, resumable"),
                       ("soft-labels", "compute or reuse the cached teacher outputs"),
                       ("train-student", "train the distilled student and the no-distillation baseline"),
                       ("evaluate", "evaluate teacher and students on the test split, write metrics.json")):
        sp = sub.add_parser(name, help=what, description=f"Stage: {what}. Stages whose inputs are unchanged are "
                                                           f"not redone.")
        _recipe_args(sp, stage_help)
    ex = sub.add_parser("export", help="export a trained model: onnx (checked in ONNX Runtime), torchscript, "
                                       "safetensors, hf",
                        description="Export a model of a finished run. The export is loaded back and run on test "
                                    "inputs; it is kept only if its outputs match PyTorch's. ONNX and TorchScript "
                                    "files take raw inputs: the training data's normalisation (mean/std, saved "
                                    "with the model) is baked into the graph unless --no-preprocessing. "
                                    "safetensors is weights only; its metadata keeps the normalisation "
                                    "(`preprocessing`).")
    ex.add_argument("target", help="a run folder")
    ex.add_argument("--format", required=True, choices=("onnx", "torchscript", "safetensors", "hf"),
                    help="onnx or torchscript (take raw inputs), safetensors (weights only; the "
                         "normalisation stays in its metadata under `preprocessing`), or hf (gpt language "
                         "models: a Hugging Face GPT-2 folder with its character tokenizer)")
    ex.add_argument("--model", default="student",
                    help="student (default), student_scratch, teacher, or a compressed model: compress/NAME")
    ex.add_argument("--out", default=None, help="file to write (default: RUN_DIR/export/MODEL.EXT)")
    ex.add_argument("--no-preprocessing", dest="preprocessing", action="store_false",
                    help="leave the input normalisation out of onnx/torchscript: the file then takes inputs "
                         "already normalised with the training statistics")
    cp = sub.add_parser("compress", help="compress a finished run's student: layers, heads, channels, vocabulary, QAT",
                        description="Apply the recipe's compress.steps to the distilled student of a finished run, "
                                    "fine-tuning by distillation after each; models go to RUN_DIR/compress/.")
    cp.add_argument("target", help="a run folder")
    cp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe value, e.g. --set 'compress.steps=[layers, heads]' "
                         "--set compress.layers.to=2")
    cp.add_argument("--resume", action="store_true", help="continue an interrupted fine-tune from its checkpoint")
    cp.add_argument("--overwrite", action="store_true",
                    help="drop an interrupted fine-tune's checkpoints and start it over")
    bp = sub.add_parser("bench", help="measure every model and deployable variant of a run side by side",
                        description="Accuracy, parameters, file size, latency p50/p95 at batch 1, throughput and "
                                    "peak memory of the teacher, students, compressed models and their quantized "
                                    "and exported variants, measured in one run; writes bench/bench.json, "
                                    "bench/bench.md and bench/pareto.png.")
    bp.add_argument("target", help="a run folder")
    bp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe value, e.g. --set 'bench.variants=[fp32, dynamic, onnx_dynamic]'")
    rp = sub.add_parser("report", help="write one self-contained HTML report of a finished run",
                        description="Results table, training curves, knowledge retention and gradient consistency "
                                    "per layer, monitor adjustments, test-split confusion matrices, and the bench "
                                    "and teacher-assistant chain when present, in one HTML file with the plots "
                                    "embedded (no network needed to view it). Needs matplotlib.")
    rp.add_argument("target", help="a run folder")
    rp.add_argument("--out", default=None, help="file to write (default: RUN_DIR/report.html)")
    dp = sub.add_parser("doctor", help="diagnose a finished run: weak teacher, over-confident soft labels, capacity "
                                       "gap, unstable loss, overfitting, too small a student, int8 accuracy loss",
                        description="Read a finished run's logs and metrics (and, where needed, its models and "
                                    "validation split) and print each problem found with the numbers that "
                                    "triggered it, the threshold, and the recipe key to change; writes "
                                    "RUN_DIR/doctor.json. Exits 0 whether or not problems are found.")
    dp.add_argument("target", help="a run folder")
    sp = sub.add_parser("search", help="search distillation settings: a grid (default: temperature x alpha) or "
                                       "Optuna TPE with pruning of bad trials",
                        description="Run the distilled student once per trial against one teacher, rank by "
                                    "validation accuracy, and write search.md, search.json, search.png and best.yaml. "
                                    "--sampler grid (default): every grid point (default T in {2,3,4,5} x alpha in "
                                    "{0.5,0.7,0.9}). --sampler tpe: --trials trials drawn by Optuna's TPE (seeded by "
                                    "the student's seed) over --space ranges (default T in [1,8] x alpha in [0.1,1]), "
                                    "the first being the recipe's own values; a median pruner stops trials whose "
                                    "validation accuracy falls behind the others' at the same epoch.")
    sp.add_argument("target", nargs="?", default=None, help="a recipe file or bundled recipe name; default: digits")
    sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe value for every trial, e.g. --set student.train.epochs=20")
    sp.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                    help="a recipe key and its values to try (repeatable); replaces the default grid")
    sp.add_argument("--sampler", choices=("grid", "tpe"), default="grid",
                    help="grid: every combination of --grid; tpe: Optuna's TPE over --space (pip install -e "
                         "\".[search]\")")
    sp.add_argument("--trials", type=int, default=None, metavar="N", help="tpe: number of trials (default 12)")
    sp.add_argument("--space", action="append", default=[], metavar="KEY=LOW:HIGH[:log] | KEY=A,B,C",
                    help="tpe: a recipe key and its range (integers when both bounds are) or choices; repeatable; "
                         "replaces the default space distill.temperature=1.0:8.0, distill.alpha=0.1:1.0")
    sp.add_argument("--pruner", choices=("median", "none"), default=None,
                    help="tpe: median (default) stops a trial whose validation accuracy is below the median of the "
                         "completed trials at the same epoch; none runs every trial to the end")
    sp.add_argument("--pruner-startup-trials", type=int, default=None, metavar="N",
                    help="tpe: trials that complete before any is pruned (default 3)")
    sp.add_argument("--pruner-warmup-epochs", type=int, default=None, metavar="N",
                    help="tpe: epochs every trial runs before it can be pruned (default: a quarter of its epochs)")
    sp.add_argument("--out", default=None, help="output folder (default: runs/search/NAME)")
    for command in sub.choices.values():  # (--debug before or after the command; SUPPRESS: unset keeps the main one)
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show full tracebacks for errors")
    return p


def _check_sampler_flags(args: argparse.Namespace) -> None:
    """Each sampler's flags only with that sampler, and counts that make sense (before any work)."""
    tpe_only = {"--trials": args.trials, "--space": args.space, "--pruner": args.pruner,
                "--pruner-startup-trials": args.pruner_startup_trials,
                "--pruner-warmup-epochs": args.pruner_warmup_epochs}
    if args.sampler == "grid":
        given = next((k for k, v in tpe_only.items() if v not in (None, [])), None)
        if given:
            raise UserError(f"{given}: only for --sampler tpe; add --sampler tpe, or use --grid KEY=V1,V2,...")
        return
    if args.grid:
        raise UserError(f"--grid {args.grid[0]}: only for --sampler grid; with tpe give a range, "
                        f"--space KEY=LOW:HIGH or KEY=A,B,C")
    for flag, least in (("--trials", 1), ("--pruner-startup-trials", 0), ("--pruner-warmup-epochs", 0)):
        if tpe_only[flag] is not None and tpe_only[flag] < least:
            raise UserError(f"{flag} {tpe_only[flag]}: expected a number >= {least}")


def _search(args: argparse.Namespace) -> int:
    from .search import parse_grid, parse_space, search, search_tpe
    _check_sampler_flags(args)
    grid = parse_grid(args.grid) if args.sampler == "grid" else None
    space = parse_space(args.space) if args.sampler == "tpe" else None
    recipe, _ = _load(args.target, args.overrides, None, writes=False)  # (into --out, not output.dir)
    out = os.path.expanduser(args.out or os.path.join("runs", "search", recipe.cfg["name"]))
    from .pipeline.rundir import refuse_inside_a_run, refuse_other_records
    refuse_inside_a_run(out, "the trials, best.yaml and search.json")
    refuse_other_records(out, "search")
    from .engine.trainer import Interrupted
    startup = 3 if args.pruner_startup_trials is None else args.pruner_startup_trials
    try:
        with _writing(out):
            result = search(recipe, grid, args.overrides, out, _echo) if args.sampler == "grid" else \
                search_tpe(recipe, space, args.overrides, out, args.trials or 12, args.pruner or "median", startup,
                           args.pruner_warmup_epochs, _echo)
    except Interrupted as e:
        if is_main_process():  # (under torchrun every process stops here: one says it)
            print(f"{e}; the search stopped: the same command again reuses the stages it finished (the teacher, "
                  f"the baseline) in {os.path.join(out, 'trials')} and continues this one", file=sys.stderr)
        return e.exit_code
    print(result["table"])
    if result.get("summary"):
        print(result["summary"])
    print(f"best: {', '.join(f'{k}={v}' for k, v in result['best'].items())} -> {os.path.join(out, 'best.yaml')}")
    return 0


def _run_folder(target: str, overrides: List[str]):
    """The recipe of a finished run, with overrides (compress and bench settings may change freely)."""
    from .pipeline.artifacts import require_run_folder
    require_run_folder(target)
    return _load(target, overrides, None)


def _compress(args: argparse.Namespace) -> int:
    from .engine.trainer import Interrupted
    from .pipeline.artifacts import require_saved
    from .pipeline.plan import execute
    from .pipeline.rundir import RunDir, refuse_training_keys, require_current
    recipe, folder = _run_folder(args.target, args.overrides)
    refuse_training_keys(folder, recipe.cfg, "compress")  # (the folder's models are what it compresses)
    for name in ("teacher", recipe.cfg["compress"]["source"]):
        require_current(folder, name, require_saved(folder, name), "compress")
    try:
        records = execute(RunDir(recipe, folder, _echo, resume=args.resume, drop_checkpoints=args.overwrite),
                          ["compress"], check=False)["compress"]
    except Interrupted as e:
        if is_main_process():  # (compress has no --nproc: under torchrun, the same torchrun command continues)
            again = f"distill compress {shlex.quote(folder)} --resume"
            print(f"{e}; continue with: {'the same torchrun command, with ' if under_torchrun() else ''}{again}",
                  file=sys.stderr)
        return e.exit_code
    width = max([5] + [len(r["name"]) for r in records])
    print(f"{'model':{width}s}  {'params':>12s}  {'size KB':>10s}  val accuracy")
    for r in records:
        print(f"{r['name']:{width}s}  {r['params']:>12,}  {r['size_bytes'] / 1024:>10,.1f}  {r['val_accuracy']:.4f}")
    print(f"models: {os.path.join(folder, 'compress')}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .compress.bench import bench
    from .pipeline.rundir import refuse_training_keys
    recipe, folder = _run_folder(args.target, args.overrides)
    refuse_training_keys(folder, recipe.cfg)  # (a training key given here would be ignored: the models are made)
    result = bench(recipe, folder, _echo)
    print(result["table"])
    print(f"results: {os.path.join(folder, 'bench')} (bench.json, bench.md, pareto.png)")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from .doctor import doctor, format_report
    print(format_report(doctor(args.target)))
    return 0


def _refuse_run_file(out: Optional[str], folder: str, own: str) -> None:
    """An --out may not replace what a run made (its models, records, recipe, the folder itself), this run's
    or another's (the nearest folder above `out` that holds a run: recipe.yaml with stages.json or log.jsonl,
    not a project's own recipe.yaml; or several: a --seeds or search folder's records); a file of the command's
    own in this run (under `own`, its default place, or an earlier --out of another name) may be written again."""
    from .pipeline.rundir import holds_runs, made_by_a_run, made_by_runs
    if out is None:
        return  # (an --out not made yet is checked too: a new file in a run's checkpoints/ would be among them)
    real = os.path.realpath(out)
    run = os.path.realpath(folder)
    if os.path.relpath(real, run).split(os.sep)[0] == os.pardir:  # outside this run: inside another?
        run = next((d for d in _folders_up(real) if holds_runs(d) or os.path.isfile(os.path.join(d, "recipe.yaml"))
                    and any(os.path.isfile(os.path.join(d, f)) for f in ("stages.json", "log.jsonl"))), None)
        own = None
    if run is None:
        return
    where = os.path.relpath(real, run)
    top = where.split(os.sep)[0]
    made = made_by_runs if holds_runs(run) else made_by_a_run  # (a --seeds or search folder's summary, best.yaml)
    if top != own and (where == os.curdir or made(top)):
        what = "the folder of several runs" if made is made_by_runs else "the run folder"
        raise UserError(f"--out {out}: part of {what} {run}, which this would overwrite; give a new path, "
                        f"or one outside any run folder")


def _folders_up(path: str) -> Iterator[str]:
    """`path` if a folder, then each folder above it, to the root."""
    d = path if os.path.isdir(path) else os.path.dirname(path)
    while True:
        yield d
        if os.path.dirname(d) == d:
            return
        d = os.path.dirname(d)


def _report(args: argparse.Namespace) -> int:
    from .report import report
    from .io import out_path
    out = args.out and out_path(args.out)
    _refuse_run_file(out, args.target, "report.html")
    print(f"report: {report(args.target, out)}")
    return 0


def _export(args: argparse.Namespace) -> int:
    """`distill export RUN_DIR --format F`: write, verify, and record the export in export/exports.json."""
    from .compress.export_run import export_run_model
    from .io import out_path
    recipe, folder = _run_folder(args.target, [])
    out = args.out and out_path(args.out)
    _refuse_run_file(out, folder, "export")
    print(export_run_model(recipe, folder, args.model, args.format, out, args.preprocessing))
    return 0


def _load(target: Optional[str], overrides: List[str], out: Optional[str], writes: bool = True):
    """The recipe (a file, a bundled name, a run folder's) and the folder a command given `out` writes into;
    `writes`: the command writes its resolved recipe.yaml there (a run, a stage command)."""
    from .recipe import Recipe, bundled_recipe_path
    out = os.path.expanduser(out) if out else out  # (`--out=~/x` reaches here as it is)
    if target and os.path.isdir(target):
        return Recipe.load_run_folder(target, overrides), out or target
    # (no recipe given: the bundled default, not a file or run folder that happens to be named like it here)
    recipe = Recipe.load(target or bundled_recipe_path(DEFAULT_RECIPE), overrides)
    if target and os.path.isfile(target) and (out or writes):  # (said before torch loads; RunDir checks it too)
        from .pipeline.rundir import refuse_recipe_overwrite, run_folder
        refuse_recipe_overwrite(recipe, run_folder(recipe, out), out_given=bool(out))
    return recipe, out


def _echo(msg: str) -> None:
    if is_main_process():  # (under torchrun every process runs the command: one of them speaks)
        print(msg, file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = parser.parse_known_args(argv)
    if extra:  # (said by the command's own parser, whose --help lists what it takes)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        after = args.command and argv.index(args.command) < argv.index(extra[0])  # (not `distill --x run`)
        (sub.choices[args.command] if after else parser).error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = argv
    quiet = None if is_main_process() else open(os.devnull, "w")  # (torchrun: rank 0 alone prints results)
    # SIGTERM (what a job scheduler sends) outside training stops the command as Ctrl-C does, in one line that
    # says how to go on (training's own handler, while it runs, checkpoints first). Not under torchrun, whose
    # agent stops the processes with it and reads their exit codes.
    handle = not under_torchrun() and threading.current_thread() is threading.main_thread()
    SIGNALLED.clear()
    handlers = {sig: signal.signal(sig, stop_on_signal) for sig in (signal.SIGINT, signal.SIGTERM)} if handle else {}
    # (torchrun's agent sets TORCHELASTIC_RUN_ID in its processes; WORLD_SIZE alone may be a user's)
    watch = _stop_when_orphaned() if under_torchrun() and os.environ.get("TORCHELASTIC_RUN_ID") else None
    try:
        with contextlib.redirect_stdout(quiet) if quiet else contextlib.nullcontext():
            if isinstance(getattr(args, "out", None), str) and not args.out.strip():  # (else the default folder)
                raise UserError("--out: empty; give a path (is a shell variable unset?)")
            for given in (getattr(args, "target", None), getattr(args, "resume", None)):
                if isinstance(given, str) and not given.strip():  # (else the default recipe, trained in full)
                    folder = args.command in ("compress", "bench", "export", "report", "doctor")
                    raise UserError(f"distill {args.command}: the {'run folder' if folder else 'recipe or run folder'} "
                                    f"given is empty; give one{'' if folder else ', or none'} (is a shell variable "
                                    f"unset?)")
            code = _dispatch(parser, args)
            if sys.stdout is not None:  # (None: stdout closed, `>&-`)
                sys.stdout.flush()  # (here, where a reader gone is caught, not at exit)
            return code
    except UserError as e:
        if args.debug:
            raise
        if not report_error(str(e)):  # (under --nproc the launcher says it, once for every process)
            print(f"error: {_who()}{e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # (`distill doctor RUN | head`: the reader left; the rest of the output is not wanted)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (else Python's flush at exit says it)
        return 128 + getattr(signal, "SIGPIPE", 13)
    except KeyboardInterrupt as e:
        again = getattr(args, "again", None)
        signum = signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT
        if is_main_process() and not os.environ.get(ERRORS):  # (one line: rank 0's, or --nproc's launcher's)
            print(f"interrupted ({signum.name}){f'; continue with: {again}' if again else ''}", file=sys.stderr)
        return 128 + signum
    finally:
        for sig, handler in handlers.items():  # (None: a handler set outside Python; the default is the nearest)
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        SIGNALLED.clear()
        if quiet:
            quiet.close()
        if watch is not None:
            watch.set()
        _leave_process_group()


def _stop_when_orphaned() -> threading.Event:
    """torchrun starts its processes in sessions of their own: a launcher killed with SIGKILL left them training
    on, the folder's lock released, and a second command could write beside them. Each process stops as on
    SIGTERM (in training: a checkpoint, then out) once its parent is gone, until the event returned is set."""
    parent, done = os.getppid(), threading.Event()

    def watch() -> None:
        while not done.wait(0.5):
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGTERM)
                return
    threading.Thread(target=watch, name="distill-parent-watch", daemon=True).start()
    return done


def _resume_hint(args: argparse.Namespace, folder: str):
    """(processes, the command that continues this run): under torchrun on one machine `--nproc N`; on
    several machines, each machine's torchrun command again with --resume."""
    env = os.environ
    world, local = int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", 1)))
    nproc = args.nproc or world
    if world > local:
        return nproc, (f"the same torchrun command on every machine, with distill {args.command} "
                       f"{shlex.quote(folder)} --resume")
    if getattr(args, "seeds", None):  # (OUT holds a folder per seed, not a run: the command as given, resumed)
        sets = [a for o in args.overrides for a in ("--set", o)]
        return nproc, shlex.join(["distill", args.command, *([args.target] if args.target else []), *sets,
                                  *(["--no-baseline"] if args.no_baseline else []),
                                  *(["--overwrite"] if args.overwrite else []),
                                  *(["--tensorboard"] if args.tensorboard else []), "--seeds", str(args.seeds),
                                  "--out", folder, *(["--nproc", str(nproc)] if nproc > 1 else []), "--resume"])
    return nproc, f"distill {args.command} {shlex.quote(folder)}{f' --nproc {nproc}' if nproc > 1 else ''} --resume"


def _who() -> str:
    """`process R: ` under torchrun (each process reports its own errors), else nothing."""
    return f"process {os.environ['RANK']}: " if under_torchrun() else ""


def _leave_process_group() -> None:
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "recipes":
        from .recipe import bundled_recipes, read_yaml, resolve_recipe_path
        for name in bundled_recipes():
            raw = read_yaml(resolve_recipe_path(name)) or {}
            print(f"{name:32s} {raw.get('description', '')}")
        return 0

    if under_torchrun() and args.command in ("bench", "export", "report", "doctor"):
        raise UserError(f"distill {args.command} runs in one process (under torchrun every process would do the "
                        f"same work{', timing against the others' if args.command == 'bench' else ''}); run it "
                        f"without torchrun")
    if args.command == "doctor":  # (it reads the run, writing only its own doctor.json: not locked, so that a
        # run can be diagnosed while it trains)
        return _doctor(args)
    if args.command in ("export", "compress", "bench", "report"):
        with _writing(args.target):
            return {"export": _export, "compress": _compress, "bench": _bench, "report": _report}[args.command](args)
    if args.command == "search":
        return _search(args)
    if isinstance(args.resume, str):
        if args.target:
            raise UserError(f"--resume {args.resume}: give the run folder once, either as RECIPE or after --resume")
        args.target, args.resume = args.resume, True
    recipe, out = _load(args.target, [*args.overrides, *(["baseline=false"] if args.no_baseline else [])], args.out,
                        writes=getattr(args, "seeds", None) is None)  # (--seeds writes a folder per seed)
    from .pipeline.rundir import run_folder, seed_folder  # (after the recipe: its mistakes are told before torch loads)
    if args.nproc is not None and args.nproc < 1:
        raise UserError(f"--nproc: expected a positive number of processes, got {args.nproc}")
    base = run_folder(recipe, out)
    nproc, again = _resume_hint(args, base)
    args.again = again  # (said if the command is interrupted outside training)
    # (with --seeds, each seed's run folder in it is held too: a stage command may name one)
    seeds = [seed_folder(base, s) for s in range(args.seeds)] if getattr(args, "seeds", None) else []
    with contextlib.ExitStack() as held:
        for folder in [base, *seeds]:
            held.enter_context(_writing(folder))
        if nproc > 1 and "LOCAL_RANK" not in os.environ:  # (already one of torchrun's processes: go on)
            from .launch import check_processes, child_argv, launch
            check_processes(recipe.cfg, nproc)
            return launch(child_argv(args.argv), nproc, again)
        return _run_or_stop(args, recipe, out, again)


def _writing(folder: str):
    """Held while a command writes in `folder` (see io.folder_lock); under torchrun the command that launched
    the processes holds it, for them all (when torchrun was started by hand, no process does: the processes
    of one job would refuse each other)."""
    from .io import folder_lock
    return contextlib.nullcontext() if under_torchrun() else folder_lock(folder)


def _run_or_stop(args: argparse.Namespace, recipe, out: Optional[str], again: str) -> int:
    """The command, in this process; an interruption or a lost peer process said in one line with the command
    that continues."""
    from .engine.trainer import Interrupted
    import torch.distributed as dist
    try:
        code = _run_command(args, recipe, out)
        if dist.is_initialized():  # every process finishes together: none leaves the group under the others
            from .engine.runtime import wait_for_all
            wait_for_all()
        return code
    except Interrupted as e:
        if is_main_process():
            print(f"{e}; continue with: {again}", file=sys.stderr)
            said_stop()
        return e.exit_code
    except RuntimeError as error:  # a peer died or hung: this process stops too, its last checkpoint kept
        e = _lost_peer(error, dist)
        if e is None:
            raise
        first = re.sub(r"^\[[^]]*\] ", "", str(e).strip().splitlines()[0]).split(". ")[0] if str(e).strip() \
            else type(e).__name__  # (gloo: "[file:line] Read error [127.0.0.1]:6550: Connection reset by peer. ...")
        print(f"error: {_who()}lost the other processes ({first}); the last checkpoint is kept; "
              f"continue with: {again}", file=sys.stderr)
        return 1


# How gloo and NCCL say that a peer process died or hung (they raise a plain RuntimeError)
LOST_PEER = re.compile(r"gloo|nccl|Connection (reset|closed|refused)|timed out|Timeout|peer", re.I)


def _lost_peer(error: BaseException, dist) -> Optional[BaseException]:
    """The exception, of `error` and those it was raised while handling, that says a peer died or hung: a later
    one (a loader worker's failure as the process stopped) may hide gloo's."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, dist.DistError) or (dist.is_initialized() and LOST_PEER.search(str(error))):
            return error
        error = error.__cause__ or error.__context__
    return None


# What each stage command runs of the plan (the stages it leaves out are read from the run folder).
STAGES = {"train-teacher": ("teacher",), "generate": ("generate",), "soft-labels": ("soft_labels",),
          "train-student": ("assistant", "generate", "soft_labels", "baseline", "student"),
          "evaluate": ("evaluate",)}


def _run_command(args: argparse.Namespace, recipe, out: Optional[str]) -> int:
    from .evaluate import format_table
    from .pipeline import plan
    from .pipeline.artifacts import require_saved
    from .pipeline.rundir import RunDir, run_folder
    flags = {"resume": bool(args.resume), "overwrite": args.overwrite, "tensorboard": args.tensorboard}
    if args.command == "run":
        if args.seeds is not None:
            if args.seeds < 1:
                raise UserError(f"--seeds: expected a positive number of seeds, got {args.seeds}")
            summary = plan.run_seeds(recipe, list(range(args.seeds)), out, _echo, **flags)
            if is_main_process():
                print(f"mean ± std over seeds {summary['seeds']}:")
                print(format_table(summary))
        else:
            metrics = plan.run(recipe, out, _echo, **flags)
            if is_main_process():
                print(format_table(metrics))
                print(f"run folder: {run_folder(recipe, out)}")
        return 0
    needs = [n for n in NEEDS.get(args.command, ()) if n != SCRATCH or recipe.cfg["baseline"]]
    for name in needs:  # checked before the run folder is touched
        require_saved(run_folder(recipe, out), name)
    seq = recipe.cfg["distill"]["sequence_kd"]
    if args.command == "generate" and not (seq["samples"] or seq["windows"]):
        raise UserError("distill.sequence_kd: set samples (prompt/completion data) or windows (text_lm) for the "
                        "teacher to write anything")
    rd = RunDir(recipe, out, _echo, **flags)
    records = plan.execute(rd, STAGES[args.command], check=args.command != "evaluate")
    if not rd.runtime.is_main:
        return 0
    if args.command == "train-teacher":
        print(f"teacher: {require_saved(rd.out, 'teacher')}")
    elif args.command == "generate":
        print(f"teacher samples: {rd.path('teacher_samples.jsonl' if seq['samples'] else 'teacher_samples.safetensors')}")
    elif args.command == "soft-labels":
        if "soft_labels" in records:  # (else the run said there is none to cache)
            print(f"soft labels: {records['soft_labels']}")
    elif args.command == "train-student":
        made = [require_saved(rd.out, n) for n in (STUDENT, SCRATCH) if n in records]
        print(f"students: {', '.join(made)}")
    else:
        print(format_table(records["metrics"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
