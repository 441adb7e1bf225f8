"""The attention custom op: the numbers (and gradients) of an independent dense float64
reference, and no graph break under compile."""
import torch

from codegen.attention.kernel_spec import AttentionKernelSpec
from codegen.attention.ops import pbsa_attention_compiled, pbsa_attention_op, spec_to_json
from codegen.attention import torch_backend

from attention_reference import dense_reference

SPEC = AttentionKernelSpec(block_tokens=16, head_dim=16, num_heads=2, num_kv_heads=1,
                           dtype="float32", chunk_frames=2, blocks_per_frame=2, current="causal",
                           max_cached_visits=3, has_padding=True)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    B, NQB, NS = 1, SPEC.num_query_blocks, 5
    r = lambda *s: torch.randn(*s, generator=g)
    q = r(B, 2, NQB, 16, 16).requires_grad_()
    kc, vc = r(B, 1, NQB, 16, 16).requires_grad_(), r(B, 1, NQB, 16, 16).requires_grad_()
    cur_valid = torch.tensor([16, 9, 16, 9], dtype=torch.int32)
    kp, vp = r(B, 1, NS, 16, 16), r(B, 1, NS, 16, 16)
    slot_valid = torch.tensor([[[16, 16, 3, 16, 8]]], dtype=torch.int32)
    # distinct slots per row (the kernels' contract: a block is visited at most once)
    visit_slots = torch.stack([torch.randperm(NS, generator=g)[:3] for _ in range(B * 2 * NQB)])
    visit_slots = visit_slots.reshape(B, 2, NQB, 3).to(torch.int32)
    visit_count = torch.randint(0, 4, (B, 2, NQB), generator=g, dtype=torch.int32)
    return q, kc, vc, cur_valid, kp, vp, slot_valid, visit_slots, visit_count


def _loss(o, lse):
    return o.square().sum() + lse[..., :9].sum()   # every block has >= 9 valid query rows


def _reference_with_grads(args, scale):
    leaves = [a.detach().double().requires_grad_() for a in args[:3]]
    o, lse = dense_reference(SPEC, *leaves, *args[3:], scale=scale)
    _loss(o, lse).backward()
    return o.detach(), lse.detach(), [x.grad for x in leaves]


def _assert_matches_reference(o, lse, grads, ref, cur_valid):
    ro, rlse, rgrads = ref
    valid = (torch.arange(16)[None, :] < cur_valid[:, None])        # [NQB, BT] real query rows
    assert (lse[..., ~valid] == float("-inf")).all() and (o[..., ~valid, :] == 0).all()
    torch.testing.assert_close(o.double(), ro, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double()[..., valid], rlse[..., valid], rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, rgrads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_custom_op_matches_float64_reference_with_gradients():
    args = _inputs()
    assert int(args[8].sum()) > 0            # some pool visits, so the pool path is exercised
    ref = _reference_with_grads(args, 0.25)
    o, lse = pbsa_attention_compiled(SPEC, *args, scale=0.25)
    _loss(o, lse).backward()
    _assert_matches_reference(o.detach(), lse.detach(), [a.grad for a in args[:3]], ref, args[3])


def test_torch_backend_matches_float64_reference_with_gradients():
    args = _inputs()
    ref = _reference_with_grads(args, 0.25)
    o, lse = torch_backend.attention(SPEC, *args, scale=0.25)
    _loss(o, lse).backward()
    _assert_matches_reference(o.detach(), lse.detach(), [a.grad for a in args[:3]], ref, args[3])


def test_reference_notices_a_wrong_visit():
    """The reference is sensitive to the visit table, so agreement with it means something."""
    args = list(_inputs())
    ref = _reference_with_grads(args, 0.25)
    args[8] = args[8].clone()
    args[8][0, 0, 0] = (args[8][0, 0, 0] + 1) % 4   # one query block of one head visits more/less
    o, _ = torch_backend.attention(SPEC, *args, scale=0.25)
    assert not torch.allclose(o.detach().double(), ref[0], rtol=1e-5, atol=1e-5)


def test_custom_op_compiles_without_graph_breaks():
    args = _inputs(1)
    spec_json = spec_to_json(SPEC)

    def layer(q, kc, vc, *rest):
        o, _ = pbsa_attention_op(spec_json, q, kc, vc, *rest, 0.25)
        return (o * 2).sum()

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    loss = compiled(*args)
    loss.backward()
    torch.testing.assert_close(loss, layer(*[a.detach() if a.dtype.is_floating_point else a for a in args]))
    assert args[0].grad is not None and torch.isfinite(args[0].grad).all()
