"""run_clm.py end to end on tiny LLaMA / Qwen2 models and generated GSM8K-format problems."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

import run_clm
from lorpa import report
from lorpa.harness.arguments import MethodArguments, ModelArguments
from lorpa.harness.commands import script_for
from lorpa.harness.flags import parse_args
from lorpa.layers import lora_layers
from lorpa.tasks.clm.arguments import ClmModelArguments
from lorpa.tasks.clm.arithmetic import arithmetic_rows, write_arithmetic_gsm8k
from lorpa.tasks.clm.data import (
    IGNORE_INDEX,
    ClmDataArguments,
    PaddingCollator,
    PromptFormatter,
    encode_split,
    pad_id,
)
from lorpa.tasks.clm.evaluation import GenerationEvalTrainer
from lorpa.tasks.clm.gsm8k import gsm8k_metrics

from conftest import assert_one_line_failure
from tiny_assets import write_jsonl, write_tiny_decoder

TEMPLATE = "Question: {prompt} Think step by step.\nAnswer:"
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
N_EVAL = 6


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    return write_tiny_decoder(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    torch.manual_seed(0)
    return write_tiny_decoder(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return {
        "train_file": write_jsonl(folder / "train.jsonl", arithmetic_rows(24, 0)),
        "validation_file": write_jsonl(folder / "test.jsonl", arithmetic_rows(N_EVAL, 1)),
    }


def argv_for(model_dir, output_dir, files, *extra):
    argv = ["--model_name_or_path", str(model_dir), "--output_dir", str(output_dir)]
    for flag, path in files.items():
        argv += [f"--{flag}", str(path)]
    return argv + [
        "--prompt_column", "question", "--response_column", "answer", "--prompt_template", TEMPLATE,
        "--max_seq_length", "96", "--generation_max_new_tokens", "8",
        "--num_train_epochs", "2", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "4",
        "--learning_rate", "1e-3", "--lora_r", "8", "--lora_alpha", "16", "--prune_target_rank", "2",
        "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", *extra,
    ]


def read_results(output_dir):
    return json.loads((output_dir / "results.json").read_text())


def read_predictions(output_dir):
    return (output_dir / "generated_predictions.txt").read_text().split("\n")[:-1]


def data_args(**overrides):
    values = dict(train_file="unused", validation_file="unused", prompt_column="question", response_column="answer",
                  max_seq_length=96)
    return ClmDataArguments(**{**values, **overrides})


def encode(tokenizer, rows, **overrides):
    args = data_args(**overrides)
    formatter = PromptFormatter(tokenizer, args.prompt_template, args.use_chat_template)
    return formatter, encode_split(Dataset.from_list(rows), formatter, args, prompt_column="question",
                                   response_column="answer", source="rows", drop_overlong=args.drop_overlong)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_prompt_tokens_are_masked_and_the_response_is_learned_up_to_its_end(llama_dir, qwen_dir, kind):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir if kind == "llama" else qwen_dir)
    rows = arithmetic_rows(3, 5)
    formatter, encoded = encode(tokenizer, rows, prompt_template=TEMPLATE, max_seq_length=200)
    assert formatter.chat == (kind == "qwen2")  # the chat template is used where the tokenizer has one
    for row, feature in zip(rows, encoded.features):
        prompt = formatter.prompt_ids(row["question"])
        ids, labels = feature["input_ids"], feature["labels"]
        assert ids[: len(prompt)] == prompt and labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
        response = labels[len(prompt):]
        assert response == ids[len(prompt):] and IGNORE_INDEX not in response
        # the model learns to stop (chat: the template's closing text follows)
        end = response.index(tokenizer.eos_token_id)
        assert tokenizer.decode(response[end + 1:]).strip() == "" and (kind == "qwen2" or end == len(response) - 1)
        assert tokenizer.decode(response, skip_special_tokens=True).strip() == row["answer"]
    if kind == "llama":
        assert ids[0] == tokenizer.bos_token_id and tokenizer.pad_token_id is None
    else:
        assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")

    batch = PaddingCollator(pad_id(tokenizer))(list(encoded.features))
    lengths = [len(f["input_ids"]) for f in encoded.features]
    assert batch["input_ids"].shape == (3, max(lengths)) and len(set(lengths)) > 1  # padded to the longest row only
    for i, length in enumerate(lengths):
        assert (batch["labels"][i, length:] == IGNORE_INDEX).all() and (batch["attention_mask"][i, length:] == 0).all()
        assert (batch["input_ids"][i, length:] == pad_id(tokenizer)).all()


def test_long_prompts_are_cut_from_the_left_and_overlong_responses_counted(llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    short = {"question": "Ann has 3 apples.", "answer": "3\n#### 3"}
    long_prompt = {"question": " ".join(["Ben has 5 coins."] * 30), "answer": "5\n#### 5"}
    long_answer = {"question": "Gus?", "answer": " ".join(["Gus has 7 cards."] * 30) + "\n#### 7"}
    formatter, encoded = encode(tokenizer, [short, long_prompt, long_answer], max_seq_length=40)
    assert encoded.dropped == [2] and encoded.truncated == 1 and len(encoded.features) == 2
    cut = encoded.features[1]
    assert len(cut["input_ids"]) == 40 and cut["input_ids"][0] == tokenizer.bos_token_id  # BOS kept
    full_prompt = formatter.prompt_ids(long_prompt["question"])
    kept = [i for i, label in zip(cut["input_ids"], cut["labels"]) if label == IGNORE_INDEX]
    assert kept[1:] == full_prompt[len(full_prompt) - len(kept) + 1:]  # the prompt's end survives
    assert tokenizer.decode([i for i in cut["labels"] if i != IGNORE_INDEX], skip_special_tokens=True) == "5\n#### 5"


def test_two_stage_all_linear_run_reloads_with_plain_peft(llama_dir, data_files, tmp_path):
    output_dir = tmp_path / "out"
    run_clm.main(argv_for(llama_dir, output_dir, data_files, "--lora_target_modules", "all-linear",
                          "--stage1_ratio", "0.5", "--merge_final", "true"))
    results = read_results(output_dir)
    assert results["task"] == "local" and results["main_metric"] == "accuracy"
    assert {"accuracy", "loss"} <= set(results["metrics"])
    assert {name.split(".")[-1] for name in results["ranks"]} == set(KINDS) and len(results["ranks"]) == 14
    assert set(results["stage1_ranks"].values()) == {8} and set(results["ranks"].values()) == {2}
    assert results["data"]["train_rows"] == 24 and results["data"]["eval_rows"] == N_EVAL

    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), output_dir).eval()
    assert {n: layer.r["default"] for n, layer in lora_layers(reloaded).items()} == results["ranks"]
    args = data_args(**data_files, prompt_template=TEMPLATE)
    validation = Dataset.from_list(arithmetic_rows(N_EVAL, 1))
    formatter = PromptFormatter(tokenizer, TEMPLATE)
    features = encode_split(validation, formatter, args, prompt_column="question", response_column="answer",
                            source="v", drop_overlong=True).features
    batch = PaddingCollator(pad_id(tokenizer))(list(features))
    with torch.no_grad():
        adapter_logits = reloaded(**{k: v for k, v in batch.items() if k != "labels"}).logits
        losses = [reloaded(**PaddingCollator(pad_id(tokenizer))(list(features.select(rows)))).loss
                  for rows in (range(4), range(4, N_EVAL))]
    # the Trainer's eval loss: each batch's mean over its response tokens, weighted by the batch's rows
    assert results["metrics"]["loss"] == pytest.approx(float((4 * losses[0] + 2 * losses[1]) / N_EVAL), rel=1e-5)

    merged = AutoModelForCausalLM.from_pretrained(output_dir / "merged").eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        merged_logits = merged(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert torch.allclose(merged_logits, adapter_logits, atol=1e-5)

    trainer = GenerationEvalTrainer(
        model=reloaded, args=TrainingArguments(str(tmp_path / "gen"), per_device_eval_batch_size=4, report_to="none"),
        processing_class=tokenizer, prompts=[formatter.prompt_ids(q) for q in validation["question"]],
        references=validation["answer"], score=gsm8k_metrics, max_new_tokens=8, pad_token_id=pad_id(tokenizer),
    )
    assert trainer.generate_answers() == read_predictions(output_dir)  # the saved adapter answers as reported

    report.main([str(output_dir), "--out", str(tmp_path / "summary")])
    table = (tmp_path / "summary.md").read_text()
    assert "| GSM8K acc |" not in table and "| local acc |" in table  # local data: named as such


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(llama_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    formatter = PromptFormatter(tokenizer, TEMPLATE)
    prompts = [formatter.prompt_ids(row["question"]) for row in arithmetic_rows(5, 3)]
    assert len({len(p) for p in prompts}) > 1
    answers = {}
    for batch_size in (1, 5):
        trainer = GenerationEvalTrainer(
            model=model,
            args=TrainingArguments(str(tmp_path), per_device_eval_batch_size=batch_size, report_to="none"),
            processing_class=tokenizer, prompts=prompts, references=["#### 1"] * 5, score=gsm8k_metrics,
            max_new_tokens=6, pad_token_id=pad_id(tokenizer),
        )
        answers[batch_size] = trainer.generate_answers()
    assert answers[1] == answers[5] and all(answers[1])


@pytest.mark.parametrize("method", ["lora", "full", "adalora"])
def test_other_methods_run_end_to_end(llama_dir, data_files, tmp_path, method):
    output_dir = tmp_path / "out"
    extra = ["--method", method] + (["--adalora_target_r", "4"] if method == "adalora" else [])
    run_clm.main(argv_for(llama_dir, output_dir, data_files, *extra))
    results = read_results(output_dir)
    assert results["method"] == method and len(read_predictions(output_dir)) == N_EVAL
    if method == "lora":
        assert set(results["ranks"].values()) == {8}
    if method == "full":
        assert AutoModelForCausalLM.from_pretrained(output_dir) is not None


def test_the_activation_score_calibrates_on_the_answer_tokens_by_default(llama_dir, data_files, tmp_path):
    counted = {}
    for tokens in (None, "real"):
        output_dir = tmp_path / str(tokens)
        extra = ("--prune_score", "activation", *(("--calibration_tokens", tokens) if tokens else ()))
        run_clm.main(argv_for(llama_dir, output_dir, data_files, *extra))
        results = read_results(output_dir)
        counted[tokens] = (results["config"]["calibration_tokens"], results["prunes"][0]["calibration_tokens"])
    assert counted[None][0] == "loss" and counted["real"][0] == "real"
    assert 0 < counted[None][1] < counted["real"][1]  # the same batches: prompts count only as real tokens


def test_gradient_checkpointing_on_bf16_weights_still_trains_float32_adapters(llama_dir, data_files, tmp_path):
    output_dir = tmp_path / "out"
    run_clm.main(argv_for(llama_dir, output_dir, data_files, "--method", "lora", "--gradient_checkpointing", "true",
                          "--torch_dtype", "bfloat16"))
    weights = load_file(output_dir / "adapter_model.safetensors")
    lora_B = [w for name, w in weights.items() if "lora_B" in name]
    assert lora_B and all(w.dtype == torch.float32 for w in weights.values())
    assert all(w.abs().sum() > 0 for w in lora_B)  # peft starts B at zero: gradients reached every adapter


def test_chat_template_model_with_pad_token_runs(qwen_dir, data_files, tmp_path):
    output_dir = tmp_path / "out"
    run_clm.main(argv_for(qwen_dir, output_dir, data_files, "--lora_target_modules", "all-linear"))
    results = read_results(output_dir)
    assert results["data"]["chat_template"] is True
    assert {name.split(".")[-1] for name in results["ranks"]} == set(KINDS) and set(results["ranks"].values()) == {2}


def test_resume_from_either_stage(llama_dir, data_files, tmp_path):
    output_dir = tmp_path / "out"
    argv = argv_for(llama_dir, output_dir, data_files, "--save_strategy", "epoch", "--save_total_limit", "3",
                    "--num_train_epochs", "4", "--stage1_ratio", "0.5")
    run_clm.main(argv)
    complete = read_results(output_dir)
    for stage in ("stage1", "stage2"):
        checkpoint = min((output_dir / stage).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        (output_dir / "results.json").unlink()
        run_clm.main(argv + ["--resume_from_checkpoint", str(checkpoint)])
        resumed = read_results(output_dir)
        assert resumed["ranks"] == complete["ranks"] and resumed["stage1_ranks"] == complete["stage1_ranks"]
        assert resumed["metrics"]["loss"] == pytest.approx(complete["metrics"]["loss"], rel=1e-4)
        assert resumed["metrics"]["accuracy"] == complete["metrics"]["accuracy"]


def test_max_steps_are_split_between_the_stages(llama_dir, data_files, tmp_path):
    output_dir = tmp_path / "out"
    run_clm.main(argv_for(llama_dir, output_dir, data_files, "--max_steps", "5", "--stage1_ratio", "0.4"))
    steps = [stage["history"][-1]["step"] for stage in read_results(output_dir)["stages"]]
    assert steps == [2, 3]


def test_data_dir_replaces_the_hub_gsm8k(tmp_path):
    write_arithmetic_gsm8k(tmp_path, n_train=4, n_test=2)
    local = ClmDataArguments(data_dir=str(tmp_path))
    assert (local.train_file == str(tmp_path / "gsm8k/train.jsonl")
            and local.validation_file == str(tmp_path / "gsm8k/test.jsonl"))
    assert (local.prompt_column, local.response_column, local.eval_task) == ("question", "answer", "gsm8k")
    mixed = ClmDataArguments(dataset_name="meta-math/MetaMathQA", eval_dataset_name="gsm8k", data_dir=str(tmp_path))
    assert mixed.dataset_name == "meta-math/MetaMathQA" and mixed.train_file is None  # MetaMathQA still from the hub
    assert (mixed.prompt_column, mixed.response_column) == ("query", "response")
    assert mixed.validation_file.endswith("gsm8k/test.jsonl") and mixed.eval_prompt_column == "question"


BAD_FLAGS = {
    "unknown column": (["--prompt_column", "query"], "no column 'query' (columns: question, answer)"),
    "template without placeholder": (["--prompt_template", "Question: {question}"],
                                     "--prompt_template must contain {prompt}"),
    "response does not fit": (["--max_seq_length", "12", "--drop_overlong", "false"],
                              "training data: row 1 has a response longer than --max_seq_length 12"),
    "nothing fits": (["--max_seq_length", "3"], "training data: no row fits in --max_seq_length 3"),
    "merge full": (["--method", "full", "--merge_final", "true"], "--merge_final merges an adapter"),
    "dtype": (["--torch_dtype", "fp8"], "unknown --torch_dtype 'fp8'"),
    "beyond positions": (["--max_seq_length", "250"], "exceeds the model's 256 positions"),
    "hub and file": (["--dataset_name", "gsm8k"], "give --dataset_name or --train_file, not both"),
    "no held-out split": (["--train_file", None, "--validation_file", None, "--dataset_name", "meta-math/MetaMathQA"],
                          "meta-math/MetaMathQA has no held-out split"),
    "data_dir without gsm8k": (["--train_file", None, "--validation_file", None, "--data_dir", "nowhere"],
                               "--data_dir nowhere: no folder nowhere/gsm8k"),
    "unknown method": (["--method", "dora"], "unknown method 'dora'"),
    "no epochs": (["--num_train_epochs", "0"], "--num_train_epochs must be positive"),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_input_fails_in_one_line_and_keeps_earlier_output(llama_dir, data_files, capsys, earlier_output, case):
    override, expected = BAD_FLAGS[case]
    argv = argv_for(llama_dir, earlier_output, data_files, "--overwrite_output_dir", "true")
    for flag, value in zip(override[::2], override[1::2]):
        if flag in argv:
            index = argv.index(flag)
            del argv[index : index + 2]
        if value is not None:
            argv += [flag, value]
    assert_one_line_failure(run_clm.main, argv, expected, capsys, earlier_output)


def test_null_response_is_named(llama_dir, data_files, tmp_path, capsys, earlier_output):
    rows = arithmetic_rows(2, 0) + [{"question": "Ann?", "answer": None}]
    files = dict(data_files, train_file=write_jsonl(tmp_path / "bad.jsonl", rows))
    argv = argv_for(llama_dir, earlier_output, files, "--overwrite_output_dir", "true")
    assert_one_line_failure(run_clm.main, argv, "row 3 has no value for 'answer'", capsys, earlier_output)


CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "clm"
CONFIGS = sorted(CONFIG_DIR.rglob("*.yaml"))
ADAPTER_KEYS = {"method", "lora_r", "lora_alpha", "stage1_ratio", "prune_target_rank"}


def parse_config(path):
    types = (ModelArguments, ClmDataArguments, ClmModelArguments, MethodArguments, TrainingArguments)
    return parse_args(types, ["--config", str(path)])[:5]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: str(path.relative_to(CONFIG_DIR)))
def test_config_parses_comments_every_value_and_runs_with_run_clm(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a fresh clone: the smoke config's generated data does not exist yet
    write_arithmetic_gsm8k(tmp_path / "runs/tiny-llama/data")
    _, data, _, method_args, training_args = parse_config(config)
    assert training_args.output_dir or "smoke" not in config.name
    text = config.read_text()
    assert text.startswith("#") and "../shared" not in text  # user configs never read the development data
    for line in text.splitlines():
        assert not line.strip() or "#" in line, f"value without a comment: {line!r}"
    assert script_for(yaml.safe_load(text)).name == "run_clm.py"


@pytest.mark.parametrize("model", ["llama-3.2-3b", "qwen2.5-3b"])
def test_comparison_configs_hold_peft_values_and_differ_only_in_the_adapter(model):
    folder = CONFIG_DIR / model
    _, data, clm, method_args, training_args = parse_config(folder / "lora_r32" / "gsm8k.yaml")
    assert (data.dataset_name, data.eval_dataset_name, data.eval_split) == ("meta-math/MetaMathQA", "gsm8k", "test")
    assert (data.prompt_column, data.response_column, data.max_seq_length) == ("query", "response", 768)
    assert data.prompt_template == TEMPLATE and clm.torch_dtype == "bfloat16" and training_args.gradient_checkpointing
    assert (training_args.max_steps, training_args.per_device_train_batch_size,
            training_args.learning_rate) == (5000, 4, 1e-4)
    assert (method_args.lora_r, method_args.lora_alpha,
            method_args.lora_target_modules) == (32, 64, ["q_proj", "v_proj"])
    values = {name: yaml.safe_load((folder / name / "gsm8k.yaml").read_text())
              for name in ("", "lorpa_r8", "lora_r32")}
    assert [(v["lora_r"], v.get("prune_target_rank")) for v in values.values()] == [(256, 32), (256, 8), (32, None)]
    rest = [{k: v for k, v in config.items() if k not in ADAPTER_KEYS} for config in values.values()]
    assert rest[0] == rest[1] == rest[2]
