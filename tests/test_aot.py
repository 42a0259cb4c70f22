"""Compile-ahead planning (wings_jax.aot): the demo model compiled for a TPU slice via libtpu and for the local CPUs."""
import importlib.util
import os
import re
import subprocess
import sys

import pytest

from wings_jax import aot, flops, hlo_loops
from wings_jax.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.py")
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason=f"libtpu is not installed (TPU compiler for compile-only topologies): pip install '{aot.libtpu_requirement()}'")
# A demo model far too large for a 16 GiB v5e chip when replicated (data parallel, ~2 B parameters).
TOO_BIG = ["model.llm.hidden_size=8192", "model.llm.intermediate_size=32768", "model.llm.num_heads=64",
           "model.llm.num_kv_heads=8"]


def _gib_figures(text: str) -> dict[str, float]:
    """The memory lines of a report, in GiB."""
    return {m.group(1).strip(): float(m.group(2)) / (1024 if m.group(3) == "MiB" else 1)
            for m in re.finditer(r"^  ([a-z ]+?)\s+([\d.]+) (GiB|MiB)", text, re.M)}


@pytest.mark.parametrize("name, libtpu_name, chips", [
    ("v5p-8", "v5p:2x2x1", 4), ("v5p-16", "v5p:2x2x2", 8), ("v5p-64", "v5p:2x4x4", 32),
    ("v5p-128", "v5p:4x4x4", 64), ("v4-32", "v4:2x2x4", 16), ("v5e-16", "v5e:4x4", 16),
    ("v5litepod-16", "v5e:4x4", 16), ("v5e-8", "v5e:2x4", 8), ("v6e-8", "v6e:2x4", 8), ("v5p:2x4x4", "v5p:2x4x4", 32),
])
def test_slice_names(name, libtpu_name, chips):
    s = aot.parse_topology(name)
    assert (s.libtpu_name, s.chips) == (libtpu_name, chips)


@pytest.mark.parametrize("name", ["v5p-12", "v5p-7", "v3-8", "h100-8", "v5e:2x2x2"])
def test_bad_slice_names(name):
    with pytest.raises(aot.AotError, match=r"e\.g\. v5"):
        aot.parse_topology(name)


def test_loop_scale_counts_trip_counts():
    """A while loop of 4 trips around one 100-cycle fusion, plus 10 cycles outside: 410 / 110."""
    hlo = """\
%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  %x = f32[8] get-tuple-element(%p), index=1
  %f = f32[8] fusion(%x), kind=kLoop, calls=%fused, backend_config={"estimated_cycles":"100"}
  ROOT %t = (s32[], f32[8]) tuple(%next, %f)
}
%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}
ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8] parameter(0)
  %zero = s32[] constant(0)
  %start = s32[] copy(%zero)
  %c = f32[8] copy(%a), backend_config={"estimated_cycles":"10"}
  %init = (s32[], f32[8]) tuple(%start, /*index=1*/%c)
  %w = (s32[], f32[8]) while(%init), condition=%cond, body=%body
  ROOT %r = f32[8] get-tuple-element(%w), index=1
}
"""
    assert hlo_loops.loop_scale(hlo) == pytest.approx(410 / 110)
    # a custom call whose attribute spans lines (Pallas kernels' metadata) does not end the loop body early
    kernel = ('  %k = f32[8] custom-call(%x), custom_call_target="tpu_custom_call", frontend_attributes={m={\n'
              '"xprof_metadata":"{}"\n}}, metadata={op_name="kernel"}\n')
    assert hlo_loops.loop_scale(hlo.replace("  %f = f32[8] fusion", kernel + "  %f = f32[8] fusion")) \
        == pytest.approx(410 / 110)
    assert hlo_loops.loop_scale(hlo.replace("direction=LT", "direction=NE")) is None  # unknown loop shape


@needs_libtpu
@pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache")  # compile-only executables
def test_compile_only_for_a_tpu_slice():
    report = aot.compile_only(load_config(DEMO), topology="v5p-8")
    assert report["fits"] and report["chips"] == 4 and report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert report["hbm_bytes"] == 95 * aot.GIB and report["device_kind"].startswith("TPU v5")
    assert report["memory"]["arguments"] > 0 and report["memory"]["temporaries"] > 0
    assert 0 < report["total_bytes"] < report["hbm_bytes"]
    assert report["compiler_flops"] > 0 and report["model_flops"] > 0
    assert report["estimated_step_seconds"] > 0 and 0 < report["mfu"] < 1
    specs = {p["path"]: p["spec"] for p in report["parameters"]}
    assert specs["llm/layers/mlp/down/kernel"] == "P(None, 'tensor', 'fsdp')"
    text = aot.format_report(report)
    figures = _gib_figures(text)
    for key in ("arguments", "outputs", "temporaries", "generated code", "total", "chip memory"):
        assert figures[key] > 0, (key, text)
    assert "fits" in text and "DOES NOT FIT" not in text and "estimated MFU" in text
    # where the estimate goes: shares of the loop-scaled cycles by the source line that wrote each op
    shares = dict(report["cycle_breakdown"])
    assert 0.3 < sum(shares.values()) <= 1 + 1e-9 and report["uncosted_kernels"] == 0
    assert any(where.startswith("attention.py:") for where in shares), shares
    assert any(where.startswith("layers.py:Linear.__call__") for where in shares), shares
    assert "where the estimate goes" in text and "at most" not in text


@needs_libtpu
@pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache")
def test_compile_only_with_splash_kernels_says_the_estimate_leaves_them_out():
    """The Mosaic kernels compile for the slice; the cost model gives them no time, and the report says so."""
    report = aot.compile_only(load_config(DEMO, ["runtime.attention=splash"]), topology="v5p-8")
    assert report["fits"] and report["uncosted_kernels"] > 0
    assert "Pallas kernel" in report["step_time_note"]
    assert "estimated MFU            at most" in aot.format_report(report)


@needs_libtpu
def test_command_line_compile_only_for_a_tpu_slice():
    done = subprocess.run(
        [sys.executable, "-m", "wings_jax.train", "--config", DEMO, "--compile_only", "--topology", "v5p-8",
         "--config.mesh.data=1", "--config.mesh.fsdp=-1"],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compile-only plan for v5p-8 (v5p:2x2x1, 4 chips, 1 host)" in done.stdout
    assert "mesh data=1, fsdp=4, tensor=1" in done.stdout
    figures = _gib_figures(done.stdout)
    assert figures["total"] > 0 and figures["chip memory"] == 95.0


@needs_libtpu
def test_a_model_too_big_for_the_chip_exits_3_with_advice():
    done = subprocess.run(
        [sys.executable, "-m", "wings_jax.train", "--config", DEMO, "--compile_only", "--topology", "v5e-4",
         *(f"--config.{o}" for o in TOO_BIG)],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 3, done.stderr[-3000:]
    assert re.search(r"DOES NOT FIT: [\d.]+ GiB over", done.stdout), done.stdout
    assert "--config.mesh.fsdp=-1" in done.stdout and "--topology v5e-" in done.stdout


@needs_libtpu
def test_a_batch_that_does_not_divide_is_a_config_error():
    done = subprocess.run(
        [sys.executable, "-m", "wings_jax.train", "--config", DEMO, "--compile_only", "--topology", "v5p-8",
         "--config.train.global_batch_size=6"],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 1
    assert "global_batch_size=6 must be a multiple of (data x fsdp = 4)" in done.stderr


def test_unknown_slice_is_a_config_error():
    done = subprocess.run(
        [sys.executable, "-m", "wings_jax.train", "--config", DEMO, "--compile_only", "--topology", "v9x-8"],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 1 and "unknown TPU slice 'v9x-8'" in done.stderr


def test_compile_only_on_the_local_devices():
    report = aot.compile_only(load_config(DEMO, ["runtime.remat=full"]), topology=None)
    assert report["topology"] is None and report["chips"] == 8  # tests/conftest.py: 8 host devices
    assert report["fits"] and report["memory"]["arguments"] > 0 and report["total_bytes"] > 0
    assert report["estimated_step_seconds"] is None and report["mfu"] is None
    text = aot.format_report(report)
    assert "local devices (8 x cpu, 1 host)" in text
    assert "estimated step time      unavailable (the CPU compiler gives no step-time estimate)" in text


def test_missing_libtpu_says_how_to_install_it(monkeypatch):
    monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
    monkeypatch.setattr(aot.importlib.util, "find_spec", lambda name: None)
    assert aot.libtpu_requirement().startswith("libtpu==")
    with pytest.raises(aot.AotError, match=re.escape(f"pip install '{aot.libtpu_requirement()}'")):
        aot.topology_devices(aot.parse_topology("v5p-8"))


def test_mfu_is_model_flops_over_the_peak_of_all_devices():
    assert flops.mfu(8e12, 2.0, 1e12, devices=8) == pytest.approx(0.5)
    assert flops.mfu(8e12, 2.0, None, devices=8) is None and flops.mfu(8e12, None, 1e12, devices=8) is None
