"""A shortened `selfee-fast demo`: the table is produced, finite, and judged against gold."""

import json
import math

import pytest

from selfee_fast.demo import QUICK, run_demo
from selfee_fast.demo.run import DemoSettingsError
from selfee_fast.demo.tasks import load_task

pytestmark = pytest.mark.usefixtures("chunked_backend")

TINY = QUICK.__class__(
    **{**QUICK.__dict__, "demonstrations": 300, "sft_steps": 40, "pool": 128, "iteration_prompts": (32, 32)}
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, scale=TINY, log=lambda *_: None)


def test_table_has_every_model_with_finite_values(demo):
    out, result = demo
    rows = result["rows"]
    assert [r["model"] for r in rows] == ["pi_init", "pi_0", "pi_1", "pi_2"]
    for r in rows:
        for key in ("gold_reward", "win_rate_vs_init", "response_tokens"):
            assert math.isfinite(r[key]), (r["model"], key)
        assert 0.0 <= r["gold_reward"] <= 1.0 and 0.0 <= r["win_rate_vs_init"] <= 1.0
    assert rows[0]["win_rate_vs_init"] == 0.5  # pi_init against itself
    for r in rows[2:]:
        assert r["label_accuracy"] is not None and 0.0 <= r["label_accuracy"] <= 1.0
        assert r["label_accuracy"] + r["wrong_label_rate"] == pytest.approx(1.0)
    assert "label acc" in result["table"] and (out / "demo.png").stat().st_size > 0
    assert json.loads((out / "results.json").read_text())["rows"] == rows


def test_label_accuracy_is_measured_against_gold_not_the_models_own_labels(demo):
    out, result = demo
    task = load_task(result["task"])
    for i, row in enumerate(result["rows"][2:], start=1):
        pairs = [json.loads(line) for line in (out / "run" / f"iter{i}" / "pairs.jsonl").read_text().splitlines()]
        # By its own implicit reward the model always prefers its chosen response...
        assert all(p["chosen_score"] >= p["rejected_score"] for p in pairs)
        # ...so accuracy must come from the hidden gold reward, recomputed here independently.
        decided = []
        for p in pairs:
            prompt = p["prompt"][-1]["content"]
            chosen, rejected = (
                task.gold(prompt, p["chosen"][-1]["content"]),
                task.gold(prompt, p["rejected"][-1]["content"]),
            )
            if chosen != rejected:
                decided.append(chosen > rejected)
        assert decided, "no pair with a gold preference: the test task is too easy or too hard"
        assert row["label_accuracy"] == pytest.approx(sum(decided) / len(decided))
        assert row["tied_pairs"] == len(pairs) - len(decided)


def test_rerun_resumes_without_redoing_work(demo):
    out, result = demo
    stamp = (out / "pi_init" / "sft.json").stat().st_mtime_ns
    again = run_demo(out, scale=TINY, log=lambda *_: None)
    assert (out / "pi_init" / "sft.json").stat().st_mtime_ns == stamp
    assert again["rows"] == result["rows"]


def test_other_settings_in_the_same_folder_are_refused(demo):
    out, _ = demo
    with pytest.raises(DemoSettingsError, match=r"holds a demo made with other settings.*use another --out"):
        run_demo(out, scale=TINY.__class__(**{**TINY.__dict__, "lr": 1e-5}), log=lambda *_: None)
