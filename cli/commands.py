"""The commands. Each one: parse, call the library, print (text or ``--json``)."""

from __future__ import annotations

import sys

import click
from mesimp.cli.main import IntList, KType, cli, emit_json


@cli.command(short_help="Train an MLP or LSTM with meProp, optionally meSimp.")
@click.option(
    "--data",
    type=click.Path(),
    default=None,
    help="IDX directory or .npz file. Default: $MESIMP_DATA, ~/.cache/mesimp, "
    "/usr/share/datasets/fashion-mnist.",
)
@click.option(
    "--model",
    type=click.Choice(["mlp", "cnn", "lstm-tagger", "lstm-rows", "parser"]),
    default="mlp",
    show_default=True,
    help="mlp: image MLP; cnn: Conv-BN-ReLU blocks (--hidden: channels per block, default "
    "32,64) and a Linear head; lstm-tagger: UPOS tagger on CoNLL-U (--train/--test); "
    "lstm-rows: LSTM reading each image row by row (28 steps of 28 pixels); parser: "
    "Chen & Manning transition-based dependency parser on CoNLL-U (--train/--test).",
)
@click.option(
    "--train",
    "train_file",
    type=click.Path(),
    default=None,
    help="lstm-tagger, parser: training CoNLL-U file (any UD treebank).",
)
@click.option(
    "--dev",
    "dev_file",
    type=click.Path(),
    default=None,
    help="lstm-tagger, parser: held-out CoNLL-U file for model selection "
    "(default: 10% of --train, a fixed split).",
)
@click.option(
    "--test",
    "test_file",
    type=click.Path(),
    default=None,
    help="lstm-tagger, parser: test CoNLL-U file.",
)
@click.option(
    "--emb-dim",
    type=int,
    default=None,
    help="lstm-tagger: word embedding size [default: 100]; parser: size of each embedding "
    "(words, tags, labels) [default: 50].",
)
@click.option(
    "--activation",
    type=click.Choice(["relu", "cube"]),
    default="relu",
    show_default=True,
    help="parser: hidden activation (cube: Chen & Manning's x^3).",
)
@click.option(
    "--max-len",
    type=int,
    default=250,
    show_default=True,
    help="lstm-tagger: a sentence longer than this many words is an error.",
)
@click.option(
    "--bidirectional",
    is_flag=True,
    help="lstm-tagger: a forward and a backward LSTM per layer (meProp and meSimp per "
    "direction; shrink keeps each direction's own width).",
)
@click.option(
    "--word-features",
    is_flag=True,
    help="lstm-tagger: add suffix-3 and word-shape embeddings (unknown words).",
)
@click.option(
    "--bucket",
    type=int,
    default=0,
    show_default=True,
    help="lstm-tagger: sort each window of N shuffled sentences by length before cutting "
    "batches (less padding); 0 = plain shuffled batches.",
)
@click.option(
    "--hidden",
    type=IntList(),
    default="500",
    show_default=True,
    help="Hidden width, or a width per layer (e.g. 154,60; overrides --layers).",
)
@click.option(
    "--layers",
    type=int,
    default=None,
    help="Number of hidden layers with a single --hidden width [default: 2 for mlp, "
    "1 for the LSTMs].",
)
@click.option("--dropout", type=float, default=0.0, show_default=True)
@click.option(
    "--k",
    "k",
    type=KType(),
    default=0,
    show_default=True,
    help="meProp k: an int (0 = dense backprop) or a fraction of the active width (e.g. 0.04).",
)
@click.option(
    "--selection",
    type=click.Choice(["topk", "unified", "random"]),
    default="unified",
    show_default=True,
    help="unified: one set per minibatch (dense GEMMs on k rows; fastest and, with Adam, "
    "the stable one); topk: per example (the paper's version); random: the random-k baseline.",
)
@click.option(
    "--msbp",
    type=float,
    default=0.0,
    show_default=True,
    help="MSBP memory ratio alpha (0 = off; the paper uses 0.8).",
)
@click.option(
    "--sparse-update/--dense-update",
    default=True,
    show_default=True,
    help="Row-sparse optimizer update of only the selected rows (fast), or a "
    "zero-filled dense gradient stepped by the dense optimizer (exact).",
)
@click.option(
    "--optimizer", type=click.Choice(["adam", "adagrad", "sgd"]), default="adam", show_default=True
)
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Learning rate.")
@click.option("--epochs", type=int, default=5, show_default=True)
@click.option("--batch-size", type=int, default=None, help="[default: 50; 32 for lstm-tagger]")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option(
    "--evals-per-epoch",
    type=int,
    default=1,
    show_default=True,
    help="Dev/test evaluations (and best-on-dev checkpoints) per epoch.",
)
@click.option(
    "--dev-size",
    type=int,
    default=5000,
    show_default=True,
    help="Dev split: the first N training examples (as in the paper).",
)
@click.option(
    "--simplify/--no-simplify",
    default=False,
    show_default=True,
    help="meSimp: mask rarely-updated hidden neurons during training.",
)
@click.option(
    "--prune-rate",
    type=float,
    default=0.01,
    show_default=True,
    help="meSimp --schedule rate (given alone, it selects that schedule): drop a neuron "
    "selected in fewer than this fraction of examples since the last simplification "
    "point.",
)
@click.option(
    "--simplify-per-epoch",
    type=int,
    default=4,
    show_default=True,
    help="meSimp: simplification points per epoch.",
)
@click.option(
    "--cycle-epochs",
    type=int,
    default=None,
    help="meSimp: epochs per cycle; cycles alternate simplifying and plain meProp, "
    "and the optimizer is reset once at each cycle start (0 = always simplify) "
    "[default: 1; 0 with --schedule cubic].",
)
@click.option(
    "--min-width",
    type=int,
    default=1,
    show_default=True,
    help="meSimp: no hidden layer shrinks below this width.",
)
@click.option(
    "--warmup-epochs",
    type=int,
    default=None,
    help="meSimp: no simplification point in the first N epochs (counts from an "
    "untrained network are noise); cycles start after the warm-up "
    "[default: 30% of --epochs, rounded down; 0 with --schedule rate].",
)
@click.option(
    "--schedule",
    type=click.Choice(["rate", "cubic"]),
    default=None,
    help="meSimp: 'cubic' (the default) shrinks every layer gradually to --target of "
    "its width by --target-epoch (Zhu & Gupta's cubic schedule: each point drops the "
    "least-selected units), then fine-tunes for the remaining epochs; 'rate' is the "
    "papers' rule: drop units selected less often than --prune-rate, the size is "
    "whatever results [default: cubic; rate when --prune-rate is given].",
)
@click.option(
    "--target",
    type=float,
    default=None,
    help="meSimp --schedule cubic: the fraction of each layer's units kept at the end "
    "(0.15: 500 -> 75); give --k near the target width (--k 75) [default: 0.15].",
)
@click.option(
    "--target-epoch",
    type=int,
    default=None,
    help="meSimp --schedule cubic: the target width is reached at the end of epoch N-1; "
    "no point after it [default: 80% of --epochs, rounded up].",
)
@click.option(
    "--compact/--no-compact",
    default=True,
    show_default=True,
    help="meSimp: remove masked units from the training model at every simplification "
    "point (weights, optimizer state, counters), so the rest of the run trains at the "
    "active widths; --no-compact keeps them masked until `mesimp shrink`.",
)
@click.option(
    "--distill",
    "teacher",
    type=click.Path(),
    default=None,
    help="Knowledge distillation: also learn this checkpoint's softened outputs (e.g. "
    "the dense model of the same task, for a shrunk model's fine-tune); the loss is "
    "(1 - alpha) * cross-entropy + alpha * T^2 * KL(teacher || model).",
)
@click.option(
    "--distill-alpha",
    type=float,
    default=0.5,
    show_default=True,
    help="With --distill: the weight of the teacher's term, in (0, 1].",
)
@click.option(
    "--distill-temperature",
    type=float,
    default=4.0,
    show_default=True,
    help="With --distill: the softmax temperature T of both outputs.",
)
@click.option(
    "--init",
    type=click.Path(),
    default=None,
    help="Start from this checkpoint's weights and widths (e.g. a shrunk model).",
)
@click.option(
    "--reference",
    is_flag=True,
    help="The C# reference code's semantics (lancopku/meProp, nnmnist), MLP only: summed "
    "loss, every gradient element clipped to 5, dense bias gradient, its dense Adam, its "
    "init, epochs of 8 chunks with a dev check after each. Unless given: --batch-size 100 "
    "--epochs 20 --evals-per-epoch 8 (its protocol). With --simplify, the C# meSimp: "
    "per-example top-k through its heap, k fixed (default --k 160), a prune after every "
    "dev check of a simplifying cycle (--prune-rate 0.1, --cycle-epochs 5), Adam's "
    "moments zeroed at every check of a cycle's last epoch. See the docs, 'Reference mode'.",
)
@click.option("--threads", type=int, default=None, help="torch CPU threads (per process).")
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where to train: auto is CUDA when available (under torchrun, one GPU per local rank).",
)
@click.option(
    "--nproc",
    type=int,
    default=None,
    help="Train on N processes of this machine: runs this command under `torchrun "
    "--standalone --nproc_per_node N` (data parallel; the global batch is N x --batch-size).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(),
    default=None,
    help="Checkpoint path (best on dev); the metrics log goes next to it "
    "[default: models/<model>.pt].",
)
@click.option(
    "--resume",
    type=click.Path(),
    default=None,
    help="Continue an interrupted run from RUN.last.pt (or RUN.pt next to it), bit-identical "
    "to an uninterrupted run. The checkpoint's config is used: other options given must "
    "agree with it (--threads, --save-every, --keep-last may change).",
)
@click.option(
    "--save-every",
    type=int,
    default=1000,
    show_default=True,
    help="Write the resume checkpoint RUN.last.pt every N steps (and at every evaluation "
    "and on SIGINT/SIGTERM); 0 = only then.",
)
@click.option(
    "--keep-last/--no-keep-last",
    default=False,
    show_default=True,
    help="Keep RUN.last.pt (final weights and optimizer state) when the run finishes.",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Live progress bars on stderr. Default: only when stderr is a terminal; a log "
    "file gets the plain line per epoch alone.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON.")
def train(
    model,
    train_file,
    dev_file,
    test_file,
    emb_dim,
    activation,
    max_len,
    bidirectional,
    word_features,
    bucket,
    hidden,
    layers,
    dropout,
    k,
    selection,
    msbp,
    sparse_update,
    optimizer,
    lr,
    epochs,
    batch_size,
    seed,
    evals_per_epoch,
    dev_size,
    simplify,
    prune_rate,
    simplify_per_epoch,
    cycle_epochs,
    min_width,
    warmup_epochs,
    schedule,
    target,
    target_epoch,
    compact,
    teacher,
    distill_alpha,
    distill_temperature,
    init,
    reference,
    threads,
    device,
    nproc,
    data,
    output,
    resume,
    save_every,
    keep_last,
    progress,
    as_json,
):
    """Train an MLP, a CNN or an LSTM with meProp (and optionally meSimp).

    One loop for every model family: every option below applies to each, except
    where a family cannot use it (refused with the reason).

    \b
    Examples:
      mesimp train                       # dense baseline, 784-500-500-10, 5 epochs
      mesimp train --k 20 -o models/k20.pt
      mesimp train --k 20 --selection unified --msbp 0.8
      mesimp train --k 75 --simplify --epochs 10   # meSimp: 500 -> 75 per layer
      mesimp train --k 60 --simplify --prune-rate 0.01 --epochs 6   # the papers' rule
      mesimp train --resume models/mlp.last.pt   # after Ctrl-C, SIGTERM or a crash
      mesimp train --nproc 2 --k 60 --simplify   # 2 processes (torchrun), batch 2 x 50

    \b
    LSTM models (single-layer LSTMs, stacked with --hidden 500,500; then
    `mesimp shrink OUT.pt` removes the masked units):
      mesimp train --model lstm-tagger --train en_ewt-ud-dev.conllu \\
          --test en_ewt-ud-test.conllu --k 20 --simplify --prune-rate 0.05 \\
          --epochs 10 --lr 3e-3
      mesimp train --model lstm-rows --hidden 128 --k 10 --epochs 3
    """
    from mesimp.errors import BadInputError
    from mesimp.simplify.rule import SimplifyConfig
    from mesimp.training.config import TrainConfig
    from mesimp.training.distributed import is_main_process, relaunch
    from mesimp.training.loop import train as run_train
    from mesimp.training.resume import resume_config

    ctx = click.get_current_context()
    _check_model_options(ctx, model)
    if nproc is not None:
        relaunch(nproc, _without_nproc(sys.argv[1:]))
    if output is None:
        output = f"models/{model}.pt"
    if (
        model == "cnn"
        and ctx.get_parameter_source("hidden") != click.core.ParameterSource.COMMANDLINE
    ):
        hidden = [32, 64]
    if reference:  # the reference's protocol, where the command line does not say
        given = {n for n in ctx.params if ctx.get_parameter_source(n) == _COMMANDLINE}
        batch_size = batch_size or 100
        epochs = epochs if "epochs" in given else 20
        evals_per_epoch = evals_per_epoch if "evals_per_epoch" in given else 8
        if simplify:  # the C# meSimp's settings (default.json), where not given
            k = k if "k" in given else 160
            selection = selection if "selection" in given else "topk"
            prune_rate = prune_rate if "prune_rate" in given else 0.1
            cycle_epochs = cycle_epochs if "cycle_epochs" in given else 5
            if "simplify_per_epoch" not in given:
                simplify_per_epoch = evals_per_epoch  # a prune after every dev check
    if batch_size is None:
        batch_size = {"lstm-tagger": 32, "parser": 256}.get(model, 50)
    if emb_dim is None:
        emb_dim = 50 if model == "parser" else 100
    if layers is None:
        layers = 2 if model in ("mlp", "cnn") else 1

    if resume is not None:
        # The checkpoint's config wins; options typed on the command line must agree.
        given = {
            name: value
            for name, value in ctx.params.items()
            if name not in ("resume", "progress", "as_json", "model", "nproc")
            and ctx.get_parameter_source(name)
            in (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
        }
        config = resume_config(resume, given)
        result = run_train(config, progress=progress, resume=resume)
        if is_main_process():
            _train_report(result, as_json)
        return
    simp = None
    if simplify:
        options = dict(
            points_per_epoch=simplify_per_epoch,
            cycle_epochs=cycle_epochs,
            min_width=min_width,
            target_epoch=target_epoch,
        )
        given = {n for n in ctx.params if ctx.get_parameter_source(n) == _COMMANDLINE}
        if schedule is None:
            schedule = "rate" if reference or "prune_rate" in given else "cubic"
        if schedule == "rate":  # the papers' rule
            simp = SimplifyConfig(
                prune_rate=prune_rate,
                warmup_epochs=warmup_epochs or 0,
                target=target,
                **options,
            )
        elif "prune_rate" in given:
            raise BadInputError(
                "--prune-rate is the rate schedule's threshold: drop it, or add --schedule rate"
            )
        else:  # the default: warm-up, cubic schedule to --target (SimplifyConfig.recipe)
            if warmup_epochs is not None:
                options["warmup_epochs"] = warmup_epochs
            simp = SimplifyConfig.recipe(
                epochs,
                target=0.15 if target is None else target,
                **{k: v for k, v in options.items() if v is not None},
            )
    config = TrainConfig(
        model=model,
        data=data,
        train_file=train_file,
        dev_file=dev_file,
        test_file=test_file,
        max_len=max_len,
        emb_dim=emb_dim,
        activation=activation,
        bidirectional=bidirectional,
        word_features=word_features,
        bucket=bucket,
        hidden=hidden if len(hidden) > 1 else hidden[0],
        layers=layers,
        dropout=dropout,
        k=k,
        selection=selection,
        msbp=msbp,
        sparse_update=sparse_update,
        optimizer=optimizer,
        lr=lr,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        evals_per_epoch=evals_per_epoch,
        dev_size=dev_size,
        output=output,
        init=init,
        simplify=simp,
        compact=compact,
        teacher=teacher,
        distill_alpha=distill_alpha,
        distill_temperature=distill_temperature,
        threads=threads,
        device=device,
        reference=reference,
        save_every=save_every,
        keep_last=keep_last,
    )
    result = run_train(config, progress=progress)
    if is_main_process():  # under torchrun, rank 0 prints (and writes) alone
        _train_report(result, as_json)


_COMMANDLINE = click.core.ParameterSource.COMMANDLINE


def _without_nproc(args: list[str]) -> list[str]:
    """The command line minus ``--nproc N`` (the processes torchrun starts must not
    start torchrun again)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


# Options that only some families read: giving one to another is an error, not a no-op.
_TAGGER_ONLY = ("train_file", "dev_file", "test_file", "emb_dim", "max_len")
_TAGGER_ONLY += ("bidirectional", "word_features", "bucket")  # the parser refuses these itself
_PARSER_ONLY = ("activation",)
_IMAGE_DATA = ("data", "dev_size")


def _check_model_options(ctx: click.Context, model: str) -> None:
    given = {
        name
        for name in ctx.params
        if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
    }
    if model in ("lstm-tagger", "parser"):
        bad = [n for n in _IMAGE_DATA if n in given]
    else:
        bad = [n for n in _TAGGER_ONLY if n in given]
    if model != "parser":
        bad += [n for n in _PARSER_ONLY if n in given]
    if model == "cnn" and "dropout" in given:
        bad.append("dropout")
    if bad:
        names = ", ".join("--" + n.removesuffix("_file").replace("_", "-") for n in bad)
        raise click.UsageError(f"{names} do(es) not apply to --model {model}")
    if model not in ("mlp", "parser") and "sparse_update" in given and ctx.params["sparse_update"]:
        raise click.UsageError(
            f"--sparse-update does not apply to --model {model}: its Conv2d and LSTM meProp "
            "layers make dense gradients (zero rows where unselected)"
        )


def _train_report(result, as_json):
    """The one summary of every model family (docs/file-formats.md: ``train --json``)."""
    if as_json:
        # Python callers also get the modules and records; the JSON document is the summary
        emit_json({k: v for k, v in result.items() if k not in PYTHON_ONLY})
        return
    b = result["best"]
    click.echo(
        f"test accuracy {b['test_accuracy']:.4f} (dev {b['dev_accuracy']:.4f}, "
        f"epoch {b['epoch']:.2f}); widths {result['active_widths']} of "
        f"{result['hidden_sizes']}; params {result['params']:,}; "
        f"train time {result['train_time_s']:.1f}s"
    )
    if "test_uas" in b:  # a parser: attachment scores by parsing, every token counted
        click.echo(
            f"test UAS {b['test_uas']:.4f} LAS {b['test_las']:.4f} "
            f"(dev UAS {b['dev_uas']:.4f} LAS {b['dev_las']:.4f})"
        )
    if result["checkpoint"] is not None:
        click.echo(f"checkpoint: {result['checkpoint']}  metrics: {result['metrics_log']}")
    if result["model"] != "mlp" and result["config"]["k"]:
        click.echo(f"next: mesimp shrink {result['checkpoint']}   # removes the masked units")


PYTHON_ONLY = ("module", "shrunk", "records", "arch")


@cli.command(short_help="Show a checkpoint's or ONNX file's size, widths and accuracy.")
@click.argument("path", type=click.Path(), required=False)
@click.option(
    "--env",
    is_flag=True,
    help="Show the environment instead: versions, the CPU, and which meProp path runs "
    "(the compiled kernels, where they were loaded from, or why not and how to build them).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the info object as JSON.")
def info(path, env, as_json):
    """Show a checkpoint's architecture, size, accuracy and update counters, or an ONNX
    file's widths, size and metadata (for IN.onnx); with --env, the environment.

    \b
    Examples:
      mesimp info models/k20.pt
      mesimp info --env          # torch, CPU, meProp kernels: cpp (installed) or python + why
    """
    if env == (path is not None):
        raise click.UsageError("give a checkpoint or ONNX file, or --env (not both)")
    if env:
        _env_report(as_json)
        return
    from mesimp.models.info import path_info

    result = path_info(path)
    if as_json:
        emit_json(result)
        return
    # LSTM models count MACs per time step (token or image row), MLPs per example
    per = "step" if str(result.get("model", "")).startswith("lstm") else "example"
    if result["format"] == "onnx":
        click.echo(
            f"{path}: onnx  hidden_sizes {result['hidden_sizes']}  "
            f"input {result['input']['name']} {result['input']['shape']}"
        )
        click.echo(
            f"params {result['params']:,}  MACs/{per} {result['macs']:,}  "
            f"{result['size_bytes']:,} bytes"
        )
        for k, v in sorted(result["metadata"].items()):
            click.echo(f"  {k}: {v[:120]}")
        return
    click.echo(
        f"{path}: {result['model']}  hidden_sizes {result['hidden_sizes']}  "
        f"active {result['active_widths']}"
    )
    click.echo(
        f"params {result['params']:,}  MACs/{per} {result['macs']:,}  "
        f"dev {_fmt(result['dev_accuracy'])}  test {_fmt(result['test_accuracy'])}"
    )
    if "test_uas" in result:  # a parser: the accuracies above are transition accuracy
        click.echo(
            f"test UAS {_fmt(result['test_uas'])}  LAS {_fmt(result['test_las'])}  "
            f"(dev UAS {_fmt(result.get('dev_uas'))}  LAS {_fmt(result.get('dev_las'))})"
        )
    for c in result["counters"]:
        click.echo(
            f"  {c['name']}: k={c['k']} {c['selection']} active={c['active']} "
            f"examples={c['ref']} never-selected={c['never_selected']} "
            f"freq min/median/max={_fmt(c['freq_min'])}/{_fmt(c['freq_median'])}/"
            f"{_fmt(c['freq_max'])}"
        )


def _env_report(as_json: bool) -> None:
    from mesimp.env import environment

    e = environment()
    if as_json:
        emit_json(e)
        return
    k = e["kernels"]
    click.echo(f"mesimp {e['mesimp']}  python {e['python']} ({e['executable']})")
    click.echo(f"torch {e['torch']} (git {e['torch_git'][:10]})  cuda {e['cuda']}")
    click.echo(f"cpu {e['cpu_model']} ({e['cpu_capability']}), {e['threads']} torch threads")
    where = f"{k['library']} ({k['source']})" if k["loaded"] else "none"
    click.echo(f"meProp path: {k['path']} (mode {k['mode']}); kernels ABI {k['abi']}: {where}")
    if k["error"] and not k["loaded"] and k["mode"] != "python":
        click.echo(f"  why not: {k['error']}")
        click.echo(f"  build them: {k['build_command']}")
    click.echo(f"kernel cache: {k['cache_dir']}  compiler: {k['compiler'] or 'none'}")


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


@cli.command(short_help="Remove masked neurons: a smaller dense model, verified.")
@click.argument("path", type=click.Path())
@click.option(
    "-o",
    "--output",
    type=click.Path(),
    default=None,
    help="Output checkpoint. Default: IN.small.pt next to IN.pt.",
)
@click.option(
    "--prune-rate",
    type=float,
    default=None,
    help="Apply the meSimp rule post hoc to the saved update counters (for a "
    "checkpoint trained with plain meProp). Default: use the saved masks.",
)
@click.option(
    "--min-width",
    type=int,
    default=1,
    show_default=True,
    help="Keep at least this many neurons per hidden layer with --prune-rate (a zero-width "
    "result is always refused).",
)
@click.option(
    "--round-to",
    type=int,
    default=1,
    show_default=True,
    help="Round each width down to a multiple of N, dropping the least-selected units "
    "(16 matches onnxruntime's CPU GEMM blocks: a 784-83-66 MLP runs no faster than "
    "784-96-80). Fine-tune afterwards.",
)
@click.option(
    "--data",
    type=click.Path(),
    default=None,
    help="Data for the verification (default: the usual Fashion-MNIST locations; "
    "random inputs if none is found).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the shrink report as JSON.")
def shrink(path, output, prune_rate, min_width, round_to, data, as_json):
    """Physically remove masked (or rarely-updated) hidden neurons.

    The result is a plain nn.Linear network with smaller hidden widths. Its outputs are
    checked against the masked model on real inputs (max_abs_diff <= 1e-5); nothing is
    written if they disagree.

    \b
    Examples:
      mesimp shrink models/mesimp.pt                 # masks from meSimp training
      mesimp shrink models/k20.pt --prune-rate 0.05  # rule applied to saved counters
    """
    from mesimp.simplify.checkpoint_shrink import shrink_checkpoint

    r = shrink_checkpoint(
        path, output, prune_rate=prune_rate, min_width=min_width, data=data, round_to=round_to
    )
    if as_json:
        emit_json(r)
        return
    b, a = r["before"], r["after"]
    click.echo(f"{'layer':<8}{'width':>14}{'params':>22}{'MACs':>22}")
    for lb, la in zip(b["layers"], a["layers"], strict=True):
        click.echo(
            f"{lb['name']:<8}{lb['out_features']:>6} -> {la['out_features']:<5}"
            f"{lb['params']:>10,} -> {la['params']:<9,}{lb['macs']:>10,} -> "
            f"{la['macs']:<9,}"
        )
    click.echo(
        f"hidden {b['hidden_sizes']} -> {a['hidden_sizes']}; params x"
        f"{r['params_ratio']:.2f} smaller; MACs x{r['macs_ratio']:.2f} smaller"
    )
    click.echo(f"verified on {r['verified_on']}: max_abs_diff {r['max_abs_diff']:.2e}")
    click.echo(f"wrote {r['path']}")


@cli.command(short_help="Plot a run's active widths and accuracy to a PNG.")
@click.argument("run", type=click.Path())
@click.option(
    "-o",
    "--output",
    type=click.Path(),
    default=None,
    help="PNG path. Default: RUN.widths.png next to the metrics log.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def report(run, output, as_json):
    """Draw the active width per hidden layer over training (meSimp), with dev accuracy.

    RUN is a checkpoint (RUN.pt) or its metrics log (RUN.metrics.jsonl).
    Needs matplotlib (pip install 'mesimp[plot]').
    """
    from mesimp.training.report import plot_run

    r = plot_run(run, output)
    if as_json:
        emit_json(r)
    else:
        click.echo(f"wrote {r['path']} (final widths {r['final_widths']})")


from mesimp.cli import export_bench  # noqa: E402,F401  (registers export, bench)
