"""Training: the demo learns, resume is exact, sharding is invisible to the loss, frozen stays frozen."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from jax_env import xla_flags
from wings_jax import sharding
from wings_jax.checkpoint import CheckpointError, load_model
from wings_jax.config import ConfigError, load_config
from wings_jax.data.demo import ensure_demo_dataset
from wings_jax.data.tokenizer import load_tokenizer
from wings_jax.multiple_choice import evaluate, read_questions
from wings_jax.generate import main as generate_main
from wings_jax.params import flat_values, flatten_dict
from wings_jax.train import main as train_main
from wings_jax.training.loop import TrainingError, train
from wings_jax.training.metrics import MetricsWriter
from wings_jax.training.plan import plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.py")


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("demo_data"))
    ensure_demo_dataset(directory, num_records=128)
    return directory


def _config(demo_data, *overrides):
    base = [f"demo_data.dir={demo_data}", "demo_data.num_records=128", "data.max_len=64", "train.loss_chunk=64",
            "train.log_every=1", "data.shuffle=false"]
    return load_config(DEMO, base + list(overrides))


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def _single_device_mesh():
    return sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def test_demo_loss_falls_and_checkpoint_loads(demo_data, tmp_path, capsys):
    workdir = str(tmp_path / "run")
    cfg = _config(demo_data, "train.steps=60", "checkpoint.every=30")
    result = train(cfg, workdir, mesh=_single_device_mesh())
    losses = _losses(workdir)
    assert result["ended"] == "completed" and result["step"] == 60 and sorted(losses) == list(range(1, 61))
    first, last = np.mean([losses[s] for s in (1, 2, 3)]), np.mean([losses[s] for s in (58, 59, 60)])
    assert last < 0.35 * first, (first, last)
    record = json.loads(open(os.path.join(workdir, "metrics.jsonl")).readline())
    for key in ("step", "loss", "learning_rate/llm", "learning_rate/learners", "learning_rate/projector", "grad_norm",
                "tokens_per_s", "step_time_s"):
        assert key in record
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    # a training workdir is a checkpoint that generation loads: its newest step, with the tokenizer
    image = os.path.join(demo_data, "images", sorted(os.listdir(os.path.join(demo_data, "images")))[0])
    assert generate_main(["--ckpt", workdir, "--prompt", "What colour is the image?", "--image", image,
                          "--max-new-tokens", "6", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert answer["generated_token_ids"] and isinstance(answer["text"], str)
    model, _ = load_model(workdir)
    final = flat_values(nnx.state(model, nnx.Param))["llm/final_norm/scale"]
    assert not np.allclose(np.asarray(final), 1.0)  # the newest step's trained weights, not an initialisation


def _run_cli(workdir, demo_data, steps, env_extra=None, wait=True):
    args = [sys.executable, "-m", "wings_jax.train", "--config", DEMO, "--workdir", workdir,
            f"--config.demo_data.dir={demo_data}", "--config.demo_data.num_records=128", "--config.data.max_len=64",
            "--config.train.loss_chunk=64", "--config.data.shuffle=false", "--config.train.log_every=1",
            f"--config.train.steps={steps}", "--config.checkpoint.every=2", "--config.mesh.data=1"]
    env = {**os.environ, "XLA_FLAGS": xla_flags(1), **(env_extra or {})}
    process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        out, _ = process.communicate(timeout=600)
        return process.returncode, out
    return process


def test_sigterm_then_resume_reproduces_the_uninterrupted_run(demo_data, tmp_path):
    straight = str(tmp_path / "straight")
    code, out = _run_cli(straight, demo_data, 8)
    assert code == 0, out
    assert "data: 128 records read, 0 skipped" in out  # the end-of-run summary (8 steps x 16 rows)
    expected = _losses(straight)

    resumed = str(tmp_path / "resumed")
    process = _run_cli(resumed, demo_data, 8, wait=False)
    metrics = os.path.join(resumed, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 3):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, out
    stopped = max(_losses(resumed))
    assert 3 <= stopped < 8 and "SIGTERM: saved step" in out
    code, out = _run_cli(resumed, demo_data, 8)
    assert code == 0 and "resumed from step" in out, out
    got = _losses(resumed)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert abs(got[step] - expected[step]) <= 1e-6, (step, got[step], expected[step])

    # A half-written newer step (killed during a save) is skipped for the last complete one.
    checkpoints = os.path.join(resumed, "checkpoints")
    shutil.copytree(os.path.join(checkpoints, "8"), os.path.join(checkpoints, "10"))
    shutil.rmtree(os.path.join(checkpoints, "10", "opt_state"))
    for root, _, files in os.walk(os.path.join(checkpoints, "10", "params")):
        for name in files:
            open(os.path.join(root, name), "wb").close()
    code, out = _run_cli(resumed, demo_data, 10)
    assert code == 0 and "checkpoint step 10 is damaged" in out and "resumed from step 8" in out, out
    assert sorted(_losses(resumed)) == list(range(1, 11))


def test_sigterm_during_start_up_is_a_clean_stop(demo_data, tmp_path):
    """A signal during imports or planning, before the first step, gives the same handled exit (143) as one
    during training, with nothing half-written."""
    workdir = str(tmp_path / "early")
    process = _run_cli(workdir, demo_data, 8, wait=False)
    time.sleep(2)  # inside Python's start-up and imports (several seconds), well before the first step
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, out
    assert "SIGTERM" in out and "Traceback" not in out, out
    checkpoints = os.path.join(workdir, "checkpoints")
    assert not os.path.exists(checkpoints) or not os.listdir(checkpoints), os.listdir(checkpoints)


@pytest.fixture(scope="module")
def single_device_losses(demo_data, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("one"))
    result = train(_config(demo_data, "train.steps=3", "checkpoint.every=100"), workdir, mesh=_single_device_mesh())
    assert result["step"] == 3
    return _losses(workdir)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_training_matches_single_device(demo_data, tmp_path, shape, single_device_losses):
    mesh = sharding.make_mesh(*shape)
    cfg = _config(demo_data, "train.steps=3", "checkpoint.every=100")
    train(cfg, str(tmp_path / "many"), mesh=mesh)
    losses = _losses(str(tmp_path / "many"))
    for step in (1, 2, 3):
        assert abs(losses[step] - single_device_losses[step]) < 1e-4, (shape, step)
    # parameters are laid out as the rules say
    p = plan(cfg, mesh)
    spec = lambda path: p.abstract_trainable["llm"]["layers"]["attn"][path]["kernel"].sharding.spec  # noqa: E731
    assert spec("q") == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert spec("o") == jax.sharding.PartitionSpec(None, "tensor", None, "fsdp")
    assert p.abstract_trainable["llm"]["embed"]["embedding"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert p.abstract_frozen["vision"]["layers"]["mlp"]["fc1"]["kernel"].sharding.spec == \
        jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    # ... and so is the trained state the run ends with
    restored, _ = load_model(str(tmp_path / "many"), shardings_fn=lambda state: sharding.state_shardings(state, mesh))
    kernel = restored.llm.layers.mlp.gate.kernel.get_value()
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert len({s.device for s in kernel.addressable_shards}) == mesh.size


def test_frozen_parameters_stay_bit_identical(demo_data, tmp_path):
    workdir = str(tmp_path / "pretrain")
    cfg = _config(demo_data, "train.steps=3", "model.wings.stage=pretrain", "checkpoint.every=100")
    cfg.unlock()
    cfg.optim.groups = {"projector": {"pattern": r"^projector/", "lr": 1e-2},
                        "visual": {"pattern": r"^llm/layers/side/visual/", "lr": 1e-2}}
    cfg.lock()
    mesh = _single_device_mesh()
    p = plan(cfg, mesh)
    before = jax.jit(lambda: nnx.state(p.make_model(nnx.Rngs(cfg.data.seed)), nnx.Param).to_pure_dict())()
    train(cfg, workdir, mesh=mesh)
    after, _ = load_model(workdir)
    before, after = flatten_dict(before), flat_values(nnx.state(after, nnx.Param))
    moved = {path for path in before if not np.array_equal(np.asarray(before[path]), np.asarray(after[path]))}
    assert moved, "nothing trained"
    assert all(path.startswith(("projector/", "llm/layers/side/visual/")) for path in moved), sorted(moved)[:5]
    assert any(path.startswith("projector/") for path in moved)
    assert any(path.startswith("llm/layers/side/visual/") for path in moved)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(demo_data, tmp_path):
    workdir = str(tmp_path / "nan")
    cfg = _config(demo_data, "train.steps=40", "checkpoint.every=1", "optim.warmup_ratio=0.0", "optim.clip_norm=0.0")
    cfg.unlock()
    cfg.optim.groups = {"all": {"pattern": r"^(llm|projector)/", "lr": 1e12}}
    cfg.lock()
    with pytest.raises(TrainingError, match=r"non-finite loss .* at step (\d+).*Last good checkpoint"):
        train(cfg, workdir, mesh=_single_device_mesh())
    losses = _losses(workdir)
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert steps and all(np.isfinite(losses[s]) for s in steps) and max(steps) == max(losses)


@pytest.mark.parametrize("override, message", [
    ("optim.groups.llm.lr=-1e-4", "optim.groups.llm.lr=-0.0001 must be a finite number zero or positive"),
    ("optim.warmup_ratio=-0.1", "optim.warmup_ratio=-0.1 must be a finite number in [0, 1]"),
    ("optim.warmup_ratio=1.5", "optim.warmup_ratio=1.5 must be"),
    ("optim.b1=1.0", "optim.b1=1.0 must be a finite number in [0, 1)"),
    ("optim.b2=-0.5", "optim.b2=-0.5 must be"),
    ("optim.eps=0.0", "optim.eps=0.0 must be a finite number positive"),
    ("optim.weight_decay=-0.01", "optim.weight_decay=-0.01 must be"),
    ("optim.clip_norm=-1.0", "optim.clip_norm=-1.0 must be a finite number zero (no clipping) or positive"),
    ("optim.groups.projector.lr=nan", "optim.groups.projector.lr=nan must be"),
])
def test_impossible_optimizer_settings_are_refused(demo_data, override, message):
    with pytest.raises(ConfigError) as e:
        plan(_config(demo_data, override), _single_device_mesh())
    assert message in str(e.value)


@pytest.mark.parametrize("override", ["data.packing=true", "data.max_images=2"])
def test_reference_mixing_refuses_packed_rows_and_several_images(demo_data, override):
    with pytest.raises(ConfigError, match="mixing='reference' handles one unpacked conversation"):
        plan(_config(demo_data, "model.wings.mixing=reference", override), _single_device_mesh())


def test_clip_norm_zero_means_off_and_the_progress_bar_shows_every_group_rate(demo_data, tmp_path):
    plan(_config(demo_data, "optim.clip_norm=0.0"), _single_device_mesh())  # accepted
    writer = MetricsWriter(str(tmp_path), 10, 0)
    writer.write(1, {"loss": 2.0, "learning_rate/llm": 1e-5, "learning_rate/projector": 3e-4})
    shown = str(writer._bar)
    writer.close()
    assert "lr/llm=1e-05" in shown and "lr/projector=0.0003" in shown, shown


def test_config_errors_are_clear(demo_data, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stepz'"):
        load_config(DEMO, ["train.stepz=3"])
    with pytest.raises(ConfigError, match=r"train.steps.*int.*'many'"):
        load_config(DEMO, ["train.steps=many"])
    code = train_main(["--config", DEMO, "--workdir", str(tmp_path / "w"), "--config.mesh.data=3"])
    assert code == 1 and "mesh (data=3, fsdp=1, tensor=1) needs 3 devices, but 8 are present" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"global_batch_size=16 must be a multiple of .* = 32"):
        plan(_config(demo_data, "train.grad_accum=4"), sharding.make_mesh(8, 1, 1))
    cfg = _config(demo_data)
    cfg.unlock()
    cfg.optim.groups = {"a": {"pattern": r"^llm/", "lr": 1.0}, "b": {"pattern": r"/side/", "lr": 1.0}}
    with pytest.raises(ValueError, match=r"more than one optim.groups entry.*llm/layers/side/"):
        plan(cfg, _single_device_mesh())
    cfg.optim.groups = {"a": {"pattern": r"^nothing/", "lr": 1.0}}
    with pytest.raises(ValueError, match=r"optim.groups \['a'\] match no parameter"):
        plan(cfg, _single_device_mesh())


def test_planning_needs_the_data_shapes_not_its_sources(demo_data, tmp_path):
    """A step compiles from max_len / max_images alone; only training refuses a run with nothing to read."""
    cfg = load_config(DEMO, ["demo_data.dir=", "data.max_len=64", "train.loss_chunk=64"])
    assert not cfg.data.sources
    p = plan(cfg, _single_device_mesh())
    assert p.batch_shapes["tokens"].shape == (cfg.train.global_batch_size, 64)
    with pytest.raises(ConfigError, match="data.sources is empty"):
        train(cfg, str(tmp_path / "run"), mesh=_single_device_mesh())


def test_gradient_accumulation_and_labelled_positions_match_one_big_batch(demo_data, tmp_path):
    one = train(_config(demo_data, "train.steps=2", "checkpoint.every=100"), str(tmp_path / "a"),
                mesh=_single_device_mesh())
    four = train(_config(demo_data, "train.steps=2", "checkpoint.every=100", "train.grad_accum=4"),
                 str(tmp_path / "b"), mesh=_single_device_mesh())
    labelled = train(_config(demo_data, "train.steps=2", "checkpoint.every=100", "train.loss_positions=16"),
                     str(tmp_path / "c"), mesh=_single_device_mesh())
    a, b, c = (_losses(str(tmp_path / d)) for d in "abc")
    assert one["step"] == four["step"] == labelled["step"] == 2
    for step in (1, 2):
        assert abs(a[step] - b[step]) < 1e-5
        assert abs(a[step] - c[step]) < 1e-5  # the loss over labelled positions only is the same loss


def test_init_from_a_workdir_is_separate_from_resuming(demo_data, tmp_path):
    """A new run starts from another run's weights (init_from), in its own workdir, at step 0."""
    first = str(tmp_path / "first")
    train(_config(demo_data, "train.steps=2", "checkpoint.every=100"), first, mesh=_single_device_mesh())
    second = str(tmp_path / "second")
    cfg = _config(demo_data, "train.steps=2", "checkpoint.every=100", "model.wings.stage=pretrain",
                  "train.profile_steps=(1, 1)")
    cfg.unlock()
    cfg.init_from = first
    cfg.optim.groups = {"visual": {"pattern": r"^llm/layers/side/visual/", "lr": 1e-2}}
    cfg.lock()
    result = train(cfg, second, mesh=_single_device_mesh())
    assert result["step"] == 2 and sorted(_losses(second)) == [1, 2]  # started at 0, not resumed
    start, _ = load_model(first)
    end, _ = load_model(second)
    a, b = flat_values(nnx.state(start, nnx.Param)), flat_values(nnx.state(end, nnx.Param))
    assert end.cfg.wings.stage == "pretrain"
    for path in a:  # everything outside the trained group is init_from's, bit for bit
        if not path.startswith("llm/layers/side/visual/"):
            np.testing.assert_array_equal(np.asarray(a[path]), np.asarray(b[path]), err_msg=path)
    assert any(files for _, _, files in os.walk(os.path.join(second, "profile")))  # the requested trace
    # resuming a workdir under a config that changed the parameters' shapes is refused, not restarted
    changed = _config(demo_data, "train.steps=3", "model.llm.intermediate_size=96")
    with pytest.raises(CheckpointError, match=r"checkpoint step 2 .* was written for another model"):
        train(changed, first, mesh=_single_device_mesh())
    assert sorted(_losses(first)) == [1, 2] and os.path.isdir(os.path.join(first, "checkpoints", "2"))
    # a config that describes another architecture than init_from's is refused
    wrong = _config(demo_data, "model.llm.num_layers=3")
    wrong.unlock()
    wrong.init_from = first
    with pytest.raises(ConfigError, match="differs from init_from"):
        plan(wrong, _single_device_mesh())


def test_a_text_only_model_trains_on_text_data(demo_data, tmp_path):
    """A model without a vision tower: no image slots in the batch, text-only records."""
    cfg = _config(demo_data, "train.steps=2", "checkpoint.every=100", "data.max_images=0")
    cfg.unlock()
    cfg.model.vision = {}
    cfg.demo_data.dir = ""
    demo = ensure_demo_dataset(demo_data, num_records=128)
    cfg.data.sources = demo.source_configs()[1:]  # the text-only file
    cfg.data.tokenizer = demo.tokenizer_dir
    cfg.optim.groups = {k: v for k, v in cfg.optim.groups.to_dict().items() if k != "projector"}
    cfg.lock()
    result = train(cfg, str(tmp_path / "text"), mesh=_single_device_mesh())
    losses = _losses(str(tmp_path / "text"))
    assert result["step"] == 2 and all(np.isfinite(losses[s]) for s in (1, 2))
    model, _ = load_model(str(tmp_path / "text"))
    assert model.vision is None


def test_eval_every_logs_held_out_accuracy_with_the_other_metrics(demo_data, tmp_path):
    demo = ensure_demo_dataset(demo_data, num_records=128)
    questions = str(tmp_path / "questions.jsonl")
    with open(questions, "w") as f:
        for a, b in [(1, 2), (3, 4), (5, 1), (2, 2)]:
            f.write(json.dumps({"question": f"What is {a} plus {b}?", "options": [f"{a} plus {b} is {a + b}.",
                                f"{a} plus {b} is {a + b + 1}."], "answer": "A"}) + "\n")
        f.write(json.dumps({"question": "What colour is the image?", "options": ["It is red.", "It is blue."],
                            "answer": 0, "image": os.path.join(demo.image_root, "00000.png")}) + "\n")
    workdir = str(tmp_path / "run")
    cfg = _config(demo_data, "train.steps=5", "train.log_every=100", "train.eval_every=2", "checkpoint.every=100",
                  "train.eval_batch_size=4")
    cfg.unlock()
    cfg.train.eval_data = {"mixed": questions}
    cfg.lock()
    train(cfg, workdir, mesh=_single_device_mesh())
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = {r["step"]: r for r in map(json.loads, f)}
    assert sorted(records) == [0, 2, 4, 5]  # step 0, every 2 steps, the end (the loss is logged with them)
    assert all(0 <= records[s]["eval/mixed"] <= 1 for s in records) and "loss" in records[4]
    model, _ = load_model(workdir)
    tokenizer = load_tokenizer(workdir)
    standalone = evaluate(model, tokenizer, read_questions(questions), batch_size=4, progress=False)
    assert records[5]["eval/mixed"] == standalone["accuracy"]
    cfg = _config(demo_data, "train.eval_every=3")
    with pytest.raises(ConfigError, match="train.eval_data"):
        plan(cfg, _single_device_mesh())


def test_step_times_leave_the_evaluation_out(demo_data, tmp_path, monkeypatch):
    """A fake clock jumps by 1000 s during each evaluation: no logged step time may include the jump."""
    import types

    import wings_jax.training.loop as train_module

    offset = [0.0]
    clock = types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + offset[0])

    def slow_evaluation(*args):
        offset[0] += 1000.0
        return {"eval/fake": 0.5}

    monkeypatch.setattr(train_module, "time", clock)
    monkeypatch.setattr(train_module, "_held_out_accuracy", slow_evaluation)
    workdir = str(tmp_path / "run")
    cfg = _config(demo_data, "train.steps=4", "train.eval_every=2", "checkpoint.every=100")
    cfg.unlock()
    cfg.train.eval_data = {"fake": "unused.jsonl"}
    cfg.lock()
    monkeypatch.setattr(train_module, "read_questions", lambda path: [])
    train(cfg, workdir, mesh=_single_device_mesh())
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records if "eval/fake" in r] == [0, 2, 4]
    assert all(r["step_time_s"] < 1000 for r in records if "step_time_s" in r)
