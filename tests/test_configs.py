"""Every YAML under configs/glue parses with run_glue.py's own parser, and the paper cells hold the paper's values.

No training and no model loading: parsing only builds the argument dataclasses (TrainingArguments included).
"""

import importlib.util
from pathlib import Path

import pytest
import yaml

from lorpa.errors import InputError
from lorpa.harness.arguments import MethodArguments, ModelArguments
from lorpa.harness.flags import parse_args
from lorpa.harness.training import plan_stages
from lorpa.options import REWINDS, SCOPES, SCORES
from lorpa.tasks.glue import GlueDataArguments

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "glue"
SMOKE = CONFIGS / "smoke.yaml"
TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")
SIZES = ("base", "large")
LORA_RANKS = (8, 128, 256)

# (per_device_train_batch_size, learning_rate, num_train_epochs, max_seq_length) per paper cell, typed
# in again from the authors' released LoRPA scripts so that a typo in one YAML file shows up here.
TASK_HPARAMS = {
    "base": {
        "cola": (32, 4e-4, 80, 512), "sst2": (16, 6e-5, 60, 512), "mrpc": (16, 4e-4, 30, 512),
        "qqp": (16, 5e-4, 25, 512), "stsb": (16, 4e-4, 40, 512), "mnli": (16, 3e-4, 30, 512),
        "qnli": (32, 4e-4, 25, 512), "rte": (32, 5e-5, 80, 512),
    },
    "large": {
        "cola": (4, 2e-4, 20, 128), "sst2": (4, 2e-5, 10, 128), "mrpc": (4, 1e-4, 20, 512),
        "qqp": (4, 3e-4, 20, 512), "stsb": (8, 3e-4, 30, 512), "mnli": (4, 4e-5, 10, 128),
        "qnli": (4, 6e-5, 10, 512), "rte": (8, 2e-4, 20, 512),
    },
}
PRUNE_KEYS = {"stage1_ratio", "prune_target_rank", "prune_ratio", "prune_score", "prune_scope", "pruned_alpha",
              "rewind"}


def _load_run_glue():
    spec = importlib.util.spec_from_file_location("run_glue", REPO / "run_glue.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RUN_GLUE = _load_run_glue()


def lorpa_path(size, task):
    return CONFIGS / f"roberta-{size}" / f"{task}.yaml"


def lora_path(size, task, rank):
    return CONFIGS / f"roberta-{size}" / f"lora_r{rank}" / f"{task}.yaml"


PAPER_CELLS = [lorpa_path(s, t) for s in SIZES for t in TASKS] + [
    lora_path(s, t, r) for s in SIZES for r in LORA_RANKS for t in TASKS
]
ALL_CONFIGS = sorted(CONFIGS.rglob("*.yaml"))
_parsed = {}


def parse(path: Path, *extra: str):
    """run_glue.py's parse: the same dataclass types and script defaults, plus the flags a caller adds."""
    argv = ["--config", str(path), "--output_dir", "/tmp/x", *extra]
    if "model_name_or_path" not in raw(path):  # a local model the caller (train.sh) passes; never loaded here
        argv += ["--model_name_or_path", "/path/to/all-MiniLM-L6-v2"]
    return parse_args(
        (ModelArguments, GlueDataArguments, MethodArguments, RUN_GLUE.TrainingArguments),
        argv,
        defaults=RUN_GLUE.TRAINING_DEFAULTS,
    )[:4]


def parsed(path: Path):
    if path not in _parsed:
        _parsed[path] = parse(path)
    return _parsed[path]


def raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def rel(path: Path) -> str:
    return str(path.relative_to(CONFIGS))


def test_every_paper_cell_has_a_config():
    missing = [rel(p) for p in PAPER_CELLS if not p.is_file()]
    assert not missing, f"missing configs: {missing}"
    assert SMOKE.is_file()
    assert len(PAPER_CELLS) == 64


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=rel)
def test_config_parses_with_run_glue_parser(path):
    model_args, data_args, method_args, training_args = parsed(path)
    assert data_args.task_name in TASKS
    assert training_args.output_dir == "/tmp/x"
    # run_glue.py checks these only after loading the model; here they fail without one.
    assert method_args.prune_score in SCORES
    assert method_args.prune_scope in SCOPES
    assert method_args.rewind in REWINDS
    # Script defaults the configs rely on instead of repeating them.
    assert training_args.eval_strategy == "epoch"
    assert training_args.logging_strategy == "epoch"


@pytest.mark.parametrize("path", [*PAPER_CELLS, SMOKE], ids=rel)
def test_config_is_commented_and_has_no_yaml_pitfalls(path):
    text = path.read_text()
    assert text.startswith("#"), "a config starts with a header comment"
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            assert "#" in line, f"value without a comment saying where it comes from: {line!r}"
    values = raw(path)
    assert "seed" not in values, "train.sh passes --seed"
    for key, value in values.items():
        # YAML 1.1 reads 4e-4 as a string and `no` as false: numbers must load as numbers.
        if key in {"learning_rate", "weight_decay", "warmup_steps", "lora_alpha", "pruned_alpha", "stage1_ratio"}:
            assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, value)
        if key == "save_strategy":
            assert isinstance(value, str), (key, value)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("task", TASKS)
def test_lorpa_cell(size, task):
    path = lorpa_path(size, task)
    model_args, data_args, method_args, training_args = parsed(path)
    batch, lr, epochs, length = TASK_HPARAMS[size][task]
    assert model_args.model_name_or_path == f"roberta-{size}"
    assert data_args.task_name == task
    assert training_args.per_device_train_batch_size == batch
    assert (isinstance(training_args.learning_rate, float)
            and training_args.learning_rate == pytest.approx(lr, rel=1e-12))
    assert training_args.num_train_epochs == epochs
    assert data_args.max_seq_length == length
    assert training_args.weight_decay == pytest.approx(0.1)
    assert training_args.get_warmup_steps(1000) == 60  # warm-up ratio 0.06

    assert method_args.method == "lorpa"
    assert (method_args.lora_r, method_args.lora_alpha) == (256, 256)
    assert method_args.prune_target_rank == 8 and method_args.prune_ratio is None  # 1 - 8/256 = 96.875% pruned
    expected_alpha = 16 if size == "large" or task == "qqp" else 8
    assert method_args.pruned_alpha == expected_alpha
    options = method_args.prune_options(seed=0)
    assert options.target_rank == 8 and options.score == "magnitude" and options.scope == "module"
    assert options.alpha == expected_alpha and options.rewind == "none"

    stage1, stage2 = plan_stages(method_args, training_args.num_train_epochs)
    assert stage1.epochs == pytest.approx(0.2 * epochs)
    assert stage1.epochs + stage2.epochs == pytest.approx(epochs)


@pytest.mark.parametrize("rank", LORA_RANKS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("task", TASKS)
def test_lora_baseline_cell(task, size, rank):
    path = lora_path(size, task, rank)
    model_args, data_args, method_args, training_args = parsed(path)
    batch, lr, epochs, length = TASK_HPARAMS[size][task]
    assert model_args.model_name_or_path == f"roberta-{size}"
    assert data_args.task_name == task
    assert method_args.method == "lora"
    assert method_args.lora_r == rank
    assert method_args.lora_alpha == (rank if size == "base" else 2 * rank)
    assert not PRUNE_KEYS & set(raw(path)), "a LoRA baseline sets no pruning keys"
    assert [s.epochs for s in plan_stages(method_args, training_args.num_train_epochs)] == [epochs]
    assert training_args.per_device_train_batch_size == batch
    assert (isinstance(training_args.learning_rate, float)
            and training_args.learning_rate == pytest.approx(lr, rel=1e-12))
    assert data_args.max_seq_length == length
    assert training_args.weight_decay == pytest.approx(0.1)
    assert training_args.get_warmup_steps(1000) == 60


def test_lora_baseline_matches_its_lorpa_cell_except_the_adapter():
    adapter_keys = {"method", "lora_r", "lora_alpha"} | PRUNE_KEYS
    for size in SIZES:
        for task in TASKS:
            lorpa = {k: v for k, v in raw(lorpa_path(size, task)).items() if k not in adapter_keys}
            for rank in LORA_RANKS:
                lora = {k: v for k, v in raw(lora_path(size, task, rank)).items() if k not in adapter_keys}
                assert lora == lorpa, (size, task, rank)


def test_flags_override_the_config():
    path = lorpa_path("base", "cola")
    _, _, method_args, training_args = parse(path, "--learning_rate", "1e-3", "--seed", "3", "--pruned_alpha", "4")
    assert training_args.learning_rate == pytest.approx(1e-3)
    assert training_args.seed == 3
    assert method_args.pruned_alpha == 4


def test_a_single_value_for_a_list_flag_reads_as_the_flag_gives_it(tmp_path):
    config = tmp_path / "one.yaml"
    config.write_text(lorpa_path("base", "rte").read_text() + "lora_target_modules: all-linear  # one value\n")
    from_yaml = parse(config)[2].lora_target_modules
    assert from_yaml == parse(lorpa_path("base", "rte"), "--lora_target_modules", "all-linear")[2].lora_target_modules
    assert from_yaml == ["all-linear"]


def test_unknown_key_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(lorpa_path("base", "rte").read_text() + "warmup_ratio: 0.06  # not a transformers 5 flag\n")
    with pytest.raises(InputError, match="warmup_ratio"):
        parse(bad)


def test_smoke_config():
    values = raw(SMOKE)
    assert "model_name_or_path" not in values, "the caller passes the machine's local model folder"
    model_args, data_args, method_args, training_args = parsed(SMOKE)
    assert method_args.method == "lorpa"
    assert method_args.lora_r == 32 and method_args.prune_target_rank == 4
    assert method_args.modules_to_save == ["pooler"]
    assert training_args.save_strategy == "no"
    assert [s.epochs for s in plan_stages(method_args, training_args.num_train_epochs)] == [1, 4]
    assert data_args.max_train_samples and data_args.max_eval_samples
    assert values["output_dir"].startswith("runs/")
    for key in ("train_file", "validation_file"):
        # generated by `python -m lorpa.tasks.demo_data runs/smoke-data`
        assert values[key].startswith("runs/smoke-data/")
    assert "python -m lorpa.tasks.demo_data runs/smoke-data" in SMOKE.read_text()


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: str(p.relative_to(REPO)))
def test_no_config_needs_data_outside_the_project(path):
    """../shared/data exists only beside development checkouts; users get the hub, generated data or --data_dir."""
    assert "shared/data" not in path.read_text()


def test_smoke_configs_run_on_generated_data(tmp_path):
    from lorpa.tasks.demo_data import main as write_generated
    from lorpa.tasks.glue import load_glue

    write_generated([str(tmp_path / "runs/smoke-data"), "--n_train", "40", "--n_validation", "10"])
    _, data_args, _, _ = parse(SMOKE, "--train_file", str(tmp_path / raw(SMOKE)["train_file"]),
                               "--validation_file", str(tmp_path / raw(SMOKE)["validation_file"]))
    splits = load_glue(data_args)
    assert len(splits["train"]) == 40 and set(splits["train"]["label"]) == {0, 1}


SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.mark.parametrize("path", sorted((CONFIGS / "minilm").rglob("*.yaml")), ids=rel)
def test_minilm_configs_read_the_hub_or_local_copies_given_by_data_dir(path):
    _, data_args, _, _ = parsed(path)
    assert data_args.train_file is None and data_args.data_dir is None  # the hub by default
    if not SHARED_DATA.is_dir():
        pytest.skip("no local GLUE copies beside this checkout")
    from lorpa.tasks.glue import load_glue

    _, data_args, _, _ = parse(path, "--data_dir", str(SHARED_DATA))
    splits = load_glue(data_args)
    assert len(splits["train"]) == data_args.max_train_samples == 1000
    assert len(splits["validation"]) == {"sst2": 872, "stsb": 1500}[data_args.task_name]
