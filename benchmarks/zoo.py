"""The model zoo: what meSimp can simplify on the models users bring, beside Torch-Pruning.

    python -m benchmarks.zoo [--models a,b] [--merge] [--quick] [--timeout S] [--json F]
        [--markdown F]

Each model (torchvision, timm, Hugging Face transformers; random init, small inputs)
runs in a fresh process (a hang or a crash costs that model only), twice:

* **mesimp**: ``meprop_(model, MePropConfig(k=0.25, selection="unified"))``, a
  ``Simplifier`` on example inputs (its set-up time is reported: tracing, groups, the
  trial shrink), half the units of every group it chose masked, ``mesimp.shrink``
  (verified in float64 against the masked model), ``export_onnx`` (onnxruntime
  parity). Reported: the share of the model's layer MACs and parameters in layers the
  chosen groups touch (writers and readers: what shrinks when units go), the
  parameters left, and whether shrink and ONNX passed; otherwise the one-line reason.
* **Torch-Pruning**, its own coverage recipe (its
  ``examples/torchvision_models/torchvision_pruning.py``): ``GroupNormPruner`` with
  ``GroupMagnitudeImportance``, 50 % of channels, the output layer ignored, head counts
  passed for ``nn.MultiheadAttention``; the pruned model must run. Reported: the share
  of layer MACs and parameters in its groups (same definition), the parameters left.

Layer MACs are measured on the example inputs (``mesimp.models.macs``: Linear, conv,
HF Conv1D, LSTM; attention score matmuls are not layers and are not counted).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn

# (name, family, factory kwargs, input): small inputs keep the whole run under ~20 min
MODELS: list[tuple[str, str, dict[str, Any], str]] = [
    ("resnet18", "tv", {}, "img64"),
    ("resnet50", "tv", {}, "img64"),
    ("resnet50@224", "tv", {}, "img224"),  # the set-up time at full resolution
    ("resnext50_32x4d", "tv", {}, "img64"),
    ("wide_resnet50_2", "tv", {}, "img64"),
    ("mobilenet_v2", "tv", {}, "img64"),
    ("mobilenet_v3_large", "tv", {}, "img64"),
    ("efficientnet_b0", "tv", {}, "img64"),
    ("efficientnet_v2_s", "tv", {}, "img64"),
    ("regnet_y_400mf", "tv", {}, "img64"),
    ("regnet_x_400mf", "tv", {}, "img64"),
    ("mnasnet1_0", "tv", {}, "img64"),
    ("convnext_tiny", "tv", {}, "img64"),
    ("densenet121", "tv", {}, "img64"),
    ("googlenet", "tv", {"aux_logits": False, "init_weights": True}, "img64"),
    ("squeezenet1_1", "tv", {}, "img64"),
    ("vgg11_bn", "tv", {}, "img64"),
    ("alexnet", "tv", {}, "img64"),
    ("shufflenet_v2_x1_0", "tv", {}, "img64"),
    ("vit_b_32", "tv", {}, "img224"),
    ("swin_t", "tv", {}, "img64"),
    ("timm/resnet50", "timm", {}, "img64"),
    ("timm/efficientnet_b0", "timm", {}, "img64"),
    ("timm/mobilenetv3_large_100", "timm", {}, "img64"),
    ("timm/convnext_tiny", "timm", {}, "img64"),
    ("timm/regnety_016", "timm", {}, "img64"),
    ("timm/vit_small_patch16_224", "timm", {"img_size": 64}, "img64"),
    ("timm/deit_tiny_patch16_224", "timm", {"img_size": 64}, "img64"),
    ("timm/mixer_s16_224", "timm", {"img_size": 64}, "img64"),
    ("bert", "hf", {}, "ids"),
    ("distilbert", "hf", {}, "ids"),
    ("roberta", "hf", {}, "ids"),
    ("hf_vit", "hf", {}, "img32"),
    ("gpt2", "hf", {}, "ids"),
    ("llama", "hf", {}, "ids"),
    ("llama-2l-64", "hf", {}, "ids"),  # the set-up time of a 2-layer, hidden-64 Llama
]
QUICK = [
    "resnet18",
    "mobilenet_v2",
    "regnet_x_400mf",
    "timm/vit_small_patch16_224",
    "bert",
    "llama",
]


def build(name: str, family: str, kw: dict[str, Any]) -> nn.Module:
    torch.manual_seed(0)
    if family == "tv":
        from benchmarks.torchvision_cpu import load

        return getattr(load().models, name.split("@")[0])(**kw)
    if family == "timm":
        from benchmarks.torchvision_cpu import load

        load()  # timm imports torchvision, which needs the shim beside the CPU torch
        import timm

        return timm.create_model(name.split("/", 1)[1], pretrained=False, **kw)
    return _hf(name)


def _hf(name: str) -> nn.Module:
    from benchmarks.torchvision_cpu import load

    load()  # transformers imports torchvision, which needs the shim beside the CPU torch
    import transformers as T

    small = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4)
    heads = dict(num_attention_heads=8, max_position_embeddings=128, vocab_size=1000)
    if name == "bert":
        return T.BertForTokenClassification(T.BertConfig(**small, **heads, num_labels=17))
    if name == "roberta":
        return T.RobertaForSequenceClassification(T.RobertaConfig(**small, **heads))
    if name == "distilbert":
        cfg = T.DistilBertConfig(dim=256, hidden_dim=1024, n_layers=4, n_heads=8, vocab_size=1000)
        return T.DistilBertForTokenClassification(cfg)
    if name == "hf_vit":
        cfg = T.ViTConfig(**small, num_attention_heads=8, image_size=32, patch_size=4)
        return T.ViTForImageClassification(cfg)
    if name == "gpt2":
        cfg = T.GPT2Config(n_embd=256, n_layer=4, n_head=8, n_positions=128, vocab_size=1000)
        cfg.bos_token_id = cfg.eos_token_id = 0
        return T.GPT2LMHeadModel(cfg)
    if name == "llama-2l-64":
        small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
        heads = dict(num_attention_heads=4, max_position_embeddings=128, vocab_size=1000)
    cfg = T.LlamaConfig(**small, **heads, num_key_value_heads=2)  # grouped-query attention
    return T.LlamaForCausalLM(cfg)


def inputs(kind: str) -> Any:
    g = torch.Generator().manual_seed(1)
    if kind == "ids":
        return {"input_ids": torch.randint(3, 1000, (2, 16), generator=g)}
    size = int(kind[3:])
    x = torch.randn(2, 3, size, size, generator=g)
    return {"pixel_values": x} if size == 32 else x


def output_layer(model: nn.Module) -> nn.Module | None:
    """The classifier / LM head: the last Linear in module order (what both tools skip)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def _shares(macs: dict[str, int], params: dict[str, int], touched: set[str]) -> dict[str, float]:
    total_m, total_p = sum(macs.values()) or 1, sum(params.values()) or 1
    return {
        "macs_share": sum(v for k, v in macs.items() if k in touched) / total_m,
        "params_share": sum(v for k, v in params.items() if k in touched) / total_p,
    }


def _layer_params(model: nn.Module, names: set[str]) -> dict[str, int]:
    out = {}
    for n, m in model.named_modules():
        if n in names:
            out[n] = sum(p.numel() for p in m.parameters(recurse=False))
    return out


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_mesimp(model: nn.Module, x: Any, macs: dict[str, int]) -> dict[str, Any]:
    import mesimp
    from mesimp import MePropConfig, SimplifyConfig
    from mesimp.simplify.masking import apply_keeps, sync

    out: dict[str, Any] = {}
    mesimp.meprop_(model, MePropConfig(k=0.25, selection="unified"))
    t = time.perf_counter()
    simp = mesimp.Simplifier(model, SimplifyConfig(), steps_per_epoch=1, example_inputs=x)
    out["setup_s"] = time.perf_counter() - t
    out["groups"] = len(simp.groups)
    out["kinds"] = sorted({g.kind for g in simp.groups})
    touched = {m.name for g in simp.groups for m in g.members if m.role in ("out", "in", "inout")}
    params = _layer_params(model, set(macs))
    out.update(_shares(macs, params, touched))
    before = _n_params(model)
    gen = torch.Generator().manual_seed(0)
    for g in simp.groups:
        keep = torch.ones(g.size, dtype=torch.bool)
        keep[torch.randperm(g.size, generator=gen)[: g.size // 2]] = False
        apply_keeps(model, g, keep)
    sync(model, simp.all_groups)
    small = mesimp.shrink(model.eval(), x).eval()
    out["params_left"] = _n_params(small) / before
    out["shrink"] = True
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        r = mesimp.export_onnx(small, x, Path(d) / "m.onnx")
    out["onnx"] = r["max_abs_diff"] <= 1e-4
    out["onnx_diff"] = r["max_abs_diff"]
    return out


def run_tp(model: nn.Module, x: Any, macs: dict[str, int]) -> dict[str, Any]:
    import torch_pruning as tp

    out: dict[str, Any] = {}
    ignored = [output_layer(model)]
    channel_groups = {
        m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)
    }
    forward = None
    if isinstance(x, dict):

        def forward(m: nn.Module, inp: Any) -> Any:
            o = m(**inp)
            return o.logits if hasattr(o, "logits") else o

    before = _n_params(model)
    t = time.perf_counter()
    pruner = tp.pruner.GroupNormPruner(
        model,
        example_inputs=x,
        forward_fn=forward,
        importance=tp.importance.GroupMagnitudeImportance(p=1),
        iterative_steps=1,
        pruning_ratio=0.5,
        ignored_layers=ignored,
        channel_groups=channel_groups,
    )
    names = {m: n for n, m in model.named_modules()}
    touched = set()
    for group in pruner.DG.get_all_groups(
        ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
    ):
        for item in group:
            mod = item.dep.target.module
            if mod in names:
                touched.add(names[mod])
    params = _layer_params(model, set(macs))
    out.update(_shares(macs, params, touched))
    pruner.step()
    out["setup_s"] = time.perf_counter() - t
    from benchmarks.torchvision_cpu import load

    vit = getattr(load().models, "VisionTransformer", None)
    if vit is not None and isinstance(model, vit):  # TP's own recipe fixes this by hand
        model.hidden_dim = model.conv_proj.out_channels
    with torch.no_grad():
        model(**x) if isinstance(x, dict) else model(x)
    out["params_left"] = _n_params(model) / before
    out["runs"] = True
    return out


def one(name: str, tool: str) -> dict[str, Any]:
    """One tool on one model; a failure as a one-line reason."""
    import warnings

    import mesimp.simplify.tracing

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    # a looping tracer stops with its one-line reason before the process times out
    mesimp.simplify.tracing.DEADLINE_S = float(sys.argv[sys.argv.index("--deadline") + 1])
    spec = next(m for m in MODELS if m[0] == name)
    _, family, kw, kind = spec
    x = inputs(kind)
    from mesimp.models.macs import layer_macs

    model = build(name, family, kw).eval()
    macs = layer_macs(model, x)
    row: dict[str, Any] = {"params": _n_params(model), "macs": sum(macs.values())}
    try:
        row.update((run_mesimp if tool == "mesimp" else run_tp)(model, x, macs))
    except Exception as e:  # noqa: BLE001 - a tool's failure is a result, in one line
        first = (str(e).strip().splitlines() or [""])[0][:160]
        row["error"] = f"{type(e).__name__}: {first}"
        if "--debug" in sys.argv:
            traceback.print_exc()
    return row


def _subprocess(name: str, tool: str, timeout: float) -> dict[str, Any]:
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "benchmarks.zoo", "--one", name, "--tool", tool]
    cmd += ["--deadline", str(timeout / 2)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {timeout:g} s", "wall_s": timeout}
    lines = p.stdout.strip().splitlines()
    if p.returncode == 0 and lines:
        row = json.loads(lines[-1])
    else:
        row = {"error": f"crashed: {(p.stderr.strip().splitlines() or ['?'])[-1][:160]}"}
    row["wall_s"] = time.perf_counter() - t
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", help="comma-separated names (default: all)")
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    ap.add_argument("--timeout", type=float, default=240, help="seconds per model")
    ap.add_argument(
        "--merge", action="store_true", help="keep the --json file's rows of the other models"
    )
    ap.add_argument("--json", default="benchmarks/zoo.json")
    ap.add_argument("--markdown", default="benchmarks/ZOO.md")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--tool", default="mesimp", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=120, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.tool)))
        return 0
    names = a.models.split(",") if a.models else (QUICK if a.quick else [m[0] for m in MODELS])
    rows = []
    for name in names:
        row = {"model": name, **{t: _subprocess(name, t, a.timeout) for t in ("mesimp", "tp")}}
        rows.append(row)
        print(_line(row), file=sys.stderr, flush=True)
    from mesimp.files.atomic import atomic_write_text

    if a.merge and Path(a.json).is_file():
        kept = {r["model"]: r for r in json.loads(Path(a.json).read_text())["rows"]}
        kept.update({r["model"]: r for r in rows})
        order = [m[0] for m in MODELS]
        rows = sorted(kept.values(), key=lambda r: order.index(r["model"]))
    atomic_write_text(a.json, json.dumps({"rows": rows}, indent=1) + "\n")
    atomic_write_text(a.markdown, report(rows))
    print(report(rows))
    return 0


def _pct(v: float | None) -> str:
    return f"{100 * v:.0f} %" if isinstance(v, (int, float)) else "–"


def _line(row: dict[str, Any]) -> str:
    m, t = row.get("mesimp", {}), row.get("tp", {})
    return (
        f"{row['model']}: mesimp {_pct(m.get('macs_share'))} {m.get('error', '')} | "
        f"tp {_pct(t.get('macs_share'))} {t.get('error', '')}"
    )


def report(rows: list[dict[str, Any]]) -> str:
    head = (
        "| model | mesimp: simplifiable MACs | params | groups | set-up s | params left "
        "(half masked) | shrink + ONNX | TP: prunable MACs | params | params left (50 %) "
        "| TP runs |\n|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|\n"
    )
    lines, notes = [], []
    for r in rows:
        m, t = r.get("mesimp", {}), r.get("tp", {})
        ok = "yes" if m.get("shrink") and m.get("onnx") else "no"
        if "error" in m:
            ok = "no¹"
            notes.append(f"- {r['model']} (mesimp): {m['error']}")
        runs = "yes" if t.get("runs") else "no²"
        if "error" in t:
            notes.append(f"- {r['model']} (Torch-Pruning): {t['error']}")
        lines.append(
            f"| {r['model']} | {_pct(m.get('macs_share'))} | {_pct(m.get('params_share'))} | "
            f"{m.get('groups', '–')} | {m.get('setup_s', 0):.1f} | {_pct(m.get('params_left'))} "
            f"| {ok} | {_pct(t.get('macs_share'))} | {_pct(t.get('params_share'))} | "
            f"{_pct(t.get('params_left'))} | {runs} |"
        )
    ok_m = sum(1 for r in rows if r.get("mesimp", {}).get("onnx"))
    ok_t = sum(1 for r in rows if r.get("tp", {}).get("runs"))
    n = len(rows)
    tail = f"\nmesimp verified shrink + ONNX: {ok_m} of {n}; Torch-Pruning runs: {ok_t} of {n}.\n"
    intro = (
        "# The model zoo: what meSimp can simplify, beside Torch-Pruning\n\n"
        "`python -m benchmarks.zoo` (each model and tool in a fresh process, 1 thread, random "
        "init, small inputs; see the script's docstring). Simplifiable / prunable MACs and "
        "params: the share of the model's layer MACs and parameters in layers that the "
        "chosen groups touch. Params left: after masking half the units of every group "
        "(mesimp, then `shrink` verified in float64 and ONNX parity) or Torch-Pruning's "
        "50 % recipe. Set-up: tracing, groups and the trial shrink, on a shared 2-core "
        "machine.\n\n"
    )
    body = intro + head + "\n".join(lines) + "\n" + tail
    return body + ("\n" + "\n".join(notes) + "\n" if notes else "")


if __name__ == "__main__":
    sys.exit(main())
