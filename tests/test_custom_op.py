"""The attention custom op: same numbers as the autograd path, and no graph break under compile."""
import torch

from codegen.kernel_spec import AttentionKernelSpec
from codegen.ops import pbsa_attention_compiled, pbsa_attention_op, spec_to_json
from codegen import torch_backend

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
    visit_slots = torch.randint(0, NS, (B, 2, NQB, 3), generator=g, dtype=torch.int32)
    visit_count = torch.randint(0, 4, (B, 2, NQB), generator=g, dtype=torch.int32)
    return q, kc, vc, cur_valid, kp, vp, slot_valid, visit_slots, visit_count


def test_custom_op_matches_torch_backend_with_gradients():
    args = _inputs()
    o, lse = pbsa_attention_compiled(SPEC, *args, scale=0.25)
    (o.square().sum() + lse[..., :9].sum()).backward()
    grads = [a.grad.clone() for a in args[:3]]
    for a in args[:3]:
        a.grad = None
    o2, lse2 = torch_backend.attention(SPEC, *args, scale=0.25)
    (o2.square().sum() + lse2[..., :9].sum()).backward()
    torch.testing.assert_close(o, o2)
    for got, a in zip(grads, args[:3]):
        torch.testing.assert_close(got, a.grad)


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
