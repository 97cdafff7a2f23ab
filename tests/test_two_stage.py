"""`lorpa.train_two_stage` with a user's own Trainer subclass, in one process and under 2-process gloo DDP."""

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import lorpa
from lorpa.tasks.clm.arithmetic import arithmetic_rows
from lorpa.tasks.clm.data import PromptFormatter, pad_id
from lorpa.tasks.clm.evaluation import GenerationEvalTrainer
from lorpa.tasks.clm.gsm8k import gsm8k_metrics

import processes
from tiny_assets import write_tiny_decoder

KINDS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def token_data(n=16, length=10):
    ids = torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(1)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


class StepCountingTrainer(Trainer):
    """A user's Trainer subclass with its own compute_loss."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.loss_calls = getattr(self, "loss_calls", 0) + 1
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def training_args(output_dir, **overrides):
    values = dict(max_steps=5, per_device_train_batch_size=4, learning_rate=1e-2, report_to="none",
                  save_strategy="no", disable_tqdm=True, use_cpu=True)
    return TrainingArguments(str(output_dir), **{**values, **overrides})


def recording_trainers(trainer_class=Trainer):
    """(the Trainers made so far, a `make_trainer` for train_two_stage that makes one per stage on token_data)."""
    trainers = []

    def make_trainer(model, args):
        trainers.append(trainer_class(model=model, args=args, train_dataset=token_data()))
        return trainers[-1]

    return trainers, make_trainer


def test_the_method_and_its_commands_load_without_the_harness():
    """`import lorpa` users get the method alone: the run machinery and task families stay out."""
    code = ("import sys, lorpa, lorpa.two_stage, lorpa.prune_adapter; "
            "print(sorted(m for m in sys.modules if m.startswith(('lorpa.harness', 'lorpa.tasks'))))")
    done = processes.run([sys.executable, "-c", code], timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr[-2000:]


def test_a_trainer_subclass_gets_two_stages_and_a_fresh_optimizer(tmp_path):
    model = lorpa.get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16,
                                                          target_modules="all-linear"))
    trainers, make_trainer = recording_trainers(StepCountingTrainer)

    result = lorpa.train_two_stage(model, make_trainer, training_args(tmp_path), stage1_ratio=0.4, target_rank=2)
    first, second = trainers
    assert result.trainer is second and first is not second
    assert (first.state.global_step, second.state.global_step) == (2, 3) and second.loss_calls == 3
    assert (first.args.output_dir, second.args.output_dir) == (str(tmp_path / "stage1"), str(tmp_path / "stage2"))
    assert {name.split(".")[-1] for name in result.prune_report.ranks} == KINDS
    assert set(result.prune_report.ranks.values()) == {2} and set(result.prune_report.old_ranks.values()) == {8}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    optimized = {id(p) for group in second.optimizer.param_groups for p in group["params"]}
    assert optimized == trainable  # stage 2 optimizes the pruned tensors, not stage 1's
    assert ((tmp_path / "prune_report.json").is_file()
            and (tmp_path / "pruned_adapter" / "adapter_config.json").is_file())

    result.trainer.save_model(str(tmp_path / "final"))
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "final").eval()
    inputs = torch.tensor(token_data(3)["input_ids"])
    with torch.no_grad():
        assert torch.allclose(reloaded(inputs).logits, result.model.eval()(inputs).logits, atol=1e-6)


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_resume_from_either_stage_ends_where_the_uninterrupted_run_ends(tmp_path, stage):
    def run(output_dir, checkpoint=None):
        model = lorpa.get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16,
                                                              target_modules=["q_proj", "down_proj"]))
        args = training_args(output_dir, max_steps=6, save_strategy="steps", save_steps=1, save_total_limit=None)
        return lorpa.train_two_stage(
            model, lambda m, a: Trainer(model=m, args=a, train_dataset=token_data()), args, stage1_ratio=0.5,
            target_rank=3, resume_from_checkpoint=checkpoint,
        )

    complete = run(tmp_path)
    final = {n: p.detach().clone() for n, p in complete.model.named_parameters() if "lora_" in n}
    checkpoint = tmp_path / stage / "checkpoint-2"  # mid-stage: stage 1 has 3 steps, stage 2 checkpoints 1-3
    resumed = run(tmp_path, str(checkpoint))
    assert resumed.prune_report.ranks == complete.prune_report.ranks
    assert resumed.trainer.state.global_step == 3
    weights = {n: p for n, p in resumed.model.named_parameters() if "lora_" in n}
    assert weights.keys() == final.keys() and all(torch.allclose(weights[n], final[n], atol=1e-6) for n in final)


def test_epochs_are_split_when_no_max_steps(tmp_path):
    model = lorpa.get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8))
    result = lorpa.train_two_stage(
        model, lambda m, a: Trainer(model=m, args=a, train_dataset=token_data()),
        training_args(tmp_path, max_steps=-1, num_train_epochs=5), target_rank=1,
    )
    assert result.trainer.args.num_train_epochs == pytest.approx(4) and result.trainer.state.global_step == 16


def test_bad_pruning_options_fail_before_training(tmp_path):
    model = lorpa.get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8))
    built = []
    with pytest.raises(ValueError, match="target_rank 6 exceeds the rank"):
        lorpa.train_two_stage(model, lambda m, a: built.append(m), training_args(tmp_path), target_rank=6)
    with pytest.raises(ValueError, match="stage1_ratio must be in"):
        lorpa.train_two_stage(model, lambda m, a: built.append(m), training_args(tmp_path), stage1_ratio=1.5,
                              target_rank=2)
    with pytest.raises(ValueError, match="ranks must decrease"):
        lorpa.train_two_stage(model, lambda m, a: built.append(m), training_args(tmp_path),
                              prune_schedule="0.2:2,0.4:3")
    with pytest.raises(ValueError, match="sets the ranks"):
        lorpa.train_two_stage(model, lambda m, a: built.append(m), training_args(tmp_path), prune_schedule="0.2:2",
                              target_rank=2)
    assert not built


def test_a_schedule_with_sensitivity_prunes_twice_with_a_trainer_per_stage(tmp_path):
    model = lorpa.get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16))
    trainers, make_trainer = recording_trainers()

    result = lorpa.train_two_stage(model, make_trainer, training_args(tmp_path), prune_schedule="0.4:4,0.6:2",
                                   score="sensitivity")
    assert [t.state.global_step for t in trainers] == [2, 1, 2]
    assert [set(r.ranks.values()) for r in result.prune_reports] == [{4}, {2}]
    assert [r.score for r in result.prune_reports] == ["sensitivity", "sensitivity"]
    assert (tmp_path / "pruned_adapter_1").is_dir() and (tmp_path / "prune_report.json").is_file()


def test_pruning_at_the_end_leaves_the_last_trainer_untrained(tmp_path):
    model = lorpa.get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16))
    result = lorpa.train_two_stage(model, lambda m, a: Trainer(model=m, args=a, train_dataset=token_data()),
                                   training_args(tmp_path), stage1_ratio=1.0, target_rank=3, score="svd")
    assert result.trainer.state.global_step == 0 and set(result.prune_report.ranks.values()) == {3}
    assert (tmp_path / "stage1").is_dir() and all(m.relative_error < 1 for m in result.prune_report.modules.values())


def test_the_activation_score_calibrates_each_prune_and_a_recovery_trains_given_steps(tmp_path):
    model = lorpa.get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16))
    result = lorpa.train_two_stage(model, lambda m, a: Trainer(model=m, args=a, train_dataset=token_data()),
                                   training_args(tmp_path), prune_schedule="0.4:4,1.0:2", score="activation",
                                   stage2_steps=3, calibration_tokens="loss")
    assert [set(r.ranks.values()) for r in result.prune_reports] == [{4}, {2}]
    assert all(r.score == "activation" and r.mean_output_error is not None for r in result.prune_reports)
    assert result.trainer.state.global_step == 3


def test_a_tolerance_prunes_at_the_end_to_the_smallest_budget_the_evaluation_allows(tmp_path):
    model = lorpa.get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16))
    held_out = torch.tensor(token_data(4, length=10)["input_ids"])

    def loss_points(model):  # minus the held-out loss, in hundredths
        with torch.no_grad():
            return -100 * float(model(input_ids=held_out, labels=held_out).loss)

    result = lorpa.train_two_stage(model, lambda m, a: Trainer(model=m, args=a, train_dataset=token_data()),
                                   training_args(tmp_path), stage1_ratio=1.0, score="svd", tolerance=1.0,
                                   evaluate=loss_points, alpha="fold")
    search = result.tolerance_search
    assert search is not None and sum(result.prune_report.ranks.values()) == search.kept
    assert loss_points(result.model) >= search.reference - 1.0 - 1e-6 and result.prune_report.folded
    with pytest.raises(ValueError, match="tolerance chooses the budget of a cut at the end"):
        lorpa.train_two_stage(model, lambda m, a: None, training_args(tmp_path), tolerance=1.0, evaluate=loss_points)


def run_ddp_script(out: Path, model_dir: Path, *, timeout: float, env: dict | None = None, mode: str = "memory"):
    script = Path(__file__).with_name("ddp_two_stage.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]), **(env or {}))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, out,
               model_dir, mode]
    return processes.run(command, timeout=timeout, env=env)


def test_a_replica_that_hangs_fails_the_test_within_its_limit_and_leaves_no_process(tmp_path):
    model_dir = write_tiny_decoder(tmp_path / "model", "llama")
    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"ddp_two_stage\.py .* did not finish in 30 s") as failure:
        run_ddp_script(tmp_path, model_dir, timeout=30, env={"LORPA_TEST_HANG_RANK": "1"})
    assert time.monotonic() - started < 45
    assert "replica 1 waits forever" in str(failure.value)  # the output says which replica hung
    leftovers = [p for p in Path("/proc").iterdir() if p.name.isdigit() and str(tmp_path).encode() in read_cmdline(p)]
    assert not leftovers


def read_cmdline(process: Path) -> bytes:
    try:
        return (process / "cmdline").read_bytes()
    except OSError:
        return b""


@pytest.mark.parametrize("mode", ["memory", "files"])
def test_two_gloo_processes_keep_the_same_components_stay_in_sync_and_share_generation(tmp_path, mode):
    """`files`: the prune goes as under FSDP (lorpa.sharded), through the adapter process 0 prunes from its files."""
    torch.manual_seed(0)
    model_dir = write_tiny_decoder(tmp_path / "model", "llama")
    finished = run_ddp_script(tmp_path, model_dir, timeout=300, mode=mode)
    assert finished.returncode == 0, finished.stderr[-3000:]
    records = [json.loads((tmp_path / f"process{rank}.json").read_text()) for rank in (0, 1)]
    assert all(r["world_sizes"] == [2, 2] for r in records)  # both stages ran under DDP
    assert all(r["ddp_wrappers_alive"] == 0 for r in records)  # none can destroy the group after the script left it
    # through files, stage 2 starts from a new model
    assert all(r["fresh_model"] == (mode == "files") for r in records)
    if mode == "files":
        assert (tmp_path / "run/stage1/adapter/adapter_config.json").is_file()  # the unpruned adapter, saved in full
    assert records[0]["kept"] == records[1]["kept"]  # rank 0's choice, although each process seeded its own
    assert set(records[0]["ranks"].values()) == {2} and len(records[0]["ranks"]) == 14
    assert all(r["steps"] == 3 and r["trained"] for r in records)
    assert records[0]["weights"] == records[1]["weights"]  # stage 2's re-wrapped model synchronised gradients
    if mode == "memory":  # measured on each process's half of the training rows, summed over both
        assert records[0]["fidelity"] == records[1]["fidelity"] and records[0]["fidelity"]["positions"] == 32 * 31
        assert 0 < records[0]["fidelity"]["agreement"] <= 100
    else:  # under FSDP the pruned adapter is measured from files (lorpa prune --base_model)
        assert records[0]["fidelity"] is None

    # the sharded evaluation gathers every answer, in dataset order, on every process
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "final").eval()
    questions = [row["question"] for row in arithmetic_rows(7, 1)]
    formatter = PromptFormatter(tokenizer)
    single = GenerationEvalTrainer(
        model=reloaded, args=TrainingArguments(str(tmp_path / "one"), per_device_eval_batch_size=7, report_to="none"),
        processing_class=tokenizer, prompts=[formatter.prompt_ids(q) for q in questions], references=["#### 1"] * 7,
        score=gsm8k_metrics, max_new_tokens=6, pad_token_id=pad_id(tokenizer),
    ).generate_answers()
    assert records[0]["answers"] == records[1]["answers"] == single and all(single)


def test_trl_sft_trainer_runs_both_stages(tmp_path):
    trl = pytest.importorskip("trl")  # an optional extra: `pip install -e ".[trl]"`
    torch.manual_seed(0)
    folder = write_tiny_decoder(tmp_path / "model", "qwen2")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = [{"prompt": row["question"], "completion": " " + row["answer"]} for row in arithmetic_rows(16, 0)]
    model = lorpa.get_peft_model(AutoModelForCausalLM.from_pretrained(folder),
                                 LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules="all-linear"))
    config = trl.SFTConfig(str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                           report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True, max_length=96)
    result = lorpa.train_two_stage(
        model,
        lambda m, a: trl.SFTTrainer(model=m, args=a, train_dataset=Dataset.from_list(rows),
                                    processing_class=tokenizer),
        config, target_rank=2,
    )
    assert isinstance(result.trainer, trl.SFTTrainer) and isinstance(result.trainer.args, trl.SFTConfig)
    assert result.trainer.state.global_step == 3 and set(result.prune_report.ranks.values()) == {2}


def run_fsdp_script(out: Path, model_dir: Path, *resume: str):
    script = Path(__file__).with_name("fsdp_two_stage.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, out,
               model_dir, *resume]
    done = processes.run(command, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((out / f"process{rank}.json").read_text()) for rank in (0, 1)]


def test_two_stages_under_fsdp2_shard_prune_through_files_reshard_and_resume_to_the_same_result(tmp_path):
    """Real FSDP2 (`fully_shard`) on two gloo processes: the library's stage loop over a Trainer stand-in that shards
    as accelerate does on GPUs (tests/fsdp_two_stage.py says why and what it covers)."""
    model_dir = write_tiny_decoder(tmp_path / "model", "llama")
    records = run_fsdp_script(tmp_path / "unbroken", model_dir)
    for record in records:
        assert record["sharded"] == [True, True]  # stage 1 and the re-sharded pruned stage 2: DTensor shards
        assert record["global_elements"][1] < record["global_elements"][0]  # stage 2 trains the pruned adapter
        assert record["steps"] == [2, 2] and record["fresh_model"]
    for stage in (0, 1):  # each LoRA element lives on exactly one process
        shards = [record["local_elements"][stage] for record in records]
        assert min(shards) > 0 and sum(shards) == records[0]["global_elements"][stage]
    assert records[0]["kept"] == records[1]["kept"] and set(records[0]["ranks"].values()) != {8}
    assert records[0]["shards"] != records[1]["shards"]  # each process holds its own half
    run = tmp_path / "unbroken" / "run"
    assert (run / "stage1" / "adapter" / "adapter_config.json").is_file()  # gathered whole before the prune
    assert json.loads((run / "prune_report.json").read_text())["scope"] == "global"

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "unbroken", resumed)
    for rank in (0, 1):
        (resumed / f"process{rank}.json").unlink()
    again = run_fsdp_script(resumed, model_dir, str(resumed / "run" / "stage2" / "checkpoint-1"))
    assert [r["steps"] for r in again] == [[2], [2]]  # only stage 2, from its checkpoint
    assert again[0]["final"] == records[0]["final"]  # the resumed run ends where the unbroken one ended
    assert [r["shards"][-1] for r in again] == [r["shards"][-1] for r in records]


def test_every_prune_reports_its_fidelity_and_logs_its_numbers_for_the_trainer_s_reporters(tmp_path):
    model = lorpa.get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16))
    trainers, make_trainer = recording_trainers()

    result = lorpa.train_two_stage(model, make_trainer, training_args(tmp_path), stage1_ratio=1.0, target_rank=2,
                                   score="svd")
    fidelity = result.fidelity
    assert fidelity is not None and 0 < fidelity["agreement"] < 100 and fidelity["kl_mean"] > 0
    assert fidelity["positions"] > 0 and fidelity["perplexity_ratio"] > 1  # the cut costs some likelihood
    saved = json.loads((tmp_path / "prune_report.json").read_text())
    assert saved["fidelity"] == fidelity
    logged = next(entry for entry in trainers[0].state.log_history if "prune/total_rank_after" in entry)
    assert logged["prune/total_rank_before"] == 8 * len(result.prune_report.modules)
    assert logged["prune/total_rank_after"] == 2 * len(result.prune_report.modules)
    assert logged["prune/parameters_after"] * 4 == logged["prune/parameters_before"]
    assert logged["prune/mean_relative_error"] == result.prune_report.mean_relative_error


@pytest.mark.parametrize("metric, tolerance", [("agreement", 90.0), ("kl", 0.05)])
def test_a_label_free_tolerance_keeps_the_smallest_adapter_that_qualifies(tmp_path, metric, tolerance):
    model = lorpa.get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16))
    result = lorpa.train_two_stage(model, lambda m, a: Trainer(model=m, args=a, train_dataset=token_data()),
                                   training_args(tmp_path), stage1_ratio=1.0, score="svd", tolerance=tolerance,
                                   tolerance_metric=metric)
    search = result.tolerance_search
    assert search.metric == metric and sum(result.prune_report.ranks.values()) == search.kept
    value = result.fidelity["agreement" if metric == "agreement" else "kl_mean"]
    assert value >= tolerance if metric == "agreement" else value <= tolerance
    smaller = [c for c in search.candidates if c.total_rank < search.kept]  # every smaller candidate failed
    assert all((c.score < tolerance) if metric == "agreement" else (c.score > tolerance) for c in smaller)


def test_the_search_keeps_the_smallest_budget_that_qualifies_by_each_metric():
    from lorpa.tolerance import Candidate, search_budget

    def by(value_of):
        return lambda budget: Candidate(budget, 10 * budget, value_of(budget))

    assert search_budget(by(lambda b: 100 - 60 / b), 1, 64, 64, 640, 100.0, 97.0, "agreement").kept == 20
    assert search_budget(by(lambda b: 1.0 / b), 1, 64, 64, 640, 0.0, 0.1, "kl").kept == 10
    assert search_budget(by(lambda b: 80 - 40 / b), 1, 64, 64, 640, 80.0, 2.0, "score").kept == 20


def test_the_search_summary_speaks_in_the_metric_s_units():
    from lorpa.harness.training import tolerance_summary
    from lorpa.tolerance import Candidate, ToleranceSearch

    def summary(metric, score, reference):
        return tolerance_summary(ToleranceSearch(reference, 1.0, 64, 640, [Candidate(20, 200, score)], 20, True,
                                                 metric)).split("(", 1)[1]

    assert summary("score", 79.5, 80.0) == "200 parameters, 79.50 points) against 80.00 unpruned"
    assert summary("agreement", 97.25, 100.0) == "200 parameters, 97.25% of top-1 answers unchanged)"
    assert summary("kl", 0.00123, 0.0) == "200 parameters, mean KL 0.00123 from the uncut adapter)"
