"""Fast shots: the `fast` sampling preset, stacked step-distillation LoRAs, fp8 weights,
attention backends, regional compilation - and the cost each shot records."""
from __future__ import annotations

import io
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

import storymem_model
from measurements import record_measurements
from model_folders import ORIGINAL_TO_DIFFUSERS, write_lora_pair
from storymem_model import storage
from storymem_model.acceleration import AccelerationError
from storymem_model.lora_loading import LoraLoadError
from storymem_model.presets import TINY
from storymem_model.render_spec import resolve_render_spec
from storymem_model.runner import open_runner
from storymem_model.records import ShotStats
from storymem_model.sampling import (FAST_SAMPLING, M2V_SAMPLING, evaluations_per_step,
                                     make_scheduler)
from storymem_model.specs import ModelSpec, RenderSettings, SamplingOverrides, ScorerSpec
from storymem_model.story_script import load_script

SHOT = dict(height=TINY.shot.height, width=TINY.shot.width, num_frames=TINY.shot.num_frames,
            seed=3)
DISTILL_RANK = 4


@pytest.fixture(scope="module")
def base():
    torch.set_num_threads(1)
    return storymem_model.load_pipeline("tiny")


@pytest.fixture(scope="module")
def memory():
    return np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)


def count_evaluations(pipeline, order: list | None = None):
    """Forward hooks on every expert: transformer evaluations x batch; with `order`, also
    the name of the expert each evaluation ran on, in turn."""
    counts = []

    def hook(name):
        def record(module, args, output):
            counts.append(int(args[0].shape[0]))
            if order is not None:
                order.append(name)
        return record

    experts = {"high": pipeline.transformer, "low": pipeline.transformer_2,
               "t2v_high": pipeline.t2v_transformer, "t2v_low": pipeline.t2v_transformer_2}
    handles = [expert.register_forward_hook(hook(name)) for name, expert in experts.items()]
    return counts, handles


# -- the fast preset ---------------------------------------------------------------------
def test_fast_schedule_is_the_published_distilled_one():
    scheduler = make_scheduler(FAST_SAMPLING)
    # LightX2V's step-distill schedule: timesteps 1000, 750, 500, 250 on the unshifted
    # grid, shift 5: sigma' = 5 s / (1 + 4 s)
    expected = [5 * s / (1 + 4 * s) for s in (1.0, 0.75, 0.5, 0.25)]
    np.testing.assert_allclose(scheduler.sigmas[:-1].numpy(), expected, rtol=1e-6)
    assert float(scheduler.sigmas[-1]) == 0.0
    np.testing.assert_allclose(scheduler.timesteps.numpy(), [1000 * s for s in expected],
                               rtol=1e-6)
    # boundary 0.9: the first two steps on the high-noise expert, the last two on the low
    assert [float(t) >= 900 for t in scheduler.timesteps] == [True, True, False, False]
    for sampling, evaluations in ((FAST_SAMPLING, 1), (M2V_SAMPLING, 2)):  # both experts
        assert evaluations_per_step(sampling.guidance_scale) == evaluations
        assert evaluations_per_step(sampling.guidance_scale_2) == evaluations


@pytest.mark.parametrize("cfg_mode", ["batched", "sequential"])
def test_standard_makes_two_evaluations_per_step_and_fast_one(base, memory, cfg_mode):
    order = []
    counts, handles = count_evaluations(base, order)
    try:
        stats = ShotStats()
        base.generate_shot("a boat", memory=memory, num_inference_steps=3, cfg_mode=cfg_mode,
                           stats=stats, **SHOT)
        assert sum(counts) == 2 * 3 == stats.model_evaluations
        counts.clear()
        order.clear()
        stats = ShotStats()
        base.generate_shot("a boat", memory=memory, stats=stats, **FAST_SAMPLING.as_dict(),
                           **SHOT)
        assert sum(counts) == len(FAST_SAMPLING.step_list) == stats.model_evaluations == 4
        assert len(counts) == 4  # one forward per step, batch 1: no guidance
        assert order == ["high", "high", "low", "low"]  # t >= 900 on the high-noise expert
        assert stats.denoise_seconds > 0
    finally:
        for handle in handles:
            handle.remove()


def test_step_list_is_configurable_and_checked(base, memory):
    counts, handles = count_evaluations(base)
    try:
        base.generate_shot("a boat", memory=memory,
                           **{**FAST_SAMPLING.as_dict(), "step_list": [1000, 500],
                              "num_inference_steps": 2}, **SHOT)
        assert sum(counts) == 2
    finally:
        for handle in handles:
            handle.remove()
    for bad in ([1000, 1000], [500, 750], [0], [1001]):
        with pytest.raises(ValueError, match="step_list must be strictly decreasing"):
            FAST_SAMPLING.updated(step_list=bad)
    with pytest.raises(ValueError, match="step_list has 2 steps but num_inference_steps is 4"):
        FAST_SAMPLING.updated(step_list=[1000, 500], num_inference_steps=4)


def test_recorded_model_evaluations_match_the_shots(tmp_path):
    script = load_script({"story_name": "Kite", "scenes": [{
        "video_prompts": ["A red kite on a hill.", "It climbs higher.", "A boy waves."],
        "cut": [True, False, True]}]})
    counts = {}
    for preset in ("standard", "fast"):
        spec = resolve_render_spec(ModelSpec(preset="tiny"), ScorerSpec(preset="tiny"),
                                   RenderSettings(sampling_preset=preset), accelerator=False)
        runner = open_runner(spec)
        hook_counts, handles = count_evaluations(runner.pipeline)
        result = runner.render(script, str(tmp_path / preset), progress=False)
        for handle in handles:
            handle.remove()
        rows = pq.read_table(io.BytesIO(storage.read_bytes(result.parquet_uri))).to_pylist()
        assert sum(r["model_evaluations"] for r in rows) == sum(hook_counts)
        assert all(r["denoise_seconds"] > 0 for r in rows)
        counts[preset] = [r["model_evaluations"] for r in rows]
    steps = TINY.shot.num_inference_steps
    # the first shot is T2V in both (the T2V experts keep their own guided sampling)
    assert counts["standard"] == [2 * steps, 2 * steps, 2 * steps]
    assert counts["fast"] == [2 * steps, 4, 4]


# -- stacked distillation LoRAs ------------------------------------------------------------
def _distill_states(transformer, seed, fmt):
    """A random distillation LoRA for `transformer` in a published format, and the dense
    weight change it means per diffusers module (independent of any loader). The
    `lightx2v` variant is laid out as the released files are: also a bias change per layer
    (`diff_b`, in `biases`), zero norm differences (`norm3.diff`, `.diff_b`) and a full
    difference of the output head (`head.head.diff`, `.diff_b`)."""
    generator = torch.Generator().manual_seed(seed)
    modules = dict(transformer.named_modules())
    state, deltas = {}, {}
    if fmt == "lightx2v":
        inner = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        head = modules["proj_out"]
        deltas["proj_out"] = state["diffusion_model.head.head.diff"] = torch.randn(
            head.out_features, head.in_features, generator=generator) * 0.01
        deltas["proj_out.bias"] = state["diffusion_model.head.head.diff_b"] = torch.randn(
            head.out_features, generator=generator) * 0.01
    for block in range(transformer.config.num_layers):
        for original, target in ORIGINAL_TO_DIFFUSERS.items():
            layer = modules[f"blocks.{block}.{target}"]
            down = torch.randn(DISTILL_RANK, layer.in_features, generator=generator) * 0.1
            up = torch.randn(layer.out_features, DISTILL_RANK, generator=generator) * 0.1
            alpha = 2.0
            if fmt == "lightx2v":  # original names, lora_down/lora_up, alpha
                key = f"diffusion_model.blocks.{block}.{original}"
                state[f"{key}.lora_down.weight"] = down
                state[f"{key}.lora_up.weight"] = up
                state[f"{key}.alpha"] = torch.tensor(alpha)
                bias = torch.randn(layer.out_features, generator=generator) * 0.1
                state[f"{key}.diff_b"] = bias
                deltas[f"blocks.{block}.{target}"] = (alpha / DISTILL_RANK) * up @ down
                deltas[f"blocks.{block}.{target}.bias"] = bias
                if original == "ffn.2":  # once per block
                    state[f"diffusion_model.blocks.{block}.norm3.diff"] = torch.zeros(inner)
                    state[f"diffusion_model.blocks.{block}.norm3.diff_b"] = torch.zeros(inner)
            elif fmt == "kijai":  # original names, lora_A/lora_B, no alpha
                key = f"diffusion_model.blocks.{block}.{original}"
                state[f"{key}.lora_A.weight"] = down
                state[f"{key}.lora_B.weight"] = up
                deltas[f"blocks.{block}.{target}"] = up @ down
            else:  # diffusers peft keys
                key = f"transformer.blocks.{block}.{target}"
                state[f"{key}.lora_A.weight"] = down
                state[f"{key}.lora_B.weight"] = up
                deltas[f"blocks.{block}.{target}"] = up @ down
    return state, deltas


def _write_distill(folder, base, fmt, names=("wan2.2_i2v_high_noise_lora.safetensors",
                                             "wan2.2_i2v_low_noise_lora.safetensors")):
    folder.mkdir(parents=True, exist_ok=True)
    deltas = []
    for seed, name, expert in zip((11, 12), names, (base.transformer, base.transformer_2)):
        state, delta = _distill_states(expert, seed, fmt)
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / name))
        deltas.append(delta)
    return folder, deltas


def _storymem_delta(lora_folder, expert_index, block, original, strength):
    from safetensors.torch import load_file

    stem = ("backbone_high_noise", "backbone_low_noise")[expert_index]
    state = load_file(str(lora_folder / f"{stem}.safetensors"))
    key = f"base_model.model.blocks.{block}.{original}"
    scale = TINY.lora_rank / math.sqrt(TINY.lora_rank)  # rsLoRA, alpha = r
    return strength * scale * state[f"{key}.lora_B.weight"] @ state[f"{key}.lora_A.weight"]


@pytest.mark.parametrize("fmt", ["lightx2v", "kijai", "diffusers"])
def test_distill_lora_stacks_on_the_storymem_lora(base, tmp_path, fmt):
    storymem = write_lora_pair(tmp_path / "storymem", (base.transformer, base.transformer_2),
                               TINY.lora_rank, seed=5)
    folder, deltas = _write_distill(tmp_path / "distill", base, fmt)
    pipe = storymem_model.load_pipeline("tiny", lora=storymem, lora_strength=0.5,
                                        distill_lora=folder, distill_lora_strength=0.75)
    assert pipe.distill_lora_id.startswith("distill-lora:") and pipe.distill_lora_id.endswith(
        "@0.75")
    x = torch.randn(3, base.transformer.config.num_attention_heads
                    * base.transformer.config.attention_head_dim)
    for index, (expert, plain) in enumerate(((pipe.transformer, base.transformer),
                                             (pipe.transformer_2, base.transformer_2))):
        adapted, original = dict(expert.named_modules()), dict(plain.named_modules())
        for block in range(expert.config.num_layers):
            for name, target in ORIGINAL_TO_DIFFUSERS.items():
                module = f"blocks.{block}.{target}"
                layer, reference = adapted[module], original[module]
                inputs = x if reference.in_features == x.shape[1] else torch.randn(
                    3, reference.in_features)
                with torch.no_grad():
                    change = layer(inputs) - reference(inputs)
                expected_weight = (_storymem_delta(storymem, index, block, name, 0.5)
                                   + 0.75 * deltas[index][module])
                expected = inputs @ expected_weight.T
                if f"{module}.bias" in deltas[index]:  # lightx2v's diff_b, scaled alike
                    expected = expected + 0.75 * deltas[index][f"{module}.bias"]
                torch.testing.assert_close(change, expected, atol=2e-5, rtol=1e-4)
        if "proj_out" in deltas[index]:  # lightx2v's full head difference (no StoryMem LoRA)
            inputs = torch.randn(3, plain.proj_out.in_features)
            with torch.no_grad():
                change = expert.proj_out(inputs) - plain.proj_out(inputs)
            expected = 0.75 * (inputs @ deltas[index]["proj_out"].T + deltas[index]["proj_out.bias"])
            torch.testing.assert_close(change, expected, atol=2e-5, rtol=1e-4)


def test_malformed_distill_loras_are_refused_and_nothing_is_half_loaded(base, tmp_path):
    good, _ = _write_distill(tmp_path / "good", base, "lightx2v")
    half = tmp_path / "half"
    half.mkdir()
    (half / "x_high_noise.safetensors").write_bytes((good / sorted(
        p.name for p in good.iterdir())[0]).read_bytes())
    with pytest.raises(LoraLoadError, match="exactly one low-noise file"):
        storymem_model.load_pipeline("tiny", distill_lora=half)
    two = tmp_path / "two"
    _write_distill(two, base, "lightx2v", names=("a_high.safetensors", "b_low.safetensors"))
    (two / "c_high.safetensors").write_bytes((two / "a_high.safetensors").read_bytes())
    with pytest.raises(LoraLoadError, match="exactly one high-noise file"):
        storymem_model.load_pipeline("tiny", distill_lora=two)
    # a key for a module the expert does not have
    state, _ = _distill_states(base.transformer, 1, "diffusers")
    state["transformer.blocks.99.attn1.to_q.lora_A.weight"] = torch.zeros(DISTILL_RANK, 32)
    state["transformer.blocks.99.attn1.to_q.lora_B.weight"] = torch.zeros(32, DISTILL_RANK)
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    save_file(state, str(unknown / "high.safetensors"))
    save_file(_distill_states(base.transformer_2, 2, "diffusers")[0],
              str(unknown / "low.safetensors"))
    with pytest.raises(LoraLoadError, match=r"high.safetensors: .*blocks.99.attn1.to_q"):
        storymem_model.load_pipeline("tiny", distill_lora=unknown)
    # wrong shapes in the low-noise file: the high-noise expert must not keep its adapter
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    save_file(_distill_states(base.transformer, 1, "diffusers")[0],
              str(wrong / "high.safetensors"))
    bad = _distill_states(base.transformer_2, 2, "diffusers")[0]
    key = next(k for k in bad if k.endswith("lora_A.weight"))
    bad[key] = torch.zeros(DISTILL_RANK, 7)
    save_file(bad, str(wrong / "low.safetensors"))
    pipe = storymem_model.load_pipeline("tiny")
    from storymem_model.lora_loading import load_distill_lora

    with pytest.raises(LoraLoadError, match=r"low.safetensors: .*does not fit"):
        load_distill_lora(pipe, wrong)
    assert not (getattr(pipe.transformer, "peft_config", None) or {})
    assert pipe.distill_lora_id is None
    # NaN, and a file that is not a LoRA at all
    nan = tmp_path / "nan"
    nan.mkdir()
    state = _distill_states(base.transformer, 1, "diffusers")[0]
    state[next(iter(state))] = torch.full_like(next(iter(state.values())), float("nan"))
    save_file(state, str(nan / "high.safetensors"))
    save_file(_distill_states(base.transformer_2, 2, "diffusers")[0], str(nan / "low.safetensors"))
    with pytest.raises(LoraLoadError, match="NaN or inf"):
        load_distill_lora(pipe, nan)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "high.safetensors").write_bytes(b"not a safetensors file")
    (junk / "low.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LoraLoadError, match="cannot read LoRA file"):
        load_distill_lora(pipe, junk)
    assert not (getattr(pipe.transformer, "peft_config", None) or {})


# -- lighter weights and kernels -----------------------------------------------------------
def test_fp8_storage_keeps_weights_in_fp8_and_the_shot_close(base, memory):
    fp8 = storymem_model.load_pipeline("tiny", storage_dtype="float8_e4m3fn")
    stored = {p.dtype for n, p in fp8.transformer.named_parameters() if n.endswith(".weight")
              and "blocks." in n and ".norm" not in n}
    assert stored == {torch.float8_e4m3fn}
    assert fp8.dtype == torch.float32 and fp8.storage_dtype == "float8_e4m3fn"
    reference = base.generate_shot("a boat", memory=memory, **SHOT)
    frames = fp8.generate_shot("a boat", memory=memory, **SHOT)
    assert frames.shape == reference.shape and frames.dtype == np.uint8
    difference = np.abs(frames.astype(np.int16) - reference.astype(np.int16))
    record_measurements("fp8-shot", {"mean_abs_difference_levels": round(float(difference.mean()), 3),
                                     "max_abs_difference_levels": int(difference.max())})
    # random tiny weights amplify rounding; a real model is far less sensitive
    assert difference.mean() < 12.0
    assert not np.array_equal(frames, reference)  # fp8 really is used


def test_attention_backends_and_offload_are_checked(base):
    with pytest.raises(AccelerationError, match="needs the flash_attn package"):
        storymem_model.load_pipeline("tiny", attention_backend="flash")
    with pytest.raises(AccelerationError, match="needs the sageattention package"):
        storymem_model.load_pipeline("tiny", attention_backend="sage")
    with pytest.raises(ValueError, match="needs device='cuda'"):
        storymem_model.load_pipeline("tiny", offload="group")
    native = storymem_model.load_pipeline("tiny", attention_backend="native")
    assert native.attention_backend == "native"


@pytest.mark.slow
def test_regional_compile_renders_the_same_shot(base, memory):
    import time

    compiled = storymem_model.load_pipeline("tiny", compile=True)
    assert compiled.compiled
    reference = base.generate_shot("a boat", memory=memory, **SHOT)
    started = time.perf_counter()
    frames = compiled.generate_shot("a boat", memory=memory, **SHOT)
    difference = np.abs(frames.astype(np.int16) - reference.astype(np.int16))
    record_measurements("compiled-shot", {
        "first_shot_seconds_with_compilation": round(time.perf_counter() - started, 1),
        "max_abs_difference_levels": int(difference.max())})
    # inductor may fuse differently: at most a level here and there
    assert difference.max() <= 2


# -- the config hash -----------------------------------------------------------------------
def test_config_hash_changes_with_preset_distill_lora_and_storage_dtype(base, tmp_path):
    folder, _ = _write_distill(tmp_path / "distill", base, "lightx2v")

    def hash_of(model=ModelSpec(preset="tiny"), **settings):
        return resolve_render_spec(model, ScorerSpec(preset="tiny"), RenderSettings(**settings),
                                   accelerator=False).config_hash

    hashes = {
        hash_of(),
        hash_of(sampling_preset="fast"),
        hash_of(sampling_preset="fast", sampling=SamplingOverrides(step_list=(1000, 500))),
        hash_of(ModelSpec(preset="tiny", distill_lora_dir=str(folder))),
        hash_of(ModelSpec(preset="tiny", distill_lora_dir=str(folder),
                          distill_lora_strength=0.5)),
        hash_of(ModelSpec(preset="tiny", storage_dtype="fp8")),
        hash_of(ModelSpec(preset="tiny", compile=True)),
    }
    assert len(hashes) == 7
    fast = resolve_render_spec(ModelSpec(preset="tiny"), ScorerSpec(preset="tiny"),
                               RenderSettings(sampling_preset="fast"), accelerator=False).config
    assert fast.sampling["step_list"] == [1000, 750, 500, 250]
    assert fast.sampling["guidance_scale"] == fast.sampling["guidance_scale_2"] == 1.0
    assert fast.sampling_preset == "fast" and fast.t2v_sampling["guidance_scale"] == 3.5


def test_render_command_takes_the_fast_flags(base, tmp_path):
    """`storymem render --sampling fast --distill-lora-dir ... --storage-dtype fp8`: the
    flags reach the spec, the config and every M2V shot's recorded cost."""
    import contextlib
    import io as io_module
    import json as json_module

    from flows.cli import main

    folder, _ = _write_distill(tmp_path / "distill", base, "lightx2v")
    script = tmp_path / "story.json"
    script.write_text(json_module.dumps({"story_name": "Fast", "scenes": [{
        "video_prompts": ["A red kite on a hill.", "It climbs higher."], "cut": [True, False]}]}))
    with contextlib.redirect_stdout(io_module.StringIO()):
        code = main(["render", str(script), "--out", str(tmp_path / "out"), "--preset", "tiny",
                     "--sampling", "fast", "--distill-lora-dir", str(folder),
                     "--storage-dtype", "fp8", "--progress", "none"])
    assert code == 0
    config = json_module.loads(next((tmp_path / "out").glob("*/*/config.json")).read_text())
    assert (config["sampling_preset"], config["storage_dtype"]) == ("fast", "float8_e4m3fn")
    assert config["distill_lora_id"].startswith("distill-lora:")
    rows = pq.read_table(next((tmp_path / "out").glob("*/*/shots.parquet"))).to_pylist()
    assert [(r["mode"], r["model_evaluations"]) for r in rows] == [
        ("t2v", 2 * TINY.shot.num_inference_steps), ("mi2v", 4)]
