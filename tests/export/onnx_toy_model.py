"""A tiny decoder with the compiled graphs' flat signature, for testing export without compile().

forward(input_ids [B,T], position_ids [B,T], attn_bias [B,1,T,P+T], past_key.0, past_value.0, ...)
  -> (logits [B,T,V], new_key.0 [B,Hkv,T,D], new_value.0 [B,Hkv,T,D], ...)
Layers listed as "kcache" take token-major host values [B,P,Hkv,D] and call kcache_attention.
"""
from __future__ import annotations

import math

import torch
from torch import nn

import kvcompile.ops  # noqa: F401  (registers torch.ops.kvcompile.*)
from kvcompile.core.layout import GraphSpec
from kvcompile.core.modes import LayerKind
from kvcompile.core.records import LayerRecord


class ToyLayer(nn.Module):
    def __init__(self, hidden, query_heads, kv_heads, head_dim):
        super().__init__()
        self.query_heads, self.kv_heads, self.head_dim = query_heads, kv_heads, head_dim
        self.q_proj = nn.Linear(hidden, query_heads * head_dim)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim)
        self.o_proj = nn.Linear(query_heads * head_dim, hidden)
        self.position_scale = nn.Parameter(torch.randn(head_dim) * 0.01)


def toy_record(layer, kind, query_heads, kv_heads, head_dim):
    record = LayerRecord(layer=layer, module=f"layers.{layer}", query_heads=query_heads, kv_heads=kv_heads,
                         head_dim=head_dim, scale=1.0 / math.sqrt(head_dim))
    return record.cached_as(LayerKind(kind))


class ToyDecoder(nn.Module):
    def __init__(self, layer_kinds, vocab=97, hidden=32, query_heads=4, kv_heads=2, head_dim=8,
                 topn=4, select="head", renormalize=False, seed=0, value_transform=None):
        super().__init__()
        self.value_transform = value_transform  # e.g. a test's own custom op applied to V
        torch.manual_seed(seed)
        self.layer_kinds = list(layer_kinds)
        self.topn, self.select, self.renormalize = topn, select, renormalize
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(ToyLayer(hidden, query_heads, kv_heads, head_dim) for _ in layer_kinds)
        self.head = nn.Linear(hidden, vocab, bias=False)
        self.spec = GraphSpec(num_layers=len(layer_kinds), query_heads=query_heads, kv_heads=kv_heads,
                              head_dim=head_dim, vocab_size=vocab, dtype="float32",
                              layers=[toy_record(i, kind, query_heads, kv_heads, head_dim)
                                      for i, kind in enumerate(layer_kinds)])

    def forward(self, input_ids, position_ids, attn_bias, *past):
        x = self.embed(input_ids)  # [B, T, hidden]
        batch, tokens = input_ids.shape
        outputs = []
        for i, layer in enumerate(self.layers):
            def heads(t, n):  # [B, T, n*D] -> [B, n, T, D]
                return t.view(batch, tokens, n, layer.head_dim).transpose(1, 2)
            # a cheap position signal so position_ids matter, standing in for RoPE
            shift = position_ids.unsqueeze(1).unsqueeze(-1).to(x.dtype) * layer.position_scale
            q = heads(layer.q_proj(x), layer.query_heads) + shift
            k = heads(layer.k_proj(x), layer.kv_heads) + shift
            v = heads(layer.v_proj(x), layer.kv_heads)
            if self.value_transform is not None:
                v = self.value_transform(v)
            past_key, past_value = past[2 * i], past[2 * i + 1]
            scale = 1.0 / math.sqrt(layer.head_dim)
            if self.layer_kinds[i] == "kcache":
                attn = torch.ops.kvcompile.kcache_attention(
                    q, k, v, past_key, past_value, attn_bias, scale, self.topn, self.select, self.renormalize)
            else:
                attn = torch.ops.kvcompile.cached_attention(q, k, v, past_key, past_value, attn_bias, scale)
            x = x + layer.o_proj(attn.transpose(1, 2).reshape(batch, tokens, -1))
            outputs += [k, v]
        return (self.head(x), *outputs)
