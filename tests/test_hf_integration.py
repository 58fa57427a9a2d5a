"""mesimp inside the Hugging Face Trainer (``mesimp.integrations.transformers``).

Tiny random-init models (a 2-layer BERT tagger, a 2-layer Llama) on synthetic token
sequences, so each Trainer run takes about a second. The references are independent
of the code under test: Adam's update rule for the moments, the masked model for the
shrunk one, onnxruntime for the export, Hugging Face's own loss for perplexity.
"""

from __future__ import annotations

import subprocess
import sys
import types

import numpy as np
import onnxruntime as ort
import pytest
import torch

import mesimp
from mesimp.errors import BadInputError, MesimpError

try:
    from mesimp.integrations import transformers as hfi
except MesimpError as e:  # transformers is an optional extra
    pytest.skip(f"Hugging Face transformers not available: {e}", allow_module_level=True)

from mesimp.data.token_examples import PadCollator  # noqa: E402
from mesimp.deploy.bench_tokens import bench_token_models, token_feeds  # noqa: E402
from mesimp.integrations.hf_ewt import evaluate  # noqa: E402
from mesimp.simplify.graph_shrink import max_output_diff  # noqa: E402

hf = hfi.import_transformers()
VOCAB, TAGS = 60, 5


def tiny_bert(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = hf.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=TAGS,
    )
    return hf.BertForTokenClassification(cfg)


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = hf.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        use_cache=False,
    )
    return hf.LlamaForCausalLM(cfg)


def tagging_data(n: int = 64, seed: int = 0) -> list[dict[str, list[int]]]:
    """A learnable toy task: the tag of a token is its id mod 5."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g)
        out.append({"input_ids": ids.tolist(), "labels": (ids % TAGS).tolist()})
    return out


def trainer(model, data, callbacks, tmp_path, epochs=2, logging_steps=1000):
    args = hf.TrainingArguments(
        output_dir=str(tmp_path),
        num_train_epochs=epochs,
        per_device_train_batch_size=16,
        learning_rate=1e-3,
        logging_steps=logging_steps,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    return hf.Trainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=PadCollator(),
        callbacks=callbacks,
    )


def simplify_config(**kw) -> mesimp.SimplifyConfig:
    return mesimp.SimplifyConfig(**{"prune_rate": 0.3, "points_per_epoch": 2, **kw})


MEPROP = mesimp.MePropConfig(k=0.25, selection="unified")


def test_import_mesimp_never_imports_transformers():
    code = (
        "import sys, mesimp, mesimp.cli.main, mesimp.data.token_examples, "
        "mesimp.deploy.bench_tokens\n"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & "
        "{'transformers', 'torchvision', 'accelerate'})\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


class AdamProbe(hf.TrainerCallback):
    """Checks, through the Trainer's own optimizer, Adam's state around each step: after
    a step that follows a reset, the moments must be exactly one step's worth of the
    gradient, ``m = (1 - b1) g`` and ``v = (1 - b2) g^2`` (they started from zero)."""

    def __init__(self, mesimp_cb):
        self.cb = mesimp_cb
        self.grads = {}
        self.state_len_after_reset = None
        self.checked = {}  # global step -> did the moments equal one step's worth?

    def on_step_end(self, args, state, control, optimizer=None, **kw):
        if any(e["event"] == "cycle_start" and e["global_step"] == state.global_step
               for e in self.cb.events):  # fmt: skip
            self.state_len_after_reset = len(optimizer.state)
        return control

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self.grads = {p: p.grad.detach().clone() for p in model.parameters() if p.grad is not None}
        return control

    def on_optimizer_step(self, args, state, control, optimizer=None, **kw):
        b1, b2 = optimizer.param_groups[0]["betas"]
        fresh = []
        for p, g in self.grads.items():
            st = optimizer.state[p]
            fresh.append(
                int(st["step"]) == 1
                and torch.allclose(st["exp_avg"], (1 - b1) * g, rtol=1e-5, atol=1e-12)
                and torch.allclose(st["exp_avg_sq"], (1 - b2) * g * g, rtol=1e-5, atol=1e-18)
            )
        self.checked[state.global_step + 1] = all(fresh)
        return control


def test_cycle_start_zeroes_the_trainers_adam_moments(tmp_path):
    data = tagging_data(64)  # 4 optimizer steps per epoch
    cb = hfi.MesimpCallback(MEPROP, simplify_config(cycle_epochs=1, prune_rate=0.0))
    probe = AdamProbe(cb)
    tr = trainer(tiny_bert(), data, [cb, probe], tmp_path, epochs=3)
    tr.train()
    starts = [e["global_step"] for e in cb.events if e["event"] == "cycle_start"]
    assert starts == [4, 8]  # after epochs 1 and 2; none after the last
    assert probe.state_len_after_reset == 0  # the Trainer's optimizer forgot its state
    # the step after each reset starts the moments from zero...
    assert probe.checked[1] and probe.checked[5] and probe.checked[9]
    # ...and the others carry history (so this check can fail)
    assert not any(probe.checked[s] for s in (2, 3, 4, 6, 7, 8, 10, 11, 12))


def test_widths_are_logged_at_every_point_and_the_model_shrinks(tmp_path):
    cb = hfi.MesimpCallback(MEPROP, simplify_config(cycle_epochs=0))  # every epoch simplifies
    model = tiny_bert()
    tr = trainer(model, tagging_data(64), [cb], tmp_path, epochs=2)
    tr.train()
    points = [e for e in cb.events if e["event"] == "simplify"]
    assert [e["global_step"] for e in points] == [2, 4, 6, 8]
    # FFN units, heads and the hidden size are all units of the Simplifier
    kinds = [hfi._group_kind(g) for g in cb.simplifier.groups]
    assert sorted(set(kinds)) == ["ffn", "heads", "hidden"]
    logged = {r["step"]: r for r in tr.state.log_history if "mesimp/ffn" in r}
    for e in points:  # a record at every point, with the Simplifier's widths per kind
        for kind in ("ffn", "heads", "hidden"):
            want = sum(w for w, k in zip(e["widths"], kinds, strict=True) if k == kind)
            assert logged[e["global_step"]][f"mesimp/{kind}"] == want
    last = dict(zip(kinds, points[-1]["widths"], strict=False))  # one hidden group
    assert sum(points[-1]["widths"]) < sum(g.size for g in cb.simplifier.groups)  # masked...
    small = cb.shrunk  # ...and removed
    assert type(small) is type(model)
    widths = hfi.hf_widths(small)
    ffn = [w for w, k in zip(points[-1]["widths"], kinds, strict=True) if k == "ffn"]
    heads = [w for w, k in zip(points[-1]["widths"], kinds, strict=True) if k == "heads"]
    assert [layer["ffn"] for layer in widths["layers"]] == ffn
    assert [layer["heads"] for layer in widths["layers"]] == heads
    assert widths["hidden"] == last["hidden"]
    assert mesimp.models.count_params(small) < mesimp.models.count_params(model)
    # the shrunk model computes the masked one's function, on inputs it never saw
    x = PadCollator()(tagging_data(5, seed=7))
    inputs = {"input_ids": x["input_ids"], "attention_mask": x["attention_mask"]}
    assert max_output_diff(model, small, inputs) < 1e-9


def test_a_layer_rebuilt_during_training_is_trained_by_the_trainers_optimizer(tmp_path):
    """What a Simplifier that compacts the model does: new parameter objects in place of
    the old. The callback points the Trainer's optimizer at them (and clears its state)."""
    name = "bert.encoder.layer.0.output.dense"
    new = {}

    class Rebuild(hf.TrainerCallback):  # runs before MesimpCallback in the list
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == 2:
                old = model.get_submodule(name)
                layer = torch.nn.Linear(old.in_features, old.out_features)
                layer.load_state_dict(old.state_dict())
                model.bert.encoder.layer[0].output.dense = layer
                new["weight"], new["start"] = layer.weight, layer.weight.detach().clone()
            return control

    cb = hfi.MesimpCallback(MEPROP, simplify_config())
    tr = trainer(tiny_bert(), tagging_data(64), [Rebuild(), cb], tmp_path, epochs=1)
    tr.train()
    assert [e["global_step"] for e in cb.events if e["event"] == "optimizer_rebound"] == [2]
    params = [p for g in tr.optimizer.param_groups for p in g["params"]]
    assert any(p is new["weight"] for p in params)
    assert len(params) == len(list(tr.model.parameters()))
    assert not torch.equal(new["weight"].detach(), new["start"])  # steps 3-4 trained it
    assert int(tr.optimizer.state[new["weight"]]["step"]) == 2  # fresh state since the swap


def test_attach_puts_the_callback_first_so_reporters_see_the_widths(tmp_path):
    seen = []

    class Reporter(hf.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            seen.append(dict(logs))

    cb = hfi.MesimpCallback(MEPROP, simplify_config())
    tr = trainer(tiny_bert(), tagging_data(32), [Reporter()], tmp_path, epochs=1)
    assert cb.attach(tr) is cb and tr.callback_handler.callbacks[0] is cb
    tr.train()
    assert any("mesimp/ffn" in logs for logs in seen)


def test_meprop_only_trains_without_masks(tmp_path):
    cb = hfi.MesimpCallback(MEPROP, None)
    model = tiny_llama()
    data = [{"input_ids": e["input_ids"], "labels": e["input_ids"]} for e in tagging_data(32)]
    trainer(model, data, [cb], tmp_path, epochs=1).train()
    swapped = [n for n, m in model.named_modules() if isinstance(m, mesimp.MePropLinear)]
    assert "model.layers.0.mlp.gate_proj" in swapped and "lm_head" not in swapped
    assert cb.simplifier is None and cb.shrunk is None


class _EmbedHead(torch.nn.Module):
    """Embeddings and an output layer: no hidden unit for meSimp to count."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(5000, 8), torch.nn.Linear(8, 5000)

    def forward(self, input_ids, labels=None, attention_mask=None):
        logits = self.head(self.embed(input_ids))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), input_ids.flatten())
        return {"loss": loss, "logits": logits}


def test_a_model_with_nothing_to_simplify_is_one_line(tmp_path):
    cb = hfi.MesimpCallback(MEPROP, simplify_config())
    data = [{"input_ids": e["input_ids"], "labels": e["input_ids"]} for e in tagging_data(16)]
    tr = trainer(_EmbedHead(), data, [cb], tmp_path, epochs=1)
    with pytest.raises(BadInputError, match="MesimpCallback on _EmbedHead: no meProp"):
        tr.train()


def test_a_llamas_gated_ffn_units_go_with_units_ffn(tmp_path):
    """Gate row, up row and down column are one unit: with meProp on the FFN only, the
    Simplifier counts and removes exactly those."""
    cb = hfi.MesimpCallback(MEPROP, simplify_config(prune_rate=0.3, cycle_epochs=0), units="ffn")
    data = [{"input_ids": e["input_ids"], "labels": e["input_ids"]} for e in tagging_data(32)]
    model = tiny_llama()
    trainer(model, data, [cb], tmp_path, epochs=2).train()
    assert [g.name for g in cb.simplifier.groups] == [
        "model.layers.0.mlp.gate_proj",
        "model.layers.1.mlp.gate_proj",
    ]
    roles = {m.name.rsplit(".", 1)[-1]: m.role for m in cb.simplifier.groups[0].members}
    assert roles == {"gate_proj": "out", "up_proj": "out", "down_proj": "in"}
    small = cb.shrunk
    mlp = small.model.layers[0].mlp
    assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features
    assert mlp.gate_proj.out_features == cb.simplifier.widths[0]


def test_units_ffn_swaps_only_the_feed_forward_writers(tmp_path):
    cb = hfi.MesimpCallback(MEPROP, simplify_config(), units="ffn")
    model = tiny_bert()
    trainer(model, tagging_data(32), [cb], tmp_path, epochs=1).train()
    swapped = [n for n, m in model.named_modules() if isinstance(m, mesimp.MePropLinear)]
    assert swapped == list(cb.simplifier.layers)
    assert all(hfi.unit_kind(n) == "ffn" for n in swapped)
    assert {hfi._group_kind(g) for g in cb.simplifier.groups} == {"ffn"}


def test_unit_kinds_of_hf_layer_names():
    assert hfi.unit_kind("bert.encoder.layer.3.attention.self.query") == "heads"
    assert hfi.unit_kind("bert.encoder.layer.3.attention.output.dense") == "hidden"
    assert hfi.unit_kind("bert.encoder.layer.3.intermediate.dense") == "ffn"
    assert hfi.unit_kind("bert.encoder.layer.3.output.dense") == "hidden"
    assert hfi.unit_kind("model.layers.0.self_attn.k_proj") == "heads"
    assert hfi.unit_kind("model.layers.0.mlp.up_proj") == "ffn"
    assert hfi.unit_kind("model.layers.0.mlp.down_proj") == "hidden"
    assert hfi.unit_kind("classifier") is None


def test_bad_use_is_one_line(tmp_path):
    with pytest.raises(BadInputError, match="SimplifyConfig"):
        hfi.MesimpCallback(MEPROP, {"prune_rate": 0.1})
    with pytest.raises(BadInputError, match="units must be"):
        hfi.MesimpCallback(MEPROP, simplify_config(), units="heads")
    with pytest.raises(BadInputError, match="dict of tensors"):
        hfi.MesimpCallback(MEPROP, simplify_config(), example_inputs=torch.zeros(2, 3))
    cb = hfi.MesimpCallback(MEPROP, simplify_config())
    tr = trainer(tiny_bert(), tagging_data(32), [cb], tmp_path, epochs=1)
    tr.train()
    with pytest.raises(BadInputError, match="already ran"):
        tr.train()
    best = types.SimpleNamespace(load_best_model_at_end=True, gradient_accumulation_steps=1)
    with pytest.raises(BadInputError, match="load_best_model_at_end"):
        hfi.MesimpCallback(MEPROP, simplify_config()).on_train_begin(
            best, types.SimpleNamespace(global_step=0), None, model=tiny_bert(), optimizer=1
        )
    state = types.SimpleNamespace(global_step=5, num_train_epochs=1)
    with pytest.raises(BadInputError, match="resuming"):
        hfi.MesimpCallback(MEPROP, simplify_config()).on_train_begin(
            tr.args, state, None, model=tiny_bert(), optimizer=tr.optimizer
        )
    with pytest.raises(BadInputError, match="not a model class"):
        hfi.model_from_config("BertConfig", {})
    with pytest.raises(BadInputError, match="transformers model"):
        hfi.save_hf_model(tmp_path / "m.pt", torch.nn.Linear(2, 2), (torch.zeros(1, 2),))


@pytest.fixture(scope="module")
def shrunk_bert(tmp_path_factory):
    """A tiny BERT tagger trained with meSimp in the Trainer and shrunk."""
    cb = hfi.MesimpCallback(MEPROP, simplify_config())
    model = tiny_bert()
    trainer(model, tagging_data(64), [cb], tmp_path_factory.mktemp("t"), epochs=2).train()
    x = PadCollator()(tagging_data(4, seed=3))
    return cb.shrunk.eval(), {k: x[k] for k in ("input_ids", "attention_mask")}


def test_model_file_reloads_bit_identically(shrunk_bert, tmp_path):
    small, inputs = shrunk_bert
    path = hfi.save_hf_model(tmp_path / "small.pt", small, inputs)
    again = mesimp.load_model(path)
    assert type(again) is type(small)
    assert hfi.hf_widths(again) == hfi.hf_widths(small)
    x = PadCollator()(tagging_data(6, seed=11))
    with torch.no_grad():
        a = small(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
        b = again(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
    assert torch.equal(a, b)
    payload = torch.load(path, weights_only=True)  # plain data only
    assert payload["factory"] == hfi.FACTORY
    assert payload["factory_kwargs"]["architecture"] == "BertForTokenClassification"
    assert payload["factory_kwargs"]["config"]["intermediate_size"] == 32  # unshrunk


def test_onnx_export_has_dynamic_batch_and_sequence(shrunk_bert, tmp_path):
    small, inputs = shrunk_bert
    r = hfi.export_hf_onnx(small, inputs, tmp_path / "small.onnx")
    assert r["max_abs_diff"] < 1e-4
    sess = ort.InferenceSession(r["path"], providers=["CPUExecutionProvider"])
    longer = {"input_ids": list(range(1, 30)), "labels": [0] * 29}  # longer than the example
    x = PadCollator()([*tagging_data(3, seed=5), longer])
    got = sess.run(
        None, {"input_0": x["input_ids"].numpy(), "input_1": x["attention_mask"].numpy()}
    )
    with torch.no_grad():
        want = small(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
    assert np.abs(got[0] - want.numpy()).max() < 1e-4


def test_llama_exports_without_its_cache(tmp_path):
    model = tiny_llama().eval()
    model.config.use_cache = True  # LogitsOnly asks for no cache either way
    x = PadCollator()(tagging_data(3))
    r = hfi.export_hf_onnx(model, x, tmp_path / "lm.onnx")
    assert r["outputs"] == ["output"] and r["max_abs_diff"] < 1e-4


def test_token_timing_runs_every_model_on_every_sentence(shrunk_bert, tmp_path):
    small, inputs = shrunk_bert
    dense = tiny_bert().eval()
    a = hfi.export_hf_onnx(dense, inputs, tmp_path / "dense.onnx")["path"]
    b = hfi.export_hf_onnx(small, inputs, tmp_path / "small.onnx")["path"]
    sentences = [e["input_ids"] for e in tagging_data(10, seed=2)]
    res = bench_token_models([a, b], sentences, batch_sizes=(1, 4), passes=2, warmup=1)
    rows = res["results"]
    assert [(r["model"], r["batch_size"]) for r in rows] == [(a, 1), (b, 1), (a, 4), (b, 4)]
    assert rows[0]["speedup"] == 1.0 and rows[2]["speedup"] == 1.0
    assert {r["tokens"] for r in rows} == {sum(map(len, sentences))}
    assert rows[0]["runs"] == 2 * 10 and rows[2]["runs"] == 2 * 3
    feeds, tokens = token_feeds(sentences, 4, ["input_0", "input_1"])
    assert sum(tokens) == sum(map(len, sentences))
    assert all(int(f["input_1"].sum()) == t for f, t in zip(feeds, tokens, strict=True))


def test_metrics_match_hugging_faces_own_loss():
    model = tiny_llama().eval()
    ex = [{"input_ids": [1, 5, 9, 7, 2], "labels": [1, 5, 9, 7, 2]}]
    ids = torch.tensor([ex[0]["input_ids"]])
    with torch.no_grad():
        want = float(torch.exp(model(input_ids=ids, labels=ids).loss))
    got = evaluate(model, ex, causal=True)
    assert got["tokens"] == 4 and got["perplexity"] == pytest.approx(want, rel=1e-5)
    bert = tiny_bert().eval()
    data = tagging_data(8, seed=4)
    x = PadCollator()(data)
    with torch.no_grad():
        pred = bert(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
    keep = x["labels"] != -100
    acc = float((pred.argmax(-1)[keep] == x["labels"][keep]).double().mean())
    assert evaluate(bert, data, causal=False)["accuracy"] == pytest.approx(acc)
