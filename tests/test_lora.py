"""Low-rank adapters: the layer against a hand computation, a fresh adapter computing the base exactly,
a run that moves its adapters alone and resumes exactly, the merged model computing what the adapted
one does, a base quantized to 8 or 4 bits against the formula, and bad input."""

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama2_jax import cli
from llama2_jax.checkpoint.load import load_pretrained
from llama2_jax.checkpoint.orbax_params import saved_shapes, state_path
from llama2_jax.model import lora, quantize
from llama2_jax.model.config import LlamaConfig
from llama2_jax.model.llama import Llama, LlamaRewardModel
from llama2_jax.sharding import model_arrays
from llama2_jax.train import loop
from llama2_jax.train.state import split_params
from stop_requests import stop_when
from tolerances import assert_close_at_scale

BASE = LlamaConfig(vocab_size=128, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=64,
                   compute_dtype="float32")
ADAPTED = BASE.replace(lora_rank=4, lora_alpha=8.0)
QUANTIZED = ADAPTED.replace(lora_base_dtype="int4")
TOKENS = jnp.asarray(np.random.default_rng(0).integers(3, 128, (2, 10)), jnp.int32)


def with_random_b(model, seed=1):
    """The adapters' B drawn at random (a fresh adapter's B is 0, which would hide any error in it)."""
    rng = np.random.default_rng(seed)
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        if path[-1] == lora.B_NAME:
            variable.set_value(jnp.asarray(rng.normal(0, 0.1, variable.shape), variable.dtype))
    return model


def test_an_adapted_projection_is_the_weight_plus_alpha_over_rank_times_a_b():
    model = with_random_b(Llama(ADAPTED, rngs=nnx.Rngs(0)))
    attention = nnx.merge(*nnx.split(model.layers))  # the stacked blocks; layer 0 by hand below
    x = np.random.default_rng(2).normal(size=(2, 5, BASE.dim)).astype(np.float32)
    block = lambda variable: np.asarray(variable[...][0], np.float64)  # noqa: E731
    for weight, equation in (("wq", "btd,dhk->bthk"), ("wk", "btd,dhk->bthk")):
        w = block(getattr(attention.attention, weight))
        adapter = getattr(attention.attention, lora.adapter_name(weight))
        a, b = block(adapter.lora_a), block(adapter.lora_b)
        expected = np.einsum(equation, x, w + ADAPTED.lora_alpha / ADAPTED.lora_rank * np.einsum("dr,rhk->dhk", a, b))
        first = nnx.merge(*nnx.split(adapter))
        first.lora_a.set_value(adapter.lora_a[...][0])
        first.lora_b.set_value(adapter.lora_b[...][0])
        got = np.einsum(equation, x, w) + np.asarray(first(jnp.asarray(x)), np.float64)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_fresh_adapters_compute_the_base_exactly_and_a_merged_model_what_the_adapted_one_does():
    base, adapted = Llama(BASE, rngs=nnx.Rngs(0)), Llama(ADAPTED, rngs=nnx.Rngs(0))
    # B starts at zero and the base weights are drawn before the adapters: the same numbers exactly.
    np.testing.assert_array_equal(adapted(TOKENS), base(TOKENS))
    with_random_b(adapted)
    merged = lora.merged(adapted)
    assert merged.config.lora_rank == 0 and not nnx.state(merged, nnx.LoRAParam)
    # Two programs of float32 logits of order 1 (W + sBA formed first, or x·A·B added after): 1e-5.
    np.testing.assert_allclose(merged(TOKENS), adapted(TOKENS), atol=1e-5, rtol=0)
    assert float(jnp.abs(merged(TOKENS) - base(TOKENS)).max()) > 1e-2


def test_adapters_are_laid_out_as_their_weights_with_the_rank_axis_whole():
    model = Llama(ADAPTED, rngs=nnx.Rngs(0))
    axes = {".".join(map(str, path)): variable.get_metadata()["logical_axes"]
            for path, variable in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
    assert axes["layers.attention.wq_lora.lora_a"] == ("layers", "embed", "lora_rank")
    assert axes["layers.attention.wq_lora.lora_b"] == ("layers", "lora_rank", "q_heads", "head_dim")
    assert axes["layers.attention.wo_lora.lora_a"] == ("layers", "q_heads", "head_dim", "lora_rank")
    assert axes["layers.feed_forward.w2_lora.lora_b"] == ("layers", "lora_rank", "embed")
    assert len(axes) == 2 * 7


def test_a_run_with_adapters_trains_them_and_a_reward_head_alone():
    _, trained, frozen = split_params(LlamaRewardModel(ADAPTED, rngs=nnx.Rngs(0)))
    names = {".".join(path) for path in _paths(trained)}
    assert "score.kernel" in names and all("_lora." in name for name in names - {"score.kernel"})
    assert "layers.attention.wq" in {".".join(path) for path in _paths(frozen)}
    assert jax.tree.leaves(frozen)[0].dtype == jnp.float32  # the base in the compute dtype here
    _, trained, frozen = split_params(Llama(BASE, rngs=nnx.Rngs(0)))
    assert frozen == {} and "output.kernel" in {".".join(path) for path in _paths(trained)}


def _paths(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _paths(value, (*prefix, key))
        else:
            yield (*prefix, key)


def _dialogs(path):
    lines = [{"messages": [{"role": "user", "content": f"Who says line {index}?"},
                           {"role": "assistant", "content": "HAMLET, in the graveyard."}]} for index in range(48)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def sft_argv(pretrained, workdir, tmp_path, *extra):
    return ["sft", "--config=configs/sft.py:tiny", f"--config.init_checkpoint={pretrained}", f"--workdir={workdir}",
            "--config.data.dataset=lora_dialogs", f"--config.data.paths={_dialogs(tmp_path / 'dialogs.jsonl')}",
            "--config.data.format=chat", f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.train.seq_len=64",
            "--config.train.global_batch_size=8", "--config.train.steps=6", "--config.train.checkpoint_every=3",
            "--config.train.eval_every=0", "--config.sft.eval_prompts=0", "--config.lora.rank=4",
            "--config.optimizer.peak_lr=1e-2", "--config.optimizer.warmup_steps=1", *extra]


@pytest.fixture(scope="module")
def runs(pretrained, tmp_path_factory):
    """The same SFT run with adapters straight through, and stopped at step 4 and resumed."""
    tmp_path = tmp_path_factory.mktemp("lora")
    assert cli.main(sft_argv(pretrained, tmp_path / "straight", tmp_path)) == 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "StopRequests", stop_when(lambda step: step == 4))
        assert cli.main(sft_argv(pretrained, tmp_path / "stopped", tmp_path)) == 75
    assert cli.main(sft_argv(pretrained, tmp_path / "stopped", tmp_path)) == 0
    return tmp_path


def test_a_stopped_run_resumes_to_the_same_adapters_and_the_base_never_moves(pretrained, runs):
    shapes = saved_shapes(state_path(runs / "straight"))
    assert shapes and all("_lora." in name for name in shapes)  # the checkpoint holds the adapters alone
    straight, stopped = (load_pretrained(runs / run) for run in ("straight", "stopped"))
    for name, array in model_arrays(straight).items():
        np.testing.assert_array_equal(array, model_arrays(stopped)[name], err_msg=name)
    record = json.loads((runs / "straight" / "model_config.json").read_text())["lora_base"]
    assert record["path"] == str(pretrained) and len(record["fingerprint"]) == 16
    # The merged model is the base plus what the adapters learnt, and the base file never moved.
    base = load_pretrained(pretrained)
    assert float(jnp.abs(straight(TOKENS) - base(TOKENS)).max()) > 1e-3
    assert json.loads((runs / "straight" / "model_config.json").read_text())["lora_rank"] == 4


def test_a_run_converts_merged_and_its_adapters_go_to_peft_and_back(pretrained, runs, tmp_path):
    run = runs / "straight"
    expected = np.asarray(load_pretrained(run)(TOKENS))
    assert cli.main(["convert", "--from=orbax", "--to=hf", str(run), str(tmp_path / "merged")]) == 0
    assert cli.main(["convert", "--from=orbax", "--to=peft", str(run), str(tmp_path / "adapters")]) == 0
    settings = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert (settings["r"], settings["lora_alpha"], len(settings["target_modules"])) == (4, 16.0, 7)
    assert cli.main(["convert", "--from=peft", "--to=hf", str(tmp_path / "adapters"), str(tmp_path / "from_peft"),
                     f"--base={pretrained}"]) == 0
    # The same merge in XLA and in numpy: float32 logits of order 1 agree to 1e-5.
    for export in ("merged", "from_peft"):
        np.testing.assert_allclose(np.asarray(load_pretrained(tmp_path / export)(TOKENS)), expected, atol=1e-5, rtol=0)


def test_peft_puts_the_adapters_on_the_hugging_face_base_as_we_do(pretrained, runs, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    run = runs / "straight"
    assert cli.main(["convert", "--from=orbax", "--to=hf", str(pretrained), str(tmp_path / "base")]) == 0
    assert cli.main(["convert", "--from=orbax", "--to=peft", str(run), str(tmp_path / "adapters")]) == 0
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapters")
    with torch.no_grad():
        theirs = adapted(torch.from_numpy(np.asarray(TOKENS, np.int64))).logits.numpy()
    np.testing.assert_allclose(theirs, np.asarray(load_pretrained(run)(TOKENS)), atol=1e-5, rtol=0)


def test_bad_adapter_settings_and_a_missing_or_changed_base_are_one_line(pretrained, runs, tmp_path, capsys):
    def error_of(argv):
        code = cli.main(argv)
        error = capsys.readouterr().err
        assert error.startswith("error: ") and error.count("\n") == 1, error
        return code, error

    for flag, message in (("--config.lora.rank=-1", "lora.rank is -1"),
                          ("--config.lora.targets=('q', 'qkv')", "lora.targets ('q', 'qkv') holds unknown ['qkv']"),
                          ("--config.lora.alpha=0", "lora.alpha is 0.0"),
                          ("--config.lora.base_dtype=int3", "lora.base_dtype is 'int3'"),
                          ("--config.lora.dropout=1.0", "lora.dropout is 1.0")):
        code, error = error_of(sft_argv(pretrained, tmp_path / "bad", tmp_path, flag))
        assert code == 2 and message in error, error
    assert not (tmp_path / "bad").exists()
    # A run whose base is gone, or another model now, cannot be read: one line, nothing written.
    moved = tmp_path / "base_moved"
    copy = tmp_path / "run"
    shutil.copytree(runs / "straight", copy)
    config = json.loads((copy / "model_config.json").read_text())
    config["lora_base"]["path"] = str(moved)
    (copy / "model_config.json").write_text(json.dumps(config))
    code, error = error_of(["convert", "--from=orbax", "--to=hf", str(copy), str(tmp_path / "out")])
    assert code == 1 and f"the base model of {copy} is not at {moved} any more" in error
    config["lora_base"]["path"] = str(runs / "stopped")  # a model, but not the base
    (copy / "model_config.json").write_text(json.dumps(config))
    code, error = error_of(["convert", "--from=orbax", "--to=hf", str(copy), str(tmp_path / "out")])
    assert code == 1 and "is not the one" in error and "trained its adapters on" in error
    code, error = error_of(["convert", "--from=orbax", "--to=peft", str(pretrained), str(tmp_path / "out")])
    assert code == 1 and "trained every weight, so it has no adapters" in error
    # Adapters for another model: one line naming the weight and both shapes.
    from llama2_jax.checkpoint.convert import export_model

    narrower = load_pretrained(pretrained).config.replace(dim=64)
    export_model(Llama(narrower, rngs=nnx.Rngs(0)), str(tmp_path / "narrower"), "orbax",
                 tokenizer_path=str(pretrained / "tokenizer.model"))
    assert cli.main(["convert", "--from=orbax", "--to=peft", str(runs / "straight"), str(tmp_path / "adapters")]) == 0
    code, error = error_of(["convert", "--from=peft", "--to=hf", str(tmp_path / "adapters"), str(tmp_path / "out"),
                            f"--base={tmp_path / 'narrower'}"])
    assert code == 1 and "these adapters are for a model of another shape" in error, error
    assert not (tmp_path / "out").exists()


def test_the_reference_of_a_policy_with_adapters_is_its_base_and_dpo_reads_it_in_the_step():
    from llama2_jax.stages.dpo import with_reference_in_step
    from llama2_jax.train import dpo_loss
    from test_dpo import pair_rows

    base, adapted = Llama(BASE, rngs=nnx.Rngs(0)), with_random_b(Llama(ADAPTED, rngs=nnx.Rngs(0)))
    np.testing.assert_allclose(lora.without_adapters(adapted)(TOKENS), base(TOKENS), atol=1e-6, rtol=0)
    rng = np.random.default_rng(3)
    pairs = [tuple((rng.integers(3, 128, length).tolist(), start) for length, start in sides)
             for sides in (((9, 4), (7, 4)), ((12, 5), (10, 6)))]
    batch = pair_rows(pairs, [0, 1], [(0.0, 0.0), (0.0, 0.0)])
    chosen, rejected = dpo_loss.answer_log_probs(base, batch)
    loss_fn = dpo_loss.make_dpo_loss(beta=0.1, loss="sigmoid", margin="small")
    given, _ = loss_fn(adapted, {**batch, "reference_chosen": chosen, "reference_rejected": rejected})
    in_step, _ = with_reference_in_step(loss_fn)(adapted, batch)
    np.testing.assert_allclose(float(in_step), float(given), rtol=1e-6)
    # The reference takes no gradient: the same gradient as with its log-probs given as constants.
    graphdef, adapters, rest = nnx.split(adapted, nnx.LoRAParam, ...)
    fixed = {**batch, "reference_chosen": chosen, "reference_rejected": rejected}
    in_step_grads = jax.grad(lambda a: with_reference_in_step(loss_fn)(nnx.merge(graphdef, a, rest), batch)[0])(adapters)
    given_grads = jax.grad(lambda a: loss_fn(nnx.merge(graphdef, a, rest), fixed)[0])(adapters)
    for got, want in zip(jax.tree.leaves(in_step_grads), jax.tree.leaves(given_grads)):
        assert_close_at_scale(got, want, rtol=1e-5)
    assert any(float(jnp.abs(leaf).max()) > 0 for leaf in jax.tree.leaves(in_step_grads))


def test_aot_compiles_a_step_that_trains_adapters_on_a_sharded_mesh_and_holds_less(pretrained):
    from llama2_jax.commands import aot
    from llama2_jax.config_cli import parse_config_flags

    def compiled(rank, base_dtype=""):
        config, _ = parse_config_flags([
            "--config=configs/sft.py:tiny", f"--config.init_checkpoint={pretrained}", f"--config.lora.rank={rank}",
            f"--config.lora.base_dtype={base_dtype}",
            "--config.train.global_batch_size=8", "--config.train.seq_len=64", "--config.mesh.ici_data=1",
            "--config.mesh.ici_fsdp=4", "--config.mesh.ici_tensor=2"])
        steps = aot.stage_steps(config, jax.devices())
        return steps, steps.lower_train_step().compile().memory_analysis()

    steps, adapted = compiled(8)
    # The adapters' A is split as its weight's input (embed over fsdp), B as its output (heads over tensor).
    spec = steps.shardings.params["layers"]["attention"]["wq_lora"]
    assert tuple(spec["lora_a"].spec) == (None, "fsdp", None)
    assert tuple(spec["lora_b"].spec) == (None, None, "tensor", None)
    _, full = compiled(0)
    assert adapted.argument_size_in_bytes < full.argument_size_in_bytes / 2  # no moments for the base
    # An 8-bit base: 3 bytes fewer a projection weight than float32, less its scales, on each of the
    # 8 devices its projections are split over (fsdp 4 × tensor 2).
    _, quantized = compiled(8, "int8")
    projections = sum(math.prod(variable.shape) for path, variable in nnx.to_flat_state(steps.abstract_frozen)
                      if path[-1] in quantize.OUTPUT_AXES)
    assert projections > 0
    assert quantized.argument_size_in_bytes < adapted.argument_size_in_bytes - 2 * projections / 8


def test_a_quantized_weight_is_its_levels_times_its_block_scale_to_within_half_that_scale():
    weight = np.random.default_rng(4).normal(0, 0.02, (2, 128, 4, 16)).astype(np.float32)  # [layers, dim, heads, k]
    blocks = weight.astype(np.float64).reshape(2, 2, 64, 4, 16)  # 64 input rows share a scale
    for dtype, largest in (("int8", 127), ("int4", 7)):
        levels, scale = quantize.quantize(jnp.asarray(weight), 2, dtype)
        assert levels.dtype == jnp.dtype(dtype) and scale.shape == (2, 2, 4, 16)
        expected_scale = np.abs(blocks).max(axis=2) / largest
        np.testing.assert_allclose(scale, expected_scale, rtol=1e-6)
        expected = np.clip(np.round(blocks / expected_scale[:, :, None]), -largest, largest).reshape(weight.shape)
        # float32 against float64 division may round a value at a level's midpoint the other way.
        assert np.mean(np.asarray(levels, np.int32) != expected) < 1e-3
        back = np.asarray(quantize.dequantize(levels, scale, 2, jnp.float32))
        half_scale = np.repeat(expected_scale, 64, axis=1) / 2
        assert np.all(np.abs(back - weight) <= half_scale * (1 + 1e-5))
        assert np.abs(back - weight).max() > half_scale.max() / 10  # rounding happened


def test_a_quantized_base_computes_with_its_dequantized_weights_and_merges_into_float_ones():
    adapted = with_random_b(Llama(QUANTIZED, rngs=nnx.Rngs(0)))
    arrays = model_arrays(adapted)
    assert arrays["layers.attention.wq"].dtype == jnp.int4 and arrays["layers.feed_forward.w2"].dtype == jnp.int4
    assert arrays["embedder.embedding"].dtype == jnp.float32  # embedding, norms, head: not quantized
    dequantized = quantize.dequantized_arrays(arrays, jnp.float32)
    graphdef, state = nnx.split(Llama(ADAPTED, rngs=nnx.Rngs(0)))
    floats = nnx.merge(graphdef, nnx.from_flat_state([
        (path, variable.replace(dequantized[".".join(map(str, path))])) for path, variable in nnx.to_flat_state(state)]))
    # The same float32 weights, dequantized inside the block or before: float32 logits of order 1 to 1e-5.
    np.testing.assert_allclose(adapted(TOKENS), floats(TOKENS), atol=1e-5, rtol=0)
    merged = lora.merged(adapted)
    assert {array.dtype for array in model_arrays(merged).values()} == {jnp.dtype(jnp.float32)}
    assert not any(name.endswith("_scale") for name in model_arrays(merged))
    np.testing.assert_allclose(merged(TOKENS), adapted(TOKENS), atol=1e-5, rtol=0)
    # 4 bits change the model's logits, by less than they are in size.
    base, quantized_base = Llama(BASE, rngs=nnx.Rngs(0)), Llama(QUANTIZED, rngs=nnx.Rngs(0))
    change = float(jnp.abs(quantized_base(TOKENS) - base(TOKENS)).max())
    assert 1e-4 < change < float(jnp.abs(base(TOKENS)).max())


def test_adapter_dropout_drops_inputs_in_training_steps_alone():
    model = with_random_b(Llama(ADAPTED.replace(lora_dropout=0.25), rngs=nnx.Rngs(0)))
    probe = with_random_b(Llama(ADAPTED.replace(lora_dropout=0.25), rngs=nnx.Rngs(0)))  # the same, taken apart
    adapter = nnx.merge(*nnx.split(probe.layers)).attention.wq_lora
    first = nnx.merge(*nnx.split(adapter))  # layer 0's A and B
    first.lora_a.set_value(adapter.lora_a[...][0])
    first.lora_b.set_value(adapter.lora_b[...][0])
    x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 5, BASE.dim)), jnp.float32)
    key = jax.random.key(7)
    with lora.dropout_keys(key):
        dropped = np.asarray(first(x), np.float64)
    kept = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, list(lora.TARGETS).index("q")), 0.75, x.shape))
    a, b = (np.asarray(variable[...], np.float64) for variable in (first.lora_a, first.lora_b))
    expected = np.einsum("btd,dr,rhk->bthk", np.where(kept, np.asarray(x, np.float64) / 0.75, 0), a, b) * 2.0
    np.testing.assert_allclose(dropped, expected, rtol=1e-5, atol=1e-6)
    assert 0.6 < kept.mean() < 0.9
    # Outside a training step nothing is dropped: the model computes what it does without dropout.
    plain = with_random_b(Llama(ADAPTED, rngs=nnx.Rngs(0)))
    np.testing.assert_array_equal(model(TOKENS), plain(TOKENS))
    with lora.dropout_keys(key):
        once, again = model(TOKENS), model(TOKENS)
    np.testing.assert_array_equal(once, again)
    assert float(jnp.abs(once - plain(TOKENS)).max()) > 1e-4


def test_a_run_on_a_4_bit_base_with_dropout_resumes_exactly_and_reads_back_merged(pretrained, tmp_path):
    from llama2_jax import sharding
    from llama2_jax.checkpoint import load
    from llama2_jax.checkpoint.orbax_params import read_config
    from llama2_jax.metrics import read_metrics

    # With adapter dropout too: its masks come from the step number, so a resumed run draws the same.
    quantized = ("--config.lora.base_dtype=int4", "--config.lora.dropout=0.1", "--config.train.log_every=1",
                 "--config.optimizer.peak_lr=3e-3")
    assert cli.main(sft_argv(pretrained, tmp_path / "straight", tmp_path, *quantized)) == 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "StopRequests", stop_when(lambda step: step == 4))
        assert cli.main(sft_argv(pretrained, tmp_path / "stopped", tmp_path, *quantized)) == 75
    assert cli.main(sft_argv(pretrained, tmp_path / "stopped", tmp_path, *quantized)) == 0  # the base quantized again
    assert all("_lora." in name for name in saved_shapes(state_path(tmp_path / "straight")))
    losses = [row["loss"] for row in read_metrics(tmp_path / "straight") if "loss" in row and "step" in row]
    assert losses[-1] < losses[0] - 0.15, losses  # 48 copies of one answer: adapters on 4 bits learn it
    straight, stopped = (load_pretrained(tmp_path / run) for run in ("straight", "stopped"))
    for name, array in model_arrays(straight).items():
        np.testing.assert_array_equal(array, model_arrays(stopped)[name], err_msg=name)
    # What `load_pretrained` gives (merged, float) computes what the run trained (adapters on int4).
    config, kind = read_config(tmp_path / "straight")
    mesh = sharding.make_mesh(devices=jax.local_devices())
    adapted = load._restore_adapted(str(tmp_path / "straight"), config, kind, mesh, sharding.DEFAULT_RULES)
    assert model_arrays(adapted)["layers.attention.wq"].dtype == jnp.int4
    # Two float32 programs (W + sBA formed first, or x·A·B added after) over four layers: 1e-5 of
    # the logits' scale.
    assert_close_at_scale(straight(TOKENS), adapted(TOKENS), rtol=1e-5)
