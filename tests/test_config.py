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
    # QLoRA recipes: the base is also scored on the 4-bit weights they train on (their baseline)
    assert paper.conditions == ["base", "base-4bit", "votes", "soft", "trained"]
    assert paper.baseline_of("votes") == paper.baseline_of("soft") == "base-4bit"
    assert paper.seeds_of("zephyr-7b-beta", "soft") == paper.seeds_of("roberta-large", "trained") == [0, 1, 2]
    assert paper.seeds_of("zephyr-7b-beta", "base-4bit") == paper.seeds_of("gpt-4o", "base") == [None]
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


def test_seeds_and_base_weights_decide_the_cells():
    raw = _raw()
    raw["finetune"]["seeds"] = [0, 3]
    cfg = validate(raw)
    cells = [c for c in cfg.cells() if c[0] == "dilemmas" and c[1] == "tiny-llama"]
    # one cell per seed of each recipe; the base is untrained (seed None) and on the same fp32 weights (no 4-bit)
    assert cells == [
        ("dilemmas", "tiny-llama", "base", None),
        ("dilemmas", "tiny-llama", "votes", 0),
        ("dilemmas", "tiny-llama", "votes", 3),
        ("dilemmas", "tiny-llama", "soft", 0),
        ("dilemmas", "tiny-llama", "soft", 3),
    ]
    assert cfg.comparisons() == [("votes", "base"), ("soft", "base"), ("soft", "votes")]
    assert ("dilemmas", "tiny-bert", "trained", 0) in cfg.cells()
    # a recipe on a 4-bit base brings the base-4bit condition, its baseline
    raw["recipes"]["soft"]["quantization"] = "4bit"
    raw["finetune"]["device"] = "auto"
    cfg = validate(raw)
    assert cfg.conditions_of("tiny-llama") == ["base", "base-4bit", "votes", "soft"]
    assert cfg.comparisons()[:2] == [("votes", "base"), ("soft", "base-4bit")]


def test_four_bit_on_a_cpu_is_refused_with_the_fallback():
    raw = _raw()
    raw["finetune"]["quantization"] = "4bit"  # the demo pins finetune.device: cpu
    with pytest.raises(ConfigError, match=r"4-bit weights need CUDA; set finetune.quantization: none"):
        validate(raw)


@pytest.mark.parametrize("seeds", [[], [0, 0], ["a"]])
def test_seeds_are_a_non_empty_list_of_distinct_integers(seeds):
    raw = _raw()
    raw["finetune"]["seeds"] = seeds
    with pytest.raises(ConfigError, match=r"finetune\.seeds"):
        validate(raw)
