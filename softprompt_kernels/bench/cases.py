"""Benchmark shapes: the workloads prefix-tuning users train (issue 6), quick and full suites.

Attention cases are one attention layer of the named model; MLP cases are the whole
prefix reparameterization of that model (all layers).  On a CPU the LLM shape runs with
fewer heads (Hq=8, Hkv=2 instead of 32/8) so that a quick run stays short; the
shape string of every row says exactly what ran.
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class AttentionCase:
    name: str          # short id, used in the table and the JSON
    workload: str      # what the shape stands for
    B: int
    Hq: int
    Hkv: int
    L: int             # queries = keys of the sequence (training: S == L)
    P: int             # prefix length
    D: int
    causal: bool
    padded: bool = False   # variable-length batch: right padding, lengths in [L/2, L]
    dropout: float = 0.0

    @property
    def shape(self) -> str:
        extra = (" causal" if self.causal else "") + (" varlen" if self.padded else "") + \
                (f" drop{self.dropout:g}" if self.dropout else "")
        return f"B{self.B} Hq{self.Hq}/{self.Hkv} L{self.L} P{self.P} D{self.D}{extra}"


@dataclass(frozen=True)
class MlpCase:
    name: str
    workload: str
    B: int             # batch rows (PEFT evaluates the MLP once per row)
    P: int
    E: int             # prefix embedding dim (= Hkv * D, PEFT's token_dim)
    mid: int           # encoder_hidden_size
    num_layers: int
    Hkv: int
    D: int

    @property
    def shape(self) -> str:
        return f"B{self.B} P{self.P} E{self.E} mid{self.mid} layers{self.num_layers} Hkv{self.Hkv} D{self.D}"


# one attention layer of each workload
ATTENTION_FULL = [
    AttentionCase("t2t", "table-to-text (GPT-2 medium layer)", 8, 16, 16, 128, 10, 64, True),
    AttentionCase("t2t-var", "table-to-text, variable length", 8, 16, 16, 128, 10, 64, True, padded=True),
    AttentionCase("cls", "P-tuning v2 classification (RoBERTa-large layer)", 16, 16, 16, 128, 20, 64, False, True),
    AttentionCase("seqlab", "sequence labelling (BERT-large layer)", 16, 16, 16, 128, 100, 64, False, True),
    AttentionCase("gpt2s", "GPT-2 small layer (end-to-end shape)", 8, 12, 12, 256, 100, 64, True),
    AttentionCase("gpt2s-drop", "GPT-2 small layer, attention dropout 0.1", 8, 12, 12, 256, 100, 64, True, dropout=0.1),
    AttentionCase("gpt2s-var", "GPT-2 small layer, variable length", 8, 12, 12, 256, 100, 64, True, padded=True),
    AttentionCase("summ", "summarization (BART-large decoder layer)", 4, 16, 16, 512, 200, 64, True),
    AttentionCase("summ-var", "summarization, variable length", 4, 16, 16, 512, 200, 64, True, padded=True),
    AttentionCase("llm", "LLM layer, GQA", 1, 32, 8, 2048, 128, 128, True),
    AttentionCase("llm-p32-var", "LLM layer, GQA, P=32, variable length", 2, 32, 8, 2048, 32, 128, True, padded=True),
]

MLP_FULL = [
    MlpCase("t2t", "table-to-text (GPT-2 medium)", 8, 10, 1024, 512, 24, 16, 64),
    MlpCase("cls", "P-tuning v2 classification (RoBERTa-large)", 16, 20, 1024, 512, 24, 16, 64),
    MlpCase("seqlab", "sequence labelling (BERT-large)", 16, 100, 1024, 512, 24, 16, 64),
    MlpCase("gpt2s", "GPT-2 small (end-to-end shape)", 8, 100, 768, 512, 12, 12, 64),
    MlpCase("summ", "summarization (BART-large)", 8, 200, 1024, 800, 12, 16, 64),
    MlpCase("llm", "LLM, GQA (prefix for 8 kv heads)", 1, 64, 1024, 512, 32, 8, 128),
]

_QUICK_ATTENTION = ("t2t", "cls", "gpt2s", "gpt2s-drop", "gpt2s-var", "summ", "llm")
_QUICK_MLP = ("t2t", "gpt2s", "summ", "llm")


def _cpu_sized(c: AttentionCase) -> AttentionCase:
    """LLM shapes on a CPU: 8/2 heads instead of 32/8 (GQA ratio kept), L and P unchanged."""
    if c.Hq >= 32:
        return replace(c, Hq=8, Hkv=2, workload=c.workload + " (CPU: 8/2 heads instead of 32/8)")
    return c


def attention_cases(full: bool, device: str) -> list[AttentionCase]:
    cases = ATTENTION_FULL if full else [c for c in ATTENTION_FULL if c.name in _QUICK_ATTENTION]
    return cases if device.startswith("cuda") else [_cpu_sized(c) for c in cases]


def mlp_cases(full: bool, device: str) -> list[MlpCase]:
    return MLP_FULL if full else [c for c in MLP_FULL if c.name in _QUICK_MLP]
