import pytest
import yaml

from moralign.config import ConfigError, load_config, lookup, merge, validate
from tests.conftest import ROOT


def test_paper_and_demo_configs_validate():
    paper = load_config(ROOT / "params.yaml")
    assert paper.models == [
        "llama-3.1-8b-instruct",
        "zephyr-7b-beta",
        "mistral-7b-instruct-v0.3",
        "gpt-4o",
        "bert-large-uncased",
        "roberta-large",
    ]
    assert paper.model("mistral-7b-instruct-v0.3")["hf_id"] == "mistralai/Mistral-7B-Instruct-v0.3"
    assert paper.conditions == ["base", "votes", "soft", "trained"]
    demo = load_config(ROOT / "config/demo.yaml")
    assert demo.run == "demo" and demo["data"]["source"] == "sample"


def test_demo_overlay_replaces_what_runs():
    merged = load_config([ROOT / "params.yaml", ROOT / "config/demo.yaml"])
    demo = load_config(ROOT / "config/demo.yaml")
    # lists replace on merge: the paper's models are defined but not planned
    assert merged.models == demo.models == ["tiny-llama", "tiny-mistral", "tiny-bert", "tiny-roberta"]
    assert merged.run == "demo"
    for key in ("experiment", "prompts", "extract", "finetune", "encoder", "score", "data"):
        assert merged[key] == demo[key], key


def _raw():
    return yaml.safe_load((ROOT / "config/demo.yaml").read_text())


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("extract", "token_budgte"), 10, "token_budgte"),
        (("finetune", "learning_rate"), "fast", "finetune.learning_rate"),
        (("extract", "debias"), "flip", "extract.debias"),
        (("models", "tiny-llama", "bild"), {}, "bild"),
    ],
)
def test_bad_keys_fail_by_name(path, value, expected):
    raw = _raw()
    node = raw
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    with pytest.raises(ConfigError, match=expected):
        validate(raw, "demo.yaml")


def test_cross_field_errors_name_the_fix():
    raw = _raw()
    raw["experiment"]["models"].append("gpt-5")
    with pytest.raises(ConfigError, match=r"experiment.models names .gpt-5.*add models.gpt-5"):
        validate(raw)
    raw = _raw()
    raw["experiment"]["recipes"] = ["dpo"]
    with pytest.raises(ConfigError, match=r"recipes\.dpo"):
        validate(raw)
    raw = _raw()
    raw["models"]["tiny-llama"]["hf_id"] = "x/y"
    with pytest.raises(ConfigError, match="exactly one of 'hf_id'"):
        validate(raw)


def test_merge_is_snakemakes():
    assert merge({"a": {"b": 1, "c": [1, 2]}, "d": 1}, {"a": {"c": [3]}, "e": 2}) == {
        "a": {"b": 1, "c": [3]},
        "d": 1,
        "e": 2,
    }


def test_recipe_overrides_shared_hyperparameters():
    raw = _raw()
    raw["recipes"]["soft"]["learning_rate"] = 0.5
    cfg = validate(raw)
    assert cfg.finetune("soft")["learning_rate"] == 0.5
    assert cfg.finetune("votes")["learning_rate"] == raw["finetune"]["learning_rate"]


def test_lookup_keeps_dotted_names_whole():
    cfg = load_config(ROOT / "params.yaml")
    assert lookup(cfg.data, "models.llama-3.1-8b-instruct.hf_id") == "meta-llama/Llama-3.1-8B-Instruct"
    assert cfg.section_hash("models.zephyr-7b-beta") != cfg.section_hash("models.llama-3.1-8b-instruct")
