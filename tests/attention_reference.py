"""The float64 attention that the kernel tests compare against, built from the kernel
spec's definition (not from either backend): one dense token mask per (batch, head)."""
import torch


def dense_reference(spec, q, k_cur, v_cur, cur_valid, k_pool, v_pool, slot_valid, visit_slots,
                    visit_count, scale):
    """Float64 attention over the full token mask, built from the spec's definition (not from
    either backend): a query row of block qb attends the valid keys of current blocks j with
    frame(j) <= frame(qb) (causal) and of the first visit_count pool slots it lists.
    Padded query rows get O = 0 and LSE = -inf."""
    B, H, NQB, BT, D = q.shape
    NS = k_pool.shape[2]
    G = spec.num_heads // spec.num_kv_heads
    nb = spec.blocks_per_frame
    cv, sv = cur_valid.tolist(), slot_valid.tolist()      # host ints: fast index loops
    vs, vc = visit_slots.tolist(), visit_count.tolist()
    outs, lses = [], []
    for b in range(B):
        ob, lb = [], []
        for h in range(H):
            kv = h // G
            K = torch.cat([k_cur[b, kv].reshape(-1, D), k_pool[b, kv].reshape(-1, D)]).double()
            V = torch.cat([v_cur[b, kv].reshape(-1, D), v_pool[b, kv].reshape(-1, D)]).double()
            mask = torch.zeros(NQB * BT, (NQB + NS) * BT, dtype=torch.bool)
            for qb in range(NQB):
                rows = slice(qb * BT, qb * BT + cv[qb])
                for j in range(NQB):
                    if spec.current == "dense" or j // nb <= qb // nb:
                        mask[rows, j * BT: j * BT + cv[j]] = True
                for i in range(vc[b][h][qb]):
                    s = vs[b][h][qb][i]
                    mask[rows, (NQB + s) * BT: (NQB + s) * BT + sv[b][kv][s]] = True
            S = (q[b, h].reshape(-1, D).double() @ K.T) * scale
            S = S.masked_fill(~mask, float("-inf"))
            has = mask.any(1, keepdim=True)
            S = torch.where(has, S, torch.zeros_like(S))
            O = (torch.softmax(S, dim=1) * has) @ V
            lse = torch.where(has[:, 0], torch.logsumexp(S, 1), torch.full_like(S[:, 0], float("-inf")))
            ob.append(O.reshape(NQB, BT, D))
            lb.append(lse.reshape(NQB, BT))
        outs.append(torch.stack(ob))
        lses.append(torch.stack(lb))
    return torch.stack(outs), torch.stack(lses)
