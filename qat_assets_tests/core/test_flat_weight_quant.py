"""One-pass fake quantization of many convs (flat_weight_quant.py) against Brevitas' layer-by-layer `quant_weight()`."""

from __future__ import annotations

import pytest
import torch
from ultralytics.nn.tasks import DetectionModel

from qat_assets.core.flat_weight_quant import FlatQuantWorkspace, flat_quantizable, group_key, quantize_flat
from qat_assets.core.quantize import QuantOptions, prepare_step_weights, quantize_w4a16, quantized_modules


def quantized_model(options: QuantOptions) -> DetectionModel:
    torch.manual_seed(0)
    model = DetectionModel("yolov10n.yaml", nc=3, verbose=False).train()
    quantize_w4a16(model, options)
    return model


def groups(model: DetectionModel) -> list[list]:
    members: dict[tuple, list] = {}
    for _, module in quantized_modules(model):
        members.setdefault(group_key(module), []).append(module)
    return list(members.values())


def values_and_gradients(modules, quantize) -> tuple[list, list, list]:
    """Quantized weights, and the gradients of their weights and scale parameters under a fixed random upstream."""
    for module in modules:
        module.zero_grad(set_to_none=True)
    quantized = quantize(modules)
    generator = torch.Generator().manual_seed(1)
    loss = sum((q.value * torch.randn(q.value.shape, generator=generator)).sum() for q in quantized)
    loss.backward()
    return ([q.value.detach() for q in quantized], [m.weight.grad.clone() for m in modules],
            [m.weight_quant.tensor_quant.scaling_impl.value.grad.clone() for m in modules])


@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_values_and_gradients_are_bit_identical_to_brevitas_layer_by_layer(per_channel):
    model = quantized_model(QuantOptions(per_channel_scales=per_channel))
    with torch.no_grad():  # shrink some scales so the clamp at the integer range bites
        for index, (_, module) in enumerate(quantized_modules(model)):
            if index % 3 == 0:
                module.weight_quant.tensor_quant.scaling_impl.value.mul_(0.4)
    checked = 0
    for members in groups(model):
        assert all(flat_quantizable(m) for m in members)
        flat = values_and_gradients(members, lambda ms: [w.quantized for w in quantize_flat(ms)])
        layer_by_layer = values_and_gradients(members, lambda ms: [m.quant_weight() for m in ms])
        for kind, ours, brevitas in zip(("value", "weight grad", "scale grad"), flat, layer_by_layer):
            for layer, (a, b) in enumerate(zip(ours, brevitas, strict=True)):
                assert torch.equal(a, b), f"{kind} of layer {layer} differs"
        checked += len(members)
    assert checked == len(quantized_modules(model))
    # Both ends of the range were reached, so the clamp's mask was exercised.
    codes = torch.cat([w.codes.flatten() for members in groups(model) for w in quantize_flat(members)])
    assert codes.min() == -127 and codes.max() == 127  # the 8-bit layers
    assert ((codes == 7) | (codes == -7)).sum() > 0


def test_codes_and_values_follow_the_equation_on_known_weights():
    """q = clamp(round(w / s), -7, 7) and value = q * s, with s = learned scale / 7 (narrow-range 4 bit)."""
    model = quantized_model(QuantOptions())
    module = next(m for _, m in quantized_modules(model) if m.weight.shape[1:] == (16, 3, 3))
    with torch.no_grad():
        module.weight_quant.tensor_quant.scaling_impl.value.fill_(0.7)  # s = 0.1 in every channel
        module.weight.zero_()
        module.weight[0, 0, 0, :] = torch.tensor([0.04, 0.26, -0.31])
        module.weight[1, 0, 0, :] = torch.tensor([2.0, -5.0, 0.69])
    (weights,) = quantize_flat([module])
    assert weights.codes[0, 0, 0].tolist() == [0.0, 3.0, -3.0]
    assert weights.codes[1, 0, 0].tolist() == [7.0, -7.0, 7.0]  # the first two clamp at the narrow range
    torch.testing.assert_close(weights.quantized.value, weights.codes * 0.1)
    # The clamped weights get no gradient; the others get the upstream gradient straight through.
    weights.quantized.value[1, 0, 0].sum().backward()
    assert module.weight.grad[1, 0, 0].tolist() == pytest.approx([0.0, 0.0, 1.0])


def test_the_qat_step_quantizes_every_layer_in_one_pass_per_group_and_the_forward_reuses_it():
    model = quantized_model(QuantOptions())
    prepared = prepare_step_weights(model)
    by_group = {}
    for name, module in quantized_modules(model):
        by_group.setdefault(group_key(module), []).append(prepared[name].quantized.value)
        assert module._prepared[0] is prepared[name].quantized
    for values in by_group.values():  # views of one flat tensor per group
        assert len({v._base.data_ptr() for v in values}) == 1
    assert len(by_group) == 2  # the 4-bit body and the 8-bit first and head-output convs


def test_a_workspace_is_reused_across_steps_with_the_same_numbers_and_a_stale_backward_fails_loudly():
    model = quantized_model(QuantOptions())
    members = groups(model)[0]
    workspace = FlatQuantWorkspace()
    first = values_and_gradients(members, lambda ms: [w.quantized for w in quantize_flat(ms, workspace)])
    buffers = [workspace.scratch.data_ptr(), workspace.ratios.data_ptr(), workspace.codes.data_ptr()]
    second = values_and_gradients(members, lambda ms: [w.quantized for w in quantize_flat(ms, workspace)])
    fresh = values_and_gradients(members, lambda ms: [w.quantized for w in quantize_flat(ms)])
    assert [workspace.scratch.data_ptr(), workspace.ratios.data_ptr(), workspace.codes.data_ptr()] == buffers
    for ours, again, alone in zip(first, second, fresh):
        assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(ours, again, alone))
    # The weights' gradients are a fresh tensor, never a workspace buffer the next step overwrites.
    for module in members:
        module.zero_grad(set_to_none=True)
    sum(w.quantized.value.sum() for w in quantize_flat(members, workspace)).backward()
    kept = {t.untyped_storage().data_ptr() for t in (workspace.scratch, workspace.scales, workspace.ratios, workspace.codes)}
    assert not {m.weight.grad.untyped_storage().data_ptr() for m in members} & kept
    # A second quantization overwrites the buffers the first one's backward needs: PyTorch says so.
    stale = quantize_flat(members, workspace)
    quantize_flat(members, workspace)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        sum(w.quantized.value.sum() for w in stale).backward()


def test_statistics_scales_are_quantized_by_brevitas_layer_by_layer():
    model = quantized_model(QuantOptions(learned_scales=False))
    assert not any(flat_quantizable(m) for _, m in quantized_modules(model))
    prepared = prepare_step_weights(model)
    for name, module in quantized_modules(model):
        assert torch.equal(prepared[name].quantized.value, module.quant_weight().value)
        assert torch.equal(prepared[name].codes, module.quant_weight().int())


def test_quantizers_the_replay_does_not_cover_are_left_to_brevitas():
    from brevitas.inject.enum import BitWidthImplType, RestrictValueType
    from brevitas.nn import QuantConv2d

    from qat_assets.core.quantize import weight_quantizer

    base = weight_quantizer(4, learned_scales=True)
    for quantizer in (base.let(bit_width_impl_type=BitWidthImplType.PARAMETER),
                      base.let(restrict_scaling_type=RestrictValueType.POWER_OF_TWO)):
        conv = QuantConv2d(8, 8, 3, weight_quant=quantizer)
        conv.quant_weight()  # initialises the learned scale
        assert not flat_quantizable(conv)
    plain = QuantConv2d(8, 8, 3, weight_quant=base)
    plain.quant_weight()
    assert flat_quantizable(plain)


@pytest.mark.parametrize("learned", [True, False], ids=["learned", "statistics"])
def test_bit_widths_are_python_ints_read_at_build_time_and_the_step_reads_no_tensor(learned):
    from qat_assets.core.flat_weight_quant import quantizer_constants
    from qat_assets.core.host_syncs import count_host_syncs
    from qat_assets.core.oscillation import OscillationTracker

    torch.manual_seed(0)
    model = DetectionModel("yolov10n.yaml", nc=3, verbose=False).train()
    report = quantize_w4a16(model, QuantOptions(learned_scales=learned))
    planned = {layer.name: layer.bit_width for layer in report.layers if layer.bit_width is not None}
    # Narrow-range signed integers: +-7 at 4 bits, +-127 at 8.
    for name, module in quantized_modules(model):
        constants = quantizer_constants(module)
        assert type(constants.bit_width) is int and constants.bit_width == planned[name]
        assert (constants.min_int, constants.max_int) == (1 - 2 ** (planned[name] - 1), 2 ** (planned[name] - 1) - 1)
    # The per-step work (quantize every layer for the next forward, update the oscillation tracker) reads no
    # tensor on the host: on a GPU, a bit width read as a tensor would be a sync per layer per step.
    tracker, workspaces = OscillationTracker(), {}
    with count_host_syncs() as step:
        for _ in range(2):
            prepared = prepare_step_weights(model, workspaces)
            tracker.update_quantized(prepared)
    assert len(step) == 0, step.by_place()
    assert {name: weights.bit_width for name, weights in prepared.items()} == planned
    assert set(tracker.per_layer()) == {name for name, bits in planned.items() if bits <= 4}


def test_a_copied_or_rebuilt_quantizer_is_read_once_then_cached():
    import copy

    from qat_assets.core.host_syncs import count_host_syncs

    model = quantized_model(QuantOptions())
    copied = copy.deepcopy(model)  # new quantizer objects: their constants are read, not taken from the original
    with count_host_syncs() as first:
        prepare_step_weights(copied)
    with count_host_syncs() as second:
        prepare_step_weights(copied)
    assert len(first) > 0 and len(second) == 0
