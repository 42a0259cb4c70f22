"""Run configs through ml_collections.config_flags: typed overrides, placeholders for None defaults, the
config argument, and one-line errors naming the key or file at fault."""
import dataclasses
import os

import ml_collections
import pytest

from wings_jax.checkpoint import write_config
from wings_jax.config import ConfigError, load_config, parse_command_line
from wings_jax.training import run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.py")
FINETUNE = os.path.join(ROOT, "configs", "finetune.py")


def test_overrides_are_typed_by_their_field_and_the_rest_is_left():
    cfg, path, rest = parse_command_line(["--config", DEMO, "--config.train.steps", "7", "--workdir", "w",
                                          "--config.optim.groups.llm.lr=1e-4", "--config.data.shuffle=false"])
    assert (cfg.train.steps, cfg.optim.groups.llm.lr, cfg.data.shuffle) == (7, 1e-4, False)
    assert path == DEMO and rest == ["--workdir", "w"]
    with pytest.raises(AttributeError):  # locked: a typo cannot add a field
        cfg.train.stepz = 1


def test_fields_whose_default_is_none_take_values_of_their_type():
    cfg = load_config(DEMO, ["data.num_epochs=2", "model.wings.learner_layers=(0, 1)"])
    assert cfg.data.num_epochs == 2 and cfg.model.wings.learner_layers == (0, 1)
    fresh = load_config(DEMO)
    assert fresh.data.num_epochs is None and fresh.model.wings.learner_layers is None


def test_the_config_argument_and_the_default_file():
    cfg, path, _ = parse_command_line([f"--config={FINETUNE}:main=/d/x.array_record,text=/d/t.array_record"])
    assert [s.weight for s in cfg.data.sources] == [3.0, 1.0] and path.endswith(":main=/d/x.array_record,text=/d/t.array_record")
    cfg, path, rest = parse_command_line(["--config.train.steps=4"], default=DEMO)
    assert path == DEMO and cfg.train.steps == 4 and rest == []


@pytest.mark.parametrize("argv, message", [
    (["--config.train.stepz=3"], r"^unknown config key 'train.stepz'; keys at train: .*steps"),
    (["--config.nope.x=1"], r"^unknown config key 'nope.x'; keys at the top: checkpoint, data"),
    (["--config.train.steps=many"], r"^config key 'train.steps' is typed int; cannot read 'many' as one"),
    (["--config.data.shuffle=maybe"], r"^config key 'data.shuffle' is typed bool; cannot read 'maybe'"),
    (["--config.data.num_epochs=x"], r"^config key 'data.num_epochs' is typed int; cannot read 'x'"),
    (["--config.data.sources=[]"], r"^config key 'data.sources' holds a list, which the command line cannot set"),
    (["--config", "nowhere.py"], r"^config file 'nowhere.py' does not exist$"),
    (["--config"], r"^--config needs a file path$"),
])
def test_errors_name_what_is_wrong_in_one_line(argv, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_command_line(argv, default=DEMO)
    assert "\n" not in str(info.value)


def test_a_config_file_that_fails_names_itself(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config():\n    raise RuntimeError('no such recipe')\n")
    with pytest.raises(ConfigError, match=r"broken.py.*no such recipe") as info:
        load_config(str(broken))
    assert "\n" not in str(info.value)


def _init_from(tmp_path) -> str:
    """A directory that init_from can read the architecture of (only its wings_config.json is needed to plan)."""
    demo = run_config.model_config(load_config(DEMO))
    wings = dataclasses.replace(demo.wings, lora_rank=4, system_prompt_length=5)
    write_config(str(tmp_path / "ckpt"), dataclasses.replace(demo, wings=wings))
    return str(tmp_path / "ckpt")


def _from_checkpoint(init_from: str, *overrides: str):
    cfg = load_config(FINETUNE, [f"init_from={init_from}", *overrides])
    cfg.unlock()
    cfg.model.llm, cfg.model.vision = ml_collections.ConfigDict(), ml_collections.ConfigDict()
    return cfg


def test_architecture_settings_init_from_would_ignore_are_refused_by_name(tmp_path):
    ckpt = _init_from(tmp_path)
    assert run_config.model_config(_from_checkpoint(ckpt, "model.wings.stage=pretrain")).wings.lora_rank == 4
    cfg = _from_checkpoint(ckpt, "model.wings.lora_rank=16", "model.projector=linear")
    cfg.model.vision = ml_collections.ConfigDict({"image_size": 64})
    with pytest.raises(ConfigError) as e:
        run_config.model_config(cfg)
    message = str(e.value)
    assert "\n" not in message and "init_from" in message
    for key in ("model.vision.image_size=64", "model.projector='linear'", "model.wings.lora_rank=16"):
        assert key in message, message
    # a setting equal to the checkpoint's changes nothing and is accepted
    assert run_config.model_config(_from_checkpoint(ckpt, "model.wings.lora_rank=4")).wings.lora_rank == 4


def test_system_prompt_length_is_a_command_line_setting_applied_with_init_from(tmp_path):
    ckpt = _init_from(tmp_path)
    assert run_config.model_config(load_config(DEMO)).wings.system_prompt_length == 14  # WingsConfig's default
    cfg, _, _ = parse_command_line(["--config", DEMO, "--config.model.wings.system_prompt_length=5"])
    assert run_config.model_config(cfg).wings.system_prompt_length == 5
    assert run_config.model_config(_from_checkpoint(ckpt)).wings.system_prompt_length == 5  # unset: init_from's
    assert run_config.model_config(load_config(DEMO, [f"init_from={ckpt}", "model.wings.lora_rank=4"])).wings \
        .system_prompt_length == 5
    assert run_config.model_config(_from_checkpoint(ckpt, "model.wings.system_prompt_length=7")).wings \
        .system_prompt_length == 7
    described = load_config(DEMO, [f"init_from={ckpt}", "model.wings.lora_rank=4",
                                   "model.wings.system_prompt_length=9"])
    assert run_config.model_config(described).wings.system_prompt_length == 9


@pytest.mark.parametrize("argv, process_count, message", [
    (["--config.train.global_batch_size=4"], 3, r"global_batch_size=4 must be a positive multiple of the number of "
                                                r"processes \(3\)"),
    (["--config.data.max_len=1000"], 1, r"^data.max_len needs 1000 positions, but the model's router weighs at most "
                                        r"128 \(wings.router_max_len\)"),
    (["--config.model.vision={}"], 1, r"^the model has no vision tower \(tokens_per_image=0\), so data.max_images "
                                      r"must be 0 \(is 1\)"),
])
def test_the_run_check_uses_the_checks_the_data_and_inference_share(argv, process_count, message):
    """The run check reports the data pipeline's and inference's own checks (data.checks) as config errors."""
    cfg, _, _ = parse_command_line(argv, default=DEMO)
    with pytest.raises(ConfigError, match=message):
        run_config.check_run(cfg, run_config.model_config(cfg), 1, process_count)


@pytest.mark.parametrize("argv, message", [
    (["--config.train.loss_positions=200"], r"^train.loss_positions=200 must be 0 \(every position\) or at most "
                                            r"data.max_len=128 and a multiple of train.loss_chunk=128 \(or below it\)"),
    (["--config.train.loss_positions=40", "--config.train.loss_chunk=32"], r"^train.loss_positions=40 must be"),
    (["--config.train.loss_logits_dtype=int8"], r"^train.loss_logits_dtype='int8'; choose one of"),
])
def test_loss_settings_no_step_can_run_are_refused(argv, message):
    cfg, _, _ = parse_command_line(argv, default=DEMO)
    with pytest.raises(ConfigError, match=message):
        run_config.check_run(cfg, run_config.model_config(cfg), 1, 1)
    ok, _, _ = parse_command_line(["--config.train.loss_positions=32", "--config.train.loss_chunk=64"], default=DEMO)
    run_config.check_run(ok, run_config.model_config(ok), 1, 1)  # fewer positions than a chunk: one chunk


def test_runtime_rows_follow_data_packing_and_are_not_a_key():
    """Unpacked data lets the cudnn / dot_product attentions take masks as structure; packed data keeps the
    dense mask. The layout is the data's, so no command-line key can contradict it."""
    assert run_config.runtime(load_config(DEMO, ["data.packing=False"])).rows == "padded"
    assert run_config.runtime(load_config(DEMO, ["data.packing=True"])).rows == "packed"
    with pytest.raises(ConfigError):
        load_config(DEMO, ["runtime.rows=padded"])
