"""The forgetting experiment's pipeline end to end at --quick sizes: well-formed, finite results (never the
accuracies themselves: at these sizes they mean nothing)."""
import json
import math
import os

from wings_jax.experiments.forgetting import ARMS, MEASURES, main


def _fraction(x):
    return isinstance(x, float) and math.isfinite(x) and 0.0 <= x <= 1.0


def test_quick_run_gives_well_formed_results(tmp_path, capsys):
    out = str(tmp_path / "exp")
    assert main(["--out", out, "--quick", "--seeds", "1", "--text-fraction", "0.25"]) == 0
    results = json.loads(open(os.path.join(out, "results.json")).read())
    assert sorted(results["arms"]) == sorted(ARMS) and results["text_fraction"] == 0.25
    steps = results["settings"]["stage2_steps"]
    for arm in ARMS:
        summary = results["arms"][arm]
        assert all(_fraction(summary[k]) and _fraction(summary["spread"][k]) for k in MEASURES)
        [seed] = summary["seeds"]
        assert seed["seed"] == 0 and all(_fraction(seed[k]) for k in MEASURES)
        for when in ("before", "after"):
            shift = seed["attention"][when]
            assert _fraction(shift["pre_text"]) and _fraction(shift["image"]) and shift["pre_text"] + shift["image"] <= 1
            assert len(shift["per_layer"]["image"]) == results["settings"]["llm"]["num_layers"]
        [curve] = results["curves"]["0.25"][arm]
        assert curve[0]["step"] == 0 and curve[-1]["step"] == steps and all(_fraction(p["text"]) for p in curve)
    assert _fraction(results["text_model"]["text_accuracy"]) and results["wall_time_s"] > 0
    with open(os.path.join(out, "text_accuracy.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert all(arm in printed for arm in ARMS) and "text before" in printed
    # finished runs are reused, so an output directory of other settings is refused
    assert main(["--out", out, "--quick", "--seeds", "1", "--lora-rank", "4"]) == 2
    assert "choose a new --out" in capsys.readouterr().err
