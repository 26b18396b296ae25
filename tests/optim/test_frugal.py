"""Frugal: each subspace against an independent oracle (torch.optim.AdamW on the coordinates), the edge
densities, reset/keep, state dict round trip and bit-exact resume, state memory, and a tiny Llama."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from effllm.optim import AdamW8bit, Frugal
from effllm.optim.frugal import frugal_param_groups
from effllm.optim.subspace import rotating_blocks

LR = 1e-2


def make_grads(shape, steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(steps)]


def run_on_grads(param, optimizer, grads):
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()


def adamw_on_coordinates(coordinate_grads, lr=LR):
    """The oracle: torch.optim.AdamW on a zero tensor fed the coordinate gradients; returns its total move."""
    coordinates = torch.zeros_like(coordinate_grads[0], requires_grad=True)
    oracle = torch.optim.AdamW([coordinates], lr=lr, weight_decay=0.0)
    for grad in coordinate_grads:
        coordinates.grad = grad.clone()
        oracle.step()
    return coordinates.detach()


def oriented(matrix):
    """The weight's shorter side first, as Frugal projects it."""
    return matrix if matrix.shape[0] <= matrix.shape[1] else matrix.T


def unoriented(matrix, shape):
    return matrix if shape[0] <= shape[1] else matrix.T


# --- subspaces ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(12, 40), (40, 12)], ids=["wide", "tall"])
def test_svd_basis_is_the_top_singular_subspace_held_alone(shape):
    param = nn.Parameter(torch.zeros(shape))
    optimizer = Frugal([param], lr=LR, density=0.25, projection="svd")
    grad = make_grads(shape, 1)[0]
    run_on_grads(param, optimizer, [grad])
    basis = optimizer.state[param]["basis"]
    rank, d = 3, 12
    assert basis.shape == (rank, d)
    torch.testing.assert_close(basis @ basis.T, torch.eye(rank), atol=1e-5, rtol=0)
    a = oriented(grad)
    singular_values = torch.linalg.svdvals(a)
    residual = a - basis.T @ (basis @ a)
    torch.testing.assert_close(residual.norm() ** 2, (singular_values[rank:] ** 2).sum(), rtol=1e-4, atol=0)
    # Only the projection itself is held, not the SVD factor it came from.
    assert basis.untyped_storage().nbytes() == basis.numel() * basis.element_size()


def test_svd_of_a_low_rank_gradient_keeps_the_update_in_its_span():
    """A rank-2 gradient and a rank-6 subspace: the 4 extra singular vectors are arbitrary, and the residual
    is rounding noise. Neither may move the weight (signSGD and Adam would turn noise into full steps)."""
    generator = torch.Generator().manual_seed(0)
    left = torch.linalg.qr(torch.randn(12, 2, generator=generator))[0]  # (12, 2) orthonormal
    grad = left @ torch.randn(2, 40, generator=generator)
    param = nn.Parameter(torch.zeros(12, 40))
    optimizer = Frugal([param], lr=LR, density=0.5, projection="svd")
    run_on_grads(param, optimizer, [grad])
    basis = optimizer.state[param]["basis"]
    assert basis.shape == (6, 12)
    assert (basis.abs().sum(dim=1) > 0).tolist() == [True, True, False, False, False, False]
    outside_span = param.detach() - left @ (left.T @ param.detach())
    assert param.detach().abs().max() > 0.5 * LR
    assert outside_span.abs().max() < 1e-6


@pytest.mark.parametrize("projection, key", [("svd", "basis"), ("random", "basis"), ("columns", "indices")])
def test_each_projection_owns_its_storage(projection, key):
    """What state holds is the projection alone, not a view that keeps a bigger tensor alive."""
    param = nn.Parameter(torch.zeros(12, 40))
    optimizer = Frugal([param], lr=LR, density=0.25, projection=projection)
    run_on_grads(param, optimizer, make_grads((12, 40), 1))
    held = optimizer.state[param][key]
    assert held.untyped_storage().nbytes() == held.numel() * held.element_size()


@pytest.mark.parametrize("projection", ["svd", "random"])
@pytest.mark.parametrize("shape", [(12, 40), (40, 12)], ids=["wide", "tall"])
def test_basis_update_is_adamw_on_the_coordinates(projection, shape):
    """With no state-free part, the weight moves by basis^T @ (AdamW's move on basis @ G)."""
    param = nn.Parameter(torch.randn(shape))
    start = param.detach().clone()
    optimizer = Frugal([param], lr=LR, density=0.25, projection=projection, state_free="none", update_gap=10)
    grads = make_grads(shape, 4)
    run_on_grads(param, optimizer, grads)
    basis = optimizer.state[param]["basis"]
    move = adamw_on_coordinates([basis @ oriented(g) for g in grads])
    expected = start + unoriented(basis.T @ move, shape)
    torch.testing.assert_close(param.detach(), expected, atol=1e-6, rtol=1e-5)


def test_random_basis_is_semi_orthogonal_seeded_and_refreshed():
    def basis_after(steps, seed):
        param = nn.Parameter(torch.zeros(16, 24))
        optimizer = Frugal([param], lr=LR, density=0.5, projection="random", update_gap=2, seed=seed)
        run_on_grads(param, optimizer, make_grads((16, 24), steps))
        return optimizer.state[param]["basis"]

    basis = basis_after(1, seed=0)
    assert basis.shape == (8, 16)
    torch.testing.assert_close(basis @ basis.T, torch.eye(8), atol=1e-5, rtol=0)
    assert torch.equal(basis, basis_after(2, seed=0))  # no refresh within the gap
    assert not torch.equal(basis, basis_after(3, seed=0))  # refreshed at step 3
    assert not torch.equal(basis, basis_after(1, seed=1))


@pytest.mark.parametrize("shape", [(12, 40), (40, 12)], ids=["wide", "tall"])
def test_columns_update_chosen_rows_with_adamw_and_the_rest_with_sign(shape):
    param = nn.Parameter(torch.randn(shape))
    start = param.detach().clone()
    optimizer = Frugal([param], lr=LR, density=0.5, projection="columns", update_gap=10)
    grads = make_grads(shape, 3)
    run_on_grads(param, optimizer, grads)
    indices = optimizer.state[param]["indices"]
    assert indices.dtype == torch.int64 and indices.shape == (6,)
    assert torch.equal(indices, indices.unique())  # distinct and sorted
    others = torch.tensor([i for i in range(12) if i not in indices.tolist()])
    moved = oriented(param.detach() - start)
    expected_chosen = adamw_on_coordinates([oriented(g)[indices] for g in grads])
    torch.testing.assert_close(moved[indices], expected_chosen, atol=1e-6, rtol=1e-5)
    expected_others = -LR * sum(oriented(g)[others].sign() for g in grads)
    torch.testing.assert_close(moved[others], expected_others, atol=1e-6, rtol=1e-5)


def test_rotating_blocks_cycle_through_all_weights_within_budget():
    sizes = [4, 4, 4, 4, 8]
    density = 1 / 3  # a budget of 8 elements
    windows = [rotating_blocks(sizes, density, refresh) for refresh in range(6)]
    assert windows[:4] == [[0, 1], [2, 3], [4], [0, 1]]
    assert all(sum(sizes[i] for i in w) <= density * sum(sizes) for w in windows)
    assert rotating_blocks(sizes, 0.0, 3) == []
    assert rotating_blocks(sizes, 1.0, 3) == [0, 1, 2, 3, 4]
    assert rotating_blocks([100, 1], 0.1, 0) == [0]  # at least one weight


def test_blocks_rotate_and_inactive_weights_get_sign_updates():
    params = [nn.Parameter(torch.randn(6, 10)) for _ in range(4)]
    optimizer = Frugal(params, lr=LR, density=0.5, projection="blocks", update_gap=2)
    grads = [make_grads((6, 10), 2, seed=i) for i in range(4)]
    starts = [p.detach().clone() for p in params]
    for step in range(2):
        for param, param_grads in zip(params, grads):
            param.grad = param_grads[step].clone()
        optimizer.step()
    for i, param in enumerate(params):
        if i in (0, 1):  # the first window: AdamW on the whole weight
            expected = starts[i] + adamw_on_coordinates(grads[i])
            assert optimizer.state[param]["inner"]
        else:
            expected = starts[i] - LR * (grads[i][0].sign() + grads[i][1].sign())
            assert not optimizer.state[param]["inner"]
        torch.testing.assert_close(param.detach(), expected, atol=1e-6, rtol=1e-5)
    for param in params:
        param.grad = torch.ones_like(param)
    optimizer.step()  # step 3: the window moves on, the first weights drop their state
    assert [bool(optimizer.state[p]["inner"]) for p in params] == [False, False, True, True]


# --- edge densities ----------------------------------------------------------------------------------------
class TinyNet(nn.Module):
    def __init__(self, vocab=20, hidden=16, wide=24):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.up = nn.Linear(hidden, wide)
        self.norm = nn.LayerNorm(wide)
        self.down = nn.Linear(wide, hidden, bias=False)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, tokens):
        return self.lm_head(self.down(self.norm(torch.relu(self.up(self.embed(tokens))))))


def loss_of(model, tokens):
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def train(model, optimizer, steps, seed=0, scheduler=None, vocab=20):
    tokens = torch.randint(0, vocab, (4, 9), generator=torch.Generator().manual_seed(seed))
    losses = []
    for _ in range(steps):
        loss = loss_of(model, tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    return TinyNet()


def test_model_groups_keep_embeddings_norms_head_and_biases_state_full(tiny_net):
    projected, state_full = frugal_param_groups(tiny_net)
    assert projected["projected"] and not state_full["projected"]
    assert {id(p) for p in projected["params"]} == {id(tiny_net.up.weight), id(tiny_net.down.weight)}
    groups = frugal_param_groups(tiny_net, state_full_patterns=[r"^down\."], projected_patterns=[r"lm_head"])
    assert {id(p) for p in groups[0]["params"]} == {id(tiny_net.up.weight), id(tiny_net.lm_head.weight)}


REFERENCES = {
    "AdamW8bit-32": lambda params: AdamW8bit(params, lr=LR, weight_decay=0.1, state_bits=32),
    "torch-AdamW": lambda params: torch.optim.AdamW(params, lr=LR, weight_decay=0.1),
}


@pytest.mark.parametrize("inner, reference", [("adamw", "AdamW8bit-32"), ("adamw", "torch-AdamW"),
                                              (torch.optim.AdamW, "torch-AdamW")])
def test_density_one_svd_is_plain_adamw(tiny_net, inner, reference):
    """rho = 1 with SVD: the subspace is everything, so Frugal is plain AdamW, across refreshes and an
    LR schedule (the inner optimizer follows Frugal's learning rate)."""
    reference_net = copy.deepcopy(tiny_net)
    frugal = Frugal(tiny_net, lr=LR, density=1.0, projection="svd", update_gap=2, weight_decay=0.1, inner=inner)
    plain = REFERENCES[reference](reference_net.parameters())
    schedules = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (frugal, plain)]
    train(tiny_net, frugal, 5, scheduler=schedules[0])
    train(reference_net, plain, 5, scheduler=schedules[1])
    for mine, theirs in zip(tiny_net.parameters(), reference_net.parameters()):
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-6)
    assert all("basis" not in frugal.state[p] for p in tiny_net.parameters())
    if isinstance(plain, AdamW8bit):
        assert frugal.state_bytes() == plain.state_bytes()


def test_density_zero_is_sign_sgd_on_projected_weights_and_adamw_elsewhere(tiny_net):
    reference_net = copy.deepcopy(tiny_net)
    frugal = Frugal(tiny_net, lr=LR, density=0.0)
    projected = {id(reference_net.up.weight), id(reference_net.down.weight)}
    state_full = [p for p in reference_net.parameters() if id(p) not in projected]
    adamw = torch.optim.AdamW(state_full, lr=LR, weight_decay=0.0)
    tokens = torch.randint(0, 20, (4, 9), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        for model, optimizer in ((tiny_net, frugal), (reference_net, adamw)):
            loss_of(model, tokens).backward()
            optimizer.step()
        with torch.no_grad():
            for weight in (reference_net.up.weight, reference_net.down.weight):
                weight -= LR * weight.grad.sign()
        frugal.zero_grad()
        reference_net.zero_grad()
    for mine, theirs in zip(tiny_net.parameters(), reference_net.parameters()):
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-6)
    state_full_bytes = sum(2 * p.numel() * 4 for p in state_full)
    assert frugal.state_bytes() == state_full_bytes


@pytest.mark.parametrize("rule, scale", [("signsgd", 0.5), ("sgd", 1.0), ("none", 1.0)])
def test_state_free_rules_and_their_lr_scale(rule, scale):
    param = nn.Parameter(torch.randn(8, 12))
    start = param.detach().clone()
    optimizer = Frugal([param], lr=LR, density=0.0, state_free=rule, state_free_lr_scale=scale)
    grad = make_grads((8, 12), 1)[0]
    run_on_grads(param, optimizer, [grad])
    direction = {"signsgd": grad.sign(), "sgd": grad, "none": torch.zeros_like(grad)}[rule]
    torch.testing.assert_close(param.detach(), start - scale * LR * direction, atol=0, rtol=0)


def test_state_full_lr_scale_scales_the_subspace_part():
    moves = []
    for scale in (1.0, 0.5):
        param = nn.Parameter(torch.zeros(8, 12))
        optimizer = Frugal([param], lr=LR, density=0.5, state_free="none", state_full_lr_scale=scale)
        run_on_grads(param, optimizer, make_grads((8, 12), 2))
        moves.append(param.detach().clone())
    torch.testing.assert_close(moves[1], 0.5 * moves[0], atol=1e-7, rtol=1e-5)


def test_weight_decay_is_decoupled_on_projected_weights():
    param = nn.Parameter(torch.randn(8, 12))
    start = param.detach().clone()
    optimizer = Frugal([param], lr=LR, density=0.0, state_free="none", weight_decay=0.1)
    run_on_grads(param, optimizer, make_grads((8, 12), 1))
    torch.testing.assert_close(param.detach(), start * (1 - LR * 0.1), atol=0, rtol=0)


# --- reset or keep -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("projection", ["svd", "random", "columns"])
def test_reset_clears_the_inner_moments_at_refresh_keep_does_not(projection):
    results = {}
    for reset in (True, False):
        param = nn.Parameter(torch.zeros(8, 12))
        optimizer = Frugal([param], lr=LR, density=0.5, projection=projection, update_gap=2, reset_state=reset)
        run_on_grads(param, optimizer, make_grads((8, 12), 3))  # refreshes at steps 1 and 3
        results[reset] = (optimizer.state[param]["inner"], param.detach().clone())
    assert int(results[True][0]["step"]) == 1
    assert int(results[False][0]["step"]) == 3
    assert not torch.equal(results[True][1], results[False][1])


# --- state dict --------------------------------------------------------------------------------------------
def assert_same_state(left, right):
    assert left.keys() == right.keys()
    for key in left:
        if isinstance(left[key], dict):
            assert_same_state(left[key], right[key])
        elif torch.is_tensor(left[key]):
            assert left[key].dtype == right[key].dtype and torch.equal(left[key], right[key]), key
        else:
            assert left[key] == right[key], key


@pytest.mark.parametrize("inner", ["adamw", "adamw8bit"])
@pytest.mark.parametrize("projection", ["svd", "random", "columns", "blocks"])
def test_state_dict_round_trips_and_resume_is_bit_exact(tiny_net, projection, inner):
    options = dict(lr=LR, density=0.25, projection=projection, update_gap=3, inner=inner,
                   inner_kwargs={"min_8bit_size": 0}, weight_decay=0.01)
    optimizer = Frugal(tiny_net, **options)
    train(tiny_net, optimizer, 4)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed_net = copy.deepcopy(tiny_net)
    resumed = Frugal(resumed_net, **options)
    resumed.load_state_dict(saved)
    assert_same_state(resumed.state_dict()["state"], optimizer.state_dict()["state"])
    assert resumed.state_bytes() == optimizer.state_bytes()
    if inner == "adamw8bit":
        codes = [s["inner"]["state1"] for s in resumed.state.values() if s["inner"]]
        assert codes and all(c.dtype == torch.uint8 for c in codes)

    train(tiny_net, optimizer, 5, seed=1)  # crosses the refreshes at steps 7 (and 10 for blocks)
    train(resumed_net, resumed, 5, seed=1)
    for mine, theirs in zip(tiny_net.parameters(), resumed_net.parameters()):
        assert torch.equal(mine, theirs)
    assert_same_state(resumed.state_dict()["state"], optimizer.state_dict()["state"])


# --- memory and training -----------------------------------------------------------------------------------
def tiny_llama(hidden, intermediate, layers, vocab=256, tie=False):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=tie)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def one_step(model, optimizer):
    tokens = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_inner_adamw8bit_holds_at_most_015_of_adamw_state():
    """A Llama whose weights dominate (the vocabulary as small as the hidden size): Frugal rho = 0.25
    with 8-bit inner state against 32-bit AdamW. Sizes are such that every projected state is 8-bit
    (>= 4096 elements)."""
    model = tiny_llama(hidden=128, intermediate=344, layers=2, vocab=128)
    adamw = AdamW8bit(model.parameters(), lr=LR, state_bits=32)
    one_step(model, adamw)
    frugal = Frugal(model, lr=LR, density=0.25, inner="adamw8bit")
    one_step(model, frugal)
    ratio = frugal.state_bytes() / adamw.state_bytes()
    assert adamw.state_bytes() == 8 * sum(p.numel() for p in model.parameters())
    assert ratio <= 0.15, ratio
    assert "state1" in frugal.state[model.model.layers[0].self_attn.q_proj.weight]["inner"]


def test_tied_head_and_llama_modules_are_chosen_by_type():
    model = tiny_llama(hidden=32, intermediate=64, layers=1, vocab=64, tie=True)
    projected, state_full = frugal_param_groups(model)
    projected_names = {n for n, p in model.named_parameters() if any(p is q for q in projected["params"])}
    assert projected_names == {f"model.layers.0.{m}.weight" for m in
                               ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert any(p is model.model.embed_tokens.weight for p in state_full["params"])


def test_loss_decreases_on_a_tiny_llama():
    model = tiny_llama(hidden=32, intermediate=64, layers=2, vocab=32)
    optimizer = Frugal(model, lr=1e-2, density=0.25, update_gap=8, inner="adamw8bit",
                       inner_kwargs={"min_8bit_size": 0})
    generator = torch.Generator().manual_seed(0)
    starts = torch.randint(0, 32, (8, 1), generator=generator)
    tokens = (starts + 5 * torch.arange(16)) % 32  # a learnable pattern
    losses = []
    for _ in range(24):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# --- validation --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    (dict(density=1.5), "density"),
    (dict(projection="pca"), "projection"),
    (dict(state_free="adam"), "state_free"),
    (dict(inner="sgd"), "inner"),
    (dict(update_gap=0), "update_gap"),
])
def test_bad_options_are_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        Frugal([nn.Parameter(torch.zeros(4, 4))], **options)


def test_a_bad_group_added_later_leaves_no_trace():
    optimizer = Frugal([nn.Parameter(torch.zeros(4, 4))])
    with pytest.raises(ValueError, match="density"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(4, 4))], "density": -1})
    assert len(optimizer.param_groups) == 1 and len(optimizer.inner.param_groups) == 2


# --- torch.optim semantics ---------------------------------------------------------------------------------
def test_add_param_group_and_closure():
    first = nn.Parameter(torch.randn(8, 12))
    optimizer = Frugal([first], lr=LR, density=0.5, state_free="none")
    second = nn.Parameter(torch.zeros(8, 12))
    start = second.detach().clone()
    optimizer.add_param_group({"params": [second], "density": 1.0, "lr": 2 * LR})
    grad = make_grads((8, 12), 1)[0]

    def closure():
        optimizer.zero_grad()
        loss = (second * grad).sum() + first.square().sum()
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert torch.is_tensor(loss)
    # density 1 in the new group: AdamW's first step, sign-like, at the group's own learning rate
    torch.testing.assert_close(second.detach(), start + adamw_on_coordinates([grad], lr=2 * LR))
    assert "basis" in optimizer.state[first]


@pytest.mark.parametrize("projection", ["svd", "random", "columns", "blocks"])
def test_bf16_weights(projection):
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(8, 12, dtype=torch.bfloat16)) for _ in range(2)]
    starts = [p.detach().clone() for p in params]
    optimizer = Frugal(params, lr=LR, density=0.5, projection=projection, inner="adamw8bit")
    for _ in range(2):
        for param in params:
            param.grad = torch.randn_like(param)
        optimizer.step()
    for param, start in zip(params, starts):
        assert param.dtype == torch.bfloat16 and torch.isfinite(param).all()
        assert not torch.equal(param, start)


def test_nan_gradient_on_a_refresh_step_keeps_a_usable_subspace():
    from effllm.optim import Frugal

    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(32, 48))
    optimizer = Frugal([{"params": [weight], "projected": True}], lr=1e-3, density=0.25, update_gap=2)
    for step in range(5):
        weight.grad = torch.randn(32, 48)
        if step == 2:  # step 3 refreshes the subspace
            weight.grad[0, 0] = float("nan")
        optimizer.step()
    assert "basis" in optimizer.state[weight] and torch.isfinite(optimizer.state[weight]["basis"]).all()
    assert torch.isfinite(weight).all()


@pytest.mark.parametrize("state_free", ["sgd", "signsgd"])
@pytest.mark.parametrize("projection", ["svd", "random", "columns", "blocks"])
@pytest.mark.parametrize("shape", [(12, 40), (40, 12)], ids=["wide", "tall"])
def test_non_finite_gradient_elements_are_skipped_without_spreading(projection, state_free, shape):
    """An Inf or NaN gradient element leaves its weight element as it was (as AdamW8bit does) and changes
    nothing else: the other elements move exactly as if that gradient element were zero."""
    bad = [(2, 5), (7, 3)]
    grads = make_grads(shape, 2)
    for grad in grads:  # the first step also refreshes the subspace
        grad[bad[0]], grad[bad[1]] = float("inf"), float("nan")
    zeroed = [torch.nan_to_num(grad, nan=0.0, posinf=0.0) for grad in grads]
    start = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    moved = {}
    for name, sequence in (("bad", grads), ("zeroed", zeroed)):
        param = nn.Parameter(start.clone())
        # blocks: density 1 keeps the single weight active, the gradient going to the inner optimizer whole
        density = 1.0 if projection == "blocks" else 0.25
        optimizer = Frugal([param], lr=LR, density=density, projection=projection, state_free=state_free,
                           inner="adamw8bit", inner_kwargs={"min_8bit_size": 0})
        run_on_grads(param, optimizer, sequence)
        moved[name] = param.detach().clone()
    others = torch.ones(shape, dtype=torch.bool)
    for index in bad:
        others[index] = False
        assert moved["bad"][index] == start[index]
    assert torch.isfinite(moved["bad"]).all()
    assert torch.equal(moved["bad"][others], moved["zeroed"][others])
