"""An independent oracle for ``models.ranker.Ranker``: logits recomputed from the leaf weights.

It reads nothing of the model but its config and ``state_dict()``, and shares no code with
``models/``: every piece (TorchRec lookups, LONGER with its token merge and hybrid mask,
product-key memory reads by brute force over all slots, MSN, LMN, the semantic tokenizer,
TokenMixer-Large / RankMixer blocks with their MoEs, UG-Sep's mask and compensation, the
heads) is written again below in plain tensor ops, in float64, one group and one candidate
at a time, on the UNPADDED sequence (only the ``seq_len`` valid events). The model's fast
paths (KV cache, batched user side, grouped expert GEMMs, left padding, UG-Sep's split
first layer) must agree with it within fp32 rounding.

Written from MODELS.md and the documented semantics of each module, not from the fast code:
where the two disagree, the test says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from models.batch import GroupBatch

FP32_EPS = torch.finfo(torch.float32).eps  # nn.RMSNorm(eps=None) in LONGER uses the input dtype's eps
USER, CAND, SEQ = "user", "cand", "seq"


# ---------------------------------------------------------------- primitives
def gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def silu(x: Tensor) -> Tensor:
    return x / (1.0 + torch.exp(-x))


def sigmoid(x: Tensor) -> Tensor:
    return 1.0 / (1.0 + torch.exp(-x))


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def softmax(x: Tensor) -> Tensor:
    e = torch.exp(x - x.max())
    return e / e.sum()


def normalize(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@dataclass
class Weights:
    """The state_dict in float64, read by name."""

    tensors: dict[str, Tensor]

    def __call__(self, name: str) -> Tensor:
        return self.tensors[name]

    def has(self, name: str) -> bool:
        return name in self.tensors

    def linear(self, prefix: str, x: Tensor) -> Tensor:
        """``nn.Linear``: weight (out, in)."""
        out = x @ self(f"{prefix}.weight").T
        return out + self(f"{prefix}.bias") if self.has(f"{prefix}.bias") else out

    def mlp(self, prefix: str, x: Tensor) -> Tensor:
        """Linear -> GELU -> Linear (``nn.Sequential`` indices 0 and 2)."""
        return self.linear(f"{prefix}.2", gelu(self.linear(f"{prefix}.0", x)))

    def token_linear(self, prefix: str, t: int, x: Tensor) -> Tensor:
        """Per-token linear, weight (T, d_in, d_out): ``x @ W[t] (+ b[t])``."""
        out = x @ self(f"{prefix}.weight")[t]
        return out + self(f"{prefix}.bias")[t] if self.has(f"{prefix}.bias") else out


# ---------------------------------------------------------------- LONGER
def attention_block(w: Weights, prefix: str, heads: int, queries: Tensor, keys: Tensor, visible: Tensor) -> Tensor:
    """Pre-norm block: queries (Q, D) attend to keys (K, D) where ``visible`` (Q, K); then the FFN."""
    d = queries.shape[-1]
    dh = d // heads
    norm_w = w(f"{prefix}.attn_norm.weight")
    q = rms_norm(queries, norm_w, FP32_EPS) @ w(f"{prefix}.q_proj.weight").T  # (Q, D)
    kv = rms_norm(keys, norm_w, FP32_EPS) @ w(f"{prefix}.kv_proj.weight").T  # (K, 2D)
    k, v = kv[:, :d], kv[:, d:]
    out = torch.zeros_like(q)
    for h in range(heads):
        cols = slice(h * dh, (h + 1) * dh)
        for i in range(q.shape[0]):
            allowed = visible[i].nonzero().flatten()
            scores = (k[allowed, cols] @ q[i, cols]) / math.sqrt(dh)
            out[i, cols] = softmax(scores) @ v[allowed, cols]
    x = queries + w.linear(f"{prefix}.out_proj", out)
    ffn_in = rms_norm(x, w(f"{prefix}.ffn_norm.weight"), FP32_EPS)
    return x + w.linear(f"{prefix}.ffn.2", gelu(w.linear(f"{prefix}.ffn.0", ffn_in)))


def longer_merged_tokens(w: Weights, cfg, item_emb: Tensor, actions: Tensor, gaps: Tensor) -> Tensor:
    """Valid events (n, E) oldest first -> merged tokens (ceil(n/K), D), groups aligned at the most recent event."""
    n, d, k = item_emb.shape[0], cfg.d_model, cfg.merge_k
    feats = torch.cat([item_emb, w("longer.action_emb.weight")[actions], w("longer.gap_emb.weight")[gaps]], -1)
    from_end = (n - 1 - torch.arange(n)).clamp(max=cfg.max_seq_len - 1)  # 0 = the most recent event
    events = w.linear("longer.event_proj", feats) + w("longer.pos_emb.weight")[from_end]
    merged = []
    for j in range(-(-n // k)):  # j = 0 is the most recent group
        group = events[max(n - k * (j + 1), 0) : n - k * j]  # (r, D), r <= K real events
        if cfg.merge_mode == "inner_transformer":
            everyone = torch.ones(len(group), len(group), dtype=torch.bool)
            group = attention_block(w, "longer.merge.inner", cfg.inner_heads, group, group, everyone)
        padded = torch.cat([torch.zeros(k - len(group), d, dtype=group.dtype), group])  # missing events are zero
        merged.append(w.linear("longer.merge.proj", padded.flatten()))
    return torch.stack(merged[::-1]) if merged else torch.zeros(0, d, dtype=item_emb.dtype)


def visibility(kinds: list[str], positions: list[int], query_ids: list[int]) -> Tensor:
    """LONGER's hybrid mask (MODELS.md §5 and the caching rule): (Q, K) True = visible.

    User-global queries see every user-side key; a sequence query sees user globals and the
    sequence tokens at or before its own position (causal); the candidate sees every
    user-side key and itself. No user-side query ever sees the candidate.
    """
    rows = []
    for q in query_ids:
        row = []
        for key, (kind, pos) in enumerate(zip(kinds, positions)):
            if kinds[q] == USER:
                row.append(kind != CAND)
            elif kinds[q] == SEQ:
                row.append(kind == USER or (kind == SEQ and pos <= positions[q]))
            else:
                row.append(kind != CAND or key == q)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool)


def longer_outputs(w: Weights, cfg, user_vec: Tensor, events: tuple, cand: Tensor) -> tuple[Tensor, Tensor]:
    """The full stack for one group with one candidate token: (summary (G + 1, D), candidate output (D,))."""
    merged = longer_merged_tokens(w, cfg, *events)
    globals_ = torch.cat([w("longer.cls"), w.linear("longer_user", user_vec)[None]])  # (G, D)
    g, m = globals_.shape[0], merged.shape[0]
    recent = min(cfg.num_recent, m)
    tokens = torch.cat([globals_, cand[None], merged])
    kinds = [USER] * g + [CAND] + [SEQ] * m
    positions = [-1] * (g + 1) + list(range(m))
    query_ids = list(range(g + 1)) + list(range(g + 1 + m - recent, g + 1 + m))
    keys = tokens
    for layer in range(1 + cfg.num_self_layers):
        visible = visibility(kinds, positions, query_ids)
        out = attention_block(w, f"longer.blocks.{layer}", cfg.num_heads, keys[query_ids], keys, visible)
        keys, kinds = out, [kinds[i] for i in query_ids]
        positions, query_ids = [positions[i] for i in query_ids], list(range(len(query_ids)))
    out = rms_norm(keys, w("longer.out_norm.weight"), FP32_EPS)
    recent_out = out[g + 1 :]
    mean = recent_out.mean(0) if recent else torch.zeros(cfg.d_model, dtype=out.dtype)
    return torch.cat([out[:g], mean[None]]), out[g]


# ---------------------------------------------------------------- memories
def pkm_values(w: Weights, prefix: str, table: str) -> Tensor:
    """A memory's (num_slots, value_dim) value table: one table of a TorchRec EmbeddingBagCollection."""
    return w(f"{prefix}.values.embedding_bags.{table}.weight")


def pkm_read(w: Weights, prefix: str, table: str, cfg, x: Tensor) -> Tensor:
    """Product-key memory read by brute force over ALL slots: (input_dim,) -> (value_dim,)."""
    heads, half = cfg.num_heads, cfg.key_dim // 2
    q = w.linear(f"{prefix}.query", x).view(heads, cfg.key_dim)
    keys = w(f"{prefix}.raw_keys")  # (H, 2, n, width)
    if w.has(f"{prefix}.key_map.weight"):
        keys = keys @ w(f"{prefix}.key_map.weight").T
    values = pkm_values(w, prefix, table)
    out = torch.zeros(cfg.value_dim, dtype=x.dtype)
    for h in range(heads):
        q1, q2, k1, k2 = q[h, :half], q[h, half:], keys[h, 0], keys[h, 1]
        if cfg.use_norm:
            q1, q2, k1, k2 = normalize(q1), normalize(q2), normalize(k1), normalize(k2)
        scores = ((k1 @ q1)[:, None] + (k2 @ q2)[None, :]).flatten()  # slot i1 * n + i2
        top = scores.topk(cfg.topk)
        weights = softmax(top.values * torch.exp(w(f"{prefix}.log_scale")[h, 0]))
        out = out + weights @ values[top.indices]
    return out


def lmn_read(w: Weights, cfg, item: Tensor, user_vec: Tensor) -> Tensor:
    query = w.mlp("lmn.query_mlp", torch.cat([item, user_vec]))
    return pkm_read(w, "lmn.memory", "t_lmn_value", cfg.lmn.memory, query)


# ---------------------------------------------------------------- token-mixing backbones
def mix(x: Tensor, heads: int) -> Tensor:
    """Mixed token h = slice h (width D/H) of every token, in token order: (T, D) -> (H, T*D/H)."""
    s = x.shape[1] // heads
    return torch.stack([torch.cat([x[t, h * s : (h + 1) * s] for t in range(x.shape[0])]) for h in range(heads)])


def revert(hm: Tensor, num_tokens: int) -> Tensor:
    """Inverse of ``mix``: token t = its slice of every mixed token: (H, T*s) -> (T, H*s)."""
    s = hm.shape[1] // num_tokens
    return torch.stack([torch.cat([hm[h, t * s : (t + 1) * s] for h in range(hm.shape[0])]) for t in range(num_tokens)])


def swiglu_ffn(gate_up: Tensor, down: Tensor, x: Tensor) -> Tensor:
    """``down(silu(gate) * up)`` with gate_up (d, 2h), down (h, d)."""
    hidden = down.shape[0]
    pre = x @ gate_up
    return (silu(pre[:hidden]) * pre[hidden:]) @ down


def tml_ffn(w: Weights, prefix: str, moe, t: int, x: Tensor) -> Tensor:
    """Position t's SwiGLU, or its Sparse-Pertoken MoE: shared expert + alpha * top-k softmax mix."""
    if not moe.enabled:
        return swiglu_ffn(w(f"{prefix}.gate_up.weight")[t], w(f"{prefix}.down.weight")[t], x)
    shared = swiglu_ffn(w(f"{prefix}.shared.gate_up.weight")[t], w(f"{prefix}.shared.down.weight")[t], x)
    probs = softmax(x @ w(f"{prefix}.router.weight")[t])
    top = probs.topk(moe.top_k)
    alpha = moe.num_experts / moe.top_k  # routed sum scaled by E/k (MODELS.md §3)
    routed = sum(
        alpha * p * swiglu_ffn(w(f"{prefix}.gate_up.weight")[t, e], w(f"{prefix}.down.weight")[t, e], x)
        for p, e in zip(top.values, top.indices)
    )
    return shared + routed


def tml_content(w: Weights, prefix: str, cfg, x: Tensor) -> Tensor:
    heads = cfg.num_mix_heads
    hm = mix(x, heads)
    norm_w = w(f"{prefix}.mix_norm.weight")
    rows = []
    for h in range(heads):
        if cfg.norm == "pre":
            rows.append(hm[h] + tml_ffn(w, f"{prefix}.mix_ffn", cfg.moe, h, rms_norm(hm[h], norm_w, 1e-6)))
        else:
            rows.append(rms_norm(tml_ffn(w, f"{prefix}.mix_ffn", cfg.moe, h, hm[h]) + hm[h], norm_w, 1e-6))
    return revert(torch.stack(rows), cfg.num_tokens)


def tml_finish(w: Weights, prefix: str, cfg, content: Tensor, x: Tensor) -> Tensor:
    norm_w = w(f"{prefix}.rev_norm.weight")
    rows = []
    for t in range(cfg.num_tokens):
        if cfg.norm == "pre":
            rows.append(x[t] + tml_ffn(w, f"{prefix}.rev_ffn", cfg.moe, t, rms_norm(content[t], norm_w, 1e-6)))
        else:
            rows.append(rms_norm(tml_ffn(w, f"{prefix}.rev_ffn", cfg.moe, t, content[t]) + x[t], norm_w, 1e-6))
    return torch.stack(rows)


def rankmixer_finish(w: Weights, prefix: str, cfg, content: Tensor, x: Tensor) -> Tensor:
    """``S = LN(content + X); X' = LN(PFFN(S) + S)``; the ReLU-MoE serves with its inference router."""
    s = layer_norm(content + x, w(f"{prefix}.mix_norm.weight"), w(f"{prefix}.mix_norm.bias"))
    rows = []
    for t in range(cfg.num_tokens):
        if cfg.moe.enabled:
            gates = torch.relu(w.token_linear(f"{prefix}.ffn.router_infer", t, s[t]))
            out = sum(
                gates[e]
                * (
                    gelu(s[t] @ w(f"{prefix}.ffn.w_in.weight")[t, e] + w(f"{prefix}.ffn.b_in")[t, e])
                    @ w(f"{prefix}.ffn.w_out.weight")[t, e]
                    + w(f"{prefix}.ffn.b_out")[t, e]
                )
                for e in range(cfg.moe.num_experts)
            )
        else:
            out = w.token_linear(f"{prefix}.ffn.down", t, gelu(w.token_linear(f"{prefix}.ffn.up", t, s[t])))
        rows.append(out + s[t])
    return layer_norm(torch.stack(rows), w(f"{prefix}.ffn_norm.weight"), w(f"{prefix}.ffn_norm.bias"))


def compensation(w: Weights, prefix: str, masked_out: Tensor, group_content: Tensor) -> Tensor:
    """UG-Sep's gated path into the group tokens: sigmoid(gate(group content)) * value(route @ masked-out)."""
    routed = w(f"{prefix}.route") @ masked_out  # (T_g, D)
    return torch.stack(
        [
            sigmoid(w.token_linear(f"{prefix}.gate", g, group_content[g]))
            * w.token_linear(f"{prefix}.value", g, routed[g])
            for g in range(group_content.shape[0])
        ]
    )


@dataclass(frozen=True)
class BackboneSpec:
    """Which backbone, where its weights live, and the UG-Sep switches."""

    cfg: object  # TokenMixerLargeConfig or RankMixerConfig
    is_tml: bool
    root: str  # state_dict prefix of the backbone ("backbone" or "backbone.backbone")
    ugsep: bool = False
    compensation_root: str | None = None  # prefix of UG-Sep's compensation modules, None = off


def block_content(w: Weights, spec: BackboneSpec, prefix: str, x: Tensor) -> Tensor:
    """The cross-token half of a block: TokenMixer-Large's mix half, or RankMixer's TokenMix (H = T)."""
    return tml_content(w, prefix, spec.cfg, x) if spec.is_tml else mix(x, spec.cfg.num_tokens)


def backbone(w: Weights, spec: BackboneSpec, x: Tensor, num_user: int) -> tuple[Tensor, list[Tensor]]:
    """Tokens (T, D) -> (final tokens (T, D), shallow logits). With UG-Sep, user positions mix the user
    tokens only (group tokens zeroed) and the group positions get the compensation of what that removed."""
    cfg = spec.cfg
    residual = cfg.residual_layers if spec.is_tml else ()
    shallow_at = cfg.shallow_layers if spec.is_tml else ()
    skip, shallow = x, []
    for i in range(cfg.num_layers):
        prefix = f"{spec.root}.blocks.{i}"
        content = block_content(w, spec, prefix, x)
        if spec.ugsep:
            masked = block_content(w, spec, prefix, torch.cat([x[:num_user], torch.zeros_like(x[num_user:])]))
            group = content[num_user:]
            if spec.compensation_root is not None:
                comp = f"{spec.compensation_root}.{i}"
                group = group + compensation(w, comp, (content - masked)[:num_user], group)
            content = torch.cat([masked[:num_user], group])
        x = tml_finish(w, prefix, cfg, content, x) if spec.is_tml else rankmixer_finish(w, prefix, cfg, content, x)
        if i in residual:
            x = skip = x + skip
        if i in shallow_at:
            shallow.append(w.linear(f"{spec.root}.aux_heads.{i}", x.mean(0)))
    if spec.is_tml and cfg.norm == "pre":
        x = rms_norm(x, w(f"{spec.root}.final_norm.weight"), 1e-6)
    return x, shallow


def ranker_backbone_spec(rc) -> BackboneSpec:
    is_tml = rc.backbone == "tokenmixer_large"
    if not rc.use_ugsep:
        return BackboneSpec(rc.backbone_config(), is_tml, "backbone")
    comp = "backbone.compensation" if rc.use_compensation else None
    return BackboneSpec(rc.backbone_config(), is_tml, "backbone.backbone", True, comp)


# ---------------------------------------------------------------- tokenizer and the whole ranker
def tokens(w: Weights, rc, features: dict[str, Tensor]) -> tuple[Tensor, int]:
    """Semantic tokens (T, D): user groups then group-side ones, the global token leading its side."""
    tok = rc.tokenizer_config()
    per_group = {
        g.name: w.mlp(f"tokenizer.group_mlps.{g.name}", features[g.name]).view(g.num_tokens, rc.dim) for g in tok.groups
    }
    sides = {side: [per_group[g.name] for g in tok.groups if g.side == side] for side in ("user", "group")}
    if tok.use_global_token:
        glob = w.mlp("tokenizer.global_mlp", torch.cat([features[g.name] for g in tok.groups]))
        sides[tok.global_side].insert(0, glob[None])
    user = torch.cat(sides["user"])  # the ranker always has user-side groups
    return torch.cat([user, *sides["group"]]), user.shape[0]


def group_logits(w: Weights, rc, batch: GroupBatch, b: int, n: int) -> tuple[Tensor, list[Tensor]]:
    """Logits (tasks,) and shallow logits of candidate n of group b."""
    length = int(batch.seq_len[b])
    valid = slice(batch.seq_item.shape[1] - length, None)  # left padding: the last seq_len positions
    table = lambda name: w(f"sparse_arch.embedding_collection.embeddings.{name}.weight")
    seq_items = table("t_item")[batch.seq_item[b, valid]]  # (n_valid, E)
    item = table("t_item")[batch.cand_item[b, n]]
    dense = batch.user_dense[b].double()
    user_vec = torch.cat([table("t_user")[batch.user_id[b]], w.linear("dense_arch", dense) if rc.dense_dim else dense])
    tags = [t for t in batch.cand_tags[b, n].tolist() if t != 0]
    tag_mean = table("t_tag")[tags].mean(0) if tags else torch.zeros_like(item)
    side = torch.cat([batch.cand_genres[b, n].double(), w("year_emb.weight")[batch.cand_year[b, n]], tag_mean])
    if rc.use_longer:
        events = (seq_items, batch.seq_action[b, valid], batch.seq_gap[b, valid])
        query = torch.cat([item, side]) if rc.candidate_query == "item_side" else item
        summary, cross_seq = longer_outputs(w, rc.longer, user_vec, events, w.linear("longer_cand", query))
        seq_mean = summary[-1]
    else:
        windows = [seq_items[-8:], seq_items[-64:], seq_items]
        summary = torch.stack([v.mean(0) if len(v) else torch.zeros(item.shape, dtype=item.dtype) for v in windows])
        seq_mean = summary[-1]
        cross_seq = item * seq_mean
    features = {"user": user_vec, **{f"seq_{i}": summary[i] for i in range(summary.shape[0])}}
    features |= {"item": item, "item_side": side, "cross_seq": cross_seq}
    if rc.cross_layers:  # DCNv2: x_{l+1} = x0 * (W_l x_l + b_l) + x_l over x0 = [user, seq mean, item, side]
        x0 = torch.cat([user_vec, seq_mean, item, features["item_side"]])
        crossed = x0
        for layer in range(rc.cross_layers):
            if layer == 0:  # the first W is split into its user and candidate column blocks
                w_first = torch.cat([w("cross.first_down.user.weight"), w("cross.first_down.cand.weight")], 1)
                inner = w_first @ x0 + w("cross.first_down.user.bias")
            else:
                inner = w.linear(f"cross.downs.{layer - 1}", crossed)
            crossed = x0 * inner + crossed
        features["cross_net"] = crossed
    else:
        features["cross_user"] = item * w.linear("user_cross", user_vec)
    if rc.use_lmn:
        window = seq_items[-rc.lmn_window :] if rc.lmn_window else seq_items
        reads = [lmn_read(w, rc, e, user_vec) for e in window]
        mean_read = torch.stack(reads).mean(0) if reads else torch.zeros(rc.lmn.memory.value_dim, dtype=item.dtype)
        features["lmn_user"] = w.linear("lmn.user_proj", mean_read)
        features["lmn_group"] = w.linear("lmn.group_proj", lmn_read(w, rc, item, user_vec))
    x, num_user = tokens(w, rc, features)
    if rc.use_msn:  # one gate from the user/context read multiplies every token, user and group
        read = pkm_read(w, "msn.memory", "t_msn_value", rc.msn_memory, torch.cat([user_vec, seq_mean]))
        x = x * (2.0 * sigmoid(w.linear("msn.gate_proj", read)))
    final, shallow = backbone(w, ranker_backbone_spec(rc), x, num_user)
    pooled = final.mean(0)
    logits = torch.stack(
        [w.linear(f"heads.{k}.2", gelu(w.linear(f"heads.{k}.0", pooled)))[0] for k in range(rc.num_tasks)]
    )
    if rc.cross_logit:
        logits = logits + w.linear("cross_head", features["cross_net"])
    return logits, shallow


def as_weights(model) -> Weights:
    return Weights({k: v.detach().double() for k, v in model.state_dict().items()})


def reference_logits(model, batch: GroupBatch) -> tuple[Tensor, list[Tensor]]:
    """Logits (B, N, tasks) and shallow logits, float64, from ``model``'s leaf weights (padded slots 0)."""
    w = as_weights(model)
    b_size, n_size = batch.batch_size, batch.num_candidates
    logits = torch.zeros(b_size, n_size, model.cfg.num_tasks, dtype=torch.float64)
    shallow: list[Tensor] = []
    for b in range(b_size):
        for n in range(n_size):
            if not batch.cand_mask[b, n]:
                continue
            logits[b, n], aux = group_logits(w, model.cfg, batch, b, n)
            if not shallow:
                shallow = [torch.zeros_like(logits) for _ in aux]
            for store, value in zip(shallow, aux):
                store[b, n] = value
    return logits, shallow
