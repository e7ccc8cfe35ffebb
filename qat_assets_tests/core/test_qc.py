"""QC on a real (random-init) W4A16 yolov10n at 64 px, trained on a handful of generated images."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from ultralytics.nn.modules.conv import Conv
from ultralytics.nn.tasks import DetectionModel

from qat_assets.core.qc import (
    ChannelCorrection,
    QCConfig,
    attach_task_loss,
    build_calibration_loader,
    calibration_loss,
    correction_parameters,
    correction_stats,
    correction_trainee,
    corrected_layers,
    _raw_predictions,
    fixed_gamma_layers,
    fold_corrections,
    fold_equivalence,
    insert_corrections,
    learned_corrections,
    run_qc,
    train_corrections,
)
from qat_assets.core.quantize import (
    QuantOptions,
    freeze_quantized_weights,
    integer_weights,
    quantize_w4a16,
    quantized_modules,
)
from qat_assets_tests.tiny_yolo_set import write_tiny_yolo_set

IMGSZ = 64


@pytest.fixture(scope="module")
def calibration_yaml(tmp_path_factory) -> str:
    """Six 64 px images with one or two coloured boxes each, in Ultralytics YOLO format."""
    return write_tiny_yolo_set(tmp_path_factory.mktemp("calib"), 6, IMGSZ)


def quantized_yolo(calibration_yaml: str, options: QuantOptions) -> nn.Module:
    """W4A16 yolov10n whose BNs hold statistics of the calibration images measured in float.

    Quantizing after that shifts every channel away from its BN statistics, which is what QC corrects;
    random BN affines and data-driven running means also make the fold algebra non-trivial.
    """
    torch.manual_seed(0)
    model = DetectionModel("yolov10n.yaml", nc=3, verbose=False)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.2)
            module.momentum = None  # cumulative average over the batch below
    batch = next(iter(build_calibration_loader(calibration_yaml, model, config(batch=6))))
    model.train()
    with torch.no_grad():
        model(batch["img"].float() / 255)
    quantize_w4a16(model, options)
    return model.eval()


@pytest.fixture(scope="module")
def quantized_model(calibration_yaml) -> nn.Module:
    return quantized_yolo(calibration_yaml, QuantOptions())


@pytest.fixture
def model(quantized_model) -> nn.Module:
    return copy.deepcopy(quantized_model)


def config(**overrides) -> QCConfig:
    return QCConfig(**{"batch": 2, "imgsz": IMGSZ, "device": "cpu", **overrides})


def images(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(1))


def randomize_corrections(model: nn.Module) -> None:
    """Every trainable gamma uniform in [0.5, 1.5], every beta ~ N(0, 0.1); a fixed gamma stays at 1."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, layer in corrected_layers(model):
            if isinstance(layer.gamma, nn.Parameter):
                layer.gamma.copy_(torch.empty_like(layer.gamma).uniform_(0.5, 1.5, generator=generator))
            layer.beta.copy_(torch.randn(layer.beta.shape, generator=generator) * 0.1)


def test_corrections_sit_between_quantized_conv_and_bn_and_on_head_outputs(model):
    names = insert_corrections(model)
    assert len(names) == len(corrected_layers(model)) > 100
    head = model.model[-1]
    assert isinstance(head.dfl.conv, nn.Conv2d) and not isinstance(head.dfl.conv, ChannelCorrection)
    assert not any(name.startswith("model.23.dfl") for name in names)
    for branch in (*head.cv2, *head.cv3, *head.one2one_cv2, *head.one2one_cv3):
        assert isinstance(branch[-1], ChannelCorrection)  # no BN: the correction is on the output
    blocks = [m for m in model.modules() if isinstance(m, Conv)]
    assert blocks and all(isinstance(block.conv, ChannelCorrection) for block in blocks)
    assert len(names) == len(blocks) + 12

    # Data flow: what the BN receives is exactly what the correction produced.
    block = model.model[1]
    seen = {}
    block.conv.register_forward_hook(lambda m, i, o: seen.setdefault("corrected", o))
    block.bn.register_forward_pre_hook(lambda m, i: seen.setdefault("bn_input", i[0]))
    model(images())
    assert seen["bn_input"] is seen["corrected"]


def test_dfl_conv_is_refused(model):
    with pytest.raises(ValueError, match="DFL"):
        insert_corrections(model, ["model.23.dfl.conv"])


def test_identity_init_leaves_outputs_unchanged(model):
    frozen = freeze_quantized_weights(model)
    corrected = copy.deepcopy(frozen)
    insert_corrections(corrected, [name for name, _ in quantized_modules(model)])
    assert fold_equivalence(frozen, corrected, images()) == 0.0


def test_training_changes_only_gamma_and_beta(model, calibration_yaml):
    names = [name for name, _ in quantized_modules(model)]
    trainee = correction_trainee(model)
    before = {k: v.clone() for k, v in trainee.state_dict().items()}
    loader = build_calibration_loader(calibration_yaml, trainee, config())
    result = train_corrections(trainee, loader, config(lr=1e-2))
    after = trainee.state_dict()

    corrections = {k for k in before if k.endswith((".gamma", ".beta"))}
    assert len(corrections) == 2 * len(names)
    changed = [k for k in corrections if not torch.equal(before[k], after[k])]
    # A few one-to-one box branches get no assigned target on six images, hence no gradient.
    assert len(changed) > 0.8 * len(corrections)
    frozen_keys = set(before) - corrections
    assert any("bn_scale" in k for k in frozen_keys)
    for key in frozen_keys:  # frozen weights and the absorbed BNs' affines
        assert torch.equal(before[key], after[key]), key
    # No weight gradients were ever computed.
    assert all(p.grad is None for n, p in trainee.named_parameters() if not n.endswith((".gamma", ".beta")))
    assert result["steps"] == 3 and result["images"] == 6
    assert result["parameters"] == sum(p.numel() for p in correction_parameters(trainee))


def test_fold_matches_unfolded_model_with_random_corrections(model):
    unfolded = copy.deepcopy(model)
    insert_corrections(unfolded)
    randomize_corrections(unfolded)
    head_outputs = [name for name, _ in quantized_modules(model) if name.endswith(".2")]
    codes_before = {name: integer_weights(model.get_submodule(name)) for name in head_outputs}
    bn_stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}

    folded = fold_corrections(copy.deepcopy(unfolded))
    assert not corrected_layers(folded)
    assert fold_equivalence(unfolded, folded, images()) < 1e-4
    for name in head_outputs:  # gamma went into the scale: the integer grid is preserved
        assert torch.equal(integer_weights(folded.get_submodule(name)), codes_before[name])
    folded_state = folded.state_dict()
    assert all(torch.equal(folded_state[k], v) for k, v in bn_stats.items())

    # Folding values learned on a frozen copy into the real quantized model gives the same result.
    into_quantized = fold_corrections(copy.deepcopy(model), learned_corrections(unfolded))
    assert fold_equivalence(unfolded, into_quantized, images()) < 1e-4


def test_trainee_with_absorbed_bns_computes_the_corrected_model(model):
    corrected = freeze_quantized_weights(model)
    insert_corrections(corrected, [name for name, _ in quantized_modules(model)])
    randomize_corrections(corrected)
    trainee = correction_trainee(model)
    assert all(layer.absorbed_bn == name.endswith(".conv") for name, layer in corrected_layers(trainee))
    with torch.no_grad():
        for name, (gamma, beta) in learned_corrections(corrected).items():
            trainee.get_submodule(name).gamma.copy_(gamma)
            trainee.get_submodule(name).beta.copy_(beta)
    assert fold_equivalence(corrected, trainee, images()) < 1e-4
    with pytest.raises(ValueError, match="absorbed"):
        fold_corrections(trainee)


def test_fold_refuses_non_positive_gamma_on_a_conv_without_bn(model):
    insert_corrections(model)
    head_output = model.model[-1].cv2[0][-1]
    with torch.no_grad():
        head_output.gamma[0] = -0.5
    with pytest.raises(ValueError, match="non-positive"):
        fold_corrections(model)


def test_run_qc_lowers_the_task_loss_and_returns_a_folded_quantized_model(model, calibration_yaml):
    # The paper's recipe: one epoch, Adam, lr 1e-4.
    bn_stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    folded, report = run_qc(model, calibration_yaml, config())
    assert folded is model and not corrected_layers(folded)
    assert len(quantized_modules(folded)) == report["layers"]
    assert report["loss_after"] < report["loss_before"]
    assert report["fold_max_relative_difference"] < 1e-4
    assert report["steps"] == 3 and report["epochs"] == 1
    assert any(row["mean_abs_gamma_minus_1"] > 0 for row in report["corrections"])
    state = folded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in bn_stats.items())

    # The saved model really carries the correction: its loss is the corrected one.
    loader = build_calibration_loader(calibration_yaml, folded, config())
    attach_task_loss(folded)
    assert calibration_loss(folded, loader, "cpu") == pytest.approx(report["loss_after"], rel=1e-3)


def test_correction_stats_are_zero_at_identity(model):
    insert_corrections(model)
    rows = correction_stats(model)
    assert rows and all(row["mean_abs_gamma_minus_1"] == 0 and row["mean_abs_beta"] == 0 for row in rows)


def test_folding_into_a_conv_scale_keeps_codes_that_sit_on_a_rounding_boundary():
    # Oscillating latent weights sit next to rounding boundaries; scaling weight and scale by gamma
    # separately flips many of those codes (1477 of 36864 here), snapping to code * new scale flips none.
    from brevitas.nn import QuantConv2d

    from qat_assets.core.qc import fold_corrections
    from qat_assets.core.quantize import weight_quantizer

    torch.manual_seed(0)
    conv = QuantConv2d(64, 64, 3, bias=True, weight_quant=weight_quantizer(4, True)).eval()
    with torch.no_grad():
        scale = conv.quant_weight().scale
        codes_below = torch.randint(-6, 6, conv.weight.shape).float()
        conv.weight.copy_((codes_below + 0.5) * scale * (1 - 3e-8))
        codes = conv.quant_weight().int()
        gamma, beta = torch.rand(64) + 0.5, torch.randn(64) * 0.1
        model = torch.nn.Sequential(conv)
        fold_corrections(model, {"0": (gamma, beta)})
        assert torch.equal(conv.quant_weight().int(), codes)
        assert torch.allclose(conv.quant_weight().scale.flatten(), (scale.flatten() * gamma))


def test_qc_gives_the_same_result_whatever_the_process_torch_seed(model, calibration_yaml):
    """Ultralytics seeds the calibration loader's shuffle from torch's seed; QC sets it from its own."""
    reports = []
    for process_seed in (123, 456):
        torch.manual_seed(process_seed)
        reports.append(run_qc(copy.deepcopy(model), calibration_yaml, config(epochs=2, seed=7))[1])
    assert reports[0]["loss_before"] == reports[1]["loss_before"]
    assert reports[0]["loss_after"] == reports[1]["loss_after"]


# --- one weight scale per conv (per_channel_scales=false) ------------------------------------------------


@pytest.fixture(scope="module", params=[True, False], ids=["learned-scales", "statistics-scales"])
def per_tensor_model(request, calibration_yaml) -> nn.Module:
    return quantized_yolo(calibration_yaml, QuantOptions(per_channel_scales=False, learned_scales=request.param))


def head_output_names(model: nn.Module) -> list[str]:
    return [name for name, _ in quantized_modules(model) if name.startswith("model.23.") and name.endswith(".2")]


def test_with_one_weight_scale_per_conv_the_head_outputs_keep_gamma_at_one(per_tensor_model, quantized_model):
    names = [name for name, _ in quantized_modules(per_tensor_model)]
    assert fixed_gamma_layers(per_tensor_model, names) == head_output_names(per_tensor_model)
    assert len(head_output_names(per_tensor_model)) == 12
    assert fixed_gamma_layers(quantized_model, names) == []  # per-channel scales take any gamma

    trainee = correction_trainee(per_tensor_model)
    fixed = {name for name, layer in corrected_layers(trainee) if not isinstance(layer.gamma, nn.Parameter)}
    assert fixed == set(head_output_names(per_tensor_model))
    trainable = {id(p) for p in correction_parameters(trainee)}
    assert len(trainable) == 2 * len(names) - len(fixed)
    assert all(id(trainee.get_submodule(name).beta) in trainable for name in fixed)


def test_per_tensor_fold_is_exact_and_keeps_the_integer_grid(per_tensor_model):
    trainee = correction_trainee(per_tensor_model)
    randomize_corrections(trainee)
    corrections = learned_corrections(trainee)
    heads = head_output_names(per_tensor_model)
    before = {name: (integer_weights(per_tensor_model.get_submodule(name)),
                     per_tensor_model.get_submodule(name).quant_weight().scale.clone(),
                     per_tensor_model.get_submodule(name).bias.detach().clone()) for name in heads}

    folded = fold_corrections(copy.deepcopy(per_tensor_model), corrections)
    assert fold_equivalence(trainee, folded, images()) < 1e-4
    for name in heads:  # the grid and its one scale are untouched; beta went into the bias
        conv, (codes, scale, bias) = folded.get_submodule(name), before[name]
        assert torch.equal(integer_weights(conv), codes)
        assert torch.equal(conv.quant_weight().scale, scale)
        assert torch.equal(conv.bias, bias + corrections[name][1])

    # A per-channel gamma on such a conv has nowhere exact to go: refused, never folded approximately.
    gamma, beta = corrections[heads[0]]
    with pytest.raises(ValueError, match="share one scale"):
        fold_corrections(copy.deepcopy(per_tensor_model), {heads[0]: (gamma * 1.1, beta)})


def test_run_qc_with_one_weight_scale_per_conv(per_tensor_model, calibration_yaml):
    model = copy.deepcopy(per_tensor_model)
    folded, report = run_qc(model, calibration_yaml, config())  # the paper's Adam, lr 1e-4
    assert not corrected_layers(folded)
    assert report["fixed_gamma_layers"] == head_output_names(per_tensor_model)
    assert report["fold_max_relative_difference"] < 1e-4
    assert report["fold_check_precision"] == "float64, autocast off"
    assert math.isfinite(report["loss_after"])  # what QC gains is test_run_qc_lowers_the_task_loss's business
    rows = {row["name"]: row for row in report["corrections"]}
    assert all(rows[name]["max_abs_gamma_minus_1"] == 0 for name in report["fixed_gamma_layers"])
    assert any(rows[name]["max_abs_beta"] > 0 for name in report["fixed_gamma_layers"])
    assert any(row["max_abs_gamma_minus_1"] > 0 for row in rows.values())


# --- exact arithmetic: the fold check under a GPU's TF32 convolutions -------------------------------------


def round_to_tf32(tensor: torch.Tensor) -> torch.Tensor:
    """Round an fp32 tensor to TF32's 10-bit mantissa (to nearest, ties away from zero), as tensor cores read it."""
    bits = tensor.detach().contiguous().view(torch.int32)
    return (bits + 0x1000).bitwise_and(-0x2000).view(torch.float32)


def emulate_tf32_convolutions(models: list[nn.Module]) -> None:
    """Forward pre-hooks on every conv of `models`: inputs and weights rounded to TF32 while cuDNN's TF32 flag is on.

    What an Ampere GPU does by default (torch.backends.cudnn.allow_tf32 is True). The weights a conv uses
    are computed inside its forward for a quantized conv, so the hook hands the conv rounded fake-quantized
    weights through a one-call override of `_conv_forward`.
    """

    def hook(conv, args):
        if not torch.backends.cudnn.allow_tf32 or args[0].dtype != torch.float32:  # TF32 rounds fp32 only
            return None
        original = type(conv)._conv_forward
        conv._conv_forward = lambda x, weight, bias: (
            conv.__dict__.pop("_conv_forward"), original(conv, round_to_tf32(x), round_to_tf32(weight), bias))[1]
        return None

    for model in models:
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.register_forward_pre_hook(hook)


def fp32_difference(unfolded: nn.Module, folded: nn.Module, images: torch.Tensor) -> float:
    """The fold check as it was: the models run as they are (fp32, under whatever TF32 flag is set)."""
    pairs = zip(_raw_predictions(unfolded, images), _raw_predictions(folded, images), strict=True)
    return max(float((a - b).abs().max() / a.abs().max()) for a, b in pairs)


@pytest.fixture
def corrected_pair(model):
    """run_qc's check, set up with random corrections: the trainee (BNs absorbed) and the folded quantized model."""
    trainee = correction_trainee(model)
    randomize_corrections(trainee)
    corrections = learned_corrections(trainee)
    return trainee, model, corrections


def test_the_fold_check_passes_under_emulated_tf32_and_still_catches_a_dropped_gamma(corrected_pair, monkeypatch):
    """The check computes in float64 with TF32 flags off; the TF32 emulation must not reach it."""
    trainee, quantized, corrections = corrected_pair
    folded = fold_corrections(copy.deepcopy(quantized), corrections)
    # One layer's gamma left out of the fold (its beta kept): the block before the head.
    name = "model.22.cv2.conv"
    wrong = fold_corrections(copy.deepcopy(quantized), {**corrections, name: (torch.ones_like(corrections[name][0]),
                                                                          corrections[name][1])})
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # the GPU default
    emulate_tf32_convolutions([trainee, folded, wrong])

    tf32_difference = fp32_difference(trainee, folded, images())  # what the check computed before, on a GPU
    exact_difference = fold_equivalence(trainee, folded, images())
    print(f"fold difference: {exact_difference:.2e} exact, {tf32_difference:.2e} in emulated TF32")
    # Measured: 2.3e-2 in emulated TF32, where the check (tolerance 1e-4) would reject a right fold.
    assert exact_difference < 1e-4 < tf32_difference
    assert torch.backends.cudnn.allow_tf32  # restored after the check
    wrong_difference = fold_equivalence(trainee, wrong, images())
    print(f"with {name}'s gamma dropped: {wrong_difference:.2e}")
    assert wrong_difference > 1e-4
