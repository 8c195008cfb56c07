"""The CM -> SA -> DE pipeline end to end on a tiny model, and adapter export to a merged model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from training_helpers import REPO


def _pipeline_config(tmp_path: Path, model_dir: Path) -> Path:
    """The shipped tiny pipeline with a handful of steps per stage and small evaluation sets."""
    cfg = {
        "stages": {s: str(REPO / "configs" / "tiny" / f"{s}.yaml") for s in ("cm", "sa", "de")},
        "overrides": {
            "model.init_args.base.name_or_path": str(model_dir),
            "model.init_args.generation.max_new_tokens": 24,
            "trainer.enable_progress_bar": False,
            "trainer.log_every_n_steps": 1,
            "data.max_val_records": 3,
            "data.max_test_records": 3,
            "data.eval_batch_size": 9,
        },
        "stage_overrides": {
            "cm": {"trainer.max_epochs": 3, "data.epochs_per_phase": 1, "data.max_train_records": 8},
            "sa": {"trainer.max_epochs": 1, "data.sample_per_dataset": 8},
            "de": {"trainer.max_steps": 2, "trainer.val_check_interval": 2, "data.sample_per_dataset": 4,
                   "model.init_args.rollout.max_new_tokens": 16, "data.batch_size": 2,
                   "model.init_args.beta": 0.1},  # rewards of an untrained model are all equal; the KL term still moves it
        },
        "adapter": "last",
        "zero_shot": True,
        "test_dtype": "float32",
        "extract_demo": "demo",
        "expected_seconds": {"zero_shot": 1.0, "cm": 2.0, "sa": 2.0, "de": 3.0},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _spy_on_reports(monkeypatch) -> list[dict]:
    """The results each pipeline run hands to ``write_markdown``, one dict per run."""
    from prouie_pl import reports

    seen, real = [], reports.write_markdown

    def spy(out_dir, results, plots, infos=None, extraction=None):
        seen.append(dict(results))
        return real(out_dir, results, plots, infos, extraction)

    monkeypatch.setattr(reports, "write_markdown", spy)
    return seen


def test_pipeline_runs_three_stages_hands_adapters_on_and_skips_finished_ones(tmp_path, tiny_model_dir, capsys, monkeypatch):
    from prouie_pl.cli import main
    from prouie_pl.pipeline import adapter_checksum
    from prouie_pl.results import EvalResult

    cfg = _pipeline_config(tmp_path, tiny_model_dir)
    out = tmp_path / "out"
    seen = _spy_on_reports(monkeypatch)
    assert main(["pipeline", "--config", str(cfg), "--out_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    # one progress line per stage (a log, not a terminal: printed at the end of each stage and of its test decode),
    # with the time left for the run estimated from expected_seconds scaled by this machine's pace
    for k, name in enumerate(("CM", "CM+SA", "CM+SA+DE"), start=2):
        assert re.search(rf"\[prouie\] stage {k}/4 {re.escape(name)}: step \d+(/\d+)?, ", printed), name
        assert f"[prouie] stage {k}/4 {name}: decoding the test split, batch" in printed
    assert re.search(r"\[prouie\] stage 2/4 CM: step \d+/\d+, .*~\d+:\d\d left in the run", printed)
    assert re.search(r"\[prouie\] stage 2/4 CM: decoding the test split, batch \d+/\d+, .*~\d+:\d\d left in the run", printed)
    steps = [line.split(", ")[0] for line in printed.splitlines() if re.match(r"\[prouie\] stage \d/4 .*: step ", line)]
    assert len(steps) == len(set(steps))  # no step's line twice (the stage's end does not repeat the last one)
    # each stage's last line counts its steps against the plan it made (curriculum phases differ in size)
    for k in (2, 3, 4):
        done, total = re.findall(rf"\[prouie\] stage {k}/4 [^:]+: step (\d+)/(\d+), ", printed)[-1]
        assert done == total, (k, done, total)
    assert "[prouie] stage 1/4 zero-shot: decoding the test split" in printed

    # the reports got the evaluator's results in memory; the files written for people say the same
    results = seen[0]
    assert list(results) == ["zero_shot", "cm", "sa", "de"]
    for stage, result in results.items():
        d = out / stage
        assert result.split == "test" and result.report == json.loads((d / "report.json").read_text())
        assert [p.to_json() for p in result.predictions] == [json.loads(x) for x in (d / "predictions.jsonl").read_text().splitlines()]
        info = json.loads((d / "stage.json").read_text())
        assert info["test_overall_f1"] == result.overall_f1 and info["answers"] == len(result.predictions) == result.n == 9
        assert info["peak_rss_mb"] > 50  # this process's high-water mark: a model, a tokenizer and torch at least
        assert EvalResult.load(d) == result

    for stage in ("cm", "sa", "de"):
        d = out / stage
        for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/training_config.yaml",
                     "predictions.jsonl", "report.json", "stage.json", "checkpoints/last.ckpt"):
            assert (d / name).is_file(), f"{stage}/{name}"
        lines = (d / "predictions.jsonl").read_text().splitlines()
        assert len(lines) == 9  # 3 test records x 3 data sets
        assert {"task", "dataset", "index", "output"} <= set(json.loads(lines[0]))
        for row in map(json.loads, lines):  # a score for every unit the answer holds, each a probability
            from prouie_pl.parser import parse_output

            n_units = len(parse_output(row["output"], row["task"]).units)
            assert len(row["unit_scores"]) == n_units and all(0.0 <= x <= 1.0 for x in row["unit_scores"])
        report = json.loads((d / "report.json").read_text())
        assert report["n"] == 9 and "overall_f1" in report
    zs = json.loads((out / "zero_shot" / "stage.json").read_text())
    assert zs["stage"] == "zero_shot" and zs["init_adapter"] is None and zs["answers"] == 9
    assert zs["cost"]["steps"] == 0 and zs["test_seconds"] > 0
    for name in ("report.md", "pipeline.json", "f1_by_stage.png", "training_loss.png", "grpo_reward.png", "f1_vs_compute.png"):
        assert (out / name).is_file(), name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    md = (out / "report.md").read_text()
    # intervals: F1 of every stage with its 95% interval, and each stage against the one before
    section = md.split("## How sure these figures are", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    for name in ("zero-shot", "CM", "CM+SA", "CM+SA+DE"):
        row = next(r for r in rows if r.startswith(f"| {name} |"))
        assert re.search(r"\d+\.\d \[\d+\.\d, \d+\.\d\]", row), row
    for pair in ("CM - zero-shot", "CM+SA - CM", "CM+SA+DE - CM+SA"):
        assert any(r.startswith(f"| {pair} |") for r in rows), pair
    # every stage's training loss is drawn (one logged point per step at these sizes)
    from prouie_pl.reports import latest_metrics, series

    for stage in ("cm", "sa", "de"):
        assert series(latest_metrics(out / stage), "train/loss")[0], stage
    # the last section: the final adapter run by extract on the shipped paragraph, offsets included
    tail = md.split("## The final adapter on new text", 1)[1]
    assert "python -m prouie_pl extract --model" in tail and "Helena Marsh" in tail
    demo = json.loads((out / "pipeline.json").read_text())["extract_demo"]
    # each adapter records the format it was trained on, and extract reads the last one's without being told
    from prouie_pl.formats import read_answer_format

    assert [read_answer_format(out / s / "adapter") for s in ("cm", "sa", "de")] == ["full", "concise", "concise"]
    assert demo["format"] == "concise" and "--format" not in demo["command"]
    doc = json.loads(demo["json"])
    assert {"entities", "relations", "events", "windows", "truncated_answers"} <= set(doc)
    for f in demo["found"]:
        assert demo["text"][f["start"]:f["end"]] in f["text"] or f["kind"] == "relation"
    header = next(line for line in md.splitlines() if line.startswith("| metric"))
    assert header.split("|")[3:7] == [" zero-shot ", " CM ", " CM+SA ", " CM+SA+DE "]  # zero-shot, then one column per stage
    for ds in ("DemoNER", "DemoRE", "DemoEE"):
        assert any(line.startswith("| ") and f"| {ds} |" in line for line in md.splitlines()), ds
    for png in ("f1_by_stage.png", "training_loss.png", "grpo_reward.png", "f1_vs_compute.png"):
        assert f"({png})" in md

    info = {s: json.loads((out / s / "stage.json").read_text()) for s in ("cm", "sa", "de")}
    # what each stage cost: SFT stages count steps and tokens, GRPO counts completions (2 steps x 2 prompts x G)
    g = yaml.safe_load((REPO / "configs" / "tiny" / "de.yaml").read_text())["model"]["init_args"]["rollout"]["num_generations"]
    assert info["cm"]["cost"]["steps"] > 0 and info["cm"]["cost"]["tokens"] > info["cm"]["cost"]["answer_tokens"] > 0
    assert info["sa"]["cost"]["steps"] > 0 and info["sa"]["cost"]["tokens"] > 0 and info["sa"]["cost"]["completions"] == 0
    assert info["de"]["cost"]["steps"] == 2 and info["de"]["cost"]["completions"] == 2 * 2 * g and info["de"]["cost"]["tokens"] == 0
    cost_rows = {line.split("|")[1].strip(): line.split("|") for line in md.split("## What each stage cost")[1].split("##")[0].splitlines() if line.startswith("| ")}
    assert set(cost_rows) >= {"zero-shot", "CM", "CM+SA", "CM+SA+DE"}
    assert cost_rows["CM"][3].strip() == str(info["cm"]["cost"]["steps"])
    assert cost_rows["CM+SA+DE"][5].strip() == str(2 * 2 * g)
    # two example predictions per task, the same sentences at every stage, with a row per stage
    for task in ("NER", "RE", "EE"):
        ex = [s_info["examples"][task] for s_info in [zs, *info.values()]]
        assert all(len(e) == 2 for e in ex) and len({tuple(x["index"] for x in e) for e in ex}) == 1
    assert md.count("| gold |") == 6
    assert info["cm"]["init_adapter"] is None
    # SA started from CM's adapter and DE from SA's: the checksums of what each stage loaded match
    assert info["sa"]["init_adapter"] == info["cm"]["adapter"]
    assert info["sa"]["init_adapter_checksum"] == info["cm"]["adapter_checksum"] == adapter_checksum(out / "cm" / "adapter")
    assert info["de"]["init_adapter"] == info["sa"]["adapter"]
    assert info["de"]["init_adapter_checksum"] == info["sa"]["adapter_checksum"] == adapter_checksum(out / "sa" / "adapter")
    # each stage trained: its adapter differs from the one it started from
    assert info["sa"]["adapter_checksum"] != info["cm"]["adapter_checksum"]
    assert info["de"]["adapter_checksum"] != info["sa"]["adapter_checksum"]
    sa_cfg = yaml.safe_load((out / "sa" / "adapter" / "training_config.yaml").read_text())
    assert sa_cfg["model"]["init_args"]["lora"]["init_adapter"] == info["cm"]["adapter"]

    # a second run skips every finished stage and leaves its files alone
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.relative_to(out).parts[0] in ("cm", "sa", "de")}
    capsys.readouterr()
    assert main(["pipeline", "--config", str(cfg), "--out_dir", str(out)]) == 0
    said = capsys.readouterr().out
    for stage in ("cm", "sa", "de"):
        assert f"{stage} already finished" in said
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert seen[1] == results  # a skipped stage's result is read back from its folder
    assert (out / "report.md").read_text() == md

    # --restart_from de redoes only DE
    assert main(["pipeline", "--config", str(cfg), "--out_dir", str(out), "--restart_from", "de"]) == 0
    said = capsys.readouterr().out
    assert "cm already finished" in said and "sa already finished" in said and "running de" in said
    assert json.loads((out / "de" / "stage.json").read_text())["init_adapter_checksum"] == info["sa"]["adapter_checksum"]
    assert seen[2]["de"].report == json.loads((out / "de" / "report.json").read_text())


def test_answer_summary_counts_blank_and_structure_less_answers_and_picks_the_same_examples():
    from prouie_pl.pipeline import answer_summary
    from prouie_pl.results import EvalResult

    from test_results import ROWS

    records = [rec for rec, _, _ in ROWS]
    summary = answer_summary(EvalResult.score(reversed(ROWS), "strict", "test"), records)
    assert (summary["answers"], summary["blank_answers"], summary["answers_without_structures"]) == (9, 2, 3)
    assert {t: [x["index"] for x in ex] for t, ex in summary["examples"].items()} == {"EE": [0, 1], "NER": [0, 1], "RE": [0, 1]}
    assert summary["examples"]["NER"][1] == {"dataset": "A", "index": 1, "sentence": "ner sentence 1",
                                             "gold": '{"person": "Bob"}', "prediction": '{"person": "Bob"'}
    assert answer_summary(EvalResult.score(ROWS), records, per_task=1)["examples"]["RE"][0]["prediction"] == '{"work for": "Ann -> IBM"}'


def _random_adapter(model_dir: Path, out: Path, scale: float = 0.05) -> Path:
    """A LoRA adapter with non-zero weights on every linear layer (as after training)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, scale)
    peft.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def _greedy(model, tok, prompts: list[str], n: int = 12) -> list[list[int]]:
    outs = []
    for p in prompts:
        ids = tok(p, return_tensors="pt", add_special_tokens=False)
        gen = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        outs.append(gen[0, ids["input_ids"].shape[1]:].tolist())
    return outs


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_reloads_and_generates_like_adapter_plus_base(tmp_path, tiny_model_dir, dtype):
    """float32: an untrained model, logits equal.  bfloat16: the pre-trained tiny base, whose greedy choices
    have real margins (an untrained model's near-ties flip under bf16 rounding either way)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prouie_pl.cli import main
    from prouie_pl.modeling import resolve_model_path

    if dtype == "bfloat16":
        tiny_model_dir = Path(resolve_model_path("tiny"))
    adapter = _random_adapter(tiny_model_dir, tmp_path / "adapter", scale=0.05 if dtype == "float32" else 0.02)
    out = tmp_path / "merged"
    assert main(["export", "--adapter", str(adapter), "--base", str(tiny_model_dir), "--out", str(out), "--dtype", dtype]) == 0
    assert not (out / "adapter_config.json").exists()
    torch_dtype = getattr(torch, dtype)
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch_dtype and not any("lora" in n for n, _ in merged.named_parameters())
    tok = AutoTokenizer.from_pretrained(out)
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch_dtype), adapter).eval()
    base_only = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch_dtype).eval()
    prompts = ["Text: Ada Lovelace met Charles Babbage in London.", "Task: named entity recognition.", "<|im_start|>user\nhello"]
    got, want = _greedy(merged.eval(), tok, prompts), _greedy(ref, tok, prompts)
    assert got == want
    assert _greedy(base_only, tok, prompts) != want  # the adapter changes what the model says
    if dtype == "float32":
        ids = tok(prompts[0], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            assert torch.allclose(merged(**ids).logits, ref(**ids).logits, atol=1e-4)


def test_export_rejects_a_folder_without_an_adapter(tmp_path, tiny_model_dir, capsys):
    from prouie_pl.cli import main

    code = main(["export", "--adapter", str(tmp_path), "--base", str(tiny_model_dir), "--out", str(tmp_path / "m")])
    assert code == 2
    assert "adapter_config.json" in capsys.readouterr().err
