"""NorMuon on real model classes from ``transformers``, built from tiny configs (nothing downloaded).

The paper's step-1 invariant is exact: with v_0 = 0, v_1 = (1 - β2) mean(O_t ⊙ O_t) per output neuron,
so after the first step every output neuron's update has the same norm, sqrt(inputs / (1 - β2)) times
one scale per matrix. It holds only along the axis that really holds the output neurons, so checking it
on every hidden matrix of GPT-2 (Conv1D, neurons are columns), Llama (nn.Linear, rows), Mixtral
(stacked experts (E, out, in)), GPT-OSS (stacked experts (E, in, out)) and ViT (a conv kernel) checks
that ``split_parameters`` found each weight's layout and that NorMuon honors it. The expected layouts
below are written from the model code, not read from normuon.py.
"""

import re
import warnings

import pytest
import torch
import transformers
from torch import nn

import normuon

LR = 0.05  # large enough that W_before - W_after keeps ~7 digits in fp32 (weights are ~0.02)
SPREAD_TOLERANCE = 1e-5
WRONG_AXIS_MIN_SPREAD = 1e-3  # 100x the tolerance: the invariant must not hold by accident on the other axis

transformers.logging.set_verbosity_error()  # tiny vocabularies make the configs warn about token ids


# -----------------------------------------------------------------------------
# The models, and the layout of each of their parameters as the model code defines it. Every
# nn.Linear weight but the head is (out, in); each model adds {name pattern: layout} for its other
# hidden weights and the patterns of the ≥2-D parameters split_parameters should leave to AdamW
# with a warning. Everything else (None) belongs to AdamW silently.


def gpt2():
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=16, vocab_size=64)
    layouts = {r"\.(c_attn|c_proj|c_fc)\.weight$": "in_out"}  # Conv1D: y = x W + b, W is (in, out)
    return transformers.GPT2LMHeadModel(config), layouts, {}


def llama_untied():
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config), {}, {}  # lm_head is an untied nn.Linear: AdamW's


def mixtral():
    config = transformers.MixtralConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=64)
    # MixtralExperts: F.linear(x, gate_up_proj[e]) and F.linear(h, down_proj[e]), so (E, out, in).
    layouts = {r"experts\.(gate_up_proj|down_proj)$": "experts_out_in"}
    warned = {r"mlp\.gate\.weight$"}  # the router (E, hidden): a bare parameter of a custom module
    return transformers.MixtralForCausalLM(config), layouts, warned


def gpt_oss():
    config = transformers.GptOssConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                                       vocab_size=64, layer_types=["full_attention"])
    # GptOssExperts: hidden @ gate_up_proj[e] + bias, so (E, in, out) (its experts say is_transposed=True).
    layouts = {r"experts\.(gate_up_proj|down_proj)$": "experts_in_out"}
    warned = {r"router\.weight$", r"experts\.\w+_bias$"}  # the router, and the experts' biases (E, out)
    return transformers.GptOssForCausalLM(config), layouts, warned


def vit():
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=48, num_labels=5)
    # cls_token (1, 1, C) is vector-like; position_embeddings (1, T, C) is a ≥2-D parameter of no layer.
    layouts = {r"patch_embeddings\.projection\.weight$": "conv"}
    return transformers.ViTForImageClassification(config), layouts, {r"position_embeddings$"}


MODELS = [gpt2, llama_untied, mixtral, gpt_oss, vit]


def output_head(model) -> nn.Module:
    return model.classifier if isinstance(model, transformers.ViTForImageClassification) else model.lm_head


def expected_layouts(model, layouts: dict) -> dict:
    """{name: layout} of every parameter NorMuon should train."""
    head = output_head(model)
    expected = {f"{module_name}.weight": "out_in" for module_name, module in model.named_modules()
                if isinstance(module, nn.Linear) and module is not head}
    for name, _ in model.named_parameters():
        for pattern, layout in layouts.items():
            if re.search(pattern, name):
                assert name not in expected, f"{name}: two expected layouts"
                expected[name] = layout
    return expected


def batch_loss(model) -> torch.Tensor:
    """A loss that reaches every parameter: random tokens (or images) of a fixed seed."""
    generator = torch.Generator().manual_seed(0)
    if isinstance(model, transformers.ViTForImageClassification):
        images = torch.randn(4, 3, 8, 8, generator=generator)
        return model(pixel_values=images, labels=torch.randint(0, 5, (4,), generator=generator)).loss
    tokens = torch.randint(0, model.config.vocab_size, (2, 16), generator=generator)
    return model(input_ids=tokens, labels=tokens).loss


# -----------------------------------------------------------------------------
# Measuring an update along a layout's neuron axis


def neuron_matrices(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """(B, neurons, inputs) for a parameter-shaped ``tensor``, written independently of normuon.as_matrices."""
    if layout == "out_in":
        return tensor[None]
    if layout == "in_out":
        return tensor.T[None]
    if layout == "conv":
        return tensor.flatten(1)[None]
    if layout == "experts_out_in":
        return tensor
    if layout == "experts_in_out":
        return tensor.transpose(1, 2)
    raise AssertionError(layout)


WRONG_AXIS = {"out_in": "in_out", "in_out": "out_in", "conv": None, "experts_out_in": "experts_in_out",
              "experts_in_out": "experts_out_in"}


def spread(matrices: torch.Tensor) -> torch.Tensor:
    """(max - min) / mean of the row norms of each matrix (B, m, n): one number per matrix."""
    norms = matrices.double().norm(dim=-1)
    return (norms.amax(-1) - norms.amin(-1)) / norms.mean(-1)


def split(model, **options):
    """split_parameters' groups, as (the NorMuon groups, the AdamW parameters, all groups)."""
    groups = normuon.split_parameters(model, adamw_lr=1e-3, **options)
    adamw_params = [param for group in groups if not group["use_muon"] for param in group["params"]]
    return [group for group in groups if group["use_muon"]], adamw_params, groups


def one_step(model, groups):
    """One forward/backward and one step of the one NorMuon optimizer (AdamW groups inside), weight
    decay 0. Returns {name: W_before - W_after}."""
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    batch_loss(model).backward()
    normuon.NorMuon(groups, lr=LR, weight_decay=0.0).step()
    return {name: before[name] - param.detach() for name, param in model.named_parameters()}


@pytest.fixture(params=MODELS, ids=lambda build: build.__name__, scope="module")
def stepped(request):
    """(model, expected layouts, expected warnings, NorMuon groups, AdamW params, warnings, updates)."""
    torch.manual_seed(0)
    model, layouts, warned = request.param()
    exclude = [model.classifier] if isinstance(model, transformers.ViTForImageClassification) else []  # no head API
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups, adamw_params, all_groups = split(model, exclude=exclude)
    messages = [str(w.message) for w in caught if "split_parameters" in str(w.message)]
    updates = one_step(model, all_groups)
    return model, layouts, warned, groups, adamw_params, messages, updates


def normuon_layouts(model, groups) -> dict:
    """{name: layout} of the parameters split_parameters gave NorMuon."""
    layout_of = {id(param): group["layout"] for group in groups for param in group["params"]}
    return {name: layout_of[id(param)] for name, param in model.named_parameters() if id(param) in layout_of}


# -----------------------------------------------------------------------------
# The tests


def test_split_gives_every_parameter_once_with_the_layout_the_model_implies(stepped):
    model, layouts, _, groups, adamw_params, _, _ = stepped
    normuon_ids = [id(param) for group in groups for param in group["params"]]
    all_ids = [id(param) for param in model.parameters()]
    assert sorted(normuon_ids + [id(param) for param in adamw_params]) == sorted(all_ids)
    assert len({group["layout"] for group in groups}) == len(groups)  # one group per layout
    assert normuon_layouts(model, groups) == expected_layouts(model, layouts)


def test_no_embedding_head_norm_or_bias_goes_to_normuon(stepped):
    model, _, _, groups, _, _, _ = stepped
    to_normuon = {id(param) for group in groups for param in group["params"]}
    head = output_head(model)
    not_hidden = [head, *[m for m in model.modules() if isinstance(m, nn.Embedding)
                          or type(m).__name__.endswith(("Norm", "RMSNorm")) or isinstance(m, nn.LayerNorm)]]
    assert head is not None and len(not_hidden) > 2  # the head, an embedding, norms
    assert not any(id(p) in to_normuon for module in not_hidden for p in module.parameters())
    biases = [p for name, p in model.named_parameters() if name.endswith(("bias", "sinks"))]  # GPT-OSS: 2-D biases
    assert not any(id(p) in to_normuon for p in biases)


def test_untied_llama_head_goes_to_adamw_without_exclude():
    model, _, _ = llama_untied()
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # the case the head must be found in
    _, adamw_params, _ = split(model)
    assert any(param is model.lm_head.weight for param in adamw_params)


def test_warning_names_exactly_the_unrecognized_matrices(stepped):
    model, layouts, warned, _, _, messages, _ = stepped
    unrecognized = [name for name, p in model.named_parameters() if any(re.search(w, name) for w in warned)]
    assert not set(unrecognized) & set(expected_layouts(model, layouts))
    if not warned:
        assert not messages
        return
    assert len(messages) == 1
    named = set(re.findall(r"[\w.]+(?= \()", messages[0]))  # "name (shape)" entries
    assert named == set(unrecognized)


def test_step_one_every_output_neuron_update_has_the_same_norm(stepped):
    """Along the axis the model code says holds the neurons, not the one split_parameters chose."""
    model, layouts, _, _, _, _, updates = stepped
    for name, layout in expected_layouts(model, layouts).items():
        matrices = neuron_matrices(updates[name], layout)
        assert (matrices.norm(dim=-1) > 0).all(), f"{name}: a neuron got no update (no gradient?)"
        assert spread(matrices).max() < SPREAD_TOLERANCE, f"{name} ({layout}): output-neuron norms differ"
        if WRONG_AXIS[layout] is not None:  # the test must be able to tell the axes apart
            other = neuron_matrices(updates[name], WRONG_AXIS[layout])
            assert spread(other).min() > WRONG_AXIS_MIN_SPREAD, f"{name}: equal norms on the other axis too"


def test_step_one_update_rms_is_0_2_lr_per_matrix_and_per_expert(stepped):
    model, layouts, _, _, _, _, updates = stepped
    for name, layout in expected_layouts(model, layouts).items():
        matrices = neuron_matrices(updates[name], layout)  # experts: one matrix each
        rms = matrices.double().square().mean(dim=(-2, -1)).sqrt()
        torch.testing.assert_close(rms, torch.full_like(rms, 0.2 * LR), rtol=1e-5, atol=0, msg=name)


def test_a_wrong_layout_breaks_the_invariant():
    """The check above can fail: GPT-2's Conv1D weights declared (out, in) get equal *input* norms instead."""
    torch.manual_seed(0)
    model, _, _ = gpt2()
    names = [name for name, _ in model.named_parameters() if name.endswith("c_attn.weight")]
    _, _, groups = split(model, layouts={name: "out_in" for name in names})
    updates = one_step(model, groups)
    for name in names:
        assert spread(neuron_matrices(updates[name], "in_out")).item() > WRONG_AXIS_MIN_SPREAD
        assert spread(neuron_matrices(updates[name], "out_in")).item() < SPREAD_TOLERANCE
