"""Command line: `selfee-fast {run,plan,generate,judge,train,demo,kernel-demo,bench}` (or `python -m selfee_fast`).

`demo` runs SPA end to end on a task with a known gold reward (selfee_fast/demo/run.py).
`kernel-demo` shows the fused head on this machine: one DPO step's LM-head work (policy and
reference log-probs, the SPA loss and its gradient) computed twice — by plain PyTorch with
materialised logits and by `linear_logprobs` + `spa_loss` — each in a fresh process so its
peak memory can be measured, then compared.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import re
import sys
import time
from pathlib import Path

from . import rss


def _make_batch(pairs: int, seq_len: int, hidden_size: int, vocab: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    rows = 2 * pairs
    hidden = torch.randn(rows, seq_len, hidden_size, generator=g)
    ref_hidden = hidden + 0.1 * torch.randn(rows, seq_len, hidden_size, generator=g)
    weight = torch.randn(vocab, hidden_size, generator=g) / hidden_size**0.5
    targets = torch.randint(0, vocab, (rows, seq_len), generator=g)
    targets[:, : seq_len // 4] = -100  # the prompt: masked
    return hidden.requires_grad_(), ref_hidden, weight, targets


def _demo_worker(impl: str, shape: tuple[int, int, int, int], seed: int, results) -> None:
    import torch
    import torch.nn.functional as F

    import selfee_fast as sf

    torch.set_num_threads(max(1, torch.get_num_threads()))
    rss.map_big_blocks_alone()
    hidden, ref_hidden, weight, targets = _make_batch(*shape, seed=seed)
    mask = targets != -100
    baseline = rss.reset_peak()  # building the batch peaked higher than what it left resident
    start = time.perf_counter()
    if impl == "naive":
        logits = hidden @ weight.T
        policy = torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * mask
        with torch.no_grad():
            ref_logits = ref_hidden @ weight.T
            reference = torch.log_softmax(ref_logits, -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * mask
        sums, ref_sums = policy.sum(-1), reference.sum(-1)
        pairs = shape[0]
        z = (sums[:pairs] - sums[pairs:]) - (ref_sums[:pairs] - ref_sums[pairs:])
        loss = -F.logsigmoid(0.1 * z).mean()
        metrics = {}
    else:
        out = sf.linear_logprobs(hidden, weight, targets, ref_hidden=ref_hidden, extrapolate=0.5)
        result = sf.spa_loss(out.policy, out.reference, mask=mask, extrapolated_logps=out.extrapolated, beta=0.1)
        loss, metrics = result.loss, result.metrics()
    loss.backward()
    elapsed = time.perf_counter() - start
    results.put(
        {
            "impl": impl,
            "seconds": elapsed,
            "peak_extra_bytes": rss.peak() - baseline,
            "loss": float(loss.detach()),
            "grad": hidden.grad.numpy().copy(),  # numpy pickles by value; tensors would share file descriptors
            "metrics": metrics,
            "device": hidden.device.type,
        }
    )


def result_or_none(worker: mp.process.BaseProcess, results, poll_seconds: float = 0.5) -> dict | None:
    """The worker's result, or None once it has died without one (its exitcode then says why).

    A bare `results.get()` would wait forever for a worker that crashed or was killed for memory.
    """
    while True:
        try:
            return results.get(timeout=poll_seconds)
        except queue.Empty:
            if not worker.is_alive():
                break
    try:  # it may have put its result just before it exited
        return results.get(timeout=poll_seconds)
    except queue.Empty:
        return None


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"exit code {exitcode}: killed by signal {-exitcode}, e.g. out of memory"
    return f"exit code {exitcode}"


def kernel_demo(args: argparse.Namespace) -> int:
    shape = (args.pairs, args.seq_len, args.hidden_size, args.vocab)
    tokens = 2 * args.pairs * args.seq_len
    print(
        f"selfee-fast kernel-demo: {args.pairs} preference pairs x {args.seq_len} tokens, "
        f"H={args.hidden_size}, V={args.vocab}"
    )
    print(f"(plain PyTorch would hold {tokens * args.vocab * 4 / 2**20:.0f} MiB per fp32 logits tensor)\n")
    ctx = mp.get_context("spawn")
    runs = {}
    for impl in ("naive", "fused"):
        results = ctx.Queue()
        worker = ctx.Process(target=_demo_worker, args=(impl, shape, args.seed, results))
        worker.start()
        result = result_or_none(worker, results)
        worker.join()
        if result is None or worker.exitcode != 0:
            print(
                f"selfee-fast kernel-demo: the {impl} run died before reporting ({_describe_exit(worker.exitcode)})",
                file=sys.stderr,
            )
            return 1
        runs[impl] = result

    print(f"{'implementation':<34}{'time (s)':>10}{'peak extra RSS (MiB)':>22}{'loss':>12}")
    labels = {"naive": "PyTorch, materialised logits", "fused": "selfee_fast (linear_logprobs+spa)"}
    for impl, run in runs.items():
        mib = run["peak_extra_bytes"] / 2**20
        print(f"{labels[impl]:<34}{run['seconds']:>10.2f}{mib:>22.0f}{run['loss']:>12.6f}")
    grad_diff = float(abs(runs["naive"]["grad"] - runs["fused"]["grad"]).max())
    grad_scale = float(abs(runs["naive"]["grad"]).max())
    print(f"\nmax |grad difference| = {grad_diff:.2e} (largest gradient entry {grad_scale:.2e})")
    print("SPA metrics of the fused step:")
    for name, value in runs["fused"]["metrics"].items():
        print(f"  {name:<24}{value: .6f}")
    agree = abs(runs["naive"]["loss"] - runs["fused"]["loss"]) <= 1e-4 * max(1.0, abs(runs["naive"]["loss"]))
    agree = agree and grad_diff <= 1e-4 * max(grad_scale, 1e-6)
    print(
        "\nresults agree" if agree else "\nRESULTS DISAGREE",
        f"(measured on this machine, device {runs['fused']['device']}; no GPU numbers exist yet, see bench/NOTES.md)",
    )
    return 0 if agree else 1


def default_demo_folder(task_spec: str, quick: bool) -> Path:
    """Where `selfee-fast demo` writes without --out: one folder per task and scale, because a
    folder holding a demo made with other settings is refused (its files would be reused)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", task_spec)  # module:object specs hold a colon
    return Path("selfee_fast_demo") / (f"{name}-quick" if quick else name)


def spa_demo(args: argparse.Namespace) -> int:
    from .demo import DEFAULT, QUICK, run_demo

    out = Path(args.out) if args.out is not None else default_demo_folder(args.task, args.quick)
    result = run_demo(out, task_spec=args.task, scale=QUICK if args.quick else DEFAULT, seed=args.seed)
    print(f"\nSPA on {result['task']} (gold reward hidden from the algorithm; held-out prompts):\n")
    print(result["table"])
    print(f"\n{result['seconds']:.0f} s; results in {out / 'results.json'}")
    if result["plot"]:
        print(f"plot: {result['plot']}")
    return 0


def print_memory_plan(config, processes: int = 1) -> None:
    """The plan's table (one rank's, under torchrun), then a warning where a configured batch is estimated not to
    fit. The batches stay as configured (each is part of its stage's fingerprint); a batch that runs out of memory
    is still finished in halves."""
    from .plan import plan_run

    memory_plan = plan_run(config, processes=processes)
    print(memory_plan.table())
    for line in memory_plan.advice():
        print(f"warning: {line}")


def run(args: argparse.Namespace) -> int:
    from .config import check_values, load_config
    from .distributed import world
    from .files import refuse_if_busy
    from .pipeline import run_pipeline

    config = load_config(args.config, args.overrides)
    if world().is_main:  # under torchrun rank 0 speaks for the run
        refuse_if_busy(config.run_dir)  # a folder in use is refused before anything else is said
        check_values(config)  # the plan reads model.path: the values first
        print_memory_plan(config, world().size)
    summary = run_pipeline(config, force=args.force)
    if world().is_main:
        print(f"done: {len(summary['stages'])} stages in {config.run_dir} (summary.json)")
    return 0


def plan(args: argparse.Namespace) -> int:
    """The memory plan of a config, from the model's config.json alone: nothing loads, nothing is written."""
    import json

    from .config import ConfigError, check_values, load_config
    from .plan import plan_run

    config = load_config(args.config, args.overrides)
    check_values(config)
    processes = args.processes if args.processes is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if processes < 1:
        raise ConfigError(f"--processes {processes}: at least 1")
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun rank 0 prints the plan; the others have the same one
    memory_plan = plan_run(config, processes=processes)
    if args.json:
        print(json.dumps(memory_plan.to_json(), indent=2))
    else:
        print(memory_plan.table())
        for line in memory_plan.advice():
            print(f"advice: {line}")
    return 0


def stage_step(args: argparse.Namespace) -> int:
    """One step of one stage, through the same stage runner as `run`, for running or redoing a step alone."""
    from . import pipeline
    from .config import ConfigError, load_config
    from .distributed import world
    from .files import refuse_if_busy
    from .preflight import preflight
    from .stages import as_begun, parse_stage, read_stage_record, stage_fingerprints
    from .stopping import stop_requests

    config = load_config(args.config, args.overrides)
    main = world().is_main
    say = print if main else pipeline.quiet
    if main:
        refuse_if_busy(config.run_dir)  # at once: the preflight reads every data file
    stage = parse_stage(config, args.stage)
    if args.command != "train" and not stage.iteration:
        raise ConfigError(f"{args.command} works on an iteration stage (iter1, iter2, ...), not {stage.name!r}")
    pipeline.previous_stage_model(config, stage)  # its predecessor finished: said before the slower checks
    runtime = preflight(config)
    command = f"selfee-fast {args.command} --stage {stage.name}"
    with pipeline.main_holds_folder(config.run_dir, command), stop_requests():
        config = as_begun(config, say)
        done = read_stage_record(Path(config.run_dir) / stage.name / "done.json")
        # train would only save the finished model again; generate and judge resume from their files
        if args.command == "train" and done and done["fingerprint"] == stage_fingerprints(config)[stage.name]:
            say(f"{stage.name} is finished (its done.json matches this config): nothing to do; "
                "`selfee-fast run --force` after a change redoes it")  # fmt: skip
            return 0
        remedy = "redo it with `selfee-fast run --force`, or use a new run_dir"
        pipeline.run_stage(config, runtime, stage, until=args.command, remedy=remedy, log=say)
    if args.command == "train":
        say(f"saved {Path(config.run_dir) / stage.name / 'model'} (done.json is written by `selfee-fast run` only)")
    return 0


def bench(args: argparse.Namespace) -> int:
    script = Path(__file__).resolve().parents[1] / "bench" / "bench_kernels.py"
    if not script.exists():
        print("selfee-fast bench: bench/ lives in the source checkout; run it from a clone", file=sys.stderr)
        return 2
    import subprocess

    # The script's usage line then names this command, not bench_kernels.py.
    env = {**os.environ, "SELFEE_FAST_PROG": "selfee-fast bench"}
    return subprocess.call([sys.executable, str(script), *args.bench_args], env=env)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _vocab_size(text: str) -> int:
    value = _int(text)
    if value < 2:  # with one token every log-prob is 0: nothing to compare
        raise argparse.ArgumentTypeError(f"must be at least 2, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfee-fast", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run stage 0 and the SPA iterations into a run folder (resumes if rerun)")
    p.add_argument("config", help="YAML config (see selfee_fast/config.py for every key and its default)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=1e-6")
    p.add_argument("--force", action="store_true", help="redo finished stages whose configuration changed")
    p.set_defaults(func=run)
    p = sub.add_parser("plan", help="estimate each stage's peak GPU memory and the batches that fit (no weights load)")
    p.add_argument("config", help="the run's YAML config; the plan reads model.path's config.json")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. model.max_memory_gb=24")
    p.add_argument(
        "--json", action="store_true", help="the same as JSON: each stage's estimated peak bytes and batches"
    )
    p.add_argument(
        "--processes", type=int, metavar="N",
        help="one process's plan for a torchrun run on N processes (default: WORLD_SIZE if set, else 1)",
    )  # fmt: skip
    p.set_defaults(func=plan)
    for name, what in (
        ("generate", "sample responses for one iteration (resumes a partial file)"),
        ("judge", "generate if needed, then label the responses with the implicit reward"),
        ("train", "train one stage (stage0 on the seed pairs, iterN on its judged pairs)"),
    ):
        p = sub.add_parser(name, help=what, description=what)
        p.add_argument("config", help="the run's YAML config")
        p.add_argument("overrides", nargs="*", help="section.key=value overrides")
        p.add_argument("--stage", required=True, help="stage0, iter1, iter2, ...")
        p.set_defaults(func=stage_step)
    p = sub.add_parser("bench", help="kernel microbenchmarks (bench/bench_kernels.py; its --help lists the options)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=bench)
    p = sub.add_parser("demo", help="SPA on a task with a known gold reward, end to end on this machine")
    p.add_argument(
        "--out",
        help="output folder; rerunning resumes (default: selfee_fast_demo/TASK, or selfee_fast_demo/TASK-quick)",
    )
    p.add_argument(
        "--task", default="maxof",
        help="a bundled task (maxof, upper, ends, next; listops, the hard case) or module:object of your own Task",
    )  # fmt: skip
    p.add_argument("--quick", action="store_true", help="a smaller run (CI-sized, under a minute)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the task data, the model and training")
    p.set_defaults(func=spa_demo)
    p = sub.add_parser("kernel-demo", help="fused LM-head log-probs + SPA loss vs plain PyTorch, on this machine")
    p.add_argument("--pairs", type=_positive_int, default=4, help="preference pairs in the batch (default 4)")
    p.add_argument("--seq-len", type=_positive_int, default=256, help="tokens per response (default 256)")
    p.add_argument("--hidden-size", type=_positive_int, default=512, help="hidden size H (default 512)")
    p.add_argument("--vocab", type=_vocab_size, default=32000, help="vocabulary size V, at least 2 (default 32000)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the hidden states, head and targets")
    p.set_defaults(func=kernel_demo)
    return parser


def quiet_libraries() -> None:
    """Keep the output to what the user needs: the libraries' own progress bars and notices go.

    transformers draws a bar for every weight load and save and warns about its own deprecated
    names, which peft still calls; bitsandbytes warns at import that an optional CPU 4-bit kernel
    package is missing. None of it is actionable for a user of selfee-fast.
    """
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers(\.|$)")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()
    except ImportError:  # transformers is a dependency; this only keeps `--help` fast and safe
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        # Everything after `bench` is the benchmark script's, --help included.
        return bench(argparse.Namespace(bench_args=argv[1:]))
    args, extra = parser.parse_known_args(argv)
    # Overrides may also come after an option (`plan cfg.yaml --json model.x=y`): argparse stops
    # the positional list at the first option and cannot intermix them across subcommands.
    if (
        extra
        and isinstance(getattr(args, "overrides", None), list)
        and all("=" in item and not item.startswith("-") for item in extra)
    ):
        args.overrides += extra
    elif extra:
        parser.parse_args(argv)  # argparse's own message for what it does not know
    if args.command not in ("kernel-demo",):
        quiet_libraries()
    return run_command(args)


# The commands torchrun can start on several processes.
DISTRIBUTED_COMMANDS = ("run", "generate", "judge", "train")
# Commands that load nothing and join no process group: they may run where WORLD_SIZE is set.
WORLD_SIZE_AWARE = ("plan",)


def run_command(args: argparse.Namespace) -> int:
    """Run a subcommand; what goes wrong is one line on stderr and an exit code, never a traceback.

    2: the input (config, data, a folder in use); 1: the run could not go on (a full disk, a
    diverged loss, a checkpoint of other settings); 130: stopped on Ctrl-C or SIGTERM.
    """
    from .config import ConfigError
    from .data import DataError
    from .demo.run import DemoSettingsError
    from .demo.tasks import TaskError
    from .distributed import start_world, stop_world, world
    from .files import RunFolderBusy, WriteFailed
    from .stopping import Interrupted
    from .train import CheckpointMismatch

    # Under torchrun every process runs the command; its messages say which process it is.
    command = getattr(args, "command", None)
    ranks = start_world() if command in DISTRIBUTED_COMMANDS else world()
    name = f"selfee-fast (rank {ranks.rank} of {ranks.size})" if ranks.distributed else "selfee-fast"
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and command not in DISTRIBUTED_COMMANDS + WORLD_SIZE_AWARE:
            raise ConfigError(f"{command} runs on one process; torchrun runs {', '.join(DISTRIBUTED_COMMANDS)}")
        return args.func(args)
    except (ConfigError, DataError, FileNotFoundError, RunFolderBusy, TaskError, DemoSettingsError) as error:
        print(f"{name}: {error}", file=sys.stderr)
        return 2
    except (WriteFailed, FloatingPointError, CheckpointMismatch) as error:
        print(f"{name}: {error}", file=sys.stderr)
        return 1
    except RuntimeError as error:  # torch.OutOfMemoryError is one
        from .batching import is_out_of_memory

        if not is_out_of_memory(error) or not getattr(args, "config", None):
            raise
        print(f"{name}: {out_of_memory_report(args, error)}", file=sys.stderr)
        return 1
    except Interrupted as error:
        print(f"{name}: {error}; rerun the same command to resume", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # the second Ctrl-C: at once, every file still whole
        print(f"{name}: stopped at once; the run folder is consistent: rerun the same command to resume",
              file=sys.stderr)  # fmt: skip
        return 130
    finally:
        stop_world()


def out_of_memory_report(args: argparse.Namespace, error: BaseException) -> str:
    """The memory plan of the command's config and what to change, for an out-of-memory error that got through."""
    from .config import ConfigError, load_config
    from .distributed import world
    from .plan import out_of_memory_message

    try:
        config = load_config(args.config, getattr(args, "overrides", []))
    except ConfigError:  # the config loaded once already; this cannot fail short of the file changing meanwhile
        return f"out of GPU memory: {error}"
    return out_of_memory_message(config, error, world().size)


if __name__ == "__main__":
    sys.exit(main())
