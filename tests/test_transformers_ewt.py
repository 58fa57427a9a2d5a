"""``benchmarks/transformers_ewt.py``: the Torch-Pruning baseline reaches exactly the
widths it is given (FFN units, whole heads, the hidden size), which the real run only
asks of it once meSimp removes heads and hidden channels too; and the report's verdicts."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

pytest.importorskip("accelerate")
tp = pytest.importorskip("torch_pruning")

from benchmarks import transformers_ewt as bench  # noqa: E402
from mesimp.data.token_examples import PadCollator  # noqa: E402
from mesimp.integrations.hf_ewt import DEFAULT_EWT, QUICK, load_task  # noqa: E402
from mesimp.integrations.transformers import hf_widths  # noqa: E402

pytestmark = pytest.mark.skipif(not DEFAULT_EWT.is_dir(), reason=f"{DEFAULT_EWT} not found")


@pytest.fixture(scope="module")
def upos():
    return load_task("upos", size=QUICK["upos"])


@pytest.mark.parametrize(
    "importance",
    [tp.importance.GroupMagnitudeImportance(p=2), tp.importance.GroupTaylorImportance()],
)
def test_tp_prunes_a_bert_to_exact_heads_ffn_and_hidden(upos, importance):
    dense = upos.build_model(0)
    target = {
        "hidden": 24,
        "layers": [{"heads": 1, "kv_heads": 1, "ffn": 40}, {"heads": 2, "kv_heads": 2, "ffn": 10}],
    }
    pruned = bench.tp_prune(upos, dense, target, importance)
    assert hf_widths(pruned) == target
    assert hf_widths(dense)["hidden"] == 32  # a copy was pruned
    attn = pruned.bert.encoder.layer[0].attention.self
    assert (attn.num_attention_heads, attn.all_head_size) == (1, 16)  # head counts follow
    batch = PadCollator()(upos.dev[:4])
    assert torch.isfinite(pruned(**batch).loss)  # the pruned model runs


def test_tp_refuses_widths_it_cannot_reach(upos):
    dense = upos.build_model(0)
    target = hf_widths(dense)
    target["layers"][0]["ffn"] = 70  # wider than the model
    with pytest.raises(RuntimeError, match="gave widths"):
        bench.tp_prune(upos, dense, target, tp.importance.GroupMagnitudeImportance(p=2))


def test_time_limit_interrupts_a_long_analysis():
    t0 = time.perf_counter()
    with pytest.raises(bench.SetupTimeout, match="the thing took over 1 s"):
        with bench.time_limit(1, "the thing"):
            while True:
                sum(range(1000))
    assert time.perf_counter() - t0 < 5


def test_goals_read_the_summary():
    dense = {"accuracy": 0.90, "macs_per_token": 900}
    summary = {
        "dense": dense,
        "mesimp": {"accuracy": 0.895, "macs_per_token": 250},
        "tp": {"accuracy": 0.899, "macs_per_token": 250},
    }
    lines = bench.goals("upos", summary)
    assert lines[0].startswith("upos: MAC ratio 3.60× (goal ≥ 3.0×): met")
    assert "accuracy loss 0.50 points (goal ≤ 1): met" in lines[1]
    assert lines[2].endswith("not met")  # behind Torch-Pruning
    lm = {"dense": {"perplexity": 100.0, "macs_per_token": 10}, "mesimp": {"error": "x"}}
    assert bench.goals("lm", lm) == ["lm: no meSimp result (x)"]
