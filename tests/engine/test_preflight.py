"""A run is checked whole before any model loads or anything is written; old run folders still resume."""

import json
import time
from pathlib import Path

import pytest
import yaml

from selfee_fast.config import ConfigError, load_config, to_dict
from selfee_fast.demo.tiny import build_tiny_llama, build_tokenizer
from selfee_fast.pipeline import run_pipeline
from selfee_fast.preflight import preflight
from selfee_fast.stages import parse_stage, stage_fingerprints, stage_record

RELEASE_PRINTS = Path(__file__).parent / "data" / "fingerprints_release_0_1.json"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A run laid out with relative paths, as the recorded release fingerprints name them."""
    root = tmp_path_factory.mktemp("preflight")
    words = "the cat dog sat ran on a mat log".split()
    tokenizer = build_tokenizer([" ".join(words)] * 20, root / "models" / "pi_init", vocab_size=120)
    build_tiny_llama(root / "models" / "pi_init", tokenizer, hidden_size=16, layers=1)
    (root / "data").mkdir()
    pair = {"prompt": "the cat", "chosen": "sat", "rejected": "ran on a log"}
    (root / "data" / "seed.jsonl").write_text("".join(json.dumps(pair) + "\n" for _ in range(4)))
    for k in (1, 2, 3):
        (root / "data" / f"pool{k}.jsonl").write_text(json.dumps({"prompt": f"the dog {k}"}) + "\n")
    return root


def overrides(variant: str) -> list[str]:
    return json.loads(RELEASE_PRINTS.read_text())[variant]["overrides"]


def test_fingerprints_equal_those_of_the_previous_release():
    """Run folders made before the settings refactor resume without --force: every stage's print is unchanged."""
    recorded = json.loads(RELEASE_PRINTS.read_text())
    assert len(recorded) >= 8
    for variant, entry in recorded.items():
        config = load_config(None, entry["overrides"])
        if config.train.lr is None and config.model.lora_r > 0:
            # LoRA's default learning rate changed from the paper's 5e-7 to 5e-6: a run begun with the
            # old default is continued by saying so (its refusal says how).
            config = load_config(None, [*entry["overrides"], "train.lr=5e-7"])
            assert stage_fingerprints(load_config(None, entry["overrides"])) != entry["fingerprints"], variant
        assert stage_fingerprints(config) == entry["fingerprints"], variant


def test_a_finished_run_folder_of_the_previous_release_is_skipped_whole(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    config = load_config(None, overrides("demo_like"))
    prints = json.loads(RELEASE_PRINTS.read_text())["demo_like"]["fingerprints"]
    for stage, fingerprint in prints.items():  # the files the release wrote: a fingerprint, no settings
        (workspace / "run" / stage / "model").mkdir(parents=True)  # a release's model folder: no manifest
        (workspace / "run" / stage / "started.json").write_text(json.dumps({"fingerprint": fingerprint}))
        (workspace / "run" / stage / "done.json").write_text(json.dumps({"fingerprint": fingerprint, "pairs": 1}))
    messages = []
    summary = run_pipeline(config, log=messages.append)
    assert messages == [f"{s}: finished earlier, skipped" for s in ("stage0", "iter1", "iter2", "iter3")]
    assert summary["stages"]["iter3"]["pairs"] == 1
    # A changed setting is refused; the release's record cannot say which setting it was.
    changed = load_config(None, [*overrides("demo_like"), "train.beta=0.2"])
    with pytest.raises(ConfigError, match=r"stage0 was started with another configuration .*holds only a fingerprint"):
        run_pipeline(changed, log=messages.append)


def test_a_lora_run_begun_at_the_earlier_default_learning_rate_resumes_without_force(workspace, monkeypatch):
    """paper_defaults is LoRA at the default train.lr, which was 5e-7 then and is 5e-6 now."""
    monkeypatch.chdir(workspace)
    entry = json.loads(RELEASE_PRINTS.read_text())["paper_defaults"]
    config = load_config(None, [*entry["overrides"], "run_dir=paper"])
    for stage, fingerprint in entry["fingerprints"].items():
        (workspace / "paper" / stage / "model").mkdir(parents=True)
        (workspace / "paper" / stage / "started.json").write_text(json.dumps({"fingerprint": fingerprint}))
        (workspace / "paper" / stage / "done.json").write_text(json.dumps({"fingerprint": fingerprint}))
    messages = []
    run_pipeline(config, log=messages.append)
    assert "begun by an earlier release at its default train.lr=5e-07" in messages[0]
    assert messages[-4:] == [f"{s}: finished earlier, skipped" for s in ("stage0", "iter1", "iter2", "iter3")]


def test_a_refusal_names_the_settings_that_changed(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    config = load_config(None, [*overrides("demo_like"), "run_dir=named"])
    stage = parse_stage(config, "iter2")
    (workspace / "named" / "iter2").mkdir(parents=True)
    (workspace / "named" / "iter2" / "started.json").write_text(json.dumps(stage_record(config, stage)))
    changed = load_config(None, [*overrides("demo_like"), "run_dir=named", "generation.top_p=0.9", "train.lr=1e-3"])
    with pytest.raises(ConfigError) as refused:
        run_pipeline(changed, log=lambda *_: None)
    message = str(refused.value)
    assert "iter2 was started with another configuration" in message
    assert "generation.top_p (iter1): 'default' -> 0.9" in message and "train.lr (stage0): 0.0005 -> 0.001" in message


def config_with(workspace: Path, *extra: str):
    return load_config(None, [*overrides("demo_like"), f"run_dir={workspace / 'refused'}", *extra])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["train.beta=-0.1"], r"train\.beta must be > 0"),
        (["spa.alpha=0.7"], r"spa\.alpha must be in \[0, 0\.5\)"),
        (["spa.extrapolate=[-1]"], r"spa\.extrapolate\[0\]"),
        (["spa.tau_window=1"], r"spa\.tau_window must be >= 2"),
        (["spa.noise_percentile=1.5"], r"spa\.noise_percentile must be in \(0, 1\)"),
        (["data.seed_pairs=data/missing.jsonl"], r"data\.seed_pairs: data file data/missing\.jsonl does not exist"),
        (["model.path=models/none"], r"model\.path: model directory models/none does not exist"),
        (["data.prompt_pools=[data/pool1.jsonl, data/empty.jsonl, data/pool3.jsonl]"],
         r"data\.prompt_pools\[1\]: data/empty\.jsonl holds no usable prompts"),
        (["data.prompt_pools=[data/pool1.jsonl, data/latin1.jsonl, data/pool3.jsonl]"],
         r"data\.prompt_pools\[1\]: data/latin1\.jsonl:2: not UTF-8 text"),
    ],
)  # fmt: skip
def test_a_bad_run_is_refused_in_seconds_with_nothing_written(workspace, monkeypatch, extra, message):
    monkeypatch.chdir(workspace)
    (workspace / "data" / "empty.jsonl").write_text("\n")
    (workspace / "data" / "latin1.jsonl").write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=message):
        run_pipeline(config_with(workspace, *extra), log=lambda *_: None)
    assert time.perf_counter() - started < 10
    assert not (workspace / "refused").exists(), "nothing written to the run folder"


def test_skip_invalid_counts_an_undecodable_line_instead(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    (workspace / "data" / "latin1.jsonl").write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    pools = "data.prompt_pools=[data/pool1.jsonl, data/latin1.jsonl, data/pool3.jsonl]"
    preflight(config_with(workspace, pools, "data.skip_invalid=true"))


def test_a_prompt_the_chat_template_cannot_render_is_named_before_anything_loads(workspace, monkeypatch, tmp_path):
    import shutil

    monkeypatch.chdir(workspace)
    model = tmp_path / "raising_template"
    shutil.copytree(workspace / "models" / "pi_init", model)
    settings = json.loads((model / "tokenizer_config.json").read_text())
    settings["chat_template"] = (
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m.content }}{% endfor %}"
    )
    (model / "tokenizer_config.json").write_text(json.dumps(settings))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config = config_with(workspace, f"model.path={model}", "data.system_prompt=''")
    with pytest.raises(
        ConfigError, match=r"data\.seed_pairs: data/seed\.jsonl:1: the chat template cannot render .*System role"
    ):
        run_pipeline(config, log=lambda *_: None)
    assert not (workspace / "refused").exists()


def as_yaml(items: list[str]) -> str:
    """The overrides of a release variant written as the config file a user would keep."""
    sections: dict = {}
    for item in items:
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        target = sections
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = yaml.safe_load(value)
    return yaml.safe_dump(sections)


def test_a_config_files_relative_paths_are_read_from_its_folder(workspace, tmp_path, monkeypatch):
    """From any working directory the file's data is found, and fingerprints stay those of the paths as written."""
    (workspace / "demo_like.yaml").write_text(as_yaml(overrides("demo_like")))
    monkeypatch.chdir(tmp_path)
    config = load_config(workspace / "demo_like.yaml")
    assert Path(config.model.path) == workspace / "models" / "pi_init"
    assert Path(config.run_dir) == workspace / "run"
    assert [Path(p) for p in config.data.prompt_pools] == [workspace / "data" / f"pool{k}.jsonl" for k in (1, 2, 3)]
    preflight(config)
    recorded = json.loads(RELEASE_PRINTS.read_text())["demo_like"]["fingerprints"]
    assert stage_fingerprints(config) == recorded
    # The run folder's saved config (resolved paths, what was written beside them) keeps them too.
    (tmp_path / "saved.yaml").write_text(yaml.safe_dump(to_dict(config)))
    assert stage_fingerprints(load_config(tmp_path / "saved.yaml")) == recorded
    # On the command line a path is read from the working directory, as typed.
    moved = load_config(workspace / "demo_like.yaml", ["data.seed_pairs=data/seed.jsonl"])
    assert moved.data.seed_pairs == "data/seed.jsonl" and stage_fingerprints(moved) == recorded
    with pytest.raises(ConfigError, match=r"data\.seed_pairs: data file data/seed\.jsonl does not exist"):
        preflight(moved)
