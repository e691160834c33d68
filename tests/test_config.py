"""Recipe loading, overrides and ds_config filling: every bad input is one line naming the field."""
import json

import pytest

from dsgrow.config import ConfigError, parse_count
from dsgrow.engine.ds_config import fill_ds_config, read_ds_config
from dsgrow.families.spec import SpecError
from dsgrow.recipe import load_recipe


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_default_recipe_loads_and_overrides_apply():
    r = load_recipe(None, ["stages=null", "train.lr=3e-4", "model.layers=6", "train.tokens=2M"], out="runs/x")
    assert r.train.lr == pytest.approx(3e-4) and isinstance(r.train.lr, float)
    assert r.model.layers == 6 and r.train.tokens == 2_000_000 and r.out == "runs/x"
    assert r.train.warmup_tokens == int(0.05 * 2_000_000)


def test_default_recipe_is_a_two_stage_growth_run():
    r = load_recipe(None)
    s0, s1 = r.stage_plan()
    assert (s0.model.layers, s0.model.hidden, s1.model.layers, s1.model.hidden, s1.model.heads) == (4, 128, 8, 192, 6)
    assert s1.grow.method == "ligo" and s1.grow.fit_steps > 0
    assert s0.tokens + s1.tokens == r.train.tokens == 1_000_000
    # The fit's tokens come out of stage 2's budget; each stage warms up over 5% of its own tokens.
    assert s1.train.tokens == s1.tokens - s1.grow.fit_steps * s1.grow.fit_batch * r.train.seq_len
    assert s1.train.warmup_tokens == int(0.05 * s1.train.tokens) and s1.train.lr == pytest.approx(1.5e-3)


@pytest.mark.parametrize("text,count", [("2M", 2_000_000), ("500K", 500_000), ("1.5B", 1_500_000_000),
                                        (2e6, 2_000_000), ("2_000", 2000), (7, 7)])
def test_parse_count(text, count):
    assert parse_count(text, "x") == count


@pytest.mark.parametrize("overrides,needle", [
    (["train.lrr=1"], "train.lrr"),
    (["modell.layers=2"], "modell"),
    (["train.lr=fast"], "train.lr"),
    (["train.global_batch=30", "train.micro_batch=8"], "train.global_batch"),
    (["train.tokens=100"], "train.tokens"),
    (["model.hidden=100", "model.heads=3"], "model.hidden"),
    (["model.family=t5"], "model.family"),
    (["model.kv_heads=2"], "model.kv_heads"),
    (["data.val_fraction=1.5"], "data.val_fraction"),
    (["data.source=files"], "data.paths"),
    (["train.precision=fp8"], "train.precision"),
    (["train.seq_len=512"], "max_seq_len"),
    (["train.tokens=lots"], "train.tokens"),
    (["trainlr"], "KEY=VALUE"),
])
def test_bad_recipe_values_name_the_field(overrides, needle):
    with pytest.raises((ConfigError, SpecError)) as e:
        load_recipe(None, ["stages=null", "stages=null", *overrides])
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_missing_and_invalid_recipe_files(tmp_path):
    with pytest.raises(ConfigError, match="recipe not found"):
        load_recipe(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(write(tmp_path, "model: [\n"))
    with pytest.raises(ConfigError, match="unknown recipe key stages2"):
        load_recipe(write(tmp_path, "stages2: 1\n"))


def test_world_size_batch_arithmetic():
    r = load_recipe(None, ["stages=null", "train.global_batch=48", "train.micro_batch=16", "train.eval_samples=48"])
    r.train.check_world(1)
    r.train.check_world(3)
    with pytest.raises(ConfigError, match="not divisible by train.micro_batch"):
        r.train.check_world(2)


def ds(tmp_path, cfg):
    return read_ds_config(write(tmp_path, json.dumps(cfg), "ds.json"))


def test_ds_config_auto_fields_filled(tmp_path):
    r = load_recipe(None, ["stages=null", "train.global_batch=64", "train.micro_batch=8", "train.grad_clip=0.5"])
    cfg = fill_ds_config(read_ds_config("ds_configs/zero3_offload.json"), r.train, world_size=2, precision="bf16")
    assert cfg["train_batch_size"] == 64 and cfg["train_micro_batch_size_per_gpu"] == 8
    assert cfg["gradient_accumulation_steps"] == 4 and cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
    assert cfg["optimizer"]["params"]["lr"] == r.train.lr
    assert cfg["optimizer"]["params"]["betas"] == r.train.betas


@pytest.mark.parametrize("cfg,needle", [
    ({"train_micro_batch_size_per_gpu": 4}, "train_micro_batch_size_per_gpu=4"),
    ({"train_batch_size": 999}, "train_batch_size=999"),
    ({"gradient_clipping": 3.0}, "gradient_clipping"),
    ({"bf16": {"enabled": True}}, "bf16.enabled"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 0.5}}}, "optimizer.params.lr"),
    ({"scheduler": {"type": "WarmupLR"}}, "scheduler"),
    ({"zero_optimization": {"stage": 7}}, "zero_optimization.stage"),
])
def test_ds_config_contradictions(tmp_path, cfg, needle):
    r = load_recipe(None, ["stages=null"])
    with pytest.raises(ConfigError) as e:
        fill_ds_config(ds(tmp_path, cfg), r.train, world_size=1, precision="fp32")
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_ds_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="ds_config not found"):
        read_ds_config(str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_ds_config(write(tmp_path, "{oops", "bad.json"))


def test_import_dsgrow_does_not_import_deepspeed():
    import subprocess
    import sys

    code = ("import sys, dsgrow, dsgrow.config, dsgrow.recipe, dsgrow.launch, dsgrow.multinode, dsgrow.families, "
            "dsgrow.schedules.flops, dsgrow.train, dsgrow.cli, dsgrow.growth, dsgrow.hf_trainer, dsgrow.run.guard, "
            "dsgrow.engine.checkpoint; "
            "dsgrow.grow_engine, dsgrow.GrowthSchedule, dsgrow.GrowthReport; "
            "assert 'deepspeed' not in sys.modules, 'deepspeed imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_packaged_default_ds_config_is_ds_configs_zero2():
    """`--ds_config` defaults to a copy inside the package (an installed wheel has no ds_configs/)."""
    from pathlib import Path

    from dsgrow.launch import DEFAULT_DS_CONFIG, read_run_ds_config

    assert DEFAULT_DS_CONFIG == json.loads((Path(__file__).parent.parent / "ds_configs" / "zero2.json").read_text())
    assert read_run_ds_config(None) == DEFAULT_DS_CONFIG and read_run_ds_config(None) is not DEFAULT_DS_CONFIG
