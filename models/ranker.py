"""The full ranker: sequence encoder -> memory -> token-mixing backbone -> task heads.

    encode_user(batch)               -> UserState      # once per group (B rows)
    score_candidates(state, batch)   -> RankerOutput   # candidates (B*N rows)
    forward(batch) = score_candidates(encode_user(batch), batch)

Everything candidate-independent lives in ``UserState``: the embedded user, the LONGER
KV cache and summary tokens, the MSN gate, the user tokens and, with UG-Sep, the
per-layer user-token states of the backbone. ``forward_reference`` is the no-reuse
oracle: every candidate is run as its own group (the whole user side recomputed per
candidate) through the backbone's masked reference path; the two must agree in fp32
within 1e-5 (tests/models/test_ranker.py).

Token layout (MODELS.md §1; a token is USER only if every input is user-side):
  user:  user (id emb ++ dense), seq_* (LONGER summary tokens or pooled windows), [lmn_user]
  group: [global], item (id emb), item_side (genres, year, tags), cross_seq (LONGER
         candidate output or item ⊙ sequence mean), cross_net (DCNv2 cross of the user,
         sequence summary, item and item side; cross_layers = 0: cross_user, item ⊙ user),
         [lmn_group]
With ``cross_logit`` the crossed vector also adds a linear logit beside the heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor, nn
from torchrec import EmbeddingBagCollection

from models.batch import NUM_GENRES, NUM_USER_DENSE, NUM_YEAR_BUCKETS, GroupBatch
from models.cross import CrossNetwork
from models.embedding_init import embedding
from models.layers import AuxLosses, BackboneOutput, masked_mean
from models.longer import LongerConfig, LongerEncoder, LongerUserState
from models.memory import LMN, MSN, LMNConfig, MSNConfig, PKMConfig
from models.rankmixer import FeatureGroup, RankMixer, RankMixerConfig, SemanticTokenizer, TokenizerConfig
from models.sparse import SparseArch, SparseConfig
from models.tokenmixer_large import TokenMixerLarge, TokenMixerLargeConfig
from models.ugsep import UGSepBackbone, UGSepConfig, UserTokenStates

POOL_WINDOWS = (8, 64)  # pooling encoder: means of the last 8, last 64 and all events
YEAR_DIM = 8
# TorchRec names of the memories' value tables, set here whatever the configs say: the planner
# and the sharded state dict key by table name, so MSN's and LMN's must differ.
MSN_VALUE_TABLE = "t_msn_value"
LMN_VALUE_TABLE = "t_lmn_value"


@dataclass(frozen=True)
class RankerConfig:
    """The full model; every variant of MODELS.md §7 is a setting of these fields (models/variants.py).

    ``num_tokens``/``dim``/``heads`` of the backbone configs are derived from the token
    layout and ``dim``, and the memories' ``input_dim`` and ``table_name`` from the layout
    (``MSN_VALUE_TABLE``, ``LMN_VALUE_TABLE``); the values written there are ignored.
    """

    sparse: SparseConfig = field(default_factory=SparseConfig)
    dim: int = 64
    backbone: Literal["rankmixer", "tokenmixer_large"] = "tokenmixer_large"
    rankmixer: RankMixerConfig = field(default_factory=lambda: RankMixerConfig(num_tokens=8, dim=64))
    # Four blocks so the spec's extras are on by default (MODELS.md §3): the inter-layer residual
    # after block 1 and the shallow auxiliary head on it (its defaults; never after the last block).
    tokenmixer_large: TokenMixerLargeConfig = field(
        default_factory=lambda: TokenMixerLargeConfig(num_tokens=8, dim=64, num_layers=4, expansion=2.0)
    )
    use_global_token: bool = True  # TokenMixer-Large's global token (RankMixer has none)
    # Feature tokens (the global token not counted): 0 = one per feature group (8 to 10 here);
    # 16 or 32 reach the papers' token counts by splitting groups into several tokens.
    num_feature_tokens: int = 0
    use_ugsep: bool = False
    use_compensation: bool = True
    sequence_encoder: Literal["pooling", "longer"] = "longer"
    longer: LongerConfig = field(default_factory=lambda: LongerConfig(num_recent=32, num_self_layers=1))
    use_msn: bool = False
    msn_memory: PKMConfig = field(default_factory=lambda: PKMConfig(num_slots=4096, topk=8, key_dim=32))
    use_lmn: bool = False
    lmn: LMNConfig = field(default_factory=lambda: LMNConfig(memory=PKMConfig(num_slots=4096, topk=8, key_dim=32)))
    # Behaviours LMN reads for the user token and trains its memory on (the most recent ones);
    # 0 = the whole sequence. Long-term history is the point of LMN (MODELS.md §6).
    lmn_window: int = 512
    lmn_loss_weight: float = 0.1
    # DLRM's dense arch: the user's dense features go through a linear map to this width before
    # they join the user id embedding (0 = the raw features). Three raw floats beside a 32-wide
    # embedding give the cross and the tokens almost nothing to multiply; projected they gave
    # +0.009 valid like AUC on 3 of 3 seeds (docs/MODELS.md, "The dense arch"), as in DCNv2.
    dense_dim: int = 32
    head_hidden: int = 64
    num_tasks: int = 2
    # DCNv2 cross layers over x0 = [user ++ dense, sequence summary, item, item side] (0 = none): the
    # crossed vector is a group token ("cross_net") and, with ``cross_logit``, also feeds a linear
    # logit path beside the heads (DCNv2's parallel head). Explicit products of the user's and the
    # candidate's raw features, which the token mixers otherwise reach only through their MLPs
    # (docs/MODELS.md, "The cross").
    cross_layers: int = 3
    cross_logit: bool = True
    # What LONGER's candidate token (its target-attention query) is built from: "item" = the id
    # embedding alone (every cold candidate, one shared rare-id row, asks the sequence the same
    # question); "item_side" = id embedding ++ genres, year, tags. "item_side" lost valid like AUC
    # on 2 of 2 seeds (docs/MODELS.md, "The schedule"), so "item" stays.
    candidate_query: Literal["item", "item_side"] = "item"

    def __post_init__(self) -> None:
        groups = len(self._base_groups())
        if self.num_feature_tokens and self.num_feature_tokens < groups:
            raise ValueError(
                f"RankerConfig: num_feature_tokens={self.num_feature_tokens} is below the {groups} feature "
                "groups of this layout (every group needs a token); 0 gives one token per group"
            )
        if self.dense_dim < 0:
            raise ValueError(f"RankerConfig: dense_dim={self.dense_dim} must be >= 0 (0 = the raw dense features)")
        if self.cross_layers < 0:
            raise ValueError(f"RankerConfig: cross_layers={self.cross_layers} must be >= 0 (0 = no cross network)")
        if self.cross_logit and not self.cross_layers:
            raise ValueError("RankerConfig: cross_logit needs cross_layers >= 1 (the logit path reads the cross)")
        if self.candidate_query not in ("item", "item_side"):
            raise ValueError(f"RankerConfig: candidate_query={self.candidate_query!r} is not 'item' or 'item_side'")
        if self.lmn_window < 0:
            raise ValueError(f"RankerConfig: lmn_window={self.lmn_window} must be >= 0 (0 = whole sequence)")
        if self.backbone == "rankmixer" and self.dim % self.num_tokens:
            t = self.num_tokens
            raise ValueError(
                f"RankerConfig: RankMixer mixes with H = T heads, so dim={self.dim} must be a "
                f"multiple of the {t} tokens of this layout (e.g. dim={t * -(-self.dim // t)})"
            )

    @property
    def use_longer(self) -> bool:
        return self.sequence_encoder == "longer"

    @property
    def seq_dim(self) -> int:
        return self.longer.d_model if self.use_longer else self.sparse.embedding_dim

    @property
    def num_seq_tokens(self) -> int:
        """LONGER: its CLS tokens + the user-global token + the mean of recent outputs; pooling: 3 windows."""
        return self.longer.num_cls + 2 if self.use_longer else len(POOL_WINDOWS) + 1

    @property
    def user_dim(self) -> int:
        """Width of the user vector: id embedding ++ dense arch output (raw dense features when 0)."""
        return self.sparse.embedding_dim + (self.dense_dim or NUM_USER_DENSE)

    def feature_groups(self) -> tuple[FeatureGroup, ...]:
        """The layout's feature groups, each with its share of ``num_feature_tokens``."""
        groups = self._base_groups()
        if not self.num_feature_tokens:
            return groups
        # An equal share each; the remainder goes to the widest groups (most inputs per token).
        share, extra = divmod(self.num_feature_tokens, len(groups))
        widest = sorted(range(len(groups)), key=lambda i: -groups[i].in_dim)[:extra]
        return tuple(replace(g, num_tokens=share + (i in widest)) for i, g in enumerate(groups))

    def _base_groups(self) -> tuple[FeatureGroup, ...]:
        e, s = self.sparse.embedding_dim, self.seq_dim
        groups = [FeatureGroup("user", self.user_dim, "user")]
        groups += [FeatureGroup(f"seq_{i}", s, "user") for i in range(self.num_seq_tokens)]
        if self.use_lmn:
            groups.append(FeatureGroup("lmn_user", self.dim, "user"))
        groups += [
            FeatureGroup("item", e, "group"),
            FeatureGroup("item_side", NUM_GENRES + YEAR_DIM + e, "group"),
            FeatureGroup("cross_seq", s, "group"),
        ]
        # The user x candidate cross: DCNv2's cross network when on (it holds item ⊙ W user among
        # its degree-2 terms), else the single Hadamard product; one token either way, so the
        # token count (and RankMixer's H = T) does not change.
        if self.cross_layers:
            groups.append(FeatureGroup("cross_net", self.cross_dim, "group"))
        else:
            groups.append(FeatureGroup("cross_user", e, "group"))
        if self.use_lmn:
            groups.append(FeatureGroup("lmn_group", self.dim, "group"))
        return tuple(groups)

    @property
    def cross_user_dim(self) -> int:
        """The cross network's user half: the user vector ++ the sequence summary."""
        return self.user_dim + self.seq_dim

    @property
    def cross_cand_dim(self) -> int:
        """The cross network's candidate half: item embedding ++ item side (genres, year, tags)."""
        return 2 * self.sparse.embedding_dim + NUM_GENRES + YEAR_DIM

    @property
    def query_dim(self) -> int:
        """Width of the candidate query (``candidate_query``): the item embedding, or it ++ item side."""
        return self.cross_cand_dim if self.candidate_query == "item_side" else self.sparse.embedding_dim

    @property
    def cross_dim(self) -> int:
        """Width of x0 and of the crossed vector (the cross_net token's input, the logit path's)."""
        return self.cross_user_dim + self.cross_cand_dim

    def tokenizer_config(self) -> TokenizerConfig:
        use_global = self.use_global_token and self.backbone == "tokenmixer_large"
        return TokenizerConfig(groups=self.feature_groups(), dim=self.dim, use_global_token=use_global)

    @property
    def num_tokens(self) -> int:
        return self.tokenizer_config().num_tokens()

    def backbone_config(self) -> TokenMixerLargeConfig | RankMixerConfig:
        t, d = self.num_tokens, self.dim
        if self.backbone == "rankmixer":
            return replace(self.rankmixer, num_tokens=t, dim=d)
        # H = T when it divides D, else the largest divisor of D below T (mixing stays exact).
        heads = max(h for h in range(1, t + 1) if d % h == 0)
        return replace(self.tokenmixer_large, num_tokens=t, dim=d, heads=heads, num_tasks=self.num_tasks)


@dataclass
class RankerOutput:
    """What a ranker's forward returns (serving reads ``logits``; training adds the rest)."""

    logits: Tensor  # (B, N, tasks), 0 at padded candidate slots
    aux_logits: list[Tensor] = field(default_factory=list)  # shallow heads, each (B, N, tasks)
    aux_losses: dict[str, Tensor] = field(default_factory=dict)  # weighted regularisers, scalars
    metrics: dict[str, float] = field(default_factory=dict)  # monitoring values (e.g. MoE activity)


@dataclass
class UserState:
    """Candidate-independent computation of B groups; cacheable per user (serving)."""

    user_vec: Tensor  # (B, user_dim)
    user_features: dict[str, Tensor]  # user-side tokenizer inputs, each (B, F)
    x_user: Tensor  # (B, T_u, D) user tokens (gated by MSN if on)
    seq_mean: Tensor  # (B, seq_dim) sequence summary for the pooled cross
    gate: Tensor | None = None  # (B, D) MSN gate
    longer: LongerUserState | None = None
    backbone: UserTokenStates | None = None
    aux: AuxLosses = field(default_factory=AuxLosses)
    # Reference path only: LONGER's candidate outputs from the full stack, no KV cache (B, 1, S).
    reference_cross_seq: Tensor | None = None

    def nbytes(self) -> int:
        """Approximate bytes held (serving cache budget)."""
        tensors = [self.user_vec, self.x_user, self.seq_mean, *self.user_features.values()]
        tensors += [self.gate] if self.gate is not None else []
        total = sum(t.numel() * t.element_size() for t in tensors)
        total += self.backbone.nbytes() if self.backbone is not None else 0
        return total + (self.longer.nbytes() if self.longer is not None else 0)

    @staticmethod
    def cat(states: list[UserState]) -> UserState:
        """The states of several groups stacked in order, one row each (a state may repeat):
        ``score_candidates`` then scores all their candidate sets in one call (serving batches).
        Auxiliary losses are training's and are not carried."""
        if not states:
            raise ValueError("UserState.cat needs at least one state")
        if any(s.reference_cross_seq is not None for s in states):
            raise ValueError("UserState.cat: reference-path states (encode_user(reference=True)) do not stack")
        first = states[0]
        optional = lambda name: None if getattr(first, name) is None else [getattr(s, name) for s in states]
        longer, backbone, gate = optional("longer"), optional("backbone"), optional("gate")
        return UserState(
            user_vec=torch.cat([s.user_vec for s in states]),
            user_features={k: torch.cat([s.user_features[k] for s in states]) for k in first.user_features},
            x_user=torch.cat([s.x_user for s in states]),
            seq_mean=torch.cat([s.seq_mean for s in states]),
            gate=None if gate is None else torch.cat(gate),
            longer=None if longer is None else LongerUserState.cat(longer),
            backbone=None if backbone is None else UserTokenStates.cat(backbone),
        )


class Ranker(nn.Module):
    """The composed ranker (see module docstring)."""

    def __init__(self, cfg: RankerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        e, d = cfg.sparse.embedding_dim, cfg.dim
        self.sparse_arch = SparseArch(cfg.sparse)
        self.year_emb = embedding(NUM_YEAR_BUCKETS, YEAR_DIM)
        self.dense_arch = nn.Linear(NUM_USER_DENSE, cfg.dense_dim) if cfg.dense_dim else None
        self.user_cross = None if cfg.cross_layers else nn.Linear(cfg.user_dim, e)
        if cfg.use_longer:
            self.longer_cfg = replace(cfg.longer, item_dim=e)
            self.longer = LongerEncoder(self.longer_cfg)
            self.longer_user = nn.Linear(cfg.user_dim, cfg.seq_dim)  # user-global token
            self.longer_cand = nn.Linear(cfg.query_dim, cfg.seq_dim)  # candidate token
        msn_memory = replace(cfg.msn_memory, input_dim=cfg.user_dim + cfg.seq_dim, table_name=MSN_VALUE_TABLE)
        self.msn = MSN(MSNConfig(token_dim=d, memory=msn_memory)) if cfg.use_msn else None
        lmn_memory = replace(cfg.lmn.memory, table_name=LMN_VALUE_TABLE)
        lmn_cfg = replace(cfg.lmn, item_dim=e, user_dim=cfg.user_dim, token_dim=d, memory=lmn_memory)
        self.lmn = LMN(lmn_cfg) if cfg.use_lmn else None
        self.tokenizer = SemanticTokenizer(cfg.tokenizer_config())
        backbone_cfg = cfg.backbone_config()
        if cfg.use_ugsep:
            ug = UGSepConfig(
                num_user_tokens=self.tokenizer.cfg.num_tokens("user"),
                use_compensation=cfg.use_compensation,
                backbone=cfg.backbone,
                **{cfg.backbone: backbone_cfg},
            )
            self.backbone: nn.Module = UGSepBackbone(ug)
        else:
            self.backbone = (
                TokenMixerLarge(backbone_cfg) if cfg.backbone == "tokenmixer_large" else RankMixer(backbone_cfg)
            )
        self.cross = (
            CrossNetwork(cfg.cross_user_dim, cfg.cross_cand_dim, cfg.cross_layers, rank=None)
            if cfg.cross_layers
            else None
        )
        self.cross_head = nn.Linear(cfg.cross_dim, cfg.num_tasks) if cfg.cross_logit else None
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(d, cfg.head_hidden), nn.GELU(), nn.Linear(cfg.head_hidden, 1))
            for _ in range(cfg.num_tasks)
        )

    # ------------------------------------------------------------------ user side
    def _sequence(self, batch: GroupBatch, seq_emb: Tensor, user_vec: Tensor) -> tuple[Tensor, LongerUserState | None]:
        """Sequence summary tokens (B, num_seq_tokens, seq_dim) and the LONGER cache (None when pooling)."""
        if self.cfg.use_longer:
            glob = self.longer_user(user_vec).unsqueeze(1)  # (B, 1, S)
            state = self.longer.encode_user(seq_emb, batch.seq_action, batch.seq_gap, batch.seq_len, glob)
            return state.summary_tokens(), state  # (B, G + 1, S)
        return self._pooled_sequence(batch, seq_emb), None

    def _pooled_sequence(self, batch: GroupBatch, seq_emb: Tensor) -> Tensor:
        """Means of the last 8, last 64 and all valid events: (B, 3, E)."""
        length = seq_emb.shape[1]
        pos_from_end = torch.arange(length - 1, -1, -1, device=seq_emb.device)  # 0 = most recent
        valid = pos_from_end.unsqueeze(0) < batch.seq_len.unsqueeze(1)  # (B, L)
        windows = [valid & (pos_from_end < w).unsqueeze(0) for w in POOL_WINDOWS] + [valid]
        return torch.stack([masked_mean(seq_emb, m, 1) for m in windows], 1)

    def _longer_reference(self, batch: GroupBatch, seq_emb: Tensor, user_vec: Tensor) -> tuple[Tensor, Tensor]:
        """One-candidate groups through LONGER's full stack (no KV cache): summary, candidate output."""
        if batch.num_candidates != 1:
            raise ValueError("the LONGER reference path takes groups of one candidate (GroupBatch.per_candidate)")
        item, side = self._candidate_inputs(batch)
        cand = self.longer_cand(self._query(item, side))  # (B, 1, S)
        glob = self.longer_user(user_vec).unsqueeze(1)
        cross, summary = self.longer(
            seq_emb, batch.seq_action, batch.seq_gap, batch.seq_len, cand, glob, return_summary=True
        )  # (B,1,S), (B,1,G+1,S)
        return summary[:, 0], cross

    def _lmn_window(self, batch: GroupBatch, seq_emb: Tensor) -> tuple[Tensor, Tensor]:
        """The last ``lmn_window`` behaviours (all when 0): (B, W, E) and their validity mask (B, W)."""
        length = seq_emb.shape[1]
        w = min(self.cfg.lmn_window or length, length)
        pos_from_end = torch.arange(w - 1, -1, -1, device=seq_emb.device)
        return seq_emb[:, length - w :], pos_from_end.unsqueeze(0) < batch.seq_len.unsqueeze(1)

    def encode_user(self, batch: GroupBatch, reference: bool = False) -> UserState:
        """Everything candidate-independent, at batch B.

        ``reference=True`` (groups of one candidate only) is the no-reuse oracle: LONGER runs
        its full stack with the candidate inside instead of the KV cache, and the UG-Sep user
        path is left to the backbone's masked reference.
        """
        emb = self.sparse_arch({"seq_item": batch.seq_item, "user": batch.user_id})
        dense = batch.user_dense if self.dense_arch is None else self.dense_arch(batch.user_dense)
        user_vec = torch.cat([emb["user"], dense], -1)  # (B, user_dim)
        reference_cross = None
        if reference and self.cfg.use_longer:
            seq_tokens, reference_cross = self._longer_reference(batch, emb["seq_item"], user_vec)
            longer_state = None
        else:
            seq_tokens, longer_state = self._sequence(batch, emb["seq_item"], user_vec)
        features = {"user": user_vec, **{f"seq_{i}": seq_tokens[:, i] for i in range(self.cfg.num_seq_tokens)}}
        aux = AuxLosses()
        if self.lmn is not None:
            history, history_mask = self._lmn_window(batch, emb["seq_item"])
            features["lmn_user"] = self.lmn.user_token(user_vec, history, history_mask)
            if self.training:
                memory_loss = self.lmn.memory_loss(history, user_vec, history_mask)
                aux.add("lmn_memory_loss", self.cfg.lmn_loss_weight * memory_loss)
        seq_mean = seq_tokens[:, -1]
        gate = self.msn.gate(torch.cat([user_vec, seq_mean], -1)) if self.msn is not None else None
        x_user = self.tokenizer(features, side="user")  # (B, T_u, D)
        if gate is not None:
            x_user = x_user * gate.unsqueeze(1)
        states = self.backbone.forward_user(x_user) if self.cfg.use_ugsep and not reference else None
        return UserState(user_vec, features, x_user, seq_mean, gate, longer_state, states, aux, reference_cross)

    # ------------------------------------------------------------------ candidate side
    def _candidate_inputs(self, batch: GroupBatch) -> tuple[Tensor, Tensor]:
        """The candidates' id embeddings (B, N, E) and side features (B, N, genres + year + E)."""
        emb = self.sparse_arch({"cand_item": batch.cand_item, "cand_tag": batch.cand_tags})
        tags = masked_mean(emb["cand_tag"], batch.cand_tags > 0, 2)  # (B, N, E)
        return emb["cand_item"], torch.cat([batch.cand_genres, self.year_emb(batch.cand_year), tags], -1)

    def _query(self, item: Tensor, side: Tensor) -> Tensor:
        """The candidate query of ``candidate_query``: (B, N, query_dim)."""
        return torch.cat([item, side], -1) if self.cfg.candidate_query == "item_side" else item

    def _group_features(self, state: UserState, batch: GroupBatch) -> dict[str, Tensor]:
        item, side = self._candidate_inputs(batch)
        if state.reference_cross_seq is not None:
            cross_seq = state.reference_cross_seq  # (B, 1, S)
        elif self.cfg.use_longer:
            cross_seq = self.longer.score(state.longer, self.longer_cand(self._query(item, side)))  # (B, N, S)
        else:
            cross_seq = item * state.seq_mean.unsqueeze(1)
        features = {"item": item, "item_side": side, "cross_seq": cross_seq}
        if self.cross is None:
            features["cross_user"] = item * self.user_cross(state.user_vec).unsqueeze(1)
        else:
            # The first cross layer's user half runs once per group (SplitLinear), as in DCNv2.
            user = torch.cat([state.user_vec, state.seq_mean], -1)  # (B, cross_user_dim)
            cand = torch.cat([item, side], -1)  # (B, N, cross_cand_dim)
            x0 = torch.cat([user.unsqueeze(1).expand(-1, cand.shape[1], -1), cand], -1)
            features["cross_net"] = self.cross(user, cand, x0)
        if self.lmn is not None:
            features["lmn_group"] = self.lmn.group_tokens(state.user_vec, item)
        return features

    def score_candidates(self, state: UserState, batch: GroupBatch, reference: bool = False) -> RankerOutput:
        """Logits (B, N, tasks) of the candidates of ``batch`` given the groups' user state.

        ``reference=True`` runs the UG-Sep backbone through its masked per-candidate path.
        """
        features = {**state.user_features, **self._group_features(state, batch)}
        x_group = self.tokenizer(features, side="group")  # (B, N, T_g, D)
        if state.gate is not None:
            x_group = x_group * state.gate[:, None, None]
        out = self._backbone(state, x_group, reference)
        logits = torch.cat([head(out.pooled) for head in self.heads], -1)  # (B, N, tasks)
        if self.cross_head is not None:
            logits = logits + self.cross_head(features["cross_net"])
        logits = logits * batch.cand_mask.unsqueeze(-1).to(logits.dtype)
        aux = AuxLosses()
        aux.merge(state.aux)
        aux.merge(out.aux)
        return RankerOutput(
            logits=logits, aux_logits=list(out.shallow_logits), aux_losses=dict(aux.losses), metrics=dict(aux.metrics)
        )

    def _backbone(self, state: UserState, x_group: Tensor, reference: bool) -> BackboneOutput:
        if self.cfg.use_ugsep and not reference:
            if state.backbone is None:
                raise ValueError(
                    "score_candidates: this state came from encode_user(reference=True); score it with reference=True"
                )
            return self.backbone.forward_group(state.backbone, x_group)
        if self.cfg.use_ugsep:
            return self.backbone(state.x_user, x_group)
        b, n = x_group.shape[:2]
        x_user = state.x_user.unsqueeze(1).expand(b, n, *state.x_user.shape[1:])
        return self.backbone(torch.cat([x_user, x_group], dim=-2))  # (B, N, T, D) in

    # ------------------------------------------------------------------ entry points
    def forward(self, batch: GroupBatch) -> RankerOutput:
        return self.score_candidates(self.encode_user(batch), batch)

    def forward_reference(self, batch: GroupBatch) -> RankerOutput:
        """No reuse: each candidate is its own group, the user side recomputed for it, LONGER's
        full stack (no KV cache) and the UG-Sep masked reference path."""
        b, n = batch.batch_size, batch.num_candidates
        flat = batch.per_candidate()  # B*N groups of 1
        out = self.score_candidates(self.encode_user(flat, reference=True), flat, reference=True)
        reshape = lambda t: t.reshape(b, n, *t.shape[2:])
        return RankerOutput(
            logits=reshape(out.logits), aux_logits=[reshape(a) for a in out.aux_logits], aux_losses=out.aux_losses
        )

    def memory_value_parameters(self) -> list[nn.Parameter]:
        """PKM value tables, which train with their own (higher) learning rate (MODELS.md §6)."""
        return [p for m in (self.msn, self.lmn) if m is not None for p in m.memory.value_parameters()]

    def memory_value_tables(self) -> dict[str, EmbeddingBagCollection]:
        """PKM value tables by table name (``MSN_VALUE_TABLE``, ``LMN_VALUE_TABLE``), each a weighted
        one-table EmbeddingBagCollection at ``{msn,lmn}.memory.values``: the training stage shards
        them (DMP, EmbeddingBagCollectionSharder) with a fused row-wise optimiser at the memories'
        learning rate, and keeps ``memory_value_parameters`` out of the dense optimiser."""
        memories = [m.memory for m in (self.msn, self.lmn) if m is not None]
        return {memory.cfg.table_name: memory.value_tables() for memory in memories}
