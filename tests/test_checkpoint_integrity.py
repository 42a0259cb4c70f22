"""Damaged checkpoints are never used silently: per-array checksums recorded at save and verified at restore;
a damaged training step is moved aside for the previous one (resume, generate and evaluate alike)."""
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_evaluate import RECORDS, write_jsonl
from test_generate import save_vision_checkpoint
from wings_jax.checkpoint import (
    CHECKPOINTS_DIR, CHECKSUMS_ITEM, CONFIG_FILE, PARAMS_ITEM, CheckpointError, Checkpointer, checksums, load_model,
    params_dict,
)
from wings_jax.evaluate import main as evaluate_main
from wings_jax.generate import main as generate_main
from wings_jax.model.runtime import Runtime


def overwrite_bytes(item_dir: str) -> str:
    """Overwrites 16 bytes in the middle of the item's largest data file (same size); returns its path."""
    files = [os.path.join(root, name) for root, _, names in os.walk(item_dir) for name in names]
    target = max(files, key=os.path.getsize)
    size = os.path.getsize(target)
    with open(target, "r+b") as f:
        f.seek(size // 2)
        old = f.read(16)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in old))
    assert os.path.getsize(target) == size
    return target


def truncate_files(item_dir: str) -> None:
    """Every file of the item emptied: what a crash mid-write leaves."""
    for root, _, names in os.walk(item_dir):
        for name in names:
            open(os.path.join(root, name), "wb").close()


def _tree(seed):
    rng = np.random.RandomState(seed)
    return ({"w": jnp.asarray(rng.randn(256, 256).astype(np.float32)), "b": jnp.asarray(rng.randn(8), jnp.bfloat16)},
            {"mu": jnp.asarray(rng.randn(256, 256).astype(np.float32)), "count": jnp.int32(seed)})


def _abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def _saved_run(workdir, steps=(1, 2)):
    ckpt = Checkpointer(workdir, keep=5, async_save=True)
    for step in steps:
        params, opt_state = _tree(step)
        ckpt.save(step, params, opt_state, {"step": step})
    ckpt.close()


def test_checksums_do_not_depend_on_the_sharding_and_see_every_change():
    params, _ = _tree(0)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(4, 2), ("a", "b"))
    sharded = {"w": jax.device_put(params["w"], jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a", "b"))),
               "b": jax.device_put(params["b"], jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))}
    assert len(jax.devices()) == 8 and checksums(sharded) == checksums(params)
    base = checksums(params)["w"]
    w = np.asarray(params["w"])
    flipped = w.copy()
    flipped.view(np.uint32)[17, 3] ^= 1  # one bit
    swapped = w.copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # the same values elsewhere
    assert checksums({"w": flipped})["w"] != base and checksums({"w": swapped})["w"] != base


def test_resume_skips_a_step_with_overwritten_bytes_and_names_it(tmp_path, caplog):
    workdir = str(tmp_path / "run")
    _saved_run(workdir)
    damaged = overwrite_bytes(os.path.join(workdir, CHECKPOINTS_DIR, "2", PARAMS_ITEM))
    params, opt_state = _tree(2)
    with caplog.at_level(logging.WARNING):
        step, restored, opt, extra = Checkpointer(workdir, keep=5, async_save=False).restore_newest(
            _abstract(params), _abstract(opt_state))
    assert step == 1 and extra == {"step": 1}
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(_tree(1)[0]["w"]))
    assert "checkpoint step 2 is damaged" in caplog.text and os.path.join("2", PARAMS_ITEM) in caplog.text
    assert "differ from their recorded checksums (w)" in caplog.text
    assert os.path.isdir(os.path.join(workdir, CHECKPOINTS_DIR, "2.damaged")) and os.path.isfile(
        damaged.replace(f"{os.sep}2{os.sep}", f"{os.sep}2.damaged{os.sep}"))


def test_the_only_step_damaged_is_a_clear_error(tmp_path):
    workdir = str(tmp_path / "run")
    _saved_run(workdir, steps=(1,))
    overwrite_bytes(os.path.join(workdir, CHECKPOINTS_DIR, "1", "opt_state"))
    params, opt_state = _tree(1)
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* could be restored \(steps 1 were moved aside"):
        Checkpointer(workdir, keep=5, async_save=False).restore_newest(_abstract(params), _abstract(opt_state))


def test_a_step_of_other_parameter_names_is_an_error_and_stays(tmp_path):
    workdir = str(tmp_path / "run")
    _saved_run(workdir)
    params, opt_state = _tree(2)
    renamed = {"w_renamed": params["w"], "b": params["b"]}  # the same shapes under another name
    with pytest.raises(CheckpointError, match=r"checkpoint step 2 .* written for another model .*w_renamed"):
        Checkpointer(workdir, keep=5, async_save=False).restore_newest(_abstract(renamed), _abstract(opt_state))
    assert sorted(os.listdir(os.path.join(workdir, CHECKPOINTS_DIR))) == ["1", "2"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return save_vision_checkpoint(str(tmp_path_factory.mktemp("integrity")))


def _copy(converted, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(converted, ckpt)
    return ckpt


def test_generate_and_evaluate_refuse_a_damaged_converted_checkpoint(converted, tmp_path, capsys):
    ckpt = _copy(converted, tmp_path)
    overwrite_bytes(os.path.join(ckpt, PARAMS_ITEM))
    questions = write_jsonl(tmp_path / "q.jsonl", [{**r, "answer": 0} for r in RECORDS
                                                   if isinstance(r["options"], list) and "image" not in r])
    for main, args in ((generate_main, ["--prompt", "hi", "--max-new-tokens", "2"]),
                       (evaluate_main, ["--data", questions])):
        assert main(["--ckpt", ckpt, *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and os.path.join(ckpt, PARAMS_ITEM) in err
        assert "differ from their recorded checksums" in err and "damaged" in err


def _workdir_of(converted, tmp_path):
    """A training workdir holding the converted model's parameters at steps 1 and 2."""
    workdir = str(tmp_path / "run")
    shutil.copytree(converted, workdir, ignore=shutil.ignore_patterns(PARAMS_ITEM, CHECKSUMS_ITEM))
    model, _ = load_model(converted)
    ckpt = Checkpointer(workdir, keep=5, async_save=False)
    for step in (1, 2):
        ckpt.save(step, params_dict(model), {"count": jnp.int32(step)}, {"step": step})
    ckpt.close()
    return workdir


@pytest.mark.parametrize("damage", [overwrite_bytes, truncate_files])
def test_generate_falls_back_from_a_damaged_newest_step(converted, tmp_path, capsys, caplog, damage):
    workdir = _workdir_of(converted, tmp_path)
    damage(os.path.join(workdir, CHECKPOINTS_DIR, "2", PARAMS_ITEM))
    with caplog.at_level(logging.WARNING):
        assert generate_main(["--ckpt", workdir, "--prompt", "hi", "--max-new-tokens", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["generated_token_ids"]
    assert "checkpoint step 2 is damaged" in caplog.text
    assert os.path.join(workdir, CHECKPOINTS_DIR, "2", PARAMS_ITEM) in caplog.text
    assert sorted(os.listdir(os.path.join(workdir, CHECKPOINTS_DIR))) == ["1", "2.damaged"]


def test_checkpoints_without_checksums_still_load_with_a_note(converted, tmp_path, caplog):
    ckpt = _copy(converted, tmp_path)
    shutil.rmtree(os.path.join(ckpt, CHECKSUMS_ITEM))  # as written before checksums were recorded
    with caplog.at_level(logging.WARNING):
        model, _ = load_model(ckpt)
    reference, _ = load_model(converted)
    assert checksums(params_dict(model)) == checksums(params_dict(reference))
    assert "has no checksums" in caplog.text and os.path.exists(os.path.join(ckpt, CONFIG_FILE))


def test_a_float32_checkpoint_verifies_when_loaded_for_bfloat16(converted):
    """Checksums are of the saved dtype: the arrays are verified as stored, then cast to the dtype asked for."""
    stored, _ = load_model(converted)
    model, _ = load_model(converted, Runtime(dtype="bfloat16", param_dtype="bfloat16"))
    want = {k: np.asarray(v, np.float32) for k, v in params_dict(stored)["llm"]["final_norm"].items()}
    got = params_dict(model)["llm"]["final_norm"]
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(params_dict(model)))
    for k, v in got.items():
        np.testing.assert_allclose(np.asarray(v, np.float32), want[k], rtol=1e-2)
