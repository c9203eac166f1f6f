"""The packed SFT batches drive a real attention model: no leaks, and the demo data is learnable.

A ~0.2M-parameter torch transformer stands in for the trainer's model (which lives elsewhere):
with the collator's block-diagonal mask, changing one packed sample must not change the
outputs on another, and 50 AdamW steps on the synthetic chat corpus must cut the loss well.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from phi4core.data.chat import ChatDataset
from phi4core.data.packing import PackedCollator
from phi4core.data.synthetic import write_chat_corpus
from phi4core.data.tokenizer import DEMO_VOCAB_SIZE, get_demo_tokenizer

SEQ = 128


class TinyLM(nn.Module):
    def __init__(self, vocab=DEMO_VOCAB_SIZE, d=96, layers=2, heads=6):
        super().__init__()
        self.emb, self.pos, self.heads = nn.Embedding(vocab, d), nn.Embedding(SEQ, d), heads
        nn.init.normal_(self.emb.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d, heads, 256, 0.0, batch_first=True, norm_first=True)
            for _ in range(layers))
        self.norm = nn.LayerNorm(d)

    def forward(self, batch):
        x = self.emb(batch["tokens"]) + self.pos(batch["position_ids"])
        # The collator's mask is True where attention is blocked, as torch's bool src_mask.
        mask = batch["attention_mask"][:, 0].repeat_interleave(self.heads, 0)
        for layer in self.layers:
            x = layer(x, src_mask=mask)
        return self.norm(x) @ self.emb.weight.T


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("learn")
    tok = get_demo_tokenizer(root / "tok")
    write_chat_corpus(root / "chat.jsonl", n=1000, seed=0)
    return ChatDataset([root / "chat.jsonl"], tok, SEQ, seed=0)


def test_no_leak_between_packed_samples(data):
    torch.manual_seed(0)
    model = TinyLM().eval()
    item = data[next(i for i, b in enumerate(data.bins) if len(b) >= 2)]
    cu = item["cu_seqlens"].tolist()
    changed = {k: v.clone() for k, v in item.items()}
    changed["tokens"][cu[0]:cu[1]] = torch.randint(20, 400, (cu[1] - cu[0],))
    collate = PackedCollator()
    with torch.no_grad():
        a, b = model(collate([item])), model(collate([changed]))
    assert not torch.allclose(a[0, cu[0]:cu[1]], b[0, cu[0]:cu[1]])
    torch.testing.assert_close(a[0, cu[1]:], b[0, cu[1]:], rtol=0, atol=1e-5)


def test_demo_chat_loss_drops_in_50_steps(data):
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    collate, losses = PackedCollator(), []
    for step in range(50):
        batch = collate([data[(step * 8 + i) % len(data)] for i in range(8)])
        per_token = F.cross_entropy(model(batch).flatten(0, 1), batch["labels"].flatten(),
                                    reduction="none")
        loss = (per_token * batch["loss_mask"].flatten()).sum() / batch["loss_mask"].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > 5.0 and last < 0.5 * first, (first, last)
