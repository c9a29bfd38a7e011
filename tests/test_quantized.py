"""Item 13 of the battery (DESIGN.md): every method on a bitsandbytes 4-bit / 8-bit base (the CPU backend).

Training works; merging dequantizes, adds ΔW in float32 and requantizes (as peft's LoRA does), so merged
outputs equal unmerged ones up to the quantization error; unmerge restores the base up to that error;
``merge_and_unload`` leaves a plain quantized model. Bounds are set by the error the quantized base already
has against its float original, the yardstick peft's LoRA (the ``lora`` case) meets too.
"""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from peft import get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.integrations import dequantize_bnb_weight
from torch import nn

import hirank
from hirank.tuners.base import dense_base_weight
from tests.cases import CASES, MethodCase
from tests.tiny_models import QUANTIZABLE_LLAMA, TINY_MODELS

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

TINY = QUANTIZABLE_LLAMA
BITS = [4, 8]
#: the first case of each method (peft's LoRA included, as the yardstick); one SURM adapter placement
ONE_PER_METHOD = [case for i, case in enumerate(CASES)
                  if case.id.split("-")[0] not in {c.id.split("-")[0] for c in CASES[:i]}]
MERGEABLE = [case for case in ONE_PER_METHOD if case.mergeable]
NOT_MERGEABLE = next(case for case in CASES if not case.mergeable)
#: merged vs unmerged may differ by this multiple of the quantized base's own error (peft's LoRA: ≈ 1×)
QUANTIZATION_ERROR_FACTOR = 3.0
BASE_WEIGHT_SCALE = 10.0
#: ‖deq(Q(W)) − W‖ / ‖W‖ at most, for 4-bit NF4 (blocks of 64) and 8-bit (row-wise absmax) weights
RELATIVE_QUANTIZATION_ERROR = {4: 0.15, 8: 0.02}


@functools.lru_cache(maxsize=None)
def _float_and_quantized(bits: int, directory: str) -> tuple[nn.Module, nn.Module]:
    """The tiny Llama and the same weights loaded 4-/8-bit through transformers, as a user loads a base."""
    model = TINY.build()
    with torch.no_grad():  # at the tiny init (std 0.02) a random ΔW is several ‖W‖; a fine-tune's ΔW is well below
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and ".layers." in name:
                module.weight.mul_(BASE_WEIGHT_SCALE)
    model.save_pretrained(directory)
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=bits == 4, load_in_8bit=bits == 8, bnb_4bit_compute_dtype=torch.float32
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = transformers.AutoModelForCausalLM.from_pretrained(
            directory, quantization_config=quantization, device_map="cpu"
        )
    return model, quantized.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")

    def get(bits: int) -> tuple[nn.Module, nn.Module]:
        """(float model, a fresh copy of its quantized version)."""
        model, quantized = _float_and_quantized(bits, str(directory / str(bits)))
        return model, copy.deepcopy(quantized)

    return get


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes: "inputs will be cast to float16"
        return TINY.output(model, TINY.inputs())


def _quantized_layer_type(bits: int) -> type:
    return bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt


def _dequantized(layer: nn.Module) -> torch.Tensor:
    """The weight as the layer computes with it (hirank's reading, which the packing test below checks)."""
    return dense_base_weight(layer).float()


def _requantized(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """deq(Q(weight)) with the layer's quantization settings, through bitsandbytes' functional API (absmax rounded
    to bf16 where the layer's weight is packed for the AVX512-BF16 CPU kernel, as that packing rounds it)."""
    if isinstance(layer, bnb.nn.Linear4bit):
        state = layer.weight.quant_state
        packed, new_state = bnb.functional.quantize_4bit(weight, blocksize=state.blocksize, quant_type=state.quant_type)
        if getattr(state, "packing_format_for_cpu", False):
            new_state.absmax = new_state.absmax.to(torch.bfloat16).float()
        return bnb.functional.dequantize_4bit(packed, new_state)
    quantized, row_scales, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16))
    return bnb.functional.int8_vectorwise_dequant(quantized, row_scales)


def _packed_for_cpu_kernel(module: nn.Module) -> bool:
    return isinstance(module, bnb.nn.Linear4bit) and getattr(module.weight.quant_state, "packing_format_for_cpu", False)


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason="bitsandbytes packs 4-bit weights only for an "
                    "AVX512-BF16 CPU kernel")
@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double-quantized-absmax"])
def test_a_weight_packed_for_the_cpu_kernel_is_read_as_the_kernel_computes_with_it(nested: bool) -> None:
    """bitsandbytes repacks a 4-bit weight on its first eval forward on such a CPU (absmax rounded to bf16); a merge
    must still read W, not the packed bytes as if they were the portable layout."""
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, compress_statistics=nested)
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128), requires_grad=False, compress_statistics=nested).to("cpu")
    layer.eval()
    before = dequantize_bnb_weight(layer.weight, state=layer.weight.quant_state).clone()
    inputs = torch.randn(5, 128)
    with torch.no_grad():
        outputs = layer(inputs)
    assert _packed_for_cpu_kernel(layer), "the forward did not pack the weight: this test no longer tests anything"

    weight = dense_base_weight(layer)
    assert weight.dtype == torch.float32 and weight.shape == (64, 128)
    torch.testing.assert_close(weight, before, rtol=2**-8, atol=2**-8 * before.abs().max().item())  # bf16 absmax
    torch.testing.assert_close(inputs @ weight.T, outputs, rtol=0.02, atol=0.02 * outputs.abs().max().item())
    with torch.no_grad():  # the layer still computes as before, packed again on this forward
        torch.testing.assert_close(layer(inputs), outputs)


def _adapted(case: MethodCase, base: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return get_peft_model(base, case.config(TINY.target_modules, init_weights=False))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("case", MERGEABLE, ids=lambda c: c.id)
def test_merge_into_quantized_base(case: MethodCase, bits: int, models) -> None:
    float_model, base = models(bits)
    quantization_error = (_logits(base) - _logits(float_model)).abs().max()
    if case.id == "lora" and any(_packed_for_cpu_kernel(m) for m in base.modules()):
        pytest.xfail("peft's LoRA merge dequantizes a 4-bit weight packed for bitsandbytes' CPU kernel as if it "
                     "were unpacked (peft 0.21.2, bitsandbytes 0.50.2 on an AVX512-BF16 CPU)")
    model = _adapted(case, base)
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and all(isinstance(m.get_base_layer(), _quantized_layer_type(bits)) for m in layers)
    base_weights = [_dequantized(m.get_base_layer()).clone() for m in layers]
    unmerged = _logits(model)
    unload_copy = copy.deepcopy(model)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.merge_adapter()
    merged = _logits(model)
    assert (merged - unmerged).abs().max() <= QUANTIZATION_ERROR_FACTOR * quantization_error, (
        f"merged differs from unmerged by {(merged - unmerged).abs().max():.3g}, "
        f"the quantized base from the float one by {quantization_error:.3g}"
    )
    for layer, weight in zip(layers, base_weights):  # the weight is still quantized, and holds W + ΔW
        assert isinstance(layer.get_base_layer(), _quantized_layer_type(bits))
        delta = layer.get_delta_weight("default")
        assert delta.dtype.is_floating_point, f"ΔW comes as {delta.dtype}, not the dtype the weight dequantizes to"
        expected = _requantized(layer.get_base_layer(), weight + delta)
        torch.testing.assert_close(_dequantized(layer.get_base_layer()), expected, rtol=0, atol=0)

    model.unmerge_adapter()
    for layer, weight in zip(layers, base_weights):  # two requantizations, each of error ≤ rel. error × ‖W + ΔW‖
        bound = 2 * RELATIVE_QUANTIZATION_ERROR[bits] * (weight + layer.get_delta_weight("default")).norm()
        error = (_dequantized(layer.get_base_layer()) - weight).norm()
        assert error < bound, f"unmerge restores the base weight only up to {error:.3g} (bound {bound:.3g})"
    assert (_logits(model) - unmerged).abs().max() <= QUANTIZATION_ERROR_FACTOR * quantization_error

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = unload_copy.merge_and_unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in plain.modules())
    q_proj = plain.model.layers[0].self_attn.q_proj
    q_proj = getattr(q_proj, "base_layer", q_proj)  # LoRATRF keeps its task filter live around the merged layer
    assert isinstance(q_proj, _quantized_layer_type(bits))
    assert torch.equal(_logits(plain), merged), "merge_and_unload must give the merged model's outputs"


@pytest.mark.parametrize("case", [*ONE_PER_METHOD, NOT_MERGEABLE], ids=lambda c: c.id)
def test_training_on_4bit_base(case: MethodCase, models) -> None:
    """QLoRA-style: the 4-bit base stays frozen, the float32 adapters train and lower the loss."""
    _, base = models(4)
    torch.manual_seed(0)
    model = get_peft_model(base, case.config(TINY.target_modules))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    inputs = TINY.inputs()
    losses = []
    for _ in range(4):
        loss = TINY.loss(model, inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], f"training on a 4-bit base did not lower the loss: {losses}"
    if not case.mergeable:  # a clear refusal (the method's own reason), not a crash inside bitsandbytes
        with pytest.raises(ValueError, match="cannot be merged"):
            model.merge_adapter()


def test_weight_hirank_cannot_merge_into_is_refused_at_get_peft_model() -> None:
    """An nn.Linear subclass holding integer weights of an unknown quantization scheme: refused up front."""

    class IntegerLinear(nn.Linear):
        pass

    model = TINY_MODELS["mlp"].build()
    odd = IntegerLinear(64, 96)
    odd.weight = nn.Parameter(torch.zeros(96, 64, dtype=torch.int8), requires_grad=False)
    model.lin0 = odd
    case = next(case for case in CASES if case.id == "quanta")
    with pytest.raises(TypeError, match=r"'lin0'.*int8.*Linear4bit"):
        get_peft_model(model, case.config(["lin0", "lin1"]))


def test_folding_quanta_frozen_copy_into_a_4bit_weight_is_refused() -> None:
    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32)
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False).to("cpu")
    with pytest.raises(ValueError, match=r"'0'.*fold_frozen_copy.*bitsandbytes 4bit"):
        get_peft_model(nn.Sequential(layer), hirank.QuantaConfig(target_modules=["0"], fold_frozen_copy=True))
