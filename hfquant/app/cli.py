"""The ``hfquant`` command line: ``run``, ``sensitivity``, ``eval``, ``inspect``, ``push``, ``export``, ``validate``.

Exit codes: 0 success, 2 bad input (one line on stderr, no traceback, nothing written), 1 failure.
Subcommands live in ``COMMANDS``: a new one is one ``Command`` entry (its arguments and its handler).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub.utils import disable_progress_bars
from transformers.utils import logging as hf_logging
import yaml

from hfquant.app import pipeline, recipe
from hfquant.app.hub import HubAuthError, HubError
from hfquant.app.sensitivity import run_sensitivity
from hfquant.app.recipe import check_repo_id, HUB_DEFAULTS
from hfquant.app.report import kernel_build_note, RECIPE, REPORT, SENSITIVITY_MD, table, task_table
from hfquant.app.saved import checkpoint_lines, load_model, load_tokenizer, open_saved
from hfquant.calibration.distributed import Dist, init_from_env
from hfquant.config import GGUF_TENSOR_TYPES
from hfquant.core.errors import HFQuantError
from hfquant.eval.tasks import check_tasks, task_names
from hfquant.formats import export_checkpoint
from hfquant.formats.export import EXPORT_FORMATS
from hfquant.formats.files import CheckpointError, read_json
from hfquant.formats.gguf import FLOAT_TYPES
from hfquant.integrations.validate import validate_checkpoint
from hfquant.core.schemes import summary

logger = logging.getLogger("hfquant")


class UsageError(Exception):
    """Bad command-line syntax (argparse's complaints)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message + exit
        raise UsageError(f"{message} (see `{self.prog} --help`)")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (so captured output sees it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


@dataclass
class Command:
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]


def _err(message: str) -> None:
    print(f"hfquant: error: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------- run
def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file")
    _set_arg(p)
    p.add_argument("--output", metavar="DIR", help="output folder (overrides output_dir)")
    p.add_argument("--push-to-hub", metavar="REPO", help="push the output folder to this Hub repo (overrides hub.repo_id)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last finished block")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder / discard old progress")
    p.add_argument("--dry-run", action="store_true", help="check the recipe, model config, data and output folder; load and write nothing")


def _set_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a recipe value (YAML), e.g. --set quantization.bits=8; repeatable")


def _run(args) -> int:
    resolved = recipe.load(args.recipe, args.set, args.output)
    dist = _distributed(args.dry_run)
    plan = pipeline.plan(resolved, overwrite=args.overwrite, resume=args.resume, push_repo=args.push_to_hub,
                         recipe_file=args.recipe)
    if args.dry_run:
        print(recipe.dump(resolved), end="")
        print(f"dry run: {args.recipe} is valid and its inputs are readable; nothing was loaded or written")
        return 0
    report = pipeline.execute(plan, quiet=args.quiet or not dist.is_main)
    if not dist.is_main:  # the main process prints, saves and pushes
        return 0
    print()
    print(table(report))
    schemes = report["config"].get("module_schemes")
    if schemes:
        bits = report.get("stored_bits", {}).get("avg_bits")
        print(f"\nper-module schemes: {summary(schemes)}" + (f"; {bits:.4f} stored bits per weight" if bits else ""))
    print(f"\nsaved to {plan.out}")
    repo = plan.push_repo or resolved["hub"]["repo_id"]
    if repo:
        url = pipeline.push(plan.out, repo, resolved["hub"])
        print(f"pushed to {repo}: {url}")
    return 0


def _distributed(dry_run: bool):
    """Under ``accelerate launch --num_processes N`` (``WORLD_SIZE > 1``): join the process group; the
    calibration batches are split across the processes and only the main one writes."""
    if dry_run:
        return Dist()
    dist = init_from_env()
    if not dist.is_main:
        logger.setLevel(logging.WARNING)
    return dist


# ------------------------------------------------------------------------------------------ sensitivity
def _sensitivity_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file (its model, calibration and GPTQ settings; candidates from "
                                  "quantization.candidates, else the default set)")
    _set_arg(p)
    p.add_argument("--output", metavar="DIR", help="output folder (overrides output_dir)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")


def _sensitivity(args) -> int:
    resolved = recipe.load(args.recipe, args.set, args.output)
    resolved["evaluation"] = {**resolved["evaluation"], "before": False, "after": False, "tasks": []}
    plan = pipeline.plan(resolved, overwrite=args.overwrite, recipe_file=args.recipe)
    table = run_sensitivity(plan, quiet=args.quiet)
    print(f"sensitivity of {len(table['modules'])} modules x {len(table['candidates'])} candidates in "
          f"{table['seconds']:.1f} s; table {plan.out / SENSITIVITY_MD}, plot and card in {plan.out}")
    return 0


# ---------------------------------------------------------------------------------------------- eval
def _quiet_transformers(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run ``handler`` with transformers' warnings off unless ``-v``: among them its load report (a table of missing,
    unexpected and mismatched keys), which the checkpoint check before loading (one line) makes redundant."""
    @functools.wraps(handler)
    def run(args) -> int:
        if args.verbose:
            return handler(args)
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            return handler(args)
        finally:
            hf_logging.set_verbosity(level)
    return run


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="output folder of `hfquant run` (or any hfquant checkpoint, or a .gguf file)")
    p.add_argument("--seq-len", type=int,
                   help="window length (default: the saved recipe's evaluation.seq_len, else 512)")
    p.add_argument("--max-tokens", type=int,
                   help="evaluate the first MAX_TOKENS tokens (default: the saved recipe's evaluation.max_tokens, "
                        "else 16384)")
    p.add_argument("--dataset", help="evaluation text: local file or Hub dataset id (default: the saved recipe's "
                                     "evaluation.dataset, else the bundled WikiText-2 test)")
    p.add_argument("--tasks", metavar="A,B", type=task_names, help="lm-eval tasks after the perplexity: bundled "
                   "(alice_next) or lm-eval's (hellaswag: Hub data); none: none (default: the recipe's evaluation.tasks)")
    p.add_argument("--limit", type=int, help="first LIMIT items of each task (default: evaluation.task_limit, all)")
    p.add_argument("--num-fewshot", type=int, help="examples before each item (default: evaluation.num_fewshot)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto", help="evaluate in "
                   "this dtype, e.g. the one a serving engine will run (default: the checkpoint's own)")


@_quiet_transformers
def _eval(args) -> int:
    checkpoint = open_saved(args.dir)
    folder = checkpoint.folder
    ev = pipeline.eval_settings(_saved_recipe(folder / RECIPE), seq_len=args.seq_len, max_tokens=args.max_tokens,
                                dataset=args.dataset, tasks=args.tasks, task_limit=args.limit,
                                num_fewshot=args.num_fewshot)
    check_tasks(ev["tasks"], "--tasks" if args.tasks else "evaluation.tasks")  # before the model loads
    tokenizer = load_tokenizer(checkpoint)
    ids, name = pipeline.evaluation_ids(ev, tokenizer)
    built = pipeline.build_kernels("cpu")  # the model loads on the CPU: its kernels first, outside the evaluation
    model = load_model(checkpoint, args.dtype)
    limit = pipeline.max_positions(model.config)
    if limit is not None and ev["seq_len"] > limit:
        raise pipeline.RecipeError(f"--seq-len: {ev['seq_len']} exceeds the model's maximum of {limit} positions")
    ppl = pipeline._perplexity(model, ids, ev, args.quiet)
    n = pipeline.eval_windows(ev, ids)
    print(f"perplexity {ppl:.3f} on {name} ({n} windows x {ev['seq_len']} tokens) for {checkpoint.path}"
          + ("" if args.dtype == "auto" else f" in {args.dtype}"))
    if note := kernel_build_note(built, "the evaluation"):
        print(note)
    if tasks := pipeline.run_tasks(model, tokenizer, ev):
        print("\n" + task_table({**tasks, "before": None, "after": tasks["tasks"]}, ("", "score")))
    return 0


def _saved_recipe(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = recipe.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        raise CheckpointError(f"{str(path)!r}: unreadable or not valid YAML") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{str(path)!r}: not a recipe mapping")
    return data


# ------------------------------------------------------------------------------------------- inspect
def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="output folder of `hfquant run` (or any hfquant checkpoint, or a .gguf file)")


@_quiet_transformers
def _inspect(args) -> int:
    checkpoint = open_saved(args.dir)
    folder = checkpoint.folder
    print("\n".join(checkpoint_lines(checkpoint)))
    report = read_json(folder / REPORT)
    if report is None:
        print("no report.json (not written by `hfquant run`): no per-layer table")
        return 0
    print()
    print(table(report))
    print()
    print("| layer | method | error | damping | retries | note |")
    print("|---|---|---|---|---|---|")
    for m in report.get("layers", []):
        loss = m.get("loss")
        damp = m.get("damp")
        print(f"| {m['name']} | {m.get('method', 'w8a8' if 'smoothed' in m else '?')} | "
              f"{'—' if loss is None else f'{loss:.4g}'} | {'—' if damp is None else f'{damp:.3g}'} | "
              f"{m.get('damp_retries', 0)} | {m.get('note', '')} |")
    return 0


# ---------------------------------------------------------------------------------------------- push
def _push_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="output folder of `hfquant run` (its checkpoint safetensors or model.gguf)")
    p.add_argument("repo", help="Hub repo id, owner/name")
    vis = p.add_mutually_exclusive_group()
    vis.add_argument("--private", dest="private", action="store_true", default=None, help="create the repo private (default)")
    vis.add_argument("--public", dest="private", action="store_false", help="create the repo public")
    p.add_argument("--revision", help="branch to push to (created when missing)")
    p.add_argument("--commit-message")


@_quiet_transformers
def _push(args) -> int:
    folder = open_saved(args.dir, folder_only=True).folder
    check_repo_id(args.repo, "repo")
    hub = dict(HUB_DEFAULTS)
    saved = _saved_recipe(folder / RECIPE)
    if saved and isinstance(saved.get("hub"), dict):
        hub.update({k: v for k, v in saved["hub"].items() if k in HUB_DEFAULTS})
    for key in ("private", "revision", "commit_message"):
        if getattr(args, key) is not None:
            hub[key] = getattr(args, key)
    url = pipeline.push(folder, args.repo, hub)
    print(f"pushed {folder} to {args.repo}: {url}")
    return 0


# ------------------------------------------------------------------------------------------ export
def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="an hfquant checkpoint folder (for gguf also a float model folder)")
    p.add_argument("--format", required=True, choices=list(EXPORT_FORMATS), help="layout to write")
    p.add_argument("out", help="new (or empty) output folder; never overwritten")
    p.add_argument("--checkpoint-format", default="gptq", choices=["gptq", "gptq_v2"],
                   help="GPTQ zero-point convention (gptq = v1, stores zero-1)")
    p.add_argument("--float-type", default="F16", choices=list(FLOAT_TYPES),
                   help="gguf: type of float weights (a float model's Linears, or Linears left float)")
    p.add_argument("--head-type", default=None, choices=list(GGUF_TENSOR_TYPES),
                   help="gguf: output head type (default: the checkpoint's gguf_head_type, else llama.cpp's choice)")
    p.add_argument("--embedding-type", default=None, choices=list(GGUF_TENSOR_TYPES),
                   help="gguf: untied token embeddings' type (default: llama.cpp's choice)")
    p.add_argument("--accuracy-level", type=int, default=1, choices=[1, 2, 3, 4],
                   help="onnx: MatMulNBits' activation arithmetic (1 float32, the hfquant model's numbers; "
                        "4 int8, faster)")


@_quiet_transformers
def _export(args) -> int:
    validate_checkpoint(args.dir)
    gguf = dict(float_type=args.float_type, head_type=args.head_type, embedding_type=args.embedding_type)
    try:
        with warnings.catch_warnings(record=True) as caught:  # e.g. what vLLM refuses: one line each, below
            path = export_checkpoint(args.dir, args.format, args.out, checkpoint_format=args.checkpoint_format,
                                     accuracy_level=args.accuracy_level, **(gguf if args.format == "gguf" else {}))
    except OSError as exc:  # unreadable source, unwritable destination: bad input, one line
        _err(f"{args.dir} -> {args.out}: {exc.strerror or exc}")
        return 2
    for w in caught:
        print(f"hfquant: warning: {(str(w.message).splitlines() or [''])[0]}", file=sys.stderr)
    print(f"wrote a {args.format} checkpoint to {path}")
    return 0


# ------------------------------------------------------------------------------------------ validate
def _validate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file")
    _set_arg(p)


def _validate(args) -> int:
    r = recipe.load(args.recipe, args.set)
    q = r["quantization"]
    print(f"ok: {args.recipe}: {q['method']} on {r['model']} -> {r['output_dir']}")
    return 0


COMMANDS: dict[str, Command] = {
    "run": Command("quantize a model as a recipe says, evaluate it and save (and push) the result", _run_args, _run),
    "sensitivity": Command("measure per-module sensitivity to each candidate scheme (table, plot, card)",
                           _sensitivity_args, _sensitivity),
    "eval": Command("perplexity (and lm-eval task accuracy) of a saved checkpoint", _eval_args, _eval),
    "inspect": Command("show a checkpoint's config, sizes and per-layer report", _inspect_args, _inspect),
    "push": Command("push an output folder to the Hugging Face Hub", _push_args, _push),
    "export": Command("write a saved hfquant checkpoint in the GPTQ, compressed-tensors or GGUF layout", _export_args,
                      _export),
    "validate": Command("check a recipe without loading anything", _validate_args, _validate),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hfquant", description="Post-training quantization for Hugging Face transformers.")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs and tracebacks on failure")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.arguments(p)
        p.set_defaults(handler=cmd.handler)
    return parser


def _setup_logging(quiet: bool, verbose: bool) -> None:
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``hfquant`` and ``python -m hfquant``; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        _err(str(exc))
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    _setup_logging(args.quiet, args.verbose)
    if args.quiet:
        disable_progress_bars()
        hf_logging.disable_progress_bar()
    try:
        return args.handler(args)
    except HubAuthError as exc:
        _err(str(exc))
        return 2
    except HubError as exc:
        _err(str(exc))
        return 1
    except HFQuantError as exc:
        _err(str(exc))
        return 2
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except BrokenPipeError:  # e.g. `hfquant inspect DIR | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:  # noqa: BLE001 - a failure, not bad input: one line, traceback with -v
        if args.verbose:
            traceback.print_exc()
        first = (str(exc).splitlines() or [""])[0][:600]
        print(f"hfquant: failed: {type(exc).__name__}: {first} (run with -v for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
