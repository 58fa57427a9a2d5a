"""The papers' claims and the project's goals, judged from the measured rows.

Every verdict is computed here from the numbers, with a rule stated in the report:

* **no loss** (method vs dense): the mean test accuracy drops by at most ``ACC_TOL``
  (0.2 points) -> holds; a larger drop that is within 2 standard errors of the
  difference (seed noise) -> inconclusive; a larger one -> does not hold.
* **A beats B**: the mean difference is above 2 standard errors -> holds; below
  -2 SE -> does not hold; in between -> inconclusive (no clear difference). With one
  seed the standard error is 0: the sign decides, flagged "1 seed".
* A method whose every seed diverged never "holds"; one that beats a diverged
  method does so trivially, and the text says so.

The papers' numbers are from the authors' READMEs (lancopku/meProp, lancopku/meSimp):
MNIST / Penn Treebank POS, not Fashion-MNIST / UD EWT, so it is the *relative* claims
(no loss, smaller, faster, A better than B) that are compared, not raw accuracies.
"""

from __future__ import annotations

from typing import Any

from benchmarks.suite.stats import Stat, diff, kept_fraction, row_stat

ACC_TOL = 0.002  # 0.2 accuracy points
HOLDS, FAILS, UNSURE = "holds", "does not hold", "inconclusive"

PAPER = {
    "meprop": "fewer than 5% of the weights updated per step, accuracy not degraded: "
    "MNIST MLP 500d 98.20% vs 98.27% with top-80; POS LSTM 500d 97.22% vs 97.25% with "
    "top-10 (2%); backprop 5.9x (MNIST) and 37.1x (POS) faster on CPU",
    "mesimp": "models 'often reduced by around 9x' without loss: POS LSTM 500 -> 60 "
    "(12.0%), 97.25% vs 97.22%; MNIST MLP 500 -> 154 (30.8%, top-160), 98.31% vs 98.20%",
    "msbp": "the memory (alpha = 0.8) recovers accuracy that plain sparse backprop "
    "loses at the same k (qualitative; no number taken here)",
    "random": "top-k selection works better than random k-selection",
    "same_size": "the reduced networks work better than normally trained networks of the same size",
}
PAPER_KEPT = {"mlp": 0.308, "lstm": 0.120}  # MNIST 154/500, POS 60/500


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def pts(x: float) -> str:
    return f"{100 * x:+.2f} pt"


def _acc(row: dict[str, Any] | None) -> Stat | None:
    return row_stat(row, "test_accuracy") if row else None


def _why_missing(row: dict[str, Any] | None) -> str:
    if row is None:
        return "row missing"
    return row.get("reason") or row.get("status", "no result")


def no_loss(method: dict[str, Any] | None, dense: dict[str, Any] | None) -> dict[str, Any]:
    """The "no accuracy loss" verdict of ``method`` against ``dense``."""
    a, d = _acc(method), _acc(dense)
    if a is None or d is None:
        missing = method if a is None else dense
        status = (missing or {}).get("status")
        holds = False if status == "diverged" and missing is method else None
        return {
            "ours": f"no result ({_why_missing(missing)})",
            "verdict": FAILS if holds is False else UNSURE,
            "holds": holds,
        }
    x = diff(a, d)
    one = " (1 seed)" if x.single_seed else ""
    ours = f"{pct(a.mean)} vs {pct(d.mean)} ({pts(x.delta)}, 2 SE {100 * 2 * x.se:.2f} pt){one}"
    if x.delta >= -ACC_TOL:
        return {"ours": ours, "verdict": HOLDS, "holds": True}
    if not x.single_seed and x.delta >= -2 * x.se:
        return {"ours": ours, "verdict": f"{UNSURE} (loss within seed noise)", "holds": None}
    return {"ours": ours, "verdict": FAILS, "holds": False}


def beats(a_row: dict[str, Any] | None, b_row: dict[str, Any] | None) -> dict[str, Any]:
    """The "A has a higher test accuracy than B" verdict."""
    a, b = _acc(a_row), _acc(b_row)
    if a is None:
        status = (a_row or {}).get("status")
        holds = False if status == "diverged" else None
        return {
            "ours": f"A has no result ({_why_missing(a_row)})",
            "verdict": FAILS if holds is False else UNSURE,
            "holds": holds,
        }
    if b is None:
        if (b_row or {}).get("status") == "diverged":
            return {
                "ours": f"A {pct(a.mean)}; B diverged",
                "verdict": f"{HOLDS} (trivially: B diverged)",
                "holds": True,
            }
        return {
            "ours": f"B has no result ({_why_missing(b_row)})",
            "verdict": UNSURE,
            "holds": None,
        }
    x = diff(a, b)
    one = " (1 seed)" if x.single_seed else ""
    ours = f"{pct(a.mean)} vs {pct(b.mean)} ({pts(x.delta)}, 2 SE {100 * 2 * x.se:.2f} pt){one}"
    if x.delta > 2 * x.se and x.delta > 0:
        return {"ours": ours, "verdict": HOLDS + one, "holds": True}
    if x.delta < -2 * x.se and x.delta < 0:
        return {"ours": ours, "verdict": FAILS + one, "holds": False}
    return {"ours": ours, "verdict": f"{UNSURE} (no clear difference)", "holds": None}


def _rows(results: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["section"], r["key"]): r for r in results["rows"]}


def _bwd(row: dict[str, Any] | None) -> float | None:
    b = (row or {}).get("backward") or []
    return b[0]["ratio"] if b else None


def smaller(section: str, rows: dict, full_width: int) -> dict[str, Any]:
    """meSimp's kept fraction against the paper's, with the no-loss verdict."""
    return smaller_than(
        rows.get((section, "mesimp")),
        rows.get((section, "dense")),
        full_width,
        PAPER_KEPT[section],
    )


def smaller_than(
    ms: dict[str, Any] | None, dense: dict[str, Any] | None, full_width: int, paper: float
) -> dict[str, Any]:
    """``ms`` keeps at most the paper's share ``paper`` of the units, with no loss vs dense."""
    kept = kept_fraction(ms, full_width) if ms else None
    loss = no_loss(ms, dense)
    if kept is None:
        return {"ours": loss["ours"], "verdict": loss["verdict"], "holds": loss["holds"]}
    ours = f"kept {pct(kept.mean)} of the units ({1 / kept.mean:.1f}x smaller); {loss['ours']}"
    small_enough = kept.mean <= paper
    if loss["holds"] is True and small_enough:
        return {"ours": ours, "verdict": HOLDS, "holds": True}
    if loss["holds"] is False or not small_enough:
        why = [] if small_enough else [f"kept more than the paper's {pct(paper)}"]
        why += [] if loss["holds"] is not False else ["accuracy loss"]
        return {"ours": ours, "verdict": f"{FAILS} ({', '.join(why)})", "holds": False}
    return {"ours": ours, "verdict": loss["verdict"], "holds": None}


def judge(results: dict[str, Any]) -> dict[str, Any]:
    """All claim and goal verdicts: ``{"claims": [...], "goals": [...], "rules": str}``."""
    rows = _rows(results)
    cfg = results["config"]
    h_mlp, h_lstm = cfg["mlp"]["hidden"], cfg["lstm"]["hidden"]
    k_mlp, k_lstm = cfg["mlp"]["k"], cfg["lstm"]["k"]
    m = lambda key: rows.get(("mlp", key))  # noqa: E731
    s = lambda key: rows.get(("lstm", key))  # noqa: E731

    def item(setting: str, verdict: dict[str, Any], paper: str = "") -> dict[str, Any]:
        return {"setting": setting, "paper": paper, **verdict}

    claims = [
        {
            "id": "meprop",
            "title": f"meProp: a few % of the gradient (k={k_mlp} of {h_mlp}) loses no accuracy",
            "paper": PAPER["meprop"],
            "items": [
                item(
                    f"MLP, per-example top-{k_mlp} (the paper's)",
                    no_loss(m("meprop_topk"), m("dense")),
                ),
                item(f"MLP, unified top-{k_mlp}", no_loss(m("meprop_unified"), m("dense"))),
                item(f"LSTM, unified top-{k_lstm}", no_loss(s("meprop"), s("dense"))),
            ],
        },
        {
            "id": "mesimp",
            "title": "meSimp: a much smaller model with no accuracy loss",
            "paper": PAPER["mesimp"],
            "items": [
                item("MLP (paper: MNIST 30.8% kept)", smaller("mlp", rows, h_mlp)),
                item("LSTM (paper: POS 12.0% kept)", smaller("lstm", rows, h_lstm)),
            ],
        },
        {
            "id": "msbp",
            "title": "MSBP beats plain sparse backprop at the same k",
            "paper": PAPER["msbp"],
            "items": [
                item(
                    f"MLP, k={k_mlp}: MSBP vs meProp (same selection)",
                    beats(m("msbp"), m(_msbp_twin(cfg))),
                )
            ],
        },
        {
            "id": "random",
            "title": "top-k beats random-k",
            "paper": PAPER["random"],
            "items": [
                item(
                    f"MLP, per-example top-{k_mlp} vs random-{k_mlp}",
                    beats(m("meprop_topk"), m("random_k")),
                ),
                item(
                    f"MLP, unified top-{k_mlp} vs random-{k_mlp}",
                    beats(m("meprop_unified"), m("random_k")),
                ),
            ],
        },
        {
            "id": "same_size",
            "title": "meSimp beats a dense net of the same size trained from scratch",
            "paper": PAPER["same_size"],
            "items": [
                item("MLP", beats(m("mesimp"), m("dense_same"))),
                item("LSTM", beats(s("mesimp"), s("dense_same"))),
            ],
        },
    ]
    return {"claims": claims, "goals": goals(rows, h_mlp, h_lstm, k_mlp, k_lstm)}


def _msbp_twin(cfg: dict[str, Any]) -> str:
    return "meprop_topk" if cfg["mlp"]["msbp_selection"] == "topk" else "meprop_unified"


def goals(rows: dict, h_mlp: int, h_lstm: int, k_mlp: int, k_lstm: int) -> list[dict[str, Any]]:
    out = []
    for section, h, limit in (("mlp", h_mlp, 0.15), ("lstm", h_lstm, 0.12)):
        ms, dense = rows.get((section, "mesimp")), rows.get((section, "dense"))
        kept = kept_fraction(ms, h) if ms else None
        loss = no_loss(ms, dense)
        met: bool | None
        if kept is None:
            met, ours = None, loss["ours"]
        else:
            ours = f"kept {pct(kept.mean)}; {loss['ours']}: {loss['verdict']}"
            if kept.mean > limit or loss["holds"] is False:
                met = False
            else:
                met = loss["holds"]  # True, or None when the loss is within seed noise
        name = "MLP" if section == "mlp" else "LSTM"
        out.append(
            {
                "goal": f"meSimp ({name}) keeps <= {limit:.0%} of the width, no accuracy loss",
                "ours": ours,
                "met": met,
            }
        )
    main = f"MLP unified k={k_mlp}"
    ratios = {
        main: _bwd(rows.get(("mlp", "meprop_unified"))),
        f"MLP per-example k={k_mlp}": _bwd(rows.get(("mlp", "meprop_topk"))),
        f"LSTM unified k={k_lstm}": _bwd(rows.get(("lstm", "meprop"))),
    }
    known = {k: v for k, v in ratios.items() if v is not None}
    ours = ", ".join(f"{k}: {v:.1f}x" for k, v in known.items()) or "not measured"
    out.append(
        {
            "goal": f"backward >= 10x faster than dense at k=20 (judged on {main}, the "
            "trainer's default and fastest path)",
            "ours": ours,
            "met": None if ratios[main] is None else ratios[main] >= 10.0,
        }
    )
    return out
