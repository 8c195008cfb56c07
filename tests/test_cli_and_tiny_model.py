"""Command line basics, the embedded demo data and the offline tiny model."""

from __future__ import annotations

import filecmp
import json
import re
import subprocess
import sys

import pytest
import torch

from prouie_pl.cli import COMMANDS, main
from prouie_pl.demo_data import DATASETS, generate


def test_help_lists_every_command():
    proc = subprocess.run([sys.executable, "-m", "prouie_pl", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for name in COMMANDS:
        assert re.search(rf"\n +{name} ", proc.stdout), name


def test_shipped_demo_data_is_what_the_generator_makes(demo_dir, tmp_path):
    generate(tmp_path)
    for rel in DATASETS:
        for name in ("labels.json", "train.json", "dev.json", "test.json"):
            assert filecmp.cmp(demo_dir / rel / name, tmp_path / rel / name, shallow=False), (rel, name)


def test_render_evaluate_on_demo_data_and_missing_or_unknown_predictions(demo_dir, tmp_path, capsys):
    preds = tmp_path / "p.jsonl"
    assert main(["render", "--data_dir", str(demo_dir), "--format", "concise", "--out", str(preds)]) == 0
    lines = preds.read_text().splitlines()
    # drop one prediction, add one for a record that does not exist
    lines = lines[1:] + [json.dumps({"task": "NER", "dataset": "DemoNER", "index": 99999, "output": "{}"})]
    preds.write_text("\n".join(lines) + "\n")
    out = tmp_path / "report.json"
    assert main(["evaluate", "--data_dir", str(demo_dir), "--predictions", str(preds), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "NER/DemoNER record 99999: no such record in test" in err
    assert "record 0: no prediction (scored as an empty output)" in err
    rep = json.loads(out.read_text())
    assert rep["missing_predictions"] == 1 and rep["unknown_predictions"] == 1
    assert json.loads(lines[-2])["task"] == "EE"
    assert rep["tasks"]["RE_strict"]["average_f1"] == 100.0 and rep["tasks"]["EE_argument"]["average_f1"] == 100.0
    ner = rep["tasks"]["NER"]["datasets"]["DemoNER"]
    dropped = json.loads(preds.read_text().splitlines()[0])  # the record after the dropped one is still there
    assert dropped["index"] == 1
    assert ner["precision"] == 100.0 and ner["fn"] > 0 and ner["recall"] < 100.0 and ner["missing_predictions"] == 1


def test_tiny_model_loads_through_auto_classes_and_generates(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "llama" and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    text = tok.apply_chat_template([{"role": "user", "content": "Text: Ann lives in Oslo ."}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nText: Ann lives in Oslo .<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, return_tensors="pt")
    assert tok.decode(ids["input_ids"][0]) == text  # byte-level BPE round-trips exactly
    out = model.generate(**ids, max_new_tokens=5, do_sample=False, eos_token_id=tok.eos_token_id)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    assert 1 <= len(new) <= 5
    assert tok.eos_token_id not in new[:-1]  # generation stops at the first end token, if any
    logits = model(**ids).logits
    assert torch.isfinite(logits).all()
    assert new[0] == int(logits[0, -1].argmax())  # greedy: the first new token is the argmax of the last logits


def test_tiny_model_command(tmp_path):
    assert main(["tiny-model", "--out", str(tmp_path / "m"), "--hidden_size", "32", "--num_layers", "1", "--vocab_size", "600", "--pretrain_steps", "3"]) == 0
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["hidden_size"] == 32 and cfg["num_hidden_layers"] == 1 and cfg["vocab_size"] <= 600
    assert json.loads((tmp_path / "m" / "pretraining.json").read_text())["steps"] == 3


# ------------------------------------------------------------------------------------------ one command line


@pytest.mark.parametrize("command", ["fit", "render", "evaluate", "pipeline", "export", "extract", "tiny-model", "demo-data"])
def test_every_command_takes_a_config_file_and_prints_its_config(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert command == "fit" or (out.startswith("usage: python -m prouie_pl") and f" {command} " in out.splitlines()[0])
    assert "--config CONFIG" in out and "--print_config" in out


def test_pipeline_config_is_the_pipeline_yaml_and_prints_back(capsys):
    import yaml

    with pytest.raises(SystemExit) as exc:
        main(["pipeline", "--config", "tiny/pipeline.yaml", "--out_dir", "somewhere", "--print_config"])
    assert exc.value.code == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["stages"] == {"cm": "cm.yaml", "sa": "sa.yaml", "de": "de.yaml"}
    assert cfg["adapter"] == "best" and cfg["out_dir"] == "somewhere" and cfg["set"] is None


@pytest.mark.parametrize("argv, says", [
    (["fit", "--no_such_option", "1"], "no_such_option"),
    (["pipeline", "--no_such_option", "1"], "no_such_option"),
    (["export", "--adapter", "a", "--base", "b"], "out"),
    (["render", "--data_dir", "d", "--out", "o", "--format", "wide"], "format"),
    (["pipeline", "--adapter", "first"], "adapter"),
])
def test_bad_options_fail_the_same_way_for_every_command(argv, says, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and says in err and "Traceback" not in err
