"""run_summarization.py end to end on a tiny BART (and a tiny BERT2BERT) and synthetic articles."""

import json
import random
import sys
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset, DatasetDict
from peft import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    BertConfig,
    EncoderDecoderConfig,
    EncoderDecoderModel,
    GenerationConfig,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
)

import run_summarization
from lorpa.errors import InputError
from lorpa.harness.arguments import MethodArguments, ModelArguments
from lorpa.harness.flags import parse_args
from lorpa.layers import lora_layers
from lorpa.options import PruneOptions
from lorpa.pruning import check_prune
from lorpa.tasks.generation import MergedGenerationTrainer, merged_adapters
from lorpa.tasks.summarization import (
    SummarizationDataArguments,
    decode,
    load_summarization,
    summary_collator,
    tokenize_summaries,
)

import processes
from conftest import assert_one_line_failure
from tiny_assets import WORDS, sentence, write_jsonl, write_tiny_bart, write_tokenizer

RESULT_KEYS = {
    "task", "model", "method", "seed", "metrics", "best_metrics", "trainable_params", "ranks", "stage1_ranks",
    "config", "train_runtime_s",
}
ROUGE_KEYS = {"rouge1", "rouge2", "rougeL", "rougeLsum"}
N_EVAL = 6
MAX_TARGET = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Tiny BART that always generates words: a random BART emits </s> (or other special tokens) first."""
    folder = write_tiny_bart(tmp_path_factory.mktemp("tiny-bart"))
    generation = GenerationConfig.from_pretrained(folder)
    generation.min_length = 6
    generation.suppress_tokens = [0, 1, 3, 4]  # <s> <pad> <unk> <mask>
    generation.save_pretrained(folder)
    return folder


def article_rows(n, seed):
    """Three-sentence articles whose summary is their first sentence."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        sentences = [sentence(rng, rng.randint(4, 8)) + "." for _ in range(3)]
        rows.append({"document": " ".join(sentences), "summary": sentences[0]})
    return rows


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return {
        "train_file": write_jsonl(folder / "train.jsonl", article_rows(24, 0)),
        "validation_file": write_jsonl(folder / "validation.jsonl", article_rows(N_EVAL, 1)),
    }


def argv_for(model_dir, output_dir, files, *extra):
    argv = ["--model_name_or_path", str(model_dir), "--output_dir", str(output_dir)]
    for flag, path in files.items():
        argv += [f"--{flag}", str(path)]
    return argv + [
        "--num_train_epochs", "2", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
        "--learning_rate", "1e-3", "--lora_r", "8", "--lora_alpha", "16", "--prune_target_rank", "2",
        "--max_source_length", "64", "--max_target_length", str(MAX_TARGET), "--report_to", "none",
        "--save_strategy", "no", "--disable_tqdm", "true", *extra,
    ]


def read_results(output_dir):
    return json.loads((output_dir / "results.json").read_text())


def read_predictions(output_dir, name="generated_predictions.txt"):
    return (output_dir / name).read_text().split("\n")[:-1]


@pytest.mark.parametrize("method", ["lorpa", "lora", "full", "adalora"])
def test_every_method_runs_end_to_end(model_dir, data_files, tmp_path, method):
    output_dir = tmp_path / "out"
    extra = ["--method", method, "--stage1_ratio", "0.5"]
    if method == "adalora":
        extra += ["--adalora_target_r", "4"]
    files = dict(data_files)
    if method == "lora":
        files["test_file"] = write_jsonl(tmp_path / "test.jsonl", article_rows(3, 2))
    run_summarization.main(argv_for(model_dir, output_dir, files, *extra))

    results = read_results(output_dir)
    assert RESULT_KEYS <= set(results)
    assert results["task"] == "local" and results["method"] == method and results["main_metric"] == "rouge2"
    assert ROUGE_KEYS <= set(results["metrics"]) and ROUGE_KEYS <= set(results["best_metrics"])
    predictions = read_predictions(output_dir)
    assert len(predictions) == N_EVAL
    tokens = " ".join(predictions).split()
    assert tokens and set(tokens) <= set(WORDS) | set(".,!?")  # decoded text, not token ids
    if method == "lorpa":
        assert set(results["stage1_ranks"].values()) == {8} and set(results["ranks"].values()) == {2}
    if method == "lora":
        assert len(read_predictions(output_dir, "test_generated_predictions.txt")) == 3
        assert ROUGE_KEYS <= {key[5:] for key in json.loads((output_dir / "test_results.json").read_text())}


def test_labels_are_padded_with_minus_100(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = SummarizationDataArguments(train_file="unused", validation_file="unused", max_target_length=MAX_TARGET)
    splits = {"train": [{"document": "good movie . bad food", "summary": "good"},
                        {"document": "slow", "summary": "bad plot and cheap rude staff"}]}
    encoded = tokenize_summaries(DatasetDict({k: Dataset.from_list(v) for k, v in splits.items()}), tokenizer, args)
    features = list(encoded["train"])
    assert len(features[0]["labels"]) < len(features[1]["labels"])  # unpadded after tokenisation
    batch = summary_collator(tokenizer)(features)
    short = len(features[0]["labels"])
    assert (batch["labels"][0, short:] == -100).all() and (batch["labels"][0, :short] >= 0).all()
    assert not (batch["labels"] == tokenizer.pad_token_id).any()
    assert (batch["input_ids"][1, 3:] == tokenizer.pad_token_id).all()


def test_cross_attention_is_pruned_and_the_saved_adapter_reproduces_the_summaries(model_dir, data_files, tmp_path):
    output_dir = tmp_path / "out"
    run_summarization.main(argv_for(model_dir, output_dir, data_files))
    results = read_results(output_dir)
    kinds = {kind: [n for n in results["ranks"] if f".{kind}." in n] for kind in ("self_attn", "encoder_attn")}
    assert {name.split(".layers.")[0].split(".")[-1] for name in kinds["self_attn"]} == {"encoder", "decoder"}
    assert kinds["encoder_attn"] and all(results["stage1_ranks"][n] == 8 for n in kinds["encoder_attn"])

    reloaded = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(model_dir), output_dir).eval()
    ranks = {name: layer.r["default"] for name, layer in lora_layers(reloaded).items()}
    assert ranks == results["ranks"] and set(ranks.values()) == {2}
    assert all(ranks[n] == 2 for n in kinds["encoder_attn"])  # cross-attention adapters pruned as well

    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    args = SummarizationDataArguments(**data_files, max_source_length=64, max_target_length=MAX_TARGET)
    validation = tokenize_summaries(load_summarization(args), tokenizer, args)["validation"]
    batch = summary_collator(tokenizer)(list(validation))  # one batch, padded as in the evaluation
    with torch.no_grad():
        generated = reloaded.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_length=MAX_TARGET
        )
    assert decode(tokenizer, generated) == read_predictions(output_dir)


def random_adapter(model_dir, kind):
    """A peft model whose adapters all change the output (B and E are zero at peft's init)."""
    base = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    if kind == "adalora":
        config = AdaLoraConfig(task_type="SEQ_2_SEQ_LM", init_r=4, target_r=2, total_step=10)
    else:
        config = LoraConfig(task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=8, init_lora_weights=False)
    model = get_peft_model(base, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.5)
    return model.eval()


@pytest.mark.parametrize("kind", ["lora", "adalora"])
def test_merged_evaluation_generates_the_same_text_and_unmerges(model_dir, data_files, tmp_path, kind):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = SummarizationDataArguments(**data_files, max_source_length=64, max_target_length=MAX_TARGET)
    validation = tokenize_summaries(load_summarization(args), tokenizer, args)["validation"]
    model = random_adapter(model_dir, kind)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    layers = [m for m in model.modules() if hasattr(m, "merged_adapters")]
    seen_merged = []
    layers[0].register_forward_pre_hook(lambda module, inputs: seen_merged.append(module.merged))

    texts = {}
    for name, trainer_class in (("merged", MergedGenerationTrainer), ("unmerged", Seq2SeqTrainer)):
        training_args = Seq2SeqTrainingArguments(
            output_dir=str(tmp_path / name), predict_with_generate=True, generation_max_length=MAX_TARGET,
            per_device_eval_batch_size=8, report_to="none", disable_tqdm=True,
        )
        trainer = trainer_class(
            model=model, args=training_args, processing_class=tokenizer, data_collator=summary_collator(tokenizer)
        )
        texts[name] = decode(tokenizer, trainer.predict(validation).predictions)
        seen_merged.append(name)

    assert texts["merged"] == texts["unmerged"] and any(texts["merged"])
    boundary = seen_merged.index("merged")
    merged_run, unmerged_run = seen_merged[:boundary], seen_merged[boundary + 1 : -1]
    assert merged_run and all(merged_run)  # every forward of the merged evaluation ran on merged weights
    assert unmerged_run and not any(unmerged_run)
    assert not any(layer.merged for layer in layers)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if "base_layer" in n)
    if kind == "lora":
        check_prune(model, PruneOptions(target_rank=2))  # refuses merged adapters


def test_merging_leaves_full_models_alone(model_dir):
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with merged_adapters(model):
        pass
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_generation_config_reaches_the_wrapped_model(model_dir, tmp_path):
    GenerationConfig(min_length=9, decoder_start_token_id=2, eos_token_id=2).save_pretrained(tmp_path / "gen")
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path / "out"), generation_config=str(tmp_path / "gen"))
    trainer = MergedGenerationTrainer(model=random_adapter(model_dir, "lora"), args=args)
    assert trainer.model.get_base_model().generation_config.min_length == 9


@pytest.fixture(scope="module")
def bert2bert_dir(tmp_path_factory):
    """A tiny encoder-decoder of BERTs: a model type peft has no default target modules for."""
    folder = tmp_path_factory.mktemp("tiny-bert2bert")
    tokenizer = write_tokenizer(folder)
    sizes = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=48, max_position_embeddings=80, pad_token_id=tokenizer.pad_token_id)
    config = EncoderDecoderConfig.from_encoder_decoder_configs(BertConfig(**sizes), BertConfig(**sizes))
    config.decoder_start_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    EncoderDecoderModel(config).save_pretrained(folder)
    return folder


def test_encoder_decoder_prunes_named_targets_including_cross_attention(bert2bert_dir, data_files, tmp_path):
    output_dir = tmp_path / "out"
    run_summarization.main(argv_for(bert2bert_dir, output_dir, data_files, "--lora_target_modules", "query", "value"))
    ranks = read_results(output_dir)["ranks"]
    assert any("crossattention" in name for name in ranks) and set(ranks.values()) == {2}


BAD_ROWS = {
    "missing column": ([{"document": "good movie", "highlights": "good"}], "no column 'summary'"),
    "null cell": ([{"document": "good", "summary": "good"}, {"document": None, "summary": "bad"}],
                  "row 2 has no value for 'document'"),
    "empty file": ([], "file is empty"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_file_fails_in_one_line_and_keeps_earlier_output(model_dir, data_files, tmp_path, capsys,
                                                              earlier_output, case):
    rows, expected = BAD_ROWS[case]
    files = dict(data_files, train_file=write_jsonl(tmp_path / "bad.jsonl", rows))
    argv = argv_for(model_dir, earlier_output, files, "--overwrite_output_dir", "true")
    assert_one_line_failure(run_summarization.main, argv, f"{files['train_file']}: {expected}", capsys, earlier_output)


BAD_FLAGS = {
    "target length 0": (["--max_target_length", "0"], "--max_target_length must be positive, got 0"),
    "unknown dataset": (["--dataset_name", "gigaword"], "unknown dataset 'gigaword'"),
    "source beyond positions": (["--max_source_length", "100"], "--max_source_length 100 exceeds the model's 80"),
    "teacher forcing": (["--predict_with_generate", "false"], "--predict_with_generate must stay true"),
    "nothing to predict": (["--do_predict", "true"], "--do_predict with local data needs --test_file"),
    "no epochs": (["--num_train_epochs", "0"], "--num_train_epochs must be positive"),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_flag_fails_in_one_line_and_keeps_earlier_output(model_dir, data_files, tmp_path, capsys,
                                                              earlier_output, case):
    flags, expected = BAD_FLAGS[case]
    argv = argv_for(model_dir, earlier_output, data_files, "--overwrite_output_dir", "true", *flags)
    assert_one_line_failure(run_summarization.main, argv, expected, capsys, earlier_output)


def test_only_one_local_file_is_refused(model_dir, data_files, capsys, earlier_output):
    files = {"train_file": data_files["train_file"]}
    argv = argv_for(model_dir, earlier_output, files, "--overwrite_output_dir", "true")
    assert_one_line_failure(run_summarization.main, argv, "both --train_file and --validation_file", capsys,
                            earlier_output)


def test_missing_target_modules_are_asked_for(bert2bert_dir, data_files, capsys, earlier_output):
    argv = argv_for(bert2bert_dir, earlier_output, data_files, "--overwrite_output_dir", "true")
    assert_one_line_failure(run_summarization.main, argv, "no default target modules for model type 'encoder-decoder'",
                            capsys, earlier_output)


CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "summarization"
CONFIGS = sorted(CONFIG_DIR.rglob("*.yaml"))
PAPER_DATA = {"cnn_dailymail": (1024, 128), "xsum": (960, 64)}  # max source / target tokens
ADAPTER_KEYS = {"method", "lora_r", "lora_alpha", "stage1_ratio", "prune_target_rank", "pruned_alpha", "output_dir"}


def parse_config(path):
    dataclass_types = (ModelArguments, SummarizationDataArguments, MethodArguments, Seq2SeqTrainingArguments)
    return parse_args(dataclass_types, ["--config", str(path)])[:4]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: str(path.relative_to(CONFIG_DIR)))
def test_config_parses_and_says_where_each_value_comes_from(config):
    _, _, method_args, training_args = parse_config(config)
    assert training_args.output_dir and method_args.method in ("lorpa", "lora")
    text = config.read_text()
    assert text.startswith("#")
    for line in text.splitlines():
        assert not line.strip() or "#" in line, f"value without a comment: {line!r}"
    assert "fp16" not in yaml.safe_load(text)  # train.sh adds it on a GPU


def without_adapter(values: dict) -> dict:
    return {key: value for key, value in values.items() if key not in ADAPTER_KEYS}


@pytest.mark.parametrize("task", list(PAPER_DATA))
def test_paper_configs_hold_the_paper_values(task):
    model_args, data_args, method_args, training_args = parse_config(CONFIG_DIR / "bart-base" / f"{task}.yaml")
    assert model_args.model_name_or_path == "facebook/bart-base" and data_args.dataset_name == task
    assert (data_args.max_source_length, data_args.max_target_length) == PAPER_DATA[task]
    assert (method_args.method, method_args.lora_r, method_args.lora_alpha) == ("lorpa", 256, 256)
    assert (method_args.prune_target_rank, method_args.pruned_alpha, method_args.stage1_ratio) == (16, 16, 0.2)
    assert method_args.lora_dropout == 0.05 and method_args.lora_target_modules is None  # peft's q_proj, v_proj
    assert (training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps) == (64, 4)
    assert training_args.learning_rate == pytest.approx(2e-4) and training_args.num_train_epochs == 25
    assert training_args.warmup_steps == 500 and training_args.weight_decay == pytest.approx(0.01)

    lorpa_values = yaml.safe_load((CONFIG_DIR / "bart-base" / f"{task}.yaml").read_text())
    lora_values = yaml.safe_load((CONFIG_DIR / "bart-base" / "lora_r16" / f"{task}.yaml").read_text())
    assert (lora_values["method"], lora_values["lora_r"], lora_values["lora_alpha"]) == ("lora", 16, 32)
    assert without_adapter(lora_values) == without_adapter(lorpa_values)  # the baseline differs only in the adapter


def test_data_dir_reads_local_copies_in_the_hubs_layout(tmp_path, capsys, earlier_output):
    folder = tmp_path / "data" / "xsum"
    folder.mkdir(parents=True)
    write_jsonl(folder / "train.jsonl", article_rows(5, 0))
    write_jsonl(folder / "validation.jsonl", article_rows(3, 1))
    args = SummarizationDataArguments(dataset_name="xsum", data_dir=str(tmp_path / "data"))
    splits = load_summarization(args)
    assert (len(splits["train"]), len(splits["validation"])) == (5, 3) and args.task_name == "xsum"
    with pytest.raises(InputError, match=r"test.jsonl \(given by --data_dir"):
        load_summarization(args, with_test=True)
    with pytest.raises(InputError, match="no folder .*cnn_dailymail"):
        SummarizationDataArguments(dataset_name="cnn_dailymail", data_dir=str(tmp_path / "data"))


def test_minilm_configs_load_from_the_hub_unless_given_data_dir(tmp_path):
    config = CONFIG_DIR / "minilm" / "xsum.yaml"
    _, data_args, _, _ = parse_config(config)
    assert data_args.dataset_name == "xsum" and data_args.data_dir is None and data_args.train_file is None
    (tmp_path / "xsum").mkdir()
    dataclass_types = (ModelArguments, SummarizationDataArguments, MethodArguments, Seq2SeqTrainingArguments)
    _, data_args, _, _, _ = parse_args(dataclass_types, ["--config", str(config), "--data_dir", str(tmp_path)])
    assert data_args.local_folder == tmp_path / "xsum"


def test_smoke_setup_writes_the_generated_articles_the_smoke_config_reads(tmp_path):
    import os

    root = CONFIG_DIR.parents[1]
    values = yaml.safe_load((CONFIG_DIR / "smoke.yaml").read_text())
    model_dir = tmp_path / values["model_name_or_path"]
    done = processes.run([sys.executable, root / "scripts/make_tiny_seq2seq.py", model_dir, "--vocab_size", "300"],
                         timeout=300, env=dict(os.environ, PYTHONPATH=str(root)))
    assert done.returncode == 0, done.stderr[-2000:]
    for key in ("train_file", "validation_file"):
        rows = [json.loads(line) for line in (tmp_path / values[key]).read_text().splitlines()]
        assert rows and {"document", "summary"} <= set(rows[0])
    assert AutoTokenizer.from_pretrained(model_dir)("The reviewer liked the kettle.")["input_ids"]
